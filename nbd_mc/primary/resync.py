"""Bringing a secondary back in step: incremental from a dirty bitmap, or full.

QEMU 7.2's ``blockdev-mirror`` takes no bitmap, so an incremental resync is
built from what 7.2 has, converging like migration pre-copy:

1. round 1: in one ``transaction``, bitmap R1 starts and ``blockdev-backup
   sync=bitmap`` copies what the epoch bitmap (bitmaps.py) marks into the NBD
   node.  A backup job copies the point-in-time state of its start (its
   copy-before-write filter saves old data first), so the guest's writes during
   the round are R1's business;
2. round K+1 copies R_K the same way, while R_{K+1} counts; rounds go on while
   they shrink the dirty set and it is above FINAL_BYTES;
3. the final round runs with the VM paused (short: little is dirty), then
   ``blockdev-mirror sync=none copy-mode=write-blocking`` starts and the VM
   continues: from here every guest write reaches the secondary before it
   completes, and the next commit is a consistent point again.

Why backup rounds and not pulling extents with libnbd from QEMU's own NBD export
(``block-export-add`` + ``qemu:dirty-bitmap:NAME``): measured in bench/resync.py
and written down in the README (no extra data copy through our process, no
export to secure, and QEMU's copy-before-write gives each round a consistent
point for free).

A full sync is the initial sync: ``blockdev-mirror sync=full``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .bitmaps import Bitmaps, epoch_name, round_name
from .checkpoint import resume
from .errors import PrimaryGone, QmpCommandError, QmpTimeout, SecondaryFailed, SecondaryStalled
from .mirrors import (BACKUP_PREFIX, Mirrors, cancel_mirrors, job_progress,
                      resume_after_copy_error, start_mirrors, yank)
from .options import DriveSpec
from .qmp import Qmp

#: Below this many dirty bytes the last round runs with the VM paused.
FINAL_BYTES = 4 << 20
#: Pre-copy rounds before the final one, at most.
MAX_ROUNDS = 8
#: A round on a dead secondary fails fast; a slow one is bounded only by progress.
ROUND_POLL = 0.25
#: A write that slips into the paused final round (not a guest: HMP qemu-io, a
#: block job) makes the final round run again, at most this often.
FINAL_TRIES = 3
#: A sync=none mirror is ready at once; bound the wait anyway.
MIRROR_READY_TIMEOUT = 30.0


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

    def as_dict(self) -> dict:
        return {"full": self.full, "reason": self.reason, "bytes": self.bytes,
                "from_epoch": self.from_epoch,
                "dirty_bytes": self.dirty, "seconds": round(self.seconds, 3),
                "pause_ms": round(self.paused * 1000, 3), "rounds": self.rounds}


def backup_job(d: DriveSpec) -> str:
    return BACKUP_PREFIX + d.drive


def _wait_jobs(qmp: Qmp, ids: set, cursor: int, progress=None, stop=lambda: False) -> int:
    """Wait until every backup job in ``ids`` completed; the bytes they copied.

    A job that ends with an error means the secondary failed under us."""
    pending = set(ids)
    copied = 0
    while pending:
        ev, cursor = qmp.wait_event(
            lambda e: e.get("event") in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
            and (e.get("data") or {}).get("device") in pending, cursor, ROUND_POLL)
        if qmp.gone:
            raise PrimaryGone(f"QEMU ({qmp.path}): {qmp.gone}")
        if ev is None:
            if progress:
                progress(*job_progress(qmp, pending))
            if stop():
                for j in pending:
                    _cancel_quietly(qmp, j)
                raise SecondaryFailed("stopped during the resync")
            continue
        data = ev["data"]
        pending.discard(data["device"])
        if ev["event"] == "BLOCK_JOB_CANCELLED" or data.get("error"):
            for j in pending:
                _cancel_quietly(qmp, j)
            raise SecondaryFailed(f"resync copy {data['device']} failed: "
                                  f"{data.get('error') or 'cancelled'}")
        copied += data.get("offset", 0)
    return copied


def _cancel_quietly(qmp: Qmp, job: str) -> None:
    try:
        qmp.cmd("block-job-cancel", device=job, force=True)
    except QmpCommandError:
        pass


def _backup_actions(bitmaps: Bitmaps, drives: list[DriveSpec], source: str) -> list[dict]:
    return [{"type": "blockdev-backup",
             "data": {"job-id": backup_job(d), "device": bitmaps.nodes[d.drive],
                      "target": d.node, "sync": "bitmap", "bitmap": source,
                      "bitmap-mode": "never", "on-source-error": "report",
                      "on-target-error": "report", "auto-dismiss": True}}
            for d in drives]


def incremental(qmp: Qmp, drives: list[DriveSpec], bitmaps: Bitmaps, committed: int,
                progress=None, stop=lambda: False, stall_timeout: float | None = None,
                watchdog=None) -> tuple[Resync, Mirrors]:
    """Copy what changed since ``committed`` into the (attached) NBD nodes, then
    start the write-blocking mirrors; returns what it did and the mirrors.  The
    epoch bitmap is left as it is: if this resync fails, the next one needs it."""
    group = bitmaps.group
    epoch_bitmap = source = epoch_name(group, committed)
    r = Resync(full=False, reason="", dirty=bitmaps.dirty_bytes(source))
    t0 = time.monotonic()
    ids = {backup_job(d) for d in drives}
    k = 0
    dirty = r.dirty
    try:
        while True:
            k += 1
            if k > MAX_ROUNDS or (k > 1 and dirty <= FINAL_BYTES):
                copied, r.paused, mirrors = _final_round(qmp, drives, bitmaps, source, k, ids,
                                                         stall_timeout, watchdog)
                r.bytes += copied
                break
            nxt = round_name(group, k)
            cursor = qmp.cursor
            qmp.cmd("transaction", actions=bitmaps.add_actions(nxt)
                    + _backup_actions(bitmaps, drives, source))
            r.bytes += _wait_jobs(qmp, ids, cursor, progress, stop)
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


def _final_round(qmp: Qmp, drives, bitmaps: Bitmaps, source: str, k: int, ids,
                 stall_timeout: float | None, watchdog) -> tuple[int, float, Mirrors]:
    """With the VM paused: copy ``source``, start the write-blocking mirrors, cont.
    Returns (bytes copied, seconds paused, the mirrors).

    A guard bitmap counts writes between the final copy's start and the mirrors'
    start.  A real guest cannot write while paused, but anything else that writes
    (HMP qemu-io, a block job) would be lost: then the final round runs again."""
    running = bool(qmp.cmd("query-status").get("running"))
    t0 = time.perf_counter()
    copied = 0
    if running and watchdog:
        watchdog.pausing()
    try:
        if running:
            try:
                qmp.execute("stop", timeout=stall_timeout)
            except QmpTimeout:
                yank(qmp, drives)
                raise SecondaryStalled("the secondary stalled during the final resync "
                                       "round") from None
        for attempt in range(FINAL_TRIES):
            guard = round_name(bitmaps.group, k + attempt)
            cursor = qmp.cursor
            qmp.cmd("transaction", actions=bitmaps.add_actions(guard)
                    + _backup_actions(bitmaps, drives, source))
            copied += _wait_jobs(qmp, ids, cursor)
            mirrors = Mirrors(qmp, drives)
            start_mirrors(qmp, drives, sync="none")
            if not mirrors.wait_ready(timeout=MIRROR_READY_TIMEOUT):
                raise SecondaryFailed("the write-blocking mirror did not become ready")
            if bitmaps.dirty_bytes(guard) == 0:
                return copied, time.perf_counter() - t0, mirrors
            cancel_mirrors(qmp, mirrors, force=True)  # something wrote: copy that too
            if ".round" in source:
                bitmaps.remove_named(source)
            source = guard
        raise SecondaryFailed("writes kept arriving while the VM was paused for the final "
                              "resync round")
    finally:
        if running:
            resume(qmp, stall_timeout, drives)
            if watchdog:
                watchdog.resumed()
