"""Bringing a secondary back in step: incremental from a dirty bitmap, a
checksum sync, or full.

QEMU 7.2's ``blockdev-mirror`` takes no bitmap, so an incremental resync is
built from what 7.2 has, converging like migration pre-copy:

1. round 1: bitmap R1 starts, then a fleecing snapshot of every drive is taken
   (fleece.py) and ``blockdev-backup sync=bitmap`` copies what the epoch bitmap
   (bitmaps.py) marks from the snapshot into the NBD node.  The snapshot is the
   point-in-time state of its start (our copy-before-write filter saves old data
   into a local file first), so the guest's writes during the round are R1's
   business -- and never wait for the secondary nor fail with it: a secondary that
   fails or hangs ends the round (its job), not a guest write;
2. round K+1 copies R_K the same way, while R_{K+1} counts; rounds go on while
   they shrink the dirty set and it is above FINAL_BYTES;
3. the final round runs with the VM paused (short: little is dirty), straight
   from the drive (no guest write can come while paused), then
   ``blockdev-mirror sync=none copy-mode=write-blocking`` starts and the VM
   continues: from here every guest write reaches the secondary before it
   completes, and the next commit is a consistent point again.  Like a
   checkpoint's, the pause gives way at checkpoint.PAUSE_DEADLINE: the NBD
   connections are yanked, the jobs cancelled, the VM continues and the
   secondary counts as lost (SecondaryStalled).

Why backup rounds and not pulling extents with libnbd from QEMU's own NBD export
(``block-export-add`` + ``qemu:dirty-bitmap:NAME``): measured in bench/resync.py
and written down in docs/protect.md (no extra data copy through our process, no
export to secure, and QEMU's copy-before-write gives each round a consistent
point for free).

A full sync is the initial sync: ``blockdev-mirror sync=full``.

A *checksum sync* (DRBD's ``csums-alg``) is for a secondary whose image holds
data although no bitmap says what changed -- above all the failback: the old
primary's disk returns as a replica.  Why a bitmap cannot be enough there even
in principle: the rolled-back clusters (recorded at failover) plus a dirty
bitmap of everything the new primary wrote since it started miss the writes
that were in flight when the old primary died.  Its write-blocking mirror
writes QEMU's own disk *before* the target, so a guest write the crash cut off
can be on the old primary's disk and never have reached the secondary: it is
in no undo file and no bitmap, and a resync from the two sets would leave it
there -- both sides "in step", different data (silent divergence).  So the
checksum sync compares contents:

1. bitmap R (bitmaps.checksum_name) starts on every drive, before anything is
   read: from here every guest write is counted;
2. the walk: chunk by chunk, protect hashes each block of the primary's drive
   (read through source.py: its local raw image, or QEMU's read-only NBD
   export of a qcow2 or network drive) and asks the secondary (``checksum-range``, nbd_mc/checksum.py)
   for the digests of the same blocks of its *current* image; holes cost no
   read on either side;
3. differing blocks are copied with ranges.RangeWriter (libnbd, into the writer
   export): the contents just read and hashed;
4. then the incremental path above runs from R: whatever the guest wrote during
   the walk (including a block read torn by a racing write) is copied again by
   the backup rounds, the last one paused, and the write-blocking mirror starts.

The secondary's writes are those of its open epoch: on a group that has a
committed epoch they are kept as undo (a failover during the sync returns to
that commit); on a fresh group (epoch 0, what a returning node serves) nothing
is consistent until the first commit after the sync, and `failover` refuses
epoch 0 -- an unfinished checksum sync is never promotable, exactly like an
unfinished full sync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .. import checksum
from ..control import ControlError
from ..errors import NbdMcError
from .bitmaps import Bitmaps, checksum_name, epoch_name, round_name
from .checkpoint import CONT_TIMEOUT, PAUSE_DEADLINE, resume
from .errors import PrimaryGone, QmpTimeout, SecondaryFailed, SecondaryStalled
from .fleece import Fleece
from .lifecycle import end_jobs, live_jobs, wait_gone
from .mirrors import (BACKUP_PREFIX, CopyWatch, Mirrors, cancel_mirrors, job_progress,
                      resume_after_copy_error, start_mirrors, yank)
from .options import DriveSpec
from .qmp import Qmp
from .ranges import RangeWriter
from .rate import Pacer
from .side import PrimarySide

#: Below this many dirty bytes the last round runs with the VM paused (its copy must
#: fit in the pause's deadline, checkpoint.PAUSE_DEADLINE, on a busy host too).
FINAL_BYTES = 1 << 20
#: Pre-copy rounds before the final one, at most.
MAX_ROUNDS = 8
#: A round on a dead secondary fails fast (its job errs); one whose secondary takes
#: writes and never completes them is bounded by progress (round_stall): ROUND_POLL
#: is how often the jobs' offsets are read.
ROUND_POLL = 0.25
#: A round's stall bound when protect has no --stall-timeout (a library caller).
ROUND_STALL = 10.0
#: The most a rate-limited backup job writes at once (QEMU's backup copies up to a
#: few clusters of 64 KiB per request): its stall bound grows by the time this
#: takes at --rate.
RATE_CHUNK = 1 << 20
#: A write that slips into the paused final round (not a guest: HMP qemu-io, a
#: block job) makes the final round run again, at most this often.
FINAL_TRIES = 3
#: A sync=none mirror is ready at once; bound the wait anyway.
MIRROR_READY_TIMEOUT = 30.0
#: The checksum walk asks for this much per request, in blocks of BLOCK.
WALK_CHUNK = 4 << 20
BLOCK = checksum.DEFAULT_BLOCK


class ChecksumUnsupported(SecondaryFailed):
    """The secondary cannot hash its blocks (an older server): sync it in full."""


@dataclass
class Resync:
    """One (re)synchronisation, for the report's ``resyncs``."""

    full: bool
    reason: str
    bytes: int = 0  # copied to the secondary for it
    dirty: int = 0  # what the bitmap marked when it started (0 for a full sync)
    seconds: float = 0.0
    paused: float = 0.0  # seconds the VM was paused for the final round
    rounds: int = 0
    from_epoch: int = 0  # the secondary's committed epoch when it started
    mode: str = ""  # "bitmap" | "checksum" | "full" (default: from ``full``)
    hashed: int = 0  # checksum: bytes compared by hash
    differing: int = 0  # checksum: bytes the walk found different (and copied)

    def as_dict(self) -> dict:
        return {"full": self.full, "reason": self.reason, "bytes": self.bytes,
                "from_epoch": self.from_epoch,
                "dirty_bytes": self.dirty, "seconds": round(self.seconds, 3),
                "pause_ms": round(self.paused * 1000, 3), "rounds": self.rounds,
                "mode": self.mode or ("full" if self.full else "bitmap"),
                "hashed_bytes": self.hashed, "differing_bytes": self.differing}


