"""Faults the server must survive without ever overwriting an unprotected cluster:

* the overlay's file system fills up (a real 2 MiB tmpfs under the state
  directory): the write that cannot be protected fails with ENOSPC, the image
  keeps the old data, commit and rollback still work, and writes work again as
  soon as space returns (or a commit frees the overlay's clusters for reuse);
* the image returns EIO while its old data is being preserved, and the overlay
  returns EIO while undo data is written or dropped (a FUSE file backed by
  nbdkit's error filter, see tests/support/faulty.py);

in both durability modes.  Corrupt and foreign files are in test_corrupt.py.
"""

from __future__ import annotations

import os
import random

import nbd
import pytest

from support.faulty import FaultyFile, Tmpfs
from nbd_mc.control import ControlError
from support.reliability import record
from support.servers import (GroupModel, assert_bytes, assert_check, assert_compare, make_image,
                             read_all, read_file, write_file)


C = 65536
MiB = 1 << 20


@pytest.fixture
def mounts(servers):
    """Mount points made by the test; unmounted after every server is stopped."""
    made = []
    yield made
    servers.teardown()
    for m in reversed(made):
        m.stop() if isinstance(m, FaultyFile) else m.umount()


def errno_of(fn) -> str | None:
    """The errno name (libnbd reports e.g. "ENOSPC") of the NBD error fn raised."""
    try:
        fn()
    except nbd.Error as e:
        return e.errno
    return None


def fill(h, model: GroupModel, disk: str, first: int, rng, limit: int = 256) -> int:
    """Write whole new clusters from ``first`` on until one fails; that one must fail
    with ENOSPC and leave the image untouched.  Returns the failing cluster."""
    for c in range(first, first + limit):
        data = rng.randbytes(C)
        try:
            h.pwrite(data, c * C)
        except nbd.Error as e:
            assert e.errno == "ENOSPC", f"cluster {c}: {e}"
            return c
        model.write(disk, c * C, data)
    pytest.fail(f"no ENOSPC after {limit} clusters")


