"""`nbd-mc protect --libvirt DOMAIN` against a real libvirtd and its QEMU.

Two domains: an idle one (firmware with nothing to boot) whose guest the test
plays through HMP ``qemu-io -d QDEV`` passed through libvirt, and the real Linux
test guest booted by libvirt with direct kernel boot, writing records to ext4.

The oracle is the one of test_primary.py: the checkpoint hook runs while the VM is
stopped and the mirrors are drained, and copies the primary's disk images; after a
kill -9 of the domain's QEMU, `nbd-mc failover` must give exactly the copy of the
last epoch the secondary acknowledged.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from demo import guest
from nbd_mc.primary.libvirt import LibvirtQmp
from support.hook import RECORDING_HOOK
from support.libvirt import domain_xml
from support.protect_proc import finished, spawn_protect
from support.servers import (assert_bytes, describe, make_image, nbd_mc,
                             read_all, read_file, run, wait_until)

pytestmark = pytest.mark.qemu

MiB = 1 << 20
DEADLINE = 60.0  # safety net for waits, never a synchronisation



class Recorder:
    """The checkpoint hook's records of the primary's images, by epoch, and the
    lock a played guest takes around each request (so none runs in a checkpoint)."""

    def __init__(self, root: str, images: dict[str, str]):
        self.images = images
        self.lock = os.path.join(root, "guest.lock")
        self.paused = os.path.join(root, "paused")
        self.records = os.path.join(root, "records")
        os.makedirs(self.records, exist_ok=True)
        self.config = os.path.join(root, "hook.json")
        with open(self.config, "w") as f:
            json.dump({"lock": self.lock, "paused": self.paused, "records": self.records,
                       "images": images}, f)
        self.script = os.path.join(root, "hook.py")
        with open(self.script, "w") as f:
            f.write(RECORDING_HOOK)

    @property
    def hook(self) -> str:
        return f"{sys.executable} {self.script} {self.config}"

    def has(self, epoch: int) -> bool:
        """The hook recorded ``epoch`` (it did so under the guest lock, VM stopped)."""
        return os.path.isdir(os.path.join(self.records, str(epoch)))

    def record(self, epoch: int) -> dict[str, bytes]:
        d = os.path.join(self.records, str(epoch))
        return {disk: read_file(os.path.join(d, disk)) for disk in self.images}


class PlayedGuest:
    """Guest writes through HMP ``qemu-io -d QDEV`` (the disk's own BlockBackend, so
    the writes go through the mirror), never while a checkpoint holds the VM.

    QEMU 7.2 crashes or hangs when a block job's filter node is inserted or removed
    while an HMP qemu-io request is in flight (docs/known-issues.md): the request
    polls the main loop, and a job that ends there (a resync's backup round, a
    mirror cancelled by a detach or dropped after a lost secondary) changes the
    graph under it.  So the tests play only while protect is in step
    (``in_step``: after its (re)sync, whose jobs have all ended) and stop before
    anything that ends a job: SIGTERM, the last epoch of --epochs, killing the
    secondary (``dropped`` says when protect has removed its jobs again)."""

    def __init__(self, session: LibvirtQmp, sizes: dict[str, int], rec: Recorder,
                 rng: random.Random):
        self.s = session
        self.sizes = sizes
        self.rec = rec
        self.rng = rng
        self.qdev = {t: session.qdev(t) for t in sizes}
        self.ops = 0

    def running(self) -> bool:
        return bool(self.s.cmd("query-status")["running"])

    def op(self) -> None:
        rng = self.rng
        target = rng.choice(sorted(self.sizes))
        length = rng.choice([512, 4096, 65536, rng.randrange(1, 300) * 512])
        offset = rng.randrange(0, (self.sizes[target] - length) // 512 + 1) * 512
        kind = rng.choice(["write -P %d" % rng.randrange(1, 256), "write -z"])
        self.s.hmp(f'qemu-io -d {self.qdev[target]} "{kind} {offset} {length}"')
        self.ops += 1

    def play(self, until, ops: int | None = None) -> None:
        done = 0
        while (ops is None or done < ops) and not until():
            with open(self.rec.lock, "w") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                mark = read_file(self.rec.paused) if os.path.exists(self.rec.paused) else None
                if mark is None:
                    self.op()
                    done += 1
                    continue
            wait_until(lambda: until() or self.running(), "the VM to run again", DEADLINE)
            with open(self.rec.lock, "w") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                if os.path.exists(self.rec.paused) and read_file(self.rec.paused) == mark:
                    os.unlink(self.rec.paused)


def start_protect(root: str, procs: list, domain: str, server, drives, *args):
    drive_args = [a for d in drives for a in ("--drive", d)]
    return spawn_protect(procs, root, "--libvirt", domain, "--target", server.uri(),
                         "--control", server.control_path, *drive_args, *args)


def committed(server) -> int:
    return server.execute("query-status")["committed"]


def assert_detached(s: LibvirtQmp) -> None:
    """protect left the domain as it found it: running, no job, no node of ours."""
    assert s.cmd("query-status")["running"]
    assert s.cmd("query-block-jobs") == []
    nodes = [n["node-name"] for n in s.cmd("query-named-block-nodes")]
    assert all(n.startswith("libvirt-") for n in nodes), nodes


def metrics_file(path: str) -> dict:
    """protect's --metrics-file, parsed by prometheus_client (one vm label):
    {sample name: value}, and {(state set name, state): value}."""
    out = {}
    for fam in text_string_to_metric_families(read_file(path).decode()):
        for smp in fam.samples:
            state = smp.labels.get(smp.name)
            out[(smp.name, state) if state else smp.name] = smp.value
    return out


def protect_state(path: str) -> str | None:
    """The state protect's --metrics-file shows (None before it is written)."""
    if not os.path.exists(path):
        return None
    states = [k[1] for k, v in metrics_file(path).items()
              if isinstance(k, tuple) and k[0] == "nbd_mc_protect_state" and v == 1]
    return states[0] if states else None


