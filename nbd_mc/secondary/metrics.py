"""`nbd-mc status --prometheus`: the secondary's ``query-status`` as ``nbd_mc_*`` series.

Runs in the command-line client, not in nbdkit (prometheus_client is not the
plugin's business); docs/metrics.md lists the series.
"""

from __future__ import annotations

import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..metrics import gauge as _gauge, render

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
