"""Failback with a checksum sync: the old primary's disk comes back as a replica.

Real QEMU (``-machine none``, the test plays the guest with HMP qemu-io, never
during a checkpoint or a resync), real nbdkit, no Pacemaker: the steps the
cluster's agents take, one by one.

1. P1 protects into S; the guest writes; P1 is killed -9 mid-epoch, with writes
   after the last checkpoint (on both disks: the mirror is write-blocking) and one
   more block written on P1's disk only -- a write in flight at the crash, which
   the write-blocking mirror had put on the source and never on the target: no
   undo file and no dirty bitmap knows it;
2. `nbd-mc failover` on S; a new primary P2 boots on S's images and writes more,
   unprotected;
3. P1's images are served again as a fresh replica (as the returning node does)
   and P2 protects into them: protect chooses the checksum sync by itself, copies
   far less than the disks and at least every byte that really differs -- the
   in-flight block included;
4. P2 is killed -9 mid-epoch, the returned node fails over: its disks are exactly
   P2's at the last acknowledged checkpoint (bytes and `qemu-img compare`).
"""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

from nbd_mc.control import ControlError
from support.reliability import record
from support.servers import describe, make_image, read_file, wait_until
from test_primary import (DEADLINE, EXPORTS, SIZES, Coordinated, assert_secondary_is,  # noqa: F401
                          committed, failover, finished, qemu_img_compare, start_protect, vms)

pytestmark = pytest.mark.qemu

DISK_BYTES = sum(SIZES.values())
IN_FLIGHT = ("drive1", 3 * (1 << 20) + 12345, 7000)  # drive, offset, length


def protect_json(procs, vm, server, root, co, *args):
    return start_protect(procs, vm, server, root, "--interval", "20ms", "--checkpoint-hook",
                         co.hook, "--json", "--stall-timeout", "2s", *args)


def play_commits(co, server, proc, n: int) -> int:
    start = committed(server)
    co.play(lambda: committed(server) >= start + n or proc.poll() is not None)
    assert proc.poll() is None, finished(proc)
    return committed(server)


def differing_bytes(a: dict[str, bytes], b: dict[str, bytes]) -> int:
    return sum(sum(x != y for x, y in zip(a[d], b[d])) for d in a)


