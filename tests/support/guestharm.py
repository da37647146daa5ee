"""The guest-harm soak: a fault-tolerance layer must never add a failure mode to
the VM it protects.

A protected real Linux guest (demo/guest.py: fsync'd, checksummed records on
ext4) is driven through a fault loop while protect checkpoints it every 100 ms
into `nbd-mc serve` **over TCP**.  Built on the chaos soak (chaos.py: its boot,
protect, restart and fault plumbing); what differs is what is measured and
which faults:

``secondary_stop``
    SIGSTOP of the secondary's nbdkit for 1-20 s (longer than protect's default
    ``--stall-timeout``), then SIGCONT;
``secondary_kill``
    kill -9 of the secondary's nbdkit, then `nbd-mc serve` again;
``control_drop``
    `nbd-mc stop` + `nbd-mc serve` (protect's control connection drops; a control
    client also sends half a request and vanishes);
``protect_kill``
    kill -9 of `nbd-mc protect` at a random instant (its watchdog takes the
    mirrors away and resumes a VM left paused), then a new protect;
``full_fs``
    ENOSPC: the secondary's undo file system is filled until the secondary refuses
    a write and protect has claimed it again (so its resync rounds meet ENOSPC too);
``secondary_eio``
    EIO: the replica is served through a FUSE file whose writes fail (nbdkit's
    error filter, support/faulty.py) until the secondary refused a write and
    protect has claimed it again (resync rounds meet EIO), for 0-3 s more.

Every class is hit once per shuffled round; after each fault the driver waits
until protection is back in step (a newer commit) and the guest wrote again.

What is counted (``HarmResult``): QEMU deaths (any ends the run: a dead VM is the
worst harm), guest I/O errors (``MC-WORK-FAIL`` and kernel I/O error lines on the
guest's console), protect exits nobody asked for (restarted, counted), and every
VM pause: a second QMP monitor on the primary's QEMU records ``STOP`` and
``RESUME`` with QEMU's own timestamps (``STOP`` is sent when the vCPUs stop,
before ``stop`` drains the guest's I/O), so a pause is what the guest felt.

The run ends with a failover whose disk must equal the primary's at the committed
epoch: the driver pauses the VM itself (its own monitor; protect then commits the
paused VM and leaves it paused), waits for that commit, kills QEMU with SIGKILL,
runs `nbd-mc failover`, `qemu-img compare`s the rolled-back replica with the
primary's disk, and boots a check guest on it (fsck, every record).  No
checkpoint hook: its copy of the disk would be a pause of the hook's making.

Which QEMU: ``qemu-system-x86_64`` from PATH (tests/support/qemu_version.py's
NBD_MC_QEMU puts the chosen one first); the result names its version.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nbd_mc.control import ControlClient
from nbd_mc.primary.qmp import Qmp
from nbd_mc.statedir import StateDir

from demo import guest
from demo import story as demo
from demo.story import DemoFailed, _bin
from support import chaos
from support.faulty import FaultyFile

FAULTS = ("secondary_stop", "secondary_kill", "control_drop", "protect_kill", "full_fs",
          "secondary_eio")
HANG = (1.0, 20.0)  # seconds a secondary stays SIGSTOPped
EIO_MORE = (0.0, 3.0)  # seconds the EIO goes on after protect claimed again
KEEP = 400  # records the guest keeps (older ones are deleted: the disk does not fill)
DISK_SIZE = 128 << 20
#: Pauses longer than this are listed with their time in the report.
LONG_PAUSE = 0.5
#: What on the guest's console is an I/O error the guest saw.
GUEST_IO_ERROR = re.compile(r"MC-WORK-FAIL|I/O error|EXT4-fs error|EXT4-fs warning|"
                            r"Remounting filesystem read-only|Aborting journal")


def qemu_version() -> str:
    r = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    m = re.search(r"version (\S+)", r.stdout)
    return m.group(1) if m else "?"


@dataclass
class Pause:
    start: float  # QEMU's timestamp of STOP (seconds since the epoch)
    seconds: float
    reason: str  # what STOP's neighbours said: "" or the io-error
    during: str = ""  # the block job events QEMU sent during the pause (what it was)


class PauseMeter:
    """VM pauses as QEMU reports them on a monitor of our own.

    A thread drains the session's events (its log keeps only the last few
    thousand) every POLL s.  State (``_lock``): ``pauses`` (finished), ``_stop_at``
    (the open pause's STOP timestamp, or None), ``io_errors`` (BLOCK_IO_ERROR
    events), ``final`` (set once the driver paused the VM itself: later pauses are
    not protect's)."""

    POLL = 0.2

    def __init__(self, path: str):
        self.qmp = Qmp(path, timeout=30)
        self.pauses: list[Pause] = []
        self.io_errors: list[dict] = []
        self.final = False
        self._stop_at: float | None = None
        self._reason = ""
        self._during: list[str] = []
        self._cursor = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pause-meter", daemon=True)
        self._thread.start()

    @staticmethod
    def _ts(e: dict) -> float:
        t = e.get("timestamp") or {}
        return t.get("seconds", 0) + t.get("microseconds", 0) / 1e6

    def _run(self) -> None:
        while not self._done.wait(self.POLL):
            self.drain()

    def drain(self) -> None:
        with self._lock:
            for seq, e in self.qmp.events_after(self._cursor):
                self._cursor = seq
                name = e.get("event")
                if name == "BLOCK_IO_ERROR":
                    self.io_errors.append(e.get("data") or {})
                    self._reason = f"io-error {(e.get('data') or {}).get('reason', '')}"
                elif name == "STOP" and self._stop_at is None:
                    self._stop_at = self._ts(e)
                    self._during = []
                elif name == "RESUME" and self._stop_at is not None:
                    if not self.final:
                        self.pauses.append(Pause(self._stop_at, self._ts(e) - self._stop_at,
                                                 self._reason, " ".join(self._during[:12])))
                    self._stop_at = None
                    self._reason = ""
                elif self._stop_at is not None and name.startswith(("BLOCK_JOB", "JOB_")):
                    d = e.get("data") or {}
                    what = d.get("status") or name[len("BLOCK_JOB_"):].lower()
                    self._during.append(f"{d.get('id') or d.get('device')}:{what}"
                                        f"@{self._ts(e) - self._stop_at:.2f}")

    def open_pause(self) -> float:
        """Seconds the VM has been paused now (0 if it runs)."""
        with self._lock:
            return 0.0 if self._stop_at is None else time.time() - self._stop_at

    def longest(self) -> Pause | None:
        with self._lock:
            return max(self.pauses, key=lambda p: p.seconds, default=None)

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self.drain()
        self.qmp.close()


@dataclass
class HarmResult:
    demo: demo.DemoResult
    qemu: str = ""  # QEMU's version
    counts: dict = field(default_factory=lambda: {f: 0 for f in FAULTS})
    cycles: int = 0
    seconds: float = 0.0
    qemu_deaths: int = 0
    guest_io_errors: list = field(default_factory=list)  # console lines
    block_io_errors: int = 0  # BLOCK_IO_ERROR events (werror/rerror actions)
    protect_exits: list = field(default_factory=list)  # (exit status, last lines)
    pauses: int = 0
    longest_pause: float = 0.0
    longest_pause_reason: str = ""
    pauses_over_1s: int = 0
    long_pauses: list = field(default_factory=list)  # Pause, those over LONG_PAUSE
    back_in_step: list = field(default_factory=list)  # seconds per fault to a commit
    hang_seconds: list = field(default_factory=list)  # each SIGSTOP's length
    identical: bool = False

    def report(self) -> str:
        steps = sorted(self.back_in_step)
        med = steps[len(steps) // 2] if steps else 0.0
        lines = [f"QEMU {self.qemu}: {self.cycles} fault cycles in {self.seconds:.0f} s ("
                 + ", ".join(f"{k}={v}" for k, v in self.counts.items()) + ")",
                 f"QEMU deaths {self.qemu_deaths}; guest I/O errors "
                 f"{len(self.guest_io_errors)}; BLOCK_IO_ERROR events {self.block_io_errors}; "
                 f"protect exits {len(self.protect_exits)}",
                 f"VM pauses {self.pauses}: longest {self.longest_pause * 1000:.0f} ms"
                 + (f" ({self.longest_pause_reason})" if self.longest_pause_reason else "")
                 + f", over 1 s: {self.pauses_over_1s}",
                 f"back in step after a fault: median {med:.1f} s, longest "
                 f"{steps[-1] if steps else 0:.1f} s; SIGSTOPs of "
                 f"{min(self.hang_seconds, default=0):.1f}-{max(self.hang_seconds, default=0):.1f} s",
                 f"final failover: epoch {self.demo.last_commit}, qemu-img compare with the "
                 f"primary's disk: {'identical' if self.identical else 'DIFFERENT'}; check guest: "
                 f"{'OK' if self.demo.check and self.demo.check.ok else 'FAIL'}, records "
                 f"{self.demo.check.minseq if self.demo.check else None}.."
                 f"{self.demo.check.maxseq if self.demo.check else None}"]
        lines += [f"  pause of {p.seconds * 1000:.0f} ms at {_clock(p.start)}"
                  + (f" ({p.reason})" if p.reason else "") + f": {p.during or 'no job event'}"
                  for p in sorted(self.long_pauses, key=lambda p: -p.seconds)[:20]]
        lines += [f"  guest: {line}" for line in self.guest_io_errors[:10]]
        lines += [f"  protect exited {rc}: {tail}" for rc, tail in self.protect_exits[:5]]
        return "\n".join(lines)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GuestHarmStory(chaos.ChaosStory):
    """The chaos story with the guest-harm faults, over TCP, measured.

    State beyond ChaosStory's (the driver's thread): ``cycles`` (faults to inject),
    ``port`` (the secondary's NBD port), ``eio`` (the FUSE file that serves the
    replica, support/faulty.FaultyFile), ``meter`` (PauseMeter), ``protect_exits``,
    ``back_in_step``, ``hang_seconds``, ``qemu_died``."""

    def __init__(self, workdir: Path, cycles: int, seed: str, say=print):
        super().__init__(workdir, 0.0, seed, say, rounds=None)
        self.cycles = cycles
        self.hold_full = True  # resync rounds meet the full file system too
        self.disk_size = DISK_SIZE
        self.port = _free_port()
        self.eio: FaultyFile | None = None
        self.meter: PauseMeter | None = None
        self.monitor = self.dir / "monitor.qmp"
        self.protect_exits: list = []
        self.back_in_step: list[float] = []
        self.hang_seconds: list[float] = []
        self.qemu_died = False
        self.counts = {f: 0 for f in FAULTS}

    # --- setting up ----------------------------------------------------------
    def make_disks(self) -> None:
        super().make_disks()
        self.eio = FaultyFile(str(self.dir / "eio"), "replica.raw", str(self.secondary_img),
                              "pwrite")
        self.detail(f"the replica is served through {self.eio.path} (FUSE, nbdkit's error "
                    "filter): its writes fail with EIO on demand")

    def _serve(self) -> None:
        self.sh([_bin("nbd-mc"), "serve", f"vda={self.eio.path}", "--state-dir", str(self.state),
                 "--port", str(self.port), "--bind", "127.0.0.1"], show=False)

    def start_secondary(self) -> None:
        self.step("Start the secondary: nbd-mc serve, NBD over TCP",
                  f"127.0.0.1:{self.port}; control on {StateDir(self.state.name).control}")
        self._serve()

    def boot_primary(self, files: guest.GuestFiles) -> None:
        self.step(f"Boot the primary guest (QEMU {qemu_version()})",
                  "a second QMP monitor records every VM pause (STOP/RESUME)")
        self._boot("work")
        self.meter = PauseMeter(str(self.monitor))

    def _boot(self, mode: str) -> None:
        drive = ["-drive", f"if=none,id=drive0,file={self.primary_img},format=raw,"
                           "cache=writeback", "-device", "virtio-blk-pci,drive=drive0"]
        extra = ["-qmp", f"unix:{self.qmp},server=on,wait=off",
                 "-qmp", f"unix:{self.monitor},server=on,wait=off"]
        self.qemu = guest.start_guest(self.files, mode, drive, self.serial, keep=KEEP,
                                      extra=extra)
        self.serial_log = guest.SerialLog(self.serial)
        self._wait(lambda: self.qmp.exists() and self.monitor.exists(), "QEMU's QMP sockets",
                   self.qemu)

    def start_protect(self) -> None:
        self.step("Protect it over TCP: nbd-mc protect, a checkpoint every 100 ms, no hook")
        self.protect_out = []
        self._argv = [_bin("nbd-mc"), "protect", "--qmp", str(self.qmp), "--drive",
                      "drive0=vda", "--target", f"nbd://127.0.0.1:{self.port}",
                      "--control", StateDir(self.state).control,
                      "--interval", demo.INTERVAL, "--json",
                      "--events", str(self.dir / "protect-events.jsonl")]
        self._start_protect_again()

    def _collect_protect(self) -> None:
        """Keep protect's lines; its outage and resync lines also go to the log, with
        the wall clock (to match them with the pauses the report lists)."""
        proc, out = self.protect, self.protect_out
        in_json = False
        with open(self.dir / "protect.log", "a", buffering=1) as log:
            log.write(f"--- [{_clock(time.time())}] protect {proc.pid} starts\n")
            for line in proc.stdout:
                out.append(line)
                log.write(f"[{_clock(time.time())}] {line}")
                in_json = in_json or line.startswith("{")
                if not in_json:
                    self.say(f"   [{_clock(time.time())}] {line.rstrip()}")

    def _wait(self, cond, what: str, proc=None, timeout: float = demo.DEADLINE) -> None:
        """The story's wait; a timeout also says what protect said last and what
        the secondary reports, so that a red soak can be read without a rerun."""
        try:
            super()._wait(cond, what, proc, timeout)
        except DemoFailed as e:
            try:
                status = self._status()
            except Exception as s:  # the secondary may be what is wrong
                status = f"(no status: {s})"
            tail = "".join(self.protect_out[-40:])
            try:
                with open(self.dir / "protect-events.jsonl") as f:
                    events = "".join(f.readlines()[-15:])
            except OSError:
                events = ""
            raise DemoFailed(f"{e}\nsecondary: {status}\nprotect's last lines "
                             f"(all in {self.dir / 'protect.log'}):\n{tail}\n"
                             f"protect's last events (protect-events.jsonl):\n{events}") from None

    # --- the fault loop --------------------------------------------------------
    def let_it_work(self) -> None:
        self.step(f"Guest harm: {self.cycles} fault cycles", f"seed {self.seed!r}")
        self.serial_log.wait_for(r"MC-WORK-START", demo.DEADLINE, self.qemu)
        self._wait(lambda: self._committed() >= 1, "the first commit (initial sync done)",
                   self.qemu)
        start = time.monotonic()
        done = 0
        while done < self.cycles:
            order = list(FAULTS)
            self.rng.shuffle(order)
            for fault in order[:self.cycles - done]:
                t0 = time.monotonic()
                getattr(self, fault)()
                self.counts[fault] += 1
                done += 1
                # back in step: a commit after the fault ended (one before its end may
                # be the killed protect's, or the one a restarted secondary holds)
                before = self._committed()
                self._wait(lambda: self._committed() > before,
                           f"protection back in step after {fault}", self.qemu)
                self.back_in_step.append(time.monotonic() - t0)
                self._sample()
                seq = self.samples[-1][0]
                self._wait(lambda: self._guest_wrote(seq), f"a guest record after {fault}",
                           self.qemu)
                longest = self.meter.longest()
                self.detail(f"{done:4d} t={time.monotonic() - start:6.1f}s {fault:<15} in step "
                            f"after {self.back_in_step[-1]:4.1f} s: epoch {self.samples[-1][1]}, "
                            f"record {seq}; longest pause so far "
                            f"{(longest.seconds if longest else 0) * 1000:.0f} ms")
        self.chaos_seconds = time.monotonic() - start

    def secondary_stop(self) -> None:
        pid = self._nbdkit_pid()
        hold = self.rng.uniform(*HANG)
        self.hang_seconds.append(hold)
        os.kill(pid, signal.SIGSTOP)
        try:
            # the fault's length, chosen by the RNG; the guest must write meanwhile
            deadline = time.monotonic() + hold
            while time.monotonic() < deadline:
                self._alive()
                time.sleep(min(demo.POLL * 10, max(0.0, deadline - time.monotonic())))
        finally:
            os.kill(pid, signal.SIGCONT)

    def protect_kill(self) -> None:
        # a random instant: often inside a checkpoint's pause, sometimes in a resync
        time.sleep(self.rng.uniform(0, 0.3))  # the fault's instant, chosen by the RNG
        super().protect_kill()

    def secondary_eio(self) -> None:
        """The replica's writes fail with EIO until the secondary refused a write and
        protect claimed it again (a resync attempt meets EIO), and a while more."""
        c = self._committed()
        self._wait(lambda: self._committed() > c, "a commit before the EIO", self.qemu)
        st = self._status()
        errors, generation = st["stats"]["errors"], st["generation"]
        self.eio.fail(True)
        try:
            self._wait(lambda: self._status()["stats"]["errors"] > errors,
                       "the secondary to fail a write with EIO", self.qemu)
            self._wait(lambda: self._status()["generation"] > generation,
                       "protect to lose the secondary and claim it again", self.qemu)
            more = self.rng.uniform(*EIO_MORE)
            deadline = time.monotonic() + more
            while time.monotonic() < deadline:  # the fault's length, chosen by the RNG
                self._alive()
                time.sleep(demo.POLL)
        finally:
            self.eio.fail(False)

    # --- what must never happen ---------------------------------------------
    def _alive(self) -> None:
        if self.qemu is not None and self.qemu.poll() is not None:
            self.qemu_died = True
        if self.protect is not None and self.protect.poll() is not None:
            # protect gave up by itself: counted, and a new one takes over
            rc = self.protect.returncode
            self.protect_exits.append((rc, "".join(self.protect_out[-5:]).strip()))
            self.say(f"   protect exited by itself ({rc}): {''.join(self.protect_out[-5:])}")
            self._start_protect_again()
        super()._alive()

    # --- the end: a failover at an exactly known disk ---------------------------
    def restart_secondary(self) -> None:
        """The driver pauses the VM itself, protect commits the paused VM: the primary's
        disk is then exactly that commit's."""
        self.step("Pause the VM (our own monitor) and wait for protect to commit it")
        self.meter.drain()
        self.meter.final = True
        while True:
            # (a checkpoint in flight may cont what we stopped: then stop again)
            c = self._committed()
            self.meter.qmp.cmd("stop")
            self._wait(lambda: self._committed() > c + 1, "a commit of the paused VM",
                       self.qemu)
            if self.meter.qmp.cmd("query-status")["status"] == "paused":
                break
        self.serial_log.poll()
        self.result.kill_epoch = -1  # not killed mid-epoch: the disk is the commit's
        self.detail(f"paused at epoch {self._committed()}; guest records durable: "
                    f"{self.serial_log.last_seq}")

    def compare(self) -> None:
        n = self.result.last_commit
        self.step(f"The failed-over disk equals the primary's at epoch {n}")
        r = self.sh(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(self.primary_img),
                     str(self.secondary_img)], check=False)
        self.result.identical = r.returncode == 0
        if not self.result.identical:
            raise DemoFailed("the failed-over disk differs from the primary's")

    def kill_primary(self) -> None:
        """kill -9 of the (paused) QEMU; protect must report the primary gone."""
        self.step("kill -9 the primary's QEMU")
        if self.meter is not None:
            self.meter.close()
        guest.kill(self.qemu)
        self.serial_log.poll()
        self.result.last_seq_primary = self.serial_log.last_seq
        rc, text, _ = self.protect_report()
        p = self.result.protect
        self.detail(f"nbd-mc protect (exit {rc}): {p['commits']} checkpoints committed, "
                    f"epochs {p['first_epoch']}..{p['committed']}; {p.get('outages')} "
                    f"outage(s), {len(p.get('resyncs') or [])} resync(s)")
        if rc != 1 or not p.get("primary_gone"):
            raise DemoFailed(f"nbd-mc protect should report the lost primary (exit 1):\n{text}")

    def conclude(self) -> None:
        r = self.result
        self.detail(f"failover at epoch {r.last_commit}: identical to the primary's disk; the "
                    f"check guest found records {r.check.minseq}..{r.check.maxseq} intact")

    def cleanup(self) -> None:
        try:
            if self.meter is not None:
                self.meter.close()
        except Exception:
            pass
        try:
            super().cleanup()
        finally:
            if self.eio is not None:
                self.eio.stop()


def run(workdir: str | os.PathLike, cycles: int, seed: str = "harm", say=print) -> HarmResult:
    """The guest-harm soak in ``workdir`` (short path, for sockets).  Kills what it
    started and unmounts what it mounted, also when it fails."""
    story = GuestHarmStory(Path(workdir), cycles, seed, say)
    out = HarmResult(demo=demo.DemoResult(), qemu=qemu_version())
    try:
        try:
            out.demo = story.run()
        finally:
            out.qemu_deaths = int(story.qemu_died or (story.qemu is not None and
                                                      story.qemu.poll() is not None
                                                      and story.qemu.returncode != -9))
            if hasattr(story, "serial_log"):
                out.guest_io_errors = [ln for ln in story.serial_log.text().splitlines()
                                       if GUEST_IO_ERROR.search(ln)]
            m = story.meter
            if m is not None:
                out.pauses = len(m.pauses)
                longest = m.longest()
                if longest:
                    out.longest_pause, out.longest_pause_reason = longest.seconds, longest.reason
                out.pauses_over_1s = sum(p.seconds > 1.0 for p in m.pauses)
                out.long_pauses = [p for p in m.pauses if p.seconds > LONG_PAUSE]
                out.block_io_errors = len(m.io_errors)
            out.counts = story.counts
            out.cycles = sum(story.counts.values())
            out.seconds = story.chaos_seconds
            out.protect_exits = story.protect_exits
            out.back_in_step = story.back_in_step
            out.hang_seconds = story.hang_seconds
            out.identical = story.result.identical
    finally:
        story.cleanup()
    return out
