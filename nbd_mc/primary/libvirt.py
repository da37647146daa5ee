"""QMP through libvirt: `nbd-mc protect --libvirt DOMAIN` for a libvirt-managed VM.

libvirt owns a domain's QMP socket, so protect cannot connect to it the way it does
with ``--qmp``.  libvirt passes QMP through instead: ``virDomainQemuMonitorCommand``
(libvirt_qemu.qemuMonitorCommand) sends a command (or an HMP command line) and
returns QEMU's reply, and ``virConnectDomainQemuMonitorEventRegister`` delivers
QEMU's events.  :class:`LibvirtQmp` wraps both behind the interface of the
``--qmp`` session (cmd, hmp, cursor, events_after, wait_event, gone, close), so the
rest of protect does not know which one it drives.

Differences from a QMP socket that protect's logic relies on being harmless:

* Events travel separately from replies (libvirtd queues them), so an event QEMU
  sent before a reply may be recorded just after the command returned.  Nothing in
  protect's safety depends on that order: before every commit the mirrors' state
  is read with ``query-block-jobs`` (a failed mirror is gone from it), events only
  make failures visible sooner.
* Several clients may drive one domain at once.  Two protects on one domain would
  tear down each other's mirrors, so a session holds an exclusive lock named after
  the domain's UUID for its whole life (:data:`LOCK_DIR`).
* Disks are ``-blockdev`` nodes without a drive id: ``--drive vda`` names the
  libvirt target, and :meth:`LibvirtQmp.block_device` maps it to the node QEMU
  knows (``libvirt-1-format``), from the live domain XML and ``query-block``.

The libvirt event loop is libvirt's default implementation run on one daemon
thread per process (libvirt allows registering it only once, before the first
connection).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import threading
import xml.etree.ElementTree as ET

import libvirt
import libvirt_qemu

from .errors import PrimaryError, PrimaryGone, QmpCommandError, QmpTimeout
from .events import EventLog
from .qmp import QMP_TIMEOUT

DEFAULT_URI = "qemu:///system"
#: One lock file per protected domain; /run is per boot like the domains themselves.
LOCK_DIR = "/run/nbd-mc"

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it on a daemon thread (once).

    Must happen before the connection whose events we want is opened.
    """
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        # libvirt prints every error to stderr by default; we report them ourselves.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        libvirt.virEventRegisterDefaultImpl()

        def run():
            while True:
                libvirt.virEventRunDefaultImpl()

        _loop_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _loop_thread.start()


# libvirt error codes that mean the domain's QEMU (or libvirtd) is no longer there
_GONE_CODES = {libvirt.VIR_ERR_OPERATION_INVALID,  # "domain is not running"
               libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC,
               libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN}


_STOPPED = {libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "QEMU crashed",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "QEMU exited or was killed",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "the domain was destroyed",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "the guest shut down"}


class _Caller:
    """Runs each blocking libvirt call on a thread of its own so a caller can give up.

    virDomainQemuMonitorCommand has no timeout of its own (a ``stop`` draining I/O
    to a hung NBD target waits as long as it takes); the QMP socket session gives
    up after its timeout, and so must this one.  A call that timed out finishes
    (or not) on its own thread; the next call does not queue behind it.
    No state: each call has its own result box.
    """

    def call(self, fn, timeout: float):
        box: list = []
        done = threading.Event()

        def run():
            try:
                box.append((True, fn()))
            except BaseException as e:  # handed to the caller
                box.append((False, e))
            done.set()

        threading.Thread(target=run, name="libvirt-call", daemon=True).start()
        if not done.wait(timeout):
            raise TimeoutError(f"no answer within {timeout:g} s")
        ok, value = box[0]
        if ok:
            return value
        raise value

    def close(self) -> None:
        pass


