"""One checkpoint: stop -> mirrors drained -> [hook] -> commit epoch N -> cont.

The committed epoch N is exactly the disk as the stopped VM left it, because
``stop`` drains all I/O and a write-blocking mirror completes a guest write only
once the secondary has it.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

from ..control import ControlClient
from .bitmaps import Bitmaps
from .errors import PrimaryGone, QmpTimeout, SecondaryStalled
from .mirrors import Mirrors, yank
from .qmp import Qmp
from .secondary import commit

#: The VM stays stopped while the hook runs: a hung hook must not hang the VM.
HOOK_TIMEOUT = 60.0


@dataclass
class Checkpoint:
    epoch: int
    committed: bool
    pause: float  # seconds the VM was stopped (stop sent .. cont answered)
    skipped: str | None = None
    hook: float = 0.0  # seconds of that spent in the hook


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


def checkpoint(qmp: Qmp, ctl: ControlClient, mirrors: Mirrors, epoch: int,
               hook=None, bitmaps: Bitmaps | None = None, stall_timeout: float | None = None,
               watchdog=None, drain=None) -> Checkpoint:
    """stop -> drained -> [bitmap ``epoch`` starts] -> hook -> commit epoch -> cont.

    ``hook`` is a shell command (run_hook) or, for library users and tests, a
    callable(epoch) returning None to go on or a reason to skip the commit.
    The VM is continued whatever happens (unless it was not running to begin with:
    then protect has no business starting it).  A hook failure skips the commit;
    a secondary failure raises SecondaryFailed after the cont.

    ``stall_timeout`` bounds the ``stop``: it drains every guest write, and one
    stuck on a hung secondary would hold the VM (and QEMU's monitor) as long as
    the secondary hangs.  After it the NBD connections are yanked, the stuck
    writes fail on the secondary's side only, and SecondaryStalled is raised.
    ``watchdog`` (watchdog.py) is told when the VM is paused by us and resumed,
    so that a protect killed in between does not leave it paused.
    ``drain`` replaces ``mirrors.wait_drained`` (the async mode's background
    mirrors still copy after the stop: shipping.drain).
    """
    mirrors.check()
    try:
        was_running = vm_running(qmp, stall_timeout)
    except QmpTimeout:
        # QEMU's monitor itself waits, for a write to the secondary that does not
        # come back (a synchronous one holds the main loop): the same stall
        yank(qmp, mirrors.drives)
        raise SecondaryStalled(f"the secondary stalled: QEMU's monitor waited more than "
                               f"{stall_timeout:g} s; connections dropped") from None
    t0 = time.perf_counter()
    skipped = None
    hook_time = 0.0
    if watchdog and was_running:
        watchdog.pausing()
    try:
        if was_running:
            _stop(qmp, mirrors, stall_timeout)
        (drain or mirrors.wait_drained)()
        if bitmaps is not None:
            bitmaps.start_epoch(epoch)
        t_hook = time.perf_counter()
        if callable(hook):
            skipped = hook(epoch)
        elif hook:
            skipped = run_hook(hook, epoch)
        hook_time = time.perf_counter() - t_hook
        if not skipped:
            commit(ctl, epoch)
    finally:
        if was_running:
            resume(qmp, stall_timeout, mirrors.drives)
            if watchdog:
                watchdog.resumed()
    return Checkpoint(epoch, skipped is None, time.perf_counter() - t0, skipped, hook_time)


def _stop(qmp: Qmp, mirrors: Mirrors, stall_timeout: float | None) -> None:
    try:
        qmp.execute("stop", timeout=stall_timeout)
    except QmpTimeout:
        yank(qmp, mirrors.drives)
        raise SecondaryStalled(f"the secondary stalled: pausing the VM waited more than "
                               f"{stall_timeout:g} s for its writes; connections dropped") from None


def resume(qmp: Qmp, stall_timeout: float | None = None, drives=None) -> None:
    """cont, unless QEMU is gone (then there is nothing to resume).

    After a stalled ``stop`` QEMU answers once the stop is over; the cont waits
    behind it (QEMU runs monitor commands in order).  If the cont itself waits
    longer than ``stall_timeout`` (the monitor is held by I/O to a hung
    secondary), ``drives``' NBD connections are yanked and the cont waits on."""
    if qmp.gone:
        return
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
