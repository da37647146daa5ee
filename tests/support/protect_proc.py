"""`nbd-mc protect` as a child process of a test: started with its output in files
(so a long run never blocks on a full pipe), collected when it exits, and killed
by the ``procs`` fixture if a test leaves it running."""

from __future__ import annotations

import os
import subprocess

import pytest

from support.servers import nbd_mc_argv, subprocess_env

DEADLINE = 60.0  # safety net for waits, never a synchronisation


def spawn_protect(procs: list, root: str, *args) -> subprocess.Popen:
    """`nbd-mc protect ARGS...`, stdout and stderr in ROOT/protect-N.{out,err}."""
    n = len(procs)
    out = open(os.path.join(root, f"protect-{n}.out"), "w+")
    err = open(os.path.join(root, f"protect-{n}.err"), "w+")
    proc = subprocess.Popen(nbd_mc_argv() + ["protect"] + [str(a) for a in args],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                            env=subprocess_env(), text=True)
    proc.out, proc.err = out, err
    procs.append(proc)
    return proc


def finished(proc: subprocess.Popen, timeout: float = DEADLINE) -> tuple[int, str, str]:
    """Wait for a spawned protect: its exit status, stdout and stderr."""
    rc = proc.wait(timeout)
    proc.out.seek(0)
    proc.err.seek(0)
    return rc, proc.out.read(), proc.err.read()


@pytest.fixture
def procs():
    made = []
    yield made
    for p in made:
        if p.poll() is None:
            p.kill()
        p.wait(30)
