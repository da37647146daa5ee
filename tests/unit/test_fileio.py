"""File I/O primitives in-process (nbd_mc/fileio.py): the data/hole map the
adapter reports as NBD extents, and whole reads past end of file."""

from __future__ import annotations

import os

from nbd_mc.fileio import data_extents, pread_into

K = 1 << 16


def sparse(tmp_path, size, data_at):
    path = tmp_path / "img.raw"
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in data_at:
            f.seek(offset)
            f.write(b"\x01" * K)
    return os.open(path, os.O_RDONLY)


def test_data_and_holes_cover_the_range_exactly(tmp_path):
    fd = sparse(tmp_path, 16 * K, [4 * K, 5 * K, 12 * K])
    try:
        extents = data_extents(fd, 0, 16 * K)
        assert extents[0][0] == 0 and sum(n for _, n, _ in extents) == 16 * K
        for (a, n, _), (b, _, _) in zip(extents, extents[1:]):
            assert a + n == b, "contiguous, no gap or overlap"
        data = [(a, n) for a, n, is_data in extents if is_data]
        # the file system may round to its block size, never report data as a hole
        assert any(a <= 4 * K and a + n >= 6 * K for a, n in data)
        assert any(a <= 12 * K and a + n >= 13 * K for a, n in data)
        assert not any(is_data for a, n, is_data in extents if a + n <= 4 * K)
        first = data_extents(fd, 0, 16 * K, first_only=True)
        assert first == extents[:1]
        tail = data_extents(fd, 13 * K, 16 * K)
        assert tail == [(13 * K, 3 * K, False)]
    finally:
        os.close(fd)


def test_a_read_past_end_of_file_reads_zeros(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"\x07" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(b"\xff" * 300)
        pread_into(fd, memoryview(buf), 50)
        assert buf == b"\x07" * 50 + bytes(250)
    finally:
        os.close(fd)
