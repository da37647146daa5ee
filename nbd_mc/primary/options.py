"""protect's command-line vocabulary: drives, the NBD target, durations, Options."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

#: Prefix of every node and job protect creates in QEMU (leftovers are found by it).
NODE_PREFIX = "nbd-mc-"


@dataclass(frozen=True)
class DriveSpec:
    """``--drive ID[=EXPORT]``: QEMU's block backend (or root node) and its export."""

    drive: str
    export: str
    #: QEMU's name for the disk when it is not ``drive``: under libvirt, ``--drive vda``
    #: names the target and QEMU knows the disk as a node (``libvirt-1-format``).
    device: str | None = None

    @property
    def source(self) -> str:
        """What QMP commands name as the mirror's source (drive id or node name)."""
        return self.device or self.drive

    @property
    def node(self) -> str:
        return NODE_PREFIX + self.drive

    @property
    def job(self) -> str:
        return NODE_PREFIX + self.drive


def parse_drive(spec: str) -> DriveSpec:
    drive, sep, export = spec.partition("=")
    if sep and not export:
        raise ValueError(f"--drive {spec!r}: the export name after '=' is empty")
    if not drive or any(c in drive for c in " ,="):
        raise ValueError(f"--drive {spec!r}: expected ID or ID=EXPORT (ID is QEMU's drive id)")
    export = export or drive
    if export.endswith("@committed"):
        raise ValueError(f"--drive {spec!r}: {export} is the read-only committed view; "
                         "mirror into the live export")
    return DriveSpec(drive, export)


def parse_drives(specs) -> list[DriveSpec]:
    drives = [parse_drive(s) for s in specs]
    for what in ("drive", "export"):
        names = [getattr(d, what) for d in drives]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"{what} {', '.join(dup)} given twice: each --drive needs its own "
                             f"drive and export")
    return drives


def parse_interval(text: str, zero: bool = False) -> float:
    """``100ms``, ``0.5s``, ``2`` (seconds), ``5m`` -> seconds (``zero``: 0 is allowed)."""
    t = text.strip().lower()
    if t.endswith("m") and not t.endswith("ms"):
        return parse_interval(t[:-1], zero) * 60
    for suffix, scale in (("ms", 1e-3), ("s", 1.0), ("", 1.0)):
        if t.endswith(suffix):
            try:
                value = float(t[:len(t) - len(suffix)] if suffix else t) * scale
            except ValueError:
                break
            if value < 0 or value == 0 and not zero:
                raise ValueError(f"interval {text!r} must be positive")
            return value
    raise ValueError(f"interval {text!r} is not a duration (e.g. 100ms, 0.5s)")


@dataclass(frozen=True)
class NbdTarget:
    """Where the secondary serves NBD, as QEMU's blockdev-add ``server`` wants it."""

    uri: str
    server: dict
    export: str | None  # the export in the URI path, if any
    tls: bool

    def describe(self) -> str:
        s = self.server
        return s["path"] if s["type"] == "unix" else f"{s['host']}:{s['port']}"


def parse_nbd_uri(uri: str) -> NbdTarget:
    """nbd+unix:///[EXPORT]?socket=PATH, nbd://HOST[:PORT]/[EXPORT], nbds... with TLS.

    A URI's export is only a default: each --drive names its own export.
    """
    u = urllib.parse.urlsplit(uri)
    scheme = u.scheme.lower()
    tls = scheme.startswith("nbds")
    export = urllib.parse.unquote(u.path[1:]) if u.path.startswith("/") else None
    if scheme in ("nbd+unix", "nbds+unix"):
        q = urllib.parse.parse_qs(u.query)
        if not q.get("socket"):
            raise ValueError(f"NBD URI {uri!r}: a unix URI needs ?socket=PATH")
        server = {"type": "unix", "path": os.path.abspath(q["socket"][0])}
    elif scheme in ("nbd", "nbds", "nbd+tcp", "nbds+tcp"):
        if not u.hostname:
            raise ValueError(f"NBD URI {uri!r}: no host")
        try:
            port = u.port or 10809
        except ValueError:
            raise ValueError(f"NBD URI {uri!r}: bad port") from None
        server = {"type": "inet", "host": u.hostname, "port": str(port)}
    else:
        raise ValueError(f"NBD URI {uri!r}: use nbd+unix:///?socket=PATH or nbd://HOST:PORT/ "
                         "(nbds... for TLS)")
    return NbdTarget(uri, server, export or None, tls)


@dataclass
class Options:
    qmp: str | None  # QEMU's QMP socket, or None with ``libvirt``
    drives: list[DriveSpec]
    target: NbdTarget
    control: str
    interval: float = 0.1
    epochs: int | None = None
    hook: str | None = None
    tls_certificates: str | None = None
    legacy_drive_mirror: bool = False
    libvirt: str | None = None  # a libvirt domain instead of a QMP socket
    connect: str = "qemu:///system"  # its libvirt connection URI
    metrics_file: str | None = None  # Prometheus textfile rewritten after each checkpoint
    events: str | None = None  # --events FILE|-: JSON lines as things happen (eventstream.py)
    #: How long a ``stop`` may wait for writes stuck on the secondary (and a control
    #: command for its answer) before the secondary counts as hung.
    stall_timeout: float = 10.0
    #: How long to keep retrying a lost secondary: None forever, 0 not at all.
    retry_for: float | None = None
    verify: bool = False  # online verify (nbd_mc/verify.py): one slice per checkpoint
    verify_slice: int = 4 << 20
    verify_passes: int | None = None  # stop after this many whole passes (None: never)
    #: Copy the ranges verify finds different at the next checkpoint (repair.py).
    repair: bool = True
    #: How a secondary no dirty bitmap covers is brought in step: "auto" (checksum
    #: when its image holds data, else full), "full" or "checksum" (resync.py).
    resync: str = "auto"
    #: "sync" (write-blocking: a guest write waits for the secondary) or "async"
    #: (background mirror, epochs shipped behind the guest: shipping.py).
    mode: str = "sync"
    #: async: how far the committed epoch may trail (seconds) before protect applies
    #: back-pressure (shipping.Shipper.decide); None: no bound.
    max_lag: float | None = 10.0
    #: Bytes/s per copy job (QEMU's job speed, rate.py); 0 unlimited.
    rate: int = 0
    #: A file whose contents replace ``rate`` while protect runs (rate.py).
    rate_file: str | None = None

    @property
    def stale_after(self) -> float:
        """What the secondary is told: no commit for this long means stale protection
        (async: an epoch may be extended up to --max-lag, and its drain comes on top)."""
        lag = 2 * self.max_lag if self.mode == "async" and self.max_lag else 0.0
        return max(10.0, 20 * self.interval, lag)