def backup_job(d: DriveSpec) -> str:
    return BACKUP_PREFIX + d.drive


def _wait_jobs(qmp: Qmp, ids: set, cursor: int, progress=None, stop=lambda: False,
               deadline: float | None = None, stall: float | None = None) -> int:
    """Wait until every backup job in ``ids`` completed; the bytes they copied.

    A job that ends with an error means the secondary failed under us; one that
    has not ended by ``deadline`` (monotonic) means it stalled (SecondaryStalled),
    and so do jobs that copied nothing for ``stall`` seconds: a secondary whose
    writes never complete (a disk hung in the kernel, a peer that stopped reading
    but keeps its connection) would otherwise hold the round, and protect, for
    ever while its control channel still answers."""
    pending = set(ids)
    copied = 0
    watch = CopyWatch(progress, stall, "a resync round",
                      "; the round ended, the secondary is lost")
    while pending:
        poll = ROUND_POLL if deadline is None else \
            max(0.0, min(ROUND_POLL, deadline - time.monotonic()))
        ev, cursor = qmp.wait_event(
            lambda e: e.get("event") in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
            and (e.get("data") or {}).get("device") in pending, cursor, poll)
        if qmp.gone:
            raise PrimaryGone(f"QEMU ({qmp.path}): {qmp.gone}")
        if ev is None and deadline is not None and time.monotonic() >= deadline:
            raise SecondaryStalled(f"the final resync round did not end within the pause's "
                                   f"{PAUSE_DEADLINE:g} s: the VM went on, the secondary "
                                   "is lost")
        if ev is None:
            if watch.wanted:
                watch.update(*job_progress(qmp, pending))
            if stop():
                end_jobs(qmp, pending, force=True)  # gone before their bitmaps go
                raise SecondaryFailed("stopped during the resync")
            continue
        data = ev["data"]
        pending.discard(data["device"])
        if ev["event"] == "BLOCK_JOB_CANCELLED" or data.get("error"):
            end_jobs(qmp, pending | {data["device"]}, force=True)  # lifecycle rule 2
            raise SecondaryFailed(f"resync copy {data['device']} failed: "
                                  f"{data.get('error') or 'cancelled'}")
        copied += data.get("offset", 0)
    wait_gone(qmp, ids)  # lifecycle rule 2: their bitmaps are released when they are
    return copied


