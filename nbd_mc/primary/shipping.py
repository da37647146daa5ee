"""``protect --mode async``: guest writes complete at local-disk speed; what each
epoch wrote reaches the secondary in the background, and the epoch commits once
it is all there, as one point in time.

How (the choice and its measurements are in docs/async.md):

* per drive a ``blockdev-mirror copy-mode=background`` (not write-blocking) into
  the secondary's writer export: a guest write completes once QEMU's own disk
  has it; the mirror job copies dirty clusters to the secondary continuously,
  while the VM runs, so most of an epoch has crossed the link before its
  checkpoint;
* the checkpoint is the sync mode's (checkpoint.py: stop, drained, commit, cont)
  with another meaning of "drained" (``drain``): with the VM stopped no guest
  write comes in, and the mirror copies what is left -- the tail written in the
  last round trip.  The secondary then holds exactly the disk of the instant of
  the stop; the secondary's undo (unchanged) rolls back whatever of a later
  epoch arrives before its commit, so the secondary never commits a mix of two
  epochs;
* before it pauses the VM, protect looks at the backlog (``Shipper.decide``):
  if it would take longer than PAUSE_TARGET to cross, the epoch is *extended*
  (no checkpoint this interval: the VM runs on, the mirror ships, the committed
  epoch trails a little more) -- unless the lag would then pass ``--max-lag``:
  then protect applies *back-pressure* (``Shipper.press``): it takes the
  checkpoint anyway, and again after a short gap instead of the interval, so
  the VM runs in short slices between pauses in which the mirror ships with no
  new guest write coming in -- the guest is slowed towards the link's pace
  instead of the data at risk growing without bound, and no pause is longer
  than any other checkpoint's;
* any checkpoint whose drain is not over by the pause's deadline (a slice of
  back-pressure, or a "go" whose guest wrote more between the look and the
  ``stop``: a few QMP round trips, seconds on a loaded host) *gives way*
  (``drain``'s ``give_way_at``): no commit, the VM continues, the epoch goes on.
  The vCPUs never wait for the link longer than that deadline.

"Drained", precisely (found by measurement on QEMU 7.2, block/mirror.c): a
READY mirror that has nothing to copy sleeps up to 100 ms (BLOCK_JOB_SLICE_TIME)
and updates its progress counters only when it wakes, so ``len == offset`` in
``query-block-jobs`` may be seconds-old news while the job's dirty bitmap holds
fresh guest writes.  The bitmap (anonymous, on the mirror's filter node, which we
name with ``filter-node-name``) is the truth for what is not yet copied; the
counters cover what is copied but not yet acknowledged (bits are cleared when a
copy starts, and ``len`` already counts them then).  Both zero, with the VM
stopped: everything is on the secondary.  To save the sleep, the drain wakes the
job with ``block-job-set-speed`` (QEMU re-enters a job sleeping on its timer
when its speed is raised; we raise it by one byte and set it back).

A background mirror's data in flight is bounded by its ``buf-size``
(MIRROR_BUF).  QEMU's ``stop`` waits for a job's requests in flight (it drains
block jobs too), so the checkpoint first pauses the jobs and waits, with the VM
still running, until they are at their pause point with nothing in flight
(lifecycle.JobsHeld.settle); the ``stop`` then has only local writes to drain.
On a slow link that wait is seconds (up to about twice MIRROR_BUF per drive
over the link's rate) during which the guest runs and writes: it is what
weakens back-pressure there (docs/async.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..units import human_size
from .errors import QmpCommandError, SecondaryFailed, SecondaryStalled
from .lifecycle import JobsHeld
from .mirrors import Mirrors, cancel_mirrors, jobs
from .options import NODE_PREFIX, DriveSpec
from .qmp import Qmp

#: Data a background mirror may have in flight (its buf-size): bounds how long a
#: checkpoint waits, the VM running, for the job's copies on a slow link (and the
#: window of data on its way: a round trip of 20 ms caps a job near 50 MiB/s).
MIRROR_BUF = 1 << 20
#: The background mirror's dirty-bitmap granularity: a 4 KiB guest write ships 4 KiB
#: (QEMU's default for an NBD target, 64 KiB, shipped 16 times what a 4 KiB random
#: writer wrote: measured in bench/asynclink.py).  The bitmap costs QEMU one bit per
#: 4 KiB: 32 MiB of memory for a 1 TiB disk.
MIRROR_GRANULARITY = 4096
#: A checkpoint is taken when the backlog crosses in about this long (or is this small).
PAUSE_TARGET = 0.05
PAUSE_BYTES = 256 << 10
#: Polling the backlog with the VM stopped: from DRAIN_POLL_FIRST, growing to DRAIN_POLL_MAX.
DRAIN_POLL_FIRST = 0.001
DRAIN_POLL_MAX = 0.02
#: Weight of the newest throughput sample.
EWMA = 0.3
#: Back-pressure (--max-lag reached): the VM runs this long between two of its
#: paused slices at first; the gap halves while the backlog does not shrink from
#: one slice to the next (down to SLICE_GAP_MIN) and grows by half when it does
#: (up to the checkpoint interval).
SLICE_GAP_FIRST = 0.1
SLICE_GAP_MIN = 0.01
#: Back-pressure is said to be losing when the lag reaches this many times --max-lag.
OUTRUN = 2.0
#: A sync=none mirror is ready at once; bound the wait anyway.
READY_TIMEOUT = 30.0


def filter_node(d: DriveSpec) -> str:
    """The name we give the mirror's filter node (where its dirty bitmap lives)."""
    return f"{NODE_PREFIX}top-{d.drive}"


