"""The primary side with a real QEMU and the real secondary: protect, crash, fail over.

QEMU runs with ``-machine none`` (no guest OS).  The test plays the guest with HMP
``qemu-io`` on each drive's BlockBackend: write -P, aio_write, write -z, write -z -u
and discard of varied sizes and alignments.  HMP qemu-io writes even while the VM is
stopped, so the test never writes between ``stop`` and ``cont``: either it drives
each checkpoint itself with primary.py's functions, or (for the real `nbd-mc protect`
process) it writes only under a lock that the checkpoint hook takes.

The oracle: at every checkpoint, while the VM is stopped and the mirrors drained,
the primary's raw images are recorded.  After a crash (kill -9 of QEMU or nbdkit,
or a stale primary), the secondary's disks must equal the record of the last epoch
that the secondary acknowledged -- byte for byte, and by `qemu-img compare`.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import random
import signal
import subprocess
import sys

import pytest

from nbd_mc import primary
from nbd_mc.control import ControlClient
from nbd_mc.tls import TlsFiles
from support.hook import RECORDING_HOOK
from support.protect_proc import finished, spawn_protect
from support.qemu_vm import QemuVM
from support.servers import (REPO, Server, assert_bytes, describe, make_image, nbd_mc,
                             read_all, read_file, run, wait_until)

pytestmark = pytest.mark.qemu

QEMU = "qemu-system-x86_64"
MiB = 1 << 20
SIZES = {"drive0": 8 * MiB, "drive1": 4 * MiB}
EXPORTS = {"drive0": "vda", "drive1": "vdb"}
DEADLINE = 60.0  # safety net for waits, never a synchronisation


# --- the primary: QEMU without a guest ------------------------------------------------------
class PrimaryVM(QemuVM):
    """qemu-system-x86_64 -machine none with raw drives; one QMP socket for protect
    (``qmp_path``) and one for the test (``qmp``, a primary.Qmp)."""

    def __init__(self, root: str, images: dict[str, str], name: str = "primary",
                 drive_args: dict[str, str] | None = None):
        self.root = root
        super().__init__(root, images, name, drive_args, qmp_timeout=30)

    def running(self) -> bool:
        return self.qmp.cmd("query-status")["running"]

    def record(self) -> dict[str, bytes]:
        """The primary's disks now (call only with the VM stopped and drained)."""
        return {d: read_file(p) for d, p in self.images.items()}

    def jobs(self) -> list:
        return self.qmp.cmd("query-block-jobs")

    def nbd_nodes(self) -> list:
        return [n["node-name"] for n in self.qmp.cmd("query-named-block-nodes")
                if n.get("drv") == "nbd"]

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.qmp.close()

    def quit(self) -> None:
        """A clean QEMU exit (qcow2 metadata written out)."""
        try:
            self.qmp.cmd("quit")
        except primary.PrimaryGone:  # QEMU closes the monitor as it quits
            pass
        self.proc.wait(30)
        self.qmp.close()

    def close(self) -> None:
        self.qmp.close()
        died = self.proc.poll()
        if died is None:
            self.proc.kill()
        elif died not in (0, -signal.SIGKILL):  # QEMU crashed: show why
            sys.stderr.write(f"QEMU died (status {died}):\n"
                             + read_file(self.log).decode(errors="replace")[-3000:])
        self.proc.wait(30)


@pytest.fixture
def vms():
    made = []
    yield lambda *a, **kw: made.append(PrimaryVM(*a, **kw)) or made[-1]
    for vm in made:
        vm.close()


# --- the guest, played through HMP qemu-io ---------------------------------------------------
class Guest:
    """Random guest I/O of varied kinds, sizes and alignments on every drive."""

    KINDS = ("write", "aio_write", "zero", "zero_unmap", "discard")
    WEIGHTS = (5, 3, 1, 1, 1)

    def __init__(self, qmp: primary.Qmp, sizes: dict[str, int], rng: random.Random,
                 aio: bool = True):
        self.qmp = qmp
        self.sizes = sizes
        self.rng = rng
        # HMP qemu-io's aio_write crashes QEMU 7.2 (heap corruption) when a backup
        # job's filter is inserted or removed while the request is in flight, as
        # resyncs do: where protect may resync, the test guest writes synchronously.
        self.weights = self.WEIGHTS if aio else tuple(
            0 if k == "aio_write" else w for k, w in zip(self.KINDS, self.WEIGHTS))
        self.counts = collections.Counter()
        self.bytes = 0
        self.log: list[tuple[str, int, int]] = []  # (drive, offset, length) of every request
        #: requests op() sends before random ones: (kind, drive, offset, length)
        self.queued: list[tuple[str, str, int, int]] = []

    def _extent(self, size: int) -> tuple[int, int]:
        rng = self.rng
        length = rng.choice([512, 4096, 65536, 65536 + 512, rng.randrange(1, 200_000),
                             rng.randrange(1, 1 << 20)])
        length = min(length, size)
        offset = rng.randrange(0, size - length + 1)
        if rng.random() < 0.6:  # mostly what a real guest sends: sector aligned
            offset &= ~511
            length = max(512, length & ~511)
        return offset, length

    def op(self, complete: bool = False) -> None:
        """One guest request; ``complete`` waits for an aio_write to finish too."""
        rng = self.rng
        if self.queued:
            kind, drive, offset, length = self.queued.pop(0)
        else:
            drive = rng.choice(sorted(self.sizes))
            offset, length = self._extent(self.sizes[drive])
            kind = rng.choices(self.KINDS, self.weights)[0]
        pattern = rng.randrange(1, 256)
        cmd = {"write": f"write -P {pattern} {offset} {length}",
               "aio_write": f"aio_write -P {pattern} {offset} {length}",
               "zero": f"write -z {offset} {length}",
               "zero_unmap": f"write -z -u {offset} {length}",
               "discard": f"discard {offset} {length}"}[kind]
        self.qmp.hmp(f'qemu-io {drive} "{cmd}"')
        if kind == "aio_write" and complete:
            self.qmp.hmp(f'qemu-io {drive} "aio_flush"')
        self.counts[kind] += 1
        self.bytes += length
        self.log.append((drive, offset, length))

    def burst(self, n: int) -> None:
        for _ in range(n):
            self.op()


