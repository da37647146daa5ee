"""Where a write request's time goes, in process (issue 22, item 1).

The engine (nbd_mc/secondary/engine.py ``Group.write``) is driven directly, with
no nbdkit and no NBD, on an image that lives in the page cache, so only our own
work is measured -- as CPU time of this thread (``time.thread_time``), which the
load of a shared machine does not inflate the way it inflates wall time.

Cases, each a fresh epoch of ``--count`` writes at distinct clusters:

* ``floor``          ``os.pwrite`` of the buffer into the image: what any Python
                      server pays (the trivial plugin's own work);
* ``4K first``       4 KiB writes, each the first touch of its cluster (preserve);
* ``4K re-touch``    the same offsets again in the same epoch (bitmap check only);
* ``64K first``      64 KiB writes, each the first touch of a whole cluster.

``--profile`` adds a cProfile breakdown of each case by function (tottime, the
time spent in the function itself) grouped into the phases of a preserve.

    .venv/bin/python -m bench.request_cost [--count 4000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time

from .undo_granularity import make_image

# function name (pstats key) -> phase of a write
PHASES = {
    "pread_into": "read old data", "preadv": "read old data",
    "find": "zero check", "startswith": "zero check",
    "_current_entries": "metadata", "_tables_needed": "metadata", "allocate": "metadata",
    "_mark_entries": "metadata", "_publish": "metadata", "_set_bits": "metadata",
    "_cluster_marked": "metadata", "pack_u64s": "metadata", "_empty_table": "metadata",
    "fallocate": "metadata", "copy_file_range": "copy old data",
    "_write_data": "write old data", "pwritev": "write old data",
    "pwrite": "pwrite (image/overlay)", "pwrite_all": "pwrite (image/overlay)",
    "write": "engine", "preserve": "preserve (own)", "_preserve_into": "preserve (own)",
    "is_preserved": "bitmap check",
}


#: a py-spy stack -> the phase of a write request it is in: the first of these
#: frames (innermost first) found in the stack names it
SPY_PHASES = [
    ("pread_into (nbd_mc/fileio.py", "preserve: read old data", "UndoOverlay.preserve"),
    ("_write_data", "preserve: write old data", None),
    ("HostSpace.allocate", "preserve: allocate + refcount", None),
    ("_publish", "preserve: L2/L1 entries", None),
    ("_current_entries", "preserve: read entries", None),
    ("UndoOverlay.preserve", "preserve: rest", None),
    ("Disk._preserve_into", "preserve: lock + bitmap", None),
    ("pwrite_all", "image pwrite", "Group.write"),
    ("Group.write", "engine: rest", None),
    ("pwrite (nbd_mc/secondary/nbdkit_plugin", "plugin glue", None),
    ("UndoOverlay.drop", "commit: drop", None),
    ("ControlServer", "control channel", None),
]


#: innermost frames that wait rather than work (a blocking read, a condition)
_WAITS = ("LineReader.readline", "Condition.wait", "Event.wait", "select", "accept")


def spy_breakdown(path: str) -> dict:
    """Share of py-spy samples (``py-spy record -f raw``) per phase of a request."""
    counts: dict = {}
    total = 0
    for line in open(path):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        n = int(n)
        total += n
        frames = [f for f in stack.split(";") if f]
        if not frames:  # no Python frame: nbdkit's own C code (or a thread between calls)
            counts["outside Python"] = counts.get("outside Python", 0) + n
            continue
        if any(w in frames[-1] for w in _WAITS):
            counts["waiting"] = counts.get("waiting", 0) + n
            continue
        phase = "other"
        for needle, name, within in SPY_PHASES:
            hit = [i for i, f in enumerate(frames) if f.startswith(needle) or needle in f]
            if hit and (within is None or any(within in f for f in frames[:hit[-1]])):
                phase = name
                break
        counts[phase] = counts.get(phase, 0) + n
    # shares of the samples that were doing our work (a Python frame, not waiting):
    # py-spy samples every thread, and nbdkit's idle workers have no Python frame
    idle = {k: counts.pop(k, 0) for k in ("outside Python", "waiting")}
    busy = sum(counts.values()) or 1
    out = {k: round(v / busy * 100, 1) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
    out["_samples"] = {"busy": busy, **idle, "total": total}
    return out


def _phase_table(prof: cProfile.Profile, n: int) -> dict:
    st = pstats.Stats(prof)
    out: dict = {}
    for (_file, _line, name), (_cc, _nc, tt, _ct, _callers) in st.stats.items():
        key = name.strip("<>").split(" ")[-1].split(".")[-1].rstrip("'>")
        phase = PHASES.get(key, "other: " + key)
        out[phase] = out.get(phase, 0.0) + tt
    return {k: round(v / n * 1e6, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])
            if v / n * 1e6 >= 0.5}


def measure(work: str, count: int, size: int, profile: bool, cluster_size: int = 65536,
            subclusters: bool | None = None) -> dict:
    from nbd_mc.secondary.engine import Group
    d = tempfile.mkdtemp(prefix="reqcost-", dir=work)
    img = os.path.join(d, "disk.raw")
    make_image(img, size)
    g = Group(os.path.join(d, "st"), [("disk", img)], cluster_size=cluster_size,
              subclusters=subclusters)
    try:
        disk = g.disk("disk")
        epoch = 1
        g.commit(epoch)
        rng = random.Random(5)
        clusters = rng.sample(range(size // cluster_size), count)
        b4, b64 = rng.randbytes(4096), rng.randbytes(65536)
        res = {}

        def run(label, fn):
            per = []
            prof = cProfile.Profile(time.thread_time) if profile else None
            t0 = time.thread_time()
            if prof:
                prof.enable()
            for c in clusters:
                s = time.thread_time_ns()
                fn(c * cluster_size)
                per.append(time.thread_time_ns() - s)
            if prof:
                prof.disable()
            total = time.thread_time() - t0
            r = {"cpu_us_per_req": round(total / count * 1e6, 2),
                 "p50_us": round(statistics.median(per) / 1e3, 2)}
            if prof:
                r["profile_us"] = _phase_table(prof, count)
            res[label] = r

        fd = disk.fd
        run("floor 4K pwrite", lambda off: os.pwrite(fd, b4, off))
        epoch += 1
        g.commit(epoch)
        run("4K first", lambda off: g.write(disk, g.generation, b4, off))
        run("4K re-touch", lambda off: g.write(disk, g.generation, b4, off))
        epoch += 1
        g.commit(epoch)
        run("floor 64K pwrite", lambda off: os.pwrite(fd, b64, off))
        run("64K first", lambda off: g.write(disk, g.generation, b64, off))
        run("64K re-touch", lambda off: g.write(disk, g.generation, b64, off))
        res["_meta"] = {"count": count, "image": size, "cluster_size": cluster_size,
                        "unit_size": disk.overlay.unit_size, "load": os.getloadavg()[0]}
        return res
    finally:
        g.close()
        shutil.rmtree(d, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.request_cost",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=4000)
    ap.add_argument("--size", type=int, default=512, help="image MiB")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--reps", type=int, default=3, help="median of this many runs")
    ap.add_argument("--work", default=tempfile.gettempdir())
    ap.add_argument("--spy", metavar="RAW", help="only print the phase shares of a py-spy "
                    "raw profile of a server (py-spy record -f raw -p PID)")
    a = ap.parse_args(argv)
    if a.spy:
        json.dump(spy_breakdown(a.spy), sys.stdout, indent=1)
        print()
        return 0
    runs = [measure(a.work, a.count, a.size << 20, a.profile) for _ in range(a.reps)]
    out = {}
    for k in runs[0]:
        if k == "_meta":
            out[k] = runs[0][k]
            continue
        vals = sorted(r[k]["cpu_us_per_req"] for r in runs)
        out[k] = {"cpu_us_per_req": statistics.median(vals), "min": vals[0], "max": vals[-1]}
        if a.profile:
            out[k]["profile_us"] = runs[len(runs) // 2][k]["profile_us"]
    floor = out["floor 4K pwrite"]["cpu_us_per_req"]
    for k in ("4K first", "4K re-touch"):
        out[k]["x_floor"] = round(out[k]["cpu_us_per_req"] / floor, 2)
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
