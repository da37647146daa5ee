"""Online verify, the secondary's side: the control command ``verify-range``.

Hashes a range of a disk's committed view at an epoch, refused with
``EpochMismatch`` unless that epoch is (still) the committed one, so the hash and
the primary's hash of its copy taken at that checkpoint describe the same state
(docs/verify.md; the hashes are nbd_mc/verify.py's).
"""

from __future__ import annotations

import hashlib
import time

from ..errors import EpochMismatch, NotProtected
from ..rangeargs import block_arg, disk_range, int_arg
from ..verify import BLOCK_DIGEST_SIZE, CHUNK, DIGEST_SIZE, MAX_LENGTH, SECTOR, block_digests


def verify_range(group, arguments: dict) -> dict:
    """Hash [offset, offset+length) of ``disk``'s committed view at ``epoch``.

    Runs while writes of the next epoch go on: the committed view is read the way
    ``NAME@committed`` is (overlay over image, safe against a racing preserve).
    """
    r = disk_range("verify-range", group, arguments, MAX_LENGTH)
    name, disk, offset, length = r.name, r.disk, r.offset, r.length
    epoch = int_arg("verify-range", arguments, "epoch")
    block = block_arg("verify-range", arguments, SECTOR, MAX_LENGTH, None)
    group.check_mode("verify-range")
    if not group.committed:
        raise NotProtected("verify-range refused: no epoch was committed yet")
    _same_epoch(group, epoch)
    t0 = time.perf_counter()
    whole = hashlib.blake2b(digest_size=DIGEST_SIZE)
    blocks: list[str] = []
    # In chunks, so a request costs CHUNK bytes of memory however long it is, and
    # holds the gate (read_committed enters it per call) for one chunk at a time.
    # A block larger than CHUNK is hashed across chunks; CHUNK is a multiple of
    # every allowed block up to it, so smaller ones fit whole.
    buf = bytearray(min(CHUNK, length))
    partial = None                  # the hash of a block larger than CHUNK, so far
    for pos in range(0, length, CHUNK):
        view = memoryview(buf)[:min(CHUNK, length - pos)]
        group.read_committed(disk, view, offset + pos)
        whole.update(view)
        if block and block <= CHUNK:
            blocks += block_digests(view, block)
        elif block:
            partial = partial or hashlib.blake2b(digest_size=BLOCK_DIGEST_SIZE)
            partial.update(view)
            if (pos + len(view)) % block == 0 or pos + len(view) == length:
                blocks.append(partial.hexdigest())
                partial = None
    _same_epoch(group, epoch)  # a commit during the read would mix two epochs
    out = {"disk": name, "offset": offset, "length": length, "epoch": epoch,
           "digest": whole.hexdigest()}
    if block:
        out["block"] = block
        out["blocks"] = blocks
    out["seconds"] = time.perf_counter() - t0
    return out


def _same_epoch(group, epoch: int) -> None:
    if group.committed != epoch:
        raise EpochMismatch(f"verify-range: epoch {epoch} is not the committed epoch "
                            f"({group.committed})")
