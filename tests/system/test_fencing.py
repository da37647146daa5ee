"""Fencing and split brain: after `fence` or `failover`, nothing the old primary sends
changes the secondary.

Old connections keep writing (from threads, as fast as they can) while the fence
or failover happens; once it has returned, the images are snapshotted and must
never change again by the old primary: its writes, write-zeroes and trims fail,
its commit is refused (Fenced), and the state shows the new generation -- also
after a kill -9 and restart.
"""

from __future__ import annotations

import os
import random
import threading

import nbd
import pytest

from nbd_mc.control import ControlError
from support.reliability import record
from support.servers import GroupModel, make_image, read_all, read_file, wait_until


MiB = 1 << 20
C = 65536
DISKS = ("vda", "vdb")


class OldPrimary:
    """Writer threads on connections opened before the fence, never stopping."""

    def __init__(self, srv, per_disk: int = 2):
        self.stop = threading.Event()
        self.ok = 0
        self.refused = 0
        self.unexpected = []
        self.lock = threading.Lock()
        self.handles = [(d, srv.connect(d)) for d in DISKS for _ in range(per_disk)]
        self.threads = [threading.Thread(target=self._run, args=(i, d, h), daemon=True)
                        for i, (d, h) in enumerate(self.handles)]
        for t in self.threads:
            t.start()

    def _run(self, i, disk, h):
        rng = random.Random(i)
        while not self.stop.is_set():
            off = rng.randrange(0, 2 * MiB - C, 512)
            kind = rng.choice(("write", "write", "zero", "trim"))
            try:
                if kind == "write":
                    h.pwrite(bytes([0xA0 + i]) * rng.choice((512, 4096, C)), off)
                elif kind == "zero":
                    h.zero(C, off)
                else:
                    h.trim(C, off)
                with self.lock:
                    self.ok += 1
            except nbd.Error as e:
                with self.lock:
                    if e.errno in ("EPERM", "EROFS"):
                        self.refused += 1
                    else:
                        self.unexpected.append(f"{kind}: {e}")

    def refusals(self) -> int:
        with self.lock:
            return self.refused

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads)
        assert not self.unexpected, self.unexpected[:3]


def group(servers, seed=1):
    rng = random.Random(seed)
    images = {d: servers.path(f"{d}.raw") for d in DISKS}
    model = GroupModel({d: make_image(p, 2 * MiB, rng) for d, p in images.items()})
    srv = servers.new(images)
    srv.start()
    srv.execute("commit", epoch=1)
    model.commit(1)
    return srv, model


def images_of(srv):
    return {d: read_file(srv.image(d)) for d in DISKS}


def test_fence_stops_every_old_write(servers):
    srv, model = group(servers)
    old = OldPrimary(srv)
    wait_until(lambda: old.ok >= 50, "the old primary to be writing")
    r = srv.execute("fence")
    assert r["generation"] == 1
    frozen = images_of(srv)
    n = old.refusals()
    wait_until(lambda: old.refusals() >= n + 200, "200 more refused writes of the old primary")
    assert images_of(srv) == frozen, "a write of the old primary landed after the fence"
    # its commit is refused with the class Fenced; status shows the generation
    with pytest.raises(ControlError) as e:
        srv.execute("commit", epoch=2)
    assert e.value.error_class == "Fenced"
    st = srv.execute("query-status")
    assert st["fenced"] is True and st["generation"] == 1
    assert st["stats"]["refused_writes"] >= 200
    # a connection opened after the fence cannot write either (nobody can)
    h = srv.connect("vda")
    with pytest.raises(nbd.Error):
        h.pwrite(b"\1" * 512, 0)
    assert read_all(h) == frozen["vda"]  # reads still work
    # the fence survives kill -9 and restart
    old.finish()
    refused = old.refused
    srv.kill9()
    srv.start(with_disks=False)
    st = srv.execute("query-status")
    assert st["fenced"] is True and st["generation"] == 1
    with pytest.raises(nbd.Error):
        srv.connect("vdb").pwrite(b"\1" * 512, 0)
    with pytest.raises(ControlError) as e:
        srv.execute("commit", epoch=2)
    assert e.value.error_class == "Fenced"
    # (the restart rolled the open epoch back: the images are the committed epoch)
    assert images_of(srv) == model.committed
    record("fence: old-primary requests after the fence", refused + 3, 0)


