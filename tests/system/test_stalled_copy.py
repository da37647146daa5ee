"""A secondary whose writes never complete while its control channel still answers
(its disk hung in the kernel: an NFS server gone, a FUSE daemon blocked; a peer
that keeps its connection and never replies): the copies protect waits on give
way after their stall bound instead of holding protect for ever.

Found by the guest-harm soak: a resync round's backup job waited on a write hung
in the secondary's replica file system, and protect waited on the job with no
bound (no commit, no outage, no retry: protection silently gone).  The target
here is a real nbdkit whose delay filter holds every write for ten minutes; the
jobs are QEMU's real blockdev-backup (a resync round) and blockdev-mirror (a full
sync); the waits are protect's own (resync._wait_jobs, Mirrors.wait_ready).
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from nbd_mc.primary.errors import SecondaryStalled
from nbd_mc.primary.lifecycle import live_jobs
from nbd_mc.primary.mirrors import Mirrors, drop, start_mirrors
from nbd_mc.primary.options import DriveSpec
from nbd_mc.primary.resync import _end_jobs, _wait_jobs, backup_job, round_stall
from support.servers import wait_until

pytestmark = pytest.mark.qemu

SIZE = 4 << 20
DRIVE = DriveSpec("drive0", "vda")


@contextlib.contextmanager
def hung_target(workdir: str):
    """An NBD server on a unix socket that takes every write and answers none of
    them for ten minutes (nbdkit's delay filter); reads and the handshake work."""
    sock = os.path.join(workdir, "hung.sock")
    pidfile = os.path.join(workdir, "hung.pid")
    proc = subprocess.Popen(["nbdkit", "-f", "-U", sock, "-P", pidfile, "--filter=delay",
                             "memory", str(SIZE), "delay-write=600"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the pid file, not the socket: nbdkit writes it once it listens (the socket's
        # file exists a moment before: a connect then is refused)
        wait_until(lambda: os.path.exists(pidfile) and os.path.getsize(pidfile)
                   or proc.poll() is not None, "nbdkit's pid file")
        assert proc.poll() is None, "nbdkit did not start"
        yield sock
    finally:
        proc.kill()
        proc.wait(30)


def _vm_on_a_hung_target(workdir, qemu_vms):
    img = os.path.join(workdir, "d.raw")
    with open(img, "wb") as f:
        f.write(os.urandom(SIZE))  # data: every cluster has something to copy
    vm = qemu_vms(workdir, {DRIVE.drive: img})
    return vm


def test_a_resync_round_that_copies_nothing_gives_way(workdir, qemu_vms):
    vm = _vm_on_a_hung_target(workdir, qemu_vms)
    with hung_target(workdir) as sock:
        vm.add_nbd(DRIVE.node, sock, "")
        job = backup_job(DRIVE)
        cursor = vm.qmp.cursor
        vm.qmp.cmd("blockdev-backup", **{"job-id": job, "device": DRIVE.source,
                                         "target": DRIVE.node, "sync": "full",
                                         "on-target-error": "report", "auto-dismiss": True})
        with pytest.raises(SecondaryStalled, match="a resync round copied nothing for 1 s"):
            _wait_jobs(vm.qmp, {job}, cursor, stall=1.0)
        # what the round's caller does next: its copy is cut off the secondary and ended
        _end_jobs(vm.qmp, [DRIVE], {job})
        assert job not in live_jobs(vm.qmp)
        assert vm.qmp.cmd("query-status")["status"] == "running"


def test_a_full_sync_that_copies_nothing_gives_way(workdir, qemu_vms):
    vm = _vm_on_a_hung_target(workdir, qemu_vms)
    with hung_target(workdir) as sock:
        vm.add_nbd(DRIVE.node, sock, "")
        mirrors = Mirrors(vm.qmp, [DRIVE])
        start_mirrors(vm.qmp, [DRIVE])
        with pytest.raises(SecondaryStalled, match="the sync copied nothing for 1 s"):
            mirrors.wait_ready(stall=1.0)
        # what protect does next (secondary lost): the mirror and its node go, the VM runs
        assert drop(vm.qmp, [DRIVE], hard=True) == []
        assert DRIVE.job not in live_jobs(vm.qmp)
        assert vm.qmp.cmd("query-status")["status"] == "running"


def test_the_stall_bound_follows_the_options():
    assert round_stall(None) == 10.0  # no --stall-timeout (a library caller)
    assert round_stall(2.5) == 2.5
    # --rate 64 KiB/s: a chunk of 1 MiB may take 16 s of its own
    assert round_stall(2.5, 64 << 10) == 2.5 + 16