def test_failback_checksum_sync(servers, vms, procs):
    rng = random.Random("failback")
    node1, node2 = servers.path("node1"), servers.path("node2")
    os.makedirs(node1)
    os.makedirs(node2)
    p1_images = {d: os.path.join(node1, f"{EXPORTS[d]}.raw") for d in SIZES}
    s_images = {d: os.path.join(node2, f"{EXPORTS[d]}.raw") for d in SIZES}
    for d in SIZES:
        make_image(p1_images[d], SIZES[d], rng, data_fraction=0.5)
        with open(s_images[d], "wb") as f:
            f.truncate(SIZES[d])

    # 1. P1 protects into S (an empty replica: a full sync), then dies mid-epoch
    s = servers.new({EXPORTS[d]: s_images[d] for d in SIZES},
                    state_dir=os.path.join(node2, "st"))
    s.start()
    p1 = vms(node1, p1_images, name="p1")
    co1 = Coordinated(node1, p1, rng)
    proc = protect_json(procs, p1, s, node1, co1)
    wait_until(lambda: committed(s) >= 1 or proc.poll() is not None, "the first commit")
    play_commits(co1, s, proc, 3)
    co1.play(lambda: False, ops=4)  # after the last checkpoint: mirrored, never committed
    p1.kill9()
    drive, off, length = IN_FLIGHT  # on P1's disk only (and in no bitmap, nowhere)
    fd = os.open(p1_images[drive], os.O_RDWR)
    os.pwrite(fd, bytes(rng.randrange(1, 256) for _ in range(length)), off)
    os.close(fd)
    rc, out, err = finished(proc)
    assert rc == 1 and "The primary QEMU is gone" in err, (out, err)
    assert json.loads(out)["resyncs"][0]["mode"] == "full"

    # 2. failover on S; P2 boots on S's images and writes, unprotected
    c1 = failover(s)["committed"]
    assert_secondary_is(s, co1.record(c1), {EXPORTS[d]: p for d, p in s_images.items()},
                        f"S after failover at epoch {c1}")
    r = s.cli("stop")
    assert r.returncode == 0, describe(r)
    root2 = servers.path("p2")
    os.makedirs(root2)
    p2 = vms(root2, s_images, name="p2")
    co2 = Coordinated(root2, p2, rng)
    co2.guest.burst(6)
    p1_now = {d: read_file(p) for d, p in p1_images.items()}
    assert p1_now[drive][off:off + length] != read_file(s_images[drive])[off:off + length]
    differ = differing_bytes(p1_now, {d: read_file(p) for d, p in s_images.items()})
    assert differ > length

    # 3. the returning node serves P1's old images as a fresh replica; P2 protects into it
    n1 = servers.new({EXPORTS[d]: p1_images[d] for d in SIZES},
                     state_dir=os.path.join(node1, "st2"))
    n1.start()
    proc = protect_json(procs, p2, n1, root2, co2)
    # no guest request while protect resyncs (HMP qemu-io and ending block jobs)
    wait_until(lambda: committed(n1) >= 1 or proc.poll() is not None, "the first commit",
               timeout=DEADLINE)
    # the in-flight block is gone from the returned node: P2's data is there
    assert read_file(p1_images[drive])[off:off + length] == \
        read_file(s_images[drive])[off:off + length]
    c2 = play_commits(co2, n1, proc, 3)
    co2.play(lambda: False, ops=3)

    # 4. P2 dies mid-epoch; the returned node fails over to exactly P2's last checkpoint
    p2.kill9()
    rc, out, err = finished(proc)
    assert rc == 1 and "The primary QEMU is gone" in err, (out, err)
    report = json.loads(out)
    sync = report["resyncs"][0]
    assert sync["mode"] == "checksum" and sync["full"] is False, sync
    assert sync["reason"] == ("initial sync; checksum: the secondary holds no committed "
                              "epoch yet"), sync
    assert sync["hashed_bytes"] == DISK_BYTES, sync
    # at least every byte that differed, far less than the disks
    assert differ <= sync["differing_bytes"] <= sync["bytes"] < DISK_BYTES // 2, (sync, differ)
    last = committed(n1)
    assert last >= c2 and report["committed"] == last
    result = failover(n1)
    assert result["committed"] == last
    expected = co2.record(last)
    assert_secondary_is(n1, expected, {EXPORTS[d]: p for d, p in p1_images.items()},
                        f"the returned node after failover at epoch {last}")
    for d in SIZES:
        qemu_img_compare(p1_images[d], "raw", expected[d], servers.path(f"exp-{d}.raw"))
    record("failback: checksum sync copied / disk bytes", 1, 0)
    print(f"failback: checksum sync copied {sync['bytes']} of {DISK_BYTES} bytes "
          f"({differ} really differed), {sync['seconds']} s: {sync}")


