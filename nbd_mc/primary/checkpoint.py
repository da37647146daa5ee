"""One checkpoint: stop -> mirrors drained -> [hook] -> commit epoch N -> cont.

The committed epoch N is exactly the disk as the stopped VM left it, because
``stop`` drains all I/O and a write-blocking mirror completes a guest write only
once the secondary has it.

The vCPUs never wait for the secondary: everything in the pause that waits on it
(the drain of guest writes in flight to it, the mirrors' counters, the commit
request) shares one deadline, PAUSE_DEADLINE after the ``stop`` was sent (plus
the time the checkpoint hook took: that part of the pause is the user's).  When it
passes, the checkpoint gives way: the NBD connections into the secondary are
yanked *before* the ``cont`` (so no write of the next epoch can reach a secondary
that may still act on a commit request it has not answered yet), the VM continues,
and SecondaryStalled makes protect count the secondary as lost and resync it from
the dirty bitmaps later.  An epoch commits only if the secondary acknowledged the
commit before the deadline; exactness of what is committed does not change.

In async mode (shipping.py) the drain waits for the background mirrors to put
the epoch's tail on the secondary; a checkpoint whose drain is not over gives
way at the same deadline without losing the secondary: no commit, the VM
continues, the epoch goes on (``Checkpoint.extended``).  The mirrors' own copies
in flight are waited for before the ``stop``, the VM running (JobsHeld.settle).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

from ..control import ControlClient
from .errors import PrimaryGone, QmpTimeout, SecondaryFailed, SecondaryStalled
from .lifecycle import JobsHeld
from .mirrors import Mirrors, yank
from .qmp import Qmp
from .secondary import commit
from .side import PrimarySide

#: The VM stays stopped while the hook runs: a hung hook must not hang the VM.
HOOK_TIMEOUT = 60.0
#: Seconds after ``stop`` by which whatever waits on the secondary inside the pause
#: (drain, mirror counters, commit) must be done; after it the checkpoint gives way.
#: What is left of the 1 s the VM may stay paused is for the yank, the end of the
#: drain it releases and the ``cont``.
PAUSE_DEADLINE = 0.5
#: Seconds the ``cont`` after a yank may take before protect yanks again (a request
#: sent after the first yank, or a write the yank could not release: over a unix
#: socket to a server that advertises large requests, nbd_mc/blocksize.py).
CONT_TIMEOUT = 2.0


@dataclass
class Checkpoint:
    epoch: int
    committed: bool
    pause: float  # seconds the VM was stopped (stop sent .. cont answered)
    skipped: str | None = None
    hook: float = 0.0  # seconds of that spent in the hook
    extended: int = 0  # async: bytes still to ship when the checkpoint gave way


def vm_running(qmp: Qmp, timeout: float | None = None) -> bool:
    return bool(qmp.execute("query-status", timeout=timeout).get("running"))


def run_hook(command: str, epoch: int, timeout: float = HOOK_TIMEOUT) -> str | None:
    """Run the checkpoint hook; None if it succeeded, else why the commit is skipped.

    Its own session, so a Ctrl-C meant for protect does not kill it halfway through
    the checkpoint protect promised to finish.
    """
    env = dict(os.environ, NBD_MC_EPOCH=str(epoch))
    try:
        r = subprocess.run(command, shell=True, env=env, stdin=subprocess.DEVNULL,
                           timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        return f"the checkpoint hook ran longer than {timeout:.0f} s"
    except OSError as e:
        return f"the checkpoint hook could not run: {e}"
    if r.returncode:
        return f"the checkpoint hook exited with status {r.returncode}"
    return None


def checkpoint(side: PrimarySide, ctl: ControlClient, mirrors: Mirrors, epoch: int,
               hook=None, drain=None) -> Checkpoint:
    """stop -> drained -> [bitmap ``epoch`` starts] -> hook -> commit epoch -> cont.

    ``hook`` is a shell command (run_hook) or, for library users and tests, a
    callable(epoch) returning None to go on or a reason to skip the commit.
    The VM is continued whatever happens (unless it was not running to begin with:
    then protect has no business starting it).  A hook failure skips the commit;
    a secondary failure raises SecondaryFailed after the cont.

    The pause waits on the secondary at most PAUSE_DEADLINE (module docstring):
    the ``stop`` drains every guest write, and one stuck on a hung secondary would
    hold the VM (and QEMU's monitor) as long as the secondary hangs.  After the
    deadline the NBD connections are yanked, the stuck writes fail on the
    secondary's side only, and SecondaryStalled is raised.  ``side.stall_timeout``
    bounds the waits outside the pause (the ``query-status`` before it).
    ``side.watchdog`` (watchdog.py) is told when the VM is paused by us and
    resumed, so that a protect killed in between does not leave it paused; bitmap
    ``epoch`` starts in ``side.bitmaps`` (none without them).
    ``drain`` replaces ``mirrors.wait_drained`` (the async mode's background
    mirrors still copy after the stop: shipping.drain): called with the pause's
    deadline (a time.monotonic() instant, None if the VM was not running), it
    returns the bytes still to ship if it gave way at that instant (0: drained);
    the checkpoint then neither starts a bitmap nor runs the hook nor commits.
    """
    qmp, bitmaps = side.qmp, side.bitmaps
    stall_timeout, watchdog = side.stall_timeout, side.watchdog
    mirrors.check()
    # the mirror jobs wait at a pause point across the ``stop``, so that one whose
    # target fails inside its drain ends after it (lifecycle rule 5: a QEMU 7.2 abort)
    held = JobsHeld(qmp)
    try:
        was_running = vm_running(qmp, stall_timeout)
        if was_running:
            held.hold(mirrors.ids, stall_timeout)
            if drain is not None:
                # async: the background mirrors' copies in flight end while the VM
                # still runs, not inside the ``stop`` (JobsHeld.settle)
                try:
                    held.settle(stall_timeout)
                except SecondaryStalled:
                    held.release(stall_timeout)
                    raise
    except QmpTimeout:
        # QEMU's monitor itself waits, for a write to the secondary that does not
        # come back (a synchronous one holds the main loop): the same stall (a job
        # held meanwhile is resumed by its cancel when the secondary is dropped)
        yank(qmp, mirrors.drives)
        raise SecondaryStalled(f"the secondary stalled: QEMU's monitor waited more than "
                               f"{stall_timeout:g} s; connections dropped") from None
    t0 = time.perf_counter()
    deadline = time.monotonic() + PAUSE_DEADLINE
    skipped = None
    hook_time = 0.0
    extended = 0
    cut = False  # the NBD connections were yanked before the cont
    if watchdog and was_running:
        watchdog.pausing()
    try:
        try:
            if drain is None:
                if was_running:
                    _stop(qmp, mirrors, _left(deadline), held)
                mirrors.wait_drained(timeout=_left(deadline))
            else:
                # async: the mirrors' copies in flight have ended before the ``stop``
                # (JobsHeld.settle above), then the epoch's last bytes cross the link
                # with the VM paused (shipping.drain) until the deadline, when the
                # checkpoint gives way (docs/async.md); the commit then has its own
                # PAUSE_DEADLINE
                t_drain = time.perf_counter()
                if was_running:
                    _stop(qmp, mirrors, stall_timeout, held)
                extended = drain(deadline if was_running else None)
                deadline += time.perf_counter() - t_drain
            if not extended:
                if bitmaps is not None:
                    bitmaps.start_epoch(epoch)
                t_hook = time.perf_counter()
                if callable(hook):
                    skipped = hook(epoch)
                elif hook:
                    skipped = run_hook(hook, epoch)
                hook_time = time.perf_counter() - t_hook
                deadline += hook_time  # the hook's time is the user's, not the secondary's
                if not skipped:
                    _commit(ctl, epoch, deadline)
        except SecondaryFailed:
            # the secondary is lost: before the VM runs on, nothing more may reach it
            # (it may still act on a commit it did not answer: see the module docstring)
            if was_running and not qmp.gone:
                yank(qmp, mirrors.drives)
                cut = True
            raise
    finally:
        if was_running:
            resume(qmp, CONT_TIMEOUT if cut else stall_timeout, mirrors.drives, held)
            if watchdog:
                watchdog.resumed()
    return Checkpoint(epoch, skipped is None and not extended, time.perf_counter() - t0,
                      skipped, hook_time, extended)


def _left(deadline: float) -> float:
    """Seconds to the pause's deadline (a little at least: a command is sent)."""
    return max(0.01, deadline - time.monotonic())


def _commit(ctl: ControlClient, epoch: int, deadline: float) -> None:
    """commit() with the VM paused, bounded by the pause's deadline.

    The control connection's socket timeout is its --stall-timeout; inside the pause
    the commit may wait only until the deadline.  A late reply closes the connection
    (ControlClient: a late reply would answer the next request), the outcome is then
    unknown, and both bitmaps N-1 and N are kept (bitmaps.py)."""
    sock = getattr(ctl, "_sock", None)
    saved = sock.gettimeout() if sock is not None else None
    try:
        if sock is not None:
            sock.settimeout(_left(deadline))
        try:
            commit(ctl, epoch)
        except SecondaryFailed as e:
            if time.monotonic() >= deadline:
                raise SecondaryStalled(f"the secondary did not acknowledge commit {epoch} "
                                       f"within the pause's {PAUSE_DEADLINE:g} s: the VM "
                                       "went on, the secondary is lost") from None
            raise e
    finally:
        if sock is not None and getattr(ctl, "_sock", None) is sock:
            sock.settimeout(saved)


def _stop(qmp: Qmp, mirrors: Mirrors, timeout: float, held: JobsHeld) -> None:
    """``stop`` drains the guest's writes in flight to the secondary; the vCPUs are
    already paused meanwhile, so it may wait only ``timeout`` (the pause's deadline).
    The jobs ``held`` across it are released once it has returned (a ``stop`` that
    did not return in time: by resume(), before the ``cont``)."""
    try:
        qmp.execute("stop", timeout=timeout)
        held.release()
    except QmpTimeout:
        yank(qmp, mirrors.drives)
        raise SecondaryStalled(f"the secondary stalled: pausing the VM waited more than "
                               f"{timeout:g} s for its writes; the VM went on and "
                               "the connections were dropped") from None


def resume(qmp: Qmp, stall_timeout: float | None = None, drives=None,
           held: JobsHeld | None = None) -> None:
    """cont, unless QEMU is gone (then there is nothing to resume); jobs still
    ``held`` are resumed first (queued behind a ``stop`` still draining).

    After a stalled ``stop`` QEMU answers once the stop is over; the cont waits
    behind it (QEMU runs monitor commands in order).  If the cont itself waits
    longer than ``stall_timeout`` (the monitor is held by I/O to a hung
    secondary), ``drives``' NBD connections are yanked and the cont waits on."""
    if qmp.gone:
        return
    if held is not None:
        held.release(CONT_TIMEOUT)
    try:
        try:
            qmp.execute("cont", timeout=stall_timeout)
        except QmpTimeout:
            if not drives:
                raise
            yank(qmp, drives)
            qmp.cmd("query-status")  # answered after the cont that is still queued
    except PrimaryGone:
        pass
