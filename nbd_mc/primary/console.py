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
    """Progress on a terminal (rich bars with rate and ETA), plain lines otherwise.

    State: ``_bar`` (the rich Progress being shown, or None), ``_task``, ``_label``
    and ``_last_pct`` (plain-line progress) belong to the thread running protect.
    """

    def __init__(self, stream=None, quiet: bool = False):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.quiet = quiet
        self._last_pct = -1
        self._label = None
        self._bar = None
        self._task = None

    def say(self, text: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
            return
        self.stream.write(text + "\n")
        self.stream.flush()

    def progress(self, label: str, done: int, total: int) -> None:
        """Show ``done`` of ``total`` bytes for ``label`` (a new label starts a new bar)."""
        if self.quiet or not total:
            return
        if label != self._label:
            self.progress_end()
            self._label = label
            self._last_pct = -1
            if self.tty:
                from rich.console import Console as RichConsole
                from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                           TimeRemainingColumn, TransferSpeedColumn)
                self._bar = Progress(TextColumn("  {task.description}"), BarColumn(),
                                     DownloadColumn(binary_units=True), TransferSpeedColumn(),
                                     TimeRemainingColumn(),
                                     console=RichConsole(file=self.stream), transient=False)
                self._bar.start()
                self._task = self._bar.add_task(label, total=total)
        if self._bar is not None:
            self._bar.update(self._task, completed=min(done, total), total=total)
            return
        pct = min(100, done * 100 // total)
        if pct // 10 != self._last_pct // 10 or pct == 100 and self._last_pct != 100:
            self.stream.write(f"  {label} {pct}% ({_mib(done)} of {_mib(total)})\n")
            self.stream.flush()
        self._last_pct = pct

    def progress_end(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._bar = None
        self._task = None
        self._label = None

    def sync_progress(self, done: int, total: int) -> None:
        self.progress("initial sync", done, total)


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
    if report.mode == "async" and d["lag_ms"]["count"]:
        lag = d["lag_ms"]
        lines.append(f"async: epoch lag median {lag['median'] / 1000:.2f} s, worst "
                     f"{lag['worst'] / 1000:.2f} s; {report.extended} interval(s) extended "
                     f"while the link was behind, {report.backpressure} back-pressure "
                     f"episode(s) at --max-lag ({report.backpressure_slices} paused "
                     "slice(s))")
    lines.append(f"mirrored {_mib(report.mirrored_bytes)} (initial sync "
                 f"{_mib(report.initial_sync_bytes)}) in {report.seconds:.1f} s")
    if report.outages:
        again = report.resyncs[1:]
        lines.append(f"secondary lost {report.outages} time(s); {len(again)} resync(s) "
                     f"({sum(r.mode == 'bitmap' for r in again)} incremental, "
                     f"{sum(r.mode == 'checksum' for r in again)} by checksum) copied "
                     f"{_mib(sum(r.bytes for r in again))}; unprotected "
                     f"{report.unprotected:.1f} s in all")
    if report.verify:
        v = report.verify
        lines.append(f"verify: {_mib(v['verified_bytes'])} checked in {v['slices']} slices, "
                     f"{v['passes']} whole pass(es), {len(v['mismatches'])} mismatched range(s); "
                     f"pause per slice median {v['capture_ms']['median']} ms "
                     f"({v['capture_ms']['per_mib']} ms/MiB)")
        for m in v["mismatches"]:
            lines.append(f"  MISMATCH {m['disk']} offset {m['offset']} length {m['length']} "
                         f"(epoch {m['epoch']})")
        rep = v.get("repaired") or {}
        if rep.get("ranges"):
            lines.append(f"verify: repaired {len(rep['ranges'])} range(s), "
                         f"{rep['bytes']} bytes (a targeted resync at the next checkpoint)")
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
    if report.refused and "promoted to primary" in (report.error or ""):
        # The secondary was failed over: the VM now runs (or is about to) on the
        # other side.  "Keeps running, protect again" would invite split brain.
        return (f"protection stopped: {report.error}\n"
                f"The secondary was FAILED OVER: its disks are now the new primary's, "
                f"and this VM's writes since epoch {report.committed} are on neither side's "
                f"protected copy. STOP THIS VM NOW (e.g. `virsh destroy` or QMP `quit`): "
                f"two running copies of one VM is split brain. Do not run `nbd-mc protect` "
                f"against that secondary again.")
    if report.refused:
        return (f"protection stopped: {report.error}\n"
                f"The VM keeps running UNPROTECTED (mirrors removed); {where}. This "
                f"secondary can take no more checkpoints: start a fresh one and run "
                f"`nbd-mc protect` again (it makes a full sync).")
    return (f"protection stopped: {report.error}\n"
            f"The VM keeps running UNPROTECTED (mirrors removed); {where}. Restart or "
            f"repair the secondary, then run `nbd-mc protect` again: it resyncs what "
            f"changed since that epoch (the dirty bitmaps stay in QEMU), or the whole "
            f"disk if it cannot tell.")
