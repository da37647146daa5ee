"""The two synchronisation primitives of the I/O path: the gate and the shared sync.

Both are small and hand-written because what they promise is specific: the
gate lets any number of requests through until a checkpoint closes it (then it
waits for those in flight and holds new ones back); the shared sync lets one
fdatasync serve every request that is waiting for durability at the same time.
"""

import os
import threading
from contextlib import contextmanager


class Gate:
    """Many requests pass at once; a checkpoint closes it and waits for them.

    State: ``_active`` (requests inside) and ``_closed`` (a checkpoint holds the
    gate), both guarded by ``_cond``.
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._closed = False

    def enter(self) -> None:
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._active += 1

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            if self._closed and not self._active:
                self._cond.notify_all()

    @contextmanager
    def closed(self):
        with self._cond:
            while self._closed:  # another checkpoint holds it
                self._cond.wait()
            self._closed = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()


class GroupSync:
    """fdatasync of one file, shared by every request waiting at the same time.

    Writers count their writes (``note_write``); ``wait_durable(n)`` returns once a
    sync that started after write n has finished -- one fdatasync serves everyone
    who arrived while the previous one ran.

    State: ``written`` (writes noted), ``_synced`` (writes known durable) and
    ``_running`` (a sync is in progress), all guarded by ``_cond``; the fdatasync
    itself runs outside it.
    """

    def __init__(self, fd_getter):
        self._fd = fd_getter
        self._cond = threading.Condition()
        self.written = 0
        self._synced = 0
        self._running = False

    def note_write(self) -> int:
        with self._cond:
            self.written += 1
            return self.written

    def wait_durable(self, upto: int) -> None:
        with self._cond:
            while self._synced < upto:
                if not self._running:
                    self._running = True
                    target = self.written
                    break
                self._cond.wait()
            else:
                return
        try:
            os.fdatasync(self._fd())
        finally:
            with self._cond:
                self._running = False
                if target > self._synced:
                    self._synced = target
                self._cond.notify_all()

    def __call__(self) -> None:
        """A barrier: everything written so far is durable when this returns."""
        self.wait_durable(self.note_write())
