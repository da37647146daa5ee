"""The primary side: attach a running QEMU to the secondary and checkpoint it.

`nbd-mc protect` talks QMP to the primary's QEMU and the control protocol to the
secondary.  For every protected drive it adds an NBD block node pointing at the
drive's export on the secondary and starts ``blockdev-mirror sync=full
copy-mode=write-blocking`` into it: once the job is READY, a guest write completes
only after the secondary has it.  Then, every interval:

    stop the VM (drains all I/O)  ->  every mirror READY with nothing left to copy
    ->  [hook]  ->  commit epoch N on the secondary  ->  cont

so the committed epoch N is exactly the disk as the stopped VM left it.  Anything
that makes that statement doubtful (a mirror error, a refused commit, a lost
control connection) ends checkpointing: the VM keeps running unprotected and
protect exits 1 saying why; it never reconnects, because a secondary that restarted
has rolled back and would silently miss the writes in between.

The QMP client is qemu.qmp's asyncio QMPClient, run on a private event-loop thread
(class Qmp) so the rest of this module is plain blocking code: the hook and the
control channel block, and QMP events must still arrive, in order, meanwhile.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import os
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field, replace

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate

from .control import ControlClient, ControlError, TlsFiles, parse_address
from .errors import NbdMcError

#: QMP commands normally answer in milliseconds; ``stop`` drains all I/O and a
#: ``blockdev-add`` connects over the network, so allow for a slow host.
QMP_TIMEOUT = 60.0
#: QEMU greets at once; no greeting means another client holds the socket.
CONNECT_TIMEOUT = 10.0
#: After ``stop`` the mirror's counters may lag its last write by an iteration.
DRAIN_TIMEOUT = 10.0
DRAIN_POLL = 0.001
#: The VM stays stopped while the hook runs: a hung hook must not hang the VM.
HOOK_TIMEOUT = 60.0
#: Cancelling a READY mirror copies what is still dirty; bound the wait.
CANCEL_TIMEOUT = 30.0
NODE_PREFIX = "nbd-mc-"
TLS_OBJECT = "nbd-mc-tls"
JOB_END_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


class PrimaryError(NbdMcError):
    """protect cannot go on; the message says what happened and what state things are in."""

    error_class = "ProtectError"


class PrimaryGone(PrimaryError):
    """The QMP connection to the primary's QEMU broke (QEMU exited or was killed)."""

    error_class = "PrimaryGone"


class QmpCommandError(PrimaryError):
    """QEMU answered a QMP command with an error."""

    error_class = "QMPError"

    def __init__(self, command: str, qmp_class: str, desc: str):
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command = command
        self.qmp_class = qmp_class


class SecondaryFailed(PrimaryError):
    """The secondary can no longer be trusted to hold the checkpoints: stop committing."""

    error_class = "SecondaryFailed"


# --- parsing the command line -------------------------------------------------------
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


def parse_interval(text: str) -> float:
    """``100ms``, ``0.5s``, ``2`` (seconds) -> seconds."""
    t = text.strip().lower()
    for suffix, scale in (("ms", 1e-3), ("s", 1.0), ("", 1.0)):
        if t.endswith(suffix):
            try:
                value = float(t[:len(t) - len(suffix)] if suffix else t) * scale
            except ValueError:
                break
            if value <= 0:
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


# --- QMP ---------------------------------------------------------------------------------
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


