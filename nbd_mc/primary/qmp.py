"""A blocking QMP session: qemu.qmp's asyncio QMPClient on a private event-loop thread.

The rest of the primary side is plain blocking code (the hook and the control
channel block), yet QMP events must still arrive, in order, meanwhile: a private
loop thread records them as they are read.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import threading
import time

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate

from .events import EventLog
from .errors import PrimaryGone, QmpCommandError, QmpTimeout, why as _why

# A reply that comes after its command timed out is dropped with a warning: not news.
logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())
logging.getLogger("qemu.qmp").propagate = False

#: QMP commands normally answer in milliseconds; ``stop`` drains all I/O and a
#: ``blockdev-add`` connects over the network, so allow for a slow host.
QMP_TIMEOUT = 60.0
#: QEMU greets at once; no greeting means another client holds the socket.
CONNECT_TIMEOUT = 10.0
#: A file to append every command, reply and event to (one JSON line each), for
#: finding which sequence of QMP commands made QEMU misbehave (tools/qemu-bugs/).
TRACE_ENV = "NBD_MC_QMP_TRACE"


def _trace(path: str, what: str, **fields) -> None:
    line = json.dumps({"t": round(time.time(), 6), "pid": os.getpid(), "qmp": path,
                       "what": what, **fields}, default=str) + "\n"
    fd = os.open(os.environ[TRACE_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class _Recorder(EventListener):
    """Hands every event to Qmp as it is read, before the next message is.

    qemu.qmp awaits put() before it reads on, so an event QEMU sent before a reply
    is recorded before that reply's execute() returns: after ``stop`` returns, a
    mirror error that happened before the stop is already visible.
    """

    def __init__(self, sink):
        super().__init__()
        self._sink = sink

    async def put(self, event) -> None:
        self._sink(event)


class Qmp(EventLog):
    """A blocking QMP session; qemu.qmp's asyncio client on a private loop thread.
    Its events and ``gone``: the EventLog (events.py)."""

    def __init__(self, path: str, timeout: float = QMP_TIMEOUT):
        super().__init__()
        self.path = path
        self._tracing = bool(os.environ.get(TRACE_ENV))
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qmp", daemon=True)
        self._thread.start()
        self._client = None
        try:
            self._client = self._run(self._make_client(), 10)
            self._run(self._client.connect(path), min(timeout, CONNECT_TIMEOUT))
        except (TimeoutError, asyncio.TimeoutError):
            self._abandon()
            raise PrimaryGone(f"QEMU's QMP socket {path} did not greet within "
                              f"{min(timeout, CONNECT_TIMEOUT):.0f} s: is another client "
                              "connected? (QEMU serves one client per -qmp socket)") from None
        except BaseException as e:
            self._abandon()
            raise PrimaryGone(f"cannot connect to QEMU's QMP socket {path}: {_why(e)}") from None
        self._run(self._start_watch(), 10)
        atexit.register(self.close)  # a forgotten session must not spew asyncio warnings

    async def _make_client(self) -> QMPClient:
        client = QMPClient("nbd-mc")
        # The default listener keeps every event forever: make it keep none.
        client.events.names = {"nbd-mc: this listener keeps no events"}
        client.register_listener(_Recorder(self._traced_record if self._tracing
                                           else self._record))
        return client

    def _traced_record(self, event) -> None:
        _trace(self.path, "event", event=dict(event))
        self._record(event)

    async def _start_watch(self) -> None:
        asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Notice a dead QEMU even while nobody executes a command."""
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        self._set_gone("the QMP connection closed (QEMU exited or was killed)")

    def _run(self, coro, timeout):
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except BaseException:
            fut.cancel()
            raise

    # commands
    def cmd(self, name: str, /, **arguments):
        """Execute one command; QmpCommandError for QEMU's refusal, PrimaryGone if QEMU is,
        QmpTimeout if QEMU is there but did not answer in time."""
        return self.execute(name, arguments)

    def execute(self, name: str, arguments: dict | None = None, timeout: float | None = None,
                oob: bool = False):
        """cmd() with its own timeout; ``oob`` sends it out-of-band (``exec-oob``), which
        QEMU answers even while its main loop is stuck (only for commands that allow
        it, like ``yank``).

        A timeout is not a dead QEMU: a ``stop`` that drains a write to a hung NBD
        target waits for it.  QEMU is gone only when the connection closes.  A reply
        that arrives after the timeout is dropped by qemu.qmp (unknown id).
        """
        if self.gone:
            raise PrimaryGone(f"QEMU ({self.path}): {self.gone}")
        timeout = self.timeout if timeout is None else timeout
        if self._tracing:
            _trace(self.path, "cmd", cmd=name, args=arguments)
        try:
            reply = self._run(self._client.execute(name, arguments or None, oob=oob), timeout)
            if self._tracing:
                _trace(self.path, "reply", cmd=name, reply=reply)
            return reply
        except ExecuteError as e:
            if self._tracing:
                _trace(self.path, "error", cmd=name, error=str(e))
            raise QmpCommandError(name, e.error_class, str(e)) from None
        except (asyncio.TimeoutError, TimeoutError) as e:
            if self._tracing:
                _trace(self.path, "timeout", cmd=name)
            if self._connected():
                raise QmpTimeout(f"QEMU did not answer {name} within {timeout:g} s "
                                 f"(it is running: the QMP connection is open)") from None
            self._set_gone(f"{name}: {_why(e)}")
            raise PrimaryGone(f"lost the QMP connection to QEMU ({self.path}) during {name}: "
                              f"the connection closed") from None
        except (QMPError, OSError, EOFError, asyncio.CancelledError) as e:
            self._set_gone(f"{name}: {_why(e)}")
            raise PrimaryGone(f"lost the QMP connection to QEMU ({self.path}) during {name}: "
                              f"{_why(e)}") from None

    def _connected(self) -> bool:
        """The connection is open (QEMU is alive, if perhaps busy)."""
        if self.gone:
            return False
        return self._client is not None and self._client.runstate == Runstate.RUNNING

    def hmp(self, command_line: str) -> str:
        """A human monitor command (tests use qemu-io through it to play a guest)."""
        return self.cmd("human-monitor-command", **{"command-line": command_line})

    def close(self) -> None:
        atexit.unregister(self.close)
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.disconnect(), 10)
        except BaseException:  # a broken connection: nothing left to close politely
            pass
        self._stop_loop()

    def _abandon(self) -> None:
        """A failed connect must close its socket: QEMU serves one client per QMP
        socket, and a half-open attempt left behind would keep every later one
        waiting for a greeting that never comes."""
        if self._client is not None:
            try:
                self._run(self._client.disconnect(), 5)
            except BaseException:
                pass
        self._stop_loop()

    def _stop_loop(self) -> None:
        async def cancel_all():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            self._run(cancel_all(), 10)
        except BaseException:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
