"""Workload 13: what a guest feels across a slow link -- unprotected, `protect
--mode sync` and `--mode async`, side by side, at added round trips of 0, 1, 5
and 20 ms.

    .venv/bin/python -m bench.asynclink [--rtts 0,1,5,20] [--writes 400] [--out DIR]

Per round trip: the secondary (`nbd-mc serve`) sits behind the link emulator
(tests/support/link.py, run as its own process so that its forwarding threads do
not share the measuring process's interpreter): NBD over TCP and the control
channel, each direction delayed by half the round trip.  The primary is
`qemu-system-x86_64 -machine none` with a 64 MiB raw drive; the "guest" is HMP
``qemu-io`` writing 4 KiB at random 4 KiB-aligned offsets, one at a time (QD1).
The latency of each write is QEMU's own measurement (qemu-io's ops/sec for the
one request), so the monitor round trip of the HMP command is not in it.  HMP
would write while the VM is paused; the writer waits for the VM to run before
each write, as a vCPU would (a race of a few microseconds remains), and the
pause is not in the latency figure: pauses are reported on their own, from
protect's --json report (p50/p99), as is the committed-epoch lag of the async
mode.  Bytes shipped are the mirror jobs' progress after the
initial sync, per byte the guest wrote.

Writes: results.json-style dict (returned, and ``async.json`` in --out) and
``async_latency.png``: guest write latency p50 against the round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import util

MiB = 1 << 20
DISK = 64 * MiB
INTERVAL = "100ms"
_OPS = re.compile(r"and ([0-9.]+) ops/sec")


def _link(target: str, rtt_ms: float, listen: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "support.link", "--listen", listen,
                             "--to", target, "--rtt", f"{rtt_ms}ms"],
                            cwd=util.ROOT / "tests", stdout=subprocess.PIPE, text=True)
    where = proc.stdout.readline().strip()
    return proc, where


class Site:
    """A secondary behind a link of ``rtt_ms``, and a primary QEMU."""

    def __init__(self, work: Path, rtt_ms: float):
        self.work = work
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        self.replica = work / "vda.raw"
        self.image = work / "drive0.raw"
        for p in (self.replica, self.image):
            with open(p, "wb") as f:
                f.truncate(DISK)
        self.state = work / "st"
        util.run([str(util.VENV_BIN / "nbd-mc"), "serve", f"vda={self.replica}",
                  "--state-dir", str(self.state)], timeout=120)
        self.nbd_link, port = _link(str(self.state / "nbd.sock"), rtt_ms, "0")
        self.ctl_link, self.ctl = _link(str(self.state / "control.sock"), rtt_ms,
                                        str(work / "ctl-link.sock"))
        self.target = f"nbd://127.0.0.1:{port}/"
        self.qmp_path = work / "qemu.qmp"
        self.test_qmp = work / "qemu-test.qmp"
        self.qemu_out = work / "qemu.out"  # HMP qemu-io prints its results here
        self.qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
             "-qmp", f"unix:{self.test_qmp},server=on,wait=off",
             "-drive", f"if=none,id=drive0,file={self.image},format=raw"],
            stdin=subprocess.DEVNULL, stdout=open(self.qemu_out, "wb"),
            stderr=subprocess.STDOUT)
        from nbd_mc.primary import PrimaryGone, Qmp

        def connected():
            if not self.test_qmp.exists():
                return None
            try:
                return Qmp(str(self.test_qmp))
            except PrimaryGone:  # the file exists a moment before QEMU listens
                return None
        self.qmp = None
        util.wait_for(lambda: (self.qmp or setattr(self, "qmp", connected()) or self.qmp),
                      30, "QEMU's QMP socket")

    def committed(self) -> int:
        return json.loads(util.run([str(util.VENV_BIN / "nbd-mc"), "status", "--json",
                                    "--state-dir", str(self.state)]).stdout)["committed"]

    def writes(self, n: int, rng: random.Random) -> None:
        """n QD1 4 KiB writes (their latencies: latencies(), once QEMU quit)."""
        for _ in range(n):
            off = rng.randrange(0, DISK // 4096) * 4096
            # a vCPU does not write while the VM is paused; HMP would: wait as a vCPU
            # would (a poll: this is a bench, and the wait is not in the latency)
            while not self.qmp.cmd("query-status")["running"]:
                time.sleep(0.001)
            self.qmp.hmp(f'qemu-io drive0 "write -P {rng.randrange(1, 256)} {off} 4k"')

    def latencies(self) -> list[float]:
        """Quit QEMU (its stdout is flushed) and read each write's latency in seconds
        from qemu-io's result lines ("... and N ops/sec" for one request)."""
        from nbd_mc.primary import PrimaryGone
        try:
            self.qmp.cmd("quit")
        except PrimaryGone:
            pass
        self.qemu.wait(60)
        text = self.qemu_out.read_text(errors="replace")
        if "failed" in text:
            raise RuntimeError("a guest write failed: " + text[-1000:])
        return [1 / float(m.group(1)) for m in _OPS.finditer(text) if float(m.group(1)) > 0]

    def protect(self, mode: str) -> subprocess.Popen:
        return subprocess.Popen(
            [str(util.VENV_BIN / "nbd-mc"), "protect", "--qmp", str(self.qmp_path),
             "--drive", "drive0=vda", "--target", self.target, "--control", self.ctl,
             "--mode", mode, "--interval", INTERVAL, "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=util.env())

    def close(self) -> None:
        self.qmp.close()
        for p in (self.qemu, self.nbd_link, self.ctl_link):
            if p.poll() is None:
                p.kill()
            p.wait()
        util.run([str(util.VENV_BIN / "nbd-mc"), "stop", "--state-dir", str(self.state)],
                 check=False, timeout=60)


def _pct(values, p):
    return util.percentile(values, p) if values else None


def measure(work: Path, rtts=(0, 1, 5, 20), writes: int = 400, seed: int = 1) -> dict:
    rng = random.Random(seed)
    out = {"rtts_ms": list(rtts), "writes": writes, "interval": INTERVAL, "rows": []}
    for rtt in rtts:
        for mode in ("unprotected", "sync", "async"):
            for attempt in (1, 2):
                try:
                    row = _one(work, rtt, mode, writes, rng)
                    break
                except Exception as e:  # a bench goes on; the error is in the results
                    print(f"[asynclink] rtt {rtt} {mode}: {e!r}", file=sys.stderr, flush=True)
                    out.setdefault("errors", []).append(f"rtt {rtt} ms {mode} (attempt "
                                                        f"{attempt}): {e!r}"[:500])
            else:
                continue
            print(f"[asynclink] {row}", file=sys.stderr, flush=True)
            out["rows"].append(row)
    return out


def _one(work: Path, rtt, mode: str, writes: int, rng: random.Random) -> dict:
    """One mode at one round trip: a fresh site, the writes, the figures."""
    site = Site(work / f"rtt{rtt}-{mode}", rtt)
    row = {"rtt_ms": rtt, "mode": mode}
    proc = None
    try:
        if mode == "unprotected":
            site.writes(writes, rng)
        else:
            proc = site.protect(mode)
            util.wait_for(lambda: proc.poll() is not None or site.committed() >= 1,
                          300, "the first commit", interval=0.1)
            if proc.poll() is not None:
                raise RuntimeError(f"protect ended: {proc.communicate()[1][-2000:]}")
            site.writes(writes, rng)
            time.sleep(0.5)  # let the last epochs commit (a bench, not a test)
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=120)
            rep = json.loads(stdout)
            shipped = rep["mirrored_bytes"] - rep["initial_sync_bytes"]
            row.update(pause_p50_ms=rep["pause_ms"]["median"],
                       pause_p99_ms=rep["pause_ms"].get("p99"),
                       commits=rep["commits"], outages=rep["outages"],
                       lag_p50_ms=rep["lag_ms"]["median"], lag_p99_ms=rep["lag_ms"]["p99"],
                       shipped_bytes=shipped,
                       shipped_per_written=round(shipped / (writes * 4096), 2))
        lat = site.latencies()
        row.update(write_p50_us=round(_pct(lat, 50) * 1e6, 1),
                   write_p99_us=round(_pct(lat, 99) * 1e6, 1), samples=len(lat))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        site.close()
    return row


def markdown(res: dict) -> str:
    """The table.  A write's ratio is to the median of the unprotected p50s over all
    round trips: an unprotected write does not touch the link, so its figures at
    the four round trips are four samples of one quantity (on a shared machine
    one of them may be a load spike)."""
    lines = ["| RTT | mode | write p50 (x unprotected) | write p99 | pause p50 | pause p99 "
             "| lag p50 | lag p99 | shipped/written |", "|---|---|---|---|---|---|---|---|---|"]
    unprotected = [r["write_p50_us"] for r in res["rows"] if r["mode"] == "unprotected"]
    base = util.median(unprotected) if unprotected else None

    def ms(v):
        return "-" if v is None else f"{v:.1f} ms"
    for r in res["rows"]:
        ratio = r["write_p50_us"] / base if base else None
        lines.append(
            f"| {r['rtt_ms']} ms | {r['mode']} | {r['write_p50_us']:.0f} µs"
            + (f" ({ratio:.2f}x)" if ratio else "")
            + f" | {r['write_p99_us']:.0f} µs | {ms(r.get('pause_p50_ms'))} | "
            f"{ms(r.get('pause_p99_ms'))} | {ms(r.get('lag_p50_ms'))} | "
            f"{ms(r.get('lag_p99_ms'))} | {r.get('shipped_per_written', '-')} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, outdir: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("unprotected", "k--"), ("sync", "r-o"), ("async", "b-s")):
        rows = [r for r in res["rows"] if r["mode"] == mode]
        ax.plot([r["rtt_ms"] for r in rows], [r["write_p50_us"] / 1000 for r in rows], style,
                label=f"{mode} p50")
        ax.plot([r["rtt_ms"] for r in rows], [r["write_p99_us"] / 1000 for r in rows],
                style[0] + ":", alpha=0.5, label=f"{mode} p99")
    ax.set_xlabel("added round trip to the secondary (ms)")
    ax.set_ylabel("guest 4 KiB QD1 write latency (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Guest write latency against the link's round trip")
    fig.tight_layout()
    path = outdir / "async_latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtts", default="0,1,5,20")
    ap.add_argument("--writes", type=int, default=400)
    ap.add_argument("--work", default=str(util.ROOT / "bench" / "work" / "asynclink"))
    ap.add_argument("--out", default=str(util.ROOT / "bench" / "results"))
    ap.add_argument("--report", metavar="JSON", help="only rebuild the table and plot")
    a = ap.parse_args(argv)
    if a.report:
        res = json.loads(Path(a.report).read_text())
        out = Path(a.out)
        plot(res, out)
        md = markdown(res)
        (out / "async.md").write_text(md)
        print(md)
        return 0
    res = measure(Path(a.work), [float(x) if "." in x else int(x) for x in a.rtts.split(",")],
                  a.writes)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "async.json").write_text(json.dumps(res, indent=1))
    plot(res, out)
    md = markdown(res)
    (out / "async.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
