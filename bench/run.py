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
import shlex
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from . import fio, util
from .servers import NbdkitFile, NbdMc, Qsd, nbd_mc_help
from nbd_mc.statedir import StateDir

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
    guest_size: int            # workloads 9 and 10: the disk
    guest_runtime: int         # seconds per fio job of workload 9
    guest_reps: int
    wa_runtime: int            # workload 10
    epoch_rate: int            # commits/s of workloads 9 and 10 (100 ms epochs)

    @classmethod
    def make(cls, full):
        if full:
            return cls(full=True, image_size=2 * GiB, runtime=15, reps=3,
                       mirror_size=GiB, commit_cluster=4096,
                       commit_trials={1000: 300, 10000: 100, 100000: 20},
                       sustain_seconds=15, commit_rate=100,
                       failover_sizes=[0, 64 * MiB, 256 * MiB, GiB, 2 * GiB],
                       tib_size=TiB, tib_touches=100000, all_variants_everywhere=True,
                       guest_size=512 * MiB, guest_runtime=6, guest_reps=5,
                       wa_runtime=10, epoch_rate=10)
        # 1 GiB: with 512 MiB the sequential workloads (1, 3, 4) last about half
        # a second and start-up costs, not the servers, decided their ratios
        return cls(full=False, image_size=GiB, runtime=3, reps=3,
                   mirror_size=GiB, commit_cluster=4096,
                   commit_trials={1000: 60, 10000: 20, 100000: 5},
                   sustain_seconds=4, commit_rate=100,
                   failover_sizes=[0, 64 * MiB, 256 * MiB, GiB],
                   tib_size=TiB, tib_touches=20000, all_variants_everywhere=False,
                   guest_size=512 * MiB, guest_runtime=2, guest_reps=3,
                   wa_runtime=3, epoch_rate=10)


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

    Read from `nbd-mc serve --help` so the list follows the CLI: in FULL mode
    every choice of --thread-model and also the parallel model with fewer
    worker threads (--threads) than nbdkit's default 16; in quick mode only the
    default thread model.
    """
    variants = []
    m = re.search(r"--thread-model\s+\[([^\]]+)\]", help_text)
    models = m.group(1).split("|") if m else []
    has_threads = re.search(r"--threads\b", help_text) is not None
    default = re.search(r"--thread-model\s+\[[^\]]+\][^\[]*\[default:\s*(\w+)\]", help_text)
    if not full and default and default.group(1) in models:
        # quick: the default model only, so that repetitions fit in a few minutes
        models = [default.group(1)]
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
        self.settle_enabled = True          # sync + warm before each measurement

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
            for p in ([srv.logfile, Path(StateDir(getattr(srv, "state_dir", srv.workdir)).log)]
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
                        if what != "new epoch":
                            self.settle(srv, warm=[images[srv.label]]
                                        if what in self.WARM_STEPS else ())
                        if self.guarded(what, srv.label, lambda: fn(srv) or True, srv) is None:
                            alive.remove(srv)   # a broken server sits out the rest
                            self.stop(srv)
                for srv in servers:
                    self.stop(srv)
            for img in images.values():
                img.unlink(missing_ok=True)

    # steps that read the old data of the image: start them with it in the cache
    WARM_STEPS = ("workload 1", "workload 2 first touch", "workload 3 rand read",
                  "workload 3 seq read")

    def _check_preserved(self, srv, key, expect):
        """nbd-mc's own count of first touches, to show the workload did what it says."""
        if isinstance(srv, NbdMc):
            st = srv.status()
            got = sum(d["preserved_clusters"] for d in st["disks"])
            self.results["meta"].setdefault("preserved_check", {})[f"{key} {srv.label}"] = \
                {"expected": expect, "preserved_clusters": got}
            if got != expect:
                log(f"  note: {key} {srv.label}: {got} clusters preserved, expected {expect}")


    # -- method: every measurement starts from the same page-cache state ---------

    def settle(self, srv=None, warm=()):
        """Write back our own dirty pages, then make `warm` files resident.

        What moved workload 1 from run to run was the page cache, not the
        servers: every server's first-touch run leaves its image (and, with
        undo, as much again in the overlay) dirty, and with 2-4 GiB per server
        the next server in the rotation starts above vm.dirty_background_bytes
        and is throttled by balance_dirty_pages() while writing back its
        predecessor's data.  So before each measurement: sync() (global: other
        users' dirty data throttles us as well), and read the image the step
        works on into the cache, so first touches copy from memory for every
        server alike (the CPU cost is what is compared, not this VM's disk).
        The dirty bytes found before the sync are kept as evidence.
        """
        dirty = util.meminfo_kib("Dirty") + util.meminfo_kib("Writeback")
        if not self.settle_enabled:   # --no-settle: the old method, for comparison
            self.results["meta"].setdefault("dirty_kib_before_sync", []).append(
                [srv.label if srv else "-", dirty])
            return
        util.sync_tree(self.work)
        for f in warm:
            util.warm_file(f)
        self.results["meta"].setdefault("dirty_kib_before_sync", []).append(
            [srv.label if srv else "-", dirty])

    def default_variant(self):
        """The nbd-mc variant run by workloads that take only one (9, 10)."""
        if not self.variants:
            return None
        for name, args in self.variants:
            if name == "serialize":
                return name, args
        return self.variants[0]

    def _commits_during(self, srv, rate):
        """A context manager: commits every 1/rate s on `srv` while the body runs
        (rate < 0: back to back; 0 or an anchor, which has no epochs: none)."""
        bench = self

        class _Ctx:
            def __enter__(self):
                self.stats = {"lat": [], "commits": 0, "errors": 0}
                self.stop = threading.Event()
                self.t = None
                if isinstance(srv, NbdMc) and rate:
                    self.t = threading.Thread(target=bench._committer,
                                              args=(srv, rate if rate > 0 else None,
                                                    self.stop, self.stats),
                                              daemon=True)
                    self.t.start()
                return self.stats

            def __exit__(self, *exc):
                self.stop.set()
                if self.t is not None:
                    self.t.join()
        return _Ctx()

    # -- workload 9: what the guest feels through the mirror --------------------

    GUEST_JOBS = ((1, "4k"), (16, "4k"), (1, "64k"), (16, "64k"))

    def w9(self):
        """fio on a primary qemu-storage-daemon's export, mirrored write-blocking
        onto each target; the three primary+target pairs run side by side and
        take turns for every job (order rotated per repetition)."""
        from .mirror import MirrorPrimary
        cfg = self.cfg
        tpl = self.template(cfg.guest_size)
        mc = self.default_variant()
        for rep in range(cfg.guest_reps):
            targets = self.servers(nbdmc=False)
            if mc:
                targets.append(NbdMc(self.work / "srv-g-nbdmc", f"nbd-mc[{mc[0]}]",
                                     extra_args=mc[1]))
            k = rep % len(targets)
            targets = targets[k:] + targets[:k]
            pairs = []
            for srv in targets:
                prim = MirrorPrimary(srv.workdir / "primary", srv.label)

                def up():
                    src = util.fresh_copy(tpl, self.work / f"guest-src-{srv.workdir.name}.raw")
                    dst = util.fresh_copy(tpl, self.work / f"guest-dst-{srv.workdir.name}.raw")
                    self.start(srv, dst, undo=True)
                    prim.start(src, srv.sock)
                    return True
                if self.guarded("workload 9 start", srv.label, up, srv):
                    pairs.append((srv, prim))
                else:
                    prim.stop()
                    self.stop(srv)
            try:
                for qd, bs in self.GUEST_JOBS:
                    log(f"workload 9: guest rand {bs} writes QD{qd} through the mirror, "
                        f"rep {rep + 1}/{cfg.guest_reps}: " + ", ".join(s.label for s, _ in pairs))
                    for srv, prim in list(pairs):
                        def go():
                            self.settle(srv)
                            before = srv.status()["stats"]["bytes_written"] \
                                if isinstance(srv, NbdMc) else None
                            with self._commits_during(srv, cfg.epoch_rate) as cs:
                                r = fio.run(prim.workdir, prim.uri, "randwrite", bs,
                                            runtime=cfg.guest_runtime, time_based=True,
                                            iodepth=qd)
                            entry = {"rep": rep, "iops": r.iops, "p50_us": r.clat_p50_us,
                                     "p99_us": r.clat_p99_us, "commits": cs["commits"]}
                            if before is not None:
                                # the writes really reached the target through the mirror
                                got = srv.status()["stats"]["bytes_written"] - before
                                entry["target_bytes"] = got
                                entry["client_bytes"] = r.io_bytes
                            job = prim.job()
                            if not job or job.get("status") != "ready":
                                raise RuntimeError(f"mirror job not ready after fio: {job}")
                            self.record(f"w9 qd{qd} {bs}", srv.label, entry)
                            return True
                        if self.guarded("workload 9", srv.label, go, srv) is None:
                            pairs.remove((srv, prim))
                            prim.stop()
                            self.stop(srv)
            finally:
                for srv, prim in pairs:
                    prim.stop()
                    self.stop(srv)
                for p in self.work.glob("guest-*.raw"):
                    p.unlink()

    # -- workload 10: write amplification on the secondary ----------------------

    def w10(self):
        """Bytes the server process writes per byte the client writes: random
        4 KiB writes at QD1 for wa_runtime seconds from a fresh epoch, nbd-mc
        committing every 100 ms; counted from /proc/PID/io of the server."""
        cfg = self.cfg
        size = cfg.guest_size
        tpl = self.template(size)
        img = self.work / "image-wa.raw"
        mc = self.default_variant()
        for rep in range(cfg.reps):
            servers = self.servers(nbdmc=False)
            if mc:
                servers.append(NbdMc(self.work / "srv-wa-nbdmc", f"nbd-mc[{mc[0]}]",
                                     extra_args=mc[1]))
                if "--cluster-size" not in mc[1]:
                    # information: the same with 4 KiB undo clusters
                    servers.append(NbdMc(self.work / "srv-wa-nbdmc4k",
                                         f"nbd-mc[{mc[0]}] 4K clusters",
                                         extra_args=mc[1], cluster_size="4K"))
            k = rep % len(servers)
            servers = servers[k:] + servers[:k]
            for srv in servers:
                log(f"workload 10: write amplification, rep {rep + 1}/{cfg.reps}: {srv.label}")

                def go():
                    util.fresh_copy(tpl, img)
                    self.start(srv, img, undo=True)
                    self.settle(srv, warm=[img])
                    pid = srv.pid()
                    io0 = util.proc_io(pid)
                    with self._commits_during(srv, cfg.epoch_rate) as cs:
                        r = fio.run(srv.workdir, srv.uri, "randwrite", "4k",
                                    runtime=cfg.wa_runtime, time_based=True, iodepth=1)
                    io1 = util.proc_io(pid)
                    d = {k: io1[k] - io0[k] for k in io0}
                    self.record("w10", srv.label, {
                        "rep": rep, "client_bytes": r.io_bytes, "iops": r.iops,
                        "wchar": d["wchar"], "write_bytes": d["write_bytes"],
                        "wa": d["wchar"] / r.io_bytes,
                        "wa_write_bytes": d["write_bytes"] / r.io_bytes,
                        "commits": cs["commits"]})
                    self.stop(srv)
                self.guarded("workload 10", srv.label, go, srv)
                self.stop(srv)
        img.unlink(missing_ok=True)

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
                    lat, srv_secs, floor = [], [], []
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
                        # the floor: the same request on the same channel with no
                        # work (re-committing the committed epoch answers at once)
                        t0 = time.perf_counter()
                        srv.execute("commit", epoch=srv.committed)
                        floor.append(time.perf_counter() - t0)
                    series[n] = {"trials": trials, "lat": lat, "server_seconds": srv_secs,
                                 "floor": floor}
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
                # each run with commits starts from a fresh epoch too.  The
                # baseline and the runs with commits alternate, `reps` times,
                # and each loss is taken against the baseline just before it:
                # one baseline on a loaded machine once gave a "-42% loss".
                runs = {"baseline": [], "paced": [], "max": []}
                for rep in range(cfg.reps):
                    srv.commit()
                    runs["baseline"].append({"iops": fio.run(
                        srv.workdir, srv.uri, "randwrite", "4k", runtime=rt,
                        time_based=True).iops})
                    for mode, rate in (("paced", cfg.commit_rate), ("max", None)):
                        log(f"workload 5: {label}: commits {mode} during random writes, "
                            f"rep {rep + 1}/{cfg.reps}")
                        srv.commit()
                        with self._commits_during(srv, rate or -1) as stats:
                            r = fio.run(srv.workdir, srv.uri, "randwrite", "4k", runtime=rt,
                                        time_based=True)
                        runs[mode].append({
                            "iops": r.iops, "lat": stats["lat"], "commits": stats["commits"],
                            "seconds": stats["seconds"], "errors": stats["errors"],
                            "loss": 1 - r.iops / runs["baseline"][-1]["iops"]})
                out = {"baseline_iops": util.median([x["iops"] for x in runs["baseline"]]),
                       "runs": runs}
                for mode in ("paced", "max"):
                    rs = runs[mode]
                    lat = [v for x in rs for v in x["lat"]]
                    losses = [x["loss"] for x in rs]
                    commits = sum(x["commits"] for x in rs)
                    secs = sum(x["seconds"] for x in rs)
                    out[mode] = {"iops": util.median([x["iops"] for x in rs]),
                                 "commits": commits, "seconds": secs,
                                 "rate": commits / secs,
                                 "loss": util.median(losses), "loss_min": min(losses),
                                 "loss_max": max(losses),
                                 "lat_p50": util.median(lat),
                                 "lat_p99": util.percentile(lat, 99),
                                 "errors": sum(x["errors"] for x in rs)}
                for x in runs["paced"] + runs["max"]:
                    del x["lat"]  # summarised above; keeps results.json small
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

    def w11(self):
        """Resync after a 10 s outage vs a full resync, and the failback's checksum
        sync (bench/resync.py)."""
        from .resync import measure, measure_failback
        log("workload 11 (resync after an outage)")
        self.guarded("workload 11", "nbd-mc", lambda: self.results["meta"].__setitem__(
            "w11", measure(self.work / "resync", GiB, 64 * MiB, 10.0)), None)
        log("workload 11 (failback: checksum sync)")
        self.guarded("workload 11 failback", "nbd-mc", lambda: self.results["meta"].__setitem__(
            "w11_failback", measure_failback(self.work / "resync-failback", GiB, 64 * MiB,
                                             3.0)), None)

    def w13(self):
        """History on vs off side by side (bench/history.py): write amplification,
        QD1 p50, failover with history held, --to-epoch per GiB."""
        from .history import measure, verdict_lines

        def go():
            r = measure(str(self.work / "history"), 256 * MiB if not self.cfg.full else GiB,
                        10.0 if not self.cfg.full else 15.0, 3)
            self.results["meta"]["w13"] = r
            for line in verdict_lines(r):
                log(line)
        log("workload 13 (history on vs off)")
        self.guarded("workload 13", "nbd-mc", go, None)

    def w14(self):
        """Many replicas on one host (bench/replicas.py): 1, 4 and 8 servers of each
        kind, each with its own QD4 client, nbd-mc committing every 100 ms."""
        from .replicas import measure, summary

        def go():
            r = measure(str(self.work / "replicas"), (1, 4, 8), 5 if not self.cfg.full else 15,
                        128 * MiB, reps=1 if not self.cfg.full else 3)
            self.results["meta"]["w14"] = r
            for line in summary(r):
                log(line)
        log("workload 14 (many replicas on one host)")
        self.guarded("workload 14", "nbd-mc", go, None)

    def w15(self):
        """Guest write latency across a slow link: unprotected, sync, async
        (bench/asynclink.py)."""
        from .asynclink import measure, plot
        log("workload 15 (async across a slow link)")

        def go():
            res = measure(self.work / "asynclink", writes=400 if self.cfg.full else 200)
            self.results["meta"]["w15"] = res
            plot(res, self.out)
        self.guarded("workload 15", "nbd-mc", go, None)

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
                 ((9,), self.w9, True), ((10,), self.w10, True),
                 ((5,), self.w5, False), ((6,), self.w6, True), ((8,), self.w8, True),
                 ((11,), self.w11, True), ((13,), self.w13, False),
                 ((14,), self.w14, False), ((15,), self.w15, False)]
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
    ap.add_argument("--only", help="comma-separated workload numbers (1-11, 13-15)")
    ap.add_argument("--serve-args", default="", metavar="ARGS",
                    help="extra `nbd-mc serve` options for every nbd-mc server, one string "
                         "(e.g. \"--cluster-size 4K\"), to compare an engine option")
    ap.add_argument("--out", default=str(util.ROOT / "bench" / "results"))
    ap.add_argument("--work", default=str(util.ROOT / "bench" / "work"))
    ap.add_argument("--no-nbd-mc", action="store_true", help="measure the anchors only")
    ap.add_argument("--variant", action="append",
                    help="only these nbd-mc variants (by name, e.g. serialize)")
    ap.add_argument("--image-size", metavar="SIZE",
                    help="image size of workloads 1-6 (e.g. 2G), overriding the mode's")
    ap.add_argument("--no-settle", action="store_true",
                    help="no sync/warm-up between measurements (the old method; to show "
                         "what the page cache does to the figures)")
    ap.add_argument("--keep-work", action="store_true", help="leave the images in --work")
    ap.add_argument("--report", metavar="RESULTS_JSON",
                    help="only rebuild the table and plots from a results.json into --out")
    a = ap.parse_args(argv)
    if a.report:
        return write_report(json.loads(Path(a.report).read_text()), Path(a.out))
    only = {int(x) for x in a.only.split(",")} if a.only else None
    cfg = Config.make(a.full)
    if a.image_size:
        cfg.image_size = util.parse_size(a.image_size)

    missing = [p for p in ("fio", "nbdkit", "qemu-storage-daemon", "qemu-img") if not util.have(p)]
    if missing:
        print(f"bench: missing tools: {', '.join(missing)} (run make setup)", file=sys.stderr)
        return 2
    help_text = None if a.no_nbd_mc else nbd_mc_help()
    variants = nbd_mc_variants(help_text, cfg.full) if help_text else []
    if a.variant:
        variants = [v for v in variants if v[0] in a.variant]
    serve_args = shlex.split(a.serve_args)
    if serve_args:
        variants = [(n, args + serve_args) for n, args in variants]
    if not variants:
        log("nbd-mc is not available: measuring the anchors only")
    else:
        log("nbd-mc variants: " + ", ".join(n for n, _ in variants))
    log(f"{'FULL' if cfg.full else 'quick'} run; work dir {a.work}")

    bench = Bench(cfg, a.work, a.out, only, variants)
    bench.results["meta"]["serve_args"] = serve_args
    bench.settle_enabled = not a.no_settle
    bench.results["meta"]["settle"] = not a.no_settle
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
