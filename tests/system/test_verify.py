"""Online verify: the secondary's committed state is compared with the primary's disk
at the same checkpoint, over the whole disk, while protection runs -- and a sector
corrupted behind the server's back is reported as exactly that range.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time

import shutil
import subprocess

import pytest

from nbd_mc import primary, verify
from nbd_mc.primary import verify as primary_verify
from nbd_mc.control import ControlClient, ControlError
from nbd_mc.primary.ranges import RangeWriter
from nbd_mc.primary.repair import Repairs
from nbd_mc.primary.source import NbdExport, PrimarySource, RawFile
from support.reliability import record
from support.servers import describe, make_image, nbd_mc


MiB = 1 << 20
SIZES = {"drive0": 6 * MiB, "drive1": 3 * MiB}
EXPORTS = {"drive0": "vda", "drive1": "vdb"}


def make_pair(servers, qemu_vms, seed):
    rng = random.Random(seed)
    images, replicas = {}, {}
    for d, size in SIZES.items():
        images[d] = servers.path(f"{d}.raw")
        make_image(images[d], size, rng, data_fraction=0.5)
        replicas[EXPORTS[d]] = servers.path(f"{EXPORTS[d]}.raw")
        with open(replicas[EXPORTS[d]], "wb") as f:
            f.truncate(size)
    server = servers.new(replicas)
    server.start()
    return qemu_vms(servers.root, images), server


def corrupt_sector(path: str, offset: int) -> None:
    """Write one sector of the replica image directly, behind the server's back."""
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, 512, offset)
        os.pwrite(fd, bytes(b ^ 0x5A for b in old), offset)
    finally:
        os.close(fd)


# --- the secondary's half: verify-range ----------------------------------------------------
def test_verify_range_hashes_the_committed_view(servers):
    rng = random.Random(1)
    images = {d: servers.path(f"{d}.raw") for d in ("vda", "vdb")}
    initial = {d: make_image(p, 2 * MiB, rng) for d, p in images.items()}
    srv = servers.new(images)
    srv.start()
    with pytest.raises(ControlError) as e:  # nothing committed yet
        srv.execute("verify-range", disk="vda", offset=0, length=MiB, epoch=0)
    assert e.value.error_class == "NotProtected"
    srv.execute("commit", epoch=1)
    h = srv.connect("vda")
    h.pwrite(b"\x77" * 100000, 5000)  # the open epoch: not in the committed view
    r = srv.execute("verify-range", disk="vda", offset=4096, length=MiB, epoch=1)
    want = hashlib.blake2b(initial["vda"][4096:4096 + MiB], digest_size=32).hexdigest()
    assert r["digest"] == want and r["epoch"] == 1
    r = srv.execute("verify-range", disk="vda", offset=0, length=4096, epoch=1, block=512)
    assert r["blocks"] == verify.block_digests(initial["vda"][:4096], 512)
    with pytest.raises(ControlError) as e:
        srv.execute("verify-range", disk="vda", offset=0, length=4096, epoch=2)
    assert e.value.error_class == "EpochMismatch"
    for bad in ({"disk": "nope"}, {"offset": -1}, {"length": 0}, {"length": 2 * MiB + 1},
                {"offset": 2 * MiB}, {"length": verify.MAX_LENGTH + 512}, {"block": 1000},
                {"block": 256}, {"epoch": "1"}, {"offset": True}):
        args = {"disk": "vda", "offset": 0, "length": 4096, "epoch": 1, **bad}
        with pytest.raises(ControlError) as e:
            srv.execute("verify-range", **args)
        assert e.value.error_class == "BadRequest", (bad, e.value)
    with pytest.raises(ControlError) as e:
        srv.execute("verify-range", disk="vda", offset=0, length=4096, epoch=1, bogus=1)
    assert e.value.error_class == "BadRequest"
    # the server lives on and nothing changed
    assert srv.execute("query-status")["committed"] == 1
    srv.execute("failover")
    with pytest.raises(ControlError) as e:
        srv.execute("verify-range", disk="vda", offset=0, length=4096, epoch=1)
    assert e.value.error_class == "NotProtected"


# --- both halves: protect's walk, with a guest writing between checkpoints ---------------------
SOAK = float(os.environ.get("NBD_MC_SOAK_SECONDS") or 0)


