"""Tests of the undo overlay (nbd_mc/qcow2/) with QEMU's own tools as the oracle.

Every state the overlay can be in is checked with ``qemu-img check`` (a valid qcow2
file: 0 = clean, 3 = leaked clusters only) and ``qemu-img compare -f qcow2 -F raw
OVERLAY MODEL.raw`` against a model of "the disk as of the last commit (drop)".
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from nbd_mc import qcow2
from nbd_mc.errors import CorruptOverlay
from nbd_mc.fileio import runs
from support.qcow2_helpers import (assert_check, assert_compare, assert_pattern, copy_pair,
                           header_fields, l2_entry_offset, punch_hole, qemu_check,
                           qemu_info, qemu_io, random_image, read_file,
                           read_u64, run, run_child, sha256, write_file, write_sparse,
                           write_u64)

KiB, MiB, TiB = 1 << 10, 1 << 20, 1 << 40
IMG, OV = "img.raw", "ov.qcow2"


# --- small helpers -----------------------------------------------------------------
class Pair:
    """An image file plus its overlay in one directory, with the committed model."""

    def __init__(self, directory, size, cluster_size, image: bytes, epoch=0, subclusters=False):
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.size = size
        self.C = cluster_size
        self.U = cluster_size // 32 if subclusters else cluster_size  # preserve unit
        self.k = cluster_size // self.U  # units per cluster
        self.img = os.path.join(self.dir, IMG)
        self.ov = os.path.join(self.dir, OV)
        self.model = os.path.join(self.dir, "model.raw")
        write_sparse(self.img, image)
        qcow2.create(self.ov, self.img, size, cluster_size, epoch=epoch, subclusters=subclusters)
        self.committed = bytes(image)
        self.fd = os.open(self.img, os.O_RDWR)

    @classmethod
    def attach(cls, directory, size, cluster_size, committed: bytes, unit=None):
        """A Pair object for files that already exist (a copy of another pair)."""
        p = cls.__new__(cls)
        p.dir, p.size, p.C = str(directory), size, cluster_size
        p.U = unit or cluster_size
        p.k = cluster_size // p.U
        p.img, p.ov = os.path.join(p.dir, IMG), os.path.join(p.dir, OV)
        p.model = os.path.join(p.dir, "model.raw")
        p.committed = bytes(committed)
        p.fd = os.open(p.img, os.O_RDWR)
        return p

    def open(self, **kw) -> qcow2.UndoOverlay:
        kw.setdefault("expected_size", self.size)
        kw.setdefault("expected_image", self.img)
        return qcow2.UndoOverlay(self.ov, self.fd, **kw)

    def image(self) -> bytes:
        return read_file(self.img)

    def overwrite(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)

    def compare_committed(self) -> None:
        write_file(self.model, self.committed)
        assert_compare(self.ov, self.model)

    def compare_image(self) -> None:
        assert_compare(self.ov, self.img)

    def close(self):
        os.close(self.fd)


def committed_view(ov: qcow2.UndoOverlay, offset=0, length=None) -> bytes:
    length = ov.size - offset if length is None else length
    buf = bytearray(length)
    ov.read_committed(memoryview(buf), offset)
    return bytes(buf)


def clusters_of(offset, length, C):
    return range(offset // C, (offset + length - 1) // C + 1)


def unpreserved_runs(ov, clusters):
    """(first, count) runs of clusters in ``clusters`` that are not preserved yet."""
    run_ = []
    for c in clusters:
        if not ov.is_preserved(c):
            if run_ and run_[-1][0] + run_[-1][1] == c:
                run_[-1][1] += 1
            else:
                run_.append([c, 1])
    return [tuple(r) for r in run_]


def preserve_clusters(ov, first, count):
    """Preserve guest clusters [first, first+count) whatever the preserve unit."""
    k = ov.cluster_size // ov.unit_size
    return ov.preserve(first * k, count * k)


def engine_write(ov, fd, offset, data):
    """What the engine does for a guest write: preserve first, then overwrite."""
    for first, count in unpreserved_runs(ov, clusters_of(offset, len(data), ov.unit_size)):
        ov.preserve(first, count)
    os.pwrite(fd, data, offset)


# --- 1. the stateful model test ----------------------------------------------------
class OverlayMachine(RuleBasedStateMachine):
    """Random preserve / overwrite / drop / apply / reopen against a model.

    Model: ``committed`` = the disk as of the last drop; ``image`` = the replica's
    bytes; ``preserved`` = units preserved in this epoch (clusters, or subclusters
    with extended L2 entries).  Overwrites of the image only happen inside preserved
    units (the engine's invariant).
    """

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="nbd-mc-qcow2-sm-")
        self.ov = None
        self.fd = -1

    @initialize(cluster_size=st.sampled_from([4096, 65536]), nclusters=st.integers(16, 64),
                tail=st.integers(0, 127), seed=st.integers(0, 2 ** 32 - 1),
                epoch=st.integers(0, 2 ** 40), subclusters=st.booleans())
    def setup(self, cluster_size, nclusters, tail, seed, epoch, subclusters):
        C = cluster_size
        subclusters = subclusters and C >= 16384
        self.C = C // 32 if subclusters else C  # the preserve unit the rules work in
        # the last cluster is partial unless tail == 0; sizes stay multiples of 512
        self.size = nclusters * C - (tail % (C // 512)) * 512
        self.n = -(-self.size // self.C)
        self.rng = random.Random(seed)
        data = random_image(self.rng, self.size, C)
        self.img = os.path.join(self.dir, IMG)
        self.ovp = os.path.join(self.dir, OV)
        self.model = os.path.join(self.dir, "model.raw")
        write_sparse(self.img, data)
        qcow2.create(self.ovp, self.img, self.size, C, epoch=epoch, subclusters=subclusters)
        self.fd = os.open(self.img, os.O_RDWR)
        self.committed = bytes(data)
        self.image = bytearray(data)
        self.preserved = set()
        self.epoch = epoch
        self._open()

    def _open(self):
        self.ov = qcow2.UndoOverlay(self.ovp, self.fd, expected_size=self.size,
                                    expected_image=self.img)

    def _end(self, c):
        return min((c + 1) * self.C, self.size)

    # rules
    @precondition(lambda self: len(self.preserved) < self.n)
    @rule(data=st.data())
    def preserve(self, data):
        free = [c for c in range(self.n) if c not in self.preserved]
        first = data.draw(st.sampled_from(free), label="first")
        longest = 1
        while first + longest < self.n and first + longest not in self.preserved:
            longest += 1
        count = data.draw(st.integers(1, longest), label="count")
        want_data = sum(
            1 for c in range(first, first + count)
            if any(self.image[c * self.C:self._end(c)]))
        assert self.ov.preserve(first, count) == want_data
        self.preserved.update(range(first, first + count))

    @precondition(lambda self: self.preserved)
    @rule(data=st.data(), kind=st.sampled_from(["data", "zeros", "hole"]))
    def overwrite(self, data, kind):
        c = data.draw(st.sampled_from(sorted(self.preserved)), label="cluster")
        last = c
        while last + 1 in self.preserved:
            last += 1
        lo, hi = c * self.C, self._end(last)
        off = data.draw(st.integers(lo, hi - 1), label="offset")
        length = data.draw(st.integers(1, hi - off), label="length")
        self._write_image(kind, off, length)

    def _write_image(self, kind, off, length):
        if kind == "data":
            new = self.rng.randbytes(length)
            os.pwrite(self.fd, new, off)
        elif kind == "zeros":
            new = bytes(length)
            os.pwrite(self.fd, new, off)
        else:
            new = bytes(length)
            punch_hole(self.fd, off, length)
        self.image[off:off + length] = new

    # (Hypothesis was seen to draw the first and the last rule by name most often;
    # the names put the engine-like write first and the end of an epoch last.)
    @rule(data=st.data(), kind=st.sampled_from(["data", "zeros", "hole"]))
    def guest_write(self, data, kind):
        """The engine's write, write-zeroes or trim: preserve what is not, then write."""
        off = data.draw(st.integers(0, self.size - 1), label="offset")
        length = data.draw(st.integers(1, min(self.size - off, 3 * self.C)), label="length")
        for first, count in unpreserved_runs(self.ov, clusters_of(off, length, self.C)):
            self.ov.preserve(first, count)
        self.preserved.update(clusters_of(off, length, self.C))
        self._write_image(kind, off, length)

    # One rule for both ends of an epoch (commit or rollback), named to sort last.
    @rule(rollback=st.booleans())
    def zz_end_epoch(self, rollback):
        if rollback:  # apply, then drop with the committed epoch unchanged
            assert self.ov.apply() == len(self.preserved)
            assert read_file(self.img) == self.committed
            self.ov.drop(self.epoch)
            self.image = bytearray(self.committed)
        else:  # commit: the image becomes the committed disk
            self.epoch += 1
            self.ov.drop(self.epoch)
            self.committed = bytes(self.image)
        self.preserved = set()

    @rule(readonly=st.booleans())
    def reopen(self, readonly):
        self.ov.close()
        if readonly:  # a second, read-only opener sees the same thing
            ro = qcow2.UndoOverlay(self.ovp, self.fd, readonly=True)
            try:
                assert committed_view(ro) == self.committed
                assert ro.preserved == len(self.preserved)
            finally:
                ro.close()
        self._open()

    @rule(data=st.data())
    def read_range(self, data):
        off = data.draw(st.integers(0, self.size - 1), label="offset")
        length = data.draw(st.integers(1, self.size - off), label="length")
        assert committed_view(self.ov, off, length) == self.committed[off:off + length]

    @invariant()
    def agrees_with_qemu_and_model(self):
        if self.ov is None:
            return
        assert_check(self.ovp, (0,))
        write_file(self.model, self.committed)
        assert_compare(self.ovp, self.model)
        assert committed_view(self.ov) == self.committed
        assert read_file(self.img) == self.image
        assert self.ov.preserved == len(self.preserved)
        assert [c for c in range(self.n) if self.ov.is_preserved(c)] == sorted(self.preserved)
        assert self.ov.epoch == self.epoch

    def teardown(self):
        if self.ov is not None:
            self.ov.close()
        if self.fd >= 0:
            os.close(self.fd)
        shutil.rmtree(self.dir, ignore_errors=True)


OverlayMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestOverlayStateful = OverlayMachine.TestCase


# --- 2. geometry: cluster sizes, odd virtual sizes -----------------------------------
@pytest.mark.parametrize("C,size,sub", [
    (4 * KiB, 37 * 4 * KiB - 512, False),          # last cluster 3.5 KiB
    (64 * KiB, 23 * 64 * KiB + 512 * 3, False),    # last cluster 1.5 KiB
    (64 * KiB, 23 * 64 * KiB + 512 * 3, True),     # last unit 1.5 KiB of 2 KiB
    (2 * MiB, 5 * 2 * MiB - 512 * 5, False),       # last cluster 2 MiB - 2.5 KiB
    (2 * MiB, 5 * 2 * MiB - 512 * 5, True),
])
def test_lifecycle_is_valid_qcow2(tmp_path, C, size, sub):
    rng = random.Random(C)
    p = Pair(tmp_path, size, C, random_image(rng, size, C), epoch=7, subclusters=sub)
    info = qemu_info(p.ov)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == size
    assert info["cluster-size"] == C
    assert info["format-specific"]["data"]["extended-l2"] == sub
    assert info["backing-filename"] == IMG  # relative: the pair can be moved
    assert info["backing-filename-format"] == "raw"
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert_check(p.ov)
    p.compare_committed()

    ov = p.open()
    assert (ov.epoch, ov.preserved, ov.undo_bytes) == (7, 0, 0)
    U = ov.unit_size
    n = -(-size // U)
    runs = [(0, 2), (n // 2, 1), (n - 1, 1)]  # includes the partial last unit
    for first, count in runs:
        ov.preserve(first, count)
    for first, count in runs:
        off = first * U
        end = min((first + count) * U, size)
        p.overwrite(off, rng.randbytes(end - off))
    assert_check(p.ov)
    p.compare_committed()
    assert committed_view(ov) == p.committed
    s = ov.summary()
    assert s["preserved_units"] == 4 and s["cluster_size"] == C and s["size"] == size
    assert s["subclusters"] == sub and s["unit_size"] == U
    ov.close()

    ov = p.open()
    assert ov.preserved == 4 and committed_view(ov) == p.committed
    ov.drop(8)
    assert (ov.epoch, ov.preserved, ov.undo_bytes) == (8, 0, 0)
    assert_check(p.ov)
    p.compare_image()
    ov.close()
    assert p.open().epoch == 8
    p.close()


@pytest.mark.parametrize("sub", [False, True], ids=["clusters", "subclusters"])
def test_apply_restores_everything_up_to_a_partial_last_unit(tmp_path, sub):
    """Every preserved unit comes back, also in a last cluster whose units do not
    fill a whole word of the bitmap (23 clusters + 1.5 KiB: 737 subclusters)."""
    C = 64 * KiB
    size = 23 * C + 512 * 3
    rng = random.Random(23)
    image = bytearray(rng.randbytes(size))
    image[size - 1024:] = bytes(1024)  # a tail that is partly zero
    p = Pair(tmp_path, size, C, bytes(image), subclusters=sub)
    ov = p.open()
    n = -(-size // p.U)
    for first, count in ((0, 3), (n // 2, 2), (n - 1, 1)):
        ov.preserve(first, count)
        p.overwrite(first * p.U, rng.randbytes(min(count * p.U, size - first * p.U)))
    p.compare_committed()
    assert ov.apply() == ov.preserved == 6
    assert p.image() == p.committed
    ov.close()
    p.close()


def test_preserve_more_clusters_than_iov_max(tmp_path):
    """One preserve of 1100 non-zero 4 KiB clusters (a 4.3 MiB guest write): more
    data buffers than one pwritev accepts (IOV_MAX = 1024)."""
    C = 4 * KiB
    size = 1200 * C
    rng = random.Random(3)
    p = Pair(tmp_path, size, C, rng.randbytes(size))
    ov = p.open()
    assert ov.preserve(50, 1100) == 1100
    p.overwrite(50 * C, rng.randbytes(1100 * C))
    assert_check(p.ov)
    p.compare_committed()
    assert committed_view(ov) == p.committed
    ov.close()
    p.close()


def test_create_rejects_bad_cluster_sizes(tmp_path):
    write_sparse(str(tmp_path / IMG), bytes(64 * KiB))
    for bad in (512, 3 * 4096, 4 * MiB):
        with pytest.raises(ValueError):
            qcow2.create(str(tmp_path / OV), str(tmp_path / IMG), 64 * KiB, bad)
    assert not os.path.exists(tmp_path / OV)


# --- 3. qemu-img commit == apply ------------------------------------------------------
def _dirty_pair(directory, C, nclusters, seed, subclusters=False):
    """A pair with undo data: random runs preserved, the image overwritten there with
    random data, zeros and holes (so preserved units are data and zero units)."""
    rng = random.Random(seed)
    size = nclusters * C - 1024
    p = Pair(directory, size, C, random_image(rng, size, C), subclusters=subclusters)
    ov = p.open()
    C = p.U  # below, "cluster" means the preserve unit
    nclusters = -(-size // C)
    c = 0
    while c < nclusters:
        count = rng.randint(1, 4)
        if rng.random() < 0.5:
            count = min(count, nclusters - c)
            ov.preserve(c, count)
            off, end = c * C, min((c + count) * C, size)
            kind = rng.randrange(3)
            if kind == 0:
                p.overwrite(off, rng.randbytes(end - off))
            elif kind == 1:
                p.overwrite(off, bytes(end - off))
            else:
                punch_hole(p.fd, off, end - off)
        c += count
    if not ov.is_preserved(nclusters - 1):
        ov.preserve(nclusters - 1, 1)
        p.overwrite((nclusters - 1) * C, b"\xff" * (size - (nclusters - 1) * C))
    c = 0
    while ov.preserved < 2:  # a few clusters only (2 MiB ones): preserve one more
        if not ov.is_preserved(c):
            ov.preserve(c, 1)
            p.overwrite(c * C, b"\x5a" * C)
        c += 1
    return p, ov


@pytest.mark.parametrize("C,n,sub", [(4 * KiB, 300, False), (64 * KiB, 40, False),
                                     (64 * KiB, 40, True), (2 * MiB, 5, False)])
def test_qemu_img_commit_equals_apply(tmp_path, C, n, sub):
    p, ov = _dirty_pair(tmp_path / "orig", C, n, seed=C, subclusters=sub)
    ov.close()
    assert p.image() != p.committed
    copy_pair(p.dir, str(tmp_path / "qemu"))
    copy_pair(p.dir, str(tmp_path / "ours"))
    a = Pair.attach(tmp_path / "qemu", p.size, C, p.committed, p.U)
    b = Pair.attach(tmp_path / "ours", p.size, C, p.committed, p.U)

    run("qemu-img", "commit", "-f", "qcow2", a.ov, check_rc=0)
    ovb = b.open()
    preserved = ovb.preserved
    assert ovb.apply() == preserved
    assert sha256(a.img) == sha256(b.img)  # byte-identical images
    assert a.image() == p.committed

    # QEMU emptied its overlay; ours is still consistent with it and usable
    assert_check(a.ov)
    a.compare_image()
    ova = a.open()
    assert ova.preserved == 0 and committed_view(ova) == p.committed
    engine_write(ova, a.fd, C // 2, b"\x42" * C)
    assert_check(a.ov)
    a.compare_committed()
    ova.close()

    # our rollback: drop keeps the epoch, the overlay is empty and shows the image
    ovb.drop(ovb.epoch)
    assert_check(b.ov)
    b.compare_image()
    b.compare_committed()
    ovb.close()
    for x in (p, a, b):
        x.close()


# --- 4. QEMU writes into the overlay ------------------------------------------------
@pytest.mark.parametrize("sub", [False, True], ids=["clusters", "subclusters"])
def test_qemu_writes_overlay_then_we_continue(tmp_path, sub):
    C = 64 * KiB
    size = 32 * C
    rng = random.Random(5)
    p = Pair(tmp_path, size, C, random_image(rng, size, C), subclusters=sub)
    ov = p.open()
    preserve_clusters(ov, 4, 3)
    preserve_clusters(ov, 20, 2)
    for first, count in ((4, 3), (20, 2)):
        p.overwrite(first * C, rng.randbytes(count * C))
    ov.close()

    # with subclusters QEMU allocates a host cluster for the part of cluster 8 it
    # writes (units 4-6); we must add our units to that cluster, not replace it
    r = qemu_io(p.ov, "write -P 0x55 0 128k", "write -P 0x66 520k 6k", readonly=False)
    assert r.returncode == 0 and "wrote 131072/131072" in r.stdout, r.stdout + r.stderr
    expected = bytearray(b"\x55" * (128 * KiB) + p.committed[128 * KiB:])
    expected[520 * KiB:526 * KiB] = b"\x66" * (6 * KiB)
    expected = bytes(expected)
    assert_check(p.ov)
    p.committed = expected
    p.compare_committed()

    ov = p.open()
    assert committed_view(ov) == expected
    k = p.k
    assert ov.is_preserved(0) and ov.is_preserved(1 * k) and ov.is_preserved(4 * k)
    assert ov.is_preserved(8 * k + 4 if sub else 8)
    engine_write(ov, p.fd, 8 * C, rng.randbytes(C))  # the rest of cluster 8
    # we allocate around QEMU's clusters: preserve more, overwrite, still consistent
    engine_write(ov, p.fd, 9 * C + 100, rng.randbytes(3 * C))
    engine_write(ov, p.fd, 30 * C, rng.randbytes(2 * C))
    assert_check(p.ov)
    p.compare_committed()
    assert committed_view(ov) == expected
    ov.close()

    # and QEMU reads what we wrote
    assert_pattern(p.ov, 0, 128 * KiB, 0x55)
    ov = p.open()
    ov.drop(1)
    assert_check(p.ov)
    p.compare_image()
    ov.close()
    p.close()


def test_qemu_write_zeroes_in_overlay_reads_as_zero(tmp_path):
    """QEMU's write-zeroes without unmap keeps the host cluster and sets the zero flag
    (ZERO_ALLOC); the cluster must read as zeros, for QEMU and for us."""
    C = 64 * KiB
    size = 16 * C
    p = Pair(tmp_path, size, C, b"\x11" * size)
    ov = p.open()
    ov.preserve(0, 4)
    ov.close()
    p.overwrite(0, b"\x22" * (4 * C))
    r = qemu_io(p.ov, "write -z 0 64k", "discard 128k 64k", readonly=False)
    assert r.returncode == 0, r.stdout + r.stderr
    expected = bytes(C) + b"\x11" * C + bytes(C) + b"\x11" * (size - 3 * C)
    assert_check(p.ov)
    assert_pattern(p.ov, 0, C, 0)
    p.committed = expected
    p.compare_committed()
    entry = read_u64(p.ov, l2_entry_offset(p.ov, 0))
    assert entry & qcow2.OFLAG_ZERO and entry & qcow2.OFFSET_MASK  # really ZERO_ALLOC

    ov = p.open()
    assert committed_view(ov) == expected
    assert committed_view(ov, 100, C) == expected[100:100 + C]
    # rollback through our apply == qemu-img commit
    copy_pair(p.dir, str(tmp_path / "qemu"))
    q = Pair.attach(tmp_path / "qemu", size, C, expected)
    run("qemu-img", "commit", "-f", "qcow2", q.ov, check_rc=0)
    ov.apply()
    assert p.image() == expected == q.image()
    ov.close()
    p.close()
    q.close()


def test_unallocated_l2_entry_with_flag_bits_reads_backing(tmp_path):
    """An L2 entry with no offset and no zero flag is unallocated for QEMU (reads from
    the backing file) even if the COPIED bit is set; it is not a preserved cluster."""
    C = 64 * KiB
    size = 16 * C
    p = Pair(tmp_path, size, C, b"\x11" * size)
    ov = p.open()
    ov.preserve(0, 2)
    ov.close()
    write_u64(p.ov, l2_entry_offset(p.ov, 5), qcow2.OFLAG_COPIED)
    p.overwrite(5 * C, b"\x33" * C)  # cluster 5 is not preserved: QEMU shows the image
    assert_check(p.ov)
    assert_pattern(p.ov, 5 * C, C, 0x33)
    ov = p.open()
    assert not ov.is_preserved(5)
    assert ov.preserved == 2
    assert committed_view(ov, 5 * C, C) == b"\x33" * C
    ov.close()
    p.close()


# --- 5. a 1 TiB sparse image ----------------------------------------------------------
@pytest.mark.parametrize("C,sub", [(4 * KiB, False), (64 * KiB, False), (64 * KiB, True),
                                   (2 * MiB, False)])
def test_one_tib_sparse(tmp_path, C, sub):
    T = 1 * TiB
    U = C // 32 if sub else C
    img, ovp = str(tmp_path / IMG), str(tmp_path / OV)
    with open(img, "wb") as f:
        f.truncate(T)
    fd = os.open(img, os.O_RDWR)
    spots = [0, 3 * C, T // 2 + 7 * C, T - 2 * C]  # far apart, spanning many L2 tables
    for off in spots:
        os.pwrite(fd, b"\xab" * (2 * C), off)
    qcow2.create(ovp, img, T, C, subclusters=sub)
    assert os.stat(ovp).st_blocks * 512 < 32 * MiB  # the metadata is sparse too

    base = run_child(ovp, img, [])
    res = run_child(ovp, img, [["preserve", off // U, 2 * C // U] for off in spots])
    assert res["summary"]["preserved_clusters"] == 8
    assert res["summary"]["undo_bytes"] == 8 * C
    for off in spots:
        os.pwrite(fd, b"\xee" * (2 * C), off)
    assert_check(ovp)
    for off in spots:
        assert_pattern(ovp, off, 2 * C, 0xab)
    assert_pattern(ovp, T // 4, 1 * MiB, 0)
    ov = qcow2.UndoOverlay(ovp, fd, expected_size=T, expected_image=img, readonly=True)
    for off in spots:
        assert committed_view(ov, off, 2 * C) == b"\xab" * (2 * C)
        if off >= 512 and off != 3 * C:
            assert committed_view(ov, off - 512, 512) == bytes(512)
        if off + 2 * C < T:
            assert committed_view(ov, off + 2 * C, 512) == bytes(512)
    assert committed_view(ov, T // 3, 1 * MiB) == bytes(1 * MiB)
    ov.close()

    dropped = run_child(ovp, img, [["drop", 1]])
    assert dropped["summary"]["preserved_clusters"] == 0
    assert_check(ovp)
    for off in spots:
        assert_pattern(ovp, off, 2 * C, 0xee)
    # memory stays small: no per-cluster state for the 1 TiB (an in-memory L2 table
    # per 2 MiB / 512 MiB / 512 GiB of virtual size would be 2 GiB / 128 MiB / 4 MiB)
    print(f"1 TiB, cluster {C}: child maxrss KiB open={base['maxrss_kib']} "
          f"preserve={res['maxrss_kib']} drop={dropped['maxrss_kib']}")
    for r in (base, res, dropped):
        assert r["maxrss_kib"] < 64 * 1024, r
    os.close(fd)


# --- 6. kill -9 in the middle of preserve / drop / apply ----------------------------
class Scenario:
    """A pair in a template directory, an operation for the child, and expectations."""

    def __init__(self, name, C, nclusters, seed, setup, op, full_data=False, sub=False):
        self.name, self.C, self.n, self.seed = name, C, nclusters, seed
        self.setup, self.op, self.full_data, self.sub = setup, op, full_data, sub

    def build(self, directory):
        rng = random.Random(self.seed)
        size = self.n * self.C - 512
        data = rng.randbytes(size) if self.full_data else random_image(rng, size, self.C)
        p = Pair(directory, size, self.C, data, subclusters=self.sub)
        ov = p.open()
        self.setup(p, ov, rng)
        ov.close()
        p.close()
        return p


def _setup_none(p, ov, rng):
    pass


def _setup_table0(p, ov, rng):
    ov.preserve(100, 50)
    p.overwrite(100 * p.C, rng.randbytes(50 * p.C))


def _setup_fill_refblock(p, ov, rng):
    # about 2030 data clusters + metadata: the next preserve needs a 2nd refcount block
    ov.preserve(0, 2030)
    p.overwrite(0, rng.randbytes(2030 * p.C))
    assert len(ov.refblocks) == 1 and ov.preserved == 2030


def _setup_reuse_after_drop(p, ov, rng):
    for first, count in ((2, 3), (9, 1), (14, 6)):
        preserve_clusters(ov, first, count)
        p.overwrite(first * p.C, rng.randbytes(count * p.C))
    ov.drop(1)
    p.committed = p.image()


def _setup_units_in_two_clusters(p, ov, rng):
    # clusters 2 and 3 get a host cluster each, with some subclusters preserved
    for first, count in ((64, 5), (110, 3)):
        ov.preserve(first, count)
        p.overwrite(first * p.U, rng.randbytes(count * p.U))


PRESERVE_SCENARIOS = [
    Scenario("fresh-64k", 64 * KiB, 32, 1, _setup_none, (3, 12)),
    Scenario("second-l2-table-4k", 4 * KiB, 1200, 2, _setup_table0, (500, 40)),
    Scenario("new-refcount-block-4k", 4 * KiB, 2600, 3, _setup_fill_refblock, (2030, 40),
             full_data=True),
    Scenario("reuse-after-drop-64k", 64 * KiB, 32, 4, _setup_reuse_after_drop, (1, 12)),
    Scenario("subclusters-fresh-64k", 64 * KiB, 32, 1, _setup_none, (3 * 32 + 5, 40), sub=True),
    Scenario("subclusters-into-allocated-clusters-64k", 64 * KiB, 32, 5,
             _setup_units_in_two_clusters, (74, 30), sub=True),
    Scenario("subclusters-reuse-after-drop-64k", 64 * KiB, 32, 4, _setup_reuse_after_drop,
             (40, 70), sub=True),
]

@pytest.mark.parametrize("sc", PRESERVE_SCENARIOS, ids=lambda s: s.name)
def test_kill9_during_preserve(tmp_path, sc):
    """After kill -9 before any write of a preserve, the image is not overwritten yet,
    so the overlay must still show exactly the committed disk; the file must pass
    qemu-img check (0, or 3 = leaks only), reopen, accept the remaining preserves of
    the interrupted run, and be clean again (check 0) after the next drop."""
    t = sc.build(tmp_path / "template")
    first, count = sc.op
    ops = [["preserve", first, count]]
    dry = tmp_path / "dry"
    copy_pair(t.dir, str(dry))
    total = run_child(str(dry / OV), str(dry / IMG), ops)["writes"]
    assert total >= 4
    print(f"kill points preserve/{sc.name}: {total}")
    results = []
    for n in range(total + 1):
        d = tmp_path / f"kill{n}"
        copy_pair(t.dir, str(d))
        p = Pair.attach(d, t.size, t.C, t.committed, t.U)
        res = run_child(p.ov, p.img, ops, kill_before=n)
        assert res["killed"] == (n < total), (n, res)
        results.append(assert_check(p.ov, (0, 3)))
        p.compare_committed()
        assert p.image() == read_file(t.img)

        ov = p.open()
        assert committed_view(ov) == p.committed
        done = [c for c in range(first, first + count) if ov.is_preserved(c)]
        if n == total:
            assert len(done) == count
        # finish like the engine would: preserve what is missing, then overwrite
        rng = random.Random(n)
        new = rng.randbytes(count * t.U)
        engine_write(ov, p.fd, first * t.U, new)
        assert all(ov.is_preserved(c) for c in range(first, first + count))
        assert_check(p.ov, (0, 3))
        p.compare_committed()
        assert committed_view(ov) == p.committed
        ov.close()

        ov = p.open()
        assert committed_view(ov) == p.committed
        ov.drop(5)
        assert ov.preserved == 0
        assert_check(p.ov, (0,))  # the drop cleaned every leak
        p.compare_image()
        ov.close()
        p.close()
        shutil.rmtree(d)
    assert results[-1] == 0  # an uninterrupted preserve leaks nothing


def _setup_drop_64k(p, ov, rng):
    for first, count in ((0, 3), (7, 2), (12, 9), (31, 1)):
        preserve_clusters(ov, first, count)
        end = min((first + count) * p.C, p.size)
        p.overwrite(first * p.C, rng.randbytes(end - first * p.C))
    if p.U < p.C:  # and parts of clusters
        for first, count in ((4 * 32 + 3, 2), (5 * 32 + 30, 5)):
            ov.preserve(first, count)
            p.overwrite(first * p.U, rng.randbytes(count * p.U))


def _setup_drop_4k_many(p, ov, rng):
    # L2 tables 0, 2, 4, 6 (four separate L1 writes) and > 2048 host clusters
    # (two refcount blocks to rewrite)
    for first in (0, 1024, 2048, 3072):
        ov.preserve(first, 512)
        p.overwrite(first * p.C, rng.randbytes(512 * p.C))
    assert len(ov.refblocks) == 2


DROP_SCENARIOS = [
    Scenario("64k", 64 * KiB, 32, 11, _setup_drop_64k, None),
    Scenario("64k-subclusters", 64 * KiB, 32, 11, _setup_drop_64k, None, sub=True),
    Scenario("4k-four-tables-two-refblocks", 4 * KiB, 3600, 12, _setup_drop_4k_many, None,
             full_data=True),
]


@pytest.mark.parametrize("sc", DROP_SCENARIOS, ids=lambda s: s.name)
def test_kill9_during_drop(tmp_path, sc):
    """What a crash in drop may leave, and what we assert:

    * the file passes qemu-img check with exit 0 or 3 (leaks only) and reopens;
    * the epoch record still holds the old epoch (it is written last) unless the drop
      completed;
    * every cluster reads either as the old committed data or as the image (the undo
      of some L2 tables may already be gone, the rest intact) -- never anything else,
      and QEMU reads exactly what our read_committed reads; the engine recognises the
      old epoch on restart and drops again, so a mix is never served as committed;
    * the retried drop completes: no undo, epoch recorded, check exit 0 (leaks
      cleaned), the overlay shows the image; preserve/overwrite work again afterwards.
    """
    t = sc.build(tmp_path / "template")
    old_epoch, new_epoch = 0, 1
    ops = [["drop", new_epoch]]
    dry = tmp_path / "dry"
    copy_pair(t.dir, str(dry))
    total = run_child(str(dry / OV), str(dry / IMG), ops)["writes"]
    assert total >= 3
    print(f"kill points drop/{sc.name}: {total}")
    image = read_file(t.img)
    C = t.C
    mixed = 0
    for n in range(total + 1):
        d = tmp_path / f"kill{n}"
        copy_pair(t.dir, str(d))
        p = Pair.attach(d, t.size, C, t.committed, t.U)
        res = run_child(p.ov, p.img, ops, kill_before=n)
        assert res["killed"] == (n < total), (n, res)
        assert_check(p.ov, (0, 3))

        ov = p.open()
        view = committed_view(ov)
        assert ov.epoch == (new_epoch if n == total else old_epoch)
        for c in range(0, t.size, C):
            assert view[c:c + C] in (t.committed[c:c + C], image[c:c + C]), (n, c // C)
        if view not in (t.committed, image):
            mixed += 1
        write_file(p.model, view)
        assert_compare(p.ov, p.model)  # QEMU agrees with our read of the partial state
        if n == total:
            assert view == image and ov.preserved == 0

        ov.drop(new_epoch)
        assert ov.preserved == 0 and ov.epoch == new_epoch
        assert_check(p.ov, (0,))
        p.compare_image()
        ov.close()
        ov = p.open()
        assert ov.epoch == new_epoch and ov.preserved == 0
        p.committed = image
        engine_write(ov, p.fd, 5 * C + 7, b"\x99" * (3 * C))
        assert_check(p.ov, (0,))
        p.compare_committed()
        ov.close()
        p.close()
        shutil.rmtree(d)
    print(f"drop/{sc.name}: {mixed} kill points left a mix of old undo and image")


@pytest.mark.parametrize("sub", [False, True], ids=["clusters", "subclusters"])
def test_kill9_during_apply(tmp_path, sub):
    """apply only writes the image: after a kill at any point the overlay is
    unchanged, and a repeated apply restores the committed disk exactly."""
    # (6 clusters with subclusters: as many apply runs, hence kill points, as 24 whole)
    p0, ov0 = _dirty_pair(tmp_path / "template", 64 * KiB, 6 if sub else 24, seed=21,
                          subclusters=sub)
    ov0.close()
    ops = [["apply"]]
    dry = tmp_path / "dry"
    copy_pair(p0.dir, str(dry))
    total = run_child(str(dry / OV), str(dry / IMG), ops)["writes"]
    assert total >= 3
    print(f"kill points apply/64k: {total}")
    ov_hash = sha256(p0.ov)
    for n in range(total + 1):
        d = tmp_path / f"kill{n}"
        copy_pair(p0.dir, str(d))
        p = Pair.attach(d, p0.size, p0.C, p0.committed, p0.U)
        res = run_child(p.ov, p.img, ops, kill_before=n)
        assert res["killed"] == (n < total)
        assert sha256(p.ov) == ov_hash
        assert_check(p.ov)
        p.compare_committed()
        ov = p.open()
        ov.apply()
        assert p.image() == p.committed
        ov.drop(ov.epoch)
        assert_check(p.ov)
        p.compare_image()
        ov.close()
        p.close()
        shutil.rmtree(d)
    p0.close()


# --- 7. refusals --------------------------------------------------------------------
def _refusal_pair(tmp_path):
    C = 64 * KiB
    size = 32 * C
    rng = random.Random(99)
    p = Pair(tmp_path, size, C, rng.randbytes(size))
    ov = p.open()
    ov.preserve(2, 4)
    ov.preserve(10, 1)
    p.overwrite(2 * C, rng.randbytes(4 * C))
    hosts = {c: ov.entry(c) & qcow2.OFFSET_MASK for c in (2, 3, 10)}
    ov.close()
    return p, hosts


def _truncate(n):
    def f(p, hosts):
        os.truncate(p.ov, n(p, hosts) if callable(n) else n)
    return f


def _set_l2(cluster, value):
    def f(p, hosts):
        write_u64(p.ov, l2_entry_offset(p.ov, cluster), value(p, hosts))
    return f


def _set_header(offset, data):
    def f(p, hosts):
        fd = os.open(p.ov, os.O_WRONLY)
        os.pwrite(fd, data, offset)
        os.close(fd)
    return f


def _set_l1(value):
    def f(p, hosts):
        write_u64(p.ov, header_fields(p.ov)["l1_offset"], value(p, hosts))
    return f


def _set_rt(index, value):
    def f(p, hosts):
        write_u64(p.ov, header_fields(p.ov)["rt_offset"] + 8 * index, value(p, hosts))
    return f


def _free_cluster_entry(p, hosts):
    free = os.stat(p.ov).st_size  # the file is extended by a cluster with refcount 0
    os.truncate(p.ov, free + 64 * KiB)
    write_u64(p.ov, l2_entry_offset(p.ov, 3), free | COPIED)


COPIED = qcow2.OFLAG_COPIED
REFUSALS = [
    # (id, corrupt, open kwargs, message pattern, qemu-img check must fail too)
    ("empty-file", _truncate(0), {}, r"truncated header", True),
    ("truncated-header", _truncate(50), {}, r"truncated header", True),
    ("truncated-to-one-cluster", _truncate(64 * KiB), {}, r"truncated", True),
    ("truncated-data", _truncate(lambda p, h: h[10]), {}, r"truncated.*past end of file", True),
    ("wrong-magic", _set_header(0, b"QFI\xfa"), {}, r"bad magic", True),
    ("version-2", _set_header(4, b"\0\0\0\2"), {}, r"version 2", False),
    ("dirty-bit", _set_header(72 + 7, b"\x01"), {}, r"dirty", False),
    ("corrupt-bit", _set_header(72 + 7, b"\x02"), {}, r"corrupt", False),
    ("size-mismatch", lambda p, h: None, {"expected_size": 31 * 64 * KiB},
     r"size .* does not match", False),
    ("backing-mismatch", lambda p, h: None, {"expected_image": "/nonexistent/other.raw"},
     r"backing file is 'img.raw'", False),
    ("l2-past-eof", _set_l2(3, lambda p, h: (os.stat(p.ov).st_size + (1 << 30)) | COPIED), {},
     r"cluster 3 .*past end of file", True),
    ("l2-at-refcount-table", _set_l2(3, lambda p, h: header_fields(p.ov)["rt_offset"] | COPIED),
     {}, r"cluster 3 .*overlaps other metadata", True),
    ("l2-at-l1-table", _set_l2(2, lambda p, h: header_fields(p.ov)["l1_offset"] | COPIED),
     {}, r"cluster 2 .*overlaps other metadata", True),
    ("l2-twice-same-data", _set_l2(3, lambda p, h: h[2] | COPIED), {},
     r"cluster 3 .*overlaps other metadata or data", True),
    ("l2-at-free-cluster", _free_cluster_entry, {}, r"cluster 3 .*refcount 0, expected 1", True),
    ("l2-unaligned", _set_l2(3, lambda p, h: (h[3] + 512) | COPIED), {},
     r"cluster 3 .*not cluster aligned", True),
    ("l2-compressed", _set_l2(3, lambda p, h: h[3] | qcow2.OFLAG_COMPRESSED), {},
     r"compressed", False),
    ("l1-at-refcount-table", _set_l1(lambda p, h: header_fields(p.ov)["rt_offset"] | COPIED),
     {}, r"L2 table 0 .*overlaps other metadata", True),
    ("l1-past-eof", _set_l1(lambda p, h: (1 << 40) | COPIED), {},
     r"L2 table 0 .*past end of file", True),
    ("refcount-block-at-l1", _set_rt(0, lambda p, h: header_fields(p.ov)["l1_offset"]), {},
     r"refcount block 0 .*overlaps", True),
    ("refcount-block-at-header", _set_rt(1, lambda p, h: 0x200), {},
     r"refcount table entry 1 is invalid", True),
]


@pytest.mark.parametrize("name,corrupt,kwargs,pattern,qemu_fails", REFUSALS,
                         ids=[r[0] for r in REFUSALS])
@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_refuses_invalid_overlay(tmp_path, name, corrupt, kwargs, pattern, qemu_fails,
                                 readonly):
    p, hosts = _refusal_pair(tmp_path)
    corrupt(p, hosts)
    if qemu_fails:  # the damage is real damage for QEMU too
        assert qemu_check(p.ov).returncode not in (0, 3)
    before = sha256(p.ov)
    kw = {"expected_size": p.size, "expected_image": p.img}
    kw.update(kwargs)
    with pytest.raises(CorruptOverlay, match=pattern) as e:
        qcow2.UndoOverlay(p.ov, p.fd, readonly=readonly, **kw)
    assert sha256(p.ov) == before  # refusing changes nothing
    p.close()


def test_refuses_refcount_block_on_metadata_of_empty_overlay(tmp_path):
    """A refcount table entry pointing at the L1 table of an overlay with no undo
    yet: nothing references a data cluster, so no refcount lookup catches it; opening
    must still refuse, or the next preserve writes refcounts into the L1 table."""
    C = 64 * KiB
    p = Pair(tmp_path, 16 * C, C, b"\x11" * (16 * C))
    h = header_fields(p.ov)
    write_u64(p.ov, h["rt_offset"], h["l1_offset"])
    assert qemu_check(p.ov).returncode == 2
    before = sha256(p.ov)
    for readonly in (False, True):
        with pytest.raises(CorruptOverlay, match=r"refcount block 0 .*overlaps"):
            p.open(readonly=readonly)
    assert sha256(p.ov) == before
    p.close()


def test_refuses_missing_file_and_raw_file(tmp_path):
    p, _ = _refusal_pair(tmp_path)
    with pytest.raises(CorruptOverlay, match="cannot open overlay"):
        qcow2.UndoOverlay(str(tmp_path / "missing.qcow2"), p.fd)
    with pytest.raises(CorruptOverlay, match="bad magic"):
        qcow2.UndoOverlay(p.img, p.fd)  # the raw image itself is not an overlay
    # an overlay made by qemu-img has no epoch record: not ours to write
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", IMG,
        str(tmp_path / "foreign.qcow2"), check_rc=0)
    with pytest.raises(CorruptOverlay, match="no epoch record"):
        qcow2.UndoOverlay(str(tmp_path / "foreign.qcow2"), p.fd, expected_image=p.img)
    ro = qcow2.UndoOverlay(str(tmp_path / "foreign.qcow2"), p.fd, expected_image=p.img,
                           readonly=True)
    assert ro.epoch is None and committed_view(ro, 0, 4096) == p.committed[:4096]
    ro.close()
    p.close()


# --- 8. extended L2 entries: damage only the subcluster format can have ----------------
def _ext_refusal_pair(tmp_path):
    C = 64 * KiB
    size = 16 * C
    rng = random.Random(98)
    image = bytearray(rng.randbytes(size))
    image[6 * C:7 * C] = bytes(C)
    p = Pair(tmp_path, size, C, bytes(image), subclusters=True)
    ov = p.open()
    assert ov.preserve(2 * 32 + 3, 4) == 4  # data: a host cluster for cluster 2
    assert ov.preserve(6 * 32, 2) == 0      # zeros: cluster 6 has no host cluster
    ov.close()
    p.overwrite((2 * 32 + 3) * p.U, rng.randbytes(4 * p.U))
    return p


def _set_word(cluster, word, change):
    def f(p):
        off = l2_entry_offset(p.ov, cluster) + 8 * word
        write_u64(p.ov, off, change(read_u64(p.ov, off)))
    return f


EXT_REFUSALS = [
    ("allocated-without-host", _set_word(6, 1, lambda v: v | (1 << 5)),
     r"allocated subclusters without a host cluster", True),
    ("allocated-and-zero", _set_word(2, 1, lambda v: v | (1 << (32 + 3))),
     r"both allocated and zero", True),
    ("zero-flag-with-extended-l2", _set_word(2, 0, lambda v: v | qcow2.OFLAG_ZERO),
     r"cluster 2 is invalid", False),
]


@pytest.mark.parametrize("name,corrupt,pattern,qemu_fails", EXT_REFUSALS,
                         ids=[r[0] for r in EXT_REFUSALS])
@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_refuses_invalid_extended_entries(tmp_path, name, corrupt, pattern, qemu_fails,
                                          readonly):
    p = _ext_refusal_pair(tmp_path)
    assert_check(p.ov)
    p.compare_committed()
    corrupt(p)
    if qemu_fails:
        assert qemu_check(p.ov).returncode not in (0, 3)
    before = sha256(p.ov)
    with pytest.raises(CorruptOverlay, match=pattern):
        p.open(readonly=readonly)
    assert sha256(p.ov) == before
    p.close()


def test_subclusters_need_16k_clusters(tmp_path):
    write_sparse(str(tmp_path / IMG), bytes(64 * KiB))
    with pytest.raises(ValueError, match="at least 16384"):
        qcow2.create(str(tmp_path / OV), str(tmp_path / IMG), 64 * KiB, 8 * KiB, subclusters=True)
    assert not os.path.exists(tmp_path / OV)


# --- 9. undo space is given back ------------------------------------------------------
def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("sub", [False, True], ids=["clusters", "subclusters"])
def test_drop_returns_space_of_a_big_epoch(tmp_path, sub, monkeypatch):
    """After one big epoch, the overlay does not stay that big: once KEEP_EPOCHS
    small epochs followed, the clusters only the big one used are given back
    (punched and cut off), the file stays valid qcow2 (check 0, compare) and usable.
    A kill -9 in the middle of giving space back loses nothing either."""
    from nbd_mc.qcow2.space import KEEP_EPOCHS
    C = 64 * KiB
    size = 256 * C
    rng = random.Random(17)
    p = Pair(tmp_path, size, C, rng.randbytes(size), subclusters=sub)
    ov = p.open()
    empty = _allocated(p.ov)
    engine_write(ov, p.fd, 0, rng.randbytes(200 * C))
    assert _allocated(p.ov) >= empty + 200 * C
    ov.drop(1)
    p.committed = p.image()
    assert _allocated(p.ov) >= empty + 200 * C  # the next epoch may need it again
    for e in range(2, 2 + KEEP_EPOCHS):
        engine_write(ov, p.fd, rng.randrange(size - 3 * C), rng.randbytes(3 * C))
        assert_check(p.ov)
        p.compare_committed()
        if e == 1 + KEEP_EPOCHS:  # the last small epoch: crash while giving back
            ov.close()
            monkeypatch.setenv("NBD_MC_CRASHPOINT", "drop.return-space")
            assert run_child(p.ov, p.img, [["drop", e]], kill_before=1 << 30)["killed"]
            monkeypatch.delenv("NBD_MC_CRASHPOINT")
            assert_check(p.ov)  # the drop itself completed: clean, nothing leaked
            ov = p.open()
            assert ov.epoch == e and ov.preserved == 0
        ov.drop(e)
        p.committed = p.image()
        p.compare_committed()
    assert _allocated(p.ov) <= empty + 16 * C, (_allocated(p.ov), empty)
    assert os.stat(p.ov).st_size <= 16 * C
    assert_check(p.ov)
    p.compare_image()
    engine_write(ov, p.fd, 5 * C + 7, rng.randbytes(100 * C))  # and it grows again
    assert_check(p.ov)
    p.compare_committed()
    ov.close()
    p.close()


# --- 10. the undo granularity of a group ------------------------------------------------
def test_group_subclusters_default_and_fixed_at_creation(tmp_path):
    """In-process engine: subclusters by default where the cluster size allows (64K),
    whole clusters below 16K; the choice is fixed when the group is created, and
    `serve --subclusters on` with small clusters is refused before anything exists."""
    from nbd_mc.secondary.engine import Group
    from nbd_mc.errors import StateError
    img = str(tmp_path / IMG)
    write_sparse(img, bytes(1 * MiB))
    g = Group(str(tmp_path / "st64"), [("d", img)])
    assert g.disk("d").overlay.subclusters and g.disk("d").bits == 11
    assert g.status()["disks"][0]["unit_size"] == 2 * KiB
    g.close()
    with pytest.raises(StateError, match="created with --subclusters on"):
        Group(str(tmp_path / "st64"), subclusters=False)
    Group(str(tmp_path / "st64"), subclusters=True).close()  # the same choice is fine
    g = Group(str(tmp_path / "st4k"), [("d", img)], cluster_size=4 * KiB)
    assert not g.disk("d").overlay.subclusters and g.disk("d").bits == 12
    g.close()
    g = Group(str(tmp_path / "stoff"), [("d", img)], subclusters=False)
    assert not g.disk("d").overlay.subclusters and g.disk("d").bits == 16
    g.close()
    r = run("nbd-mc", "serve", img, "--state-dir", str(tmp_path / "bad"), "--cluster-size", "4K",
            "--subclusters", "on")
    assert r.returncode == 1 and "needs a cluster size of at least 16K" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "bad")


# --- 9. the hot path's range questions and the reused old-data buffer ------------------
@pytest.mark.parametrize("subclusters", [True, False])
def test_range_queries_and_reused_buffer(tmp_path, subclusters):
    """``all_preserved``/``not_preserved`` (whole bitmap bytes at once) agree with
    ``is_preserved`` unit by unit over random ranges, and preserves of different
    sizes in a row (one reused buffer, a big one then small ones, a zero unit after
    data) keep exactly the old data: qemu-img compare against the committed model,
    qemu-img check clean."""
    C = 64 * KiB
    size = 48 * C - 3 * 512  # a last unit past the end of the disk
    rng = random.Random(2201)
    image = bytearray(rng.randbytes(size))
    image[5 * C:6 * C] = bytes(C)  # an all-zero cluster (written zeros)
    p = Pair(tmp_path, size, C, bytes(image), subclusters=subclusters)
    ov = p.open()
    units = -(-size // p.U)
    for first, count in [(0, 40), (2 * p.k + 3, 1), (5 * p.k, 2 * p.k),
                         (units - 7, 7), (20 * p.k + 1, 3)]:
        for a, n in runs(ov.not_preserved(first, first + count - 1)):
            ov.preserve(a, n)
        new = rng.randbytes(count * p.U)[:size - first * p.U]
        p.overwrite(first * p.U, new)
    for _ in range(2000):
        a = rng.randrange(units)
        b = rng.randrange(a, min(units, a + rng.choice([1, 2, 9, 40, 300])))
        want = [u for u in range(a, b + 1) if not ov.is_preserved(u)]
        assert ov.not_preserved(a, b) == want
        assert ov.all_preserved(a, b) == (not want)
    assert committed_view(ov) == p.committed
    ov.close()
    p.compare_committed()
    assert_check(p.ov)