def in_step(proc, mfile: str, what: str = "protect in step") -> None:
    """Wait until protect checkpoints (its (re)sync and every job of it ended)."""
    wait_until(lambda: proc.poll() is not None or protect_state(mfile) == "checkpointing",
               what, DEADLINE)
    assert proc.poll() is None, finished(proc)


def ours_gone(s: LibvirtQmp) -> bool:
    """No block job and no node of protect's in the domain."""
    return s.cmd("query-block-jobs") == [] and all(
        n["node-name"].startswith("libvirt-") for n in s.cmd("query-named-block-nodes"))


def replica_pair(servers, sizes: dict[str, int], rng: random.Random):
    """Primary images with random data and empty replicas; the secondary serving them."""
    images, replicas = {}, {}
    for target, size in sizes.items():
        images[target] = servers.path(f"primary-{target}.raw")
        make_image(images[target], size, rng, data_fraction=0.3)
        replicas[target] = servers.path(f"{target}.raw")
        with open(replicas[target], "wb") as f:
            f.truncate(size)
    server = servers.new(replicas)
    server.start()
    return images, server


def test_protect_idle_domain(servers, domains, procs):
    """Two disks of an idle domain: --epochs 6 with a played guest commits 6
    epochs and detaches (no job, no node left; the domain runs on); the committed
    view is exactly the hook's record.  Clear refusals for a missing domain, an
    unknown target, a shut-off domain and a second protect on the same domain;
    SIGTERM detaches a protect that runs without --epochs."""
    rng = random.Random("libvirt-idle")
    sizes = {"vda": 8 * MiB, "vdb": 4 * MiB}
    images, server = replica_pair(servers, sizes, rng)
    name = f"nbdmc-idle-{os.getpid()}"
    domains.create(domain_xml(name, images))
    s = LibvirtQmp(name, exclusive=False)
    try:
        blocks = s.cmd("query-block")
        assert {b["device"] for b in blocks} == {""}  # libvirt: -blockdev, no drive ids
        assert s.block_device("vda").startswith("libvirt-")
        rec = Recorder(servers.root, images)
        g = PlayedGuest(s, sizes, rec, rng)
        proc = start_protect(servers.root, procs, name, server, ["vda", "vdb"],
                             "--interval", "20ms", "--epochs", 6, "--checkpoint-hook", rec.hook)
        # the initial sync is a mirror (no job ends under a request); after the hook
        # recorded epoch 6 protect commits it and detaches: no request from then on
        g.play(lambda: proc.poll() is not None or rec.has(6))
        rc, out, err = finished(proc)
        assert rc == 0, (out, err)
        assert "committed epochs 1..6 (6 checkpoints, 0 skipped)" in out, out
        assert g.ops > 0
        assert_detached(s)
        for target, data in rec.record(6).items():
            h = server.connect(target + "@committed")
            assert_bytes(read_all(h), data, f"{target}@committed after --epochs 6")

        base = ["protect", "--target", server.uri(), "--control", server.control_path]
        for args, text in [
            (["--libvirt", "nbdmc-no-such-domain", "--drive", "vda", "--drive", "vdb"],
             "has no domain 'nbdmc-no-such-domain'"),
            (["--libvirt", name, "--drive", "vda", "--drive", "vdx=vdb"],
             f"libvirt domain {name} has no disk with target vdx (its disks: vda, vdb)"),
            (["--libvirt", name, "--qmp", "/nonexistent", "--drive", "vda"],
             "give --qmp PATH or --libvirt DOMAIN"),
        ]:
            r = nbd_mc(*base, *args)
            assert r.returncode in (1, 2) and text in r.stderr, describe(r)
        off = f"nbdmc-off-{os.getpid()}"
        domains.define(domain_xml(off, images))
        r = nbd_mc(*base, "--libvirt", off, "--drive", "vda", "--drive", "vdb")
        assert r.returncode == 1 and f"libvirt domain {off} is shut off" in r.stderr, describe(r)
        assert_detached(s)

        # protect again (already protected: a new full sync, undo until epoch 7 commits)
        mfile = servers.path("protect.prom")
        proc = start_protect(servers.root, procs, name, server, ["vda", "vdb"],
                             "--interval", "20ms", "--checkpoint-hook", rec.hook, "--json",
                             "--metrics-file", mfile)
        in_step(proc, mfile)  # no guest request while protect resyncs (PlayedGuest)
        g.play(lambda: committed(server) >= 9 or proc.poll() is not None)
        m = metrics_file(mfile)
        assert m[("nbd_mc_protect_state", "checkpointing")] == 1, m
        assert m[("nbd_mc_protect_state", "syncing")] == 0
        assert 7 <= m["nbd_mc_protect_committed_epoch"] <= committed(server)
        r = nbd_mc(*base, "--libvirt", name, "--drive", "vda", "--drive", "vdb")
        assert r.returncode == 1 and "another nbd-mc protect (pid" in r.stderr, describe(r)
        proc.send_signal(signal.SIGTERM)  # detach: the mirrors end, so no guest request
        rc, out, err = finished(proc)
        assert rc == 0, (out, err)
        report = json.loads(out)
        assert report["outcome"] == "detached" and report["first_epoch"] == 7
        assert report["committed"] == committed(server) >= 9
        m = metrics_file(mfile)  # as protect left it: the same figures as its report
        assert m[("nbd_mc_protect_state", "detached")] == 1
        assert m["nbd_mc_protect_committed_epoch"] == report["committed"]
        assert m["nbd_mc_protect_commits_total"] == report["commits"]
        assert m["nbd_mc_protect_pause_seconds_count"] == report["pause_ms"]["count"]
        assert m["nbd_mc_protect_max_pause_seconds"] * 1000 == \
            pytest.approx(report["pause_ms"]["worst"], abs=0.001)
        # a full sync, or an incremental one from the first run's dirty bitmaps
        assert m["nbd_mc_protect_initial_sync_bytes"] == report["initial_sync_bytes"] > 0
        assert m["nbd_mc_protect_mirrored_bytes"] >= report["initial_sync_bytes"]
        assert_detached(s)
        last = report["committed"]
        r = server.cli("failover", "--json")
        assert r.returncode == 0, describe(r)
        for target, data in rec.record(last).items():
            assert_bytes(read_file(server.image(target)), data, f"{target} after failover")
    finally:
        s.close()