class Qmp:
    """A blocking QMP session; qemu.qmp's asyncio client on a private loop thread."""

    def __init__(self, path: str, timeout: float = QMP_TIMEOUT):
        self.path = path
        self.timeout = timeout
        self._cond = threading.Condition()
        self._events: collections.deque = collections.deque(maxlen=4096)
        self._seq = 0
        self.gone: str | None = None
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
        client.register_listener(_Recorder(self._record))
        return client

    async def _start_watch(self) -> None:
        asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Notice a dead QEMU even while nobody executes a command."""
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        with self._cond:
            self.gone = self.gone or "the QMP connection closed (QEMU exited or was killed)"
            self._cond.notify_all()

    def _record(self, event) -> None:
        with self._cond:
            self._seq += 1
            self._events.append((self._seq, dict(event)))
            self._cond.notify_all()

    def _run(self, coro, timeout):
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except BaseException:
            fut.cancel()
            raise

    # commands
    def cmd(self, name: str, **arguments):
        """Execute one command; QmpCommandError for QEMU's refusal, PrimaryGone if QEMU is."""
        if self.gone:
            raise PrimaryGone(f"QEMU ({self.path}): {self.gone}")
        try:
            return self._run(self._client.execute(name, arguments or None), self.timeout)
        except ExecuteError as e:
            raise QmpCommandError(name, e.error_class, str(e)) from None
        except (QMPError, OSError, EOFError, asyncio.TimeoutError, TimeoutError,
                asyncio.CancelledError) as e:
            with self._cond:
                self.gone = self.gone or f"{name}: {_why(e)}"
            raise PrimaryGone(f"lost the QMP connection to QEMU ({self.path}) during {name}: "
                              f"{_why(e)}") from None

    def hmp(self, command_line: str) -> str:
        """A human monitor command (tests use qemu-io through it to play a guest)."""
        return self.cmd("human-monitor-command", **{"command-line": command_line})

    # events
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


def _why(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({cause})"
    return text


# --- the secondary -----------------------------------------------------------------------
def secondary_status(ctl: ControlClient) -> dict:
    try:
        return ctl.execute("query-status")
    except ControlError as e:
        raise SecondaryFailed(f"the secondary refused query-status: {e}") from None
    except (OSError, NbdMcError) as e:
        raise SecondaryFailed(f"lost the control connection to the secondary: {_why(e)}") from None


def first_epoch(status: dict, drives: list[DriveSpec]) -> int:
    """The epoch the first commit will close (committed + 1), after checking the
    secondary is a secondary whose group is exactly our drives.

    A partial group would be committed with disks nobody mirrors: refused.
    """
    if status.get("role") != "secondary":
        raise PrimaryError("the secondary was promoted to primary by a failover: it takes no "
                           "more checkpoints (start a fresh `nbd-mc serve` state directory)")
    if status.get("fenced"):
        raise PrimaryError("the secondary is fenced: a failover or `nbd-mc fence` stopped "
                           "protection; start a fresh secondary")
    if status.get("broken"):
        raise PrimaryError(f"the secondary is unusable until it restarts: {status['broken']}")
    disks = [d["name"] for d in status.get("disks", [])]
    missing = [d.export for d in drives if d.export not in disks]
    if missing:
        raise PrimaryError(f"the secondary has no disk {', '.join(missing)} "
                           f"(its group: {', '.join(disks)})")
    unmirrored = [n for n in disks if n not in {d.export for d in drives}]
    if unmirrored:
        raise PrimaryError(f"the secondary's consistency group also holds "
                           f"{', '.join(unmirrored)}, which no --drive mirrors: every disk of "
                           "the group must be protected together")
    return int(status["committed"]) + 1


def commit(ctl: ControlClient, epoch: int) -> dict:
    """Commit ``epoch`` on the secondary; any failure means the secondary is lost to us."""
    try:
        return ctl.execute("commit", epoch=epoch)
    except ControlError as e:
        raise SecondaryFailed(f"the secondary refused to commit epoch {epoch}: {e}") from None
    except (OSError, NbdMcError) as e:
        raise SecondaryFailed(f"lost the control connection to the secondary while committing "
                              f"epoch {epoch}: {_why(e)}") from None


# --- attaching -------------------------------------------------------------------------------
def check_drives(qmp: Qmp, drives: list[DriveSpec]) -> dict[str, int]:
    """Each --drive names a QEMU drive (BlockBackend or node name); returns their sizes.

    Checked up front so a typo is one clear line, not a failed blockdev-mirror.
    """
    sizes = {}
    known = []
    for b in qmp.cmd("query-block"):
        ins = b.get("inserted")
        if not ins:
            continue
        names = [n for n in (b.get("device"), ins.get("node-name")) if n]
        known.append(names[0])
        for n in names:
            sizes[n] = ins["image"]["virtual-size"]
    missing = [d.drive for d in drives if d.source not in sizes]
    if missing:
        raise PrimaryError(f"QEMU has no drive {', '.join(missing)} "
                           f"(its drives: {', '.join(known) or 'none'})")
    return {d.drive: sizes[d.source] for d in drives}


def check_sizes(sizes: dict[str, int], status: dict, drives: list[DriveSpec]) -> None:
    """A replica must have exactly its drive's size (QEMU's own message is vaguer)."""
    theirs = {d["name"]: d["size"] for d in status.get("disks", [])}
    wrong = [f"{d.drive} is {sizes[d.drive]} bytes but {d.export} is {theirs[d.export]}"
             for d in drives if theirs.get(d.export) not in (None, sizes[d.drive])]
    if wrong:
        raise PrimaryError("the secondary's disks must have the sizes of the drives: "
                           + "; ".join(wrong))


def add_tls_creds(qmp: Qmp, directory: str) -> str:
    """A client tls-creds-x509 object for an nbds:// secondary (reused if present)."""
    try:
        qmp.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": TLS_OBJECT,
                                 "dir": os.path.abspath(directory), "endpoint": "client",
                                 "verify-peer": True})
    except QmpCommandError as e:
        if "already" not in str(e).lower():
            raise
    return TLS_OBJECT


