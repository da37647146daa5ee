"""``python -m nbd_mc.cli``: the same as the `nbd-mc` command."""

from nbd_mc.cli import main

main()
