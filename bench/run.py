"""`make bench`: nbd-mc against its two anchors, side by side, in one run.

    .venv/bin/python -m bench [--full] [--only 1,2,5] [--out bench/results]

Servers: nbdkit's file plugin (no undo: the speed limit), qemu-storage-daemon
with a copy-before-write node (the C anchor) and nbd-mc through its CLI, in
every thread model it offers (the best one is reported). Every figure that is
compared is measured in this run, on the same machine, on a fresh copy of the
same image, with the servers taking turns.

Results: bench/results/results.md (the table, also printed), results.json
(every number) and PNG plots. Images live in bench/work/ (git-ignored).
"""

import argparse
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from . import fio, util
from .servers import NbdkitFile, NbdMc, Qsd, nbd_mc_help

MiB, GiB, TiB = util.MiB, util.GiB, 1 << 40


@dataclass
class Config:
    full: bool
    image_size: int            # workloads 1-4, 5b, 6
    runtime: int               # seconds of each time-based fio run
    reps: int                  # repetitions of workloads 1-4 and 7 (median)
    mirror_size: int
    commit_cluster: int        # cluster size for the commit-latency series
    commit_trials: dict        # preserved clusters -> number of commits timed
    sustain_seconds: int
    commit_rate: int           # the paced commit rate to sustain (commits/s)
    failover_sizes: list
    tib_size: int
    tib_touches: int
    all_variants_everywhere: bool

    @classmethod
    def make(cls, full):
        if full:
            return cls(full=True, image_size=2 * GiB, runtime=15, reps=3,
                       mirror_size=GiB, commit_cluster=4096,
                       commit_trials={1000: 300, 10000: 100, 100000: 20},
                       sustain_seconds=15, commit_rate=100,
                       failover_sizes=[0, 64 * MiB, 256 * MiB, GiB, 2 * GiB],
                       tib_size=TiB, tib_touches=100000, all_variants_everywhere=True)
        return cls(full=False, image_size=GiB, runtime=4, reps=1,
                   mirror_size=GiB, commit_cluster=4096,
                   commit_trials={1000: 60, 10000: 20, 100000: 5},
                   sustain_seconds=5, commit_rate=100,
                   failover_sizes=[0, 64 * MiB, 256 * MiB, GiB],
                   tib_size=TiB, tib_touches=20000, all_variants_everywhere=False)


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg():
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


# ---------------------------------------------------------------- variants

def nbd_mc_variants(help_text, full):
    """The nbd-mc configurations to run: one per thread model it supports.

    Read from `nbd-mc serve --help` so the list follows the CLI: every choice
    of --thread-model, and in FULL mode also the parallel model with fewer
    worker threads (--threads) than nbdkit's default 16.
    """
    variants = []
    m = re.search(r"--thread-model\s+\[([^\]]+)\]", help_text)
    models = m.group(1).split("|") if m else []
    has_threads = re.search(r"--threads\b", help_text) is not None
    for model in models:
        variants.append((model, ["--thread-model", model]))
        if model == "parallel" and has_threads and full:
            variants.append(("parallel-t4", ["--thread-model", model, "--threads", "4"]))
    if not variants:
        if has_threads:
            variants = [("t16", ["--threads", "16"]), ("t1", ["--threads", "1"])]
        else:
            variants = [("default", [])]
    return variants


# ---------------------------------------------------------------- the suite