def attach(qmp: Qmp, target: NbdTarget, drives: list[DriveSpec],
           tls_creds: str | None = None) -> None:
    """One NBD client node per drive, each on its own export of the secondary."""
    for d in drives:
        args = {"driver": "nbd", "node-name": d.node, "server": target.server,
                "export": d.export}
        if tls_creds:
            args["tls-creds"] = tls_creds
            if target.server["type"] == "unix":
                # a unix socket has no host name to check the certificate against
                args["tls-hostname"] = "localhost"
        try:
            qmp.cmd("blockdev-add", **args)
        except QmpCommandError as e:
            raise SecondaryFailed(f"cannot open export {d.export} on the secondary "
                                  f"({target.describe()}): {e}") from None


def start_mirrors(qmp: Qmp, drives: list[DriveSpec]) -> None:
    """sync=full copies the whole disk once; write-blocking then makes every guest
    write wait for the secondary, which is what lets a paused VM mean "all there"."""
    for d in drives:
        qmp.cmd("blockdev-mirror", **{"job-id": d.job, "device": d.source, "target": d.node,
                                      "sync": "full", "copy-mode": "write-blocking",
                                      "on-target-error": "report"})


def start_drive_mirrors(qmp: Qmp, target: NbdTarget, drives: list[DriveSpec]) -> None:
    """The same with the older drive-mirror: QEMU opens the NBD URI itself."""
    for d in drives:
        server = target.server
        if server["type"] == "unix":
            uri = f"nbd+unix:///{urllib.parse.quote(d.export)}?socket={server['path']}"
        else:
            uri = f"nbd://{server['host']}:{server['port']}/{urllib.parse.quote(d.export)}"
        qmp.cmd("drive-mirror", **{"job-id": d.job, "device": d.source, "target": uri,
                                   "format": "raw", "mode": "existing", "sync": "full",
                                   "copy-mode": "write-blocking", "on-target-error": "report"})


def jobs(qmp: Qmp) -> dict[str, dict]:
    return {j["device"]: j for j in qmp.cmd("query-block-jobs")}


def _job_failure(event: dict, ours: set) -> str | None:
    """What a QMP event says went wrong with one of our mirrors, if anything."""
    data = event.get("data") or {}
    job = data.get("device") or data.get("id")
    if job not in ours:
        return None
    name = event.get("event")
    if name == "BLOCK_JOB_ERROR":
        return (f"mirror {job}: {data.get('operation', 'I/O')} error on the "
                f"{'secondary' if data.get('operation') == 'write' else 'disk'} "
                f"(action {data.get('action')})")
    if name == "BLOCK_JOB_COMPLETED":
        return f"mirror {job} ended" + (f" with an error: {data['error']}" if data.get("error")
                                        else " (completed by someone else)")
    if name == "BLOCK_JOB_CANCELLED":
        return f"mirror {job} was cancelled by someone else"
    return None