def test_failover_old_primary_cannot_touch_the_new_one(servers):
    srv, model = group(servers, seed=2)
    old = OldPrimary(srv)
    wait_until(lambda: old.ok >= 50, "the old primary to be writing")
    r = srv.execute("failover")
    assert r["committed"] == 1 and [d["path"] for d in r["disks"]] == [srv.image(d) for d in DISKS]
    after = images_of(srv)
    assert after == model.committed, "failover must leave exactly the last commit"
    st = srv.execute("query-status")
    assert st["role"] == "primary" and st["generation"] == 1 and not st["fenced"]
    # the new primary connects through its writer exports (a plain name is read-only
    # after a failover) and writes; the old one keeps being refused
    exports = {d["name"]: d["export"] for d in r["disks"]}
    new = {d: srv.connect(exports[d]) for d in DISKS}
    n = old.refusals()
    expected = {d: bytearray(b) for d, b in after.items()}
    rng = random.Random(5)
    for i in range(64):
        d = DISKS[i % 2]
        off = rng.randrange(0, 2 * MiB - 4096, 512)
        data = rng.randbytes(4096)
        new[d].pwrite(data, off)
        expected[d][off:off + 4096] = data
    wait_until(lambda: old.refusals() >= n + 200, "200 more refused writes of the old primary")
    old.finish()
    assert images_of(srv) == {d: bytes(b) for d, b in expected.items()}, \
        "the old primary changed the new primary's disk"
    # the old primary's checkpoint commands are refused
    for name, args, cls in (("commit", {"epoch": 2}, "Fenced"), ("rollback", {}, "NotProtected")):
        with pytest.raises(ControlError) as e:
            srv.execute(name, **args)
        assert e.value.error_class == cls, e.value
    # failover again is idempotent and does not touch the new primary's data
    r = srv.execute("failover")
    assert r["committed"] == 1
    assert images_of(srv) == {d: bytes(b) for d, b in expected.items()}
    record("failover: old-primary requests after the failover", old.refused + 2, 0)


def test_fence_then_failover_by_the_operator(servers):
    """The usual sequence when the primary is only partitioned: fence at once, then
    fail over; the secondary returns to the last commit, whatever was in flight."""
    srv, model = group(servers, seed=3)
    old = OldPrimary(srv, per_disk=3)
    wait_until(lambda: old.ok >= 100, "the old primary to be writing")
    srv.execute("fence")
    r = srv.execute("failover")
    assert r["committed"] == 1
    n = old.refusals()
    wait_until(lambda: old.refusals() >= n + 100, "more refused writes of the old primary")
    old.finish()
    assert images_of(srv) == model.committed
    st = srv.execute("query-status")
    assert st["generation"] == 2 and st["role"] == "primary"
    assert os.path.exists(srv.overlay("vda"))
    record("fence + failover with writes in flight", 1, 0)


def test_a_stray_fence_after_a_failover_leaves_the_new_primary_its_disk(servers):
    """Issue 23 #1: on main, one `nbd-mc fence` after an in-place failover saved
    `fenced`, and from then on every write of the new primary through NAME@WRITER
    got EPERM -- open connections, reconnects, a failover retry, a restart.  Now
    the fence is refused with a sentence naming `fence-primary`, the operator's
    explicit verb, which `failover` again undoes."""
    import errno
    srv, model = group(servers, seed=4)
    r = srv.execute("failover")
    export = {d["name"]: d["export"] for d in r["disks"]}["vda"]
    new = srv.connect(export)
    new.pwrite(b"new primary 1", 0)
    stray = srv.cli("fence")
    assert stray.returncode == 1, stray
    assert "Fenced" in stray.stderr and "nbd-mc fence-primary" in stray.stderr, stray.stderr
    new.pwrite(b"new primary 2", 4096)                      # the open connection writes
    srv.connect(export).pwrite(b"new primary 3", 8192)      # and so does a reconnect
    srv.kill9()
    started = srv.start(with_disks=False)
    assert "initial sync" not in started.stdout and "promoted by a failover" in started.stdout, \
        started.stdout
    srv.connect(export).pwrite(b"new primary 4", 12288)     # and after a restart
    st = srv.execute("query-status")
    assert st["role"] == "primary" and not st["fenced"]
    # the explicit verb stops the new primary, with a clear message
    stop = srv.cli("fence-primary")
    assert stop.returncode == 0 and "new primary fenced" in stop.stdout, stop
    with pytest.raises(nbd.Error) as e:
        srv.connect(export).pwrite(b"refused", 0)
    assert e.value.errnum == errno.EPERM                     # EROFS travels as EPERM
    with open(os.path.join(srv.state_dir, "nbdkit.log")) as f:
        assert "[rule promoted-fenced: write]" in f.read()  # the log says which rule refused
    # failover again gives the disk back
    srv.execute("failover")
    srv.connect(export).pwrite(b"new primary 5", 16384)
    image = read_file(srv.image("vda"))
    for i in range(5):
        assert image[i * 4096:i * 4096 + 13] == f"new primary {i + 1}".encode()


def test_stop_of_a_secondary_a_primary_mirrors_into_says_what_the_primary_will_do(servers):
    srv, _ = group(servers, seed=5)
    quiet = srv.cli("stop")                 # no writer claimed it: nothing to warn about
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet
    srv.close_clients()                     # the test's own connection went with it
    srv.start(with_disks=False)
    srv.execute("claim")                    # what protect sends, then it commits
    srv.execute("commit", epoch=2)
    r = srv.cli("stop")
    assert r.returncode == 0, r
    assert "a primary is mirroring into this secondary" in r.stderr, r.stderr
    assert "keep the VM running UNPROTECTED" in r.stderr
