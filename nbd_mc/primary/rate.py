"""``--rate``: how much of the link protect's copies may use, changeable while it runs.

The copies are QEMU block jobs (the sync's mirror, a resync's backup rounds, the
async mode's background mirror), and QEMU limits each job by its ``speed``
(bytes per second, 0 = unlimited): set when a job starts, changed with
``block-job-set-speed``.  The rate applies to each drive's job; a group of two
drives may use twice the rate.  Operators change it while protect runs by
writing a new value into the ``--rate-file`` (``echo 20M > FILE``): protect
looks at the file's modification time at every checkpoint interval and at every
progress report of a sync, so a change lands within about a quarter of a second.

The checksum sync's own copies through libnbd (nbd_mc/primary/ranges.py) are no
QEMU job: ``Pacer`` holds them to the same rate in protect's thread.

What is not limited: a write-blocking mirror's guest writes in sync mode (they
must reach the secondary before the guest goes on: limiting them would slow the
guest, not the copy), the paused final round of a resync (the VM waits on it),
and a verify repair's copies (made with the VM paused: nbd_mc/primary/repair.py).
"""

from __future__ import annotations

import os
import time

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


class Pacer:
    """Holds copies that protect makes itself (the checksum sync's libnbd writes) to
    the rate, as QEMU's ``speed`` holds a job: after each copy, wait until the bytes
    sent since the rate was last set would have taken that long at the rate.  Like
    QEMU's limiter it lets one copy run ahead and waits after it, so the rate
    holds over seconds, not per request.  Hand-written: a dozen lines that need
    protect's own stop flag, not a library's thread.

    State (protect's one thread): ``_start`` -- monotonic instant the count began
    (None: unlimited so far); ``_sent`` -- bytes since then; ``_speed`` -- the rate
    the count is for (a new rate starts a new count).  ``clock``/``sleep`` are
    time.monotonic/time.sleep (replaceable in tests).
    """

    #: Longest single sleep: a stop request is seen within this.
    SLICE = 0.1

    def __init__(self, rate, clock=time.monotonic, sleep=time.sleep):
        self.rate = rate  # callable: the rate in force (bytes/s, 0 unlimited)
        self.clock, self.sleep = clock, sleep
        self._start: float | None = None
        self._sent = 0
        self._speed = 0

    def sent(self, n: int, stop=lambda: False) -> float:
        """``n`` bytes were just copied: wait as the rate says (until ``stop()``);
        returns the seconds waited."""
        speed = self.rate()
        now = self.clock()
        if not speed:
            self._start = None
            return 0.0
        if self._start is None or speed != self._speed:
            self._start, self._sent, self._speed = now, 0, speed
        self._sent += n
        due = self._start + self._sent / speed
        waited = 0.0
        while now < due and not stop():
            step = min(self.SLICE, due - now)
            self.sleep(step)  # pacing a copy to the operator's rate, not synchronisation
            waited += step
            now = self.clock()
        return waited
