"""Everything a protect run tells the outside, through one object.

A run has three audiences: the console (console.py: lines, progress bars), the
metrics file (metrics.py, --metrics-file) and, through it, the event stream
(eventstream.py, --events); all three read the run's report (report.py).
protect.py notifies one Observer, which fans each notification out, so the
orchestration says *what happened* once and never which outputs exist.

State: none of its own beyond the three it was built with, all used only by the
thread that runs protect.
"""

from __future__ import annotations

from .console import Console
from .metrics import ProtectMetrics
from .report import Report


class Observer:
    def __init__(self, console: Console, metrics: ProtectMetrics, report: Report):
        self.console = console
        self.metrics = metrics
        self.report = report

    def start(self) -> None:
        """Before protect attaches: the metrics file's first write (an unusable path
        raises OSError then, and only then)."""
        self.metrics.start(self.report)

    @property
    def error(self) -> str | None:
        """Why an output could not be written (the metrics file, the event stream)."""
        return self.metrics.error

    def say(self, line: str) -> None:
        """One line for the person watching."""
        self.console.say(line)

    def state(self, state: str, reason: str | None = None) -> None:
        """protect entered a phase (phase.Phase.state names it); ``reason``: why
        the secondary was lost."""
        self.metrics.set_state(state, self.report, reason)

    def progress(self, label: str, done: int, total: int) -> None:
        """A (re)sync copied or compared ``done`` of ``total`` bytes."""
        self.console.progress(label, done, total)
        self.metrics.sync_progress(done, total, self.report)

    def progress_end(self) -> None:
        self.console.progress_end()

    @property
    def watching_link(self) -> bool:
        """Whether anyone reads the link's figures (a metrics file): they cost QMP
        queries, asked only then."""
        return bool(self.metrics.path)

    def rate(self, speed: int) -> None:
        """The --rate in force (read with the next write)."""
        self.metrics.link.rate = speed

    def link(self, out_of_sync: int, in_flight: int, lag: float | None) -> None:
        """The link's figures changed (metrics.Link)."""
        link = self.metrics.link
        link.out_of_sync, link.in_flight, link.lag = out_of_sync, in_flight, lag
        self.metrics.write(self.report)

    def checkpointed(self, committed: bool, mirrored: int | None, epoch: int,
                     skipped: str | None) -> None:
        """A checkpoint ended: committed, or ``skipped`` says why not; ``mirrored``:
        the mirror jobs' bytes, if known."""
        self.metrics.checkpointed(self.report, committed, mirrored, epoch, skipped)
