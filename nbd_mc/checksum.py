"""Checksum sync: which blocks of a disk differ between the primary and a replica.

When no dirty bitmap can say what changed (the secondary is new to this QEMU,
or the bitmaps died with a restarted QEMU) but the replica's image may hold a
near copy of the disk -- the returning old primary after a failover is the case
that matters -- protect compares contents instead of copying everything, like
DRBD's ``csums-alg``: both sides hash the same blocks, only differing blocks
cross the network.  The primary's walk is in primary/resync.py, the secondary's
half -- the control command ``checksum-range`` -- in secondary/checksum.py; this
module is what both sides share, the digests:

    checksum-range {disk, offset, length, block}
        -> {blocks: [hex digest or null per block], data_bytes, ...}

It hashes the *live* image (what the writer sees, not the committed view: the
checksum sync writes the live image).  A block that is a hole in the image is
``null`` and costs no read; the primary treats null as a block of zeros.

Digests are BLAKE2b-128 (hashlib): unlike verify's per-sector hashes, which only
localise a difference a whole-slice hash already proved, a collision here would
leave a differing block uncopied, so they are long enough that accidents do not
happen (2^-64 for a pair with 128 bits, birthday bound included).

Standard library only: the secondary's half runs inside nbdkit's Python.
"""

from __future__ import annotations

import functools
import hashlib

from .fileio import data_extents

DIGEST_SIZE = 16
#: One request hashes this much at most (the secondary reads it block by block).
MAX_LENGTH = 64 << 20
MIN_BLOCK = 4096
DEFAULT_BLOCK = 64 << 10
#: The most a request reads at a time: its memory, and how long it holds the
#: group's gate at once (a commit waits for one CHUNK read, never a whole range).
CHUNK = 1 << 20


def block_digest(data) -> str:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).hexdigest()


@functools.lru_cache(maxsize=8)
def zero_digest(length: int) -> str:
    """The digest of ``length`` zero bytes: what a hole hashes to."""
    return block_digest(bytes(length))


def _extents(extents, offset: int, end: int):
    if isinstance(extents, int):  # a file descriptor: its SEEK_DATA/SEEK_HOLE map
        return data_extents(extents, offset, end)
    return extents(offset, end)


def hole_blocks(extents, offset: int, length: int, block: int) -> set[int]:
    """Indexes of the blocks of [offset, offset+length) that lie entirely in holes.

    ``extents``: a file descriptor, or a callable(offset, end) giving (start,
    length, data) runs like fileio.data_extents (the primary reads its drive
    through a source that may not be a file: primary/source.py)."""
    holes = set()
    for start, n, data in _extents(extents, offset, offset + length):
        if data:
            continue
        first = -(-(start - offset) // block)          # first block starting in the hole
        last = (start + n - offset) // block           # blocks ending inside it
        if start + n == offset + length:
            last = -(-length // block)                  # the short last block too
        holes.update(range(first, last))
    return holes


def digests(extents, offset: int, length: int, block: int, read) -> tuple[list, int]:
    """Per-block digests of [offset, offset+length) (None for a block that is a
    hole) and the bytes read.  ``extents`` is what hole_blocks takes (a file
    descriptor or a callable); ``read(view, offset)`` fills a view.

    Reads at most CHUNK bytes at a time, whatever the block size, so memory per
    call is one CHUNK and a caller that holds a lock per read (the secondary's
    gate) holds it for one CHUNK, not for the whole range."""
    holes = hole_blocks(extents, offset, length, block)
    out: list = []
    buf = bytearray(min(block, CHUNK))
    read_bytes = 0
    for i, pos in enumerate(range(offset, offset + length, block)):
        if i in holes:
            out.append(None)
            continue
        end = min(pos + block, offset + length)
        h = hashlib.blake2b(digest_size=DIGEST_SIZE)
        for p in range(pos, end, CHUNK):
            view = memoryview(buf)[:min(CHUNK, end - p)]
            read(view, p)
            h.update(view)
            read_bytes += len(view)
        out.append(h.hexdigest())
    return out, read_bytes


def same(ours, theirs, length: int) -> bool:
    """Do two block digests (None: a hole) describe the same ``length`` bytes?"""
    return (ours or zero_digest(length)) == (theirs or zero_digest(length))
