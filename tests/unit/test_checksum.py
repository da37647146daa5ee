"""The pieces of the checksum sync and the targeted repair that need no server:
block digests over a sparse file, the hole map, the repair queue's budget and
which verify mismatches count as repaired."""

from __future__ import annotations

import os

from nbd_mc import checksum, verify as hashes
from nbd_mc.secondary import checksum as checksum_cmd, verify as verify_cmd
from nbd_mc.primary import verify
from nbd_mc.cli.protect import _unrepaired
from nbd_mc.primary.repair import Repairs

K = 1 << 10


def test_digests_of_a_sparse_file_skip_holes(tmp_path):
    path = tmp_path / "img"
    size = 1 << 20
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(200 * K)
        f.write(b"x" * (10 * K))       # data inside block 3 (192..256 KiB)
        f.seek(size - 4 * K)
        f.write(b"y" * (4 * K))        # the last block
    data = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        reads = []

        def read(view, pos):
            reads.append((pos, len(view)))
            view[:] = data[pos:pos + len(view)]
        # a range that starts and ends off block boundaries: the last block is short
        blocks, read_bytes = checksum.digests(fd, 10 * K, size - 10 * K - 3 * K, 64 * K, read)
    finally:
        os.close(fd)
    want = [checksum.block_digest(data[p:min(p + 64 * K, size - 3 * K)])
            for p in range(10 * K, size - 3 * K, 64 * K)]
    assert len(blocks) == len(want)
    for i, (a, b) in enumerate(zip(blocks, want)):
        n = min(64 * K, size - 3 * K - (10 * K + i * 64 * K))
        assert checksum.same(a, b, n), i
    # only the blocks touching data were read; holes came back as None
    assert read_bytes == sum(n for _, n in reads) < size // 2
    assert blocks.count(None) >= len(blocks) - 4
    assert checksum.same(None, checksum.zero_digest(64 * K), 64 * K)
    assert not checksum.same(None, checksum.block_digest(b"x" * 64 * K), 64 * K)


def target(drive="d0", disk="vda"):
    return verify.Target(drive, disk, "/nonexistent", 64 << 20)


def test_repair_queue_splits_by_budget_and_ignores_repeats():
    r = Repairs(verify.Stats(), budget=1 << 20)
    r.queue(target(), verify.Mismatch("vda", 0, (2 << 20) + 512, 5))
    assert [(p.offset, p.length) for p in r.pending] == [(0, 1 << 20), (1 << 20, 1 << 20),
                                                          (2 << 20, 512)]
    r.queue(target(), verify.Mismatch("vda", 1 << 20, 4096, 6))  # inside a queued piece
    r.queue(target("d1", "vdb"), verify.Mismatch("vdb", 1 << 20, 4096, 6))  # another disk
    assert len(r.pending) == 4 and r.busy


def test_unrepaired_counts_only_ranges_no_repair_covered():
    v = {"mismatches": [{"disk": "vda", "offset": 0, "length": 8192, "epoch": 3},
                        {"disk": "vdb", "offset": 512, "length": 512, "epoch": 4}],
         "repaired": {"ranges": [{"disk": "vda", "offset": 4096, "length": 4096, "epoch": 5},
                                 {"disk": "vda", "offset": 0, "length": 4096, "epoch": 5}],
                      "bytes": 8192}}
    assert _unrepaired(v) == [v["mismatches"][1]]
    assert _unrepaired({"mismatches": v["mismatches"]}) == v["mismatches"]


def _range_group(tmp_path, size):
    """A real one-disk Group, committed once, its image full of data."""
    import random as _random
    from nbd_mc.secondary.engine import Group
    from support.servers import make_image
    data = make_image(str(tmp_path / "vda.raw"), size, _random.Random(7))
    g = Group(str(tmp_path / "st"), [("vda", str(tmp_path / "vda.raw"))])
    g.commit(1)
    return g, data


def _count_gate(g, seen):
    """Record how many bytes each hold of the gate covers (reads inside one hold)."""
    real_read, real_committed, real_io = g.read, g.disk("vda").read_committed, g.io
    held = []

    from contextlib import contextmanager

    @contextmanager
    def io():
        held.append(0)
        with real_io():
            yield
        seen.append(held.pop())

    def read(disk, view, offset):
        held[-1] += len(view)
        real_read(disk, view, offset)

    def read_committed(view, offset):
        held[-1] += len(view)
        real_committed(view, offset)

    g.io, g.read, g.disk("vda").read_committed = io, read, read_committed


def test_range_requests_of_the_largest_size_hold_the_gate_for_one_chunk_at_a_time(tmp_path):
    """Issue 23: a 64 MiB checksum-range held the gate for the whole range, so a
    commit (and every guest write behind it) waited ~0.4 s, and allocated a
    64 MiB block.  Now every hold covers at most CHUNK bytes, and so does the
    request's buffer; the digests are those of the whole blocks."""
    size = 8 << 20
    g, data = _range_group(tmp_path, size)
    try:
        seen = []
        _count_gate(g, seen)
        r = checksum_cmd.checksum_range(g, {"disk": "vda", "offset": 0, "length": size,
                                        "block": size})
        assert r["blocks"] == [checksum.block_digest(data)]
        assert seen and max(seen) <= checksum.CHUNK and sum(seen) == size
        seen.clear()
        r = verify_cmd.verify_range(g, {"disk": "vda", "offset": 0, "length": size, "epoch": 1,
                                    "block": 4 << 20})
        assert r["digest"] == hashes.digest(data)
        assert r["blocks"] == [hashes.block_digests(data[i:i + (4 << 20)], 4 << 20)[0]
                               for i in range(0, size, 4 << 20)]
        assert seen and max(seen) <= hashes.CHUNK and sum(seen) == size
    finally:
        g.close()
