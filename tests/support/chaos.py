"""The chaos soak: a protected real Linux guest driven through random faults.

The setting is the demo's (demo/story.py): a work guest writes fsync'd,
checksummed records on ext4, `nbd-mc protect --json` checkpoints it every 100 ms
into `nbd-mc serve`.  The secondary's state directory (its undo overlays) lives on
a small file system of its own (a tmpfs mounted for the run).  For a chosen time, a
seeded RNG then picks faults, in shuffled rounds so that every class is hit at
least once per round:

``secondary_kill``
    kill -9 of the secondary's nbdkit, then `nbd-mc serve` again;
``secondary_stop``
    SIGSTOP of the secondary's nbdkit for a while shorter than protect's
    ``--stall-timeout`` (the default, 10 s), then SIGCONT;
``protect_kill``
    kill -9 of `nbd-mc protect` (its watchdog resumes a VM left paused), then a
    new protect on the same VM;
``control_drop``
    `nbd-mc stop` + `nbd-mc serve` of the secondary (protect's control connection
    drops), plus a control client that sends half a request and vanishes;
``full_fs``
    right after a commit, a filler file takes every free block of the undo file
    system and keeps taking what the overlay gives back, until the secondary
    refuses a guest write (its ``stats.errors`` rises: a preserve needed a new
    cluster and got ENOSPC) and protect has lost it (it claims the secondary
    again: a resync attempt, which cannot succeed while the space is gone); then
    the filler is removed and protect must get back in step by itself.  The
    fault counts only when it hit: a fill that is never noticed fails the run;
``failover``
    kill -9 of the primary's QEMU in the middle of an epoch, `nbd-mc failover`,
    `qemu-img compare` with the primary's disk at that checkpoint, then the guest
    boots on the failed-over disk in ``service`` mode (its own check -- fsck and
    every record -- then work), the dead primary's disk is served by a fresh
    `nbd-mc serve` as the new secondary and a new protect syncs into it (the
    other direction: a failback at the next failover).  How much that sync sent
    (the new secondary's ``stats.bytes_written`` at its first commit, whatever
    the sync's kind) and, when that protect is the one that reports at the next
    kill, its ``--json`` ``resyncs[0]`` are kept per failover.

After each fault the driver waits, with a deadline, until protection is back in
step: a commit newer than the last one seen before the fault (after a failover:
the new secondary's first commit).  The run ends as the demo does: kill -9 of the
primary in the middle of an epoch, `nbd-mc failover`, `qemu-img compare` against
the primary's disk recorded at the last checkpoint, and a fresh check guest.

Records acknowledged and committed: whenever the driver reads the guest's
highest durable record s and then the secondary's committed epoch c, record s
was written in an epoch <= c + 1, so it is committed once epoch c + 1 is.  Per
protection segment (one primary, one secondary, ended by a failover), the
highest such s below that failover's commit must be on the failed-over disk,
and on every disk checked after it (records keep their numbers: the guest goes
on from the last record it finds).

Why a subclass of the demo's Story: the boot, protect, failover and check steps
are exactly the demo's; only the middle (the faults) differs.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nbd_mc.control import ControlClient
from nbd_mc.primary.mirrors import RESUMED_AFTER_COPY_ERROR
from nbd_mc.statedir import StateDir

from demo import guest
from demo import story as demo
from demo.story import DemoFailed, _bin
from support.faulty import Filler, Tmpfs

FAULTS = ("secondary_kill", "secondary_stop", "protect_kill", "control_drop", "full_fs",
          "failover")
STOP_HOLD = (0.2, 1.0)  # seconds a secondary stays SIGSTOPped: well below protect's
# default --stall-timeout (10 s), so the guest's writes just wait for it
MiB = 1 << 20
GUEST_MIB_PER_SECOND = 0.4  # what the guest's records fill of its ext4 per second of
# chaos, about (40-50 fsync'd records of up to 8 KiB a second): a long soak gets a
# bigger disk, or the guest's file system fills up and the guest stops
UNDO_FS_SPARE = 64 * MiB  # the undo overlays' own file system holds the undo of a
# full sync into a replica that holds data (after a failover: the disk's data) + this
FULL_FS_DEADLINE = 60.0  # a full file system must make the secondary refuse a write
# by then (it takes well under a second to a few seconds: see full_fs)


@dataclass
class FailoverCheck:
    """One failover and the guest's own check of the disk it left."""

    generation: int  # which primary died (1 = the first one)
    commit: int  # the secondary's last commit: what the disk was returned to
    kill_epoch: int  # the last commit seen just before the kill
    seq_after_commit: int  # a record written entirely after kill_epoch's checkpoint
    committed_seq: int  # highest record known to be in a committed epoch of this segment
    identical: bool  # qemu-img compare with the primary's disk at that checkpoint
    check: guest.CheckResult | None = None
    synced_bytes: int = 0  # what the new secondary was sent up to its first commit
    resync: dict | None = None  # the next protect's --json resyncs[0], when that
    # protect is the one that reports (at the next kill of the primary)
    seconds: float = 0.0  # kill to the new secondary's first commit

    @property
    def maxseq(self) -> int:
        return (self.check.maxseq or 0) if self.check and self.check.ok else 0


