"""Workload 11: resync after an outage of the secondary, against a full resync.

    .venv/bin/python -m bench.resync [--size 1G] [--hot 64M] [--outage 10] [--work DIR]

A real QEMU (-machine none) with a SIZE raw disk full of data, `nbd-mc serve` as
the secondary and the real `nbd-mc protect` (100 ms interval) in between.  The
guest is played over a second QMP socket with HMP qemu-io: 64 KiB writes at
random 64 KiB-aligned offsets inside a HOT-byte hot set, as fast as QMP goes.

1. protect starts: the initial full sync of SIZE bytes is the full-resync
   reference (protect's report: seconds and bytes of resyncs[0]);
2. after a few commits the secondary's nbdkit is killed (-9), the guest writes on
   for OUTAGE seconds, the secondary is started again;
3. protect resyncs by itself; the clock runs from the restart to the first new
   commit ("time unprotected after the secondary is back");
4. protect is stopped (SIGTERM) and its report read: resyncs[1].

Figures: bytes copied by the resync / bytes dirty (the 64 KiB clusters the guest
wrote since the last commit before the kill, up to the end of the resync; target
<= 1.2), and time unprotected after the restart / the full sync's time (target
<= 0.1).  The pull alternative (QEMU's NBD export of the drive with the bitmap as
``qemu:dirty-bitmap:NAME``, read with libnbd and written to the secondary) is
timed on the same dirty set for comparison.

    .venv/bin/python -m bench.resync --failback [--size 1G] [--hot 64M] [--seconds 3]

The failback case: P1 protects into S (a full sync of SIZE: the reference), the
guest writes the hot set, P1's QEMU is killed -9, S fails over, a new primary P2
boots on S's image and writes the hot set for SECONDS, then P1's image is served as
a fresh replica and P2 protects into it (the checksum sync, chosen automatically).
Figures: bytes copied / disk size, bytes copied / bytes that really differ (the
files compared before the sync), and the sync's seconds against the full sync's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from nbd_mc.statedir import StateDir

from . import util

MiB, GiB = util.MiB, util.GiB
GRANULE = 64 << 10


def _size(text: str) -> int:
    t = text.strip().upper()
    scale = {"K": 1 << 10, "M": MiB, "G": GiB}.get(t[-1:], 1)
    return int(float(t.rstrip("KMG")) * scale)


class Guest(threading.Thread):
    """64 KiB writes into the hot set until stopped; remembers what it dirtied when."""

    def __init__(self, qmp, hot: int, seed: int = 9):
        super().__init__(daemon=True)
        self.qmp = qmp
        self.hot = hot
        self.rng = random.Random(seed)
        self.log: list[tuple[float, int]] = []  # (monotonic time, cluster)
        self.halt = threading.Event()
        self.failed = 0

    def run(self):
        from nbd_mc.primary import PrimaryGone
        while not self.halt.is_set():
            c = self.rng.randrange(self.hot // GRANULE)
            try:
                if not self.qmp.cmd("query-status")["running"]:
                    continue  # a guest does not write while paused
                self.qmp.hmp(f'qemu-io drive0 "write -P {c % 251 + 1} {c * GRANULE} {GRANULE}"')
            except PrimaryGone:
                return  # QEMU killed (the failback case kills it on purpose)
            self.log.append((time.monotonic(), c))

    def dirty_between(self, t0: float, t1: float) -> int:
        return len({c for t, c in self.log if t0 <= t <= t1}) * GRANULE


def measure(work: Path, size: int, hot: int, outage: float) -> dict:
    from nbd_mc.control import ControlClient
    from nbd_mc.primary import Qmp
    work.mkdir(parents=True, exist_ok=True)
    for f in work.glob("*"):
        if f.is_file() or f.is_socket():
            f.unlink()
    subprocess.run(["rm", "-rf", str(work / "st")], check=True)
    img, rep = work / "primary.raw", work / "replica.raw"
    with open(img, "wb") as f:  # data everywhere: a full sync really copies SIZE
        block = os.urandom(MiB)
        for _ in range(size // MiB):
            f.write(block)
    with open(rep, "wb") as f:
        f.truncate(size)
    st = work / "st"
    serve = [str(util.VENV_BIN / "nbd-mc"), "serve", f"vda={rep}", "--state-dir", str(st)]
    util.run(serve)
    qmp_p, qmp_t = work / "p.qmp", work / "t.qmp"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{qmp_p},server=on,wait=off", "-qmp", f"unix:{qmp_t},server=on,wait=off",
         "-drive", f"if=none,id=drive0,file={img},format=raw"],
        stdout=open(work / "qemu.log", "w"), stderr=subprocess.STDOUT, env=util.env())
    protect = guest = None
    try:
        util.wait_for(lambda: util.unix_connectable(qmp_t), 30, "QEMU")
        tq = Qmp(str(qmp_t))
        out = open(work / "protect.json", "w+")
        t_protect = time.monotonic()
        protect = subprocess.Popen(
            [str(util.VENV_BIN / "nbd-mc"), "protect", "--qmp", str(qmp_p), "--drive",
             "drive0=vda", "--target", f"nbd+unix:///?socket={st}/nbd.sock", "--control",
             StateDir(st).control, "--interval", "100ms", "--json"],
            stdout=out, stderr=subprocess.STDOUT, env=util.env())

        def committed():
            with ControlClient(StateDir(st).control, timeout=10) as c:
                return c.execute("query-status")["committed"]
        util.wait_for(lambda: committed() >= 1, 600, "the initial sync", interval=0.05)
        full_wall = time.monotonic() - t_protect
        guest = Guest(tq, hot)
        guest.start()
        util.wait_for(lambda: committed() >= 5, 60, "five commits", interval=0.05)
        before = committed()
        t_kill = time.monotonic()
        pid = int(Path(StateDir(st).pidfile).read_text())
        os.kill(pid, signal.SIGKILL)
        util.wait_for(lambda: not util.pid_alive(pid), 30, "nbdkit to die")
        time.sleep(outage)  # the outage being measured, not a synchronisation
        util.run(serve)
        t_back = time.monotonic()
        util.wait_for(lambda: committed() > before, 600, "protection to resume", interval=0.01)
        t_protected = time.monotonic()
        guest.halt.set()
        guest.join(60)
        protect.send_signal(signal.SIGTERM)
        protect.wait(120)
        out.seek(0)
        text = out.read()
        report = json.loads(text[text.index("{"):])
        r = report["resyncs"][1]
        # the last commit before the kill was at most one interval before t_kill
        dirty = guest.dirty_between(t_kill - 0.2, t_protected)
        pull = measure_pull(tq, work, st, r)
        tq.close()
        return {
            "size": size, "hot": hot, "outage_s": outage,
            "full_sync": {"bytes": report["resyncs"][0]["bytes"],
                          "seconds": report["resyncs"][0]["seconds"],
                          "wall_to_first_commit_s": round(full_wall, 3)},
            "resync": r, "dirty_bytes_written": dirty,
            "bytes_over_dirty": round(r["bytes"] / dirty, 3) if dirty else None,
            "unprotected_after_back_s": round(t_protected - t_back, 3),
            "unprotected_total_s": round(t_protected - t_kill, 3),
            "unprotected_over_full": round((t_protected - t_back) / full_wall, 4),
            "pull": pull,
        }
    finally:
        if guest is not None:
            guest.halt.set()
        for p in (protect, qemu):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(30)
        subprocess.run([str(util.VENV_BIN / "nbd-mc"), "stop", "--state-dir", str(st)],
                       capture_output=True, env=util.env())


def measure_pull(qmp, work: Path, st: Path, resync: dict) -> dict:
    """The alternative: copy a bitmap's dirty extents by pulling them with libnbd from
    QEMU's own NBD export of the drive (meta context qemu:dirty-bitmap:NAME) and
    writing them to the secondary.  Timed on a fresh bitmap dirtied like the resync's
    (the same number of clusters), with the VM paused so the set is fixed."""
    import nbd
    node = qmp.cmd("query-block")[0]["inserted"]["node-name"]
    clusters = max(1, resync["dirty_bytes"] // GRANULE)
    qmp.cmd("block-dirty-bitmap-add", node=node, name="bench-pull")
    rng = random.Random(5)
    for c in rng.sample(range(clusters * 4), clusters):
        qmp.hmp(f'qemu-io drive0 "write -P 7 {c * GRANULE} {GRANULE}"')
    qmp.cmd("block-dirty-bitmap-disable", node=node, name="bench-pull")  # a fixed set
    sock = work / "export.sock"
    qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.cmd("block-export-add", type="nbd", id="pull", **{"node-name": node},
            name="drive0", bitmaps=["bench-pull"], writable=False)
    t0 = time.monotonic()
    src = nbd.NBD()
    src.add_meta_context("qemu:dirty-bitmap:bench-pull")
    src.connect_uri(f"nbd+unix:///drive0?socket={sock}")
    dst = nbd.NBD()
    dst.connect_uri(f"nbd+unix:///vda?socket={st}/nbd.sock")
    extents = []
    reached = {"end": 0}

    def cb(metacontext, offset, entries, err):
        pos = offset
        for i in range(0, len(entries), 2):
            if entries[i + 1] & 1:  # dirty in the bitmap
                extents.append((pos, entries[i]))
            pos += entries[i]
        reached["end"] = pos
        return 0
    size = src.get_size()
    pos = 0
    while pos < size:
        src.block_status(min(size - pos, 1 << 30), pos, cb)
        pos = reached["end"] if reached["end"] > pos else size
    copied = 0
    for off, n in extents:
        data = src.pread(n, off)
        dst.pwrite(data, off)
        copied += n
    dst.flush()
    seconds = time.monotonic() - t0
    src.shutdown()
    dst.shutdown()
    qmp.cmd("block-export-del", id="pull")
    qmp.cmd("nbd-server-stop")
    return {"bytes": copied, "seconds": round(seconds, 3),
            "mib_per_s": round(copied / MiB / seconds, 1) if seconds else None}


def _random_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:  # data everywhere: a full sync really copies SIZE
        block = os.urandom(MiB)
        for _ in range(size // MiB):
            f.write(block)


def _qemu(work: Path, name: str, img: Path):
    qmp_p, qmp_t = work / f"{name}.qmp", work / f"{name}-t.qmp"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{qmp_p},server=on,wait=off", "-qmp", f"unix:{qmp_t},server=on,wait=off",
         "-drive", f"if=none,id=drive0,file={img},format=raw"],
        stdout=open(work / f"{name}.log", "w"), stderr=subprocess.STDOUT, env=util.env())
    util.wait_for(lambda: util.unix_connectable(qmp_t), 30, "QEMU")
    return proc, qmp_p, qmp_t


def _protect(work: Path, name: str, qmp: Path, st: Path):
    out = open(work / f"{name}.json", "w+")
    proc = subprocess.Popen(
        [str(util.VENV_BIN / "nbd-mc"), "protect", "--qmp", str(qmp), "--drive",
         "drive0=vda", "--target", f"nbd+unix:///?socket={st}/nbd.sock", "--control",
         StateDir(st).control, "--interval", "100ms", "--json"],
        stdout=out, stderr=subprocess.STDOUT, env=util.env())
    return proc, out


def _report(proc, out) -> dict:
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    out.seek(0)
    text = out.read()
    return json.loads(text[text.index("{"):])


def _differing(a: Path, b: Path) -> int:
    """Bytes that differ between two files of the same size."""
    n = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if not x:
                return n
            if x != y:
                n += sum(p != q for p, q in zip(x, y))


def measure_failback(work: Path, size: int, hot: int, seconds: float) -> dict:
    from nbd_mc.control import ControlClient
    from nbd_mc.primary import Qmp
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    p1_img, s_img = work / "p1.raw", work / "s.raw"
    _random_image(p1_img, size)
    with open(s_img, "wb") as f:
        f.truncate(size)
    s_st, n1_st = work / "s-st", work / "n1-st"
    nbd_mc = str(util.VENV_BIN / "nbd-mc")

    def committed(st):
        with ControlClient(StateDir(st).control, timeout=10) as c:
            return c.execute("query-status")["committed"]
    procs = []
    try:
        util.run([nbd_mc, "serve", f"vda={s_img}", "--state-dir", str(s_st)])
        q1, qmp_p, qmp_t = _qemu(work, "p1", p1_img)
        procs.append(q1)
        t1 = Qmp(str(qmp_t))
        pr, out = _protect(work, "protect1", qmp_p, s_st)
        procs.append(pr)
        util.wait_for(lambda: committed(s_st) >= 1, 600, "the full sync", interval=0.05)
        guest = Guest(t1, hot, seed=1)
        guest.start()
        util.wait_for(lambda: committed(s_st) >= 10, 120, "ten commits", interval=0.05)
        q1.kill()  # SIGKILL, mid-epoch: the guest writes all the time
        q1.wait(30)
        guest.halt.set()
        guest.join(60)
        t1.close()
        full = _report(pr, out)["resyncs"][0]
        util.run([nbd_mc, "failover", "--state-dir", str(s_st)])
        util.run([nbd_mc, "stop", "--state-dir", str(s_st)])
        q2, qmp_p, qmp_t = _qemu(work, "p2", s_img)
        procs.append(q2)
        t2 = Qmp(str(qmp_t))
        guest = Guest(t2, hot, seed=2)
        guest.start()
        time.sleep(seconds)  # the new primary's unprotected writes being measured
        guest.halt.set()
        guest.join(60)
        differ = _differing(p1_img, s_img)
        util.run([nbd_mc, "serve", f"vda={p1_img}", "--state-dir", str(n1_st)])
        pr, out = _protect(work, "protect2", qmp_p, n1_st)
        procs.append(pr)
        util.wait_for(lambda: committed(n1_st) >= 1, 600, "the checksum sync", interval=0.05)
        sync = _report(pr, out)["resyncs"][0]
        t2.close()
        return {"size": size, "hot": hot, "seconds_p2_wrote": seconds,
                "full_sync": full, "checksum_sync": sync, "really_differing_bytes": differ,
                "copied_over_size": round(sync["bytes"] / size, 4),
                "copied_over_differing": round(sync["bytes"] / differ, 3) if differ else None,
                "seconds_over_full": round(sync["seconds"] / full["seconds"], 3)
                if full["seconds"] else None}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
        for st in (s_st, n1_st):
            subprocess.run([nbd_mc, "stop", "--state-dir", str(st)], capture_output=True,
                           env=util.env())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.resync", description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--hot", default="64M")
    ap.add_argument("--outage", type=float, default=10.0)
    ap.add_argument("--work", default=str(util.ROOT / "bench" / "work" / "resync"))
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--failback", action="store_true",
                    help="the failback case: a checksum sync into the old primary's disk")
    ap.add_argument("--seconds", type=float, default=3.0,
                    help="--failback: how long the new primary writes before the sync")
    a = ap.parse_args(argv)
    if a.failback:
        res = measure_failback(Path(a.work + "-failback"), _size(a.size), _size(a.hot),
                               a.seconds)
        text = json.dumps(res, indent=2)
        print(text)
        if a.out:
            Path(a.out).write_text(text + "\n")
        c, f = res["checksum_sync"], res["full_sync"]
        print(f"\nfailback: checksum sync copied {c['bytes'] / MiB:.1f} MiB of "
              f"{res['size'] / MiB:.0f} MiB ({res['copied_over_size']}x the disk, "
              f"{res['copied_over_differing']}x the {res['really_differing_bytes'] / MiB:.1f} "
              f"MiB that differed) in {c['seconds']:.1f} s; the full sync took "
              f"{f['seconds']:.1f} s ({res['seconds_over_full']}x)", file=sys.stderr)
        return 0
    res = measure(Path(a.work), _size(a.size), _size(a.hot), a.outage)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    r = res["resync"]
    print(f"\nresync after a {a.outage:g} s outage: copied {r['bytes'] / MiB:.1f} MiB for "
          f"{res['dirty_bytes_written'] / MiB:.1f} MiB dirty ({res['bytes_over_dirty']}x, target "
          f"<= 1.2); unprotected {res['unprotected_after_back_s']:.2f} s after the secondary "
          f"was back vs {res['full_sync']['wall_to_first_commit_s']:.2f} s for a full sync "
          f"({res['unprotected_over_full']}x, target <= 0.1); pull with libnbd: "
          f"{res['pull']['mib_per_s']} MiB/s vs backup rounds "
          f"{r['bytes'] / MiB / max(r['seconds'], 1e-6):.1f} MiB/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
