"""Small helpers shared by the benchmark modules: processes, files, memory."""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from nbd_mc.secondary.launch import pid_alive  # noqa: F401  (re-exported for callers of this module)

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
MiB = 1 << 20
GiB = 1 << 30


def env():
    """Environment for every child: the venv and Debian's tools first."""
    e = dict(os.environ)
    e["PATH"] = f"{VENV_BIN}:/usr/bin:/bin:/usr/sbin:/sbin:" + e.get("PATH", "")
    return e


def run(cmd, check=True, timeout=None, **kw):
    return subprocess.run(cmd, check=check, env=env(), timeout=timeout,
                          stdout=kw.pop("stdout", subprocess.PIPE),
                          stderr=kw.pop("stderr", subprocess.PIPE), text=True, **kw)


def have(prog):
    return shutil.which(prog, path=env()["PATH"]) is not None


def wait_for(pred, timeout, what, interval=0.01):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def unix_connectable(path):
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def read_pid(pidfile):
    try:
        return int(Path(pidfile).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None




def kill_pid(pid, timeout=10.0):
    """SIGTERM one process we started, then SIGKILL if it lingers."""
    if not pid_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        wait_for(lambda: not pid_alive(pid), timeout, f"pid {pid} to exit")
    except TimeoutError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_for(lambda: not pid_alive(pid), 5, f"pid {pid} to die")


def rss_kib(pid):
    """(VmRSS, VmHWM) of a process in KiB, from /proc."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            vals[k] = int(v.split()[0])
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


def make_template(path, size):
    """A fully allocated image of non-zero, incompressible-looking data.

    One random MiB repeated, with the block number stamped into each MiB so
    that no two MiB are equal. Reused across runs when the size matches.
    """
    path = Path(path)
    if path.exists() and path.stat().st_size == size:
        return path
    tmp = path.with_suffix(".tmp")
    block = bytearray(os.urandom(MiB))
    with open(tmp, "wb") as f:
        for i in range(size // MiB):
            block[0:8] = i.to_bytes(8, "little")
            block[4096:4104] = i.to_bytes(8, "little")
            f.write(block)
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def fresh_copy(template, dest):
    """A fresh fully allocated copy of the template, written back to disk."""
    dest = Path(dest)
    if dest.exists():
        dest.unlink()
    run(["cp", "--sparse=never", str(template), str(dest)])
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return dest


def sparse_file(dest, size):
    dest = Path(dest)
    if dest.exists():
        dest.unlink()
    with open(dest, "wb") as f:
        f.truncate(size)
    return dest


def parse_size(text):
    text = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in mult:
        return int(float(text[:-1]) * mult[text[-1]])
    return int(text)


def human_size(n):
    for unit, m in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m}{unit}"
    for unit, m in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= m:
            return f"{n / m:.1f}{unit}"
    return str(n)


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    v = sorted(values)
    if not v:
        return None
    k = max(0, min(len(v) - 1, int(-(-p * len(v) // 100)) - 1))
    return v[k]


def median(values):
    v = sorted(values)
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def meminfo_kib(field):
    """One field of /proc/meminfo in KiB (0 when absent)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        if k == field:
            return int(v.split()[0])
    return 0


def warm_file(path, chunk=8 * MiB):
    """Read a file once so that its pages are resident (clean) in the page cache."""
    buf = bytearray(chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while True:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                break
            off += n
    finally:
        os.close(fd)


def proc_io(pid):
    """/proc/PID/io of a process as a dict of ints (wchar, write_bytes, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = int(v)
    return out


def sync_tree(root):
    """fdatasync every regular file under `root`: our own dirty pages reach the
    disk, without waiting for anybody else's (as a global sync() would)."""
    for p in Path(root).rglob("*"):
        try:
            if not p.is_file() or p.is_symlink():
                continue
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile, or a socket
        try:
            os.fdatasync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
