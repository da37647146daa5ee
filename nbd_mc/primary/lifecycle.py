"""The lifecycle of what protect creates in QEMU, and the rules for ending it.

protect creates, in the primary's QEMU:

* NBD client nodes ``nbd-mc-<drive>`` on the secondary's exports (``blockdev-add``,
  mirrors.attach);
* write-blocking mirror jobs ``nbd-mc-<drive>`` into them (``blockdev-mirror``), each
  with its implicit mirror filter above the drive;
* backup jobs ``nbd-mc-backup-<drive>`` for the rounds of a resync (``blockdev-backup
  sync=bitmap``, resync.py), each with its implicit copy-before-write filter;
* dirty bitmaps ``nbd-mc.<group>.*`` on the drives' nodes (bitmaps.py);
* an NBD server and read-only exports of the drives (source.py).

Everything that *ends* one of these -- a job's end or cancel, a bitmap's removal, a
node's deletion -- goes through this module, which keeps these rules.  Each rule
names the QEMU bug it avoids; tools/qemu-bugs/ holds a standalone reproducer per
bug that says whether the QEMU it runs has it (QEMU 7.2 and 10.0 both do, unless
the rule says otherwise).

1. **A write-blocking mirror is force-cancelled only while the VM is paused**
   (HeldStill; a cancel before READY counts as forced).  QEMU bug
   (force-cancel-write-blocking-mirror.py): a mirror that leaves its loop frees
   its in-flight bitmap after waiting only for its own copies; a guest write the
   write-blocking filter is still copying clears its bits in freed memory later:
   heap corruption (QEMU 7.2: 7 of 9 tries; 10.0: 8 of 9).  ``stop`` drains every
   guest write first.
2. **A job is waited for until QEMU no longer lists it** before anything it uses
   is removed (its bitmaps, its target node) and before a new job starts on the
   same drive (end_jobs).  A cancelled job still holds its filter, its bitmaps
   (a backup's sync bitmap stays *busy* until its cleanup) and its nodes; removing
   them under it is refused at best.
3. **A bitmap is removed only when QEMU shows it idle** (not ``busy``: no job's
   sync bitmap, no export's) -- remove_bitmap skips a busy one and says so; the
   caller removes it once its job has ended.
4. **A node is deleted only when no job of ours is alive** (delete_nodes after
   end_jobs), so the deletion is the last reference and QEMU closes the node then
   and there, not later from inside a job's cleanup.
5. **A mirror job is paused (``block-job-pause``) before protect pauses the VM**,
   to end it (HeldStill.hold) or for a checkpoint (checkpoint.py, JobsHeld: resumed
   once the ``stop`` has returned), so that it cannot end inside ``stop``.  QEMU bug
   (drive-node-closed-after-hung-mirror.py, QEMU 7.2 only): a write-blocking
   mirror whose target failed (a yanked or dead secondary) ends by itself at its
   next iteration; when that end runs inside ``stop``'s drain (the drain itself
   flushes a guest write that fails on the target), the drive's node is left one
   reference short, and the next filter inserted above the drive -- a resync
   round's copy-before-write -- closes the guest's disk: QEMU aborts
   (``bdrv_release_dirty_bitmap_locked: Assertion '!bdrv_dirty_bitmap_busy(bitmap)'``
   or ``bdrv_close: Assertion 'QLIST_EMPTY(&bs->dirty_bitmaps)'``).  The
   reproducer hit it in 27 of 40 tries on 7.2 (15 outages each), 6 of 10 with the
   guest writing through QEMU's NBD server instead of HMP, 0 of 12 on 10.0; with
   the failing mirrors left to end before the ``stop``, 0 of 10.  The cause: the
   job's exit runs inside ``stop``'s ``bdrv_flush_all()``, whose ``bdrv_next()``
   walk then drops its reference on the drive's node instead of the mirror filter
   it took it on (fixed upstream in QEMU 9.0, f6d38c9f6dae).  A paused job
   does not run its end until its cancel or ``block-job-resume`` resumes it, after
   the ``stop``: outside any drain.  A checkpoint's own ``stop`` met the same
   abort on 7.2 (a secondary failing a write or yanked at the pause's deadline
   inside the drain; an async checkpoint's drain of copies in flight to a
   secondary just killed), hence JobsHeld there too.  An async checkpoint also
   waits, with the VM still running, until its held jobs have reached the pause
   point (JobsHeld.settle): not a QEMU bug, the guest's 1 s pause bound -- QEMU's
   ``stop`` would otherwise wait for a background mirror's copies in flight.
"""

