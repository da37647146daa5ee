"""Workload 7: a real QEMU blockdev-mirror sync=full onto a server; time to READY.

QEMU runs with no guest (-machine none), the source image as block backend
drive0, and QMP on a unix socket driven with the qemu.qmp library. The NBD target
is added with blockdev-add and the mirror started in write-blocking mode, as
nbd-mc protect does; the clock runs from the blockdev-mirror command to the
BLOCK_JOB_READY event. The job is then cancelled (after READY that is a clean
completion) and QEMU quits.
"""

import asyncio
import subprocess
import time
from pathlib import Path

from qemu.qmp import QMPClient

from . import util


async def _mirror(qmp_path, nbd_sock, timeout):
    qmp = QMPClient("bench")
    await qmp.connect(str(qmp_path))
    try:
        await qmp.execute("blockdev-add", {
            "driver": "nbd", "node-name": "tgt",
            "server": {"type": "unix", "path": str(nbd_sock)}})
        with qmp.listener() as events:
            t0 = time.monotonic()
            await qmp.execute("blockdev-mirror", {
                "device": "drive0", "target": "tgt", "sync": "full",
                "job-id": "m0", "copy-mode": "write-blocking"})

            async def ready():
                async for ev in events:
                    name = ev["event"]
                    data = ev.get("data", {})
                    if name == "BLOCK_JOB_READY" and data.get("device") == "m0":
                        return time.monotonic() - t0
                    if name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR") and \
                            data.get("device") == "m0":
                        raise RuntimeError(f"mirror failed: {ev}")
            seconds = await asyncio.wait_for(ready(), timeout)
            jobs = await qmp.execute("query-block-jobs")
            length = jobs[0]["len"] if jobs else None
            await qmp.execute("block-job-cancel", {"device": "m0"})
            try:
                async def gone():
                    async for ev in events:
                        if ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                            return
                await asyncio.wait_for(gone(), 60)
            except asyncio.TimeoutError:
                pass
        await qmp.execute("quit")
        return seconds, length
    finally:
        try:
            await qmp.disconnect()
        except Exception:
            pass


def mirror_to_ready(workdir, source_image, nbd_sock, timeout=600):
    """Seconds from blockdev-mirror to BLOCK_JOB_READY, and the job length."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    qmp_path = workdir / "qmp.sock"
    if qmp_path.exists():
        qmp_path.unlink()
    log = open(workdir / "qemu.log", "w")
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{qmp_path},server=on,wait=off",
         "-drive", f"if=none,id=drive0,node-name=disk0,file={source_image},format=raw"],
        stdout=log, stderr=subprocess.STDOUT, env=util.env())
    try:
        util.wait_for(lambda: proc.poll() is None and util.unix_connectable(qmp_path),
                      30, "QEMU QMP socket")
        return asyncio.run(_mirror(qmp_path, nbd_sock, timeout))
    finally:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class MirrorPrimary:
    """A qemu-storage-daemon "primary": its disk exported over NBD for fio (the
    guest), and mirrored with ``blockdev-mirror copy-mode=write-blocking`` onto
    an NBD target, as ``nbd-mc protect`` sets QEMU up.

    Every write fio makes completes only once the target has it, so fio's
    latency is what a protected guest feels.  The mirror runs ``sync=none``:
    source and target start as byte-identical copies of the same template, so
    the initial full copy (workload 7's subject) is skipped and every byte the
    target receives is a guest write.

    State: ``proc`` (the daemon) and ``qmp`` (a synchronous QMP connection) are
    set by start() and cleared by stop(); one thread drives an instance.
    """

    def __init__(self, workdir, label):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.label = label
        self.sock = self.workdir / "primary.sock"
        self.qmp_path = self.workdir / "primary-qmp.sock"
        self.logfile = self.workdir / "primary.log"
        self.proc = None
        self.qmp = None

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def start(self, source_image, target_sock, timeout=60):
        from qemu.qmp.legacy import QEMUMonitorProtocol
        for p in (self.sock, self.qmp_path):
            if p.exists():
                p.unlink()
        self.log = open(self.logfile, "w")
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,filename={source_image},node-name=pf",
             "--blockdev", "driver=raw,file=pf,node-name=src",
             "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
             "--export", "type=nbd,id=e0,node-name=src,writable=on,name=",
             "--chardev", f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
             "--monitor", "chardev=qmp0"],
            stdout=self.log, stderr=subprocess.STDOUT, env=util.env())
        util.wait_for(lambda: self.proc.poll() is None and util.unix_connectable(self.qmp_path)
                      and util.unix_connectable(self.sock), 30, "primary qsd sockets")
        self.qmp = QEMUMonitorProtocol(str(self.qmp_path))
        self.qmp.connect()
        self.qmp.settimeout(timeout)
        self._cmd("blockdev-add", {"driver": "nbd", "node-name": "tgt",
                                   "server": {"type": "unix", "path": str(target_sock)}})
        self._cmd("blockdev-mirror", {"device": "src", "target": "tgt", "sync": "none",
                                      "job-id": "m0", "copy-mode": "write-blocking"})
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("mirror never became ready")
            ev = self.qmp.pull_event(wait=left)
            if ev is None:
                continue
            data = ev.get("data", {})
            if ev["event"] == "BLOCK_JOB_READY" and data.get("device") == "m0":
                return
            if ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR") and \
                    data.get("device") == "m0":
                raise RuntimeError(f"mirror failed: {ev}")

    def _cmd(self, name, args=None):
        r = self.qmp.cmd_raw(name, args)
        if "error" in r:
            raise RuntimeError(f"QMP {name}: {r['error'].get('desc')}")
        return r.get("return")

    def job(self):
        """The mirror job as query-block-jobs shows it (None once it is gone)."""
        jobs = self._cmd("query-block-jobs")
        return next((j for j in jobs if j.get("device") == "m0"), None)

    def stop(self):
        if self.qmp is not None:
            try:
                self._cmd("quit")
            except Exception:
                pass
            try:
                self.qmp.close()
            except Exception:
                pass
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self.log.close()
        for p in (self.sock, self.qmp_path):
            if p.exists():
                p.unlink()
