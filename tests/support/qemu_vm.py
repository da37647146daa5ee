"""A primary QEMU without a guest (-machine none), for tests outside test_primary.py:
raw drives, one QMP socket for nbd-mc (``qmp_path``) and one for the test
(``qmp``, a primary.Qmp); HMP qemu-io plays the guest, its result lines go to
QEMU's stdout (captured in ``log``)."""

from __future__ import annotations

import os
import subprocess

import pytest

from nbd_mc import primary
from support.servers import read_file, wait_until


class QemuVM:
    def __init__(self, root: str, images: dict[str, str] | None = None, name: str = "vm",
                 drive_args: dict[str, str] | None = None, qmp_timeout: float = 60,
                 user: str | None = None):
        """``drive_args``: a whole -drive value for some drives (default: raw, if=none);
        ``user``: run QEMU as this user (as libvirt runs it as ``libvirt-qemu``)."""
        self.images = dict(images or {})
        self.qmp_timeout = qmp_timeout
        self.qmp_path = os.path.join(root, f"{name}.qmp")
        self.test_qmp_path = os.path.join(root, f"{name}-test.qmp")
        self.log = os.path.join(root, f"{name}.log")
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"] if user else []
        argv += ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                 "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                 "-qmp", f"unix:{self.test_qmp_path},server=on,wait=off"]
        for drive, path in self.images.items():
            spec = (drive_args or {}).get(drive) or f"if=none,id={drive},file={path},format=raw"
            argv += ["-drive", spec]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        try:
            self.qmp = wait_until(self._connect, "QEMU's QMP socket")
        except pytest.fail.Exception:
            # QEMU runs but never greeted (seen once on 10.0 in a full make test):
            # say where it was, and what it printed, before it goes
            where = self._where()
            self.proc.kill()
            self.proc.wait(30)
            pytest.fail(f"QEMU's QMP socket never greeted; QEMU was {where}; its output:\n"
                        f"{read_file(self.log).decode(errors='replace')[-4000:]}")
        except BaseException:  # not yet known to the fixture: don't leak the process
            self.proc.kill()
            self.proc.wait(30)
            raise

    def _where(self) -> str:
        """The QEMU process's state and, per thread, the kernel function it waits in."""
        out = []
        try:
            for tid in sorted(os.listdir(f"/proc/{self.proc.pid}/task")):
                base = f"/proc/{self.proc.pid}/task/{tid}"
                state = read_file(f"{base}/stat").decode().rsplit(")", 1)[1].split()[0]
                out.append(f"{tid}:{state}:{read_file(f'{base}/wchan').decode()}")
        except OSError as e:
            out.append(f"({e})")
        return " ".join(out)

    def _connect(self):
        if self.proc.poll() is not None:
            pytest.fail(f"QEMU exited: {read_file(self.log).decode(errors='replace')}")
        if not os.path.exists(self.test_qmp_path):
            return None
        try:
            return primary.Qmp(self.test_qmp_path, timeout=self.qmp_timeout)
        except primary.PrimaryGone:
            return None

    def add_nbd(self, node: str, sock: str, export: str, **extra) -> None:
        self.qmp.cmd("blockdev-add", **{"driver": "nbd", "node-name": node, "export": export,
                                        "server": {"type": "unix", "path": sock}, **extra})

    def qemu_io(self, target: str, command: str) -> str:
        """One qemu-io command on a drive or node; returns what it printed."""
        before = len(read_file(self.log))
        self.qmp.hmp(f'qemu-io {target} "{command}"')
        return read_file(self.log)[before:].decode(errors="replace")

    def close(self) -> None:
        self.qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def qemu_vms():
    made = []
    yield lambda *a, **kw: made.append(QemuVM(*a, **kw)) or made[-1]
    for vm in made:
        vm.close()