from __future__ import annotations

import time

from .errors import PrimaryGone, QmpCommandError, QmpTimeout, SecondaryStalled
from .qmp import Qmp

#: Ending a job: QEMU reports it with one of these.
JOB_END_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
#: Cancelling a READY mirror copies what is still dirty; bound the wait.
CANCEL_TIMEOUT = 30.0
#: Pausing the VM before a forced cancel (HeldStill) waits for the guest writes in
#: flight to the secondary; a hung one makes the cancel wait behind it (see there).
HOLD_TIMEOUT = 10.0
#: A job at its pause point, as query-block-jobs lists it (a READY job pauses as
#: ``standby``).
PAUSED = ("standby", "paused")
#: Polling the held jobs until they reach their pause point (JobsHeld.settle).
SETTLE_POLL_FIRST = 0.001
SETTLE_POLL_MAX = 0.02
#: Seconds to wait for the answer to a command that only has to be queued behind one
#: QEMU's monitor is still running (a ``stop`` draining): it runs there, in order.
QUEUED = 0.1


def live_jobs(qmp: Qmp) -> dict[str, dict]:
    """QEMU's block jobs by id (``query-block-jobs``)."""
    return {j["device"]: j for j in qmp.cmd("query-block-jobs")}


class HeldStill:
    """The VM paused around a forced cancel of a write-blocking mirror (rule 1).

    Why: in QEMU 7.2 and 10.0 (block/mirror.c) a mirror job that leaves its loop
    because it was force-cancelled waits only for its own background copies, then
    frees its in-flight bitmap -- while a guest write copied by the write-blocking
    filter may still be waiting for the secondary.  When that write settles it
    clears its bits in the freed bitmap: heap corruption, and QEMU dies later
    (SIGSEGV or SIGABRT "malloc(): unaligned tcache chunk detected", found by the
    chaos soak in about 1 run in 10) or, worse, goes on with a corrupt heap.
    ``stop`` drains every guest write (each one settles before it returns) and
    keeps new ones out, so a job cancelled while the VM is paused has no write in
    flight to race.  A VM that does not run (paused by a checkpoint, stopped by an
    I/O error) is left as it is: it has nothing in flight either.

    If ``stop`` itself waits longer than HOLD_TIMEOUT (a write stuck on a hung
    secondary), QmpTimeout propagates from the next command, which QEMU runs only
    after the stop: the cancel never overtakes the drain.  The caller retries (protect's
    drop_pending); the ``cont`` sent by release() runs after them.

    State (the caller's thread): ``stopped`` -- we sent a ``stop`` that release() must
    undo; ``watchdog`` (watchdog.py, or None) is told so that a protect killed in
    between does not leave the VM paused.
    """

    def __init__(self, qmp: Qmp, watchdog=None, timeout: float = HOLD_TIMEOUT):
        self.qmp = qmp
        self.watchdog = watchdog
        self.timeout = timeout
        self.stopped = False

    def hold(self, ids, running: dict[str, dict]) -> None:
        """Pause the VM if any of ``ids`` is a live mirror job and the VM runs; the
        mirror jobs themselves are paused first (rule 5)."""
        mirrors = [j for j in ids if (running.get(j) or {}).get("type") == "mirror"]
        if self.stopped or not mirrors:
            return
        if self.qmp.cmd("query-status").get("status") != "running":
            return
        pause_jobs(self.qmp, mirrors)
        if self.watchdog:
            self.watchdog.pausing()
        self.stopped = True
        try:
            self.qmp.execute("stop", timeout=self.timeout)
        except QmpTimeout:
            pass  # queued: QEMU runs the cancel after it (see the class docstring)

    def release(self) -> None:
        """``cont`` if we paused the VM (unless QEMU is gone)."""
        if not self.stopped:
            return
        self.stopped = False
        if self.qmp.gone:
            return
        try:
            self.qmp.execute("cont", timeout=self.timeout)
        except QmpTimeout:
            return  # queued behind a stop still draining: it runs when that ends
        except PrimaryGone:
            return
        if self.watchdog:
            self.watchdog.resumed()


