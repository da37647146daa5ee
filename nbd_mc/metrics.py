"""Prometheus metrics for operators, what both sides share: rendering and files.

Both sides speak the Prometheus text exposition format, rendered by the official
client library (prometheus_client), so that node_exporter's textfile collector (or
anything that reads ``*.prom`` files) can pick them up:

* ``nbd-mc status --prometheus`` turns the server's ``query-status`` reply into
  ``nbd_mc_*`` series (secondary/metrics.py);
* ``nbd-mc protect --metrics-file PATH`` rewrites PATH atomically after every
  checkpoint (and while the initial sync runs): ``nbd_mc_protect_*``
  (primary/metrics.py).

Every series carries a ``group`` label (the secondary: its control address unless
given) or ``vm`` label (the primary: the libvirt domain or the QMP socket), so that
several instances on one host can share one textfile directory.  docs/metrics.md
lists the metric names with an example.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import GaugeMetricFamily


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


def gauge(name: str, doc: str, labels: dict, value, unit: str = "") -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels), unit=unit)
    g.add_metric(list(labels.values()), value)
    return g
