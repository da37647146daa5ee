"""Checksum sync, the secondary's side: the control command ``checksum-range``.

Digests each block of a range of a disk's *live* image (what the writer sees, not
the committed view: the checksum sync writes the live image); a hole is ``null``
and costs no read.  The digests are nbd_mc/checksum.py's, the primary's walk is in
primary/resync.py.
"""

from __future__ import annotations

import time

from ..checksum import DEFAULT_BLOCK, MAX_LENGTH, MIN_BLOCK, digests
from ..rangeargs import block_arg, disk_range


def checksum_range(group, arguments: dict) -> dict:
    """Digest each ``block`` of [offset, offset+length) of ``disk``'s live image."""
    r = disk_range("checksum-range", group, arguments, MAX_LENGTH)
    name, disk, offset, length = r.name, r.disk, r.offset, r.length
    block = block_arg("checksum-range", arguments, MIN_BLOCK, MAX_LENGTH, DEFAULT_BLOCK)
    group.check_mode("checksum-range")
    t0 = time.perf_counter()

    def read(view, pos):
        with group.io():            # per CHUNK: a commit or a guest write waits for one
            group.read(disk, view, pos)

    blocks, read_bytes = digests(disk.fd, offset, min(length, disk.size - offset), block, read)
    return {"disk": name, "offset": offset, "length": length, "block": block,
            "blocks": blocks, "data_bytes": read_bytes,
            "seconds": time.perf_counter() - t0}