def round_stall(stall_timeout: float | None, speed: int = 0) -> float:
    """How long a round may copy nothing before its secondary counts as stalled:
    protect's --stall-timeout (ROUND_STALL without one), plus the time a --rate
    limited job may spend on one chunk (QEMU counts a chunk when it is written)."""
    base = ROUND_STALL if stall_timeout is None else stall_timeout
    return base + (RATE_CHUNK / speed if speed else 0.0)


def _end_jobs(qmp: Qmp, drives: list[DriveSpec], ids) -> None:
    """A round ends early: its copies are cut off the secondary (a hung one would
    hold a cancel), then ended through the lifecycle (its rule 2: gone before
    their snapshot and bitmaps are taken away)."""
    if qmp.gone or not set(ids) & set(live_jobs(qmp)):
        return
    yank(qmp, drives)
    end_jobs(qmp, ids, force=True)


def _backup_actions(bitmaps: Bitmaps, drives: list[DriveSpec], source: str,
                    fleece: Fleece | None = None, speed: int = 0) -> list[dict]:
    """One backup job per drive copying what bitmap ``source`` marks: from the
    drive's node, or from ``fleece``'s snapshot of it (with its copy of the bitmap);
    ``speed`` (--rate) limits each job."""
    return [{"type": "blockdev-backup",
             "data": {"job-id": backup_job(d),
                      "device": fleece.source(d.drive) if fleece else bitmaps.nodes[d.drive],
                      "target": d.node, "sync": "bitmap",
                      "bitmap": fleece.bitmap(d.drive, source) if fleece else source,
                      "bitmap-mode": "never", "on-source-error": "report",
                      "on-target-error": "report", "auto-dismiss": True,
                      **({"speed": speed} if speed else {})}}
            for d in drives]