class LibvirtQmp(EventLog):
    """A blocking QMP session with a libvirt domain, like the ``--qmp`` session.

    Events and ``gone`` (None while the domain runs, else why it or libvirtd went
    away) are the EventLog's (events.py), written by libvirt's event thread.
    Set once in __init__ and only read afterwards: conn, dom, name, uri, path.
    """

    def __init__(self, domain: str, uri: str = DEFAULT_URI, timeout: float = QMP_TIMEOUT,
                 exclusive: bool = True):
        """``exclusive``: hold the domain's protect lock (False only for a session that
        merely watches or plays the guest, as the tests do)."""
        self.name = domain
        self.exclusive = exclusive
        self.uri = uri
        self.path = f"libvirt domain {domain} on {uri}"  # named in messages like a socket path
        self.timeout = timeout
        EventLog.__init__(self)
        self._callbacks: list[int] = []
        self._lifecycle: int | None = None
        self._lock_fd: int | None = None
        self.conn = self.dom = None
        ensure_event_loop()
        self._caller = _Caller()
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        try:
            self.conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise PrimaryError(f"cannot connect to libvirt at {self.uri}: {_msg(e)}") from None
        try:
            self.dom = self.conn.lookupByName(self.name)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise PrimaryError(f"libvirt ({self.uri}): {_msg(e)}") from None
            names = sorted(d.name() for d in self.conn.listAllDomains())
            raise PrimaryError(f"libvirt ({self.uri}) has no domain {self.name!r} "
                               f"(its domains: {', '.join(names) or 'none'})") from None
        if self.exclusive:
            self._take_lock()
        # Events first, then the state check: a domain that stops in between is seen.
        self.conn.registerCloseCallback(self._on_close, None)
        self._lifecycle = self.conn.domainEventRegisterAny(
            self.dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        self._callbacks.append(libvirt_qemu.qemuMonitorEventRegister(
            self.conn, self.dom, None, self._on_event, None, 0))
        if not self.dom.isActive():
            raise PrimaryError(f"libvirt domain {self.name} is shut off: start it first "
                               f"(virsh -c {self.uri} start {self.name}); protect attaches to "
                               "a running VM")

    def _take_lock(self) -> None:
        """One protect per domain (see the module docstring)."""
        os.makedirs(LOCK_DIR, mode=0o755, exist_ok=True)
        path = os.path.join(LOCK_DIR, f"libvirt-{self.dom.UUIDString()}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise PrimaryError(f"another nbd-mc protect (pid {holder or '?'}) is attached "
                                   f"to libvirt domain {self.name}") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    # callbacks, on libvirt's event thread
    def _on_event(self, conn, dom, event, seconds, micros, details, opaque) -> None:
        data = {}
        if details:
            try:
                data = json.loads(details)
            except ValueError:
                data = {"details": details}
        self._record({"event": event, "data": data,
                      "timestamp": {"seconds": seconds, "microseconds": micros}})

    def _on_lifecycle(self, conn, dom, event, detail, opaque) -> None:
        # Only STOPPED means QEMU is gone (SHUTDOWN: the guest asked; QEMU still runs).
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            self._set_gone(_STOPPED.get(detail, "the domain stopped"))

    def _on_close(self, conn, reason, opaque) -> None:
        self._set_gone("the connection to libvirtd closed")

    # commands
    def _call(self, fn, what: str, timeout: float | None = None):
        timeout = self.timeout if timeout is None else timeout
        try:
            return self._caller.call(fn, timeout)
        except TimeoutError:
            # A timeout is not a dead QEMU (a stop draining writes to a hung secondary
            # waits for them); the domain is gone only when libvirt says so.
            if not self.gone and self._active():
                raise QmpTimeout(f"QEMU did not answer {what} within {timeout:g} s (libvirt "
                                 f"domain {self.name} is running)") from None
            self._set_gone(self.gone or f"{what}: no answer and the domain is not running")
            raise PrimaryGone(f"lost domain {self.name} during {what}: {self.gone}") from None
        except libvirt.libvirtError as e:
            # libvirt reports a QEMU that died under a command in several ways (an
            # internal error "End of file from qemu monitor" among them): whatever
            # the code, a domain that is no longer active is gone
            if e.get_error_code() in _GONE_CODES or not self._active():
                self._set_gone(_msg(e))
                raise PrimaryGone(f"lost domain {self.name} during {what}: {_msg(e)}") from None
            raise PrimaryError(f"libvirt refused {what} for domain {self.name}: "
                               f"{_msg(e)}") from None

    def _active(self) -> bool:
        try:
            return bool(self._caller.call(self.dom.isActive, 10))
        except (TimeoutError, libvirt.libvirtError):
            return False

    def cmd(self, name: str, /, **arguments):
        """Execute one QMP command; QmpCommandError for QEMU's refusal, PrimaryGone if
        the domain (or libvirtd) is gone, QmpTimeout if it runs but did not answer."""
        return self.execute(name, arguments)

    def execute(self, name: str, arguments: dict | None = None, timeout: float | None = None,
                oob: bool = False):
        """cmd() with its own timeout.  ``oob``: libvirt's monitor connection does not
        negotiate QMP out-of-band execution and runs one command at a time, so the
        command goes in band (a ``yank`` cannot overtake a stuck ``stop`` here; the
        stall then ends with this timeout)."""
        if self.gone:
            raise PrimaryGone(f"QEMU ({self.path}): {self.gone}")
        text = json.dumps({"execute": name, **({"arguments": arguments} if arguments else {})})
        reply = json.loads(self._call(
            lambda: libvirt_qemu.qemuMonitorCommand(self.dom, text, 0), name, timeout))
        if "error" in reply:
            err = reply["error"]
            raise QmpCommandError(name, err.get("class", "GenericError"), err.get("desc", ""))
        return reply.get("return")

    def hmp(self, command_line: str) -> str:
        """A human monitor command, through libvirt's HMP flag."""
        if self.gone:
            raise PrimaryGone(f"QEMU ({self.path}): {self.gone}")
        return self._call(lambda: libvirt_qemu.qemuMonitorCommand(
            self.dom, command_line, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP),
            "human-monitor-command")

    # disks
    def live_xml(self) -> str:
        """The running domain's XML (its disks, aliases, security labels)."""
        return self._call(lambda: self.dom.XMLDesc(0), "XMLDesc")

    def disks(self) -> dict[str, str | None]:
        """target dev -> device alias (``virtio-disk0``), from the live domain XML."""
        root = ET.fromstring(self.live_xml())
        found = {}
        for disk in root.findall("./devices/disk"):
            target = disk.find("target")
            alias = disk.find("alias")
            if target is None or target.get("dev") is None:
                continue
            found[target.get("dev")] = alias.get("name") if alias is not None else None
        return found

    def block_device(self, target: str) -> str:
        """The QEMU node that libvirt attached the disk with target dev ``target`` as.

        query-block names the disk by its qdev path (``/machine/peripheral/ALIAS/...``)
        and gives the node at the top of the guest's view (``libvirt-N-format``);
        blockdev-mirror's ``device`` takes that node name.
        """
        b = self._block(target)
        ins = b.get("inserted")
        if not ins or not ins.get("node-name"):
            raise PrimaryError(f"disk {target} of domain {self.name} has no medium")
        return ins["node-name"]

    def _block(self, target: str) -> dict:
        """The query-block entry of the disk with libvirt target ``target``: its qdev
        path is /machine/peripheral/ALIAS/... (libvirt gives every device an alias)."""
        disks = self.disks()
        if target not in disks:
            raise PrimaryError(f"libvirt domain {self.name} has no disk with target {target} "
                               f"(its disks: {', '.join(sorted(disks)) or 'none'})")
        alias = disks[target]
        if not alias:
            raise PrimaryError(f"libvirt gives disk {target} of domain {self.name} no alias")
        for b in self.cmd("query-block"):
            qdev = b.get("qdev") or ""
            if alias in (b.get("device"), qdev) or qdev.split("/")[3:4] == [alias]:
                return b
        raise PrimaryError(f"QEMU shows no block device for disk {target} (alias {alias}) "
                           f"of domain {self.name}")

    def resolve_drives(self, drives: list) -> list:
        """Each ``--drive TARGET[=EXPORT]`` with the node QEMU knows the disk as."""
        return [dataclasses.replace(d, device=self.block_device(d.drive)) for d in drives]

    def qdev(self, target: str) -> str:
        """The qdev path of the disk's BlockBackend: HMP ``qemu-io -d QDEV`` writes as
        the guest would, through the mirror (qemu-io on the node name would not)."""
        return self._block(target)["qdev"]

    def close(self) -> None:
        conn = self.conn
        if conn is not None:
            for cb in self._callbacks:
                try:
                    libvirt_qemu.qemuMonitorEventDeregister(conn, cb)
                except libvirt.libvirtError:
                    pass
            self._callbacks = []
            if self._lifecycle is not None:
                try:
                    conn.domainEventDeregisterAny(self._lifecycle)
                except libvirt.libvirtError:
                    pass
                self._lifecycle = None
            try:
                conn.unregisterCloseCallback()
            except libvirt.libvirtError:
                pass
            try:
                conn.close()
            except libvirt.libvirtError:
                pass
            self.conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._caller.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _msg(e: libvirt.libvirtError) -> str:
    return e.get_error_message() or str(e)
