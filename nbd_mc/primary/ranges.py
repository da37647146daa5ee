"""Copying byte ranges of a drive from the primary to the secondary, as its writer.

Two features need to write *chosen* ranges into the secondary outside the
mirror: a targeted repair of what online verify found different (repair.py),
and the checksum sync (resync.py), which copies only the blocks whose contents
differ.  QEMU cannot be aimed at arbitrary ranges: its mirror copies a whole
disk or nothing, and a ``blockdev-backup sync=bitmap`` copies what a dirty
bitmap marks -- but QEMU 7.2 has no QMP command that *sets* bits in a dirty
bitmap (only add/clear/merge/enable/disable/remove), so no bitmap can be made
to mark the ranges we chose.  So protect writes them itself, with libnbd (the
NBD client library of the nbdkit project, Debian's python3-libnbd), into the
same writer export the mirror uses (``NAME@WRITER``, granted by ``claim``):
the write is refused the moment a newer claim or a failover supersedes this
protect, exactly like the mirror's.

The data comes from the primary's data source (source.py: the drive's local
raw image file, or QEMU's read-only NBD export of its node -- the same source
online verify reads).  Callers make sure what they read is
stable -- a repair copies with the VM paused and the mirrors drained; the
checksum sync records every guest write that races its read in a dirty bitmap
and copies those again afterwards.

Every NBD wait is bounded by the stall timeout (libnbd's asynchronous calls and
its poll loop): a hung secondary makes a copy fail with SecondaryStalled, never
hang protect.  Requests are at most CHUNK bytes (nbdkit refuses more than 64 MiB;
memory stays bounded).
"""

from __future__ import annotations

import os
import time

from .errors import PrimaryError, SecondaryFailed, SecondaryStalled
from .nbdio import nbd as _nbd, status_runs
from .options import DriveSpec, NbdTarget
from .source import SourceError

#: Largest single NBD write, and the read buffer.
CHUNK = 4 << 20
_ZEROS = memoryview(bytes(CHUNK))