def incremental(side: PrimarySide, committed: int, progress=None, stop=lambda: False,
                source: str | None = None, speed: int = 0) -> tuple[Resync, Mirrors]:
    """Copy what changed since ``committed`` (or what bitmap ``source`` marks) into
    ``side``'s (attached) NBD nodes, then start the write-blocking mirrors; returns
    what it did and the mirrors.  The epoch bitmap is left as it is: if this resync
    fails, the next one needs it.  The fleecing files belong to ``side.owner``
    (fleece.py).  ``speed`` (--rate) limits the rounds that run while the VM runs,
    not the paused final one."""
    qmp, drives, bitmaps = side.qmp, side.drives, side.bitmaps
    group = bitmaps.group
    epoch_bitmap = source = source or epoch_name(group, committed)
    r = Resync(full=False, reason="", dirty=bitmaps.dirty_bytes(source), mode="bitmap")
    t0 = time.monotonic()
    ids = {backup_job(d) for d in drives}
    k = 0
    dirty = r.dirty
    try:
        while True:
            k += 1
            if k > MAX_ROUNDS or (k > 1 and dirty <= FINAL_BYTES):
                copied, r.paused, mirrors = _final_round(side, source, k, ids)
                r.bytes += copied
                break
            nxt = round_name(group, k)
            # R_k+1 first, the snapshot after: a write in between is copied twice
            qmp.cmd("transaction", actions=bitmaps.add_actions(nxt))
            fleece = Fleece(qmp, drives, bitmaps.nodes, side.owner)
            try:
                fleece.take(source)
                cursor = qmp.cursor
                qmp.cmd("transaction", actions=_backup_actions(bitmaps, drives, source, fleece,
                                                                  speed))
                r.bytes += _wait_jobs(qmp, ids, cursor, progress, stop,
                                      stall=round_stall(side.stall_timeout, speed))
            except BaseException:
                _end_jobs(qmp, drives, ids)
                raise
            finally:
                if not qmp.gone:
                    fleece.close()
            if source != epoch_bitmap:
                bitmaps.remove_named(source)
            before, dirty = dirty, bitmaps.dirty_bytes(nxt)
            source = nxt
            if k > 1 and dirty >= before and dirty > FINAL_BYTES:
                # not converging (the guest writes as fast as we copy): more rounds
                # would not help; the final round pauses longer instead
                k = MAX_ROUNDS
    finally:
        bitmaps.remove_rounds()
    resume_after_copy_error(qmp)  # a round's copy failed a guest write (the jobs are gone)
    r.rounds = k
    r.seconds = time.monotonic() - t0
    return r, mirrors


def _final_round(side: PrimarySide, source: str, k: int, ids) -> tuple[int, float, Mirrors]:
    """With the VM paused: copy ``source``, start the write-blocking mirrors, cont.
    Returns (bytes copied, seconds paused, the mirrors).

    A guard bitmap counts writes between the final copy's start and the mirrors'
    start.  A real guest cannot write while paused, but anything else that writes
    (HMP qemu-io, a block job) would be lost: then the final round runs again."""
    qmp, drives, bitmaps, watchdog = side.qmp, side.drives, side.bitmaps, side.watchdog
    running = bool(qmp.cmd("query-status").get("running"))
    # asked before the pause: every QMP round trip in it is pause (on a busy host the
    # long pauses of the guest-harm soak were final rounds made of round trips)
    first_guard = bitmaps.add_actions(round_name(bitmaps.group, k))
    t0 = time.perf_counter()
    deadline = time.monotonic() + PAUSE_DEADLINE
    copied = 0
    cut = False
    if running and watchdog:
        watchdog.pausing()
    try:
        try:
            if running:
                try:
                    qmp.execute("stop", timeout=PAUSE_DEADLINE)
                except QmpTimeout:
                    yank(qmp, drives)
                    cut = True
                    raise SecondaryStalled("the secondary stalled during the final resync "
                                           f"round: pausing the VM waited more than "
                                           f"{PAUSE_DEADLINE:g} s for its writes") from None
            for attempt in range(FINAL_TRIES):
                guard = round_name(bitmaps.group, k + attempt)
                cursor = qmp.cursor
                qmp.cmd("transaction", actions=(bitmaps.add_actions(guard) if attempt
                                                else first_guard)
                        + _backup_actions(bitmaps, drives, source))
                copied += _wait_jobs(qmp, ids, cursor, deadline=deadline)
                mirrors = Mirrors(qmp, drives)
                start_mirrors(qmp, drives, sync="none")
                if not mirrors.wait_ready(timeout=max(0.0, deadline - time.monotonic())):
                    raise SecondaryStalled("the write-blocking mirror did not become ready "
                                           f"within the pause's {PAUSE_DEADLINE:g} s")
                if bitmaps.dirty_bytes(guard) == 0:
                    return copied, time.perf_counter() - t0, mirrors
                cancel_mirrors(qmp, mirrors, force=True)  # something wrote: copy that too
                if ".round" in source:
                    bitmaps.remove_named(source)
                source = guard
            raise SecondaryFailed("writes kept arriving while the VM was paused for the final "
                                  "resync round")
        except SecondaryFailed:
            # the VM is paused: cut the secondary off and end the jobs before it runs on
            # (a forced cancel with the VM paused is safe: mirrors.HeldStill)
            if running and not qmp.gone:
                if not cut:
                    yank(qmp, drives)
                    cut = True
                # copies and mirrors at once, then one wait: the pause is still on
                ours = set(ids) | {d.job for d in drives}
                end_jobs(qmp, ours, force=True, timeout=CONT_TIMEOUT)
            raise
    finally:
        if running:
            resume(qmp, CONT_TIMEOUT if cut else side.stall_timeout, drives)
            if watchdog:
                watchdog.resumed()