def test_protect_libvirt_guest_kill9_failover(servers, domains, procs):
    """The real Linux guest booted by libvirt (direct kernel boot) writes fsync'd
    records to ext4 while protect checkpoints it; kill -9 of the domain's QEMU.
    protect says the primary is gone and which epoch the secondary holds; after
    failover the replica is byte for byte the primary's disk at that checkpoint,
    and a fresh guest finds a clean file system with contiguous records on it."""
    files = guest.build()
    disk = servers.path("guest.raw")
    guest.format_disk(disk, 64 * MiB)
    replica = servers.path("vda.raw")
    with open(replica, "wb") as f:
        f.truncate(64 * MiB)
    server = servers.new({"vda": replica})
    server.start()
    name = f"nbdmc-guest-{os.getpid()}"
    console = servers.path("console.log")
    domains.create(domain_xml(
        name, {"vda": disk}, kernel=str(files.kernel), initrd=str(files.initrd),
        cmdline="console=ttyS0 quiet panic=-1 mc.mode=work mc.every=1 mc.keep=0",
        serial=console))
    serial = guest.SerialLog(console)
    serial.wait_for(r"MC-WORK-START next=1 ", 120)
    serial.wait_seq(1, 60)
    rec = Recorder(servers.root, {"vda": disk})
    proc = start_protect(servers.root, procs, name, server, ["vda"], "--interval", "200ms",
                         "--checkpoint-hook", rec.hook)
    wait_until(lambda: committed(server) >= 5 or proc.poll() is not None, "5 commits",
               timeout=120)
    serial.poll()
    seq_protected = serial.last_seq  # durable on the primary in the open epoch (or before)
    c0 = committed(server)
    serial.wait_seq(seq_protected + 10, 60)  # the guest works on under protection
    wait_until(lambda: committed(server) > c0 or proc.poll() is not None, "a commit", 60)
    os.kill(domains.qemu_pid(name), signal.SIGKILL)
    rc, out, err = finished(proc)
    assert rc == 1, (out, err)
    last = committed(server)
    assert last >= 5
    assert "The primary QEMU is gone" in err and f"the secondary holds epoch {last}," in err, err
    r = server.cli("failover", "--json")
    assert r.returncode == 0, describe(r)
    out = json.loads(r.stdout)
    assert out["committed"] == last
    path = {d["name"]: d["path"] for d in out["disks"]}["vda"]
    expected = servers.path("expected.raw")
    shutil.copyfile(os.path.join(rec.records, str(last), "vda"), expected)
    assert_bytes(read_file(path), read_file(expected), f"vda at epoch {last}")
    r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", path, expected])
    assert r.returncode == 0, describe(r)
    check = guest.run_check(files, path, snapshot=True)
    assert check.ok and check.fsck == 0, check.log
    assert check.bad == 0 and check.gaps == 0 and check.minseq == 1
    assert check.maxseq >= seq_protected, (check.maxseq, seq_protected)
    print(f"\nlibvirt guest: {last} epochs committed, records 1..{check.maxseq} on the "
          f"replica (last MC-SEQ seen {serial.last_seq})")