@dataclass
class FullFsHit:
    """One full undo file system, and the evidence that it hit."""

    errors: int  # requests the secondary failed (I/O errors) while the fs was full
    claims: int  # protect's claims meanwhile: each one a (re)sync after losing it
    seconds_to_hit: float  # fill to the first refused request
    held: float  # seconds the file system was kept full


@dataclass
class ChaosResult:
    demo: demo.DemoResult
    counts: dict = field(default_factory=lambda: {f: 0 for f in FAULTS})
    committed_seq: int = 0  # highest record known to be in a committed epoch at the end
    failovers: list = field(default_factory=list)  # FailoverCheck, mid-run ones
    full_fs: list = field(default_factory=list)  # FullFsHit, one per injection
    copy_error_resumes: int = 0  # see ChaosStory.copy_error_resumes
    seed: str = ""
    chaos_seconds: float = 0.0

    def checks(self) -> list[tuple[int, int]]:
        """(records committed in a segment, highest record on the disk checked after
        it), in order: every mid-run failover, then the final one."""
        final = self.demo.check
        have = (final.maxseq or 0) if final and final.ok else 0
        return [(f.committed_seq, f.maxseq) for f in self.failovers] + \
               [(self.committed_seq, have)]

    @property
    def lost(self) -> int:
        """Acknowledged, committed records missing from a disk checked later: the
        records of each segment must be on its failover's disk and every later one."""
        checks = self.checks()
        return max(max(0, seq - min(have for _s, have in checks[i:]))
                   for i, (seq, _h) in enumerate(checks))

    @property
    def records_checked(self) -> int:
        """Records the check guests verified, over every check."""
        final = self.demo.check
        return sum((f.check.records or 0) for f in self.failovers if f.check) + \
            ((final.records or 0) if final else 0)

    def table(self) -> str:
        rows = [f"| {'fault class':<16} | {'count':>5} |", f"|{'-' * 18}|{'-' * 6}:|"]
        rows += [f"| {f:<16} | {n:>5} |" for f, n in self.counts.items()]
        rows.append(f"| {'total':<16} | {sum(self.counts.values()):>5} |")
        return "\n".join(rows)