class Walk:
    """protect's steps driven by the test (so the guest writes only between
    checkpoints: HMP qemu-io, unlike a guest, also writes while the VM is stopped)."""

    def __init__(self, vm, server, slice_size=MiB, repair=False, model=None,
                 prefer_export=False):
        """``model``: {drive: bytearray} kept up to date with the guest's writes;
        ``prefer_export``: read even raw drives through QEMU's NBD export."""
        self.vm = vm
        self.model = model
        self.ctl = ControlClient(server.control_path, timeout=60)
        drives = [primary.DriveSpec(d, EXPORTS[d]) for d in SIZES]
        self.epoch = primary.first_epoch(primary.secondary_status(self.ctl), drives)
        self.qmp = primary.Qmp(vm.qmp_path)
        sizes = primary.check_drives(self.qmp, drives)
        self.said = []
        self.source = PrimarySource.open(self.qmp, drives, "test:" + vm.qmp_path,
                                         prefer_export=prefer_export)
        self.v = primary_verify.Verifier(
            primary_verify.targets_for(drives, sizes, self.source), self.source,
            slice_size, say=self.said.append)
        self.ctl, drives = primary.claim_writer(self.ctl, drives)
        self.mirrors = primary.Mirrors(self.qmp, drives)
        primary.attach(self.qmp, primary.parse_nbd_uri(server.uri()), drives)
        primary.start_mirrors(self.qmp, drives)
        assert self.mirrors.wait_ready()
        self.hook = self.v.hook()
        self.repairs = self.writer = None
        self.before_commit = None  # a callable(epoch) run last in the checkpoint's pause
        if repair:  # protect's wiring: verify finds, the next checkpoint copies
            self.writer = RangeWriter(primary.parse_nbd_uri(server.uri()), drives,
                                      self.source)
            self.repairs = Repairs(self.v.stats, self.said.append)
            self.v.repair = self.repairs.queue

    def guest(self, rng) -> None:
        for _ in range(rng.randrange(0, 4)):
            drive = rng.choice(sorted(SIZES))
            length = rng.choice((512, 4096, 65536, 300000))
            off = rng.randrange(0, SIZES[drive] - length) & ~511
            pattern = rng.randrange(256)
            self.vm.qemu_io(drive, f"write -P {pattern} {off} {length}")
            if self.model is not None:
                self.model[drive][off:off + length] = bytes([pattern]) * length

    def checkpoint(self) -> None:
        def hook(epoch):
            self.hook(epoch)
            if self.repairs:
                self.repairs.at_checkpoint(self.writer, epoch)
            if self.before_commit:
                self.before_commit(epoch)
        cp = primary.checkpoint(primary.PrimarySide(self.qmp, self.mirrors.drives), self.ctl,
                                self.mirrors, self.epoch, hook)
        assert cp.committed, cp
        if self.repairs:
            self.repairs.after_commit(self.ctl, self.epoch)
        self.v.after_commit(self.ctl, self.epoch)
        self.epoch += 1

    def passes(self, n: int, rng=None) -> None:
        """Checkpoint until ``n`` more whole passes are done (guest writes if rng)."""
        until = self.v.stats.passes + n
        while self.v.stats.passes < until:
            if rng:
                self.guest(rng)
            self.checkpoint()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        primary.detach(self.qmp, self.mirrors)
        assert self.source.close() == []
        self.qmp.close()
        self.ctl.close()
        self.v.close()