class Mirrors:
    """Our mirror jobs and what QEMU said about them since they started."""

    def __init__(self, qmp: Qmp, drives: list[DriveSpec]):
        self.qmp = qmp
        self.drives = drives
        self.ids = {d.job for d in drives}
        self.cursor = qmp.cursor
        self.failure: str | None = None
        self.ready: set = set()
        self.synced: dict[str, int] = {}  # bytes copied when each job became READY

    def scan(self) -> None:
        """Look at the new events: READY and failures (the first failure sticks)."""
        for seq, e in self.qmp.events_after(self.cursor):
            self.cursor = seq
            data = e.get("data") or {}
            if e.get("event") == "BLOCK_JOB_READY" and data.get("device") in self.ids:
                self.ready.add(data["device"])
                self.synced[data["device"]] = data.get("offset", 0)
            why = _job_failure(e, self.ids)
            if why and not self.failure:
                self.failure = why

    def check(self) -> None:
        self.scan()
        if self.failure:
            raise SecondaryFailed(self.failure)
        if self.qmp.gone:
            raise PrimaryGone(f"QEMU ({self.qmp.path}): {self.qmp.gone}")

    def progress(self) -> tuple[int, int]:
        """(bytes copied, bytes to copy) summed over our jobs."""
        js = jobs(self.qmp)
        done = sum(js[j]["offset"] for j in self.ids if j in js)
        total = sum(js[j]["len"] for j in self.ids if j in js)
        return done, total

    def wait_ready(self, report=None, stop_requested=lambda: False, poll: float = 0.25) -> bool:
        """Wait for BLOCK_JOB_READY of every mirror; report(done, total) meanwhile.

        Returns False if stop_requested() became true first.
        """
        while True:
            self.check()
            if self.ready >= self.ids:
                if report:
                    report(*self.progress())
                return True
            if stop_requested():
                return False
            if report:
                report(*self.progress())
            self.qmp.wait_event(lambda e: True, self.qmp.cursor, poll)

    def wait_drained(self, timeout: float = DRAIN_TIMEOUT) -> dict[str, dict]:
        """With the VM stopped: every mirror READY, no I/O error, nothing left to copy.

        ``stop`` drains guest I/O, and write-blocking means a finished guest write is
        on the secondary; the job's len - offset is what is still to be copied (its
        counters can trail by a moment, hence the bounded poll).
        """
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            js = jobs(self.qmp)
            self.check()
            pending = []
            for j in sorted(self.ids):
                info = js.get(j)
                if info is None:
                    raise SecondaryFailed(f"mirror {j} is gone from QEMU's block jobs")
                if info.get("io-status", "ok") != "ok":
                    raise SecondaryFailed(f"mirror {j}: I/O status {info['io-status']}")
                if info.get("status") != "ready" or not info.get("ready"):
                    raise SecondaryFailed(f"mirror {j} is {info.get('status')}, not ready")
                if info["len"] - info["offset"]:
                    pending.append(f"{j}: {info['len'] - info['offset']} bytes")
            if not pending:
                return js
            if time.monotonic() > deadline:
                raise SecondaryFailed(f"the mirrors did not drain with the VM stopped "
                                      f"({', '.join(pending)} left after {timeout:.0f} s)")
            time.sleep(DRAIN_POLL)  # polling a counter with a deadline


