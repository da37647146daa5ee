"""The primary's data source: reading a protected drive's contents from outside QEMU.

Three features read the primary's disk themselves, not through a block job:
online verify (a slice at each checkpoint, nbd_mc/verify.py), the targeted
repair (repair.py) and the checksum sync (resync.py); ranges.RangeWriter reads
for the last two.  They need the drive's *guest-visible* bytes, and where a
slice is captured at a checkpoint, exactly the state at that instant (the VM is
stopped and its I/O drained: nothing changes the drive while we read).

There are two ways to get them, chosen per drive, automatically:

* :class:`RawFile` -- the drive is a local raw image file: read the file.  The
  fastest (no copy through QEMU), and exact at a checkpoint: after ``stop`` has
  drained the I/O, the page cache holds every write (QEMU's default
  ``cache.direct=off`` writes with pwrite; with O_DIRECT the kernel keeps the
  page cache coherent).  Holes are found with SEEK_DATA/SEEK_HOLE.
* :class:`NbdExport` -- anything else (a qcow2 image -- the libvirt norm --, a
  network drive, a block device): QEMU itself serves the drive's node as a
  *read-only* export on its own NBD server, and we read it with libnbd.  Only
  QEMU can interpret a qcow2 (its metadata cache is in QEMU's memory) or reach a
  network drive, so reading through QEMU is the only correct way.  The block
  layer keeps serving NBD requests while the vCPUs are stopped (``stop`` drains
  the guest's I/O and lets the main loop run on), so a read made with the VM
  paused sees the point-in-time state; protect sends no QMP command while it
  reads, so nothing waits on anything (under libvirt the same: the passthrough
  is idle too).  Holes are what NBD block status (``base:allocation``) reports
  as reading zeros.

QEMU runs at most one NBD server.  :class:`PrimarySource` starts one on a
private unix socket (``nbd-server-start``) in a directory of its own under
``/run/nbd-mc`` (chowned to the user QEMU runs as, so a QEMU that is not root --
libvirt's ``libvirt-qemu`` -- can create the socket; we connect as root or as
QEMU's own user), adds one export per drive that needs it (``block-export-add``,
``writable: false``, ids and names prefixed ``nbd-mc.``), and removes the exports
and the server it started when protect ends.  The socket path is fixed per QEMU
(its QMP socket or libvirt domain UUID), so a server left behind by a protect
that was killed is recognised and reused; a server somebody else started is
refused with a clear message (QEMU 7.2 cannot tell where it listens).  Leftover
``nbd-mc.`` exports are removed first.

If neither way works for a drive, PrimarySource.open raises SourceUnavailable
saying why: verify is then refused, the checksum sync falls back to a full one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import xml.etree.ElementTree as ET

from ..fileio import data_extents, pread_into
from .errors import PrimaryError, QmpCommandError
from .nbdio import nbd as _nbd, status_runs
from .options import DriveSpec

#: Our exports' ids and NBD names start with this (leftovers are found by it).
EXPORT_PREFIX = "nbd-mc."
#: Where PrimarySource makes the directory of QEMU's NBD socket (as root).
RUN_DIR = "/run/nbd-mc"
#: One NBD read request (QEMU's NBD server refuses more than 32 MiB); smaller
#: requests in parallel were faster than one big one (bench/verify_source.py).
READ_CHUNK = 1 << 20
#: Reads of our own QEMU normally take milliseconds; bound them anyway.
READ_TIMEOUT = 30.0


class SourceError(PrimaryError):
    """Reading the primary's drive failed (an I/O error, QEMU not answering): the
    reader skips what it wanted and tries again later; protection goes on."""


class SourceUnavailable(SourceError):
    """No way to read the primary's drive: not a local raw file, and QEMU's own NBD
    export could not be set up."""


class RawFile:
    """A drive that is a local raw image file.  State: ``fd`` (open for reading
    until close); used by protect's single thread."""

    kind = "raw file"

    def __init__(self, drive: str, path: str):
        self.drive = drive
        self.path = path
        self.where = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise SourceUnavailable(f"cannot read drive {drive} ({path}): {e.strerror}") from None

    def read_into(self, view, offset: int) -> None:
        try:
            pread_into(self.fd, view, offset)
        except OSError as e:
            raise SourceError(f"reading drive {self.drive} ({self.path}) at {offset}: "
                              f"{e.strerror}") from None

    def extents(self, offset: int, end: int):
        """(start, length, data) runs of [offset, end); not data = reads as zeros."""
        try:
            return list(data_extents(self.fd, offset, end))
        except OSError as e:
            raise SourceError(f"the data/hole map of drive {self.drive} ({self.path}): "
                              f"{e.strerror}") from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class NbdExport:
    """A drive read through QEMU's own read-only NBD export of its node (libnbd).

    State: ``_h`` the libnbd handle, None after a failure (the next read connects
    again) or close; used by protect's single thread.  Every wait is bounded by
    ``timeout``: a QEMU that stops answering makes a read fail with SourceError,
    never hang protect.  A failed read drops its connection before it returns, so
    a late answer can never land in a buffer the caller has reused.
    """

    kind = "QEMU NBD export"

    def __init__(self, drive: str, socket: str, export: str, node: str,
                 timeout: float = READ_TIMEOUT):
        self.drive = drive
        self.socket = socket
        self.export = export
        self.node = node
        self.timeout = timeout
        self.where = f"QEMU's NBD export {export} of node {node}"
        self._h = None
        try:
            self._h = self._connect()
        except SourceError as e:
            raise SourceUnavailable(e.desc) from None

    def _connect(self):
        nbd = _nbd()
        h = nbd.NBD()
        try:
            h.set_export_name(self.export)
            h.add_meta_context("base:allocation")
            h.aio_connect_unix(self.socket)
            deadline = time.monotonic() + self.timeout
            while h.aio_is_connecting():
                self._poll(h, deadline, "connecting to")
            if not h.aio_is_ready():
                raise SourceError(f"cannot open {self.where} at {self.socket}")
        except nbd.Error as e:
            raise SourceError(f"cannot open {self.where} at {self.socket}: {e.string}") \
                from None
        return h

    def _handle(self):
        if self._h is None:
            self._h = self._connect()
        return self._h

    def _poll(self, h, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SourceError(f"QEMU did not answer within {self.timeout:g} s while {what} "
                              f"drive {self.drive} ({self.where})")
        h.poll(max(1, int(left * 1000)))
        if h.aio_is_dead():
            raise SourceError(f"QEMU closed its NBD export while {what} drive {self.drive} "
                              f"({self.where})")

    def _run(self, send, what: str):
        """Send requests (``send(handle)`` returns their cookies and whatever must stay
        alive meanwhile) and wait for all of them; on any failure drop the
        connection (its requests die with it) and raise SourceError."""
        nbd = _nbd()
        try:
            h = self._handle()
            cookies, keep = send(h)
            deadline = time.monotonic() + self.timeout
            for c in cookies:
                while not h.aio_command_completed(c):
                    self._poll(h, deadline, what)
            return keep
        except nbd.Error as e:
            self._h = None
            raise SourceError(f"QEMU refused {what} drive {self.drive} ({self.where}): "
                              f"{e.string}") from None
        except BaseException:
            self._h = None
            raise

    def read_into(self, view, offset: int) -> None:
        """Fill ``view`` from ``offset``: READ_CHUNK requests, all sent at once (QEMU
        answers them in parallel coroutines: its file reads overlap the socket
        transfers), each read by libnbd straight into its part of ``view``."""
        nbd = _nbd()
        view = memoryview(view).cast("B")

        def send(h):
            buffers, cookies = [], []  # the buffers stay alive until all completed
            for pos in range(0, len(view), READ_CHUNK):
                buffers.append(nbd.Buffer.from_buffer(view[pos:pos + READ_CHUNK]))
                cookies.append(h.aio_pread(buffers[-1], offset + pos))
            return cookies, buffers
        self._run(send, f"reading {len(view)} bytes at {offset} of")

    def extents(self, offset: int, end: int):
        """(start, length, data) runs of [offset, end) from NBD block status: not data
        = QEMU says the range reads as zeros (a qcow2 hole or zero cluster)."""
        nbd = _nbd()
        out: list[list] = []

        def ask(pos, count, extent):
            self._run(lambda h: ([h.aio_block_status(count, pos, extent)], None),
                      "asking block status of")
        for start, n, flags in status_runs(offset, end, ask):
            # not data = QEMU says it reads as zeros; a server that says nothing: data
            data = flags is None or not flags & nbd.STATE_ZERO
            if out and out[-1][2] == data and out[-1][0] + out[-1][1] == start:
                out[-1][1] += n
            else:
                out.append([start, n, data])
        return [tuple(x) for x in out]

    def close(self) -> None:
        # Dropping the handle closes the socket (QEMU, not a peer we must be polite to).
        self._h = None


def drive_nodes(qmp, drives: list[DriveSpec]) -> dict[str, dict]:
    """{drive: query-block's ``inserted`` of it} (the node under any mirror filter)."""
    found = {}
    for b in qmp.cmd("query-block"):
        ins = b.get("inserted") or {}
        for n in (b.get("device"), ins.get("node-name")):
            if n:
                found[n] = ins
    return {d.drive: found.get(d.drive) or found.get(d.source) or {} for d in drives}


def local_raw_file(ins: dict) -> str | None:
    """The path of a drive's image if it is a local raw file (query-block's inserted)."""
    path = ins.get("file") or ""
    if ins.get("drv") == "raw" and os.path.isfile(path):
        return path
    return None


class PrimarySource:
    """How protect reads each protected drive: {drive: RawFile | NbdExport}.

    State (protect's single thread): ``drives`` {drive: its reader}, fixed after
    open(); ``qmp`` the session that made the exports (None: nothing to undo);
    ``exports`` the export ids we added; ``server_started`` -- the NBD server at
    ``socket`` is ours to stop.
    """

    def __init__(self, drives: dict, qmp=None, socket: str | None = None):
        self.drives = drives
        self.qmp = qmp
        self.socket = socket
        self.exports: list[str] = []
        self.server_started = False

    # --- choosing ---------------------------------------------------------------------
    @classmethod
    def raw_files(cls, paths: dict[str, str]) -> "PrimarySource":
        """Local raw image files only (library users and tests that know the paths)."""
        out = cls({})
        try:
            for drive, path in paths.items():
                out.drives[drive] = RawFile(drive, path)
        except BaseException:
            out.close()
            raise
        return out

    @classmethod
    def open(cls, qmp, drives: list[DriveSpec], key: str, owner: tuple[int, int] | None = None,
             prefer_export: bool = False, timeout: float = READ_TIMEOUT) -> "PrimarySource":
        """Each drive's local raw file, or else QEMU's NBD export of its node.

        ``key`` names this QEMU (its QMP socket, a libvirt domain's UUID): the NBD
        socket's path is derived from it.  ``owner`` (uid, gid) is who QEMU runs as,
        if known.  ``prefer_export`` uses the export even for raw files (tests and
        the bench compare the two).  Call with no mirror of ours in QEMU (after
        remove_leftovers).  Raises SourceUnavailable."""
        out = cls({}, qmp)
        try:
            need = {}
            nodes = drive_nodes(qmp, drives)
            for d in drives:
                ins = nodes[d.drive]
                if not ins:
                    raise SourceUnavailable(f"QEMU shows no medium for drive {d.drive}")
                path = local_raw_file(ins)
                if path and not prefer_export:
                    out.drives[d.drive] = RawFile(d.drive, path)
                elif not ins.get("node-name"):
                    raise SourceUnavailable(f"drive {d.drive} ({ins.get('drv')} "
                                            f"{ins.get('file')!r}) is no local raw file and "
                                            "QEMU gives its node no name to export")
                else:
                    need[d.drive] = ins
            if need:
                out._export(need, key, owner, timeout)
        except BaseException:
            out.close()
            raise
        return out

    def _export(self, need: dict[str, dict], key: str, owner, timeout: float) -> None:
        qmp = self.qmp
        remove_leftover_exports(qmp)
        self.socket = socket_path(key, owner)
        why = None
        try:
            qmp.cmd("nbd-server-start",
                    addr={"type": "unix", "data": {"path": self.socket}})
            self.server_started = True
        except QmpCommandError as e:
            if "already" not in e.desc.lower():
                raise SourceUnavailable(f"QEMU cannot start its NBD server on {self.socket} "
                                        f"to export the drives: {e.desc}") from None
            why = e.desc  # ours, left by a protect that was killed? connecting tells
        for drive, ins in need.items():
            export = f"{EXPORT_PREFIX}{os.getpid()}.{drive}"
            try:
                qmp.cmd("block-export-add", type="nbd", id=export, name=export,
                        writable=False, **{"node-name": ins["node-name"]})
            except QmpCommandError as e:
                raise SourceUnavailable(f"QEMU cannot export drive {drive} (node "
                                        f"{ins['node-name']}) read-only: {e.desc}") from None
            self.exports.append(export)
            try:
                self.drives[drive] = NbdExport(drive, self.socket, export, ins["node-name"],
                                               timeout)
            except SourceUnavailable as e:
                if why is None:
                    raise
                raise SourceUnavailable(
                    f"QEMU already runs an NBD server that nbd-mc did not start ({why}); "
                    f"QEMU cannot say where it listens, so drive {drive} cannot be read "
                    f"through it ({e.desc})") from None
        if why is not None:
            self.server_started = True  # it is ours (we reached our export on our socket)

    # --- reading ----------------------------------------------------------------------
    def __getitem__(self, drive: str):
        return self.drives[drive]

    def where(self, drive: str) -> str:
        return self.drives[drive].where

    def read_into(self, drive: str, view, offset: int) -> None:
        self.drives[drive].read_into(view, offset)

    def read(self, drive: str, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.drives[drive].read_into(memoryview(buf), offset)
        return buf

    def extents(self, drive: str, offset: int, end: int):
        return self.drives[drive].extents(offset, end)

    def describe(self) -> str:
        return ", ".join(f"{d}: {r.kind}" for d, r in self.drives.items())

    # --- the end ----------------------------------------------------------------------
    def close(self) -> list[str]:
        """Close the readers; remove our exports and the NBD server we started.
        Returns problems (QEMU may be gone: then there is nothing to remove)."""
        for r in self.drives.values():
            r.close()
        problems = []
        qmp, self.qmp = self.qmp, None
        try:  # (nothing to remove from a QEMU that is gone)
            if qmp is not None and not getattr(qmp, "gone", None):
                if self.server_started:  # stopping the server ends its exports too
                    qmp.cmd("nbd-server-stop")
                else:
                    for export in self.exports:
                        qmp.cmd("block-export-del", id=export, mode="hard")
        except (QmpCommandError, PrimaryError) as e:
            problems.append(f"removing QEMU's NBD export of the drives: {e.desc}")
        self.exports = []
        self.server_started = False
        if self.socket:  # the socket and its directory (kept if someone else's is in it)
            for remove, path in ((os.unlink, self.socket),
                                 (os.rmdir, os.path.dirname(self.socket))):
                try:
                    remove(path)
                except OSError:
                    pass
        return problems


def remove_leftover_exports(qmp) -> list[str]:
    """Remove exports an earlier protect left (killed before it could): ids start
    with EXPORT_PREFIX.  Returns their ids."""
    try:
        exports = qmp.cmd("query-block-exports")
    except QmpCommandError:
        return []
    gone = []
    for e in exports:
        if e.get("id", "").startswith(EXPORT_PREFIX) and not e.get("shutting-down"):
            try:
                qmp.cmd("block-export-del", id=e["id"], mode="hard")
                gone.append(e["id"])
            except QmpCommandError:
                pass
    return gone


def socket_path(key: str, owner: tuple[int, int] | None) -> str:
    """The NBD socket for the QEMU named by ``key``, in a directory QEMU may create it
    in: RUN_DIR/qemu-HASH (mode 0700, owned by QEMU's user when we can chown it;
    root connects anyway).  Without access to RUN_DIR, a private temporary one."""
    name = "qemu-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    try:
        os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
        directory = os.path.join(RUN_DIR, name)
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except PermissionError:
        directory = tempfile.mkdtemp(prefix=f"nbd-mc-{name}-")
    if owner is not None and os.geteuid() == 0:
        st = os.stat(directory)
        if (st.st_uid, st.st_gid) != tuple(owner):
            os.chown(directory, *owner)
    os.chmod(directory, 0o700)
    return os.path.join(directory, "nbd.sock")


def qemu_owner_of_socket(path: str) -> tuple[int, int] | None:
    """Who QEMU runs as, from the owner of a unix socket it created (its QMP socket)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_uid, st.st_gid


def qemu_owner_of_pidfile(path: str) -> tuple[int, int] | None:
    """Who the process whose pid is in ``path`` runs as (libvirt writes one per
    running domain: /run/libvirt/qemu/NAME.pid)."""
    try:
        with open(path) as f:
            st = os.stat(f"/proc/{int(f.read().strip())}")
    except (OSError, ValueError):
        return None
    return st.st_uid, st.st_gid


def qemu_owner_from_xml(xml: str) -> tuple[int, int] | None:
    """Who a libvirt domain's QEMU runs as, from its live XML's DAC label
    (``<seclabel model='dac'><label>+64055:+64055</label>``); None if not shown."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for sl in root.findall("./seclabel"):
        if sl.get("model") != "dac":
            continue
        label = sl.findtext("label") or sl.findtext("imagelabel") or ""
        try:
            uid, gid = (int(x.lstrip("+")) for x in label.split(":"))
        except ValueError:
            continue
        return uid, gid
    return None
