"""Online verify, what both sides share: the hashes and their sizes.

Silent divergence (both sides believe they hold the same data, they do not) is the
failure a replication system cannot see by itself; DRBD answers it with online
verify, and so do we, while protection runs.  The primary walks its drives one
slice per checkpoint (primary/verify.py) and asks the secondary for the hash of the
same range of its committed view (``verify-range``, secondary/verify.py); both
compute the hashes defined here, so they are comparable by construction:

* a slice's hash is BLAKE2b-256 (hashlib) of its bytes;
* a differing slice is narrowed down in the same round: the secondary returns one
  short hash per sector (``block``) and the primary merges the differing sectors
  into ranges.

Standard library only: nbdkit's plugin imports it.
"""

from __future__ import annotations

import hashlib

DIGEST_SIZE = 32          # the slice hash: BLAKE2b-256
BLOCK_DIGEST_SIZE = 8     # per-sector hashes only localise a difference already found
SECTOR = 512
#: A verify-range reads this much at most (it holds the bytes in memory once).
MAX_LENGTH = 64 << 20
DEFAULT_SLICE = 4 << 20
#: verify-range reads and hashes this much at a time (its memory per request).
CHUNK = 1 << 20


def digest(data) -> str:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).hexdigest()


def block_digests(data, block: int) -> list[str]:
    view = memoryview(data)
    return [hashlib.blake2b(view[i:i + block], digest_size=BLOCK_DIGEST_SIZE).hexdigest()
            for i in range(0, len(view), block)]


def differing_ranges(ours: list[str], theirs: list[str], offset: int, block: int,
                     length: int) -> list[tuple[int, int]]:
    """Merge the blocks whose hashes differ into (offset, length) ranges."""
    out: list[list[int]] = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            continue
        start = offset + i * block
        n = min(block, offset + length - start)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1][1] += n
        else:
            out.append([start, n])
    if len(ours) != len(theirs):  # cannot happen with our server; be explicit if it does
        out.append([offset, length])
    return [(a, n) for a, n in out]