# --- the secondary ---------------------------------------------------------------------------
def make_pair(servers, vms, rng, drives=("drive0", "drive1")):
    """Primary images with random data (the initial sync copies it), empty replica
    images of the same sizes, the secondary serving them, QEMU on the primary's."""
    images, replicas = {}, {}
    for d in drives:
        images[d] = servers.path(f"{d}.raw")
        make_image(images[d], SIZES[d], rng, data_fraction=0.3)
        replicas[EXPORTS[d]] = servers.path(f"{EXPORTS[d]}.raw")
        with open(replicas[EXPORTS[d]], "wb") as f:
            f.truncate(SIZES[d])
    server = servers.new(replicas)
    server.start()
    vm = vms(servers.root, images)
    return vm, server


def drive_specs(drives=("drive0", "drive1")) -> list[primary.DriveSpec]:
    return [primary.DriveSpec(d, EXPORTS[d]) for d in drives]


class Protection:
    """primary.py's steps driven by the test, on protect's own QMP connection."""

    def __init__(self, vm: PrimaryVM, server: Server, drives=("drive0", "drive1"),
                 legacy: bool = False):
        self.vm = vm
        self.server = server
        self.drives = drive_specs(drives)
        self.ctl = ControlClient(server.control_path, timeout=60)
        self.epoch = primary.first_epoch(primary.secondary_status(self.ctl), self.drives)
        self.ctl, self.drives = primary.claim_writer(self.ctl, self.drives)
        self.qmp = primary.Qmp(vm.qmp_path)
        self.mirrors = primary.Mirrors(self.qmp, self.drives)
        target = primary.parse_nbd_uri(server.uri())
        if legacy:
            primary.start_drive_mirrors(self.qmp, target, self.drives)
        else:
            primary.attach(self.qmp, target, self.drives)
            primary.start_mirrors(self.qmp, self.drives)
        assert self.mirrors.wait_ready()
        self.records: dict[int, dict[str, bytes]] = {}
        self.acked = self.epoch - 1
        self.pauses: list[float] = []

    def checkpoint(self) -> None:
        """A whole checkpoint through primary.checkpoint, recording the primary's disks
        from its hook (the VM is stopped and the mirrors are drained then)."""
        def record(epoch):
            self.records[epoch] = self.vm.record()
            self.records.pop(epoch - 3, None)
        cp = primary.checkpoint(primary.PrimarySide(self.qmp, self.drives), self.ctl,
                                self.mirrors, self.epoch, hook=record)
        assert cp.committed, cp
        self.pauses.append(cp.pause)
        self.acked = self.epoch
        self.epoch += 1

    def close(self) -> None:
        self.qmp.close()
        self.ctl.close()


def assert_secondary_is(server: Server, expected: dict[str, bytes], paths: dict[str, str],
                        what: str) -> None:
    for drive, data in expected.items():
        export = EXPORTS[drive]
        assert_bytes(read_file(paths[export]), data, f"{what}: {export}")


def assert_committed_view(server: Server, expected: dict[str, bytes], what: str) -> None:
    """The NAME@committed exports (what failover would give) equal ``expected``."""
    for drive, data in expected.items():
        h = server.connect(EXPORTS[drive] + "@committed")
        assert_bytes(read_all(h), data, f"{what}: {EXPORTS[drive]}@committed")


def failover(server: Server, instant: bool = False) -> dict:
    r = server.cli("failover", "--json", *(["--instant"] if instant else []))
    assert r.returncode == 0, describe(r)
    return json.loads(r.stdout)


def qemu_img_compare(path: str, fmt: str, expected: bytes, scratch: str) -> None:
    with open(scratch, "wb") as f:
        f.write(expected)
    r = run(["qemu-img", "compare", "-f", fmt, "-F", "raw", path, scratch])
    assert r.returncode == 0, f"qemu-img compare: {describe(r)}"


# --- 1. many checkpoints, then kill -9 of the primary at a chosen point -------------------
KILL_POINTS = ["mid-epoch", "stopped", "drained", "committed"]


