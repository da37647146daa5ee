"""nbdkit python plugin for nbd-mc: a thin adapter, all logic is in the nbd_mc package.

    nbdkit python plugins/nbd_mc.py state_dir=DIR disk=vda=/srv/vda.raw [disk=...]
        [cluster_size=64K] [durability=process|power] [control=ADDR]
        [control_tls=DIR] [threads=parallel|serialize]

Normally started by `nbd-mc serve`.
"""

import os
import sys

# nbdkit embeds /usr/bin/python3: make the package (next to this directory) importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nbd_mc.secondary.nbdkit_plugin import (  # noqa: E402,F401
    after_fork, block_size, can_cache, can_extents, can_fast_zero, can_flush, can_fua,
    can_multi_conn, can_trim, can_write, can_zero, cleanup, close, config, config_complete,
    default_export, export_description, extents, flush, get_ready, get_size, is_rotational,
    list_exports, open, pread, pwrite, thread_model, trim, zero)

API_VERSION = 2