def cancel_mirrors(qmp: Qmp, mirrors: Mirrors, timeout: float = CANCEL_TIMEOUT) -> list[str]:
    """block-job-cancel each mirror and wait for it to end.  After READY that ends the
    job cleanly without a pivot: the VM goes on using its own disk.  Returns problems."""
    problems = []
    start = qmp.cursor
    live = set(jobs(qmp)) & mirrors.ids
    for j in sorted(live):
        try:
            qmp.cmd("block-job-cancel", device=j)
        except QmpCommandError as e:
            if e.qmp_class != "DeviceNotActive":  # not: it ended meanwhile (a failed mirror)
                problems.append(e.desc)
            live.discard(j)
    pending = set(live)
    deadline = time.monotonic() + timeout
    cursor = start
    while pending and not qmp.gone:
        ev, cursor = qmp.wait_event(
            lambda e: e.get("event") in JOB_END_EVENTS and (e.get("data") or {}).get("device")
            in pending, cursor, max(0.0, deadline - time.monotonic()))
        if ev is None:
            if time.monotonic() >= deadline:
                for j in sorted(pending):  # a target that no longer answers: force it
                    try:
                        qmp.cmd("block-job-cancel", device=j, force=True)
                    except QmpCommandError:
                        pass
                pending &= set(jobs(qmp))
                if pending:
                    problems.append(f"mirror(s) {', '.join(sorted(pending))} did not end")
                break
            continue
        pending.discard(ev["data"]["device"])
    return problems


def remove_nodes(qmp: Qmp, drives: list[DriveSpec]) -> list[str]:
    """blockdev-del our NBD nodes (those still there); returns problems."""
    present = {n.get("node-name") for n in qmp.cmd("query-named-block-nodes")}
    problems = []
    for d in drives:
        if d.node in present:
            try:
                qmp.cmd("blockdev-del", **{"node-name": d.node})
            except QmpCommandError as e:
                problems.append(e.desc)
    return problems


def remove_leftovers(qmp: Qmp, drives: list[DriveSpec]) -> str | None:
    """Clean up after an earlier protect that died without detaching (kill -9).

    Its mirror jobs and NBD nodes are still in QEMU and would make ours fail with
    "duplicate id"; if it died mid-checkpoint it also left the VM paused.  Only one
    client can use a QMP socket at a time, so nobody else is driving them now.
    Returns what was done, or None if there was nothing to do.
    """
    present = {n.get("node-name") for n in qmp.cmd("query-named-block-nodes")}
    stale_jobs = [d.job for d in drives if d.job in jobs(qmp)]
    stale_nodes = [d.node for d in drives if d.node in present]
    if not stale_jobs and not stale_nodes:
        return None
    paused = qmp.cmd("query-status").get("status") == "paused"
    problems = detach(qmp, Mirrors(qmp, drives))
    if problems:
        raise PrimaryError("cannot remove the mirrors an earlier protect left behind: "
                           + "; ".join(problems))
    done = f"removed {len(stale_jobs)} mirror(s) and {len(stale_nodes)} node(s) left by an " \
           "earlier protect that did not detach"
    if paused:
        qmp.cmd("cont")
        done += "; resumed the VM it had left paused"
    return done


def detach(qmp: Qmp, mirrors: Mirrors) -> list[str]:
    """Leave QEMU as we found it: no mirror, no NBD node; the VM keeps running."""
    problems = cancel_mirrors(qmp, mirrors)
    problems += remove_nodes(qmp, mirrors.drives)
    return problems


# --- a checkpoint ---------------------------------------------------------------------------
@dataclass
class Checkpoint:
    epoch: int
    committed: bool
    pause: float  # seconds the VM was stopped (stop sent .. cont answered)
    skipped: str | None = None
    hook: float = 0.0  # seconds of that spent in the hook


def vm_running(qmp: Qmp) -> bool:
    return bool(qmp.cmd("query-status").get("running"))


