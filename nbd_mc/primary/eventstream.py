"""`protect --events FILE|-`: protect's events as they happen, one JSON object a line.

``--json`` prints only the closing report, so a supervisor (a Pacemaker agent, a
systemd unit's log reader, a monitoring job) would see a lost secondary or a resync
only once protect exits.  The stream says each as it happens: every change of
protect's state, every finished (re)sync, the first commit after it (protected
again), every checkpoint whose commit was skipped, and at the end the report
``--json`` prints.  docs/events.md documents the fields.

It listens where the metrics file listens: protect notifies its one Observer
(observer.py), which tells ProtectMetrics (metrics.py), which forwards each
notification here, so protect itself knows nothing of the stream.  Writing never
ends protection: a failure (a closed pipe, a full disk) is remembered in ``error``
and the stream goes quiet.

State (used only by the thread that runs protect): ``_out`` (the open stream or
None once closed or broken), ``_resyncs`` (resyncs already reported),
``_awaiting_protected`` (a (re)sync finished, its first commit not seen yet).
"""

from __future__ import annotations

import json
import sys
import time

#: The ``event`` values, in the order a run usually produces them.
EVENTS = ("state", "resync", "protected", "refusal", "report")


class EventStream:
    def __init__(self, target: str):
        """``target``: a file to append to, or ``-`` for standard output."""
        self.target = target
        self.error: str | None = None
        self._resyncs = 0
        self._awaiting_protected = False
        self._out, self._own = sys.stdout, False
        if target != "-":
            # append: a supervisor that restarts protect keeps one stream.  The command
            # line refused a path it cannot open; failing now only silences the stream.
            try:
                self._out, self._own = open(target, "a", encoding="utf-8"), True
            except OSError as e:
                self._out, self.error = None, f"cannot open the event stream {target}: {e}"

    def emit(self, event: str, rep, **fields) -> None:
        if self._out is None:
            return
        obj = {"event": event, "time": round(time.time(), 6), "committed": rep.committed,
               **fields}
        try:
            self._out.write(json.dumps(obj, sort_keys=True) + "\n")
            self._out.flush()
        except (OSError, ValueError) as e:  # ValueError: a closed file
            self.error = f"cannot write the event stream {self.target}: {e}"
            self._out = None

    # the notifications ProtectMetrics forwards
    def state(self, state: str, report, reason: str | None = None) -> None:
        if state == "checkpointing":
            for r in report.resyncs[self._resyncs:]:
                self.emit("resync", report, **r.as_dict())
                self._awaiting_protected = True
            self._resyncs = len(report.resyncs)
        if state == "failed":
            reason = reason or report.error
        self.emit("state", report, state=state, reason=reason, outages=report.outages,
                  **({"refused": bool(report.refused), "primary_gone": bool(report.primary_gone)}
                     if state == "failed" else {}))
        if state in ("detached", "failed"):
            self.emit("report", report, report=report.as_dict())
            self.close()

    def checkpointed(self, report, epoch: int, committed: bool, skipped: str | None) -> None:
        if committed and self._awaiting_protected:
            self._awaiting_protected = False
            self.emit("protected", report, epoch=epoch, committed=epoch)
        elif not committed:
            self.emit("refusal", report, epoch=epoch, reason=skipped or "the commit was skipped")

    def close(self) -> None:
        out, self._out = self._out, None
        if out is not None and self._own:
            out.close()
