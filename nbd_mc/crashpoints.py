"""Named points where a crash test can kill -9 the process, deterministically.

``NBD_MC_CRASHPOINT=NAME[:N]`` makes the process SIGKILL itself the N-th time
(default 1) it reaches point NAME; NAME ``*`` counts every point, so a test can
sweep "the 1st, 2nd, ... state change" without knowing their names.  Unset (the
normal case) a point costs one global lookup: callers test ``ARMED`` first.

``NBD_MC_CRASHPOINT_MARK=PATH``: just before the kill, the point's name is
appended to PATH (a file outside the state directory), so a test knows that a
process which died (even in `serve`'s start, before it answered anything) died by
its crash point, and at which one under ``*``.
"""

import os
import signal

_spec = os.environ.get("NBD_MC_CRASHPOINT", "")
_mark = os.environ.get("NBD_MC_CRASHPOINT_MARK", "")
_name, _, _count = _spec.partition(":")
ARMED = bool(_name)
_target = int(_count or 1) if ARMED else 0
_hits = 0

#: Every point, in the order a write + commit + rollback passes them.
POINTS = (
    "preserve.before-data", "preserve.before-l2", "preserve.before-l1",
    "write.before-image", "write.after-image", "zero.before-image",
    "commit.before-state", "commit.after-state", "commit.between-disks",
    "drop.after-l1", "drop.before-epoch",
    "apply.after-run", "rollback.after-apply", "rollback.between-disks",
    "failover.after-fence", "failover.before-promote",
    "recover.after-apply",
    # history (serve --history): retaining a commit, expiry, failover --to-epoch
    "history.after-create", "history.after-rebase", "history.before-unlink",
    "history.rewind-after-layer", "rewind.after-apply",
)


def reached(name: str) -> None:
    global _hits
    if _name != "*" and name != _name:
        return
    _hits += 1
    if _hits >= _target:
        if _mark:
            fd = os.open(_mark, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, f"{name}\n".encode())
            finally:
                os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
