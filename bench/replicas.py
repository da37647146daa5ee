"""Workload 14, many replicas on one host (issue 22): 1, 4 and 8 servers side by side.

Each server serves its own fresh copy of a fully allocated image and has its own
fio client (nbd engine, 4 KiB random writes, iodepth 4, time based).  The nbd-mc
servers are committed every 100 ms by one bench thread (round robin over the
servers); the anchors are the same number of nbdkit ``file`` servers (no undo)
and of the trivial Python plugin (bench/trivial_plugin.py: only ``pwrite``, the
floor of any Python plugin).  Per kind and count:

* aggregate IOPS (the sum of the fio jobs, which run at once);
* server CPU time per request: utime + stime of every server process (all its
  threads, from /proc/PID/stat) over the run, divided by the requests served --
  robust to the load of a shared machine, unlike the IOPS;
* memory per instance: VmRSS and VmHWM of each server after the run (mean, max).

Part b, CPU per 4 KiB write (one server, QD1 -- nothing else runs): first touch
(fio's strided zones: each write in a new 64 KiB cluster of an open epoch) and
re-touch (the same writes again, the same epoch), three rounds with a commit
before each, nbd-mc against the trivial plugin.

Part c, the thread models: one server alone at QD1 and QD16.

    .venv/bin/python -m bench.replicas [--counts 1,4,8] [--runtime 5] [--size 128M]
(`make bench` runs it as workload 14.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import fio, util
from .servers import NbdkitFile, NbdMc

MiB = util.MiB
#: nbd-mc in its default thread model (serialize) and in parallel: on a loaded
#: machine the scheduler shares CPU per runnable thread, so a server that runs one
#: request at a time gets a smaller share than one with a thread per request in
#: flight -- the IOPS then measure that, the CPU per request does not.
KINDS = ("nbdkit-file", "trivial-python", "nbd-mc", "nbd-mc-parallel")
QD = 4
ROUNDS = 3  # part b: first touch + re-touch rounds
EPOCH_S = 0.1
GOALS = {"iops_vs_trivial_8": 0.8, "rss_mib_per_instance": 64,
         "first_touch_cpu_vs_trivial": 2.0, "retouch_cpu_vs_trivial": 1.3}


class TrivialPython(NbdkitFile):
    """nbdkit's python plugin running bench/trivial_plugin.py."""
    kind = "trivial-python"

    def start(self, image, undo=True):
        self.image = Path(image)
        self._clean_files()
        self.log = open(self.logfile, "w")
        plugin = Path(__file__).resolve().parent / "trivial_plugin.py"
        self.proc = subprocess.Popen(
            ["nbdkit", "-U", str(self.sock), "-P", str(self.pidfile), "-f",
             "--exit-with-parent", "python", str(plugin), f"file={self.image}"],
            stdout=self.log, stderr=subprocess.STDOUT, env=util.env())
        self._wait_ready(self.proc)
        util.wait_for(lambda: self.pid() is not None, 10, "nbdkit pidfile")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make(kind: str, workdir: Path, label: str):
    if kind == "nbdkit-file":
        return NbdkitFile(workdir, label)
    if kind == "trivial-python":
        return TrivialPython(workdir, label)
    if kind == "nbd-mc-parallel":
        return NbdMc(workdir, label, extra_args=["--thread-model", "parallel"])
    return NbdMc(workdir, label)


class Committer(threading.Thread):
    """Commits every nbd-mc server every EPOCH_S seconds until stopped."""

    def __init__(self, servers):
        super().__init__(daemon=True)
        self.servers = [s for s in servers if isinstance(s, NbdMc)]
        self.stop_event = threading.Event()
        self.commits = 0
        self.error = None

    def run(self):
        nxt = time.monotonic()
        try:
            while not self.stop_event.is_set():
                nxt += EPOCH_S
                for s in self.servers:
                    s.commit()
                    self.commits += 1
                self.stop_event.wait(max(0.0, nxt - time.monotonic()))
        except Exception as e:  # reported by the caller: a failed commit spoils the run
            self.error = e


