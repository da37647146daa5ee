"""An unambiguous commit: every reply to ``commit`` says whether the epoch is now
committed, and a client that retries after any error ends in a known state.

The faults are real: the power-loss file system (support.powerloss) fails the
next sync of a chosen file or directory with EIO, as a dying disk would, and a
power cut afterwards shows what the reply promised was really durable.
"""

from __future__ import annotations

import os
import random

import pytest

from nbd_mc.control import ControlClient, ControlError
from support.crash_driver import DISKS, DISK_SIZE
from support.power_driver import mount_tree, point_link_at
from support.servers import GroupModel, Server, make_image, nbd_mc, read_file, describe


def _write(srv, model, rng, n=6):
    for d in DISKS:
        h = srv.connect(d)
        for _ in range(n):
            off = rng.randrange(0, DISK_SIZE - 70000, 512)
            data = rng.randbytes(rng.choice((512, 4096, 65536)))
            h.pwrite(data, off)
            model.write(d, off, data)


def _cut_and_recover(fs, srv, link, dest) -> int:
    """Power fails now: recover what is durable; the committed epoch it finds."""
    srv.kill9()
    fs.cut(dest, "durable")
    point_link_at(link, dest)
    r = nbd_mc("recover", "--state-dir", srv.state_dir, "--json")
    assert r.returncode == 0, describe(r)
    return srv.state()["committed"]


def test_commit_errors_say_whether_the_epoch_is_committed(workdir):
    rng = random.Random(7)
    fs, link = mount_tree(workdir)
    srv = None
    try:
        images = {d: os.path.join(link, f"{d}.raw") for d in DISKS}
        model = GroupModel({d: make_image(images[d], DISK_SIZE, rng) for d in DISKS})
        fs.sync()
        srv = Server(workdir, images, state_dir=os.path.join(link, "st"), durability="power",
                     cluster_size=65536)
        srv.start()
        assert srv.execute("commit", epoch=1)["committed"] == 1
        model.commit(1)

        # A mismatch says where the group stands.
        with pytest.raises(ControlError) as e:
            srv.execute("commit", epoch=5)
        assert e.value.error_class == "EpochMismatch" and e.value.committed == 1

        # The image's sync fails before the state file is touched: not committed.
        _write(srv, model, rng)
        fs.fail_sync("a.raw")
        with pytest.raises(ControlError) as e:
            srv.execute("commit", epoch=2)
        assert e.value.error_class == "IOError" and e.value.committed == 1, e.value.reply
        # the CLI says it in words
        fs.fail_sync("a.raw")
        r = srv.cli("commit", "2")
        assert r.returncode == 1 and "epoch 2 is not committed" in r.stderr, describe(r)
        # the retry rule: the same commit again
        assert srv.execute("commit", epoch=2)["committed"] == 2
        model.commit(2)

        # The state directory's sync fails after the rename landed: committed,
        # durability unknown -- the reply says so, the group stops taking writes.
        _write(srv, model, rng)
        fs.fail_sync("st")
        with pytest.raises(ControlError) as e:
            srv.execute("commit", epoch=3)
        assert e.value.error_class == "IOError" and e.value.committed == 3, e.value.reply
        status = srv.execute("query-status")
        assert status["committed"] == 3 and status["broken"], status
        # the retry makes it durable and says so; a power cut now keeps epoch 3
        r = srv.execute("commit", epoch=3)
        assert r["committed"] == 3 and r["retry"] and r["broken"], r
        model.commit(3)
        assert _cut_and_recover(fs, srv, link, os.path.join(workdir, "cut1")) == 3
        for d in DISKS:
            assert read_file(srv.image(d)) == model.committed[d], f"{d} after the cut"
    finally:
        if srv is not None:
            srv.kill_all()
        fs.close()


def test_a_commit_whose_sync_failed_is_not_acknowledged_by_a_power_cut(workdir):
    """Without the retry, a power cut after the failed directory sync may keep
    either epoch; recovery lands on one of them, exactly."""
    rng = random.Random(8)
    fs, link = mount_tree(workdir)
    srv = None
    try:
        images = {d: os.path.join(link, f"{d}.raw") for d in DISKS}
        model = GroupModel({d: make_image(images[d], DISK_SIZE, rng) for d in DISKS})
        fs.sync()
        srv = Server(workdir, images, state_dir=os.path.join(link, "st"), durability="power",
                     cluster_size=4096)
        srv.start()
        srv.execute("commit", epoch=1)
        model.commit(1)
        _write(srv, model, rng)
        fs.fail_sync("st")
        with pytest.raises(ControlError) as e:
            srv.execute("commit", epoch=2)
        assert e.value.committed == 2
        got = _cut_and_recover(fs, srv, link, os.path.join(workdir, "cut1"))
        assert got == 1  # the rename was never made durable: the old state file
        for d in DISKS:
            assert read_file(srv.image(d)) == model.committed[d], f"{d} after the cut"
    finally:
        if srv is not None:
            srv.kill_all()
        fs.close()


def test_a_lost_reply_is_settled_by_the_greeting(servers):
    """The server dies in the middle of a commit (the reply is lost): the new
    connection's greeting shows a new instance and the epoch the state file
    holds -- before the state was written, N is not committed (and must not be
    retried: the open epoch's writes were rolled back); after, it is."""
    rng = random.Random(9)
    for point, expect in (("commit.before-state", 1), ("commit.after-state", 2)):
        sub = servers.path(point)
        os.makedirs(sub)
        path = os.path.join(sub, "v.raw")
        make_image(path, DISK_SIZE, rng)
        s = servers.new({"v": path}, state_dir=os.path.join(sub, "st"))
        s.start(crashpoint=f"{point}:2")
        first = ControlClient(s.control_path, timeout=60)
        instance = first.greeting["instance"]
        assert first.execute("commit", epoch=1)["committed"] == 1
        s.connect("v").pwrite(b"x" * 4096, 0)
        with pytest.raises(ConnectionError):  # the reply never comes
            first.execute("commit", epoch=2)
        first.close()
        s.wait_dead()
        s.start(with_disks=False)
        again = ControlClient(s.control_path, timeout=60)
        assert again.greeting["instance"] != instance
        assert again.greeting["committed"] == expect
        again.close()
        s.stop()
