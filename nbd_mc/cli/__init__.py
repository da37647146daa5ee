"""The `nbd-mc` command line (click): ``nbd-mc = nbd_mc.cli:main``.

    common.py     the group, --control/--state-dir/--json, refusals and output
    secondary.py  serve, status, commit, rollback, fence, fence-primary, failover, stop, recover, inspect
    protect.py    protect (the primary side)

Exit status: 0 success, 1 the operation was refused or failed (the message says
why), 2 usage error.  `--json` prints the control reply's ``return`` object.
"""

from . import protect, secondary  # noqa: F401  (register their commands on main)
from .common import main

__all__ = ["main"]
