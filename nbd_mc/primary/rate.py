"""``--rate``: how much of the link protect's copies may use, changeable while it runs.

The copies are QEMU block jobs (the sync's mirror, a resync's backup rounds, the
async mode's background mirror), and QEMU limits each job by its ``speed``
(bytes per second, 0 = unlimited): set when a job starts, changed with
``block-job-set-speed``.  The rate applies to each drive's job; a group of two
drives may use twice the rate.  Operators change it while protect runs by
writing a new value into the ``--rate-file`` (``echo 20M > FILE``): protect
looks at the file's modification time at every checkpoint interval and at every
progress report of a sync, so a change lands within about a quarter of a second.

What is not limited: a write-blocking mirror's guest writes in sync mode (they
must reach the secondary before the guest goes on: limiting them would slow the
guest, not the copy), the paused final round of a resync (the VM waits on it),
and the checksum sync's own copies through libnbd (nbd_mc/primary/ranges.py).
"""

from __future__ import annotations

import os

from ..units import human_size, parse_size
from .errors import QmpCommandError
from .mirrors import jobs
from .qmp import Qmp


def parse_rate(text: str) -> int:
    """``20M``, ``512K``, ``1000000`` bytes per second (an optional ``/s``); ``0``,
    ``off`` or ``unlimited`` for no limit."""
    t = text.strip().lower().removesuffix("/s")
    if t in ("", "0", "off", "unlimited", "none"):
        return 0
    try:
        rate = parse_size(t)
    except ValueError:
        raise ValueError(f"rate {text!r} is not a rate (e.g. 20M for 20 MiB/s, 0 for "
                         "unlimited)") from None
    if rate < 0:
        raise ValueError(f"rate {text!r} must not be negative")
    return rate


def describe(rate: int) -> str:
    return "unlimited" if not rate else f"{human_size(rate)}/s"


class Rate:
    """The rate in force and where a new one comes from.

    State (protect's one thread): ``speed`` -- bytes/s, 0 unlimited: what new jobs
    get and running ones are set to; ``path`` -- the --rate-file or None;
    ``_seen`` -- the file's (mtime, size) when last read; ``error`` -- why the
    last read of the file was refused (the rate in force stays).
    """

    def __init__(self, speed: int = 0, path: str | None = None):
        self.speed = speed
        self.path = path
        self._seen: tuple | None = None
        self.error: str | None = None
        if path:
            self.reload()

    def reload(self) -> bool:
        """Read the file if it changed; True if the rate changed."""
        if not self.path:
            return False
        try:
            st = os.stat(self.path)
            seen = (st.st_mtime_ns, st.st_size)
            if seen == self._seen:
                return False
            self._seen = seen
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return False  # no file (yet): --rate stays
        except OSError as e:
            self.error = f"cannot read the rate file {self.path}: {e.strerror}"
            return False
        try:
            speed = parse_rate(text)
        except ValueError as e:
            self.error = f"the rate file {self.path}: {e}; the rate stays {describe(self.speed)}"
            return False
        self.error = None
        changed, self.speed = speed != self.speed, speed
        return changed

    def apply(self, qmp: Qmp, ids) -> None:
        """Set every running job of ``ids`` to the rate in force."""
        for job_id, info in jobs(qmp).items():
            if job_id in ids and info.get("speed", 0) != self.speed:
                try:
                    qmp.cmd("block-job-set-speed", device=job_id, speed=self.speed)
                except QmpCommandError:  # it just ended
                    pass

    def poll(self, qmp: Qmp, ids) -> str | None:
        """If the file changed: apply the new rate; returns a line saying so."""
        if not self.reload():
            return None
        self.apply(qmp, ids)
        return f"  rate now {describe(self.speed)} (from {self.path})"
