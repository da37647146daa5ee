"""Where a commit's time goes, in process: `python -m bench.commit_profile`.

    .venv/bin/python -m bench.commit_profile [--cluster-size 65536] [--preserved 1000]
                                             [--commits 100] [--work bench/work]

Opens a Group on a fresh state directory (no nbdkit, no control socket), then
`--commits` times: `--preserved` random first-touch 4 KiB writes, and a commit.
Each phase of the commit is wrapped and timed in *thread CPU time*
(CLOCK_THREAD_CPUTIME_ID), which a loaded, shared machine inflates much less
than wall time: what is left is the work the commit path does (in Python and in
the kernel on its behalf), without the waits for a CPU.  The wrapped names are
looked up at run time and skipped when a refactor renamed them.
"""

import argparse
import functools
import os
import random
import shutil
import time
from pathlib import Path

from . import util

PHASES = {  # object -> method names wrapped (missing ones are skipped)
    "group": ("_persist", "_drop_all", "_refresh_fast_path"),
    "state_file": ("save",),
    "overlay": ("drop", "_zero_l1", "_clean_refblocks", "set_epoch", "_clear_bits"),
}


def _wrap(obj, name, times):
    fn = getattr(obj, name, None)
    if fn is None:
        return

    @functools.wraps(fn)
    def timed(*a, **kw):
        t0 = time.thread_time()
        try:
            return fn(*a, **kw)
        finally:
            times.setdefault(name, []).append(time.thread_time() - t0)
    setattr(obj, name, timed)


def main(argv=None):
    from nbd_mc.secondary.engine import Group
    ap = argparse.ArgumentParser(prog="python -m bench.commit_profile",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--cluster-size", type=int, default=65536)
    ap.add_argument("--preserved", type=int, default=1000)
    ap.add_argument("--commits", type=int, default=100)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--work", default=str(util.ROOT / "bench" / "work"))
    a = ap.parse_args(argv)
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    size = util.parse_size(a.size)
    image = util.make_template(work / f"template-{util.human_size(size)}.raw", size)
    state = work / "commit-profile-state"
    shutil.rmtree(state, ignore_errors=True)
    img = util.fresh_copy(image, work / "commit-profile.raw")
    g = Group(str(state), [("vda", str(img))], cluster_size=a.cluster_size)
    try:
        disk = g.disk("vda")
        g.commit(1)
        times = {}
        for name in PHASES["group"]:
            _wrap(g, name, times)
        for name in PHASES["state_file"]:
            _wrap(g.state_file, name, times)
        for name in PHASES["overlay"]:
            _wrap(disk.overlay, name, times)
        buf = os.urandom(4096)
        rng = random.Random(1)
        clusters = size // a.cluster_size
        epoch = 2
        for _ in range(a.commits):
            for _ in range(a.preserved):
                g.write(disk, g.generation, buf, rng.randrange(clusters) * a.cluster_size)
            t0 = time.thread_time()
            g.commit(epoch)
            times.setdefault("commit (total)", []).append(time.thread_time() - t0)
            epoch += 1
    finally:
        g.close()
        shutil.rmtree(state, ignore_errors=True)
        img.unlink(missing_ok=True)
    print(f"commit with {a.preserved} preserved clusters of {a.cluster_size} bytes, "
          f"{a.commits} commits, thread CPU time (µs):")
    for name, v in times.items():
        print(f"  {name:<20} median {util.median(v) * 1e6:8.1f}   "
              f"p90 {util.percentile(v, 90) * 1e6:8.1f}   max {max(v) * 1e6:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
