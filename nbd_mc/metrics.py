"""Prometheus metrics for operators: the secondary's state and protect's progress.

Both sides speak the Prometheus text exposition format, rendered by the official
client library (prometheus_client), so that node_exporter's textfile collector (or
anything that reads ``*.prom`` files) can pick them up:

* ``nbd-mc status --prometheus`` turns the server's ``query-status`` reply into
  :func:`render_status` output (``nbd_mc_*``);
* ``nbd-mc protect --metrics-file PATH`` rewrites PATH atomically after every
  checkpoint (and while the initial sync runs) through :class:`ProtectMetrics`
  (``nbd_mc_protect_*``).

Every series carries a ``group`` label (the secondary: its control address unless
given) or ``vm`` label (the primary: the libvirt domain or the QMP socket), so that
several instances on one host can share one textfile directory.  README.md lists
the metric names with an example.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    StateSetMetricFamily, SummaryMetricFamily)

#: A protected group with no commit for this long is reported stale: protect is not
#: checkpointing (stopped, failed, or hung), so a failover would lose that much.
STALE_AFTER = 60.0

#: query-status "stats" counters -> (metric name without _total, help)
_COUNTERS = {
    "commits": ("nbd_mc_commits", "Epochs committed by this server process."),
    "refused_commits": ("nbd_mc_commit_refusals",
                        "Commit requests refused or failed (wrong epoch, fenced, broken)."),
    "refused_writes": ("nbd_mc_write_refusals",
                       "Writes refused because the group is fenced or promoted."),
    "rollbacks": ("nbd_mc_rollbacks", "Rollbacks to the last commit."),
    "writes": ("nbd_mc_writes", "Write requests served."),
    "bytes_written": ("nbd_mc_written_bytes", "Bytes written by clients."),
    "errors": ("nbd_mc_io_errors", "Requests that failed with an I/O error."),
}

#: protect's states, in order (nbd_mc_protect_state{state=...}): "lost" while the
#: secondary is away (the VM runs unprotected), "resyncing" when it is back.
PROTECT_STATES = ("connecting", "syncing", "resyncing", "checkpointing", "lost", "detached",
                  "failed")
#: How a (re)sync brought the secondary in step (protect --json ``resyncs[].mode``):
#: everything, what a dirty bitmap marked, or what differed by content.
RESYNC_MODES = ("full", "bitmap", "checksum")


def resync_mode(r) -> str:
    """A resync's mode; a protect without ``Resync.mode`` knew only full and bitmap."""
    return getattr(r, "mode", None) or ("full" if r.full else "bitmap")


class _Families:
    """A registry collector that yields metric families built beforehand."""

    def __init__(self, families):
        self._families = families

    def collect(self):
        return iter(self._families)


def _registry(families) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families)))
    return registry


def render(families) -> str:
    """The text exposition format (version 0.0.4) of ``families``."""
    return generate_latest(_registry(families)).decode()


def write_textfile(path: str, families) -> None:
    """Replace ``path`` atomically (a reader sees the old or the new file whole:
    prometheus_client writes a temporary file beside it and renames it)."""
    write_to_textfile(path, _registry(families))


def _gauge(name: str, doc: str, labels: dict, value, unit: str = "") -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels), unit=unit)
    g.add_metric(list(labels.values()), value)
    return g