def start_background(qmp: Qmp, drives: list[DriveSpec], sync: str = "full",
                     speed: int = 0) -> None:
    """One background mirror per drive: sync=full for the initial sync, sync=none
    once the secondary holds the disk."""
    for d in drives:
        args = {"job-id": d.job, "device": d.source, "target": d.node, "sync": sync,
                "copy-mode": "background", "on-target-error": "report",
                "buf-size": MIRROR_BUF, "granularity": MIRROR_GRANULARITY,
                "filter-node-name": filter_node(d)}
        if speed:
            args["speed"] = speed
        qmp.cmd("blockdev-mirror", **args)


@dataclass
class Backlog:
    dirty: int = 0  # marked in the mirrors' dirty bitmaps: not copied yet
    copying: int = 0  # counted by the jobs as still to copy (includes copies in flight)
    copied: int = 0  # the jobs' offsets (bytes copied so far, all jobs)
    problem: str | None = None  # a job missing, not ready, or with an I/O error

    @property
    def left(self) -> int:
        return self.dirty + self.copying


def backlog(qmp: Qmp, drives: list[DriveSpec]) -> Backlog:
    """What the background mirrors have not yet put on the secondary."""
    b = Backlog()
    tops = {filter_node(d) for d in drives}
    for n in qmp.cmd("query-named-block-nodes"):
        if n.get("node-name") in tops:
            b.dirty += sum(bm.get("count", 0) for bm in n.get("dirty-bitmaps") or []
                           if not bm.get("name"))
    js = jobs(qmp)
    for d in drives:
        info = js.get(d.job)
        if info is None:
            b.problem = b.problem or f"mirror {d.job} is gone"
            continue
        if info.get("io-status", "ok") != "ok":
            b.problem = b.problem or f"mirror {d.job}: I/O status {info['io-status']}"
        elif not info.get("ready"):
            b.problem = b.problem or f"mirror {d.job} is {info.get('status')}, not ready"
        b.copying += info["len"] - info["offset"]
        b.copied += info["offset"]
    return b


def kick(qmp: Qmp, drives: list[DriveSpec]) -> None:
    """Wake the mirror jobs from their idle sleep (see the module docstring)."""
    js = jobs(qmp)
    for d in drives:
        info = js.get(d.job)
        if info is None:
            continue
        speed = info.get("speed", 0)
        try:
            qmp.cmd("block-job-set-speed", device=d.job, speed=speed + 1 if speed else 0)
            if speed:
                qmp.cmd("block-job-set-speed", device=d.job, speed=speed)
        except QmpCommandError:  # ended meanwhile: check() says why
            pass


