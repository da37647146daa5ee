"""Real I/O faults for the fault tests, no mocks:

* ``Tmpfs``: a small tmpfs mounted under the test's directory (we are root), so a
  file system really fills up (ENOSPC from the kernel);
* ``Filler``: a file that takes every free block of a file system, and keeps
  taking what others give back, until it is removed;
* ``FaultyFile``: a regular file whose reads or writes fail with EIO on demand --
  nbdkit's file plugin behind its error filter (errors only while a trigger file
  exists), mounted as a file with nbdfuse.  The engine opens it like any image or
  overlay and gets the error from read()/write() itself.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess

from nbd_mc.statedir import INSIDE

from support.servers import pid_alive, read_file, wait_until

#: Files a run may rewrite without changing any data: the lock holder's pid, the
#: server's log and pid file.  Everything else must be byte-identical after a refusal.
RUNTIME_FILES = {INSIDE["lock"], INSIDE["log"], INSIDE["pidfile"]}


def file_hashes(*roots: str) -> dict:
    """sha256 of every regular file under each root (a directory or a file)."""
    out = {}
    for root in roots:
        if os.path.isfile(root):
            out[root] = hashlib.sha256(read_file(root)).hexdigest()
            continue
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                if name in RUNTIME_FILES or not os.path.isfile(path) or os.path.islink(path):
                    continue
                out[path] = hashlib.sha256(read_file(path)).hexdigest()
    return out


class Tmpfs:
    def __init__(self, path: str, size: str):
        self.path = path
        os.makedirs(path, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"mount -t tmpfs: {r.stderr}"

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def umount(self) -> None:
        if os.path.ismount(self.path):
            r = subprocess.run(["umount", self.path], capture_output=True, text=True)
            assert r.returncode == 0, f"umount {self.path}: {r.stderr}"


class Filler:
    """A file that holds every free block of its file system.

    ``fill`` takes what is free now and is cheap when nothing is: call it again
    while the file system must stay full, since others give space back (the undo
    overlay returns the clusters no recent epoch used, a state file is replaced).
    ``remove`` gives it all back.  fallocate takes the bulk at once; the last
    blocks are written one page at a time until the kernel says ENOSPC.
    """

    PAGE = 4096

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.size = 0

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self) -> None:
        free = self.free()
        if free <= 0:
            return
        try:
            os.posix_fallocate(self.fd, self.size, free)
            self.size += free
        except OSError:
            pass  # less than that is left (or no fallocate): page by page below
        page = b"\xf1" * self.PAGE
        while True:
            try:
                os.pwrite(self.fd, page, self.size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                return
            self.size += self.PAGE

    def remove(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if os.path.exists(self.path):
            os.unlink(self.path)


class FaultyFile:
    """``path`` reads/writes ``backing`` through FUSE; ``fail(True)`` makes every
    ``kind`` ("pread" or "pwrite") request fail with EIO until ``fail(False)``."""

    def __init__(self, root: str, name: str, backing: str, kind: str):
        self.root = root
        self.backing = backing
        self.sock = os.path.join(root, f"{name}.err.sock")
        self.pidfile = os.path.join(root, f"{name}.err.pid")
        self.trigger = os.path.join(root, f"{name}.fail")
        self.mnt = os.path.join(root, f"{name}.mnt")
        self.path = os.path.join(self.mnt, name)
        os.makedirs(self.mnt, exist_ok=True)
        subprocess.run(["nbdkit", "-U", self.sock, "-P", self.pidfile, "--filter=error", "file",
                        backing, "error=EIO", f"error-{kind}-rate=100%",
                        f"error-{kind}-file={self.trigger}"], check=True)
        wait_until(lambda: os.path.exists(self.pidfile) and read_file(self.pidfile).strip(),
                   "the error-injecting nbdkit")
        self.nbdkit_pid = int(read_file(self.pidfile))
        # nbdfuse says every failed request on its stderr: a file, never a pipe nobody
        # reads (a full pipe blocks nbdfuse, and with it every request on the mount:
        # the secondary's write hangs in the kernel, uninterruptibly)
        self.log = os.path.join(root, f"{name}.nbdfuse.log")
        with open(self.log, "ab") as log:
            self.fuse = subprocess.Popen(["nbdfuse", self.path, "--unix", self.sock],
                                         stdout=subprocess.DEVNULL, stderr=log)
        wait_until(lambda: os.path.ismount(self.mnt) and os.path.exists(self.path)
                   or self.fuse.poll() is not None, "nbdfuse to mount")
        assert self.fuse.poll() is None, \
            f"nbdfuse failed: {read_file(self.log).decode(errors='replace')}"

    def fail(self, on: bool) -> None:
        if on:
            open(self.trigger, "w").close()
        elif os.path.exists(self.trigger):
            os.unlink(self.trigger)

    def stop(self) -> None:
        self.fail(False)
        if os.path.ismount(self.mnt):
            if subprocess.run(["umount", self.mnt], capture_output=True).returncode != 0:
                # still open (a process left by a failed run): detach it all the same,
                # or the mount outlives the run
                subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        try:
            self.fuse.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.fuse.kill()
            self.fuse.wait()
        if pid_alive(self.nbdkit_pid):
            os.kill(self.nbdkit_pid, signal.SIGTERM)
            wait_until(lambda: not pid_alive(self.nbdkit_pid), "the error-injecting nbdkit to stop")
