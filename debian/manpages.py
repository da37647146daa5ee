"""Write a man page per nbd-mc command (nbd-mc.1, nbd-mc-serve.1, ...) into DIR.

Generated from the click commands by click-man (Debian's python3-click-man), so
the pages say what ``--help`` says and never drift from it.  Run by debian/rules
with the freshly installed package on PYTHONPATH.
"""

import sys

from click_man.core import write_man_pages

from nbd_mc.cli import main

try:
    from importlib.metadata import version
    VERSION = version("nbd-mc")
except Exception:  # noqa: BLE001 -- the version only decorates the page footer
    VERSION = None

if __name__ == "__main__":
    import os
    os.makedirs(sys.argv[1], exist_ok=True)
    write_man_pages("nbd-mc", main, version=VERSION, target_dir=sys.argv[1])
