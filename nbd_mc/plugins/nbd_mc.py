"""nbdkit python plugin for nbd-mc: a thin adapter, all logic is in the nbd_mc package.

    nbdkit python plugins/nbd_mc.py state_dir=DIR disk=vda=/srv/vda.raw [disk=...]
        [cluster_size=64K] [durability=process|power] [control=ADDR]
        [control_tls=DIR] [threads=parallel|serialize]

Normally started by `nbd-mc serve`, which passes this file's installed path
(nbd_mc.plugins.plugin_file).  The checkout's plugins/nbd_mc.py is a symbolic
link to this file.
"""

import os
import sys

# nbdkit embeds Debian's libpython with the system's sys.path: it knows nothing of
# the virtual environment (or checkout) nbd-mc runs from.  The directory that holds
# the nbd_mc package is two levels above this file (nbd_mc/plugins/nbd_mc.py): a
# venv's site-packages, /usr/lib/python3/dist-packages, or a checkout.  realpath:
# plugins/nbd_mc.py in a checkout is a symbolic link to this file.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))

from nbd_mc.secondary.nbdkit_plugin import (  # noqa: E402,F401
    after_fork, block_size, can_cache, can_extents, can_fast_zero, can_flush, can_fua,
    can_multi_conn, can_trim, can_write, can_zero, cleanup, close, config, config_complete,
    default_export, export_description, extents, flush, get_ready, get_size, is_rotational,
    list_exports, open, pread, pwrite, thread_model, trim, zero)

API_VERSION = 2