class Bench:
    def __init__(self, cfg, work, out, only, variants):
        self.cfg = cfg
        self.work = Path(work).resolve()
        self.out = Path(out).resolve()
        self.only = only
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "errors.log").unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.variants = variants            # [] when nbd-mc is unavailable
        self.results = {"config": {}, "meta": {}, "w": {}}
        self.started = []                   # servers to stop on the way out

    # -- helpers ---------------------------------------------------------

    def want(self, n):
        return self.only is None or n in self.only

    def servers(self, anchors=True, nbdmc=True, **mc_kw):
        """Fresh server objects: (label, server) in a fixed order."""
        out = []
        if anchors:
            out.append(NbdkitFile(self.work / "srv-file", "nbdkit file"))
            out.append(Qsd(self.work / "srv-qsd", "qsd"))
        if nbdmc:
            for name, args in self.variants:
                out.append(NbdMc(self.work / f"srv-nbdmc-{name}", f"nbd-mc[{name}]",
                                 extra_args=args, **mc_kw))
        return out

    def template(self, size):
        return util.make_template(self.work / f"template-{util.human_size(size)}.raw", size)

    def record(self, key, label, value):
        self.results["w"].setdefault(key, {}).setdefault(label, []).append(value)

    def note(self, key, label, text):
        self.results["w"].setdefault(key, {}).setdefault("_notes", {})[label] = text

    def guarded(self, what, label, fn, srv=None):
        """Run one measurement; a failure is recorded, not fatal."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a broken server must not stop the run
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log(f"  {label}: {what} FAILED: {msg}")
            logs = ""
            for p in ([srv.logfile, getattr(srv, "state_dir", srv.workdir) / "nbdkit.log"]
                      if srv is not None else []):
                if p.exists():
                    logs += f"[{p}]\n{p.read_text()[-3000:]}\n"
            with (self.work / "errors.log").open("a") as f:
                f.write(f"--- {what} {label}\n{traceback.format_exc()}\n{logs}\n")
            self.results.setdefault("errors", []).append(f"{what} / {label}: {msg}"[:300])
            return None

    def stop_all(self):
        for s in self.started:
            try:
                s.stop()
            except Exception:
                pass
        self.started.clear()

    def start(self, server, image, undo):
        self.started.append(server)
        server.start(image, undo=undo)
        return server

    def stop(self, server):
        server.stop()
        if server in self.started:
            self.started.remove(server)

    # -- workloads 1-4 ----------------------------------------------------

    def w1234(self):
        """Workloads 1-4, interleaved: every server runs at once on its own
        fresh copy of the image, and each step runs on one server after the
        other (order rotated every repetition), so that the figures compared
        are taken seconds apart on this shared machine."""
        cfg = self.cfg
        size = cfg.image_size
        tpl = self.template(size)
        ft = fio.first_touch(size, size // (64 * 1024), 64 * 1024)
        rt = cfg.runtime
        clusters = size // (64 * 1024)

        def w1(srv):
            r = fio.run(srv.workdir, srv.uri, "write", "1M", size=size)
            self.record("w1", srv.label, r.mb_s)
            self._check_preserved(srv, "w1", clusters)

        def w2a(srv):
            r = fio.run(srv.workdir, srv.uri, "randwrite", "4k", **ft)
            self.record("w2a", srv.label, r.iops)
            self._check_preserved(srv, "w2a", clusters)

        def w2b(srv):
            r = fio.run(srv.workdir, srv.uri, "randwrite", "4k", runtime=rt, time_based=True)
            self.record("w2b", srv.label, r.iops)

        def w3a(srv):
            r = fio.run(srv.workdir, srv.uri, "randread", "4k", runtime=rt, time_based=True)
            self.record("w3a", srv.label, r.iops)

        def w3b(srv):
            r = fio.run(srv.workdir, srv.uri, "read", "1M", size=size)
            self.record("w3b", srv.label, r.mb_s)

        def w4(srv):
            r = fio.run(srv.workdir, srv.uri, "write", "1M", size=size)
            self.record("w4", srv.label, r.mb_s)

        steps_a = []
        if self.want(1):
            steps_a.append(("workload 1", w1))
        if self.want(2) or self.want(3):
            steps_a.append(("new epoch", lambda srv: srv.new_epoch()))
        if self.want(2):
            steps_a += [("workload 2 first touch", w2a), ("workload 2 re-touch", w2b)]
        if self.want(3):
            steps_a += [("workload 3 rand read", w3a), ("workload 3 seq read", w3b)]
        # Workload 4 is epoch 0 / no undo: nbd-mc on a fresh state directory,
        # qsd exporting the raw node (no copy-before-write).
        phases = [(True, steps_a)] if steps_a else []
        if self.want(4):
            phases.append((False, [("workload 4", w4)]))

        for rep in range(cfg.reps):
            servers = self.servers()
            k = rep % len(servers)
            servers = servers[k:] + servers[:k]
            images = {}
            for srv in servers:
                images[srv.label] = util.fresh_copy(
                    tpl, self.work / f"image-{srv.workdir.name}.raw")
            for undo, steps in phases:
                alive = []
                for srv in servers:
                    if self.guarded("start", srv.label,
                                    lambda: self.start(srv, images[srv.label], undo), srv):
                        alive.append(srv)
                    else:
                        self.stop(srv)
                for what, fn in steps:
                    log(f"{what}, rep {rep + 1}/{cfg.reps}: "
                        + ", ".join(s.label for s in alive))
                    for srv in list(alive):
                        if self.guarded(what, srv.label, lambda: fn(srv) or True, srv) is None:
                            alive.remove(srv)   # a broken server sits out the rest
                            self.stop(srv)
                for srv in servers:
                    self.stop(srv)
            for img in images.values():
                img.unlink(missing_ok=True)

    def _check_preserved(self, srv, key, expect):
        """nbd-mc's own count of first touches, to show the workload did what it says."""
        if isinstance(srv, NbdMc):
            st = srv.status()
            got = sum(d["preserved_clusters"] for d in st["disks"])
            self.results["meta"].setdefault("preserved_check", {})[f"{key} {srv.label}"] = \
                {"expected": expect, "preserved_clusters": got}
            if got != expect:
                log(f"  note: {key} {srv.label}: {got} clusters preserved, expected {expect}")

    # -- workload 7 -------------------------------------------------------

    def w7(self):
        from .mirror import mirror_to_ready
        if not util.have("qemu-system-x86_64"):
            self.results["meta"]["w7_skipped"] = "qemu-system-x86_64 missing"
            return
        src = self.template(self.cfg.mirror_size)
        tgt = self.work / "mirror-target.raw"
        for rep in range(self.cfg.reps):
            for srv in self.servers():
                label = srv.label
                log(f"workload 7 (mirror to READY), rep {rep + 1}: {label}")

                def go():
                    util.sparse_file(tgt, self.cfg.mirror_size)
                    self.start(srv, tgt, undo=False)
                    secs, length = mirror_to_ready(self.work / "qemu", src, srv.sock)
                    self.record("w7", label, secs)
                    self.stop(srv)
                self.guarded("workload 7", label, go, srv)
                self.stop(srv)
        if tgt.exists():
            tgt.unlink()

    # -- workload 5 -------------------------------------------------------

    def best_variant(self, key, higher=True):
        """The nbd-mc variant with the best median on an earlier workload."""
        if not self.variants:
            return None
        vals = {}
        for name, args in self.variants:
            v = self.results["w"].get(key, {}).get(f"nbd-mc[{name}]")
            if v:
                vals[(name, tuple(args))] = util.median(v)
        if not vals:
            return self.variants[0]
        pick = (max if higher else min)(vals, key=vals.get)
        return pick[0], list(pick[1])

    def mc_variants_for(self, key):
        if self.cfg.all_variants_everywhere:
            return self.variants
        best = self.best_variant(key)
        return [best] if best else []

    def w5(self):
        import nbd  # libnbd's Python binding (Debian python3-libnbd)
        cfg = self.cfg
        size = cfg.image_size
        tpl = self.template(size)
        img = self.work / "image.raw"
        cs = cfg.commit_cluster
        for name, args in self.mc_variants_for("w2b"):
            label = f"nbd-mc[{name}]"
            # (a) latency against the amount of undo data
            srv = NbdMc(self.work / f"srv-nbdmc-{name}", label, extra_args=args,
                        cluster_size=util.human_size(cs))

            def latency():
                util.fresh_copy(tpl, img)
                self.start(srv, img, undo=True)
                h = nbd.NBD()
                h.connect_uri(srv.uri)
                chunk = os.urandom(MiB)
                series = {}
                for n, trials in cfg.commit_trials.items():
                    span = n * cs
                    if span > size:
                        continue
                    log(f"workload 5: {label}: commit with {n} preserved clusters x{trials}")
                    lat, srv_secs = [], []
                    for t in range(trials):
                        base = ((t * span) % max(MiB, size - span)) // MiB * MiB
                        if base + span > size:
                            base = 0
                        off = base
                        while off < base + span:
                            ln = min(MiB, base + span - off)
                            h.pwrite(chunk[:ln], off)
                            off += ln
                        if t == 0:
                            st = srv.status()
                            got = st["disks"][0]["preserved_clusters"]
                            if got != n:
                                log(f"  note: {got} preserved before commit, expected {n}")
                        t0 = time.perf_counter()
                        r = srv.commit()
                        lat.append(time.perf_counter() - t0)
                        if "seconds" in r:
                            srv_secs.append(float(r["seconds"]))
                    series[n] = {"trials": trials, "lat": lat, "server_seconds": srv_secs}
                h.shutdown()
                self.results["w"].setdefault("w5_latency", {})[label] = series
                self.stop(srv)
            self.guarded("workload 5 latency", label, latency, srv)
            self.stop(srv)

            # (b) sustained commits while workload 2 (random 4 KiB writes) runs
            srv = NbdMc(self.work / f"srv-nbdmc-{name}", label, extra_args=args)

            def sustained():
                util.fresh_copy(tpl, img)
                self.start(srv, img, undo=True)
                rt = cfg.sustain_seconds
                # Baseline: workload 2 as one time-based run from the start of a
                # fresh epoch with no commit (first touches, then re-touches);
                # each run with commits starts from a fresh epoch too.
                base = fio.run(srv.workdir, srv.uri, "randwrite", "4k", runtime=rt,
                               time_based=True)
                out = {"baseline_iops": base.iops}
                for mode, rate in (("paced", cfg.commit_rate), ("max", None)):
                    log(f"workload 5: {label}: commits {mode} during random writes")
                    srv.commit()
                    stats = {"lat": [], "commits": 0, "errors": 0}
                    stop = threading.Event()
                    t = threading.Thread(target=self._committer,
                                         args=(srv, rate, stop, stats), daemon=True)
                    t.start()
                    try:
                        r = fio.run(srv.workdir, srv.uri, "randwrite", "4k", runtime=rt,
                                    time_based=True)
                    finally:
                        stop.set()
                        t.join()
                    out[mode] = {"iops": r.iops, "commits": stats["commits"],
                                 "seconds": stats["seconds"],
                                 "rate": stats["commits"] / stats["seconds"],
                                 "loss": 1 - r.iops / base.iops,
                                 "lat_p50": util.median(stats["lat"]),
                                 "lat_p99": util.percentile(stats["lat"], 99),
                                 "errors": stats["errors"]}
                self.results["w"].setdefault("w5_sustained", {})[label] = out
                self.stop(srv)
            self.guarded("workload 5 sustained", label, sustained, srv)
            self.stop(srv)

    @staticmethod
    def _committer(srv, rate, stop, stats):
        """Commit every 1/rate s (or back to back) on its own control connection."""
        from .ctl import Control, ControlError
        ctl = Control(srv.control_path)
        committed = srv.committed
        t0 = time.perf_counter()
        nxt = t0
        try:
            while not stop.is_set():
                if rate:
                    # a fixed grid of ticks, like a checkpoint timer; a commit
                    # that overran starts the next one at once, but ticks
                    # missed by more than a period are dropped, not made up
                    nxt += 1.0 / rate
                    delay = nxt - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    elif -delay > 1.0 / rate:
                        nxt = time.perf_counter()
                a = time.perf_counter()
                try:
                    r = ctl.execute("commit", epoch=committed + 1)
                    committed = int(r.get("committed", committed + 1))
                    stats["commits"] += 1
                    stats["lat"].append(time.perf_counter() - a)
                except ControlError:
                    stats["errors"] += 1
                    committed = int(ctl.execute("query-status")["committed"])
        finally:
            stats["seconds"] = time.perf_counter() - t0
            srv.committed = committed
            ctl.close()

    # -- workload 6 -------------------------------------------------------

    def w6(self):
        cfg = self.cfg
        size = cfg.image_size
        tpl = self.template(size)
        img = self.work / "image.raw"
        util.fresh_copy(tpl, img)
        sizes = [s for s in cfg.failover_sizes if s <= size]
        res = self.results["w"].setdefault("w6", {})
        for name, args in self.mc_variants_for("w1"):
            label = f"nbd-mc[{name}]"
            for undo in sizes:
                for instant in (False, True):
                    mode = "instant" if instant else "in place"
                    log(f"workload 6: {label}: failover {mode}, {util.human_size(undo)} undo")
                    srv = NbdMc(self.work / f"srv-nbdmc-{name}", label, extra_args=args)

                    def go():
                        self.start(srv, img, undo=True)
                        if undo:
                            fio.run(srv.workdir, srv.uri, "write", "1M", size=undo)
                        st = srv.status()
                        ub = sum(d["undo_bytes"] for d in st["disks"])
                        t0 = time.perf_counter()
                        r = srv.execute("failover", instant=instant)
                        dt = time.perf_counter() - t0
                        res.setdefault(label, []).append(
                            {"undo": undo, "undo_bytes": ub, "mode": mode, "seconds": dt,
                             "server_seconds": r.get("seconds")})
                        self.stop(srv)
                    self.guarded("workload 6", label, go, srv)
                    self.stop(srv)
        # the C anchor's in-place rollback: qemu-img commit of the CBW overlay
        for undo in sizes:
            log(f"workload 6: qsd + qemu-img commit, {util.human_size(undo)} undo")
            srv = Qsd(self.work / "srv-qsd", "qsd")

            def anchor():
                self.start(srv, img, undo=True)
                if undo:
                    fio.run(srv.workdir, srv.uri, "write", "1M", size=undo)
                self.stop(srv)
                t0 = time.perf_counter()
                util.run(["qemu-img", "commit", "-q", "-d", str(srv.overlay)])
                dt = time.perf_counter() - t0
                res.setdefault("qsd", []).append(
                    {"undo": undo, "mode": "qemu-img commit", "seconds": dt})
            self.guarded("workload 6 anchor", "qsd", anchor, srv)
            self.stop(srv)

    # -- workload 8 -------------------------------------------------------

    def w8(self):
        cfg = self.cfg
        big = self.work / "sparse-1T.raw"
        touches = fio.first_touch(cfg.tib_size, cfg.tib_touches, 64 * 1024)
        servers = self.servers(nbdmc=False)
        for name, args in (self.variants if self.variants else []):
            servers.append(NbdMc(self.work / f"srv-nbdmc-{name}", f"nbd-mc[{name}]",
                                 extra_args=args))
        for srv in servers:
            label = srv.label
            log(f"workload 8: {label} serving a {util.human_size(cfg.tib_size)} sparse image")

            def go():
                util.sparse_file(big, cfg.tib_size)
                self.start(srv, big, undo=True)
                phases = {"start": srv.rss_kib()}
                fio.run(srv.workdir, srv.uri, "randwrite", "4k", **touches)
                phases["first touches"] = srv.rss_kib()
                fio.run(srv.workdir, srv.uri, "randread", "4k", runtime=cfg.runtime,
                        time_based=True)
                phases["random reads"] = srv.rss_kib()
                fio.run(srv.workdir, srv.uri, "read", "1M", size=256 * MiB,
                        offset=cfg.tib_size // 2)
                if isinstance(srv, NbdMc):
                    srv.status()
                phases["seq read"] = srv.rss_kib()
                rss, hwm = phases["seq read"]
                self.record("w8", label, hwm / 1024)
                self.results["meta"].setdefault("w8_detail", {})[label] = {
                    "phases": {k: {"rss_mib": v[0] / 1024, "peak_mib": v[1] / 1024}
                               for k, v in phases.items()},
                    "peak_mib": hwm / 1024, "first_touches": cfg.tib_touches}
                self.stop(srv)
            self.guarded("workload 8", label, go, srv)
            self.stop(srv)
        if big.exists():
            big.unlink()

    def w9(self):
        """Resync after a 10 s outage vs a full resync (bench/resync.py)."""
        from .resync import measure
        log("workload 9 (resync after an outage)")
        self.guarded("workload 9", "nbd-mc", lambda: self.results["meta"].__setitem__(
            "w9", measure(self.work / "resync", GiB, 64 * MiB, 10.0)), None)

    # -- driver -----------------------------------------------------------

    def run(self):
        cfg = self.cfg
        t0 = time.time()
        meta = self.results["meta"]
        meta.update(started=time.strftime("%Y-%m-%d %H:%M:%S"), host=platform.node(),
                    cpus=os.cpu_count(), loadavg_start=loadavg(),
                    versions=versions(),
                    nbd_mc=[{"name": n, "args": a} for n, a in self.variants] or None)
        self.results["only"] = sorted(self.only) if self.only else None
        self.results["config"] = {k: (v if not isinstance(v, dict) else
                                      {str(kk): vv for kk, vv in v.items()})
                                  for k, v in cfg.__dict__.items()}
        loads = []
        steps = [((1, 2, 3, 4), self.w1234, True), ((7,), self.w7, True),
                 ((5,), self.w5, False), ((6,), self.w6, True), ((8,), self.w8, True),
                 ((9,), self.w9, True)]
        try:
            for nums, fn, anchors_too in steps:
                if not any(self.want(n) for n in nums):
                    continue
                if not self.variants and not anchors_too:
                    continue
                loads.append(loadavg())
                fn()
        finally:
            self.stop_all()
        loads.append(loadavg())
        meta["loadavg_during"] = loads
        meta["seconds"] = time.time() - t0
        return self.results


def versions():
    out = {}
    for name, cmd in (("fio", ["fio", "--version"]), ("nbdkit", ["nbdkit", "--version"]),
                      ("qemu", ["qemu-storage-daemon", "--version"])):
        try:
            out[name] = util.run(cmd, check=False).stdout.splitlines()[0].strip()
        except Exception:
            out[name] = None
    return out


def write_report(results, out):
    """results.md (also printed) and the PNG plots, into directory `out`."""
    from . import report
    out.mkdir(parents=True, exist_ok=True)
    md = report.markdown(results)
    plots = report.plots(results, out)
    if plots:
        md += "\n## Plots\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
    (out / "results.md").write_text(md)
    print(md)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="longer runs, bigger images, repetitions")
    ap.add_argument("--only", help="comma-separated workload numbers (1-9)")
    ap.add_argument("--out", default=str(util.ROOT / "bench" / "results"))
    ap.add_argument("--work", default=str(util.ROOT / "bench" / "work"))
    ap.add_argument("--no-nbd-mc", action="store_true", help="measure the anchors only")
    ap.add_argument("--variant", action="append",
                    help="only these nbd-mc variants (by name, e.g. serialize)")
    ap.add_argument("--keep-work", action="store_true", help="leave the images in --work")
    ap.add_argument("--report", metavar="RESULTS_JSON",
                    help="only rebuild the table and plots from a results.json into --out")
    a = ap.parse_args(argv)
    if a.report:
        return write_report(json.loads(Path(a.report).read_text()), Path(a.out))
    only = {int(x) for x in a.only.split(",")} if a.only else None
    cfg = Config.make(a.full)

    missing = [p for p in ("fio", "nbdkit", "qemu-storage-daemon", "qemu-img") if not util.have(p)]
    if missing:
        print(f"bench: missing tools: {', '.join(missing)} (run make setup)", file=sys.stderr)
        return 2
    help_text = None if a.no_nbd_mc else nbd_mc_help()
    variants = nbd_mc_variants(help_text, cfg.full) if help_text else []
    if a.variant:
        variants = [v for v in variants if v[0] in a.variant]
    if not variants:
        log("nbd-mc is not available: measuring the anchors only")
    else:
        log("nbd-mc variants: " + ", ".join(n for n, _ in variants))
    log(f"{'FULL' if cfg.full else 'quick'} run; work dir {a.work}")

    bench = Bench(cfg, a.work, a.out, only, variants)
    results = bench.run()
    results["meta"]["nbd_mc_available"] = bool(variants)
    if not variants:
        results["meta"]["nbd_mc_reason"] = (
            "server unavailable" if not a.no_nbd_mc else "skipped (--no-nbd-mc)")

    out = Path(a.out)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_report(results, out)
    log(f"done in {results['meta']['seconds']:.0f} s; results in {out}")
    if not a.keep_work:
        for p in Path(a.work).glob("*.raw"):
            if not p.name.startswith("template-"):
                p.unlink()
        for p in Path(a.work).glob("srv-*"):
            shutil.rmtree(p, ignore_errors=True)
    return 0