class RangeWriter:
    """NBD connections to the writer exports of one claim, opened on first use.

    State (protect's single thread): ``_handles`` {drive: nbd.NBD} of the
    current claim.  ``source`` (source.PrimarySource, or None: nothing is read)
    reads the primary's drives; it is the caller's.  A new claim (another
    writer id) needs a new RangeWriter: close this one.
    """

    def __init__(self, target: NbdTarget, writer_drives: list[DriveSpec],
                 source, tls_certificates: str | None = None, timeout: float = 10.0):
        self.target = target
        self.exports = {d.drive: d.export for d in writer_drives}
        self.source = source
        self.tls_certificates = tls_certificates
        self.timeout = timeout
        self._handles: dict = {}
        self.written = 0  # bytes sent (data and zeroes)

    # --- the connections -----------------------------------------------------------------
    def _handle(self, drive: str):
        h = self._handles.get(drive)
        if h is not None:
            return h
        nbd = _nbd()
        export = self.exports[drive]
        h = nbd.NBD()
        try:
            h.set_export_name(export)
            h.add_meta_context("base:allocation")
            if self.target.tls:
                if not self.tls_certificates:
                    raise PrimaryError(f"{self.target.uri} uses TLS: give --tls-certificates DIR")
                h.set_tls(nbd.TLS_REQUIRE)
                h.set_tls_certificates(os.path.abspath(self.tls_certificates))
            s = self.target.server
            if s["type"] == "unix":
                h.aio_connect_unix(s["path"])
            else:
                h.aio_connect_tcp(s["host"], str(s["port"]))
            deadline = time.monotonic() + self.timeout
            while h.aio_is_connecting():
                self._poll(h, deadline, f"connecting to export {export}")
            if not h.aio_is_ready():
                raise SecondaryFailed(f"cannot open export {export} on the secondary "
                                      f"({self.target.describe()})")
            if h.is_read_only():
                raise SecondaryFailed(f"export {export} on the secondary is read-only")
        except nbd.Error as e:
            raise SecondaryFailed(f"cannot open export {export} on the secondary "
                                  f"({self.target.describe()}): {e.string}") from None
        self._handles[drive] = h
        return h

    def _poll(self, h, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            self._drop_handle(h)
            raise SecondaryStalled(f"the secondary stalled: {what} took more than "
                                   f"{self.timeout:g} s")
        h.poll(max(1, int(left * 1000)))
        if h.aio_is_dead():
            self._drop_handle(h)
            raise SecondaryFailed(f"lost the NBD connection to the secondary while {what}")

    def _drop_handle(self, h) -> None:
        for drive, other in list(self._handles.items()):
            if other is h:
                del self._handles[drive]  # dropping the last reference closes it

    def _wait(self, h, cookie: int, what: str) -> None:
        nbd = _nbd()
        deadline = time.monotonic() + self.timeout
        try:
            while not h.aio_command_completed(cookie):
                self._poll(h, deadline, what)
        except nbd.Error as e:
            raise SecondaryFailed(f"the secondary refused {what}: {e.string}") from None

    # --- reading the primary's drive ---------------------------------------------------------
    def read(self, drive: str, offset: int, length: int) -> bytearray:
        """``length`` bytes of the primary's drive at ``offset`` (from the source)."""
        return self._source().read(drive, offset, length)

    def read_into(self, drive: str, view, offset: int) -> None:
        self._source().read_into(drive, view, offset)

    def extents(self, drive: str, offset: int, end: int):
        """(start, length, data) runs of the primary's drive (not data: reads as zeros)."""
        return self._source().extents(drive, offset, end)

    def _source(self):
        if self.source is None:  # (a writer made only to ask the secondary something)
            raise SourceError("this range writer has no source to read the primary's "
                              "drives from")
        return self.source

    # --- writing the secondary ---------------------------------------------------------------
    def write(self, drive: str, offset: int, data) -> None:
        """Write ``data`` at ``offset`` of the drive's writer export (CHUNK at a time;
        all-zero chunks as NBD write-zeroes, so holes stay holes)."""
        nbd = _nbd()
        h = self._handle(drive)
        view = memoryview(data)
        for pos in range(0, len(view), CHUNK):
            piece = view[pos:pos + CHUNK]
            what = f"a write of {len(piece)} bytes at {offset + pos} of {self.exports[drive]}"
            try:
                if piece == _ZEROS[:len(piece)]:
                    cookie = h.aio_zero(len(piece), offset + pos)
                else:
                    cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(piece)),
                                          offset + pos)
            except nbd.Error as e:
                raise SecondaryFailed(f"the secondary refused {what}: {e.string}") from None
            self._wait(h, cookie, what)
            self.written += len(piece)

    def copy(self, drive: str, offset: int, length: int) -> int:
        """Copy [offset, offset+length) of the primary's drive to the secondary; the
        bytes copied.  What reads as zeros on the primary is sent as write-zeroes."""
        end = offset + length
        for start, n, data in self.extents(drive, offset, end):
            for pos in range(start, start + n, CHUNK):
                size = min(CHUNK, start + n - pos)
                self.write(drive, pos, self.read(drive, pos, size) if data else bytes(size))
        return length

    def allocated(self, drive: str, size: int) -> int:
        """Bytes of the secondary's disk that hold data (not holes), from NBD block
        status (base:allocation); the whole size if the server cannot tell."""
        nbd = _nbd()
        h = self._handle(drive)
        if not h.can_meta_context("base:allocation"):
            return size
        what = f"block status of {self.exports[drive]}"

        def ask(pos, count, extent):
            try:
                cookie = h.aio_block_status(count, pos, extent)
            except nbd.Error as e:
                raise SecondaryFailed(f"{what}: {e.string}") from None
            self._wait(h, cookie, what)

        total = 0
        for _, n, flags in status_runs(0, size, ask):
            if flags is None:
                return size
            if not flags & nbd.STATE_HOLE:
                total += n
        return min(total, size)

    def close(self) -> None:
        # Dropping a handle closes its socket; no NBD_CMD_DISC (nbd.shutdown waits
        # for the server, which may be the hung one we are leaving).
        self._handles = {}
