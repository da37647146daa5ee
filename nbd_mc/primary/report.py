"""What protect did: the closing summary and the --json report."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Report:
    """What protect did, for the closing summary (and --json)."""

    first_epoch: int = 0
    committed: int = 0  # the last epoch the secondary acknowledged (0: none by us)
    commits: int = 0
    skipped: int = 0
    pauses: list = field(default_factory=list)
    hook_times: list = field(default_factory=list)
    initial_sync_bytes: int = 0
    mirrored_bytes: int = 0
    seconds: float = 0.0
    outcome: str = ""  # "detached" | "failed"
    error: str | None = None
    primary_gone: bool = False  # the failure was QEMU itself going away
    attached: bool = False  # we changed QEMU (added nodes / started mirrors)
    problems: list = field(default_factory=list)
    resyncs: list = field(default_factory=list)  # resync.Resync, the initial sync first
    outages: int = 0  # times the secondary was lost and protect carried on
    unprotected: float = 0.0  # seconds between losing the secondary and its resync's end
    refused: bool = False  # the secondary can never take our checkpoints again
    verify: dict | None = None  # verify.Stats.as_dict() when --verify
    mode: str = "sync"  # --mode
    lags: list = field(default_factory=list)  # async: epoch lag (s) at each look (shipping.py)
    extended: int = 0  # async: intervals without a checkpoint (the backlog was large)
    backpressure: int = 0  # async: episodes of --max-lag back-pressure (shipping.Shipper.press)
    backpressure_slices: int = 0  # async: the paused slices of those that gave way

    def as_dict(self) -> dict:
        p = sorted(self.pauses)
        h = sorted(self.hook_times)
        return {"first_epoch": self.first_epoch, "committed": self.committed,
                "commits": self.commits, "skipped": self.skipped,
                "pause_ms": {"median": round(statistics.median(p) * 1000, 3) if p else None,
                             "worst": round(p[-1] * 1000, 3) if p else None,
                             "p99": _ms(_pct(p, 99)),
                             "count": len(p),
                             "hook_median": round(statistics.median(h) * 1000, 3) if h else None},
                "initial_sync_bytes": self.initial_sync_bytes,
                "mirrored_bytes": self.mirrored_bytes, "seconds": round(self.seconds, 3),
                "outcome": self.outcome, "error": self.error, "primary_gone": self.primary_gone,
                "problems": self.problems,
                "resyncs": [r.as_dict() for r in self.resyncs],
                "outages": self.outages, "unprotected_seconds": round(self.unprotected, 3),
                "verify": self.verify,
                "mode": self.mode,
                "lag_ms": {"median": _ms(_pct(self.lags, 50)), "p99": _ms(_pct(self.lags, 99)),
                           "worst": _ms(max(self.lags) if self.lags else None),
                           "count": len(self.lags)},
                "extended_epochs": self.extended, "backpressure": self.backpressure,
                "backpressure_slices": self.backpressure_slices}


def _pct(values: list, p: float) -> float | None:
    """The p-th percentile (nearest rank) of ``values``, None if empty."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(p / 100 * len(v) + 0.5)) - 1))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