def test_checksum_range_survives_any_arguments(servers):
    """checksum-range hashes the live image (holes as null); random arguments get a
    refusal of a known class or a right answer, never a dead server."""
    rng = random.Random("checksum-range")
    image = servers.path("vda.raw")
    size = 1 << 20
    data = make_image(image, size, rng, data_fraction=0.5)
    srv = servers.new({"vda": image})
    srv.start()
    from nbd_mc import checksum
    r = srv.execute("checksum-range", disk="vda", offset=0, length=size, block=65536)
    assert len(r["blocks"]) == 16
    for i, digest in enumerate(r["blocks"]):
        chunk = data[i * 65536:(i + 1) * 65536]
        assert checksum.same(digest, checksum.block_digest(chunk), 65536), i
    values = [None, True, -1, 0, 1, 4095, 4096, 65536, size, size + 1, 2**63, 1.5, "vda",
              "", [], {}]
    classes = {}
    for _ in range(200):
        good = {"disk": "vda", "offset": rng.randrange(0, size), "block": rng.choice(
            (4096, 65536, 1 << 20)), "length": rng.randrange(1, 300000)}
        good["length"] = min(good["length"], size - good["offset"]) or 1
        args = {}
        for key in ("disk", "offset", "length", "block", "extra"):
            if rng.random() < (0.1 if key == "extra" else 0.9):
                args[key] = good.get(key) if rng.random() < 0.85 else rng.choice(values)
        try:
            r = srv.execute("checksum-range", **args)
        except ControlError as e:
            classes[e.error_class] = classes.get(e.error_class, 0) + 1
            assert e.error_class == "BadRequest", (args, e)
            continue
        block = args.get("block") or checksum.DEFAULT_BLOCK
        o, n = args["offset"], args["length"]
        want = [checksum.block_digest(data[p:min(p + block, o + n)])
                for p in range(o, o + n, block)]
        assert [checksum.same(a, b, min(block, o + n - o - i * block))
                for i, (a, b) in enumerate(zip(r["blocks"], want))] == [True] * len(want), args
        classes["ok"] = classes.get("ok", 0) + 1
    assert open(image, "rb").read() == data
    assert classes.get("BadRequest") and classes.get("ok"), classes
    srv.execute("commit", epoch=1)
    srv.execute("failover")
    with pytest.raises(ControlError) as e:
        srv.execute("checksum-range", disk="vda", offset=0, length=4096)
    assert e.value.error_class == "NotProtected"
    record("checksum-range: random arguments answered", 200, 0)


