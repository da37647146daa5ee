"""`nbd-mc protect --metrics-file PATH`: protect's progress as ``nbd_mc_protect_*``.

The file is rewritten atomically after every checkpoint and while a (re)sync runs;
docs/metrics.md lists the series.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client.core import (CounterMetricFamily, StateSetMetricFamily,
                                    SummaryMetricFamily)

from ..metrics import gauge as _gauge, write_textfile
from .eventstream import EventStream

#: protect's states, in order (nbd_mc_protect_state{state=...}): "lost" while the
#: secondary is away (the VM runs unprotected), "resyncing" when it is back.
PROTECT_STATES = ("connecting", "syncing", "resyncing", "checkpointing", "lost", "detached",
                  "failed")
#: How a (re)sync brought the secondary in step (protect --json ``resyncs[].mode``):
#: everything, what a dirty bitmap marked, or what differed by content.
RESYNC_MODES = ("full", "bitmap", "checksum")


@dataclass
class Link:
    """What operators watch on a link (DRBD's oos, pending, lag), None until known:
    bytes the committed epoch lacks, bytes not yet on the secondary, seconds the
    committed epoch trails (async), the --rate in force (bytes/s, 0 unlimited)."""

    out_of_sync: int | None = None
    in_flight: int | None = None
    lag: float | None = None
    rate: int | None = None


def resync_mode(r) -> str:
    """A resync's mode; a protect without ``Resync.mode`` knew only full and bitmap."""
    return getattr(r, "mode", None) or ("full" if r.full else "bitmap")


class ProtectMetrics:
    """protect's metrics file, rewritten after every checkpoint; a no-op without a path.

    State (used only by the thread that runs protect):
      state          one of PROTECT_STATES
      sync           (bytes copied, bytes to copy) of the running (re)sync, or None
      mirrored       bytes the mirror jobs copied, as of the last checkpoint
      last_commit    wall clock of the last commit by this protect, or None
      events         the --events stream (eventstream.py) it forwards each
                     notification to, or None
      link           the link's figures (Link; protect's _link_metrics)

    protect's Observer (observer.py) notifies it of state changes, checkpoints and
    sync progress; the event stream hears of them through it.
    """

    def __init__(self, path: str | None, vm: str = "", events: str | None = None):
        self.path = path
        self.events = EventStream(events) if events else None
        self.vm = vm
        self.state = "connecting"
        self.sync: tuple[int, int] | None = None
        self.mirrored = 0
        self.last_commit: float | None = None
        self.link = Link()
        self._last_sync_write = 0.0
        self._file_error: str | None = None
        self._events_error: str | None = None
        if self.events is not None and self.events.error:
            self._events_error, self.events = self.events.error, None

    @property
    def error(self) -> str | None:
        """Why the metrics file or the event stream could not be written (the last
        failure of the file, the failure that silenced the stream), or None."""
        return "; ".join(e for e in (self._file_error, self._events_error) if e) or None

    def families(self, report) -> list:
        v = {"vm": self.vm}
        state = StateSetMetricFamily("nbd_mc_protect_state", "What protect is doing.",
                                     labels=["vm"])
        state.add_metric([self.vm], {s: s == self.state for s in PROTECT_STATES})
        fams = [state,
                _gauge("nbd_mc_protect_committed_epoch", "The last epoch the secondary "
                       "acknowledged.", v, report.committed)]
        for name, doc, value in (
                ("nbd_mc_protect_commits", "Checkpoints committed by this protect.",
                 report.commits),
                ("nbd_mc_protect_skipped_commits", "Checkpoints whose commit the hook skipped.",
                 report.skipped)):
            c = CounterMetricFamily(name, doc, labels=["vm"])
            c.add_metric([self.vm], value)
            fams.append(c)
        pauses = report.pauses
        s = SummaryMetricFamily("nbd_mc_protect_pause_seconds", "How long the VM was "
                                "paused per checkpoint.", labels=["vm"])
        s.add_metric([self.vm], count_value=len(pauses), sum_value=sum(pauses))
        fams.append(s)
        if pauses:
            fams.append(_gauge("nbd_mc_protect_last_pause", "The last checkpoint's pause.",
                               v, pauses[-1], unit="seconds"))
            fams.append(_gauge("nbd_mc_protect_max_pause", "The longest pause so far.",
                               v, max(pauses), unit="seconds"))
        if self.last_commit is not None:
            fams.append(_gauge("nbd_mc_protect_last_commit_timestamp", "Unix time of the "
                               "last commit.", v, self.last_commit, unit="seconds"))
        fams.append(_gauge("nbd_mc_protect_initial_sync", "Bytes copied by the initial "
                           "full sync.", v, report.initial_sync_bytes, unit="bytes"))
        fams.append(_gauge("nbd_mc_protect_mirrored", "Bytes the mirror jobs copied so far.",
                           v, max(self.mirrored, report.mirrored_bytes), unit="bytes"))
        if report.resyncs:
            # the last finished (re)sync: how it was done and what it cost (the
            # ocf:nbd-mc:protect supervisor reports a failback's resync from these)
            last = report.resyncs[-1]
            mode = StateSetMetricFamily("nbd_mc_protect_last_resync_mode", "How the last "
                                        "(re)sync brought the secondary in step.",
                                        labels=["vm"])
            mode.add_metric([self.vm], {m: m == resync_mode(last) for m in RESYNC_MODES})
            fams += [mode,
                     _gauge("nbd_mc_protect_last_resync", "Bytes the last (re)sync copied.",
                            v, last.bytes, unit="bytes"),
                     _gauge("nbd_mc_protect_last_resync_duration", "How long the last "
                            "(re)sync took.", v, last.seconds, unit="seconds")]
        for name, doc, value, unit in (
                ("nbd_mc_protect_out_of_sync", "Bytes written since the committed epoch "
                 "(what a failover now would lose).", self.link.out_of_sync, "bytes"),
                ("nbd_mc_protect_in_flight", "Bytes written on the primary and not yet on "
                 "the secondary.", self.link.in_flight, "bytes"),
                ("nbd_mc_protect_epoch_lag", "How far the committed epoch trails the "
                 "primary (async mode).", self.link.lag, "seconds"),
                ("nbd_mc_protect_rate", "The --rate in force per copy job (0: "
                 "unlimited).", self.link.rate, "bytes_per_second")):
            if value is not None:
                fams.append(_gauge(name, doc, v, value, unit=unit))
        bp = CounterMetricFamily("nbd_mc_protect_backpressure", "Episodes of --max-lag "
                                 "back-pressure (the VM ran in slices between pauses "
                                 "until the backlog had crossed).", labels=["vm"])
        bp.add_metric([self.vm], getattr(report, "backpressure", 0))
        fams.append(bp)
        if self.sync is not None:
            fams.append(_gauge("nbd_mc_protect_sync_done", "Bytes copied by the running "
                               "(re)sync.", v, self.sync[0], unit="bytes"))
            fams.append(_gauge("nbd_mc_protect_sync_total", "Bytes the running (re)sync "
                               "copies in all.", v, self.sync[1], unit="bytes"))
        return fams

    def start(self, report) -> None:
        """The first write: an unusable path is an error before protect attaches."""
        if self.path:
            write_textfile(self.path, self.families(report))

    def write(self, report) -> None:
        """Rewrite the file.  A failure is remembered in ``error``, never raised:
        metrics must not end protection."""
        if not self.path:
            return
        try:
            write_textfile(self.path, self.families(report))
            self._file_error = None
        except OSError as e:
            self._file_error = f"cannot write the metrics file {self.path}: {e}"

    # the hooks protect calls
    def set_state(self, state: str, report, reason: str | None = None) -> None:
        """``reason``: why, for a lost secondary (the event stream says it)."""
        self.state = state
        if state not in ("syncing", "resyncing"):
            self.sync = None
        self.write(report)
        if self.events is not None:
            self.events.state(state, report, reason)
            if self.events.error:
                self._events_error, self.events = self.events.error, None

    def sync_progress(self, done: int, total: int, report) -> None:
        """At most a few writes a second while a sync runs."""
        self.sync = (done, total)
        now = time.monotonic()
        if self.path and (now - self._last_sync_write >= 0.5 or done >= total):
            self._last_sync_write = now
            self.write(report)

    def checkpointed(self, report, committed: bool, mirrored: int | None,
                     epoch: int | None = None, skipped: str | None = None) -> None:
        """``epoch`` the checkpoint's epoch, ``skipped`` why it was not committed."""
        if committed:
            self.last_commit = time.time()
        if mirrored is not None:
            self.mirrored = mirrored
        self.write(report)
        if self.events is not None and epoch is not None:
            self.events.checkpointed(report, epoch, committed, skipped)
            if self.events.error:
                self._events_error, self.events = self.events.error, None