def pause_jobs(qmp: Qmp, ids, timeout: float | None = None) -> list[str]:
    """``block-job-pause`` each job of ``ids`` (rule 5); one that ended meanwhile is
    skipped.  The command only asks: QEMU pauses the job at its next pause point,
    and a job paused by us is resumed by its cancel or by resume_jobs.  Returns the
    jobs paused."""
    paused = []
    for j in sorted(ids):
        try:
            qmp.execute("block-job-pause", {"device": j}, timeout=timeout)
        except QmpCommandError:
            continue  # ended or ending meanwhile: nothing to hold back
        paused.append(j)
    return paused


def resume_jobs(qmp: Qmp, ids, timeout: float | None = None) -> None:
    """``block-job-resume`` each job of ``ids``; one that ended meanwhile is skipped.
    A resume that waits longer than ``timeout`` stays queued in QEMU's monitor (behind
    a ``stop`` still draining) and runs there, in order, before any later command."""
    for j in sorted(ids):
        try:
            qmp.execute("block-job-resume", {"device": j}, timeout=timeout)
        except QmpCommandError:
            pass  # ended meanwhile (a failed target): check() says why
        except QmpTimeout:
            timeout = QUEUED  # the monitor is busy: the rest need only be queued


class JobsHeld:
    """Our mirror jobs paused across a checkpoint's ``stop`` (rule 5).

    hold() before the ``stop`` (the VM still runs: the round trips are not the
    pause's), release() once the ``stop`` has returned -- or, when it did not return
    in time, just before the ``cont``, which QEMU runs after the ``stop`` in any case.
    A paused write-blocking mirror still copies every guest write (QEMU's filter
    does not look at the pause); only its background loop waits, and with it the
    end of a job whose target failed: that end then runs after the drain.

    State (the checkpoint's thread): ``jobs`` -- those paused and not resumed yet.
    """

    def __init__(self, qmp: Qmp):
        self.qmp = qmp
        self.jobs: list[str] = []

    def hold(self, ids, timeout: float | None = None) -> None:
        self.jobs = pause_jobs(self.qmp, ids, timeout)

    def settle(self, stall_timeout: float | None) -> None:
        """Wait, with the VM still running, until every held job has reached its
        pause point (QEMU lists it ``standby`` or ``paused``): a mirror pauses only
        once its own copies in flight have ended (block/mirror.c, mirror_pause), so
        the ``stop`` that follows has none of them to wait for.  For a background
        mirror (the async mode) these are up to shipping.MIRROR_BUF per drive, which
        a slow link takes seconds to carry: waited for inside the ``stop``, with the
        vCPUs already paused, they held the VM (3.5 s at 256 KiB/s), waited for here
        they cost the guest nothing.  A job whose copies make no progress for
        ``stall_timeout`` (None: no bound) is a stalled secondary (SecondaryStalled,
        the jobs still held: the caller releases them)."""
        poll, last, progressed = SETTLE_POLL_FIRST, None, time.monotonic()
        while True:
            running = live_jobs(self.qmp)
            waiting = {j: running[j] for j in self.jobs
                       if j in running and running[j].get("status") not in PAUSED}
            if not waiting:
                return
            now = time.monotonic()
            copied = sum(info.get("offset", 0) for info in waiting.values())
            if last is None or copied != last:
                last, progressed = copied, now
            elif stall_timeout is not None and now - progressed > stall_timeout:
                raise SecondaryStalled(
                    f"the secondary stalled: the copies in flight of "
                    f"{', '.join(sorted(waiting))} did not move in {stall_timeout:g} s "
                    "(the VM was not paused)")
            time.sleep(poll)  # polling QEMU's job states, bounded by the progress deadline
            poll = min(SETTLE_POLL_MAX, poll * 1.5)

    def release(self, timeout: float | None = None) -> None:
        jobs, self.jobs = self.jobs, []
        if jobs and not self.qmp.gone:
            try:
                resume_jobs(self.qmp, jobs, timeout)
            except PrimaryGone:
                pass


def cancel_job(qmp: Qmp, job: str, force: bool) -> str | None:
    """``block-job-cancel`` one job; None if it was cancelled or had ended already,
    else QEMU's refusal.  Rule 1 is the caller's (end_jobs holds the VM)."""
    try:
        qmp.cmd("block-job-cancel", device=job, **({"force": True} if force else {}))
    except QmpCommandError as e:
        # DeviceNotActive: it ended meanwhile (failed); GenericError "not found": gone
        if e.qmp_class == "DeviceNotActive" or "not found" in e.desc:
            return None
        return e.desc
    return None