@pytest.mark.qemu
@pytest.mark.timeout(int(SOAK * 1.5) + 300 if SOAK else 300)
def test_walk_finds_exactly_the_corrupted_sectors(servers, qemu_vms):
    """Whole passes with random guest writes find nothing; then sectors of the
    replica are corrupted on disk and the next pass reports exactly them; put back,
    the pass after finds nothing again.  `make soak` repeats that for SOAK seconds."""
    vm, server = make_pair(servers, qemu_vms, "walk")
    rng = random.Random("walk")
    w = Walk(vm, server)
    rounds = 0
    deadline = time.monotonic() + SOAK
    try:
        w.passes(2, rng)
        assert w.v.stats.mismatches == [], w.v.stats.mismatches
        assert w.v.stats.verified_bytes == 2 * sum(SIZES.values())
        assert any("pass 1 complete" in line for line in w.said), w.said
        assert any("ETA" in line for line in w.said), w.said
        while True:
            # 1 sector in the short run; in the soak 1-6 sectors, never adjacent
            count = rng.randrange(1, 7) if SOAK else 1
            bad = set()
            while len(bad) < count:
                disk = rng.choice(("vda", "vdb"))
                off = rng.randrange(0, SIZES[{"vda": "drive0", "vdb": "drive1"}[disk]], 1024)
                if not any(d == disk and abs(o - off) < 1024 for d, o in bad):
                    bad.add((disk, off))
            if not SOAK:
                bad = {("vdb", 2 * MiB + 7 * 512)}
            for disk, off in bad:
                corrupt_sector(server.image(disk), off)
            seen = len(w.v.stats.mismatches)
            w.passes(1)  # no guest writes: they could overwrite a corrupted sector
            found = {(m.disk, m.offset, m.length) for m in w.v.stats.mismatches[seen:]}
            assert found == {(d, o, 512) for d, o in bad}, (found, bad)
            assert len(w.v.stats.mismatches) - seen == len(bad)
            for disk, off in bad:  # put the sectors back (the xor undoes itself)
                corrupt_sector(server.image(disk), off)
            seen = len(w.v.stats.mismatches)
            w.passes(1, rng)
            assert len(w.v.stats.mismatches) == seen, w.v.stats.mismatches[seen:]
            rounds += 1
            record("verify: sectors corrupted behind the server's back, found exactly",
                   len(bad), 0, part=rounds)  # one row per round, added up in the report
            if time.monotonic() >= deadline:
                break
        if not SOAK:
            assert any("MISMATCH vdb offset %d length 512" % (2 * MiB + 7 * 512) in line
                       for line in w.said), w.said
    finally:
        w.close()
    stats = w.v.stats.as_dict(w.v.slice_size)
    print(f"verify: {rounds} rounds; stats: {json.dumps({k: v for k, v in stats.items() if k != 'mismatches'})}",
          file=sys.stderr)


@pytest.mark.qemu
def test_corrupted_sector_is_repaired(servers, qemu_vms):
    """A sector corrupted behind the server's back is reported as exactly that range,
    copied from the primary at the next checkpoint (targeted repair), found equal
    again at that epoch; a later pass with guest writes finds nothing, and the
    secondary fails over to exactly the primary's disk at the last checkpoint."""
    vm, server = make_pair(servers, qemu_vms, "repair")
    rng = random.Random("repair")
    w = Walk(vm, server, repair=True)
    bad = 2 * MiB + 7 * 512
    try:
        w.passes(1, rng)
        assert w.v.stats.mismatches == [] and w.v.stats.repaired == []
        corrupt_sector(server.image("vdb"), bad)
        w.passes(1)  # no guest writes: one could overwrite the sector and hide it
        assert [m.as_dict() for m in w.v.stats.mismatches] == [
            {"disk": "vdb", "offset": bad, "length": 512, "epoch": w.v.stats.mismatches[0].epoch}]
        found = w.v.stats.mismatches[0].epoch
        while w.repairs.busy:  # (the slice of vdb is not the last one: already done)
            w.checkpoint()
        assert [m.as_dict() for m in w.v.stats.repaired] == [
            {"disk": "vdb", "offset": bad, "length": 512, "epoch": found + 1}]
        assert any(f"REPAIRED vdb offset {bad} length 512 (found at epoch {found}, committed "
                   f"at epoch {found + 1})" in line for line in w.said), w.said
        w.passes(1, rng)  # guest writes go on; the whole pass finds nothing
        assert len(w.v.stats.mismatches) == 1, w.v.stats.mismatches
        stats = w.v.stats.as_dict(w.v.slice_size)
        assert stats["repaired"] == {"ranges": [{"disk": "vdb", "offset": bad, "length": 512,
                                                 "epoch": found + 1}], "bytes": 512}
        # the last checkpoint: keep the primary's disks as they are at that epoch
        evidence = servers.path("evidence")
        os.makedirs(evidence)
        w.before_commit = lambda epoch: [shutil.copyfile(vm.images[d],
                                                         os.path.join(evidence, EXPORTS[d]))
                                         for d in SIZES]
        w.checkpoint()
        last = w.epoch - 1
    finally:
        w.close()
    w.guest(random.Random(0))  # after the last commit: the failover must not show it
    w.vm.qemu_io("drive1", f"write -P 99 {bad - 4096} 65536")
    r = server.cli("failover", "--json")
    assert r.returncode == 0, describe(r)
    assert json.loads(r.stdout)["committed"] == last
    for disk in ("vda", "vdb"):
        c = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                            server.image(disk), os.path.join(evidence, disk)],
                           capture_output=True, text=True)
        assert c.returncode == 0, (disk, c.stdout, c.stderr)