def test_checksum_sync_recopies_writes_during_the_walk(servers, vms):
    """protect's checksum sync driven step by step (resync.checksum_sync), into a
    secondary that is already protected at epoch 1 and differs in three blocks:
    exactly those blocks are found and copied; the copies are undo of the open
    epoch (``NAME@committed`` still shows epoch 1, so a failover mid-sync returns
    there); a guest write into a block the walk had already hashed is counted by
    the bitmap started before the walk and copied again; after the next commit
    the secondary is byte for byte the primary's disk at that checkpoint."""
    from nbd_mc import primary
    from nbd_mc.primary import resync
    from nbd_mc.primary.bitmaps import Bitmaps, source_nodes
    from nbd_mc.primary.ranges import RangeWriter
    from nbd_mc.primary.source import PrimarySource
    from nbd_mc.control import ControlClient
    rng = random.Random("walk-writes")
    images, replicas = {}, {}
    differ = [("drive0", 5 * 65536 + 100, 3000), ("drive0", 100 * 65536, 65536),
              ("drive1", 33 * 65536 + 65000, 500)]
    for d in SIZES:
        images[d] = servers.path(f"{d}.raw")
        data = bytearray(make_image(images[d], SIZES[d], rng, data_fraction=0.6))
        for drive, off, length in differ:
            if drive == d:
                data[off:off + length] = bytes(b ^ 0xA5 for b in data[off:off + length])
        replicas[EXPORTS[d]] = servers.path(f"{EXPORTS[d]}.raw")
        with open(replicas[EXPORTS[d]], "wb") as f:
            f.write(data)
    old = {EXPORTS[d]: read_file(p) for d, p in zip(SIZES, replicas.values())}
    server = servers.new(replicas)
    server.start()
    server.execute("commit", epoch=1)  # the replica's state is consistent at epoch 1
    vm = vms(servers.root, images)
    drives = [primary.DriveSpec(d, EXPORTS[d]) for d in SIZES]
    ctl = ControlClient(server.control_path, timeout=60)
    status = primary.secondary_status(ctl)
    qmp = primary.Qmp(vm.qmp_path)
    sizes = primary.check_drives(qmp, drives)
    bitmaps = Bitmaps(qmp, drives, source_nodes(qmp, drives))
    bitmaps.group = status["group_id"]
    ctl, writer_drives = primary.claim_writer(ctl, drives)
    primary.attach(qmp, primary.parse_nbd_uri(server.uri()), writer_drives)
    source = PrimarySource.raw_files(images)
    writer = RangeWriter(primary.parse_nbd_uri(server.uri()), writer_drives, source)
    raced = (1 << 20, 65536)  # in drive0's first chunk: hashed before the write

    def progress(done, total):
        if done == resync.WALK_CHUNK:
            # the walk copied drive0's differing blocks of chunk 0: undo, not committed
            h = server.connect("vda@committed")
            assert h.pread(65536, 5 * 65536) == old["vda"][5 * 65536:6 * 65536]
            assert read_file(replicas["vda"])[5 * 65536:6 * 65536] == \
                read_file(images["drive0"])[5 * 65536:6 * 65536]
            vm.qemu_io("drive0", f"write -P 77 {raced[0]} {raced[1]}")
    try:
        side = primary.PrimarySide(qmp, drives, bitmaps)
        # (with a --rate: the walk's copies paced, the rounds' jobs limited; a rate
        # high enough that the pacing takes no noticeable time)
        r, mirrors = resync.checksum_sync(side, ctl, writer, sizes, 1, progress,
                                          rate=lambda: 256 << 20)
        assert r.mode == "checksum" and r.hashed == sum(SIZES.values())
        blocks = {(d, o // 65536) for d, off, n in differ for o in (off, off + n - 1)}
        assert r.differing == len(blocks) * 65536, (r, blocks)
        assert r.dirty == raced[1]  # the write during the walk, and nothing else
        assert r.bytes >= r.differing + raced[1]
        recorded = {}
        cp = primary.checkpoint(primary.PrimarySide(qmp, drives), ctl, mirrors, 2,
                                hook=lambda epoch: recorded.update(vm.record()))
        assert cp.committed, cp
        for d in SIZES:
            assert read_file(replicas[EXPORTS[d]]) == recorded[d], d
        assert recorded["drive0"][raced[0]:raced[0] + raced[1]] == bytes([77]) * raced[1]
        assert not [b for bm in bitmaps.listing().values() for b in bm if "checksum" in b]
        primary.detach(qmp, mirrors)
    finally:
        writer.close()
        source.close()
        qmp.close()
        ctl.close()


def test_resync_option_chooses(servers, vms, procs):
    """--resync: auto takes the checksum sync for a replica holding data (and the
    full sync for an empty one, see the failback test), full and checksum force
    it; a qcow2 drive is hashed through QEMU's read-only NBD export (a replica
    with near data gets exactly the differing blocks); when QEMU already runs an
    NBD server nbd-mc did not start, checksum is refused up front."""
    from support.servers import nbd_mc
    rng = random.Random("resync-option")
    images, replicas = {}, {}
    for d in SIZES:
        images[d] = servers.path(f"{d}.raw")
        make_image(images[d], SIZES[d], rng, data_fraction=0.5)
        replicas[EXPORTS[d]] = servers.path(f"{EXPORTS[d]}.raw")
        make_image(replicas[EXPORTS[d]], SIZES[d], rng, data_fraction=0.2)
    server = servers.new(replicas)
    server.start()
    vm = None
    cases = (((), "checksum", "the secondary holds no committed epoch yet"),
             (("--resync", "full"), "full", "no dirty bitmap of group"),
             (("--resync", "checksum"), "checksum", "no dirty bitmap of group"),
             ((), "bitmap", None))  # the same QEMU again: its bitmaps cover the commit
    for i, (option, mode, why) in enumerate(cases):
        if why is not None:  # a new QEMU has no bitmaps
            if vm is not None:
                vm.quit()
            vm = vms(servers.root, images, name=f"vm{i}")
        proc = start_protect(procs, vm, server, servers.root, "--interval", "20ms",
                             "--epochs", "1", "--json", *option)
        rc, out, err = finished(proc)
        assert rc == 0, (out, err)
        sync = json.loads(out)["resyncs"][0]
        assert sync["mode"] == mode, sync
        if why:
            assert sync["reason"].startswith(f"initial sync; {mode}: {why}"), sync
    qcow2 = servers.path("q.qcow2")
    r = subprocess.run(["qemu-img", "convert", "-O", "qcow2", images["drive1"], qcow2],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    vm.quit()
    # the replica of the qcow2 drive holds near data (a failback): 3 blocks differ
    near = bytearray(read_file(images["drive1"]))
    for off in (0, 17 * 65536 + 5, 40 * 65536 - 3):
        near[off:off + 100] = bytes(b ^ 0x3C for b in near[off:off + 100])
    server.cli("stop")
    with open(replicas["vdb"], "wb") as f:
        f.write(near)
    server = servers.new(replicas, state_dir=servers.path("st-qcow2"))
    server.start()
    vm = vms(servers.root, {"drive0": images["drive0"], "drive1": qcow2}, name="qcow2",
             drive_args={"drive1": f"if=none,id=drive1,file={qcow2},format=qcow2"})
    proc = start_protect(procs, vm, server, servers.root, "--interval", "20ms", "--epochs", "1",
                         "--json")
    rc, out, err = finished(proc)
    assert rc == 0, (out, err)
    sync = json.loads(out)["resyncs"][0]
    # a qcow2 drive is hashed through QEMU's read-only NBD export: no fallback to full
    assert sync["mode"] == "checksum", sync
    assert sync["hashed_bytes"] == DISK_BYTES, sync
    # drive0 was already in step (the runs above); vdb: 3 blocks of 64 KiB (one
    # change straddles two blocks: 4), nothing else
    assert 3 * 65536 <= sync["differing_bytes"] <= 4 * 65536, sync
    assert read_file(replicas["vdb"]) == read_file(images["drive1"])
    assert read_file(replicas["vda"]) == read_file(images["drive0"])
    assert vm.qmp.cmd("query-block-exports") == []  # protect removed its export
    # an NBD server someone else started: QEMU 7.2 cannot say where it listens, so
    # the qcow2 drive cannot be read; auto falls back to full and says why,
    # checksum is refused up front
    vm.qmp.cmd("nbd-server-start", addr={"type": "unix",
                                         "data": {"path": servers.path("theirs.sock")}})
    server.cli("stop")  # a fresh group again: no dirty bitmap covers it
    server = servers.new(replicas, state_dir=servers.path("st-qcow2-b"))
    server.start()
    base = ["--qmp", vm.qmp_path, "--drive", "drive0=vda", "--drive", "drive1=vdb",
            "--target", server.uri(), "--control", server.control_path, "--epochs", "1"]
    r = nbd_mc("protect", *base, "--interval", "20ms")
    assert r.returncode == 0, describe(r)
    assert "no checksum sync: the primary's drives cannot be read: QEMU already runs an NBD " \
           "server that nbd-mc did not start" in r.stdout + r.stderr, describe(r)
    r = nbd_mc("protect", "--qmp", vm.qmp_path, "--drive", "drive0=vda", "--drive", "drive1=vdb",
               "--target", server.uri(), "--control", server.control_path, "--resync",
               "checksum", "--epochs", "1")
    assert r.returncode == 1, describe(r)
    assert "--resync checksum: the primary's drives cannot be read: QEMU already runs an NBD " \
           "server that nbd-mc did not start" in r.stderr, describe(r)
    assert "Traceback" not in r.stderr
    assert vm.qmp.cmd("query-block-exports") == []  # the refused attempt left nothing