def drain(qmp: Qmp, mirrors: Mirrors, stall_timeout: float,
          give_way_at: float | None = None) -> Backlog:
    """With the VM stopped: wait until the background mirrors have put everything
    on the secondary (the Backlog returned is empty).  With ``give_way_at`` (a
    time.monotonic() instant: the pause's deadline) it returns the backlog still
    left at that instant instead of waiting on: the checkpoint gives way.
    Without it (the VM was not running: no pause to bound) it waits as long as
    the copy progresses; no progress for ``stall_timeout`` is a stalled
    secondary."""
    kick(qmp, mirrors.drives)
    poll = DRAIN_POLL_FIRST
    last, progressed = None, time.monotonic()
    while True:
        mirrors.check()
        b = backlog(qmp, mirrors.drives)
        if b.problem:
            raise SecondaryFailed(b.problem)
        if b.left == 0:
            return b
        now = time.monotonic()
        if give_way_at is not None and now >= give_way_at:
            return b
        if last is None or b.copied > last.copied or b.left < last.left:
            progressed = now
        elif now - progressed > stall_timeout:
            raise SecondaryStalled(f"the secondary stalled: {human_size(b.left)} did not "
                                   f"move in {stall_timeout:g} s with the VM paused")
        last = b
        time.sleep(poll)  # polling QEMU's counters, bounded by the progress deadline
        poll = min(DRAIN_POLL_MAX, poll * 1.5)


def to_background(qmp: Qmp, mirrors: Mirrors, speed: int, stall_timeout: float,
                  watchdog=None) -> Mirrors:
    """Replace the write-blocking mirrors a resync ends with (resync.py) by
    background ones, with the VM paused for the moment of the swap (nothing is
    written between the old job's end and the new one's start, so the secondary
    stays in step).  QEMU 7.2 cannot change a mirror's copy mode in place
    (``block-job-change`` is 8.2+ and goes the other way)."""
    from .checkpoint import _stop, resume, vm_running
    running = vm_running(qmp, stall_timeout)
    if running and watchdog:
        watchdog.pausing()
    held = JobsHeld(qmp)  # lifecycle rule 5: no job ends inside the ``stop``
    try:
        if running:
            held.hold(mirrors.ids, stall_timeout)
            _stop(qmp, mirrors, stall_timeout, held)
        mirrors.wait_drained()
        problems = cancel_mirrors(qmp, mirrors)
        if problems:
            raise SecondaryFailed("cannot end the resync's write-blocking mirror: "
                                  + "; ".join(problems))
        new = Mirrors(qmp, mirrors.drives)
        try:
            start_background(qmp, mirrors.drives, "none", speed)
        except QmpCommandError as e:
            raise SecondaryFailed(f"cannot start the background mirror: {e.desc}") from None
        if not new.wait_ready(timeout=READY_TIMEOUT):
            raise SecondaryFailed("the background mirror did not become ready")
        return new
    finally:
        if running:
            resume(qmp, stall_timeout, mirrors.drives, held)
            if watchdog:
                watchdog.resumed()


@dataclass
class Decision:
    action: str  # "go" | "extend" | "force"
    backlog: Backlog
    lag: float  # seconds since the stop of the last committed checkpoint
    eta: float  # seconds the backlog takes at the measured throughput (inf: unknown)


