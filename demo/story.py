"""`make demo`: the whole story with a real Linux guest, in well under two minutes.

A tiny Linux guest (demo/guest.py) runs on a raw ext4 disk as the primary and
writes checksummed records, fsync'ing each.  `nbd-mc serve` is the secondary,
`nbd-mc protect` mirrors the disk into it and commits a checkpoint every 100 ms.
Then the primary's QEMU is killed with SIGKILL in the middle of an epoch, and:

  * `nbd-mc failover` returns the secondary's disk to the last checkpoint;
  * `qemu-img compare` proves it is byte for byte the primary's disk at that
    checkpoint (the checkpoint hook copied the primary's disk while the VM was
    stopped -- the VM is paused and the mirror drained then, and QEMU's raw
    file writes are in the host page cache that `cp` reads);
  * a fresh guest boots on it, replays its ext4 journal, runs e2fsck and checks
    every record: the disk is what the primary would have had, had it crashed
    at the checkpoint -- not older, not newer.

Run: ``python -m demo [--keep] [--workdir DIR] [--seconds N]``.
Exit status 0 when every proof holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nbd_mc.control import ControlClient
from nbd_mc.statedir import StateDir

from demo import guest

DISK_SIZE = 64 * 1024 * 1024
INTERVAL = "100ms"
POLL = 0.02  # looking at a log file or a status for a condition, with a deadline
DEADLINE = 120.0


class DemoFailed(Exception):
    """A step did not give the expected result (the message says which)."""


@dataclass
class DemoResult:
    last_commit: int = 0
    identical: bool = False
    check: guest.CheckResult | None = None
    last_seq_primary: int = 0  # highest MC-SEQ the primary printed before it died
    restart_epoch: int = 0  # the last commit before the secondary was killed and restarted
    kill_epoch: int = 0  # the last commit seen just before the kill
    seq_after_commit: int = 0  # a record written entirely after kill_epoch's checkpoint
    protect: dict = field(default_factory=dict)  # protect's --json report
    failover: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.identical and self.check and self.check.ok and self.check.fsck == 0
                    and self.check.records)


def _bin(name: str) -> str:
    """A tool next to this interpreter (the venv's nbd-mc), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:/usr/bin:/usr/sbin:/bin:" + env.get("PATH", "")
    env.pop("NBD_MC_CONTROL", None)
    return env


class Story:
    """The demo's steps; ``say`` prints for a newcomer, ``run`` does the work."""

    def __init__(self, workdir: Path, seconds: float, say=print):
        self.dir = Path(workdir).resolve()
        self.seconds = seconds
        self.say = say
        self.primary_img = workdir / "primary.raw"
        self.secondary_img = workdir / "secondary.raw"
        self.state = workdir / "secondary-state"
        self.records = workdir / "checkpoints"
        self.qmp = workdir / "primary.qmp"
        self.serial = workdir / "primary-console.log"
        self.qemu: subprocess.Popen | None = None
        self.protect: subprocess.Popen | None = None
        self.protect_out: list[str] = []
        self.result = DemoResult()
        self.step_no = 0
        # where protect reaches the secondary, and more protect options (a test runs
        # the same story across an emulated slow link with --mode async)
        # (None: the secondary's own sockets in self.state, which a subclass may move)
        self.target: str | None = None
        self.control: str | None = None
        self.protect_extra: list[str] = []

    # --- printing ------------------------------------------------------------
    def step(self, title: str, why: str = "") -> None:
        self.step_no += 1
        self.say(f"\n{self.step_no}. {title}")
        if why:
            self.say(f"   ({why})")

    def detail(self, text: str) -> None:
        for line in text.rstrip("\n").splitlines():
            self.say(f"   {line}")

    def sh(self, argv: list[str], check: bool = True, show: bool = True) -> subprocess.CompletedProcess:
        """Run a command the reader could type, showing it and its output."""
        shown = " ".join(a if a and " " not in a else repr(a) for a in argv)
        if show:
            self.say(f"   $ {shown.replace(str(self.dir) + '/', '')}")
        r = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=self.dir)
        if show and (r.stdout.strip() or r.stderr.strip()):
            self.detail((r.stdout + r.stderr).strip())
        if check and r.returncode != 0:
            raise DemoFailed(f"{shown} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    # --- the story -------------------------------------------------------------
    def run(self) -> DemoResult:
        t0 = time.monotonic()
        files = self.build_guest()
        self.make_disks()
        self.start_secondary()
        self.boot_primary(files)
        self.start_protect()
        self.let_it_work()
        self.restart_secondary()
        self.kill_primary()
        self.fail_over()
        self.compare()
        self.check_on_secondary(files)
        self.result.seconds = time.monotonic() - t0
        self.conclude()
        return self.result

    def build_guest(self) -> guest.GuestFiles:
        self.step("The guest: Debian's cloud kernel and a busybox initramfs",
                  "built once by guest/build.sh from Debian packages; reused afterwards")
        files = guest.build()
        self.detail(f"kernel {files.kernel}\ninitrd {files.initrd}")
        return files

    def make_disks(self) -> None:
        self.step("Two disks of the same size",
                  "the primary's is formatted ext4; the secondary's replica starts empty")
        guest.format_disk(self.primary_img, DISK_SIZE)
        with open(self.secondary_img, "wb") as f:
            f.truncate(DISK_SIZE)
        self.detail(f"primary.raw   {DISK_SIZE >> 20} MiB, ext4\n"
                    f"secondary.raw {DISK_SIZE >> 20} MiB, empty (sparse)")

    def start_secondary(self) -> None:
        self.step("Start the secondary: nbd-mc serve",
                  "nbdkit with the nbd-mc plugin; before a cluster is overwritten it keeps "
                  "its old contents as undo data, so the last checkpoint can always be "
                  "restored")
        self.sh([_bin("nbd-mc"), "serve", f"vda={self.secondary_img}",
                 "--state-dir", str(self.state)])

    def boot_primary(self, files: guest.GuestFiles) -> None:
        self.step("Boot the primary guest (QEMU, software emulation)",
                  "it mounts /dev/vda and writes records r.<n>.<sha256> forever, fsync'ing "
                  "each file and the directory, and prints MC-SEQ n when record n is durable")
        drive = ["-drive", f"if=none,id=drive0,file={self.primary_img},format=raw,"
                           "cache=writeback", "-device", "virtio-blk-pci,drive=drive0"]
        qmp = ["-qmp", f"unix:{self.qmp},server=on,wait=off"]
        self.qemu = guest.start_work(files, drive, self.serial, extra=qmp)
        self.detail(f"qemu-system-x86_64 ... -drive if=none,id=drive0,file=primary.raw,format=raw "
                    f"-device virtio-blk-pci,drive=drive0 -qmp unix:primary.qmp,...")
        self.serial_log = guest.SerialLog(self.serial)
        self._wait(lambda: self.qmp.exists(), "QEMU's QMP socket", self.qemu)

    def start_protect(self) -> None:
        self.step("Protect it: nbd-mc protect, a checkpoint every 100 ms",
                  "QEMU mirrors the disk into the secondary (blockdev-mirror, write-blocking: "
                  "a guest write completes only when the secondary has it); every 100 ms "
                  "protect pauses the VM, checks the mirror is drained, commits an epoch on "
                  "the secondary and resumes the VM")
        self.records.mkdir()
        hook = (f"cp --sparse=always {self.primary_img} {self.records}/$NBD_MC_EPOCH.tmp && "
                f"mv {self.records}/$NBD_MC_EPOCH.tmp {self.records}/$NBD_MC_EPOCH.raw && "
                f"rm -f {self.records}/$((NBD_MC_EPOCH - 3)).raw")
        argv = [_bin("nbd-mc"), "protect", "--qmp", str(self.qmp), "--drive", "drive0=vda",
                "--target", self.target or f"nbd+unix:///?socket={self.state}/nbd.sock",
                "--control", self.control or StateDir(self.state).control, "--interval", INTERVAL,
                "--checkpoint-hook", hook, "--json", *self.protect_extra]
        self.detail("$ nbd-mc protect --qmp primary.qmp --drive drive0=vda \\\n"
                    "      --target 'nbd+unix:///?socket=secondary-state/nbd.sock' \\\n"
                    "      --control secondary-state/control.sock --interval 100ms \\\n"
                    "      --checkpoint-hook 'cp --sparse=always primary.raw "
                    "checkpoints/$NBD_MC_EPOCH.raw'")
        self.detail("(the hook records the primary's disk at every checkpoint, while the VM is\n"
                    " stopped: the evidence the secondary is compared against at the end)")
        self.protect = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=_env(),
                                        cwd=self.dir)
        threading.Thread(target=self._collect_protect, daemon=True).start()

    def _collect_protect(self) -> None:
        for line in self.protect.stdout:
            self.protect_out.append(line)

    def let_it_work(self) -> None:
        self.step(f"Let the guest work for {self.seconds:g} seconds under protection")
        self.serial_log.wait_for(r"MC-WORK-START", DEADLINE, self.qemu)
        self.detail("guest booted and writing")
        ctl = ControlClient(StateDir(self.state).control)
        try:
            self._wait(lambda: ctl.execute("query-status")["committed"] >= 1,
                       "the first commit (initial sync done)", self.qemu)
            self.detail("initial sync done, epoch 1 committed: the secondary is protected")
            start = time.monotonic()
            shown = 0
            while time.monotonic() - start < self.seconds:
                self._alive()
                if time.monotonic() - start >= shown + 2:
                    shown += 2
                    st = ctl.execute("query-status")
                    self.detail(f"t={shown:2d}s  committed epoch {st['committed']:4d}   guest "
                                f"records durable: {self.serial_log.last_seq}")
                self.serial_log.poll()
                time.sleep(POLL)  # pacing the progress display, not synchronisation
        finally:
            ctl.close()

    def restart_secondary(self) -> None:
        """The secondary dies and comes back; protection resumes by itself."""
        self.step("kill -9 the secondary's nbdkit, then start it again",
                  "protect drops the mirror (the guest keeps running on its own disk), "
                  "retries, and resyncs only what changed since the last commit")
        pid = int(Path(StateDir(self.state).pidfile).read_text().strip())
        ctl = ControlClient(StateDir(self.state).control)
        before = ctl.execute("query-status")["committed"]
        ctl.close()
        os.kill(pid, signal.SIGKILL)
        self.detail(f"nbdkit killed at epoch {before}; the guest keeps writing")
        self._wait(lambda: not Path(f"/proc/{pid}").exists(), "nbdkit to die", self.qemu)
        self.sh([_bin("nbd-mc"), "serve", f"vda={self.secondary_img}",
                 "--state-dir", str(self.state)])
        ctl = ControlClient(StateDir(self.state).control)
        try:
            self._wait(lambda: ctl.execute("query-status")["committed"] > before,
                       "protection to resume by itself", self.qemu)
            self.result.restart_epoch = before
            self.detail(f"protection resumed: epoch {ctl.execute('query-status')['committed']} "
                        "committed after an incremental resync")
            self.result.kill_epoch, self.result.seq_after_commit = self._mid_epoch(ctl)
        finally:
            ctl.close()

    def _mid_epoch(self, ctl: ControlClient) -> tuple[int, int]:
        """Wait for a moment inside an epoch that holds a whole guest record.

        Lines the guest prints after we saw commit C were printed after C's cont;
        the record after such a line was written entirely in the open epoch C+1.
        Once the guest reports that record durable while C is still the last
        commit, the kill falls in the middle of epoch C+1.
        """
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            self._alive()
            c = ctl.execute("query-status")["committed"]
            self.serial_log.poll()
            seq = self.serial_log.last_seq
            while ctl.execute("query-status")["committed"] == c:
                self._alive()
                self.serial_log.poll()
                if self.serial_log.last_seq >= seq + 2:
                    return c, seq + 2
                time.sleep(POLL / 4)  # polling the console log, bounded by the epoch
        raise DemoFailed("found no epoch long enough to hold a whole guest record")

    def kill_primary(self) -> None:
        self.step("kill -9 the primary's QEMU in the middle of an epoch",
                  "the guest is busy writing; whatever it wrote since the last checkpoint "
                  "is on the secondary too, but belongs to no committed epoch")
        guest.kill(self.qemu)
        self.serial_log.poll()
        self.result.last_seq_primary = self.serial_log.last_seq
        self.detail(f"QEMU killed; the guest had reported records up to #{self.serial_log.last_seq} "
                    f"as durable, #{self.result.seq_after_commit} and later ones written entirely "
                    f"after checkpoint {self.result.kill_epoch}")
        rc, text, rest = self.protect_report()
        p = self.result.protect
        self.detail(f"nbd-mc protect (exit {rc}): {p['commits']} checkpoints committed, "
                    f"epochs {p['first_epoch']}..{p['committed']}")
        self.detail(f"VM pause per checkpoint: median {p['pause_ms']['median']:.1f} ms, worst "
                    f"{p['pause_ms']['worst']:.1f} ms; of that the hook's copy of the disk: "
                    f"median {p['pause_ms']['hook_median']:.1f} ms")
        self.detail(rest.strip().replace("nbd-mc: error: ", ""))
        if rc != 1 or not p.get("primary_gone"):
            raise DemoFailed(f"nbd-mc protect should report the lost primary (exit 1):\n{text}")

    def protect_report(self) -> tuple[int, str, str]:
        """Once the primary was killed: protect's exit status, its whole output and
        the output around its --json report, which goes to ``result.protect``."""
        try:
            rc = self.protect.wait(30)
        except subprocess.TimeoutExpired:
            raise DemoFailed("nbd-mc protect did not notice that the primary died") from None
        text = "".join(self.protect_out)
        try:
            start = text.index("{")
            self.result.protect, end = json.JSONDecoder().raw_decode(text, start)
        except ValueError:
            raise DemoFailed(f"unexpected output of nbd-mc protect:\n{text}") from None
        return rc, text, text[:start] + text[end:]

    def fail_over(self) -> None:
        self.step("Fail over to the secondary: nbd-mc failover",
                  "fence the old primary, roll the disk back to the last commit, promote")
        r = self.sh([_bin("nbd-mc"), "failover", "--state-dir", str(self.state)])
        js = self.sh([_bin("nbd-mc"), "status", "--state-dir", str(self.state), "--json"],
                     show=False)
        st = json.loads(js.stdout)
        self.result.last_commit = st["committed"]
        self.result.failover = {"text": r.stdout, "committed": st["committed"]}
        if st["committed"] != self.result.protect.get("committed"):
            raise DemoFailed(f"the secondary says epoch {st['committed']} is committed, protect "
                             f"said {self.result.protect.get('committed')}")

    def compare(self) -> None:
        n = self.result.last_commit
        self.step(f"Proof 1: the secondary's disk equals the primary's at checkpoint {n}",
                  f"checkpoints/{n}.raw was copied from primary.raw while the VM was stopped "
                  f"for checkpoint {n}")
        record = self.records / f"{n}.raw"
        if not record.exists():
            raise DemoFailed(f"no record of checkpoint {n}")
        r = self.sh(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(record),
                     str(self.secondary_img)], check=False)
        self.result.identical = r.returncode == 0
        if not self.result.identical:
            raise DemoFailed("the secondary's disk differs from the primary's at the checkpoint")
        newer = sorted(int(p.stem) for p in self.records.glob("*.raw") if int(p.stem) > n)
        if newer:
            self.detail(f"(checkpoint {newer[0]} was recorded but never committed: the kill came "
                        "first, so the secondary rightly does not show it)")

    def check_on_secondary(self, files: guest.GuestFiles) -> None:
        self.step("Proof 2: boot a fresh guest on the secondary's disk and let it check itself",
                  "mount (replaying the ext4 journal, as after any crash), e2fsck -fn, then "
                  "verify every record's checksum, header, length and that none is missing")
        self.sh([_bin("nbd-mc"), "stop", "--state-dir", str(self.state)])  # as failover advised
        self.detail("qemu-system-x86_64 ... -drive if=none,id=drive0,file=secondary.raw,"
                    "format=raw -device virtio-blk-pci,drive=drive0")
        res = guest.run_check(files, self.secondary_img, "raw",
                              serial_log=self.dir / "check-console.log")
        self.result.check = res
        self.detail(f"e2fsck exit {res.fsck} ({'clean' if res.fsck == 0 else 'NOT clean'}); "
                    f"journal replayed: {'yes' if res.recovered else 'no'}")
        self.detail(f"records {res.minseq}..{res.maxseq}: {res.records} present, {res.bad} bad, "
                    f"{res.gaps} missing; verdict: {'OK' if res.ok else 'FAIL ' + str(res.reason)}")
        if not self.result.ok:
            raise DemoFailed(f"the check guest did not confirm the disk: {res.reason}")
        if self.result.last_commit == self.result.kill_epoch and \
                res.maxseq >= self.result.seq_after_commit:
            raise DemoFailed(f"record #{self.result.seq_after_commit}, written after checkpoint "
                             f"{self.result.kill_epoch}, is on the disk of that checkpoint")

    def conclude(self) -> None:
        r = self.result
        p = r.protect
        lost = max(0, r.last_seq_primary - (r.check.maxseq or 0))
        self.say("\nWhat was shown")
        self.detail(f"- {p['commits']} checkpoints in {p['seconds']:.1f} s at a {INTERVAL} "
                    f"interval; VM pause median {p['pause_ms']['median']:.1f} ms, worst "
                    f"{p['pause_ms']['worst']:.1f} ms (the proof-recording hook: median "
                    f"{p['pause_ms']['hook_median']:.1f} ms of it)")
        self.detail(f"- after kill -9 of the primary, the secondary returned to checkpoint "
                    f"{r.last_commit}: qemu-img compare found it identical to the primary's "
                    f"disk at that checkpoint")
        self.detail(f"- a fresh guest found a clean file system with records 1..{r.check.maxseq} "
                    f"intact; the primary had reported #{r.last_seq_primary} durable, so "
                    f"{lost} record(s) written after the last checkpoint are gone, as they "
                    f"must be")
        self.detail(f"demo took {r.seconds:.0f} s")

    # --- plumbing -------------------------------------------------------------------
    def _alive(self) -> None:
        if self.qemu is not None and self.qemu.poll() is not None:
            raise DemoFailed(f"the primary QEMU exited ({self.qemu.returncode}):\n"
                             f"{self.serial_log.tail() if hasattr(self, 'serial_log') else ''}")
        if self.protect is not None and self.protect.poll() is not None:
            raise DemoFailed("nbd-mc protect exited early:\n" + "".join(self.protect_out))

    def _wait(self, cond, what: str, proc=None, timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            self._alive()
            if time.monotonic() > deadline:
                raise DemoFailed(f"timed out waiting for {what}")
            time.sleep(POLL)  # polling a condition with a deadline

    def cleanup(self) -> None:
        """Whatever still runs dies: QEMU, protect, the secondary's nbdkit."""
        for p in (self.qemu, self.protect):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(30)
        if Path(StateDir(self.state).control).exists():
            subprocess.run([_bin("nbd-mc"), "stop", "--state-dir", str(self.state)],
                           capture_output=True, env=_env(), timeout=60)
        pidfile = Path(StateDir(self.state).pidfile)
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return  # no pid, or that process is gone
        if f"state_dir={self.state}".encode() in cmdline:  # ours, not a reused pid
            os.kill(pid, signal.SIGKILL)


def run(workdir: str | os.PathLike, seconds: float = 8.0, say=print) -> DemoResult:
    """The whole demo in ``workdir`` (must exist and be empty; short, for sockets)."""
    story = Story(Path(workdir), seconds, say)
    try:
        return story.run()
    finally:
        story.cleanup()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", help="directory for the demo's files (default: a new one in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the files afterwards")
    ap.add_argument("--seconds", type=float, default=8.0, help="how long the guest works")
    if argv is None:  # `make demo DEMO_ARGS="--keep"` (mk/demo.mk)
        argv = sys.argv[1:] + shlex.split(os.environ.get("NBD_MC_DEMO_ARGS", ""))
    args = ap.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="nbd-mc-demo-", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    print("nbd-mc demo: a primary VM dies; its secondary disk is exactly the last checkpoint")
    print(f"(files in {workdir})")
    try:
        result = run(workdir, args.seconds)
    except (DemoFailed, guest.GuestError) as e:
        print(f"\nDEMO FAILED: {e}", file=sys.stderr)
        print(f"(files kept in {workdir})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    if args.keep or args.workdir:
        print(f"(files kept in {workdir})")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\nDEMO OK")
    return 0 if result.ok else 1

