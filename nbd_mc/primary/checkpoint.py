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
from .errors import PrimaryGone
from .mirrors import Mirrors
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


def vm_running(qmp: Qmp) -> bool:
    return bool(qmp.cmd("query-status").get("running"))


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
               hook=None) -> Checkpoint:
    """stop -> drained -> hook -> commit epoch -> cont.

    ``hook`` is a shell command (run_hook) or, for library users and tests, a
    callable(epoch) returning None to go on or a reason to skip the commit.
    The VM is continued whatever happens (unless it was not running to begin with:
    then protect has no business starting it).  A hook failure skips the commit;
    a secondary failure raises SecondaryFailed after the cont.
    """
    mirrors.check()
    was_running = vm_running(qmp)
    t0 = time.perf_counter()
    if was_running:
        qmp.cmd("stop")
    skipped = None
    hook_time = 0.0
    try:
        mirrors.wait_drained()
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
            resume(qmp)
    return Checkpoint(epoch, skipped is None, time.perf_counter() - t0, skipped, hook_time)


def resume(qmp: Qmp) -> None:
    """cont, unless QEMU is gone (then there is nothing to resume)."""
    if qmp.gone:
        return
    try:
        qmp.cmd("cont")
    except PrimaryGone:
        pass