@dataclass
class Shipper:
    """The async mode's bookkeeping between checkpoints.

    State (protect's one thread): ``cut_at`` -- monotonic instant of the stop of
    the last committed checkpoint (the committed epoch is the disk of that
    instant; None before the first commit of a sync); ``throughput`` -- bytes/s
    the mirrors moved while they had a backlog (EWMA), None until measured;
    ``last`` -- the previous (instant, Backlog) sample; ``lags`` -- the lag at
    every look (for the report); ``extended``/``forced`` -- counts;
    ``behind`` -- an episode of extending is going on (one console line each);
    ``action`` -- the last decision (any checkpoint may give way: ``drain``);
    ``pressing`` -- a back-pressure episode is going on (from the first "force"
    to the next commit); ``gap`` -- how long the VM runs between two of its
    paused slices meanwhile; ``slice_left`` -- the backlog the last slice left
    (None: no slice yet); ``slices`` -- paused slices that gave way in all;
    ``outrun`` -- this episode was said to be losing (``outrunning``).
    """

    max_lag: float | None
    cut_at: float | None = None
    throughput: float | None = None
    last: tuple | None = None
    lags: list = field(default_factory=list)
    extended: int = 0
    forced: int = 0
    behind: bool = False
    action: str | None = None
    pressing: bool = False
    gap: float = SLICE_GAP_FIRST
    slice_left: int | None = None
    slices: int = 0
    outrun: bool = False

    def lag(self, now: float | None = None) -> float:
        if self.cut_at is None:
            return 0.0
        return (now or time.monotonic()) - self.cut_at

    def decide(self, qmp: Qmp, drives: list[DriveSpec]) -> Decision:
        """Checkpoint now ("go"), not yet ("extend"), or now although the backlog
        is large ("force": the lag would pass --max-lag)."""
        now = time.monotonic()
        b = backlog(qmp, drives)
        if self.last is not None:
            t, prev = self.last
            if prev.left > 0 and now > t and b.copied >= prev.copied:
                sample = (b.copied - prev.copied) / (now - t)
                self.throughput = sample if self.throughput is None else \
                    EWMA * sample + (1 - EWMA) * self.throughput
        self.last = (now, b)
        lag = self.lag(now)
        self.lags.append(lag)
        if b.left <= PAUSE_BYTES:
            eta = 0.0
        elif self.throughput:
            eta = b.left / self.throughput
        else:
            eta = float("inf")
        self.action = "go"
        if b.problem or eta <= PAUSE_TARGET:
            return Decision("go", b, lag, eta)  # (a problem: the checkpoint says what)
        known = 0.0 if eta == float("inf") else eta
        if self.max_lag is not None and self.cut_at is not None and \
                lag + known >= self.max_lag:
            self.forced += 1
            self.action = "force"
            return Decision("force", b, lag, eta)
        self.action = "extend"
        self.extended += 1
        if b.dirty:  # the job may be in its idle sleep with writes waiting: start them
            kick(qmp, drives)
        return Decision("extend", b, lag, eta)

    def press(self) -> bool:
        """A "force": back-pressure.  True if that starts an episode.

        Back-pressure slows the guest to the link's pace without ever holding the
        VM paused longer than a checkpoint's deadline: each forced checkpoint
        drains for at most that long and then gives way like any other, and the
        next one follows after ``gap`` instead of the interval -- the VM runs in
        short slices between pauses of the link's work, like migration's
        auto-converge throttles the vCPUs.  The episode ends at the next commit."""
        if self.pressing:
            return False
        self.pressing, self.gap, self.slice_left = True, SLICE_GAP_FIRST, None
        self.outrun = False
        return True

    def outrunning(self, lag: float) -> bool:
        """True, once per episode, when back-pressure is not holding the bound:
        the lag has reached OUTRUN times --max-lag.  Between two pauses the VM
        runs for the gap, protect's look and set-up, and the wait for the
        mirrors' copies in flight (lifecycle.JobsHeld.settle: seconds on a very
        slow link); a guest that writes faster than the link carries in that time
        outruns the pauses (docs/async.md)."""
        if not self.pressing or self.outrun or self.max_lag is None or \
                lag < OUTRUN * self.max_lag:
            return False
        self.outrun = True
        return True

    def gave_way(self, left: int, interval: float) -> None:
        """A checkpoint's drain was not over by the pause's deadline (``left``
        bytes still to ship): it gave way, the epoch goes on.  Outside
        back-pressure that is an extension; under it, a paused slice, and the gap
        before the next one adapts to whether the backlog shrank."""
        if not self.pressing:
            self.extended += 1
            return
        self.slices += 1
        if self.slice_left is not None:
            if left >= self.slice_left:
                self.gap = max(SLICE_GAP_MIN, self.gap / 2)
            else:
                self.gap = min(interval, self.gap * 1.5)
        self.slice_left = left

    def wait(self, interval: float) -> float:
        """Seconds until the next look: the interval, or a slice's gap."""
        return min(interval, self.gap) if self.pressing else interval

    def committed(self, cut_at: float) -> None:
        self.cut_at = cut_at
        self.pressing = False

    def reset(self) -> None:
        """A sync ended: the secondary is in step as of now (the lag counts from
        here: before, it was unprotected, which the report counts apart)."""
        self.cut_at = time.monotonic()
        self.last = None
        self.behind = False
        self.pressing = False
