"""protect's terminal side: stop requests (signals), progress, the closing summary
and what to do after a failure."""

from __future__ import annotations

import os
import select
import signal
import sys
import time

from .report import Report


class StopFlag:
    """SIGINT/SIGTERM ask protect to stop after the current checkpoint.

    A self-pipe lets the interval wait end at once, without polling.
    """

    def __init__(self):
        self.requested: str | None = None
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._old = {}

    def install(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        try:
            os.write(self._w, b"x")
        except OSError:
            pass

    def request(self, why: str) -> None:
        self._handler(signal.SIGTERM, None)
        self.requested = why

    def __call__(self) -> bool:
        return self.requested is not None

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` or until a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self.requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            select.select([self._r], [], [], left)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        os.close(self._r)
        os.close(self._w)


class Console:
    """Progress on a terminal (a bar redrawn in place), plain lines otherwise."""

    def __init__(self, stream=None, quiet: bool = False):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.quiet = quiet
        self._last_pct = -1
        self._bar = False

    def say(self, text: str) -> None:
        if self.quiet:
            return
        if self._bar:
            self.stream.write("\n")
            self._bar = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def sync_progress(self, done: int, total: int) -> None:
        if self.quiet or not total:
            return
        pct = min(100, done * 100 // total)
        if self.tty:
            width = 30
            fill = width * pct // 100
            self.stream.write(f"\r  initial sync [{'#' * fill}{'.' * (width - fill)}] {pct:3d}% "
                              f"{_mib(done)}/{_mib(total)}")
            self.stream.flush()
            self._bar = True
        elif pct // 10 != self._last_pct // 10 or pct == 100 and self._last_pct != 100:
            self.stream.write(f"  initial sync {pct}% ({_mib(done)} of {_mib(total)})\n")
            self.stream.flush()
        self._last_pct = pct


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def summary(report: Report) -> str:
    """The closing lines: what is protected up to where, and how long the VM paused."""
    d = report.as_dict()
    p = d["pause_ms"]
    lines = []
    if report.commits:
        lines.append(f"committed epochs {report.first_epoch}..{report.committed} "
                     f"({report.commits} checkpoints, {report.skipped} skipped)")
    else:
        lines.append(f"no epoch committed by this run (secondary at epoch {report.committed})")
    if p["count"]:
        hook = (f" (of which the hook: median {p['hook_median']:.2f} ms)"
                if p["hook_median"] is not None else "")
        lines.append(f"VM pause per checkpoint: median {p['median']:.2f} ms, worst "
                     f"{p['worst']:.2f} ms{hook}")
    lines.append(f"mirrored {_mib(report.mirrored_bytes)} (initial sync "
                 f"{_mib(report.initial_sync_bytes)}) in {report.seconds:.1f} s")
    for problem in report.problems:
        lines.append(f"warning: while detaching: {problem}")
    return "\n".join(lines)


def failure_advice(report: Report) -> str:
    """What a user should know after protection failed: what runs, what is safe where."""
    where = (f"the secondary holds epoch {report.committed}, the last one it acknowledged"
             if report.committed else "the secondary holds no committed epoch yet")
    if not report.attached:
        return report.error or "refused"
    if report.primary_gone:
        return (f"protection stopped: {report.error}\n"
                f"The primary QEMU is gone; {where}. To continue on the secondary run "
                f"`nbd-mc failover` there: it returns the disks to that epoch and prints "
                f"what to boot.")
    return (f"protection stopped: {report.error}\n"
            f"The VM keeps running UNPROTECTED (mirrors removed); {where}. Restart or "
            f"repair the secondary, then run `nbd-mc protect` again: a new full sync "
            f"makes it consistent at the next commit.")