# --- the command line: nbd-mc verify, nbd-mc protect --verify ------------------------------------
@pytest.mark.qemu
def test_nbd_mc_verify_cli(servers, qemu_vms):
    vm, server = make_pair(servers, qemu_vms, "cli")
    args = ["--qmp", vm.qmp_path, "--drive", "drive0=vda", "--drive", "drive1=vdb",
            "--target", server.uri(), "--control", server.control_path, "--interval", "10ms",
            "--verify-slice", "1M"]
    r = nbd_mc("verify", *args, "--json")
    assert r.returncode == 0, describe(r)
    rep = json.loads(r.stdout)["verify"]
    assert rep["passes"] == 1 and rep["mismatches"] == [] and rep["refused"] == 0, rep
    assert rep["verified_bytes"] == sum(SIZES.values())
    # corrupt a sector from the checkpoint hook (the VM is stopped, the mirror drained:
    # the full sync of this run is over, so nothing rewrites it before the walk)
    bad = 5 * MiB + 3 * 512
    hook = (f"[ \"$NBD_MC_EPOCH\" = {server.execute('query-status')['committed'] + 1} ] && "
            f"{sys.executable} -c 'import os; fd = os.open(\"{server.image('vda')}\", os.O_RDWR); "
            f"os.pwrite(fd, bytes(512), {bad}) if os.pread(fd, 512, {bad}) != bytes(512) else "
            f"os.pwrite(fd, b\"x\" * 512, {bad})' || true")
    r = nbd_mc("verify", *args, "--checkpoint-hook", hook)
    assert r.returncode == 1, describe(r)
    assert f"MISMATCH vda offset {bad} length 512" in r.stdout, describe(r)
    assert "1 range(s) differ" in r.stderr, describe(r)
    # --repair: the same range reported, copied at the next checkpoint, checked again
    r = nbd_mc("verify", *args, "--repair", "--json")
    assert r.returncode == 0, describe(r)
    rep = json.loads(r.stdout)["verify"]
    assert [(m["disk"], m["offset"], m["length"]) for m in rep["mismatches"]] == \
        [("vda", bad, 512)], rep
    assert [(m["disk"], m["offset"], m["length"]) for m in rep["repaired"]["ranges"]] == \
        [("vda", bad, 512)] and rep["repaired"]["bytes"] == 512, rep
    assert rep["repair_pending"] == [], rep
    r = nbd_mc("verify", *args, "--json")  # a pass after it finds nothing
    assert r.returncode == 0, describe(r)
    assert json.loads(r.stdout)["verify"]["mismatches"] == []
    # protect --verify keeps protecting and verifying; --epochs ends it
    r = nbd_mc("protect", *args, "--verify", "--epochs", "3", "--json")
    assert r.returncode == 0, describe(r)
    rep = json.loads(r.stdout)["verify"]
    assert rep["slices"] == 3 and rep["capture_ms"]["per_mib"] is not None, rep
    # a slice that is not whole sectors: one clear line, nothing attached
    r = nbd_mc("verify", *args, "--verify-slice", "1000")
    assert r.returncode == 1 and "cannot verify" in r.stderr, describe(r)
    assert "Traceback" not in r.stderr


