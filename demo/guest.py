"""A real, tiny Linux guest with a verifiable disk workload (stdlib only).

The guest is Debian's cloud kernel plus an initramfs of busybox-static, the virtio
modules and e2fsck, built by guest/build.sh.  Its /init (guest/init) reads
``mc.mode`` from the kernel command line:

``work``
    mounts /dev/vda (ext4, see :func:`format_disk`) and writes records forever:
    ``/mc/r.<seq:09d>.<sha256 of the file>``, each holding the line
    ``MCREC seq=<seq> len=<L>`` and L random bytes, written as ``/mc/.tmp``,
    fsync'd, renamed, then the directory fsync'd.  After record n is durable it
    prints ``MC-SEQ n`` (every ``every`` records).  It stops only when killed
    (or prints ``MC-WORK-FAIL why`` and powers off if a write fails).
``check``
    mounts /dev/vda (replaying the journal, as any fresh boot would), unmounts,
    runs ``e2fsck -fn``, mounts read-only and verifies every record: checksum,
    header, length, and sequence numbers contiguous from 1 (or, with ``keep``,
    from the oldest kept record).  Prints
    ``MC-CHECK fsck=RC recovered=0|1 records=N minseq=A maxseq=M bad=K gaps=G inflight=0|1``
    and then ``MC-CHECK-OK`` or ``MC-CHECK-FAIL why``.
``service``
    ``check``, then (only when the check passed) ``work``: a VM that verifies its
    disk at every boot and then carries on, as the HA scenario's VM does.
``mkfs``
    formats /dev/vda as ext4 inside the guest (for a disk the host cannot reach
    as a file), then prints ``MC-MKFS-OK``.

Every guest powers off at the end (``poweroff -f``; QEMU runs with -no-reboot and
panic=-1, so a kernel panic also ends QEMU).  The last line is ``MC-POWEROFF``.
Fatal setup errors print ``MC-ERROR why``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

from nbd_mc.errors import NbdMcError

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "guest" / "build.sh"
DEFAULT_OUTDIR = REPO / "guest" / "build"
QEMU = "qemu-system-x86_64"
DEFAULT_DISK_SIZE = 128 * 1024 * 1024
MODES = ("work", "check", "mkfs", "service")

_POLL = 0.05  # seconds between looks at a serial log file


class GuestError(NbdMcError):
    """The guest did not get to the expected marker (crash, timeout, MC-ERROR)."""

    error_class = "GuestError"


@dataclasses.dataclass(frozen=True)
class GuestFiles:
    kernel: Path
    initrd: Path


@dataclasses.dataclass
class CheckResult:
    """What a check guest reported.  ``ok`` is the guest's own verdict."""

    ok: bool
    reason: str | None  # the MC-CHECK-FAIL text, None when ok
    fsck: int | None  # e2fsck -fn exit code after the journal was replayed
    recovered: bool | None  # the journal needed replay (the disk was not clean)
    records: int | None
    minseq: int | None
    maxseq: int | None
    bad: int | None
    gaps: int | None
    inflight: bool | None  # a half-written /mc/.tmp was there (harmless)
    bad_records: list[str]  # "name why" for the first bad records
    fsck_output: list[str]
    seconds: float  # wall time of the check guest, QEMU start to exit
    log: str