@pytest.mark.parametrize("kill_point", KILL_POINTS)
def test_kill_primary_then_failover(servers, vms, kill_point):
    """Two drives, 15-30 checkpoints with random guest I/O, then kill -9 of QEMU:
    mid-epoch (aio writes in flight), with the VM stopped, with the checkpoint half
    done (recorded, not committed), or right after the commit (before cont).  After
    failover both disks equal the primary's at the last acknowledged commit."""
    rng = random.Random(f"kill-primary-{kill_point}")
    vm, server = make_pair(servers, vms, rng)
    p = Protection(vm, server)
    assert p.epoch == 1  # a fresh secondary: epoch 0 is the initial sync
    guest = Guest(vm.qmp, SIZES, rng)
    for _ in range(rng.randrange(15, 31)):
        guest.burst(rng.randrange(0, 12))
        p.checkpoint()
    guest.burst(rng.randrange(1, 12))
    # the last, interrupted checkpoint, step by step
    if kill_point == "mid-epoch":
        for _ in range(4):  # in flight when QEMU dies
            drive = rng.choice(sorted(SIZES))
            offset = rng.randrange(SIZES[drive] // 65536 - 16) * 65536
            vm.qmp.hmp(f'qemu-io {drive} "aio_write -P 7 {offset} 1M"')
    else:
        p.qmp.cmd("stop")
        if kill_point != "stopped":
            p.mirrors.wait_drained()
            p.records[p.epoch] = vm.record()
            if kill_point == "committed":
                primary.commit(p.ctl, p.epoch)
                p.acked = p.epoch
    vm.kill9()
    p.close()

    st = server.execute("query-status")
    assert st["committed"] == p.acked and st["protected"]
    out = failover(server)
    assert out["committed"] == p.acked
    paths = {d["name"]: d["path"] for d in out["disks"]}
    assert_secondary_is(server, p.records[p.acked], paths, f"after kill at {kill_point}")
    qemu_img_compare(paths["vda"], "raw", p.records[p.acked]["drive0"], servers.path("exp.raw"))
    assert sum(guest.counts.values()) > 20, guest.counts


# --- 2. the real `nbd-mc protect`, with the test as a guest that respects checkpoints -------


class Coordinated:
    """The test as the guest of a VM that `nbd-mc protect` checkpoints on its own.

    A guest request is issued and completed under a lock.  The checkpoint hook runs
    while the VM is stopped: it takes the lock (so a request in progress completes
    first), leaves a "paused" mark and records the disks.  A guest that finds the
    mark waits until the VM runs again -- which is after that checkpoint's commit.
    """

    def __init__(self, root: str, vm: PrimaryVM, rng: random.Random, fail_once_at=None):
        self.root = root
        self.vm = vm
        self.guest = Guest(vm.qmp, {d: SIZES[d] for d in vm.images}, rng, aio=False)
        self.lock = os.path.join(root, "guest.lock")
        self.paused = os.path.join(root, "paused")
        self.records = os.path.join(root, "records")
        os.makedirs(self.records, exist_ok=True)
        self.config = os.path.join(root, "hook.json")
        with open(self.config, "w") as f:
            json.dump({"lock": self.lock, "paused": self.paused, "records": self.records,
                       "images": vm.images, "fail_once_at": fail_once_at,
                       "failed_marker": os.path.join(root, "hook-failed")}, f)
        self.script = os.path.join(root, "hook.py")
        with open(self.script, "w") as f:
            f.write(RECORDING_HOOK)

    @property
    def hook(self) -> str:
        return f"{sys.executable} {self.script} {self.config}"

    def record(self, epoch: int) -> dict[str, bytes]:
        d = os.path.join(self.records, str(epoch))
        return {drive: read_file(os.path.join(d, drive)) for drive in self.vm.images}

    def _locked(self):
        f = open(self.lock, "w")
        fcntl.flock(f, fcntl.LOCK_EX)
        return f

    def play(self, until, ops: int | None = None) -> None:
        """Guest requests until until() (or ``ops`` of them), never during a checkpoint."""
        done = 0
        deadline_ops = ops if ops is not None else 1 << 30
        while done < deadline_ops and not until():
            with self._locked():
                mark = read_file(self.paused) if os.path.exists(self.paused) else None
                if mark is None:
                    # a guest cannot write while protect has the VM paused outside a
                    # checkpoint (the final round of a resync) either
                    if self.vm.running():
                        self.guest.op(complete=True)
                        done += 1
                    continue
            wait_until(lambda: until() or self.vm.running(), "the VM to run again",
                       timeout=DEADLINE)
            with self._locked():
                if os.path.exists(self.paused) and read_file(self.paused) == mark:
                    os.unlink(self.paused)


def start_protect(procs, vm: PrimaryVM, server: Server, root: str, *args,
                  drives=("drive0", "drive1")) -> subprocess.Popen:
    drive_args = [a for d in drives for a in ("--drive", f"{d}={EXPORTS[d]}")]
    return spawn_protect(procs, root, "--qmp", vm.qmp_path, "--target", server.uri(),
                         "--control", server.control_path, *drive_args, *args)


def committed(server: Server) -> int:
    return server.execute("query-status")["committed"]


def watchdogs(vm: PrimaryVM) -> list[int]:
    """pids of protect's watchdog children for this VM."""
    r = subprocess.run(["pgrep", "-f", f"nbd_mc.primary.watchdog.*{vm.qmp_path}"],
                       capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def wait_watchdog_done(vm: PrimaryVM) -> None:
    wait_until(lambda: not watchdogs(vm), "protect's watchdog to finish")


def kill_with_watchdog(vm: PrimaryVM, proc: subprocess.Popen) -> None:
    """kill -9 of protect *and* its watchdog (as a kill of their whole cgroup would):
    nobody removes what protect left in QEMU but the next protect."""
    for pid in watchdogs(vm):
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait(30)
    wait_watchdog_done(vm)
    if not vm.running():  # it died inside a checkpoint: what its watchdog would do
        vm.qmp.cmd("cont")


def assert_detached(vm: PrimaryVM) -> None:
    """protect left QEMU as it found it: running, no mirror, no NBD node."""
    assert vm.running()
    assert vm.jobs() == []
    assert vm.nbd_nodes() == []


def test_protect_epochs_then_sigterm_detach(servers, vms, procs):
    """`protect --epochs N` commits N epochs (one hook failure skips a commit, which
    is retried) and detaches; a second protect re-syncs the already protected group
    and a SIGTERM detaches it after its current checkpoint.  Both exit 0, leave the
    VM running with no mirror, and the committed state equals the recorded disks."""
    rng = random.Random("detach")
    vm, server = make_pair(servers, vms, rng)
    co = Coordinated(servers.root, vm, rng, fail_once_at=4)
    proc = start_protect(procs, vm, server, servers.root, "--interval", "20ms", "--epochs", 8,
                         "--checkpoint-hook", co.hook)
    co.play(lambda: proc.poll() is not None)
    rc, out, err = finished(proc)
    assert rc == 0, (out, err)
    assert "committed epochs 1..8 (8 checkpoints, 1 skipped)" in out
    assert "epoch 4 not committed: the checkpoint hook exited with status 3" in out
    assert "VM pause per checkpoint: median" in out and "detached" in out
    assert_detached(vm)
    assert committed(server) == 8
    # the guest went on writing until the mirrors were removed: an open epoch 9
    assert_committed_view(server, co.record(8), "after --epochs 8")

    # the group is protected at 8: what the resync writes is undo until epoch 9 commits
    proc = start_protect(procs, vm, server, servers.root, "--interval", "20ms",
                         "--checkpoint-hook", co.hook, "--json")
    co.play(lambda: committed(server) >= 14 or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    co.play(lambda: proc.poll() is not None)
    rc, out, err = finished(proc)
    assert rc == 0, (out, err)
    report = json.loads(out)
    assert report["outcome"] == "detached" and report["first_epoch"] == 9
    assert report["committed"] == committed(server) >= 14
    assert report["pause_ms"]["count"] >= report["commits"] >= 6
    # the first protect's dirty bitmaps stayed in QEMU: only what changed is copied
    first = report["resyncs"][0]
    assert first["full"] is False and first["reason"] == "initial sync", first
    assert report["initial_sync_bytes"] == first["bytes"] >= first["dirty_bytes"] > 0
    assert report["mirrored_bytes"] >= report["initial_sync_bytes"]
    assert_detached(vm)
    out = failover(server)
    assert_secondary_is(server, co.record(report["committed"]), server.disks, "after SIGTERM")


def test_protect_kill_primary_random_point(servers, vms, procs):
    """The real protect process; QEMU is killed at a random point (mid-epoch or
    during a checkpoint).  protect says the primary is gone and which epoch the
    secondary holds; failover gives exactly the disks recorded at that epoch."""
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")  # shown with a failure
    rng = random.Random(seed)
    vm, server = make_pair(servers, vms, rng)
    co = Coordinated(servers.root, vm, rng)
    proc = start_protect(procs, vm, server, servers.root, "--interval", "10ms",
                         "--checkpoint-hook", co.hook)
    target = rng.randrange(5, 20)
    co.play(lambda: committed(server) >= target or proc.poll() is not None)
    co.play(lambda: proc.poll() is not None, ops=rng.randrange(0, 30))
    vm.kill9()
    rc, out, err = finished(proc)
    assert rc == 1, (out, err)
    last = committed(server)
    assert last >= target
    assert "The primary QEMU is gone" in err and f"the secondary holds epoch {last}," in err, err
    out = failover(server)
    assert out["committed"] == last
    assert_secondary_is(server, co.record(last), server.disks, "after QEMU was killed")


def test_protect_killed_then_protect_again(servers, vms, procs):
    """protect itself dies (kill -9, its watchdog too), here with the VM paused as if
    mid-checkpoint: the next protect removes the mirrors and nodes it left, resumes
    the VM, syncs again and commits on from the secondary's epoch."""
    rng = random.Random("protect-killed")
    vm, server = make_pair(servers, vms, rng)
    guest = Guest(vm.qmp, SIZES, rng, aio=False)
    proc = start_protect(procs, vm, server, servers.root, "--interval", "10ms")
    wait_until(lambda: committed(server) >= 3 or proc.poll() is not None, "three commits")
    guest.burst(10)
    kill_with_watchdog(vm, proc)
    vm.qmp.cmd("stop")
    assert len(vm.jobs()) == 2 and len(vm.nbd_nodes()) == 2  # what it left behind
    guest.burst(10)
    last = committed(server)
    r = nbd_mc("protect", "--qmp", vm.qmp_path, "--drive", "drive0=vda", "--drive",
               "drive1=vdb", "--target", server.uri(), "--control", server.control_path,
               "--epochs", 2, "--interval", "10ms")
    assert r.returncode == 0, describe(r)
    assert "left by an earlier protect" in r.stdout and "resumed the VM" in r.stdout, r.stdout
    assert f"committed epochs {last + 1}..{last + 2}" in r.stdout, r.stdout
    assert_detached(vm)
    for drive, export in EXPORTS.items():
        assert_bytes(read_file(server.image(export)), read_file(vm.images[drive]), export)


def test_forced_mirror_cancel_only_with_the_vm_paused(servers, vms, procs):
    """A write-blocking mirror is force-cancelled only while the VM is paused.

    QEMU 7.2's mirror frees its in-flight bitmap when a forced cancel ends it, before
    the guest writes it is copying have settled: their settling then writes into
    freed memory (the chaos soak's primary died of it with SIGSEGV/SIGABRT).  Here
    protect is killed with its mirrors READY and the VM running; the next protect
    removes them with a forced cancel: the VM must be stopped when QEMU reports
    each cancelled mirror, and running again afterwards."""
    rng = random.Random("forced-cancel-paused")
    vm, server = make_pair(servers, vms, rng)
    proc = start_protect(procs, vm, server, servers.root, "--interval", "10ms")
    wait_until(lambda: committed(server) >= 2 or proc.poll() is not None, "two commits")
    kill_with_watchdog(vm, proc)
    assert vm.running() and {j["type"] for j in vm.jobs()} == {"mirror"}
    cursor = vm.qmp.cursor
    r = nbd_mc("protect", "--qmp", vm.qmp_path, "--drive", "drive0=vda", "--drive",
               "drive1=vdb", "--target", server.uri(), "--control", server.control_path,
               "--epochs", 1, "--interval", "10ms")
    assert r.returncode == 0, describe(r)
    assert "left by an earlier protect" in r.stdout, r.stdout
    running, cancelled = True, []
    for _, e in vm.qmp.events_after(cursor):
        if e["event"] in ("STOP", "RESUME"):
            running = e["event"] == "RESUME"
        elif e["event"] == "BLOCK_JOB_CANCELLED" and e["data"]["type"] == "mirror":
            cancelled.append((e["data"]["device"], running))
        if len(cancelled) == 2:
            break
    assert sorted(cancelled) == [("nbd-mc-drive0", False), ("nbd-mc-drive1", False)], \
        cancelled
    assert_detached(vm)


# --- 3. the secondary's nbdkit killed mid-epoch -------------------------------------------------
@pytest.mark.parametrize("after", ["restart", "recover"])
def test_secondary_killed_mid_epoch(servers, vms, procs, after):
    """kill -9 of nbdkit while the guest writes, with --retry-for 0: protect reports the
    failure (exit 1, what happened, the VM runs on with the mirrors removed).  After a restart of the
    server (and failover) or an offline `nbd-mc recover`, the disks equal the
    recorded disks of the last commit."""
    rng = random.Random(f"secondary-{after}")
    vm, server = make_pair(servers, vms, rng)
    co = Coordinated(servers.root, vm, rng)
    proc = start_protect(procs, vm, server, servers.root, "--interval", "20ms",
                         "--checkpoint-hook", co.hook, "--retry-for", "0")
    co.play(lambda: committed(server) >= 6 or proc.poll() is not None)
    co.play(lambda: proc.poll() is not None, ops=rng.randrange(1, 10))
    last = committed(server)
    server.kill9()
    if after == "restart":
        server.start()
    co.play(lambda: proc.poll() is not None)
    rc, out, err = finished(proc)
    assert rc == 1, (out, err)
    assert "protection stopped:" in err and "secondary" in err.split("\n")[0], err
    assert "The VM keeps running UNPROTECTED (mirrors removed)" in err, err
    assert f"the secondary holds epoch {last}," in err, err
    assert_detached(vm)
    co.play(lambda: False, ops=5)  # the guest still works
    if after == "restart":
        assert committed(server) == last
        failover(server)
    else:
        r = server.cli("recover")
        assert r.returncode == 0, describe(r)
        assert f"committed epoch {last}" in r.stdout
    assert_secondary_is(server, co.record(last), server.disks, f"after kill -9 and {after}")


def test_protect_events_as_they_happen(servers, vms, procs):
    """`protect --events -`: standard output is a JSON-lines stream a supervisor reads
    while protect runs -- the initial sync, the first commit, a skipped commit, the
    secondary lost (kill -9) with the reason, the resync once it is back, protected
    again -- and the closing report as its last line; the human lines go to stderr."""
    rng = random.Random("events")
    vm, server = make_pair(servers, vms, rng)
    co = Coordinated(servers.root, vm, rng, fail_once_at=3)
    proc = start_protect(procs, vm, server, servers.root, "--interval", "20ms",
                         "--checkpoint-hook", co.hook, "--events", "-")

    def events():
        proc.out.seek(0)
        text = proc.out.read()
        return [json.loads(line) for line in text.splitlines()[:text.count("\n")]]

    co.play(lambda: committed(server) >= 5 or proc.poll() is not None)
    assert proc.poll() is None, finished(proc)
    # already there while protect runs
    seen = [(e["event"], e.get("state")) for e in events()]
    assert seen[:4] == [("state", "syncing"), ("resync", None), ("state", "checkpointing"),
                        ("protected", None)], seen
    assert ("refusal", None) in seen, seen
    last = committed(server)
    server.kill9()
    server.start()
    co.play(lambda: committed(server) > last + 2 or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    co.play(lambda: proc.poll() is not None)
    rc, out, err = finished(proc)
    assert rc == 0, (out, err)
    ev = [json.loads(line) for line in out.splitlines()]  # every stdout line is JSON
    kinds = [e["event"] for e in ev]
    first = ev[1]
    assert first["mode"] == "full" and first["reason"].startswith("initial sync"), first
    refusal = ev[kinds.index("refusal")]
    assert refusal["epoch"] == 3 and "exited with status 3" in refusal["reason"], refusal
    lost = next(e for e in ev if e.get("state") == "lost")
    assert lost["reason"] and lost["outages"] == 1, lost
    after = ev[ev.index(lost):]
    assert [e.get("state") for e in after if e["event"] == "state"][-2:] == [
        "checkpointing", "detached"], after
    resync = next(e for e in after if e["event"] == "resync")
    assert resync["mode"] in ("bitmap", "checksum", "full") and resync["from_epoch"] <= last
    protected = next(e for e in after if e["event"] == "protected")
    assert protected["epoch"] > resync["from_epoch"], after
    assert kinds[-1] == "report" and ev[-1]["report"]["outcome"] == "detached"
    assert ev[-1]["report"]["outages"] == 1 and len(ev[-1]["report"]["resyncs"]) == 2
    assert "secondary lost" in err and "detached" in err, err
    assert_detached(vm)


# --- 4. a stale primary after failover ------------------------------------------------------------
def test_stale_primary_is_fenced(servers, vms):
    """Failover while the old primary still runs (a partition, not a crash): its
    writes no longer reach the secondary, its mirrors report errors, and protect's
    next checkpoint refuses to go on."""
    rng = random.Random("stale")
    vm, server = make_pair(servers, vms, rng)
    p = Protection(vm, server)
    guest = Guest(vm.qmp, SIZES, rng)
    for _ in range(10):
        guest.burst(rng.randrange(1, 8))
        p.checkpoint()
    guest.burst(5)
    out = failover(server)
    expected = p.records[p.acked]
    assert out["committed"] == p.acked
    assert_secondary_is(server, expected, server.disks, "right after failover")

    cursor = p.qmp.cursor
    for drive in SIZES:  # the stale primary writes everywhere
        vm.qmp.hmp(f'qemu-io {drive} "write -P 0xee 0 {SIZES[drive]}"')
    for job in ("nbd-mc-drive0", "nbd-mc-drive1"):  # each mirror reports its error
        ended, _ = p.qmp.wait_event(lambda e: e["event"] in primary.JOB_END_EVENTS
                                    and e["data"]["device"] == job, cursor, DEADLINE)
        assert ended and ended["data"].get("error"), ended
    errors = [e for _, e in p.qmp.events_after(cursor) if e["event"] == "BLOCK_JOB_ERROR"]
    assert {e["data"]["device"] for e in errors} == {"nbd-mc-drive0", "nbd-mc-drive1"}, errors
    with pytest.raises(primary.SecondaryFailed):
        p.checkpoint()
    assert vm.running()
    assert_secondary_is(server, expected, server.disks, "after the stale primary wrote")
    assert read_file(vm.images["drive0"])[:4] == b"\xee" * 4  # its own disk took the writes
    problems = primary.detach(p.qmp, p.mirrors)
    assert problems == [] and vm.jobs() == [] and vm.nbd_nodes() == []
    p.close()
    # a promoted secondary takes no more checkpoints
    r = nbd_mc("protect", "--qmp", vm.qmp_path, "--drive", "drive0=vda", "--drive",
               "drive1=vdb", "--target", server.uri(), "--control", server.control_path)
    assert r.returncode == 1 and "promoted to primary" in r.stderr, describe(r)


# --- 5. instant failover: QEMU opens the handed-out overlays -------------------------------------
def test_instant_failover_overlay_boots(servers, vms):
    rng = random.Random("instant")
    vm, server = make_pair(servers, vms, rng)
    p = Protection(vm, server)
    guest = Guest(vm.qmp, SIZES, rng)
    for _ in range(12):
        guest.burst(rng.randrange(1, 10))
        p.checkpoint()
    guest.burst(10)
    vm.kill9()
    p.close()
    out = failover(server, instant=True)
    assert out["committed"] == p.acked
    expected = p.records[p.acked]
    by_name = {d["name"]: d for d in out["disks"]}
    for drive, export in EXPORTS.items():
        d = by_name[export]
        assert d["format"] == "qcow2" and d["path"] == server.overlay(export)
        qemu_img_compare(d["path"], "qcow2", expected[drive], servers.path(f"{export}.exp"))
    # the new primary boots on exactly what failover printed
    new = vms(servers.root, {d: by_name[EXPORTS[d]]["path"] for d in EXPORTS}, name="new",
              drive_args={d: by_name[EXPORTS[d]]["drive"] for d in EXPORTS})
    names = {b["device"]: b["inserted"]["image"]["format"] for b in new.qmp.cmd("query-block")}
    assert names == {"vda": "qcow2", "vdb": "qcow2"}
    new.qmp.hmp('qemu-io vda "write -P 0x42 0 65536"')
    new.quit()
    r = run(["qemu-img", "check", "-f", "qcow2", server.overlay("vda")])
    assert r.returncode == 0, describe(r)
    data = bytearray(expected["drive0"])
    data[:65536] = b"\x42" * 65536
    qemu_img_compare(server.overlay("vda"), "qcow2", bytes(data), servers.path("vda.exp2"))


# --- 6. the older drive-mirror command ------------------------------------------------------------
def test_drive_mirror_into_the_server(servers, vms, procs):
    """drive-mirror mode=existing format=raw with an nbd+unix URI per export mirrors
    just like blockdev-mirror; `protect --drive-mirror` uses it end to end."""
    rng = random.Random("drive-mirror")
    vm, server = make_pair(servers, vms, rng)
    p = Protection(vm, server, legacy=True)
    info = {j["device"]: j for j in vm.jobs()}
    assert set(info) == {"nbd-mc-drive0", "nbd-mc-drive1"}
    guest = Guest(vm.qmp, SIZES, rng)
    for _ in range(10):
        guest.burst(rng.randrange(1, 10))
        p.checkpoint()
    assert primary.detach(p.qmp, p.mirrors) == []
    p.close()
    assert_detached(vm)
    st = server.execute("query-status")
    assert st["committed"] == p.acked == 10
    for drive, export in EXPORTS.items():
        assert_bytes(read_file(server.image(export)), p.records[10][drive], export)
    proc = start_protect(procs, vm, server, servers.root, "--drive-mirror", "--epochs", 3,
                         "--interval", "10ms")
    rc, out, err = finished(proc)
    assert rc == 0 and "committed epochs 11..13" in out, (out, err)
    assert_detached(vm)
    for drive, export in EXPORTS.items():
        assert_bytes(read_file(server.image(export)), read_file(vm.images[drive]), export)


# --- 7. refusals: one clear line, nothing attached ------------------------------------------------
def test_protect_refusals(servers, vms):
    rng = random.Random("refusals")
    vm, server = make_pair(servers, vms, rng)
    base = ["protect", "--qmp", vm.qmp_path, "--target", server.uri(), "--control",
            server.control_path]
    cases = [
        (["--drive", "drive0=vda"], 1, "also holds vdb, which no --drive mirrors"),
        (["--drive", "drive0=vda", "--drive", "drive9=vdb"], 1, "QEMU has no drive drive9"),
        (["--drive", "drive0=vda", "--drive", "drive1=vdx"], 1, "the secondary has no disk vdx"),
        (["--drive", "drive0=vda", "--drive", "drive1=vda"], 2, "export vda given twice"),
        (["--drive", "drive0=vdb", "--drive", "drive1=vda"], 1,
         "drive0 is 8388608 bytes but vdb is 4194304"),
        (["--drive", "drive0=vda", "--drive", "drive1=vdb", "--interval", "soon"], 2,
         "not a duration"),
    ]
    with pytest.raises(primary.QmpCommandError) as e:  # QEMU's refusals come through
        vm.qmp.cmd("block-job-cancel", device="no-such-job")
    assert e.value.qmp_class == "DeviceNotActive" and "no-such-job" in e.value.desc
    for args, code, text in cases:
        r = nbd_mc(*base, *args)
        assert r.returncode == code and text in r.stderr, describe(r)
        assert vm.jobs() == [] and vm.nbd_nodes() == []
    r = nbd_mc("protect", "--qmp", servers.path("nothing.qmp"), "--drive", "drive0=vda",
               "--drive", "drive1=vdb", "--target", server.uri(), "--control",
               server.control_path)
    assert r.returncode == 1 and "cannot connect to QEMU's QMP socket" in r.stderr, describe(r)
    r = nbd_mc(*base[:-1], servers.path("no-control.sock"), "--drive", "drive0=vda",
               "--drive", "drive1=vdb")
    assert r.returncode == 1 and "cannot reach the secondary's control channel" in r.stderr


def test_parsing():
    assert primary.parse_drive("drive0") == primary.DriveSpec("drive0", "drive0")
    assert primary.parse_drive("d=vda").node == "nbd-mc-d"
    assert primary.parse_interval("100ms") == pytest.approx(0.1)
    assert primary.parse_interval("2s") == 2.0 and primary.parse_interval("0.5") == 0.5
    assert primary.parse_interval("5m") == 300.0 and primary.parse_interval("0", zero=True) == 0
    with pytest.raises(ValueError):
        primary.parse_interval("0")
    t = primary.parse_nbd_uri("nbd+unix:///vda?socket=/run/s.sock")
    assert t.server == {"type": "unix", "path": "/run/s.sock"} and t.export == "vda"
    t = primary.parse_nbd_uri("nbds://backup.example:10810/")
    assert t.server == {"type": "inet", "host": "backup.example", "port": "10810"} and t.tls
    assert primary.parse_nbd_uri("nbd://h/").server["port"] == "10809"
    for bad in ("http://x/", "nbd+unix:///vda"):
        with pytest.raises(ValueError):
            primary.parse_nbd_uri(bad)
    for bad in ("", "=vda", "d=", "d=vda@committed"):
        with pytest.raises(ValueError):
            primary.parse_drive(bad)


# --- 8. over TCP with TLS: nbds:// target and a tcp:// control channel -------------------------
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tls_primary(servers, seed: str):
    """Certificates, a primary image with data and an empty replica of its size."""
    certs = servers.path("certs")
    r = run(["sh", os.path.join(REPO, "tools", "make-certs.sh"), certs])
    assert r.returncode == 0, describe(r)
    rng = random.Random(seed)
    images = {"drive0": servers.path("drive0.raw")}
    make_image(images["drive0"], SIZES["drive0"], rng, data_fraction=0.3)
    replica = servers.path("vda.raw")
    with open(replica, "wb") as f:
        f.truncate(SIZES["drive0"])
    return certs, rng, images, replica


def test_protect_over_tls(servers, vms, procs):
    """QEMU's NBD client with a tls-creds-x509 object made from --tls-certificates, and
    the control channel over TCP with client certificates, from the same directory."""
    certs, rng, images, replica = _tls_primary(servers, "tls")
    nbd_port, ctl_port = _free_port(), _free_port()
    control = f"tcp://127.0.0.1:{ctl_port}"
    server = servers.new({"vda": replica}, args=[
        "--port", nbd_port, "--bind", "127.0.0.1", "--tls", "require",
        "--tls-certificates", certs, "--control", control])
    server.start()
    vm = vms(servers.root, images)
    Guest(vm.qmp, {"drive0": SIZES["drive0"]}, rng).burst(20)
    r = nbd_mc("protect", "--qmp", vm.qmp_path, "--drive", "drive0=vda",
               "--target", f"nbds://127.0.0.1:{nbd_port}/", "--control", control,
               "--tls-certificates", certs, "--epochs", 3, "--interval", "10ms")
    assert r.returncode == 0 and "committed epochs 1..3" in r.stdout, describe(r)
    assert_detached(vm)
    assert_bytes(read_file(replica), read_file(images["drive0"]), "vda over TLS")
    with ControlClient(control, tls=TlsFiles(certs)) as c:
        assert c.execute("query-status")["committed"] == 3
        c.execute("quit")
    wait_until(lambda: not server.running(), "the TLS server to stop")
    server.pid = None


def test_protect_over_tls_unix_socket(servers, vms, procs):
    """nbds+unix: QEMU checks the server certificate against "localhost", and the
    control channel stays a plain unix socket (TLS is for tcp:// only)."""
    certs, rng, images, replica = _tls_primary(servers, "tls-unix")
    server = servers.new({"vda": replica}, args=["--tls", "require", "--tls-certificates", certs])
    server.start()
    vm = vms(servers.root, images)
    # the second protect in the same QEMU finds the first one's tls-creds object there
    # (as after a killed protect, or a lost secondary attached again): it must go on
    for epochs, what in (("1..2", "vda over TLS (unix)"), ("3..4", "vda over TLS (unix), again")):
        Guest(vm.qmp, {"drive0": SIZES["drive0"]}, rng).burst(20)
        r = nbd_mc("protect", "--qmp", vm.qmp_path, "--drive", "drive0=vda",
                   "--target", f"nbds+unix:///?socket={server.sock}",
                   "--control", server.control_path,
                   "--tls-certificates", certs, "--epochs", 2, "--interval", "10ms")
        assert r.returncode == 0 and f"committed epochs {epochs}" in r.stdout, describe(r)
        assert_detached(vm)
        assert_bytes(read_file(replica), read_file(images["drive0"]), what)


def test_qmp_connect_that_timed_out_does_not_block_the_next(servers, monkeypatch):
    """QEMU serves one client per QMP socket: a connect attempt that gave up must
    close its socket, or QEMU would hand the slot to that dead attempt and the next
    connect would wait for a greeting forever (seen as a flaky test under load)."""
    import socket as sockets
    path = servers.path("one.qmp")
    proc = subprocess.Popen([QEMU, "-machine", "none", "-nodefaults", "-display", "none",
                             "-qmp", f"unix:{path},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        def holder():
            s = sockets.socket(sockets.AF_UNIX)
            try:
                s.connect(path)
            except OSError:
                s.close()
                return None
            return s
        hog = wait_until(holder, "QEMU's QMP socket")
        assert hog.recv(7) == b'{"QMP":'  # QEMU serves the hog: the slot is taken
        monkeypatch.setattr(primary.qmp, "CONNECT_TIMEOUT", 1.0)
        with pytest.raises(primary.PrimaryGone, match="did not greet"):
            primary.Qmp(path, timeout=1.0)
        hog.close()
        q = primary.Qmp(path, timeout=10.0)
        assert q.cmd("query-status")["running"] is True
        q.close()
    finally:
        proc.kill()
        proc.wait(30)
