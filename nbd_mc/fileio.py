"""File I/O primitives shared by the overlay, the engine and the adapter.

Whole reads and writes with memoryviews (zero-copy: nbdkit's buffers go straight
to the kernel), hole punching, which Python's os module does not offer, and the
map of data and holes (SEEK_DATA/SEEK_HOLE).
"""

import ctypes
import ctypes.util
import errno
import os


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd``; bytes past end of file read as zeros."""
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            view[done:] = bytes(total - done)
            return
        done += n


IOV_MAX = os.sysconf("SC_IOV_MAX")  # 1024 on Linux: pwritev refuses more (EINVAL)


def pwrite_all(fd: int, buffers, offset: int) -> None:
    """Write a list of buffers contiguously at ``offset`` (one syscall normally)."""
    if len(buffers) > IOV_MAX:  # e.g. preserving > 1024 clusters of 4 KiB at once
        for i in range(0, len(buffers), IOV_MAX):
            group = buffers[i:i + IOV_MAX]
            pwrite_all(fd, group, offset)
            offset += sum(len(b) for b in group)
        return
    if len(buffers) == 1:
        view = memoryview(buffers[0]).cast("B")
        n = os.pwrite(fd, view, offset)
        while n < len(view):  # rare: a partial write
            n += os.pwrite(fd, view[n:], offset + n)
        return
    total = sum(len(b) for b in buffers)
    n = os.pwritev(fd, buffers, offset)
    if n < total:
        pwrite_all(fd, [b"".join(bytes(b) for b in buffers)[n:]], offset + n)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int, fallback: bool = True) -> None:
    """Deallocate a range so it reads as zeros.  On a file system that cannot
    punch holes, write zeros instead -- or, without ``fallback``, raise
    EOPNOTSUPP (a fast-zero request must not turn into a slow write)."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS) or not fallback:
        raise OSError(err, os.strerror(err))
    write_zeros(fd, offset, length)


def write_zeros(fd: int, offset: int, length: int, chunk: int = 1 << 20) -> None:
    zeros = memoryview(bytes(min(length, chunk)))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        pwrite_all(fd, [zeros[:n]], offset)
        offset += n


def runs(sorted_ints):
    """(start, length) of each run of consecutive integers."""
    start = prev = None
    for x in sorted_ints:
        if start is None:
            start = prev = x
        elif x == prev + 1:
            prev = x
        else:
            yield start, prev - start + 1
            start = prev = x
    if start is not None:
        yield start, prev - start + 1


def data_extents(fd: int, offset: int, end: int, first_only: bool = False):
    """[(start, length, is_data)] covering [offset, end), from SEEK_DATA/SEEK_HOLE.

    With ``first_only`` only the first extent.  If the file system cannot tell,
    the whole range is reported as data (never claim a hole that is not one).
    """
    out = []
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no data after pos
                return [(offset, end - offset, True)]
            data = end
        data = min(data, end)
        if data > pos:
            out.append((pos, data - pos, False))
        else:
            try:
                data = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            except OSError:
                data = end
            out.append((pos, data - pos, True))
        pos = data
        if first_only:
            break
    return out