def end_jobs(qmp: Qmp, ids, force: bool = False, watchdog=None,
             timeout: float = CANCEL_TIMEOUT) -> list[str]:
    """Cancel our jobs ``ids`` that QEMU still lists and wait until it lists none of
    them (rule 2); returns problems.

    Without ``force`` a READY mirror first copies what is still dirty (it ends
    cleanly, the VM goes on using its own disk).  A forced cancel of a mirror, and
    any cancel of one not READY yet (QEMU forces those), happens with the VM paused
    (rule 1); ``watchdog`` is told about that pause.  A job that does not end within
    ``timeout`` (a target that no longer answers) is then force-cancelled the same
    way; one that still does not go is a problem."""
    problems: list[str] = []
    start = qmp.cursor
    running = live_jobs(qmp)
    live = set(running) & set(ids)
    still = HeldStill(qmp, watchdog)
    try:
        # (QEMU cancels a mirror that is not READY yet as if forced)
        still.hold(live if force else {j for j in live if not running[j].get("ready")},
                   running)
        for j in sorted(live):
            problem = cancel_job(qmp, j, force)
            if problem:
                problems.append(problem)
        pending = set(live)
        deadline = time.monotonic() + timeout
        cursor = start
        while pending and not qmp.gone:
            ev, cursor = qmp.wait_event(
                lambda e: e.get("event") in JOB_END_EVENTS and
                (e.get("data") or {}).get("device") in pending, cursor,
                max(0.0, deadline - time.monotonic()))
            if ev is not None:
                pending.discard(ev["data"]["device"])
                continue
            pending &= set(live_jobs(qmp))  # ended without an event we saw (refused)
            if pending and time.monotonic() >= deadline:
                still.hold(pending, live_jobs(qmp))
                for j in sorted(pending):  # a target that no longer answers: force it
                    cancel_job(qmp, j, force=True)
                break
        # an end event comes before QEMU's cleanup is over: wait until it lists none
        left = wait_gone(qmp, live)
        if left:
            problems.append(f"job(s) {', '.join(sorted(left))} did not end")
    finally:
        still.release()
    return problems


def wait_gone(qmp: Qmp, ids, timeout: float = HOLD_TIMEOUT) -> set:
    """Wait (bounded) until the jobs ``ids`` are gone from query-block-jobs; those left."""
    deadline = time.monotonic() + timeout
    while True:
        if qmp.gone:
            return set()
        left = set(ids) & set(live_jobs(qmp))
        if not left or time.monotonic() >= deadline:
            return left
        qmp.wait_event(lambda e: e.get("event") in JOB_END_EVENTS + ("JOB_STATUS_CHANGE",),
                       qmp.cursor, 0.05)


def bitmap_busy(qmp: Qmp, node: str, name: str) -> bool | None:
    """Is bitmap ``name`` on ``node`` in use by a job or an export?  None: no such bitmap."""
    for n in qmp.cmd("query-named-block-nodes"):
        if n.get("node-name") == node:
            for b in n.get("dirty-bitmaps") or []:
                if b.get("name") == name:
                    return bool(b.get("busy")) or b.get("status") in ("frozen", "locked")
    return None


def remove_bitmap(qmp: Qmp, node: str, name: str) -> bool:
    """``block-dirty-bitmap-remove`` if the bitmap is there and idle (rule 3); True if
    it is gone now.  A busy one is left for its owner's end (QEMU would refuse it)."""
    busy = bitmap_busy(qmp, node, name)
    if busy is None:
        return True
    if busy:
        return False
    try:
        qmp.cmd("block-dirty-bitmap-remove", node=node, name=name)
    except QmpCommandError:  # gone meanwhile
        return bitmap_busy(qmp, node, name) is None
    return True


def delete_nodes(qmp: Qmp, nodes, jobs=()) -> list[str]:
    """``blockdev-del`` the nodes ``nodes`` that QEMU still has (rule 4: after our
    ``jobs`` are gone -- the caller ended them; one still listed is a problem and
    its nodes stay).  Returns problems."""
    alive = set(jobs) & set(live_jobs(qmp))
    if alive:
        return [f"not removing node(s) {', '.join(sorted(nodes))}: job(s) "
                f"{', '.join(sorted(alive))} still running"]
    present = {n.get("node-name") for n in qmp.cmd("query-named-block-nodes")}
    problems = []
    for node in nodes:
        if node in present:
            try:
                qmp.cmd("blockdev-del", **{"node-name": node})
            except QmpCommandError as e:
                problems.append(e.desc)
    return problems