# --- the secondary: nbd-mc status --prometheus -----------------------------------------
def status_families(st: dict, group: str, now: float | None = None,
                    stale_after: float = STALE_AFTER) -> list:
    """Metric families for one ``query-status`` reply of the group called ``group``."""
    now = time.time() if now is None else now
    g = {"group": group}
    last = st.get("last_commit_time")
    since = None if last is None else max(0.0, now - last)
    stale = (not st["protected"] or st["fenced"] or bool(st.get("broken"))
             or bool(st.get("stale")) or since is None or since > stale_after)
    fams = [
        _gauge("nbd_mc_up", "1: the server answered query-status.", g, 1),
        _gauge("nbd_mc_committed_epoch", "The last committed epoch (what a failover gives).",
               g, st["committed"]),
        _gauge("nbd_mc_protected", "1: an epoch was committed, a failover has a consistent "
               "state to return to.", g, int(bool(st["protected"]))),
        _gauge("nbd_mc_stale", f"1: not protected, fenced, broken, or no commit by this "
               f"server for more than {stale_after:g} s.", g, int(stale)),
        _gauge("nbd_mc_fenced", "1: writes from connections older than the fence are refused.",
               g, int(bool(st["fenced"]))),
        _gauge("nbd_mc_broken", "1: an I/O failure stopped commits until the server restarts.",
               g, int(bool(st.get("broken")))),
        _gauge("nbd_mc_generation", "Fence generation.", g, st["generation"]),
    ]
    info = GaugeMetricFamily("nbd_mc_info", "Role and durability mode of the group.",
                             labels=["group", "role", "durability"])
    info.add_metric([group, st["role"], str(st.get("durability"))], 1)
    fams.append(info)
    if last is not None:
        fams.append(_gauge("nbd_mc_last_commit_timestamp", "Unix time of this server's last "
                           "commit.", g, last, unit="seconds"))
        fams.append(_gauge("nbd_mc_since_last_commit", "Seconds since this server's last "
                           "commit.", g, since, unit="seconds"))
    per_disk = {
        "nbd_mc_disk_undo": ("Bytes of undo data kept for the open epoch.", "undo_bytes", "bytes"),
        "nbd_mc_disk_preserved_clusters": ("Clusters whose committed contents are kept as "
                                           "undo in the open epoch.", "preserved_clusters", ""),
        "nbd_mc_disk_size": ("Size of the disk.", "size", "bytes"),
        "nbd_mc_disk_cluster_size": ("Undo granularity.", "cluster_size", "bytes"),
    }
    for name, (doc, key, unit) in per_disk.items():
        fam = GaugeMetricFamily(name, doc, labels=["group", "disk"], unit=unit)
        for d in st["disks"]:
            fam.add_metric([group, d["name"]], d[key])
        fams.append(fam)
    stats = st.get("stats") or {}
    for key, (name, doc) in _COUNTERS.items():
        if key in stats:
            c = CounterMetricFamily(name, doc, labels=["group"])
            c.add_metric([group], stats[key])
            fams.append(c)
    return fams


def render_status(st: dict, group: str, now: float | None = None,
                  stale_after: float = STALE_AFTER) -> str:
    return render(status_families(st, group, now, stale_after))


def render_down(group: str) -> str:
    """What a scrape says when the server does not answer."""
    return render([_gauge("nbd_mc_up", "1: the server answered query-status.",
                          {"group": group}, 0)])


# --- the primary: nbd-mc protect --metrics-file PATH -----------------------------------
class ProtectMetrics:
    """protect's metrics file, rewritten after every checkpoint; a no-op without a path.

    State (used only by the thread that runs protect):
      state          one of PROTECT_STATES
      sync           (bytes copied, bytes to copy) of the running (re)sync, or None
      mirrored       bytes the mirror jobs copied, as of the last checkpoint
      last_commit    wall clock of the last commit by this protect, or None
      out_of_sync, in_flight, lag, rate -- the link's figures (protect's
                     _link_metrics): bytes the committed epoch lacks, bytes not yet on
                     the secondary, seconds the committed epoch trails (async), the
                     --rate in force (bytes/s, 0 unlimited); None until known
    """

    def __init__(self, path: str | None, vm: str = ""):
        self.path = path
        self.vm = vm
        self.state = "connecting"
        self.sync: tuple[int, int] | None = None
        self.mirrored = 0
        self.last_commit: float | None = None
        self.out_of_sync: int | None = None
        self.in_flight: int | None = None
        self.lag: float | None = None
        self.rate: int | None = None
        self._last_sync_write = 0.0
        self.error: str | None = None

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
                 "(what a failover now would lose).", self.out_of_sync, "bytes"),
                ("nbd_mc_protect_in_flight", "Bytes written on the primary and not yet on "
                 "the secondary.", self.in_flight, "bytes"),
                ("nbd_mc_protect_epoch_lag", "How far the committed epoch trails the "
                 "primary (async mode).", self.lag, "seconds"),
                ("nbd_mc_protect_rate", "The --rate in force per copy job (0: "
                 "unlimited).", self.rate, "bytes_per_second")):
            if value is not None:
                fams.append(_gauge(name, doc, v, value, unit=unit))
        bp = CounterMetricFamily("nbd_mc_protect_backpressure", "Checkpoints --max-lag "
                                 "forced while the link was behind (the VM waited).",
                                 labels=["vm"])
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
            self.error = None
        except OSError as e:
            self.error = f"cannot write the metrics file {self.path}: {e}"

    # the hooks protect calls
    def set_state(self, state: str, report) -> None:
        self.state = state
        if state not in ("syncing", "resyncing"):
            self.sync = None
        self.write(report)

    def sync_progress(self, done: int, total: int, report) -> None:
        """At most a few writes a second while a sync runs."""
        self.sync = (done, total)
        now = time.monotonic()
        if self.path and (now - self._last_sync_write >= 0.5 or done >= total):
            self._last_sync_write = now
            self.write(report)

    def checkpointed(self, report, committed: bool, mirrored: int | None) -> None:
        if committed:
            self.last_commit = time.time()
        if mirrored is not None:
            self.mirrored = mirrored
        self.write(report)