def test_verify_range_survives_any_arguments(servers):
    """Random argument values and types: a refusal of a known class or a right
    answer, never a dead server or a changed disk."""
    rng = random.Random(12)
    image = servers.path("vda.raw")
    data = make_image(image, 1 * MiB, rng)
    srv = servers.new({"vda": image})
    srv.start()
    srv.execute("commit", epoch=1)
    values = [None, True, False, -1, 0, 1, 511, 512, 4096, MiB, MiB + 1, 2**63, 2**70, 1.5,
              "vda", "", "1", [], {}, [1], {"a": 1}]
    classes = {}
    for _ in range(300):
        good = {"disk": "vda", "offset": rng.randrange(0, MiB), "epoch": 1,
                "length": rng.randrange(1, 70000), "block": rng.choice((512, 4096, 1 << 20))}
        good["length"] = min(good["length"], MiB - good["offset"]) or 1
        args = {}
        for key in ("disk", "offset", "length", "epoch", "block", "extra"):
            if rng.random() < (0.1 if key in ("extra", "block") else 0.95):
                args[key] = good.get(key) if rng.random() < 0.85 else rng.choice(values)
        try:
            r = srv.execute("verify-range", **args)
        except ControlError as e:
            classes[e.error_class] = classes.get(e.error_class, 0) + 1
            assert e.error_class in ("BadRequest", "EpochMismatch"), (args, e)
            continue
        want = data[args["offset"]:args["offset"] + args["length"]]
        assert r["digest"] == hashlib.blake2b(want, digest_size=32).hexdigest(), args
        classes["ok"] = classes.get("ok", 0) + 1
    assert srv.execute("query-status")["committed"] == 1
    assert open(image, "rb").read() == data
    assert classes.get("BadRequest") and classes.get("ok"), classes
    record("verify-range: random arguments answered", 300, 0)


# --- a drive that is no local raw file: read through QEMU's own NBD export ------------------
def make_qcow2_pair(servers, qemu_vms, seed):
    """drive0 is a qcow2 image (the libvirt norm), drive1 raw; empty replicas.
    Returns the VM, the server, the qcow2 path and the model of both drives."""
    rng = random.Random(seed)
    images, replicas, model = {}, {}, {}
    for d, size in SIZES.items():
        images[d] = servers.path(f"{d}.raw")
        model[d] = bytearray(make_image(images[d], size, rng, data_fraction=0.5))
        replicas[EXPORTS[d]] = servers.path(f"{EXPORTS[d]}.raw")
        with open(replicas[EXPORTS[d]], "wb") as f:
            f.truncate(size)
    qcow2 = servers.path("drive0.qcow2")
    r = subprocess.run(["qemu-img", "convert", "-O", "qcow2", images["drive0"], qcow2],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    images["drive0"] = qcow2
    server = servers.new(replicas)
    server.start()
    vm = qemu_vms(servers.root, images,
                  drive_args={"drive0": f"if=none,id=drive0,file={qcow2},format=qcow2"})
    return vm, server, qcow2, model


@pytest.mark.qemu
def test_qcow2_drive_verified_and_repaired_through_qemu_export(servers, qemu_vms):
    """A qcow2 primary drive is read through QEMU's read-only NBD export (the raw one
    still from its file): whole passes with guest writes find nothing; a sector of
    its replica corrupted behind the server's back is reported as exactly that range
    and repaired from the export at the next checkpoint; the failover shows exactly
    the primary's disk at the last checkpoint (the model, and `qemu-img compare`
    with the qcow2 file); the export and QEMU's NBD server are gone afterwards."""
    vm, server, qcow2, model = make_qcow2_pair(servers, qemu_vms, "qcow2")
    rng = random.Random("qcow2")
    w = Walk(vm, server, repair=True, model=model)
    bad = 4 * MiB + 11 * 512  # in vda, the qcow2 drive's replica
    try:
        assert isinstance(w.source["drive0"], NbdExport), w.source.describe()
        assert isinstance(w.source["drive1"], RawFile), w.source.describe()
        exports = w.qmp.cmd("query-block-exports")
        assert [(e["type"], e["id"].startswith("nbd-mc.")) for e in exports] == [("nbd", True)]
        w.passes(1, rng)
        assert w.v.stats.mismatches == [], w.v.stats.mismatches
        corrupt_sector(server.image("vda"), bad)
        w.passes(1)  # no guest writes: one could overwrite the sector and hide it
        assert [(m.disk, m.offset, m.length) for m in w.v.stats.mismatches] == \
            [("vda", bad, 512)], w.v.stats.mismatches
        found = w.v.stats.mismatches[0].epoch
        while w.repairs.busy:
            w.checkpoint()
        assert [m.as_dict() for m in w.v.stats.repaired] == [
            {"disk": "vda", "offset": bad, "length": 512, "epoch": found + 1}]
        w.passes(1, rng)
        assert len(w.v.stats.mismatches) == 1, w.v.stats.mismatches
        w.checkpoint()
        last = w.epoch - 1
    finally:
        w.close()
    assert vm.qmp.cmd("query-block-exports") == []
    with pytest.raises(primary.QmpCommandError):  # QEMU's NBD server was stopped too
        vm.qmp.cmd("nbd-server-stop")
    assert not os.path.exists(w.source.socket)
    r = server.cli("failover", "--json")
    assert r.returncode == 0, describe(r)
    assert json.loads(r.stdout)["committed"] == last
    for d in SIZES:
        assert open(server.image(EXPORTS[d]), "rb").read() == bytes(model[d]), d
    vm.qemu_io("drive0", "flush")  # qcow2 metadata to the file, for qemu-img
    c = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", qcow2,
                        server.image("vda")], capture_output=True, text=True)
    assert c.returncode == 0, (c.stdout, c.stderr)