def test_protect_libvirt_killed_and_secondary_killed(servers, domains, procs):
    """protect killed -9 (its watchdog too) with the domain paused as if mid-checkpoint:
    the next protect removes the job and node it left, resumes the domain and commits on.  Then the
    secondary's nbdkit is killed -9: protect exits 1, the domain runs on with nothing
    of ours left, and `nbd-mc recover` gives exactly the last acknowledged epoch."""
    rng = random.Random("libvirt-failures")
    sizes = {"vda": 8 * MiB}
    images, server = replica_pair(servers, sizes, rng)
    name = f"nbdmc-fail-{os.getpid()}"
    domains.create(domain_xml(name, images))
    s = LibvirtQmp(name, exclusive=False)
    try:
        rec = Recorder(servers.root, images)
        g = PlayedGuest(s, sizes, rec, rng)
        proc = start_protect(servers.root, procs, name, server, ["vda"], "--interval", "20ms",
                             "--checkpoint-hook", rec.hook)
        g.play(lambda: committed(server) >= 3 or proc.poll() is not None)
        # its watchdog dies with it (as in a kill of their cgroup): else the watchdog
        # would remove what protect left (docs/guest-harm.md) before the next protect
        watchdog = ["pgrep", "-f", f"nbd_mc.primary.watchdog.*{name}"]
        for pid in subprocess.run(watchdog, capture_output=True, text=True).stdout.split():
            os.kill(int(pid), signal.SIGKILL)
        proc.kill()
        proc.wait(30)
        wait_until(lambda: not subprocess.run(watchdog).returncode == 0,
                   "protect's watchdog to be gone", DEADLINE)
        s.cmd("stop")
        assert [j["device"] for j in s.cmd("query-block-jobs")] == ["nbd-mc-vda"]
        assert "nbd-mc-vda" in [n["node-name"] for n in s.cmd("query-named-block-nodes")]
        last = committed(server)
        r = nbd_mc("protect", "--libvirt", name, "--drive", "vda", "--target", server.uri(),
                   "--control", server.control_path, "--epochs", 2, "--interval", "10ms")
        assert r.returncode == 0, describe(r)
        assert "left by an earlier protect" in r.stdout and "resumed the VM" in r.stdout
        assert f"committed epochs {last + 1}..{last + 2}" in r.stdout, r.stdout
        assert_detached(s)
        assert_bytes(read_file(server.image("vda")), read_file(images["vda"]), "vda")

        # from the dirty bitmaps the earlier protects left: an incremental resync (backup
        # jobs), so the guest waits until protect is in step (PlayedGuest)
        mfile = servers.path("protect.prom")
        proc = start_protect(servers.root, procs, name, server, ["vda"], "--interval", "20ms",
                             "--checkpoint-hook", rec.hook, "--metrics-file", mfile)
        in_step(proc, mfile)
        g.play(lambda: committed(server) >= last + 5 or proc.poll() is not None)
        g.play(lambda: proc.poll() is not None, ops=rng.randrange(1, 8))
        server.kill9()
        # protect notices at its next checkpoint and drops its mirror and node (a job
        # that ends: no guest request until it is done)
        wait_until(lambda: proc.poll() is not None or protect_state(mfile) == "lost"
                   and ours_gone(s), "protect to drop the lost secondary", DEADLINE)
        assert proc.poll() is None, finished(proc)
        g.play(lambda: proc.poll() is not None, ops=5)  # the VM runs on, unprotected
        server.start()  # back at its last commit: protect resyncs and checkpoints again
        in_step(proc, mfile, "protect in step again")
        again = committed(server)
        g.play(lambda: committed(server) >= again + 3 or proc.poll() is not None)
        proc.send_signal(signal.SIGTERM)  # detach: no guest request from here
        rc, out, err = finished(proc)
        assert rc == 0, (out, err)
        assert "secondary lost" in out + err and "resyncing" in out, (out, err)
        assert_detached(s)
        acked = committed(server)
        r = server.cli("failover", "--json")
        assert r.returncode == 0, describe(r)
        assert_bytes(read_file(server.image("vda")), rec.record(acked)["vda"],
                     f"vda after a secondary outage, resync and failover (epoch {acked})")
    finally:
        s.close()


