"""The QMP events of one session, kept in order for the blocking code that waits.

Both sessions, the QMP socket (qmp.py) and libvirt's passthrough (libvirt.py),
receive events on a thread of their own while the primary side blocks on a
command, a hook or the control channel; this log is where they meet.  A waiter
holds a *cursor* (the sequence number of the last event it has seen), so an event
recorded between two calls is never missed and never seen twice.
"""

from __future__ import annotations

import collections
import threading
import time

#: Events kept: far more than one checkpoint produces; older ones are long handled.
KEPT = 4096


class EventLog:
    """State (``_cond`` guards all of it; the event thread writes, waiters read):

      _events   the last KEPT events as (sequence number, event dict)
      _seq      the sequence number of the newest event
      gone      None while QEMU is there; else why it (or the way to it) went away
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._events: collections.deque = collections.deque(maxlen=KEPT)
        self._seq = 0
        self.gone: str | None = None

    def _record(self, event: dict) -> None:
        with self._cond:
            self._seq += 1
            self._events.append((self._seq, dict(event)))
            self._cond.notify_all()

    def _set_gone(self, why: str) -> None:
        """QEMU is gone, for the first reason seen; wakes every waiter."""
        with self._cond:
            self.gone = self.gone or why
            self._cond.notify_all()

    @property
    def cursor(self) -> int:
        """Events recorded so far; pass it to events_after() / wait_event()."""
        with self._cond:
            return self._seq

    def events_after(self, cursor: int) -> list[tuple[int, dict]]:
        """(sequence number, event) of every event recorded after ``cursor``."""
        with self._cond:
            return [(s, e) for s, e in self._events if s > cursor]

    def wait_event(self, match, cursor: int, timeout: float) -> tuple[dict | None, int]:
        """The first event after ``cursor`` with match(event) true, or None at the
        timeout or when QEMU is gone; and the cursor after it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for s, e in self._events:
                    if s > cursor:
                        cursor = s
                        if match(e):
                            return e, cursor
                left = deadline - time.monotonic()
                if left <= 0 or self.gone:
                    return None, cursor
                self._cond.wait(left)
