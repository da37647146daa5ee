"""Workload 13, history (issue 19): `serve --history` side by side with no history.

The same server, the same image, in one run, alternating history off and on per
repetition:

* write amplification: random 4 KiB writes at QD1 over NBD, a commit every
  100 ms, a retained checkpoint every second (``--history 1h --history-every 1s``);
  bytes the server process hands to write syscalls (``wchar`` of /proc/PID/io)
  per byte the client wrote.  Goal <= 3.05x with history (the floor is 3x: the
  write, the undo copy, the history copy).
* QD1 4 KiB write p50 as the client sees it, history on / off (goal <= 1.1x).
  This is direct NBD, not through a QEMU mirror (workload 9's harness).
* failover to the last commit with the run's history held vs with no history
  (goal <= 1.1x); the run holds ``seconds`` checkpoints, not an hour of them.
* `failover --to-epoch` the oldest retained epoch: seconds per GiB of undo
  applied (the bytes the layers hold).

Run from the repository root:  python -m bench.history --help
(`make bench` runs it as workload 13.)
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

from .undo_granularity import NBD_MC, io_counters, make_image

GOALS = {"wa_on": 3.05, "p50_ratio": 1.1, "failover_ratio": 1.1}


def _serve(img: str, st: str, history: bool) -> None:
    args = ["serve", img, "--state-dir", st]
    if history:
        args += ["--history", "1h", "--history-every", "1s"]
    subprocess.run(NBD_MC + args, check=True, stdout=subprocess.DEVNULL)


def run_once(base: str, work: str, history: bool, seconds: float, epoch_s: float,
             to_oldest: bool = False) -> dict:
    d = tempfile.mkdtemp(prefix=f"hist-{'on' if history else 'off'}-", dir=work)
    img = os.path.join(d, "disk.raw")
    shutil.copyfile(base, img)
    with open(img, "rb") as f:  # warm: the old data comes from the page cache
        while f.read(8 << 20):
            pass
    st = os.path.join(d, "st")
    _serve(img, st, history)
    pid = int(open(os.path.join(st, "nbdkit.pid")).read())
    ctl = ControlClient(os.path.join(st, "control.sock"), timeout=600)
    h = nbd.NBD()
    try:
        epoch = 1
        ctl.execute("commit", epoch=epoch)
        h.connect_unix(os.path.join(st, "nbd.sock"))
        slots = h.get_size() // 4096
        rng = random.Random(3)
        block = rng.randbytes(4096)
        stop = threading.Event()
        commits = []

        def committer():
            nonlocal epoch
            nxt = time.monotonic() + epoch_s
            while not stop.is_set():
                time.sleep(max(0.0, nxt - time.monotonic()))
                nxt += epoch_s
                t = time.perf_counter()
                ctl.execute("commit", epoch=epoch + 1)
                commits.append(time.perf_counter() - t)
                epoch += 1

        before = io_counters(pid)
        th = threading.Thread(target=committer, daemon=True)
        th.start()
        lat = []
        end = time.perf_counter() + seconds
        while (now := time.perf_counter()) < end:
            h.pwrite(block, rng.randrange(slots) * 4096)
            lat.append(time.perf_counter() - now)
        stop.set()
        th.join()
        after = io_counters(pid)
        h.shutdown()
        hist = ctl.execute("query-history")
        out = {"history": history, "writes": len(lat),
               "p50_us": round(statistics.median(lat) * 1e6, 1),
               "commit_p50_ms": round(statistics.median(commits) * 1e3, 2) if commits else None,
               "wa": round((after["wchar"] - before["wchar"]) / (len(lat) * 4096), 3),
               "checkpoints": hist["count"], "history_bytes": hist["bytes"]}
        if to_oldest:
            target = hist["oldest_epoch"]
            r = ctl.execute("failover", to_epoch=target)
            out.update(to_epoch=target, to_epoch_s=r["seconds"],
                       s_per_gib=round(r["seconds"] / max(hist["bytes"], 1) * (1 << 30), 3))
        else:
            out["failover_s"] = ctl.execute("failover")["seconds"]
        return out
    finally:
        try:
            ctl.close()
        except OSError:
            pass
        subprocess.run(NBD_MC + ["stop", "--state-dir", st], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(d, ignore_errors=True)


def measure(work: str, image_size: int = 256 << 20, seconds: float = 10.0,
            repetitions: int = 3, epoch_s: float = 0.1) -> dict:
    os.makedirs(work, exist_ok=True)
    base = os.path.join(work, "history-base.raw")
    make_image(base, image_size)
    runs = []
    try:
        for rep in range(repetitions):
            order = (False, True) if rep % 2 == 0 else (True, False)
            pair = {on: run_once(base, work, on, seconds, epoch_s) for on in order}
            oldest = run_once(base, work, True, seconds, epoch_s, to_oldest=True)
            runs.append({"rep": rep, "off": pair[False], "on": pair[True], "to_oldest": oldest})
    finally:
        os.unlink(base)

    def med(key, side):
        return statistics.median(r[side][key] for r in runs)

    p50 = [r["on"]["p50_us"] / r["off"]["p50_us"] for r in runs]
    fo = [r["on"]["failover_s"] / r["off"]["failover_s"] for r in runs]
    summary = {
        "wa_off": med("wa", "off"), "wa_on": med("wa", "on"),
        "p50_off_us": med("p50_us", "off"), "p50_on_us": med("p50_us", "on"),
        "p50_ratio": statistics.median(p50), "p50_ratio_range": [min(p50), max(p50)],
        "failover_off_ms": med("failover_s", "off") * 1e3,
        "failover_on_ms": med("failover_s", "on") * 1e3,
        "failover_ratio": statistics.median(fo), "failover_ratio_range": [min(fo), max(fo)],
        "checkpoints_held": med("checkpoints", "on"),
        "to_oldest_s_per_gib": statistics.median(r["to_oldest"]["s_per_gib"] for r in runs),
        "to_oldest_bytes": statistics.median(r["to_oldest"]["history_bytes"] for r in runs),
    }
    return {"summary": summary, "runs": runs, "image_size": image_size, "seconds": seconds}


def verdict_lines(result: dict) -> list[str]:
    s = result["summary"]
    lines = []
    for key, label, value in (
            ("wa_on", "13. write amplification, history every 1 s", s["wa_on"]),
            ("p50_ratio", "13. QD1 4 KiB write p50, history on / off", s["p50_ratio"]),
            ("failover_ratio", "13. failover to the last commit, history held / none",
             s["failover_ratio"])):
        goal = GOALS[key]
        lines.append(f"{label}: {value:.3f}x (goal <= {goal}x) "
                     f"{'MET' if value <= goal else 'MISSED'}")
    lines.append(f"13. write amplification without history: {s['wa_off']:.3f}x; p50 "
                 f"{s['p50_off_us']:.0f} / {s['p50_on_us']:.0f} us (off / on); failover "
                 f"{s['failover_off_ms']:.1f} / {s['failover_on_ms']:.1f} ms with "
                 f"{s['checkpoints_held']:.0f} checkpoints held")
    lines.append(f"13. failover --to-epoch the oldest: {s['to_oldest_s_per_gib']:.2f} s per GiB "
                 f"of undo applied ({s['to_oldest_bytes'] / (1 << 20):.0f} MiB held)")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "work"))
    ap.add_argument("--image-size", type=int, default=256 << 20)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    result = measure(a.work, a.image_size, a.seconds, a.repetitions)
    if a.json:
        print(json.dumps(result, indent=1))
    print("\n".join(verdict_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
