"""Helpers for tests/unit/test_qcow2.py: the qemu-img / qemu-io oracles, raw-file
manipulation, and a child process that runs overlay operations and can kill
itself with SIGKILL right before its Nth write syscall.

This file is also the child's program: ``python tests/support/qcow2_helpers.py JSON``
(kept free of pytest imports so the child starts quickly).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys

from nbd_mc import qcow2

PYTHON = sys.executable
HERE = os.path.abspath(__file__)
QEMU_ENV = dict(os.environ, LC_ALL="C")


# --- oracles -------------------------------------------------------------------------
def run(*argv, check_rc=None):
    r = subprocess.run(argv, capture_output=True, text=True, env=QEMU_ENV, timeout=120)
    if check_rc is not None:
        assert r.returncode == check_rc, (argv, r.returncode, r.stdout, r.stderr)
    return r


def qemu_check(overlay: str) -> subprocess.CompletedProcess:
    """qemu-img check: 0 clean, 2 corruption, 3 leaks only."""
    return run("qemu-img", "check", "-f", "qcow2", overlay)


def assert_check(overlay: str, allowed=(0,)) -> int:
    r = qemu_check(overlay)
    assert r.returncode in allowed, (
        f"qemu-img check {overlay} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r.returncode


def qemu_compare(overlay: str, raw: str) -> subprocess.CompletedProcess:
    return run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", overlay, raw)


def assert_compare(overlay: str, raw: str) -> None:
    r = qemu_compare(overlay, raw)
    assert r.returncode == 0, (
        f"qemu-img compare {overlay} {raw} -> {r.returncode}\n{r.stdout}\n{r.stderr}")


def qemu_info(overlay: str) -> dict:
    r = run("qemu-img", "info", "--output=json", "-f", "qcow2", overlay, check_rc=0)
    return json.loads(r.stdout)


def qemu_io(overlay: str, *commands: str, readonly=True) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", "qcow2"] + (["-r"] if readonly else [])
    for c in commands:
        argv += ["-c", c]
    return run(*argv, overlay)


def assert_pattern(overlay: str, offset: int, length: int, byte: int) -> None:
    """Through QEMU's qcow2 driver: [offset, offset+length) reads as ``byte``."""
    r = qemu_io(overlay, f"read -P {byte:#x} {offset} {length}")
    assert r.returncode == 0 and "verification failed" not in r.stdout, (
        f"qemu-io read -P {byte:#x} {offset} {length}: {r.returncode}\n{r.stdout}\n{r.stderr}")


# --- files ---------------------------------------------------------------------------
def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_file(path: str, data) -> None:
    with open(path, "wb") as f:
        f.write(data)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def copy_pair(src_dir: str, dst_dir: str, names=("img.raw", "ov.qcow2")) -> None:
    """Copy image + overlay (the overlay names its backing file relatively)."""
    os.makedirs(dst_dir, exist_ok=True)
    for n in names:
        shutil.copyfile(os.path.join(src_dir, n), os.path.join(dst_dir, n))


def random_image(rng: random.Random, size: int, cluster_size: int) -> bytearray:
    """Per cluster: random data, zeros, a cluster with a little data, or a mix."""
    data = bytearray(size)
    for c in range(0, size, cluster_size):
        n = min(cluster_size, size - c)
        kind = rng.randrange(4)
        if kind == 0:
            data[c:c + n] = rng.randbytes(n)
        elif kind == 1:
            k = rng.randrange(n)
            data[c + k] = rng.randrange(1, 256)
        elif kind == 2:
            half = n // 2
            data[c:c + half] = rng.randbytes(half)
    return data


