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