def test_verify_libvirt_qcow2_disk(servers, domains):
    """libvirt's norm, a qcow2 disk (vda; vdb raw): `nbd-mc verify --libvirt` reads it
    through QEMU's read-only NBD export made over libvirt's QMP passthrough, in a
    socket directory given to QEMU's user; a clean pass, then a sector of the
    replica corrupted behind the server's back is found exactly and repaired, and
    the domain is left with no export, no job, no node of ours."""
    rng = random.Random("libvirt-qcow2")
    sizes = {"vda": 6 * MiB, "vdb": 2 * MiB}
    images, server = replica_pair(servers, sizes, rng)
    qcow2 = servers.path("primary-vda.qcow2")
    assert run(["qemu-img", "convert", "-O", "qcow2", images["vda"], qcow2]).returncode == 0
    want = {"vda": read_file(images["vda"]), "vdb": read_file(images["vdb"])}
    images["vda"] = qcow2
    name = f"nbdmc-qcow2-{os.getpid()}"
    domains.create(domain_xml(name, images, formats={"vda": "qcow2"}))
    s = LibvirtQmp(name, exclusive=False)
    args = ["--libvirt", name, "--drive", "vda", "--drive", "vdb", "--target", server.uri(),
            "--control", server.control_path, "--interval", "20ms", "--verify-slice", "2M"]
    try:
        r = nbd_mc("verify", *args)
        assert r.returncode == 0, describe(r)
        assert "reading vda through QEMU's read-only NBD export" in r.stdout, describe(r)
        assert "MISMATCH" not in r.stdout, describe(r)
        for target, data in want.items():  # the idle guest wrote nothing: the images
            assert_bytes(read_file(server.image(target)), data, target)
        bad = 5 * MiB + 9 * 512
        fd = os.open(server.image("vda"), os.O_RDWR)
        try:
            os.pwrite(fd, bytes(b ^ 0x5A for b in os.pread(fd, 512, bad)), bad)
        finally:
            os.close(fd)
        r = nbd_mc("verify", *args, "--repair", "--json")
        assert r.returncode == 0, describe(r)
        rep = json.loads(r.stdout)["verify"]
        assert [(m["disk"], m["offset"], m["length"]) for m in rep["mismatches"]] == \
            [("vda", bad, 512)], rep
        assert [(m["disk"], m["offset"], m["length"]) for m in rep["repaired"]["ranges"]] == \
            [("vda", bad, 512)], rep
        assert_bytes(read_file(server.image("vda")), want["vda"], "vda after the repair")
        assert s.cmd("query-block-exports") == []
        assert_detached(s)
    finally:
        s.close()