@pytest.mark.qemu
def test_nbd_mc_verify_cli_qcow2(servers, qemu_vms):
    """`nbd-mc verify` on a qcow2 drive: no refusal, one clean pass read through
    QEMU's export (it says so), and nothing of ours left in QEMU afterwards."""
    vm, server, qcow2, model = make_qcow2_pair(servers, qemu_vms, "cli-qcow2")
    args = ["--qmp", vm.qmp_path, "--drive", "drive0=vda", "--drive", "drive1=vdb",
            "--target", server.uri(), "--control", server.control_path, "--interval", "10ms",
            "--verify-slice", "2M"]
    r = nbd_mc("verify", *args, "--json")
    assert r.returncode == 0, describe(r)
    rep = json.loads(r.stdout)
    assert rep["verify"]["passes"] == 1 and rep["verify"]["mismatches"] == [], rep["verify"]
    assert rep["verify"]["verified_bytes"] == sum(SIZES.values())
    assert rep["problems"] == [], rep["problems"]
    r = nbd_mc("verify", *args)  # the console says where it reads from
    assert r.returncode == 0, describe(r)
    assert "reading drive0 through QEMU's read-only NBD export" in r.stdout + r.stderr, \
        describe(r)
    assert vm.qmp.cmd("query-block-exports") == []
    assert vm.qmp.cmd("query-block-jobs") == []


@pytest.mark.qemu
def test_export_left_by_a_killed_protect_is_reused_then_removed(servers, qemu_vms, procs):
    """protect --verify on a qcow2 drive, killed -9: QEMU keeps our NBD server and
    export.  The next run recognises the server on its own socket, replaces the
    leftover export, verifies a whole pass and leaves nothing behind."""
    from support.protect_proc import finished, spawn_protect
    from support.servers import wait_until
    vm, server, qcow2, model = make_qcow2_pair(servers, qemu_vms, "leftover")
    args = ["--qmp", vm.qmp_path, "--drive", "drive0=vda", "--drive", "drive1=vdb",
            "--target", server.uri(), "--control", server.control_path, "--interval", "10ms",
            "--verify-slice", "1M"]
    proc = spawn_protect(procs, servers.root, *args, "--verify")
    wait_until(lambda: server.execute("query-status")["committed"] >= 3
               or proc.poll() is not None, "three commits")
    proc.kill()
    rc, out, err = finished(proc)
    assert rc == -9, (out, err)
    left = [e["id"] for e in vm.qmp.cmd("query-block-exports")]
    assert len(left) == 1 and left[0].startswith("nbd-mc."), left
    r = nbd_mc("verify", *args, "--json")
    assert r.returncode == 0, describe(r)
    rep = json.loads(r.stdout)
    assert rep["verify"]["passes"] == 1 and rep["verify"]["mismatches"] == [], rep["verify"]
    assert rep["problems"] == [], rep["problems"]
    assert vm.qmp.cmd("query-block-exports") == []
    with pytest.raises(primary.QmpCommandError):  # the server was ours: stopped too
        vm.qmp.cmd("nbd-server-stop")