def run_hook(command: str, epoch: int, timeout: float = HOOK_TIMEOUT) -> str | None:
    """Run the checkpoint hook; None if it succeeded, else why the commit is skipped.

    Its own session, so a Ctrl-C meant for protect does not kill it halfway through
    the checkpoint protect promised to finish.
    """
    env = dict(os.environ, NBD_MC_EPOCH=str(epoch))
    try:
        r = subprocess.run(command, shell=True, env=env, stdin=subprocess.DEVNULL,
                           timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        return f"the checkpoint hook ran longer than {timeout:.0f} s"
    except OSError as e:
        return f"the checkpoint hook could not run: {e}"
    if r.returncode:
        return f"the checkpoint hook exited with status {r.returncode}"
    return None


def checkpoint(qmp: Qmp, ctl: ControlClient, mirrors: Mirrors, epoch: int,
               hook=None) -> Checkpoint:
    """stop -> drained -> hook -> commit epoch -> cont.

    ``hook`` is a shell command (run_hook) or, for library users and tests, a
    callable(epoch) returning None to go on or a reason to skip the commit.
    The VM is continued whatever happens (unless it was not running to begin with:
    then protect has no business starting it).  A hook failure skips the commit;
    a secondary failure raises SecondaryFailed after the cont.
    """
    mirrors.check()
    was_running = vm_running(qmp)
    t0 = time.perf_counter()
    if was_running:
        qmp.cmd("stop")
    skipped = None
    hook_time = 0.0
    try:
        mirrors.wait_drained()
        t_hook = time.perf_counter()
        if callable(hook):
            skipped = hook(epoch)
        elif hook:
            skipped = run_hook(hook, epoch)
        hook_time = time.perf_counter() - t_hook
        if not skipped:
            commit(ctl, epoch)
    finally:
        if was_running:
            resume(qmp)
    return Checkpoint(epoch, skipped is None, time.perf_counter() - t0, skipped, hook_time)


def resume(qmp: Qmp) -> None:
    """cont, unless QEMU is gone (then there is nothing to resume)."""
    if qmp.gone:
        return
    try:
        qmp.cmd("cont")
    except PrimaryGone:
        pass


# --- the whole run ----------------------------------------------------------------------------
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

    def as_dict(self) -> dict:
        p = sorted(self.pauses)
        h = sorted(self.hook_times)
        return {"first_epoch": self.first_epoch, "committed": self.committed,
                "commits": self.commits, "skipped": self.skipped,
                "pause_ms": {"median": round(statistics.median(p) * 1000, 3) if p else None,
                             "worst": round(p[-1] * 1000, 3) if p else None,
                             "count": len(p),
                             "hook_median": round(statistics.median(h) * 1000, 3) if h else None},
                "initial_sync_bytes": self.initial_sync_bytes,
                "mirrored_bytes": self.mirrored_bytes, "seconds": round(self.seconds, 3),
                "outcome": self.outcome, "error": self.error, "primary_gone": self.primary_gone,
                "problems": self.problems}


class StopFlag:
    """SIGINT/SIGTERM ask protect to stop after the current checkpoint.

    A self-pipe lets the interval wait end at once, without polling.
    """

    def __init__(self):
        self.requested: str | None = None
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._old = {}

    def install(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        try:
            os.write(self._w, b"x")
        except OSError:
            pass

    def request(self, why: str) -> None:
        self._handler(signal.SIGTERM, None)
        self.requested = why

    def __call__(self) -> bool:
        return self.requested is not None

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` or until a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self.requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            select.select([self._r], [], [], left)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        os.close(self._r)
        os.close(self._w)


class Console:
    """Progress on a terminal (a bar redrawn in place), plain lines otherwise."""

    def __init__(self, stream=None, quiet: bool = False):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.quiet = quiet
        self._last_pct = -1
        self._bar = False

    def say(self, text: str) -> None:
        if self.quiet:
            return
        if self._bar:
            self.stream.write("\n")
            self._bar = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def sync_progress(self, done: int, total: int) -> None:
        if self.quiet or not total:
            return
        pct = min(100, done * 100 // total)
        if self.tty:
            width = 30
            fill = width * pct // 100
            self.stream.write(f"\r  initial sync [{'#' * fill}{'.' * (width - fill)}] {pct:3d}% "
                              f"{_mib(done)}/{_mib(total)}")
            self.stream.flush()
            self._bar = True
        elif pct // 10 != self._last_pct // 10 or pct == 100 and self._last_pct != 100:
            self.stream.write(f"  initial sync {pct}% ({_mib(done)} of {_mib(total)})\n")
            self.stream.flush()
        self._last_pct = pct


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _control(opts: Options) -> ControlClient:
    # TLS protects the control channel over TCP only; a unix socket is plain (0600).
    tcp = parse_address(opts.control)[0] == "tcp"
    tls = TlsFiles(opts.tls_certificates) if opts.tls_certificates and tcp else None
    try:
        return ControlClient(opts.control, tls=tls)
    except (OSError, ValueError, NbdMcError) as e:
        raise PrimaryError(f"cannot reach the secondary's control channel {opts.control}: "
                           f"{_why(e)}") from None


def open_session(opts: Options):
    """The QMP session protect drives and its drives as QEMU names them: QEMU's own
    socket (``--qmp``), or libvirt's QMP passthrough (``--libvirt``, where each
    ``--drive`` names a disk target and is mapped to its node)."""
    if not opts.libvirt:
        return Qmp(opts.qmp), opts.drives
    from .libvirt_qmp import LibvirtQmp
    qmp = LibvirtQmp(opts.libvirt, opts.connect)
    try:
        return qmp, qmp.resolve_drives(opts.drives)
    except BaseException:
        qmp.close()
        raise


def protect(opts: Options, console: Console | None = None, stop: StopFlag | None = None) -> Report:
    """Attach, sync, checkpoint until told to stop or something fails; detach.

    Returns the report; ``report.outcome`` is "detached" (exit 0) or "failed" (exit 1,
    ``report.error`` says what happened; the VM runs on, unprotected).
    """
    console = console or Console()
    own_stop = stop is None
    stop = stop or StopFlag().install()
    report = Report()
    t_start = time.monotonic()
    ctl = qmp = mirrors = None
    try:
        ctl = _control(opts)
        status = secondary_status(ctl)
        next_epoch = first_epoch(status, opts.drives)
        report.first_epoch = next_epoch
        report.committed = next_epoch - 1
        qmp, drives = open_session(opts)
        opts = replace(opts, drives=drives)
        sizes = check_drives(qmp, opts.drives)
        check_sizes(sizes, status, opts.drives)
        leftover = remove_leftovers(qmp, opts.drives)
        if leftover:
            console.say(f"nbd-mc protect: {leftover}")
        mirrors = Mirrors(qmp, opts.drives)
        state = ("not protected yet: epoch 0, the first commit after the sync makes it "
                 "protected" if next_epoch == 1 else
                 f"already protected at epoch {next_epoch - 1}: the full sync is kept as undo "
                 f"until epoch {next_epoch} commits")
        console.say(f"nbd-mc protect: {', '.join(f'{d.drive} -> {d.export}' for d in opts.drives)}"
                    f" on {opts.target.describe()}; secondary {state}")
        report.attached = True
        _attach_and_mirror(qmp, opts, mirrors)
        console.say(f"  mirroring {_mib(sum(sizes.values()))} (sync=full, write-blocking)")
        if not mirrors.wait_ready(console.sync_progress, stop):
            report.outcome = "detached"
            console.say("stopped before the initial sync finished: nothing was committed")
            return report
        report.initial_sync_bytes = sum(mirrors.synced.values())
        console.say(f"  mirrors ready; checkpointing every {opts.interval * 1000:g} ms"
                    + (f" for {opts.epochs} epochs" if opts.epochs else "") + " (Ctrl-C detaches)")
        _checkpoint_loop(qmp, ctl, mirrors, opts, next_epoch, report, stop, console)
        report.outcome = "detached"
    except PrimaryError as e:
        report.outcome = "failed"
        report.error = e.desc
        report.primary_gone = isinstance(e, PrimaryGone)
    finally:
        if mirrors is not None and qmp is not None:
            report.mirrored_bytes = _mirrored_bytes(qmp, mirrors, report)
            if not qmp.gone:
                try:
                    report.problems += detach(qmp, mirrors)
                except PrimaryError as e:
                    report.problems.append(e.desc)
        for c in (qmp, ctl):
            if c is not None:
                c.close()
        if own_stop:
            stop.restore()
        report.seconds = time.monotonic() - t_start
    return report


def _attach_and_mirror(qmp: Qmp, opts: Options, mirrors: Mirrors) -> None:
    if opts.legacy_drive_mirror:
        if opts.target.tls:
            raise PrimaryError("drive-mirror cannot take TLS credentials; use blockdev-mirror")
        start_drive_mirrors(qmp, opts.target, opts.drives)
        return
    creds = None
    if opts.target.tls:
        if not opts.tls_certificates:
            raise PrimaryError(f"{opts.target.uri} uses TLS: give --tls-certificates DIR")
        creds = add_tls_creds(qmp, opts.tls_certificates)
    attach(qmp, opts.target, opts.drives, creds)
    try:
        start_mirrors(qmp, opts.drives)
    except QmpCommandError as e:
        raise PrimaryError(f"cannot start the mirror: {e.desc}") from None


def _checkpoint_loop(qmp, ctl, mirrors, opts, epoch, report, stop, console) -> None:
    """Every interval a checkpoint, until --epochs N commits or a stop request.

    A stop request during the wait ends the loop at once; one arriving during a
    checkpoint lets that checkpoint finish (the handler only sets a flag).
    """
    while not stop():
        stop.sleep(opts.interval)
        if stop():
            break
        cp = checkpoint(qmp, ctl, mirrors, epoch, opts.hook)
        report.pauses.append(cp.pause)
        if opts.hook:
            report.hook_times.append(cp.hook)
        if cp.committed:
            report.committed = epoch
            report.commits += 1
            epoch += 1
            if report.commits == 1 and epoch == 2:
                console.say("  epoch 1 committed: the secondary is protected")
            if opts.epochs and report.commits >= opts.epochs:
                break
        else:
            report.skipped += 1
            console.say(f"  epoch {epoch} not committed: {cp.skipped}; the VM continues")


def _mirrored_bytes(qmp: Qmp, mirrors: Mirrors, report: Report) -> int:
    try:
        return max(mirrors.progress()[0], report.initial_sync_bytes)
    except PrimaryError:
        return report.initial_sync_bytes


def summary(report: Report) -> str:
    """The closing lines: what is protected up to where, and how long the VM paused."""
    d = report.as_dict()
    p = d["pause_ms"]
    lines = []
    if report.commits:
        lines.append(f"committed epochs {report.first_epoch}..{report.committed} "
                     f"({report.commits} checkpoints, {report.skipped} skipped)")
    else:
        lines.append(f"no epoch committed by this run (secondary at epoch {report.committed})")
    if p["count"]:
        hook = (f" (of which the hook: median {p['hook_median']:.2f} ms)"
                if p["hook_median"] is not None else "")
        lines.append(f"VM pause per checkpoint: median {p['median']:.2f} ms, worst "
                     f"{p['worst']:.2f} ms{hook}")
    lines.append(f"mirrored {_mib(report.mirrored_bytes)} (initial sync "
                 f"{_mib(report.initial_sync_bytes)}) in {report.seconds:.1f} s")
    for problem in report.problems:
        lines.append(f"warning: while detaching: {problem}")
    return "\n".join(lines)


def failure_advice(report: Report) -> str:
    """What a user should know after protection failed: what runs, what is safe where."""
    where = (f"the secondary holds epoch {report.committed}, the last one it acknowledged"
             if report.committed else "the secondary holds no committed epoch yet")
    if not report.attached:
        return report.error or "refused"
    if report.primary_gone:
        return (f"protection stopped: {report.error}\n"
                f"The primary QEMU is gone; {where}. To continue on the secondary run "
                f"`nbd-mc failover` there: it returns the disks to that epoch and prints "
                f"what to boot.")
    return (f"protection stopped: {report.error}\n"
            f"The VM keeps running UNPROTECTED (mirrors removed); {where}. Restart or "
            f"repair the secondary, then run `nbd-mc protect` again: a new full sync "
            f"makes it consistent at the next commit.")
