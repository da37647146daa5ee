"""`nbd-mc protect --mode async` with a real QEMU and the real secondary behind an
emulated slow link (tests/support/link.py: NBD over TCP and the control channel,
each direction delayed, optionally capped).

The oracle is test_primary's: the test plays a guest that respects checkpoints
(Coordinated: its checkpoint hook records the primary's disks while the VM is
paused and drained); after a kill -9 of the primary QEMU, failover must give
exactly the disks recorded at the epoch the secondary acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import types

import pytest

from support.link import Link
from support.protect_proc import spawn_protect
from support.servers import describe, read_file, wait_until
from test_primary import (DEADLINE, EXPORTS, SIZES, Coordinated, PrimaryVM,  # noqa: F401
                          assert_secondary_is, committed, failover, finished, make_pair, vms)
from test_resync import Tracked, check_incremental, end_with_failover, progress

pytestmark = pytest.mark.qemu

RTT = 0.020  # the emulated round trip between the sites


@pytest.fixture
def links():
    made = []
    yield lambda *a, **kw: made.append(Link(*a, **kw)) or made[-1]
    for link in made:
        link.close()


def slow_link(links, server, root, rtt: float = RTT, rate=None):
    """The secondary's NBD socket behind a TCP link and its control socket behind a
    unix one, both delayed by ``rtt`` per round trip; returns (nbd link, control link)."""
    nbd = links(server.sock, rtt=rtt, rate=rate)
    ctl = links(server.control_path, rtt=rtt, path=os.path.join(root, "ctl-link.sock"))
    return nbd, ctl


def start_async(procs, vm, root, nbd, ctl, *args, drives=("drive0", "drive1")):
    drive_args = [a for d in drives for a in ("--drive", f"{d}={EXPORTS[d]}")]
    return spawn_protect(procs, root, "--qmp", vm.qmp_path, "--target", nbd.nbd_uri(),
                         "--control", ctl.path, "--mode", "async", *drive_args, *args)


def test_async_kill_primary_over_slow_link(servers, vms, procs, links):
    """Async over a 20 ms round trip: the guest writes, QEMU is killed -9 mid-epoch;
    failover gives exactly the disks recorded at the acknowledged epoch."""
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    vm, server = make_pair(servers, vms, rng)
    nbd, ctl = slow_link(links, server, servers.root)
    co = Coordinated(servers.root, vm, rng)
    proc = start_async(procs, vm, servers.root, nbd, ctl, "--interval", "20ms",
                       "--checkpoint-hook", co.hook, "--stall-timeout", "5s")
    target = rng.randrange(4, 12)
    co.play(lambda: committed(server) >= target or proc.poll() is not None)
    co.play(lambda: proc.poll() is not None, ops=rng.randrange(1, 30))
    vm.kill9()
    rc, out, err = finished(proc)
    print(out, err)
    assert rc == 1, (out, err)
    last = committed(server)
    assert last >= target
    assert "The primary QEMU is gone" in err and f"the secondary holds epoch {last}," in err, err
    out = failover(server)
    assert out["committed"] == last
    assert_secondary_is(server, co.record(last), server.disks, "async, after QEMU was killed")


def protect_async(procs, vm, root, nbd, ctl, co, *args):
    return start_async(procs, vm, root, nbd, ctl, "--interval", "20ms", "--checkpoint-hook",
                       co.hook, "--json", "--stall-timeout", "3s", *args)


# --- self-healing works in async mode as in sync mode -------------------------------------------
def test_async_secondary_killed_and_restarted(servers, vms, procs, links):
    """Behind the slow link: the secondary dies mid-epoch and comes back; protect
    resyncs from the dirty bitmap, goes back to background shipping and commits on;
    a failover then gives exactly the recorded disks."""
    rng = random.Random("async-kill9")
    vm, server = make_pair(servers, vms, rng)
    nbd, ctl = slow_link(links, server, servers.root)
    co = Tracked(servers.root, vm, rng)
    proc = protect_async(procs, vm, servers.root, nbd, ctl, co)
    progress(co, server, proc, 3)
    co.play(lambda: False, ops=5)  # mid-epoch
    last = committed(server)
    server.kill9()
    co.play(lambda: False, ops=10)  # the guest goes on: no write waits or fails
    server.start()
    after = progress(co, server, proc, 3)
    assert after >= last + 3
    report = end_with_failover(servers, vm, server, proc, co)
    assert report["mode"] == "async"
    assert report["outages"] == 1 and len(report["resyncs"]) == 2
    check_incremental(report["resyncs"][1], co, last)


def test_async_link_outage(servers, vms, procs, links):
    """The link itself goes down (every connection dropped, new ones refused) and
    comes back: the same self-healing, twice."""
    rng = random.Random("async-link-cut")
    vm, server = make_pair(servers, vms, rng)
    nbd, ctl = slow_link(links, server, servers.root)
    co = Tracked(servers.root, vm, rng)
    proc = protect_async(procs, vm, servers.root, nbd, ctl, co)
    progress(co, server, proc, 2)
    for _ in range(2):
        co.play(lambda: False, ops=4)
        nbd.cut()
        ctl.cut()
        co.play(lambda: False, ops=8)
        nbd.restore()
        ctl.restore()
        progress(co, server, proc, 3)
    report = end_with_failover(servers, vm, server, proc, co)
    assert report["outages"] >= 2
    assert all(not r["full"] for r in report["resyncs"][1:]), report["resyncs"]


# --- a checkpoint whose tail cannot cross in time gives way ---------------------------------------
@contextlib.contextmanager
def stepped(servers, vms, links, seed: str, stall_timeout: float = 60.0):
    """A pair driven step by step through primary.* (no protect process): the
    secondary behind a TCP link, the writer claimed, background mirrors READY.
    Yields a namespace: vm, server, nbd (the link), ctl, qmp, drives, epoch (the
    first one to commit), mirrors, side, and drain (shipping.drain bounded by
    ``stall_timeout``, as protect passes it to checkpoint)."""
    from nbd_mc import primary
    from nbd_mc.control import ControlClient
    from nbd_mc.primary import shipping
    from test_primary import drive_specs
    vm, server = make_pair(servers, vms, random.Random(seed))
    nbd, ctl_link = slow_link(links, server, servers.root, rtt=0.0)
    drives = drive_specs()
    ctl = ControlClient(ctl_link.path, timeout=60)
    epoch = primary.first_epoch(primary.secondary_status(ctl), drives)
    ctl, drives = primary.claim_writer(ctl, drives)
    qmp = primary.Qmp(vm.qmp_path)
    try:
        primary.attach(qmp, primary.parse_nbd_uri(nbd.nbd_uri()), drives)
        # before the jobs start: a Mirrors sees only the events after its creation,
        # and a small disk's mirror can be READY before start_background returns
        mirrors = primary.Mirrors(qmp, drives)
        shipping.start_background(qmp, drives, "full")
        assert mirrors.wait_ready(timeout=DEADLINE)
        side = primary.PrimarySide(qmp, drives, stall_timeout=stall_timeout)

        def drain(give_way_at):
            return shipping.drain(qmp, mirrors, stall_timeout, give_way_at).left

        yield types.SimpleNamespace(vm=vm, server=server, nbd=nbd, ctl=ctl, qmp=qmp,
                                    drives=drives, epoch=epoch, mirrors=mirrors, side=side,
                                    drain=drain)
    finally:
        nbd.rate = None
        qmp.close()
        ctl.close()


def test_async_checkpoint_gives_way_when_the_tail_cannot_cross(servers, vms, links):
    """primary.checkpoint in async mode, driven step by step on a real QEMU: a
    checkpoint that was not forced by --max-lag, whose drain is not over by the
    pause's deadline (8 MiB written, the link capped at 256 KiB/s), gives way:
    no commit, no bitmap, no hook, the VM runs on and the secondary is not lost
    (its mirrors still run).  Once the link has carried the backlog, the next
    checkpoint commits exactly what the primary held."""
    from nbd_mc import primary
    from nbd_mc.primary import shipping
    from test_primary import assert_committed_view
    with stepped(servers, vms, links, "async-give-way") as t:
        vm, server, nbd, qmp, drives = t.vm, t.server, t.nbd, t.qmp, t.drives
        ctl, mirrors, side, epoch, drain = t.ctl, t.mirrors, t.side, t.epoch, t.drain
        records, hooked = {}, []

        def hook(e):
            hooked.append(e)
            records[e] = vm.record()

        cp = primary.checkpoint(side, ctl, mirrors, epoch, hook=hook, drain=drain)
        assert cp.committed and not cp.extended, cp
        assert server.execute("query-status")["committed"] == epoch
        nbd.rate = 256 << 10
        for i in range(4):
            vm.qmp.hmp(f'qemu-io drive0 "write -P {i + 1} {i * (2 << 20)} 2M"')
        cp = primary.checkpoint(side, ctl, mirrors, epoch + 1, hook=hook, drain=drain)
        print(f"the checkpoint that gave way paused the VM {cp.pause:.2f} s")
        assert not cp.committed and cp.extended > 0 and cp.skipped is None, cp
        assert hooked == [epoch], hooked  # no hook (nor bitmap, nor commit) for it
        assert server.execute("query-status")["committed"] == epoch
        assert vm.running()
        assert sorted(j["device"] for j in vm.jobs() if j["type"] == "mirror") == \
            sorted(d.job for d in drives), vm.jobs()  # the secondary is not lost
        nbd.rate = None
        wait_until(lambda: shipping.backlog(qmp, drives).left == 0,
                   "the mirrors to ship the backlog", timeout=DEADLINE)
        cp = primary.checkpoint(side, ctl, mirrors, epoch + 1, hook=hook, drain=drain)
        assert cp.committed and not cp.extended, cp
        assert_committed_view(server, records[epoch + 1], "after the checkpoint that gave way")
        assert "failed" not in read_file(vm.log).decode(errors="replace")


def test_async_checkpoint_does_not_stop_the_vm_behind_copies_in_flight(servers, vms, links):
    """QEMU's ``stop`` waits for a background mirror's copies in flight (up to its
    buf-size per drive); on a link that does not carry them, that wait held the
    paused VM for the whole --stall-timeout.  protect now waits for them with the
    VM still running (lifecycle.JobsHeld.settle): the link all but stopped
    (4 KiB/s) under 2 MiB of copies, the checkpoint gives up on the secondary
    after the stall timeout without QEMU ever having stopped the VM (no STOP
    event), and the VM runs."""
    from nbd_mc import primary
    from nbd_mc.primary import shipping
    with stepped(servers, vms, links, "async-in-flight", stall_timeout=2.0) as t:
        vm, server, nbd, qmp, drives = t.vm, t.server, t.nbd, t.qmp, t.drives
        ctl, mirrors, side, epoch, drain = t.ctl, t.mirrors, t.side, t.epoch, t.drain
        cp = primary.checkpoint(side, ctl, mirrors, epoch, drain=drain)
        assert cp.committed, cp
        nbd.rate = 4 << 10
        vm.qmp.hmp('qemu-io drive0 "write -P 7 0 2M"')
        shipping.kick(qmp, drives)
        wait_until(lambda: shipping.backlog(qmp, drives).dirty < 2 << 20,
                   "the mirror to start copying", timeout=DEADLINE)
        cursor = qmp.cursor
        with pytest.raises(primary.SecondaryStalled):
            primary.checkpoint(side, ctl, mirrors, epoch + 1, drain=drain)
        stops, _ = qmp.wait_event(lambda e: e.get("event") == "STOP", cursor, 0)
        assert stops is None, stops
        assert vm.running()
        assert server.execute("query-status")["committed"] == epoch


# --- --max-lag: the link cannot keep up --------------------------------------------------------
class Heavy(Coordinated):
    """Coordinated, writing 2 MiB of one byte at a time (data the mirror copies,
    unlike zeroes and discards): a guest that outpaces a 0.5 MiB/s link whatever
    the machine's load.  (With 512 KiB per write, at load 40 one HMP write took
    about as long as the link needed to carry it: no back-pressure, one run in
    three.)"""

    SIZE = 2 << 20

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        rng, guest = self.guest.rng, self.guest

        def op(complete=False):
            drive = rng.choice(sorted(guest.sizes))
            offset = rng.randrange(0, guest.sizes[drive] - self.SIZE) & ~4095
            guest.qmp.hmp(f'qemu-io {drive} "write -P {rng.randrange(1, 256)} {offset} '
                          f'{self.SIZE >> 10}k"')
            guest.log.append((drive, offset, self.SIZE))
        self.guest.op = op


def test_async_lag_bound_on_a_capped_link(servers, vms, procs, links):
    """The guest writes faster than the capped link carries: once the lag reaches
    --max-lag protect forces the checkpoint (the VM waits for the link) and says
    so: on the console, in the summary and in the metrics file.  What is
    committed stays exact.  (Outcomes only: how long the lag grew depends on the
    machine's load.)"""
    rng = random.Random("async-max-lag")
    vm, server = make_pair(servers, vms, rng)
    nbd, ctl = slow_link(links, server, servers.root, rate=512 << 10)  # 0.5 MiB/s each way
    co = Heavy(servers.root, vm, rng)
    metrics = os.path.join(servers.root, "protect.prom")
    max_lag = 1.0
    proc = start_async(procs, vm, servers.root, nbd, ctl, "--interval", "20ms",
                       "--checkpoint-hook", co.hook, "--max-lag", f"{max_lag}s",
                       "--metrics-file", metrics)
    wait_until(lambda: committed(server) >= 1 or proc.poll() is not None, "the first commit",
               timeout=120)
    first = committed(server)
    # 16 MiB of writes (some overwrite others): many times --max-lag of the link;
    # then the guest rests while back-pressure lets the backlog cross (on a link
    # this slow a guest writing throughout would outrun it: docs/async.md)
    co.play(lambda: proc.poll() is not None, ops=8)
    wait_until(lambda: committed(server) >= first + 3 or proc.poll() is not None,
               "three commits after the backlog", timeout=DEADLINE)
    vm.kill9()
    rc, out, err = finished(proc)
    assert rc == 1 and "The primary QEMU is gone" in err, (out, err)
    prom = read_file(metrics).decode()  # (rewritten as protect ended)
    acked = committed(server)
    assert failover(server)["committed"] == acked
    assert_secondary_is(server, co.record(acked), server.disks, f"after failover at {acked}")
    assert "failed" not in read_file(vm.log).decode(errors="replace")  # no guest write failed
    assert "secondary lost" not in out + err, (out, err)
    forced = [line for line in prom.splitlines()
              if line.startswith("nbd_mc_protect_backpressure_total")]
    assert forced and float(forced[0].split()[-1]) >= 1, prom
    assert "nbd_mc_protect_epoch_lag_seconds" in prom and "nbd_mc_protect_in_flight_bytes" in prom
    # what the bound does, as outcomes (no timing: the machine's load decides how
    # long anything takes, and how long the checkpoint hook's copies keep the VM
    # paused): checkpoints were taken while data was still on its way (the
    # committed epoch trailed the primary by that backlog), forced by --max-lag,
    # each one a pause until the backlog had crossed and then a commit (commits
    # went on, and the last one is exact, above); the console, the summary and the
    # metrics file count the same back-pressure checkpoints.  (A checkpoint whose
    # look found little but whose stop found what the guest wrote in between gives
    # way instead: "epoch N extended", no back-pressure.)
    shipping = [line for line in out.splitlines() if "back-pressure, the VM runs in sl" in line]
    assert shipping and not [s for s in shipping if " 0.0 MiB " in s], out
    assert all(f"reached --max-lag {max_lag:g} s with " in s for s in shipping), out
    summary = out.split("async: epoch lag median ")[1].split("\n")[0]
    backpressure = int(summary.split(", ")[-1].split(" back-pressure episode(s)")[0])
    assert backpressure == len(shipping), summary
    assert float(forced[0].split()[-1]) == backpressure, prom
    assert acked > first, (acked, first)


def test_async_json_reports_backpressure(servers, vms, procs, links):
    """The same link with --json: the report counts the forced checkpoints and the
    lag figures."""
    rng = random.Random("async-max-lag-json")
    vm, server = make_pair(servers, vms, rng)
    nbd, ctl = slow_link(links, server, servers.root, rate=512 << 10)
    co = Heavy(servers.root, vm, rng)
    proc = protect_async(procs, vm, servers.root, nbd, ctl, co, "--max-lag", "1s",
                         "--stall-timeout", "10s")
    wait_until(lambda: committed(server) >= 1 or proc.poll() is not None, "the first commit",
               timeout=120)
    first = committed(server)
    co.play(lambda: proc.poll() is not None, ops=8)
    wait_until(lambda: committed(server) >= first + 3 or proc.poll() is not None,
               "three commits after the backlog", timeout=DEADLINE)
    report = end_with_failover(servers, vm, server, proc, co)
    assert report["mode"] == "async" and report["outages"] == 0, report
    # (the whole report on failure: pytest shortens a dict's repr)
    assert report["backpressure"] >= 1, json.dumps(report)
    assert report["backpressure_slices"] >= 1, json.dumps(report)  # (8 MiB, 1 MiB/s)
    assert report["lag_ms"]["count"] >= 1 and report["lag_ms"]["worst"] > 0, json.dumps(report)


# --- --rate ------------------------------------------------------------------------------------
def test_rate_holds_the_sync(servers, vms, procs, tmp_path):
    """--rate holds the initial sync of a full disk to the rate within 10%; a new
    value in --rate-file reaches the running job."""
    from support.servers import make_image
    rng = random.Random("rate")
    image = servers.path("big.raw")
    make_image(image, 24 << 20, rng, data_fraction=1.0)
    replica = servers.path("vda.raw")
    with open(replica, "wb") as f:
        f.truncate(24 << 20)
    server = servers.new({"vda": replica})
    server.start()
    vm = vms(servers.root, {"drive0": image})
    rate = 4 << 20
    rate_file = str(tmp_path / "rate")
    proc = spawn_protect(procs, servers.root, "--qmp", vm.qmp_path, "--target", server.uri(),
                         "--control", server.control_path, "--drive", "drive0=vda",
                         "--rate", "4M", "--rate-file", rate_file, "--epochs", "2", "--json")
    rc, out, err = finished(proc, timeout=120)
    assert rc == 0, (out, err)
    sync = json.loads(out)["resyncs"][0]
    assert sync["mode"] == "full" and sync["bytes"] >= 24 << 20, sync
    measured = sync["bytes"] / sync["seconds"]
    assert 0.9 * rate <= measured <= 1.1 * rate, (measured, sync)

    # the rate file, while the sync runs
    server2_replica = servers.path("vda2.raw")
    with open(server2_replica, "wb") as f:
        f.truncate(24 << 20)
    with open(rate_file, "w") as f:
        f.write("1M\n")
    server.stop()
    os.unlink(replica)
    os.rename(server2_replica, replica)
    import shutil
    shutil.rmtree(server.state_dir)
    server.start()
    proc = spawn_protect(procs, servers.root, "--qmp", vm.qmp_path, "--target", server.uri(),
                         "--control", server.control_path, "--drive", "drive0=vda",
                         "--rate", "4M", "--rate-file", rate_file, "--epochs", "1")
    job = "nbd-mc-drive0"
    wait_until(lambda: any(j["device"] == job and j["speed"] == 1 << 20
                           for j in vm.jobs()), "the sync to run at the file's 1M")
    with open(rate_file, "w") as f:
        f.write("64M\n")
    wait_until(lambda: proc.poll() is not None or any(j["device"] == job and j["speed"] ==
                                                      64 << 20 for j in vm.jobs()),
               "the new rate to reach the job")
    rc, out, err = finished(proc, timeout=120)
    assert rc == 0, (out, err)
    assert "rate now 64.0 MiB/s" in out + err, (out, err)


# --- the real Linux guest -------------------------------------------------------------------
def test_async_demo_story_over_slow_link(links):
    """The demo's story (demo/story.py) in async mode across the emulated 20 ms
    link: the work guest writes fsync'd records on ext4, the secondary is
    restarted mid-run, the primary QEMU is killed -9 mid-epoch; after failover
    the secondary's disk equals the primary's recorded at the committed
    checkpoint (qemu-img compare) and a fresh guest finds a clean file system with
    every record intact, and none written after that checkpoint."""
    import shutil
    from demo import story as demo
    from support.servers import short_tmpdir
    workdir = short_tmpdir("nbdmc-demo-")
    try:
        lines = []
        story = demo.Story(__import__("pathlib").Path(workdir), 3, lines.append)
        start_secondary = story.start_secondary

        def start_secondary_behind_link():
            start_secondary()
            nbd = links(str(story.state / "nbd.sock"), rtt=RTT)
            ctl = links(str(story.state / "control.sock"), rtt=RTT,
                        path=os.path.join(workdir, "ctl-link.sock"))
            story.target, story.control = nbd.nbd_uri(), ctl.path
            story.protect_extra = ["--mode", "async"]
        story.start_secondary = start_secondary_behind_link
        let_it_work = story.let_it_work

        def let_it_work_until_a_record_is_committed():
            # on a loaded machine the TCG guest may not have made a record durable in
            # the story's few seconds: wait for one, and for a commit after it, so
            # the epoch failover returns to holds at least one record
            let_it_work()
            from nbd_mc.control import ControlClient
            ctl = ControlClient(str(story.state / "control.sock"))
            try:
                story._wait(lambda: story.serial_log.poll() is not None
                            and story.serial_log.last_seq >= 1, "a durable guest record",
                            story.qemu)
                c = ctl.execute("query-status")["committed"]
                story._wait(lambda: ctl.execute("query-status")["committed"] > c,
                            "a commit after it", story.qemu)
            finally:
                ctl.close()
        story.let_it_work = let_it_work_until_a_record_is_committed
        try:
            result = story.run()
        finally:
            story.cleanup()
        text = "\n".join(lines)
        assert result.ok, text
        assert result.identical and "Images are identical." in text
        check = result.check
        assert check.fsck == 0 and check.bad == 0 and check.gaps == 0 and check.minseq == 1
        assert check.records >= 1
        p = result.protect
        assert p["mode"] == "async", p
        assert p["primary_gone"] and p["committed"] == result.last_commit >= 1
        assert p["outages"] == 1 and p["resyncs"][1]["full"] is False, p["resyncs"]
        if result.last_commit == result.kill_epoch:
            assert check.maxseq < result.seq_after_commit, text
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_async_refusals(tmp_path):
    """Bad values of the new options are usage errors before anything is touched."""
    from support.servers import nbd_mc
    base = ["protect", "--qmp", str(tmp_path / "none.qmp"), "--drive", "drive0",
            "--target", "nbd://127.0.0.1:1/", "--control", str(tmp_path / "none.sock")]
    for extra, message in ((["--mode", "async", "--drive-mirror"], "--mode async needs"),
                           (["--rate", "fast"], "is not a rate"),
                           (["--max-lag", "soon"], "is not a duration"),
                           (["--mode", "later"], "Invalid value for '--mode'")):
        r = nbd_mc(*base, *extra)
        assert r.returncode == 2 and message in r.stderr, (extra, r.stderr)