def checksum_sync(side: PrimarySide, ctl, writer: RangeWriter, sizes: dict[str, int],
                  committed: int, progress=None, stop=lambda: False, rate=lambda: 0
                  ) -> tuple[Resync, Mirrors] | None:
    """The checksum sync (module docstring): bitmap R, the walk, the copy of what
    differs, then the incremental rounds from R and the write-blocking mirrors.

    ``side.drives`` name the secondary's disks (``export``), ``writer`` writes its
    writer exports.  ``rate()`` (--rate, bytes/s, 0 unlimited) holds the walk's copies
    (rate.Pacer) and limits the incremental rounds' jobs.  Returns None if ``stop()``
    became true during the walk."""
    qmp, drives, bitmaps = side.qmp, side.drives, side.bitmaps
    t0 = time.monotonic()
    pacer = Pacer(rate)
    r_bitmap = checksum_name(bitmaps.group)
    qmp.cmd("transaction", actions=bitmaps.add_actions(r_bitmap))
    hashed = differing = 0
    total = sum(sizes[d.drive] for d in drives)
    done = 0
    for d in drives:
        for off in range(0, sizes[d.drive], WALK_CHUNK):
            if stop():
                bitmaps.remove_named(r_bitmap)
                return None
            n = min(WALK_CHUNK, sizes[d.drive] - off)
            for start, length in _differing(ctl, writer, d, off, n):
                writer.write(d.drive, start, writer.read(d.drive, start, length))
                differing += length
                pacer.sent(length, stop)
            hashed += n
            done += n
            if progress:
                progress(done, total)
    copied = writer.written
    r, mirrors = incremental(side, committed, None, stop, source=r_bitmap, speed=rate())
    r.mode = "checksum"
    r.hashed = hashed
    r.differing = differing
    r.bytes += copied
    r.seconds = time.monotonic() - t0
    return r, mirrors


def _differing(ctl, writer: RangeWriter, d: DriveSpec, offset: int, length: int):
    """(offset, length) of the blocks of [offset, offset+length) whose contents differ
    between the primary's image and the secondary's disk, adjacent ones merged."""
    try:
        theirs = ctl.execute("checksum-range", disk=d.export, offset=offset, length=length,
                             block=BLOCK)["blocks"]
    except ControlError as e:
        if e.error_class == "CommandNotFound":
            raise ChecksumUnsupported("the secondary's nbd-mc has no checksum-range (an older "
                                      "version)") from None
        raise SecondaryFailed(f"the secondary refused checksum-range: {e}") from None
    except (OSError, NbdMcError) as e:
        raise SecondaryFailed(f"lost the control connection to the secondary during the "
                              f"checksum sync: {e}") from None
    ours, _ = checksum.digests(lambda a, b: writer.extents(d.drive, a, b), offset,
                               length, BLOCK, lambda view, pos: writer.read_into(d.drive, view, pos))
    out: list[list[int]] = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        start = offset + i * BLOCK
        n = min(BLOCK, offset + length - start)
        if checksum.same(a, b, n):
            continue
        if out and out[-1][0] + out[-1][1] == start:
            out[-1][1] += n
        else:
            out.append([start, n])
    if len(ours) != len(theirs):
        raise SecondaryFailed(f"checksum-range of {d.export} at {offset} answered "
                              f"{len(theirs)} blocks, not {len(ours)}")
    return [(a, n) for a, n in out]