def write_sparse(path: str, data) -> None:
    """Write ``data`` as a sparse file: all-zero 4 KiB blocks stay holes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, len(data))
        view = memoryview(data)
        zero = bytes(4096)
        for off in range(0, len(data), 4096):
            block = view[off:off + 4096]
            if block != zero[:len(block)]:
                os.pwrite(fd, block, off)
    finally:
        os.close(fd)


# --- raw qcow2 structure access (for corrupting files on purpose) --------------------
def header_fields(path: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read(qcow2.HEADER.size)
    h = qcow2.Header.parse(raw)
    return {"cluster_size": 1 << h.cluster_bits, "l1_offset": h.l1_table_offset,
            "l1_size": h.l1_size, "rt_offset": h.refcount_table_offset,
            "rt_clusters": h.refcount_table_clusters, "size": h.size,
            "extended": bool(h.incompatible & qcow2.INCOMPAT_EXTENDED_L2)}


def read_u64(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def write_u64(path: str, offset: int, value: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, struct.pack(">Q", value), offset)
    finally:
        os.close(fd)


def l2_entry_offset(path: str, guest_cluster: int) -> int:
    """File offset of the L2 entry of ``guest_cluster`` (its L2 table must exist);
    with extended L2 entries the subcluster bitmap follows at +8."""
    h = header_fields(path)
    size = 16 if h["extended"] else 8
    bits = h["cluster_size"].bit_length() - 1 - size.bit_length() + 1
    l1e = read_u64(path, h["l1_offset"] + (guest_cluster >> bits) * 8)
    table = l1e & qcow2.OFFSET_MASK
    assert table, "no L2 table for that cluster"
    return table + (guest_cluster & ((1 << bits) - 1)) * size


# --- the child: run overlay operations, optionally die before the Nth write ---------
def run_child(overlay: str, image: str, ops: list, kill_before: int | None = None,
              readonly_image: bool = False) -> dict:
    """Run ``ops`` on a freshly opened UndoOverlay in a child process.

    ops: ["preserve", first, count] | ["drop", epoch] | ["apply"] | ["reopen"].
    The child counts pwrite/pwritev syscalls (on any fd) and sends itself SIGKILL
    right before write number ``kill_before`` (0-based).  Returns
    {"killed": bool, "writes": n or None, "maxrss_kib": ..., "summary": ...}.
    """
    arg = json.dumps({"overlay": overlay, "image": image, "ops": ops,
                      "kill_before": kill_before, "readonly_image": readonly_image})
    p = subprocess.run([PYTHON, HERE, arg], capture_output=True, text=True, timeout=120)
    if p.returncode == -signal.SIGKILL:
        assert kill_before is not None, p.stderr
        return {"killed": True, "writes": None}
    assert p.returncode == 0, f"child failed ({p.returncode}):\n{p.stderr}"
    out = json.loads(p.stdout)
    out["killed"] = False
    return out


def _child_main(arg: str) -> None:
    req = json.loads(arg)
    count = 0
    kill_before = req["kill_before"]
    real_pwritev, real_pwrite = os.pwritev, os.pwrite

    def gate():
        nonlocal count
        if kill_before is not None and count == kill_before:
            os.kill(os.getpid(), signal.SIGKILL)
        count += 1

    def pwritev(fd, buffers, offset, *flags):
        gate()
        return real_pwritev(fd, buffers, offset, *flags)

    def pwrite(fd, data, offset):
        gate()
        return real_pwrite(fd, data, offset)

    image_fd = os.open(req["image"], os.O_RDONLY if req["readonly_image"] else os.O_RDWR)

    def open_overlay():
        return qcow2.UndoOverlay(req["overlay"], image_fd)

    ov = open_overlay()
    os.pwritev, os.pwrite = pwritev, pwrite
    for op, *args in req["ops"]:
        if op == "preserve":
            ov.preserve(*args)
        elif op == "drop":
            ov.drop(*args)
        elif op == "apply":
            ov.apply()
        elif op == "reopen":
            ov.close()
            ov = open_overlay()
        else:
            raise ValueError(op)
    os.pwritev, os.pwrite = real_pwritev, real_pwrite
    summary = ov.summary()
    ov.close()
    # VmHWM: peak RSS of this program (ru_maxrss would include the parent's RSS,
    # which Linux carries over across fork + exec)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"writes": count, "summary": summary, "maxrss_kib": hwm}))


if __name__ == "__main__":
    _child_main(sys.argv[1])