@pytest.mark.parametrize("durability", ["process", "power"])
def test_full_overlay_filesystem(servers, workdir, mounts, durability):
    rng = random.Random(7)
    fs = Tmpfs(servers.path("fs"), "2m")
    mounts.append(fs)
    img = servers.path("v.raw")
    model = GroupModel({"v": make_image(img, 16 * MiB, rng, data_fraction=1.0)})
    srv = servers.new({"v": img}, state_dir=os.path.join(fs.path, "st"), durability=durability)
    srv.start()
    srv.execute("commit", epoch=1)
    model.commit(1)
    h = srv.connect("v")
    cases = 0

    # something else takes half the space; then the overlay fills the rest
    filler = os.path.join(fs.path, "filler")
    write_file(filler, b"\1" * (fs.free() // 2))
    full_at = fill(h, model, "v", 0, rng)
    assert full_at > 0
    image = read_file(img)
    assert_bytes(image, model.live["v"], "image after ENOSPC (the refused cluster must be old)")
    # write-zeroes and trim of unprotected clusters are refused the same way
    assert errno_of(lambda: h.zero(C, (full_at + 1) * C)) == "ENOSPC"
    assert errno_of(lambda: h.trim(C, (full_at + 2) * C)) == "ENOSPC"
    assert errno_of(lambda: h.pwrite(b"x" * 512, full_at * C + 512)) == "ENOSPC"
    assert read_file(img) == image, "a refused request changed the image"
    cases += 4
    # a cluster already preserved needs no space: writing it again works
    h.pwrite(b"\2" * C, 0)
    model.write("v", 0, b"\2" * C)
    assert_bytes(read_all(srv.connect("v@committed")), model.committed["v"], "v@committed when full")
    assert srv.execute("query-status")["broken"] is None

    # space returns: the refused write now succeeds, and the next ones too
    os.unlink(filler)
    full_again = fill(h, model, "v", full_at, rng)
    assert full_again > full_at
    cases += 1

    # the file system is full; rollback needs no space
    r = srv.execute("rollback")
    assert r["restored_clusters"] >= full_again
    model.rollback()
    assert_bytes(read_file(img), model.live["v"], "image after rollback on a full file system")
    # the overlay's clusters are free for reuse: fill again, then commit while full
    again = fill(h, model, "v", 0, rng)
    assert again >= full_at
    r = srv.execute("commit", epoch=2)
    assert r["committed"] == 2
    model.commit(2)
    # after the commit the same clusters are reused: writing works again, full or not
    fill(h, model, "v", 100, rng)
    srv.execute("rollback")
    model.rollback()
    assert_bytes(read_all(h), model.committed["v"], "v after the last rollback")
    srv.execute("fence")  # fence persists state: also on a full file system
    cases += 3
    srv.stop()
    assert_check(srv.overlay("v"), allowed=(0,))
    assert_compare(srv.overlay("v"), img)
    assert_bytes(read_file(img), model.committed["v"], "image after stop")
    record(f"full disk (tmpfs), {durability}", cases, 0)


@pytest.mark.parametrize("durability", ["process", "power"])
def test_image_read_error_while_preserving(servers, workdir, mounts, durability):
    """The image returns EIO when the old data is read for preserving: the write
    fails with EIO and nothing reaches the image; commit and rollback still work."""
    rng = random.Random(11)
    backing = servers.path("backing.raw")
    model = GroupModel({"v": make_image(backing, 4 * MiB, rng, data_fraction=1.0)})
    ff = FaultyFile(workdir, "v.raw", backing, "pread")
    mounts.append(ff)
    srv = servers.new({"v": ff.path}, durability=durability)
    srv.start()
    srv.execute("commit", epoch=1)
    model.commit(1)
    h = srv.connect("v")
    h.pwrite(b"\3" * C, 0)  # preserved while reads work
    model.write("v", 0, b"\3" * C)

    ff.fail(True)
    for c in (21, 37, 53):  # never read before, far apart: not in the page cache
        assert errno_of(lambda: h.pwrite(rng.randbytes(C), c * C)) == "EIO"
    assert errno_of(lambda: h.zero(C, 45 * C)) == "EIO"
    assert srv.execute("query-status")["stats"]["errors"] == 4  # the four failed requests
    h.pwrite(b"\4" * C, 0)  # already preserved: no read of the image needed
    model.write("v", 0, b"\4" * C)
    assert srv.execute("query-status")["broken"] is None
    srv.execute("rollback")  # writes the image, reads only the overlay
    model.rollback()
    h.pwrite(b"\5" * C, 0)
    model.write("v", 0, b"\5" * C)
    srv.execute("commit", epoch=2)
    model.commit(2)
    ff.fail(False)

    assert_bytes(read_file(backing), model.live["v"], "image after the read errors")
    h.pwrite(b"\6" * C, 21 * C)  # the refused write works once the image reads again
    model.write("v", 21 * C, b"\6" * C)
    srv.execute("rollback")
    model.rollback()
    assert_bytes(read_all(h), model.committed["v"], "v after rollback")
    srv.stop()
    assert_bytes(read_file(backing), model.committed["v"], "image after stop")
    assert_check(srv.overlay("v"), allowed=(0,))
    record(f"image read error while preserving, {durability}", 5, 0)


def test_overlay_write_error(servers, workdir, mounts):
    """The overlay returns EIO: a preserve fails (the write is refused with EIO,
    the image untouched); a commit whose drop fails is persisted, the group then
    refuses writes and commits until restart, and a rollback drops the stale undo
    data instead of applying it (applying it would return the disk to the epoch
    before the last commit).  A restart recovers exactly the committed epoch."""
    rng = random.Random(13)
    img = servers.path("v.raw")
    model = GroupModel({"v": make_image(img, 4 * MiB, rng, data_fraction=1.0)})
    srv = servers.new({"v": img})
    srv.start()
    srv.stop()
    # move the overlay onto a file whose writes can be made to fail
    backing = servers.path("overlay-backing")
    write_file(backing, read_file(srv.overlay("v")).ljust(16 * MiB, b"\0"))
    ff = FaultyFile(workdir, "v.undo.qcow2", backing, "pwrite")
    mounts.append(ff)
    os.unlink(srv.overlay("v"))
    os.symlink(ff.path, srv.overlay("v"))
    srv.start(with_disks=False)
    srv.execute("commit", epoch=1)
    model.commit(1)
    h = srv.connect("v")
    for c in (1, 2, 3):
        data = rng.randbytes(C)
        h.pwrite(data, c * C)
        model.write("v", c * C, data)

    ff.fail(True)
    image = read_file(img)
    assert errno_of(lambda: h.pwrite(rng.randbytes(C), 7 * C)) == "EIO"
    assert read_file(img) == image, "a write whose preserve failed reached the image"
    with pytest.raises(ControlError) as e:
        srv.execute("commit", epoch=2)
    assert e.value.error_class == "IOError"
    assert srv.state()["committed"] == 2, "the commit is persisted before the drop"
    model.commit(2)
    st = srv.execute("query-status")
    assert st["committed"] == 2 and st["broken"]
    assert errno_of(lambda: h.pwrite(b"x" * 512, 0)) == "EIO"  # broken: no writes
    with pytest.raises(ControlError) as e:
        srv.execute("commit", epoch=3)
    assert e.value.error_class == "IOError" and "restart" in e.value.desc
    with pytest.raises(ControlError):
        srv.execute("rollback")  # its drop fails too, but it must not apply stale undo
    assert_bytes(read_file(img), model.committed["v"], "image after the failed rollback")
    ff.fail(False)
    srv.execute("rollback")
    assert_bytes(read_file(img), model.committed["v"], "image after rollback (stale undo dropped)")
    srv.kill9()
    srv.start(with_disks=False)
    st = srv.execute("query-status")
    assert st["committed"] == 2 and not st["broken"]
    assert_bytes(read_all(srv.connect("v")), model.committed["v"], "v after restart")
    srv.stop()
    assert_check(srv.overlay("v"), allowed=(0,))
    record("overlay write error (preserve, drop)", 5, 0)
