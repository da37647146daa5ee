"""protect --events: the JSON-lines stream a supervisor reads while protect runs.

Driven through ProtectMetrics, which protect's Observer notifies, in the order a run
with an outage produces the notifications (protect.py's calls); no QEMU needed.
tests/system/test_primary.py runs the real thing.
"""

import json
import os

from nbd_mc.primary.metrics import ProtectMetrics
from nbd_mc.primary.report import Report
from nbd_mc.primary.resync import Resync


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_a_run_with_an_outage_reads_as_it_happened(tmp_path):
    path = tmp_path / "events.jsonl"
    report = Report(first_epoch=1)
    m = ProtectMetrics(None, "vm1", events=str(path))
    m.start(report)
    m.set_state("syncing", report)
    report.resyncs.append(Resync(full=True, reason="initial sync", bytes=4096, mode="full"))
    m.set_state("checkpointing", report)
    m.checkpointed(report, True, None, 1, None)
    report.committed, report.commits = 1, 1
    after_first = lines(path)  # a reader sees each event once it happened
    assert [e["event"] for e in after_first] == ["state", "resync", "state", "protected"]
    m.checkpointed(report, False, None, 2, "checkpoint hook exited with status 3")
    report.outages = 1
    m.set_state("lost", report, "the control connection was lost: EOF")
    m.set_state("resyncing", report)
    report.resyncs.append(Resync(full=False, reason="incremental", bytes=512, mode="bitmap"))
    m.set_state("checkpointing", report)
    m.checkpointed(report, True, None, 2, None)
    report.committed, report.commits = 2, 2
    m.checkpointed(report, True, None, 3, None)  # a plain commit: no event
    report.committed, report.outcome = 3, "detached"
    m.set_state("detached", report)
    ev = lines(path)
    assert [(e["event"], e.get("state")) for e in ev] == [
        ("state", "syncing"), ("resync", None), ("state", "checkpointing"), ("protected", None),
        ("refusal", None), ("state", "lost"), ("state", "resyncing"), ("resync", None),
        ("state", "checkpointing"), ("protected", None), ("state", "detached"),
        ("report", None)]
    assert ev[1]["mode"] == "full" and ev[1]["bytes"] == 4096
    assert ev[3]["epoch"] == 1 and ev[3]["committed"] == 1
    assert ev[4]["epoch"] == 2 and ev[4]["committed"] == 1 and "status 3" in ev[4]["reason"]
    assert ev[5]["reason"] == "the control connection was lost: EOF" and ev[5]["outages"] == 1
    assert ev[7]["mode"] == "bitmap" and ev[7]["from_epoch"] == 0
    assert ev[9]["epoch"] == 2
    assert ev[-1]["report"]["committed"] == 3 and len(ev[-1]["report"]["resyncs"]) == 2
    assert all(isinstance(e["time"], float) for e in ev)
    assert m.error is None


def test_a_failure_says_why_and_whether_the_secondary_refused(tmp_path):
    path = tmp_path / "events.jsonl"
    report = Report()
    m = ProtectMetrics(None, "vm1", events=str(path))
    report.outcome, report.error, report.refused = "failed", "commit refused: Fenced", True
    m.set_state("failed", report)
    ev = lines(path)
    assert ev[0]["state"] == "failed" and ev[0]["reason"] == "commit refused: Fenced"
    assert ev[0]["refused"] is True and ev[0]["primary_gone"] is False
    assert ev[1]["event"] == "report"


def test_a_stream_that_cannot_be_written_never_stops_protect(tmp_path):
    r, w = os.pipe()
    os.close(r)  # the reader went away: EPIPE on write
    report = Report()
    m = ProtectMetrics(None, "vm1", events=f"/proc/self/fd/{w}")
    m.set_state("syncing", report)  # must not raise
    m.checkpointed(report, True, None, 1, None)
    assert "event stream" in m.error
    os.close(w)


def test_an_appended_stream_keeps_earlier_runs(tmp_path):
    path = tmp_path / "events.jsonl"
    for _ in range(2):
        report = Report(outcome="detached")
        ProtectMetrics(None, "vm1", events=str(path)).set_state("detached", report)
    assert [e["event"] for e in lines(path)] == ["state", "report"] * 2
