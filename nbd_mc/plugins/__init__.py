"""The nbdkit-facing plugin file, shipped inside the package.

nbdkit loads a plugin by file name (``nbdkit python FILE``), so the file has to
exist wherever nbd-mc is installed: a wheel, a Debian package, a checkout.  It
lives here, inside the package, because only what is inside the package travels
with ``pip install`` or ``dpkg``; ``nbd-mc serve`` finds it through
``importlib.resources`` (see ``plugin_file``).  The checkout's ``plugins/nbd_mc.py``
is a symbolic link to this same file, so there is one plugin file and no copy to
keep in sync, and ``nbdkit python plugins/nbd_mc.py ...`` keeps working from a
checkout.  The installed path ends in ``plugins/nbd_mc.py`` too, which is how
process listings (``pgrep -f plugins/nbd_mc.py``) recognise our nbdkit.
"""

from __future__ import annotations

import importlib.resources
import pathlib


def plugin_file() -> str:
    """The absolute path of the plugin file nbdkit loads.

    Packages are installed unpacked (wheels, dist-packages, editable checkouts), so
    the resource is a real file; a zipped install could not be loaded by nbdkit at
    all, and is refused here with a clear error instead of a confusing one."""
    path = importlib.resources.files(__name__).joinpath("nbd_mc.py")
    if not isinstance(path, pathlib.Path):
        raise RuntimeError(f"nbd-mc's plugin {path} is not a file on disk: install "
                           "nbd-mc unpacked (pip install, not a zip)")
    return str(path)
