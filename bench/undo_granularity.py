"""Undo granularity: subclusters (qcow2 extended L2, 1/32 cluster) vs whole clusters.

The workload of issue 13: 4 KiB random writes at queue depth 1 over NBD, a commit
every 100 ms, on an image full of non-zero data (every first touch must copy).
For each mode it reports writes/s, write latency p50/p99 as the client sees it,
and the write amplification of the server process = bytes it wrote per byte the
client wrote, from /proc/PID/io of nbdkit:

* ``wchar``: bytes handed to write syscalls (pwrite/pwritev) -- what the page
  cache receives;
* ``write_bytes``: what the kernel accounts when the process dirties page-cache
  folios -- a whole (possibly large) folio per first dirtying, again after every
  writeback by anyone's sync.  On this machine (Linux 6.18, ext4 with large
  folios, other processes syncing) it swung from 0.75x to 60x for the same
  workload, so it is reported but not used for verdicts.

``--durability power`` makes the server fdatasync the overlay before every image
write, so the bytes really go to the disk (/dev/vda here) inside the run.
``--inprocess`` drives the engine directly (no nbdkit, no NBD): our own cost.

Run from the repository root:  python -m bench.undo_granularity --help
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import nbd

from nbd_mc.control import ControlClient
from nbd_mc.statedir import StateDir

HERE = os.path.dirname(os.path.abspath(__file__))
NBD_MC = [sys.executable, "-m", "nbd_mc.cli"] if not shutil.which("nbd-mc") else ["nbd-mc"]


def io_counters(pid: int) -> dict:
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process and its threads (robust to machine load,
    unlike wall-clock rates on a shared 2-core machine)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_image(path: str, size: int) -> None:
    """Non-zero data everywhere (a disk in use), written once and copied per run."""
    chunk = random.Random(1).randbytes(1 << 20)
    with open(path, "wb") as f:
        for i in range(size >> 20):
            f.write(chunk[i % 4096:] + chunk[:i % 4096])
        f.flush()
        os.fsync(f.fileno())


def run_mode(base_image: str, work: str, subclusters: str, args) -> dict:
    d = tempfile.mkdtemp(prefix=f"undo-{subclusters}-", dir=work)
    img = os.path.join(d, "disk.raw")
    shutil.copyfile(base_image, img)
    fd = os.open(img, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold: old data comes from disk
    if args.cache == "warm":  # the image in page cache: only our own work is measured
        while os.read(fd, 8 << 20):
            pass
    os.close(fd)
    st = os.path.join(d, "st")
    subprocess.run(NBD_MC + ["serve", img, "--state-dir", st, "--cluster-size", args.cluster_size,
                             "--subclusters", subclusters, "--durability", args.durability],
                   check=True, stdout=subprocess.DEVNULL)
    pid = int(open(StateDir(st).pidfile).read())
    ctl = ControlClient(StateDir(st).control)
    h = nbd.NBD()
    try:
        epoch = 1
        ctl.execute("commit", epoch=epoch)  # protection starts: every write preserves
        h.connect_unix(StateDir(st).nbd_socket)
        size = h.get_size()
        rng = random.Random(2)
        block = rng.randbytes(4096)
        slots = size // 4096
        stop = threading.Event()
        commits = []

        def committer():
            nonlocal epoch
            nxt = time.monotonic() + args.epoch
            while not stop.is_set():
                time.sleep(max(0.0, nxt - time.monotonic()))
                nxt += args.epoch
                t = time.perf_counter()
                ctl.execute("commit", epoch=epoch + 1)
                commits.append(time.perf_counter() - t)
                epoch += 1

        before = io_counters(pid)
        cpu0 = cpu_seconds(pid)
        th = threading.Thread(target=committer, daemon=True)
        th.start()
        lat = []
        t0 = time.perf_counter()
        end = t0 + args.seconds
        while (now := time.perf_counter()) < end:
            h.pwrite(block, rng.randrange(slots) * 4096)
            lat.append(time.perf_counter() - now)
        elapsed = time.perf_counter() - t0
        stop.set()
        th.join()
        h.flush()
        after = io_counters(pid)
        cpu = cpu_seconds(pid) - cpu0
        client = len(lat) * 4096
        lat.sort()
        q = statistics.quantiles(lat, n=100)
        return {
            "subclusters": subclusters, "durability": args.durability, "cache": args.cache,
            "writes": len(lat), "writes_per_s": round(len(lat) / elapsed),
            "p50_us": round(q[49] * 1e6), "p99_us": round(q[98] * 1e6),
            "mean_us": round(elapsed / len(lat) * 1e6),
            "server_cpu_us_per_write": round(cpu / len(lat) * 1e6, 1),
            "commits": len(commits),
            "commit_p50_ms": round(statistics.median(commits) * 1e3, 2) if commits else None,
            "client_bytes": client,
            "wchar": after["wchar"] - before["wchar"],
            "write_bytes": after["write_bytes"] - before["write_bytes"],
            "wa_wchar": round((after["wchar"] - before["wchar"]) / client, 2),
            "wa_write_bytes": round((after["write_bytes"] - before["write_bytes"]) / client, 2),
            "undo_bytes_last_epoch": ctl.execute("query-status")["disks"][0]["undo_bytes"],
            "overlay_disk_bytes": os.stat(StateDir(st).overlay("disk")).st_blocks * 512,
        }
    finally:
        try:
            h.shutdown()
        except Exception:  # noqa: BLE001 - whatever happened, stop the server below
            pass
        ctl.close()
        subprocess.run(NBD_MC + ["stop", "--state-dir", st], stdout=subprocess.DEVNULL)
        shutil.rmtree(d, ignore_errors=True)


def run_inprocess(base_image: str, work: str, subclusters: str, args) -> dict:
    """The same workload against the engine in this process (no nbdkit, no NBD):
    the cost of our own work per write, and the bytes we hand to write syscalls."""
    from nbd_mc.secondary.engine import Group
    d = tempfile.mkdtemp(prefix=f"undo-inproc-{subclusters}-", dir=work)
    img = os.path.join(d, "disk.raw")
    shutil.copyfile(base_image, img)
    with open(img, "rb") as f:  # in page cache: only our work is measured
        while f.read(8 << 20):
            pass
    g = Group(os.path.join(d, "st"), [("disk", img)], cluster_size=parse_size(args.cluster_size),
              durability=args.durability, subclusters=subclusters == "on")
    try:
        disk = g.disk("disk")
        g.commit(1)
        rng = random.Random(2)
        block = rng.randbytes(4096)
        slots = disk.size // 4096
        lat, commits, epoch = [], [], 1
        before = io_counters(os.getpid())
        t0 = time.perf_counter()
        end, nxt = t0 + args.seconds, t0 + args.epoch
        while (now := time.perf_counter()) < end:
            if now >= nxt:
                epoch += 1
                g.commit(epoch)
                commits.append(time.perf_counter() - now)
                nxt += args.epoch
                continue
            g.write(disk, g.generation, block, rng.randrange(slots) * 4096)
            lat.append(time.perf_counter() - now)
        elapsed = time.perf_counter() - t0
        after = io_counters(os.getpid())
        client = len(lat) * 4096
        q = statistics.quantiles(sorted(lat), n=100)
        return {
            "subclusters": subclusters, "durability": args.durability, "inprocess": True,
            "writes": len(lat), "writes_per_s": round(len(lat) / elapsed),
            "p50_us": round(q[49] * 1e6, 1), "p99_us": round(q[98] * 1e6, 1),
            "commits": len(commits),
            "commit_p50_ms": round(statistics.median(commits) * 1e3, 3) if commits else None,
            "client_bytes": client,
            "wchar": after["wchar"] - before["wchar"],
            "wa_wchar": round((after["wchar"] - before["wchar"]) / client, 3),
        }
    finally:
        g.close()
        shutil.rmtree(d, ignore_errors=True)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="image size in MiB (default 512)")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--epoch", type=float, default=0.1, help="seconds between commits")
    ap.add_argument("--cluster-size", default="64K")
    ap.add_argument("--durability", choices=["process", "power"], default="process")
    ap.add_argument("--cache", choices=["warm", "cold"], default="warm",
                    help="image in page cache before the run, or dropped from it")
    ap.add_argument("--modes", default="on,off", help="--subclusters values to run, in order")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved repetitions")
    ap.add_argument("--dir", default="/var/tmp", help="where images live (a real disk)")
    ap.add_argument("--inprocess", action="store_true",
                    help="drive the engine in this process instead of nbdkit over NBD")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="nbd-mc-undo-granularity-", dir=args.dir)
    try:
        base = os.path.join(work, "base.raw")
        make_image(base, args.size << 20)
        for _ in range(args.repeat):
            for mode in args.modes.split(","):
                run = run_inprocess if args.inprocess else run_mode
                print(json.dumps(run(base, work, mode, args)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