def run_many(work: Path, template: Path, kind: str, n: int, runtime: int) -> dict:
    servers = []
    try:
        for i in range(n):
            srv = make(kind, work / f"srv-{kind}-{i}", f"{kind}-{i}")
            img = util.fresh_copy(template, work / f"replica-{kind}-{i}.raw")
            util.warm_file(img)
            srv.start(img, undo=True)
            servers.append(srv)
        pids = [s.pid() for s in servers]
        cpu0 = [cpu_seconds(p) for p in pids]
        committer = Committer(servers)
        committer.start()
        load0 = os.getloadavg()[0]
        procs = []
        for s in servers:
            job = s.workdir / "job-replicas.fio"
            job.write_text(fio.job_text(s.uri, "randwrite", "4k", runtime=runtime,
                                        time_based=True, iodepth=QD))
            procs.append(subprocess.Popen(["fio", "--output-format=json", str(job)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=util.env()))
        results = []
        for p in procs:
            out, err = p.communicate(timeout=runtime + 300)
            if p.returncode != 0:
                raise RuntimeError(f"fio failed: {err[-2000:]}")
            results.append(fio.parse(out, "randwrite"))
        committer.stop_event.set()
        committer.join()
        if committer.error:
            raise committer.error
        cpu = sum(cpu_seconds(p) for p in pids) - sum(cpu0)
        mem = [util.rss_kib(p) for p in pids]
        requests = sum(r.io_bytes for r in results) // 4096
        return {
            "kind": kind, "instances": n,
            "iops": round(sum(r.iops for r in results)),
            "iops_each": [round(r.iops) for r in results],
            "requests": requests,
            "cpu_us_per_req": round(cpu / max(1, requests) * 1e6, 1),
            "rss_mib_mean": round(statistics.mean(m[0] for m in mem) / 1024, 1),
            "rss_mib_max": round(max(m[0] for m in mem) / 1024, 1),
            "hwm_mib_max": round(max(m[1] for m in mem) / 1024, 1),
            "commits": committer.commits,
            "load": round(load0, 1),
        }
    finally:
        for s in servers:
            s.stop()
        for i in range(n):
            img = work / f"replica-{kind}-{i}.raw"
            if img.exists():
                img.unlink()


def cpu_per_write(work: Path, template: Path, kind: str, size: int) -> dict:
    """Part b: server CPU per 4 KiB write at QD1, first touch and re-touch."""
    srv = make(kind, work / f"srv-cpu-{kind}", kind)
    img = util.fresh_copy(template, work / f"cpu-{kind}.raw")
    util.warm_file(img)
    try:
        srv.start(img, undo=True)
        pid = srv.pid()
        count = size // 65536
        touches = fio.first_touch(size, count, 65536)
        # the same seed both passes: the re-touch writes exactly the first pass's
        # blocks (another 4 KiB of the cluster would be a first touch of subclusters)
        touches["extra"]["randrepeat"] = 1
        out = {"kind": kind, "writes": count, "rounds": ROUNDS}
        cpu = {"first touch": 0.0, "re-touch": 0.0}
        reqs = {"first touch": 0, "re-touch": 0}
        # /proc counts CPU in 10 ms ticks: several rounds (a new epoch each) so a
        # figure rests on tens of ticks
        for _ in range(ROUNDS):
            if isinstance(srv, NbdMc):
                srv.commit()  # a new epoch: every cluster is a first touch again
            for phase in ("first touch", "re-touch"):
                c0 = cpu_seconds(pid)
                r = fio.run(srv.workdir, srv.uri, "randwrite", "4k", iodepth=1, **touches)
                cpu[phase] += cpu_seconds(pid) - c0
                reqs[phase] += r.io_bytes // 4096
        for phase in cpu:
            out[phase] = round(cpu[phase] / max(1, reqs[phase]) * 1e6, 1)
        if isinstance(srv, NbdMc):
            st = srv.status()
            disks = st.get("disks") or [{}]
            out["preserved_clusters"] = disks[0].get("preserved_clusters")
        return out
    finally:
        srv.stop()
        if img.exists():
            img.unlink()


def thread_models(work: Path, template: Path, runtime: int,
                  kinds=("trivial-python", "nbd-mc", "nbd-mc-parallel")) -> list:
    """Part c: one server alone, 4 KiB random writes at QD1 and QD16 (time based,
    nbd-mc committed every 100 ms): IOPS, p50 and server CPU per request of each
    thread model, to choose the default by measurement."""
    rows = []
    for kind in kinds:
        srv = make(kind, work / f"srv-tm-{kind}", kind)
        img = util.fresh_copy(template, work / f"tm-{kind}.raw")
        util.warm_file(img)
        try:
            srv.start(img, undo=True)
            pid = srv.pid()
            for qd in (1, 16):
                committer = Committer([srv])
                committer.start()
                c0 = cpu_seconds(pid)
                r = fio.run(srv.workdir, srv.uri, "randwrite", "4k", runtime=runtime,
                            time_based=True, iodepth=qd)
                committer.stop_event.set()
                committer.join()
                if committer.error:
                    raise committer.error
                rows.append({"kind": kind, "qd": qd, "iops": round(r.iops),
                             "p50_us": r.clat_p50_us,
                             "cpu_us_per_req": round((cpu_seconds(pid) - c0)
                                                     / max(1, r.io_bytes // 4096) * 1e6, 1),
                             "load": round(os.getloadavg()[0], 1)})
                print(f"[replicas] thread model {kind} QD{qd}: {rows[-1]}", file=sys.stderr,
                      flush=True)
        finally:
            srv.stop()
            if img.exists():
                img.unlink()
    return rows


def measure(work: str, counts=(1, 4, 8), runtime: int = 5, size: int = 128 * MiB,
            kinds=KINDS, reps: int = 1) -> dict:
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    template = util.make_template(work / f"template-replicas-{size >> 20}M.raw", size)
    out = {"qd": QD, "runtime_s": runtime, "image": size, "epoch_s": EPOCH_S,
           "many": [], "cpu_per_write": [], "goals": GOALS}
    for n in counts:
        for rep in range(reps):
            order = list(kinds) if rep % 2 == 0 else list(reversed(kinds))
            for kind in order:
                r = run_many(work, template, kind, n, runtime)
                r["rep"] = rep
                out["many"].append(r)
                print(f"[replicas] {n} x {kind}: {r['iops']} IOPS, "
                      f"{r['cpu_us_per_req']} us CPU/req, RSS {r['rss_mib_mean']} MiB "
                      f"(load {r['load']})", file=sys.stderr, flush=True)
    for kind in ("trivial-python", "nbd-mc", "nbd-mc-parallel"):
        if kind in kinds:
            r = cpu_per_write(work, template, kind, size)
            out["cpu_per_write"].append(r)
            print(f"[replicas] CPU per 4K write, {kind}: {r}", file=sys.stderr, flush=True)
    out["thread_models"] = thread_models(work, template, runtime,
                                         [k for k in kinds if k != "nbdkit-file"])
    return out


def _med(rows, key):
    return statistics.median(r[key] for r in rows) if rows else None


def summary(r: dict) -> list[str]:
    """The table and the goal verdicts, as markdown lines."""
    lines = ["| instances | server | aggregate IOPS | CPU us/request | RSS MiB/instance (max) | load |",
             "|---|---|---|---|---|---|"]
    by = {}
    for row in r["many"]:
        by.setdefault((row["instances"], row["kind"]), []).append(row)
    for (n, kind), rows in sorted(by.items()):
        lines.append(f"| {n} | {kind} | {_med(rows, 'iops'):.0f} | {_med(rows, 'cpu_us_per_req')} "
                     f"| {_med(rows, 'rss_mib_mean')} ({max(x['rss_mib_max'] for x in rows)}) "
                     f"| {_med(rows, 'load')} |")
    counts = sorted({n for n, _ in by})
    pairs = [(n, name) for n in counts for name in ("nbd-mc", "nbd-mc-parallel")]
    for n, name in pairs:
        mc, triv = by.get((n, name)), by.get((n, "trivial-python"))
        if mc and triv:
            lines.append(f"* {n} instances: {name} / trivial plugin IOPS "
                         f"{_med(mc, 'iops') / _med(triv, 'iops'):.2f}x, CPU per request "
                         f"{_med(mc, 'cpu_us_per_req') / _med(triv, 'cpu_us_per_req'):.2f}x")
    triv8 = by.get((8, "trivial-python"))
    for name in ("nbd-mc", "nbd-mc-parallel"):
        mc8 = by.get((8, name))
        if mc8 and triv8:
            ratio = _med(mc8, "iops") / _med(triv8, "iops")
            lines.append(f"* goal, 8 replicas: {name} aggregate IOPS {ratio:.2f}x of 8 trivial "
                         f"plugins (>= {GOALS['iops_vs_trivial_8']}): "
                         f"{'met' if ratio >= GOALS['iops_vs_trivial_8'] else 'missed'}")
    mc_rows = [x for (n, k), rows in by.items() if k.startswith("nbd-mc") for x in rows]
    if mc_rows:
        worst = max(x["rss_mib_max"] for x in mc_rows)
        lines.append(f"* goal, memory per nbd-mc instance <= {GOALS['rss_mib_per_instance']} MiB: "
                     f"{worst} MiB at most: "
                     f"{'met' if worst <= GOALS['rss_mib_per_instance'] else 'missed'}")
    cw = {x["kind"]: x for x in r.get("cpu_per_write", [])}
    for name in ("nbd-mc", "nbd-mc-parallel"):
        if name not in cw or "trivial-python" not in cw:
            continue
        m, t = cw[name], cw["trivial-python"]
        lines.append(f"* {name}, CPU per 4 KiB write at QD1: first touch {m['first touch']} us vs "
                     f"{t['first touch']} us ({m['first touch'] / t['first touch']:.2f}x, goal <= 2), "
                     f"re-touch {m['re-touch']} us vs {t['re-touch']} us "
                     f"({m['re-touch'] / t['re-touch']:.2f}x, goal <= 1.3)")
    tm = r.get("thread_models")
    if tm:
        lines += ["", "| server alone | QD | IOPS | p50 us | CPU us/request | load |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {x['kind']} | {x['qd']} | {x['iops']} | {x['p50_us']} | "
                  f"{x['cpu_us_per_req']} | {x['load']} |" for x in tm]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replicas",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default="1,4,8")
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--size", default="128M", help="image per replica")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--work", default=str(util.ROOT / "bench" / "work"))
    ap.add_argument("--json", metavar="FILE", help="also write every number here")
    a = ap.parse_args(argv)
    r = measure(a.work, [int(x) for x in a.counts.split(",") if x], a.runtime,
                util.parse_size(a.size), a.kinds.split(","), a.reps)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1) + "\n")
    print("\n".join(summary(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