@pytest.mark.qemu
def test_export_socket_of_a_qemu_running_as_another_user(servers, qemu_vms):
    """QEMU running as libvirt-qemu (as libvirt runs it) must create the NBD socket:
    its directory is given to QEMU's user (found from the owner of its QMP socket),
    we connect as root, and read exactly the qcow2 drive's contents, holes reported
    as such; without knowing QEMU's user the socket cannot be made, and the refusal
    says so.  Closing removes the export, the server, the socket and its directory."""
    import pwd
    from nbd_mc.primary.source import SourceUnavailable, qemu_owner_of_socket
    user = pwd.getpwnam("libvirt-qemu")
    os.chmod(servers.root, 0o711)  # QEMU's user may pass through (not list) the test root
    home = servers.path("qemu-home")
    os.makedirs(home)
    rng = random.Random("user")
    raw = os.path.join(home, "d.raw")
    data = make_image(raw, 4 * MiB, rng, data_fraction=0.3)
    qcow2 = os.path.join(home, "d.qcow2")
    r = subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow2],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for path in (home, qcow2):
        os.chown(path, user.pw_uid, user.pw_gid)
    vm = qemu_vms(home, {"drive0": qcow2}, user="libvirt-qemu",
                  drive_args={"drive0": f"if=none,id=drive0,file={qcow2},format=qcow2"})
    drives = [primary.DriveSpec("drive0", "vda")]
    owner = qemu_owner_of_socket(vm.qmp_path)
    assert owner == (user.pw_uid, user.pw_gid)
    qmp = primary.Qmp(vm.qmp_path)
    try:
        with pytest.raises(SourceUnavailable) as e:  # a root-only directory: no socket
            PrimarySource.open(qmp, drives, "user-test-" + home, None)
        assert "QEMU cannot start its NBD server" in e.value.desc, e.value.desc
        assert qmp.cmd("query-block-exports") == []
        src = PrimarySource.open(qmp, drives, "user-test-" + home, owner)
        try:
            st = os.stat(os.path.dirname(src.socket))
            assert (st.st_uid, st.st_mode & 0o777) == (user.pw_uid, 0o700)
            assert isinstance(src["drive0"], NbdExport)
            assert bytes(src.read("drive0", 0, len(data))) == data
            runs = src.extents("drive0", 0, len(data))
            assert sum(n for _, n, _ in runs) == len(data)
            for start, n, is_data in runs:
                if not is_data:
                    assert data[start:start + n] == bytes(n), (start, n)
            assert any(not d for _, _, d in runs)
        finally:
            assert src.close() == []
        assert qmp.cmd("query-block-exports") == []
        assert not os.path.exists(os.path.dirname(src.socket))
    finally:
        qmp.close()


@pytest.mark.qemu
def test_export_lost_behind_protects_back_skips_a_slice_not_protection(servers, qemu_vms):
    """QEMU's export of the qcow2 drive removed behind protect's back: the capture
    fails, the checkpoint still commits, the failure is counted and said; once the
    export is back (same name) the same slice is verified at the next checkpoint."""
    vm, server, qcow2, model = make_qcow2_pair(servers, qemu_vms, "lost-export")
    w = Walk(vm, server)
    try:
        w.checkpoint()  # drive0's first slice, through the export
        assert w.v.stats.slices == 1 and w.v.stats.unread == 0
        export = w.source["drive0"]
        vm.qmp.cmd("block-export-del", id=export.export, mode="hard")
        w.checkpoint()
        w.checkpoint()
        assert w.v.stats.unread == 2 and w.v.stats.slices == 1, w.v.stats
        assert w.v.progress()[0] == MiB  # still at drive0's second slice
        assert sum("not read (1 time(s) so far)" in line for line in w.said) == 1, w.said
        vm.qmp.cmd("block-export-add", type="nbd", id=export.export, name=export.export,
                   writable=False, **{"node-name": export.node})
        w.passes(1)
        assert w.v.stats.unread == 2 and w.v.stats.mismatches == [], w.v.stats
        assert w.v.stats.verified_bytes == sum(SIZES.values())
    finally:
        w.close()