class ChaosStory(demo.Story):
    """The demo's story with a chaos phase instead of one secondary restart.

    State (all touched only by the driver's thread, except ``protect_out``,
    which the collector thread of the current protect appends to):
    ``rng`` the seeded RNG; ``samples`` (record seq, committed epoch) pairs read
    in that order, for the current segment (reset at a failover); ``counts``
    faults injected per class; ``generation`` the current primary (1 = the
    first; the images swap roles at each failover and ``primary_img``,
    ``secondary_img``, ``state``, ``qmp``, ``serial``, ``records`` follow it);
    ``failovers``, ``full_fs_hits`` and ``copy_error_resumes`` the evidence;
    ``undo_fs`` the mounted tmpfs (None before it is mounted and after cleanup).
    Fixed at construction: ``rounds`` (or None: until ``seconds`` passed),
    ``hold_full`` (keep the file system full until protect claims again: the soak),
    ``disk_size``, ``undo_dir``.
    """

    def __init__(self, workdir: Path, seconds: float, seed: str, say=print,
                 rounds: int | None = None):
        super().__init__(workdir, seconds, say)
        self.rounds = rounds
        # the soak holds a full undo file system until protect has claimed the
        # secondary again, so its resync rounds meet ENOSPC too (they copy from a
        # fleecing snapshot: the round ends, no guest write fails: docs/guest-harm.md); the
        # short run in `make test` gives the space back once the write was refused
        self.hold_full = rounds is None
        need = 32 * MiB + int(seconds * GUEST_MIB_PER_SECOND * MiB)  # ext4's own + records
        self.disk_size = max(demo.DISK_SIZE, -(-need // (16 * MiB)) * 16 * MiB)
        self.rng = random.Random(seed)
        self.seed = seed
        self.samples: list[tuple[int, int]] = []
        self.counts = {f: 0 for f in FAULTS}
        self.chaos_seconds = 0.0
        self.failovers: list[FailoverCheck] = []
        self.full_fs_hits: list[FullFsHit] = []
        self.copy_error_resumes = 0  # VMs protect continued after a failed resync copy
        # stopped them (counted from the protects that report: at a kill of the primary)
        self.undo_fs: Tmpfs | None = None
        self.undo_dir = self.dir / "undo"
        # the two disks: "a" starts as the primary's, "b" as the replica
        self.primary_img = self.dir / "a.raw"
        self.secondary_img = self.dir / "b.raw"
        self.generation = 1
        self._generation_paths()
        self._sync_protect: subprocess.Popen | None = None  # the protect that made
        self._sync_failover: FailoverCheck | None = None  # ... this failover's sync

    def _generation_paths(self) -> None:
        g = self.generation
        self.state = self.undo_dir / f"state-{g}"
        self.qmp = self.dir / f"primary-{g}.qmp"
        self.serial = self.dir / f"primary-{g}-console.log"
        self.records = self.dir / f"checkpoints-{g}"

    # --- the story ------------------------------------------------------------
    def build_guest(self) -> guest.GuestFiles:
        self.files = super().build_guest()
        return self.files

    def make_disks(self) -> None:
        self.step("Two disks of the same size",
                  "the primary's is formatted ext4; the secondary's replica starts empty")
        guest.format_disk(self.primary_img, self.disk_size)
        with open(self.secondary_img, "wb") as f:
            f.truncate(self.disk_size)
        self.detail(f"{self.primary_img.name} {self.disk_size // MiB} MiB, ext4; "
                    f"{self.secondary_img.name} the same size, empty (sparse)")
        size = self.disk_size + UNDO_FS_SPARE
        self.undo_fs = Tmpfs(str(self.undo_dir), f"{size // MiB}m")
        self.detail(f"the secondary's state directory (undo overlays) on its own "
                    f"{size // MiB} MiB tmpfs: {self.undo_dir.name}/")

    # --- protect, restartable ------------------------------
    def start_protect(self) -> None:
        self.protect_out = []
        super().start_protect()
        self._argv = self.protect.args  # the same command line for every restart

    def _start_protect_again(self) -> None:
        self.protect_out = []
        self.protect = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=demo._env(), cwd=self.dir)
        threading.Thread(target=self._collect_protect, daemon=True).start()

    def _collect_protect(self) -> None:
        proc, out = self.protect, self.protect_out  # this protect's own list
        for line in proc.stdout:
            out.append(line)

    def kill_primary(self) -> None:
        super().kill_primary()
        self.copy_error_resumes += (self.result.protect.get("problems") or []).count(
            RESUMED_AFTER_COPY_ERROR)
        # the protect that synced after the last failover reported: keep its sync
        if self._sync_failover is not None and self._sync_protect is self.protect:
            resyncs = self.result.protect.get("resyncs") or []
            self._sync_failover.resync = resyncs[0] if resyncs else None
        self._sync_failover = self._sync_protect = None

    # --- the chaos phase ---------------------------------------------------------
    def let_it_work(self) -> None:
        self.step(f"Chaos: {self.rounds} round(s) of every fault class" if self.rounds else
                  f"Chaos for {self.seconds:g} s", f"seed {self.seed!r}")
        self.serial_log.wait_for(r"MC-WORK-START", demo.DEADLINE, self.qemu)
        self._wait(lambda: self._committed() >= 1, "the first commit (initial sync done)",
                   self.qemu)
        start = time.monotonic()
        done = 0
        while True:
            order = list(FAULTS)
            self.rng.shuffle(order)
            for fault in order:  # a whole round, so each class is hit in every run
                before, generation = self._committed(), self.generation
                t0 = time.monotonic()
                getattr(self, fault)()
                self.counts[fault] += 1
                if self.generation != generation:
                    before = 0  # a new secondary: its own epochs, from its first commit
                self._wait(lambda: self._committed() > before,
                           f"protection back in step after {fault}", self.qemu)
                self._sample()
                # and the guest still works: no fault may freeze it (a VM stopped on
                # an I/O error would go on being checkpointed, writing nothing)
                seq = self.samples[-1][0]
                self._wait(lambda: self._guest_wrote(seq), f"a guest record after {fault}",
                           self.qemu)
                self.detail(f"t={time.monotonic() - start:5.1f}s {fault:<15} in step again "
                            f"after {time.monotonic() - t0:4.1f} s: epoch {self.samples[-1][1]}"
                            f", guest record {self.samples[-1][0]}")
            done += 1
            if (done >= self.rounds) if self.rounds else \
                    time.monotonic() - start >= self.seconds:
                break
        self.chaos_seconds = time.monotonic() - start
        self.detail(f"{sum(self.counts.values())} faults in {self.chaos_seconds:.1f} s: "
                    + ", ".join(f"{k}={v}" for k, v in self.counts.items()))

    def restart_secondary(self) -> None:
        """Replaced by the chaos phase; only the mid-epoch moment for the kill."""
        self.result.restart_epoch = self._committed()
        self._kill_moment()

    def _kill_moment(self) -> None:
        """Wait until this segment has a record known to be committed (a failover
        right after the previous one would otherwise prove nothing), then for the
        middle of an epoch."""
        self._wait(self._record_committed, "a guest record in a committed epoch", self.qemu)
        ctl = ControlClient(StateDir(self.state).control)
        try:
            self._sample()
            self.result.kill_epoch, self.result.seq_after_commit = self._mid_epoch(ctl)
        finally:
            ctl.close()

    def _sample(self) -> None:
        """Read the guest's durable record, then the commit (in that order)."""
        self.serial_log.poll()
        seq = self.serial_log.last_seq
        self.samples.append((seq, self._committed()))

    def _record_committed(self) -> bool:
        self._sample()
        return self.committed_seq(self._committed()) >= 1

    def _guest_wrote(self, seq: int) -> bool:
        self.serial_log.poll()
        return self.serial_log.last_seq > seq

    def committed_seq(self, final: int) -> int:
        return max((s for s, c in self.samples if c + 1 <= final), default=0)

    def _status(self) -> dict:
        ctl = ControlClient(StateDir(self.state).control)
        try:
            return ctl.execute("query-status")
        finally:
            ctl.close()

    def _committed(self) -> int:
        return self._status()["committed"]

    def _nbdkit_pid(self) -> int:
        return int(Path(StateDir(self.state).pidfile).read_text().strip())

    def _serve(self) -> None:
        self.sh([_bin("nbd-mc"), "serve", f"vda={self.secondary_img}",
                 "--state-dir", str(self.state)], show=False)

    # --- the faults ------------------------------------------------------------------
    def secondary_kill(self) -> None:
        pid = self._nbdkit_pid()
        os.kill(pid, signal.SIGKILL)
        self._wait(lambda: not Path(f"/proc/{pid}").exists(), "nbdkit to die", self.qemu)
        self._serve()

    def secondary_stop(self) -> None:
        pid = self._nbdkit_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            # the fault's length, chosen by the RNG; nothing waits on it
            time.sleep(self.rng.uniform(*STOP_HOLD))
        finally:
            os.kill(pid, signal.SIGCONT)

    def protect_kill(self) -> None:
        proc = self.protect
        self.protect = None  # _alive must not call this one an early exit
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        qmp = str(self.qmp)

        def watchdog_done() -> bool:
            r = subprocess.run(["pgrep", "-f", f"nbd_mc.primary.watchdog.*{qmp}"],
                               capture_output=True, text=True)
            return not r.stdout.strip()
        self._wait(watchdog_done, "protect's watchdog to finish", self.qemu)
        self._start_protect_again()

    def control_drop(self) -> None:
        # a control client that sends half a request and vanishes
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(StateDir(self.state).control)
        s.sendall(b'{"execute": "query-st')
        s.close()
        # the secondary's control server goes away and comes back
        self.sh([_bin("nbd-mc"), "stop", "--state-dir", str(self.state)], show=False)
        self._serve()

    def full_fs(self) -> None:
        """Fill the undo file system right after a commit; hold it full until the
        secondary refuses a write and protect has noticed; then give the space back.

        Why the filler has to keep filling: a drop keeps the host clusters that any
        of the last 8 epochs used (qcow2/space.py), so the next epochs reuse space
        the overlay already holds, and what it gives back would let the next
        preserve succeed.  An epoch that needs more than the recent ones did (or a
        page of a reused cluster not written before) must allocate: ENOSPC, the
        guest write fails on the secondary only, the mirror fails, protect drops it
        and retries -- and cannot get back in step while the file system is full.
        """
        c = self._committed()
        self._wait(lambda: self._committed() > c, "a commit to fill the file system after",
                   self.qemu)
        st = self._status()
        errors, generation = st["stats"]["errors"], st["generation"]
        filler = Filler(str(self.undo_dir / "filler"))
        t0 = time.monotonic()
        try:
            filler.fill()

            def refused() -> bool:
                filler.fill()  # take back whatever the overlay gave back
                return self._status()["stats"]["errors"] > errors
            self._wait(refused, "the secondary to refuse a write on the full undo "
                       "file system", self.qemu, timeout=FULL_FS_DEADLINE)
            hit = time.monotonic() - t0

            # protect lost the mirror and claims the secondary again (a new session
            # at every resync attempt): it noticed the outage
            if not self.hold_full:
                filler.remove()

            def reclaimed() -> bool:
                if self.hold_full:
                    filler.fill()
                return self._status()["generation"] > generation
            self._wait(reclaimed, "protect to lose the secondary and claim it again",
                       self.qemu)
            st = self._status()
        finally:
            filler.remove()
        self.full_fs_hits.append(FullFsHit(
            errors=st["stats"]["errors"] - errors, claims=st["generation"] - generation,
            seconds_to_hit=hit, held=time.monotonic() - t0))

    def failover(self) -> None:
        """The primary dies mid-epoch; fail over, check the disk there, and protect the
        guest the other way: on the former secondary's disk, into the former primary's."""
        t0 = time.monotonic()
        self._kill_moment()
        self.kill_primary()
        self.qemu = self.protect = None  # both gone (kill_primary reaped them)
        self.fail_over()
        self.compare()
        r = self.result
        fo = FailoverCheck(generation=self.generation, commit=r.last_commit,
                           kill_epoch=r.kill_epoch, seq_after_commit=r.seq_after_commit,
                           committed_seq=self.committed_seq(r.last_commit),
                           identical=r.identical)
        self.failovers.append(fo)
        self.sh([_bin("nbd-mc"), "stop", "--state-dir", str(self.state)])  # as failover advised
        old_state = self.state
        self.generation += 1
        self.primary_img, self.secondary_img = self.secondary_img, self.primary_img
        self._generation_paths()
        self.samples = []
        shutil.rmtree(old_state)  # its undo is gone with the rollback; free the space
        self.step(f"Boot the guest on the failed-over disk {self.primary_img.name} "
                  f"(generation {self.generation})",
                  "service mode: the guest checks its disk (fsck, every record), then works")
        self._boot("service")
        self.step(f"Protect it into the former primary's disk {self.secondary_img.name}")
        self.sh([_bin("nbd-mc"), "serve", f"vda={self.secondary_img}",
                 "--state-dir", str(self.state)])
        self.start_protect()
        self._sync_protect, self._sync_failover = self.protect, fo
        self.serial_log.wait_for(r"MC-CHECK-(OK|FAIL)", demo.DEADLINE, self.qemu)
        fo.check = check = guest.parse_check(self.serial_log.text())
        self.detail(f"check: e2fsck exit {check.fsck}, records {check.minseq}..{check.maxseq}, "
                    f"{check.bad} bad, {check.gaps} missing; committed before the failover: "
                    f"1..{fo.committed_seq}")
        if not (check.ok and check.fsck == 0 and check.minseq == 1):
            raise DemoFailed(f"the check guest did not confirm the failed-over disk: "
                             f"{check.reason}\n{self.serial_log.tail()}")
        if check.maxseq < fo.committed_seq:
            raise DemoFailed(f"records {check.maxseq + 1}..{fo.committed_seq} were committed "
                             f"before the failover and are not on the disk")
        if fo.commit == fo.kill_epoch and check.maxseq >= fo.seq_after_commit:
            raise DemoFailed(f"record #{fo.seq_after_commit}, written after checkpoint "
                             f"{fo.kill_epoch}, is on the disk of that checkpoint")
        self.serial_log.wait_for(r"MC-WORK-START", demo.DEADLINE, self.qemu)
        self._wait(lambda: self._committed() >= 1, "the new secondary's first commit",
                   self.qemu)
        stats = self._status()["stats"]
        fo.synced_bytes = stats["bytes_written"]
        fo.seconds = time.monotonic() - t0
        self.detail(f"protected again: {fo.synced_bytes / (1 << 20):.1f} MiB written and "
                    f"{stats['zeroes']} zero request(s) until the first commit; failover "
                    f"cycle {fo.seconds:.1f} s")

    def _alive(self) -> None:
        try:
            super()._alive()
        except DemoFailed as e:
            if self.qemu is not None and self.qemu.poll() is not None and \
                    hasattr(self, "serial_log"):
                raise DemoFailed(f"{e}{self.serial_log._qemu_output()}") from None
            raise

    def _boot(self, mode: str) -> None:
        drive = ["-drive", f"if=none,id=drive0,file={self.primary_img},format=raw,"
                           "cache=writeback", "-device", "virtio-blk-pci,drive=drive0"]
        self.qemu = guest.start_guest(self.files, mode, drive, self.serial,
                                      extra=["-qmp", f"unix:{self.qmp},server=on,wait=off"])
        self.serial_log = guest.SerialLog(self.serial)
        self._wait(lambda: self.qmp.exists(), "QEMU's QMP socket", self.qemu)

    # --- cleaning up ---------------------------------------------------------------
    def cleanup(self) -> None:
        """Whatever still runs dies (QEMU, protect, the secondary of every
        generation); then the undo file system is unmounted."""
        try:
            super().cleanup()
            current = self.state
            for st in sorted(self.undo_dir.glob("state-*")) if self.undo_fs else []:
                if st != current:
                    self.state = st
                    super().cleanup()
            self.state = current
        finally:
            if self.undo_fs is not None:
                r = subprocess.run(["umount", str(self.undo_dir)], capture_output=True)
                if r.returncode != 0:  # something still holds it: detach it anyway
                    subprocess.run(["umount", "-l", str(self.undo_dir)], capture_output=True)
                self.undo_fs = None


def run(workdir: str | os.PathLike, seconds: float = 0.0, seed: str = "chaos",
        say=print, rounds: int | None = None) -> ChaosResult:
    """The chaos story in ``workdir`` (short path, for sockets): whole rounds of
    faults until ``seconds`` have passed, or exactly ``rounds`` rounds.  Kills what
    it started and unmounts the undo file system, also when it fails."""
    story = ChaosStory(Path(workdir), seconds, seed, say, rounds)
    try:
        res = story.run()
    finally:
        story.cleanup()
    out = ChaosResult(demo=res, counts=story.counts, seed=seed,
                      chaos_seconds=story.chaos_seconds, failovers=story.failovers,
                      full_fs=story.full_fs_hits,
                      copy_error_resumes=story.copy_error_resumes)
    out.committed_seq = story.committed_seq(res.last_commit)
    return out


def report(res: ChaosResult) -> str:
    lines = [res.table()]
    for i, f in enumerate(res.failovers, 1):
        rs = f.resync
        how = f"the new secondary was sent {f.synced_bytes / MiB:.1f} MiB to its first commit"
        if rs:
            how += (f" (protect's {rs.get('mode') or ('full' if rs.get('full') else 'bitmap')}"
                    f" sync: {rs.get('bytes', 0) / MiB:.1f} MiB copied)")
        lines.append(f"failover {i} (generation {f.generation}): commit {f.commit}, records "
                     f"committed 1..{f.committed_seq}, on the disk 1..{f.maxseq}; then {how}; "
                     f"{f.seconds:.1f} s")
    for i, h in enumerate(res.full_fs, 1):
        lines.append(f"full undo fs {i}: the secondary refused a write {h.seconds_to_hit:.2f} s "
                     f"after the fill; {h.errors} request(s) failed and protect claimed it "
                     f"{h.claims} time(s) in the {h.held:.2f} s it was full")
    lines.append(f"VM stopped by a failed resync copy and continued by protect: "
                 f"{res.copy_error_resumes} time(s) (as the protects that reported saw it)")
    d = res.demo
    lines.append(f"final commit {d.last_commit}; records committed before it: "
                 f"{res.committed_seq}; on the disk after failover: "
                 f"{d.check.maxseq if d.check else None}; records checked: "
                 f"{res.records_checked}; lost: {res.lost}")
    return "\n".join(lines)