def build(outdir: str | os.PathLike = DEFAULT_OUTDIR) -> GuestFiles:
    """Build (or reuse, when up to date) the guest kernel and initrd in outdir."""
    outdir = Path(outdir)
    proc = subprocess.run(
        ["sh", str(BUILD_SCRIPT), str(outdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        raise GuestError(f"guest/build.sh failed ({proc.returncode}):\n{proc.stdout}")
    files = GuestFiles(kernel=outdir / "vmlinuz", initrd=outdir / "initrd.cpio.gz")
    for f in (files.kernel, files.initrd):
        if not f.is_file():
            raise GuestError(f"guest/build.sh did not produce {f}")
    return files


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        raise GuestError(f"{name} not found (Debian package e2fsprogs / qemu-system-x86)")
    return found


def format_disk(image_path: str | os.PathLike, size: int | None = None) -> Path:
    """Make an ext4 file system on a raw image file for a work guest.

    Creates the file (``size`` bytes, default 128 MiB) if it does not exist, or
    resizes it to ``size`` if given.  4 KiB blocks; inode tables and journal are
    initialised now, so no lazy-init thread writes in the background of the guest.
    """
    path = Path(image_path)
    if size is not None or not path.exists():
        with open(path, "ab") as f:
            f.truncate(size if size is not None else DEFAULT_DISK_SIZE)
    proc = subprocess.run(
        [_tool("mkfs.ext4"), "-F", "-q", "-b", "4096",
         "-E", "lazy_itable_init=0,lazy_journal_init=0", "-L", "nbd-mc-guest", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        raise GuestError(f"mkfs.ext4 {path} failed ({proc.returncode}): {proc.stdout}")
    return path


def disk_drive_args(image_path: str | os.PathLike, fmt: str = "raw", *,
                    snapshot: bool = False, drive_id: str = "drive0") -> list[str]:
    """``-drive if=none,...`` plus ``-device virtio-blk-pci`` for an image file.

    With snapshot=True QEMU sends the guest's writes to a temporary overlay and
    the image is left as it was (a check still replays the journal, in the overlay).
    """
    path = os.fspath(image_path).replace(",", ",,")
    drive = f"if=none,id={drive_id},file={path},format={fmt},cache=writeback"
    if snapshot:
        drive += ",snapshot=on"
    return ["-drive", drive, "-device", f"virtio-blk-pci,drive={drive_id}"]


def qemu_args(files: GuestFiles, mode: str, drive_args: Sequence[str], *,
              serial: str | os.PathLike = "stdio", every: int = 1, keep: int = 0,
              append: Sequence[str] = (), machine: str = "q35", memory_mb: int = 256,
              extra: Sequence[str] = ()) -> list[str]:
    """The qemu-system-x86_64 command line for a guest in ``mode``.

    The disk comes only from ``drive_args`` (e.g. :func:`disk_drive_args`, or the
    primary's own ``-drive if=none,id=drive0,...`` + ``-device virtio-blk-pci,drive=drive0``):
    the guest uses the first virtio-blk disk, /dev/vda.  ``serial`` is a file path
    for the console log, or "stdio".  ``extra`` is appended as is (e.g. -qmp ...).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if every < 1 or keep < 0:
        raise ValueError("every must be >= 1 and keep >= 0")
    serial_arg = "stdio" if os.fspath(serial) == "stdio" else f"file:{os.fspath(serial)}"
    # no_timer_check: under TCG on a loaded host the kernel's early check of the
    # IO-APIC timer can miss its ticks and panic ("IO-APIC + timer doesn't work!",
    # seen with the machine at load 25); the check proves nothing about emulation
    cmdline = ["console=ttyS0", "quiet", "panic=-1", "no_timer_check", f"mc.mode={mode}",
               f"mc.every={every}", f"mc.keep={keep}", *append]
    return [
        QEMU,
        "-machine", machine,
        "-accel", "tcg",
        "-m", str(memory_mb),
        "-smp", "1",
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-serial", serial_arg,
        "-kernel", os.fspath(files.kernel),
        "-initrd", os.fspath(files.initrd),
        "-append", " ".join(cmdline),
        *drive_args,
        *extra,
    ]


def start_guest(files: GuestFiles, mode: str, drive_args: Sequence[str],
                serial_log: str | os.PathLike, **kwargs) -> subprocess.Popen:
    """Start QEMU with the console going to serial_log (created empty now).

    kwargs go to :func:`qemu_args`.  QEMU's own stdout/stderr go to
    ``serial_log + ".qemu"``.
    """
    serial_log = Path(serial_log)
    serial_log.write_bytes(b"")
    args = qemu_args(files, mode, drive_args, serial=serial_log, **kwargs)
    with open(f"{serial_log}.qemu", "wb") as qlog:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=qlog,
                                stderr=subprocess.STDOUT)


def start_work(files: GuestFiles, drive_args: Sequence[str],
               serial_log: str | os.PathLike, *, every: int = 1, keep: int = 0,
               extra: Sequence[str] = ()) -> subprocess.Popen:
    """Start a work guest; follow it with ``SerialLog(serial_log)``."""
    return start_guest(files, "work", drive_args, serial_log, every=every, keep=keep,
                       extra=extra)


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
    """Send sig (default SIGKILL: the primary dies mid-epoch) and reap QEMU."""
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout)


_FATAL = re.compile(r"MC-(ERROR|WORK-FAIL)\b.*")
_SEQ = re.compile(r"MC-SEQ (\d+)")


class SerialLog:
    """Follows the console log file of a running guest, line by line.

    Polling the file is the synchronisation: ``wait_for`` returns as soon as a
    marker is there, raises :class:`GuestError` when the guest reported a fatal
    error, when QEMU (``proc``) exited first, or after ``timeout`` seconds.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._offset = 0
        self._partial = b""
        self.lines: list[str] = []
        self.last_seq = 0  # highest MC-SEQ seen so far
        self.fatal: str | None = None  # the first MC-ERROR / MC-WORK-FAIL line

    def poll(self) -> list[str]:
        """Read what was appended since the last call; return the new whole lines."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        *whole, self._partial = data.split(b"\n")
        new = [line.decode("utf-8", "replace").rstrip("\r") for line in whole]
        for line in new:
            m = _SEQ.search(line)
            if m:
                self.last_seq = max(self.last_seq, int(m.group(1)))
            elif self.fatal is None and (fatal := _FATAL.search(line)):
                self.fatal = fatal.group(0)
        self.lines.extend(new)
        return new

    def text(self) -> str:
        self.poll()
        return "\n".join(self.lines + ([self._partial.decode("utf-8", "replace")]
                                       if self._partial else []))

    def tail(self, n: int = 30) -> str:
        self.poll()
        return "\n".join(self.lines[-n:])

    def wait_for(self, pattern: str | re.Pattern, timeout: float = 120.0,
                 proc: subprocess.Popen | None = None) -> re.Match:
        """Wait for a line matching pattern (re.search), from the start of the log."""
        rx = re.compile(pattern)
        found: list[re.Match] = []
        scanned = 0

        def seen() -> bool:
            nonlocal scanned
            for line in self.lines[scanned:]:
                m = rx.search(line)
                if m:
                    found.append(m)
                    return True
            scanned = len(self.lines)
            return False

        self._wait(seen, repr(rx.pattern), timeout, proc)
        return found[0]

    def wait_seq(self, n: int, timeout: float = 120.0,
                 proc: subprocess.Popen | None = None) -> int:
        """Wait until the guest reported record n (or later) durable; return the seq."""
        self._wait(lambda: self.last_seq >= n, f"MC-SEQ {n}", timeout, proc)
        return self.last_seq

    def _wait(self, done, what: str, timeout: float, proc: subprocess.Popen | None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            exited = proc is not None and proc.poll() is not None
            self.poll()  # after proc.poll(): a guest that exited has written everything
            if done():
                return
            if self.fatal:
                raise GuestError(f"guest reported {self.fatal!r} before {what}\n{self.tail()}")
            if exited:
                raise GuestError(f"QEMU exited ({proc.returncode}) before {what} "
                                 f"(last MC-SEQ {self.last_seq})\n{self.tail()}"
                                 f"{self._qemu_output()}")
            if time.monotonic() > deadline:
                raise GuestError(f"no {what} within {timeout} s (last MC-SEQ "
                                 f"{self.last_seq})\n{self.tail()}")
            time.sleep(_POLL)

    def _qemu_output(self) -> str:
        q = Path(f"{self.path}.qemu")
        if q.is_file() and q.stat().st_size:
            return "\nQEMU: " + q.read_text(errors="replace")[-2000:]
        return ""


_CHECK = re.compile(
    r"MC-CHECK fsck=(?P<fsck>-?\d+) recovered=(?P<recovered>[01]) records=(?P<records>\d+) "
    r"minseq=(?P<minseq>\d+) maxseq=(?P<maxseq>\d+) bad=(?P<bad>\d+) gaps=(?P<gaps>-?\d+) "
    r"inflight=(?P<inflight>[01])")


def parse_check(text: str, seconds: float = 0.0) -> CheckResult:
    """Parse a check guest's console log.  Raises GuestError when it has no verdict."""
    lines = text.splitlines()
    verdict = None
    reason = None
    fields: dict[str, int] = {}
    bad_records = []
    fsck_output = []
    for line in lines:
        if "MC-CHECK-OK" in line:
            verdict = True
        elif (i := line.find("MC-CHECK-FAIL")) >= 0:
            verdict, reason = False, line[i + len("MC-CHECK-FAIL"):].strip()
        elif m := _CHECK.search(line):
            fields = {k: int(v) for k, v in m.groupdict().items()}
        elif (i := line.find("MC-BAD ")) >= 0:
            bad_records.append(line[i + 7:].strip())
        elif (i := line.find("MC-FSCK ")) >= 0:
            fsck_output.append(line[i + 8:])
    if verdict is None:
        fatal = _FATAL.search(text)
        why = f"guest reported {fatal.group(0)!r}" if fatal else "no MC-CHECK verdict"
        raise GuestError(f"{why}\n" + "\n".join(lines[-30:]))
    f = fields.get
    return CheckResult(
        ok=verdict, reason=reason, fsck=f("fsck"),
        recovered=None if f("recovered") is None else bool(f("recovered")),
        records=f("records"), minseq=f("minseq"), maxseq=f("maxseq"), bad=f("bad"),
        gaps=f("gaps"), inflight=None if f("inflight") is None else bool(f("inflight")),
        bad_records=bad_records, fsck_output=fsck_output, seconds=seconds, log=text)


def run_check(files: GuestFiles, image_path: str | os.PathLike, fmt: str = "raw",
              timeout: float = 180.0, *, snapshot: bool = False,
              serial_log: str | os.PathLike | None = None,
              extra: Sequence[str] = ()) -> CheckResult:
    """Boot a fresh check guest on an image (raw or qcow2) and return its verdict.

    The check replays the journal and so writes to the image, as a real boot would;
    snapshot=True keeps the image unchanged.  Raises GuestError if the guest gives
    no verdict (crash, MC-ERROR) or runs longer than timeout seconds.
    """
    with tempfile.TemporaryDirectory(prefix="nbd-mc-check-") as tmp:
        log = Path(serial_log) if serial_log is not None else Path(tmp) / "console.log"
        t0 = time.monotonic()
        proc = start_guest(files, "check", disk_drive_args(image_path, fmt, snapshot=snapshot),
                           log, extra=extra)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
            raise GuestError(f"check guest still running after {timeout} s\n"
                             + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        seconds = time.monotonic() - t0
        text = log.read_text(errors="replace")
        if proc.returncode != 0:
            qemu_out = Path(f"{log}.qemu").read_text(errors="replace")
            raise GuestError(f"QEMU exited {proc.returncode}: {qemu_out[-2000:]}\n{text[-3000:]}")
        return parse_check(text, seconds)
