"""The advertised block sizes and protect's max_request (nbd_mc/blocksize.py)."""

from __future__ import annotations

from hypothesis import given, strategies as st

from nbd_mc import blocksize as bs


def test_linux_default_buffer_gives_8k_requests():
    # 16 x (8 KiB + overhead) fits in 208 KiB, 16 x 16 KiB does not: measured with
    # tools/qemu-bugs/yank-leaves-unix-socket-write-stuck.py (8 KiB never stuck)
    assert bs.unix_maximum(212992) == 8192


def test_a_tiny_buffer_still_gets_a_page():
    assert bs.unix_maximum(0) == bs.MIN_MAXIMUM


def test_a_huge_buffer_stops_at_nbdkits_maximum():
    assert bs.unix_maximum(1 << 40) == bs.NBDKIT_MAX_REQUEST


@given(st.integers(min_value=0, max_value=1 << 34))
def test_the_maximum_is_the_largest_power_of_two_that_fits(buffer):
    m = bs.unix_maximum(buffer)
    assert bs.valid_max_request(m)
    fits = lambda x: bs.QEMU_REQUESTS * (x + bs.PER_REQUEST_OVERHEAD) <= buffer  # noqa: E731
    assert m == bs.MIN_MAXIMUM or fits(m)
    assert m == bs.NBDKIT_MAX_REQUEST or not fits(2 * m)


def test_protect_asks_only_for_a_unix_socket():
    assert bs.qemu_max_request({"type": "unix", "path": "/x"}) == \
        bs.unix_maximum(bs.send_buffer())
    assert bs.qemu_max_request({"type": "inet", "host": "h", "port": "1"}) is None


def test_the_default_is_nbdkits_maximum_and_the_cluster_as_preferred():
    assert bs.block_sizes(65536) == (1, 65536, bs.NBDKIT_MAX_REQUEST)
    assert bs.block_sizes(256) == (1, 512, bs.NBDKIT_MAX_REQUEST)


def test_preferred_never_exceeds_an_asked_maximum():
    assert bs.block_sizes(65536, 8192) == (1, 8192, 8192)
    assert bs.block_sizes(4096, 8192) == (1, 4096, 8192)


def test_valid_max_request():
    assert bs.valid_max_request(4096) and bs.valid_max_request(bs.NBDKIT_MAX_REQUEST)
    for bad in (2048, 3000, 2 * bs.NBDKIT_MAX_REQUEST, True, 8192.0, "8192", None, -4096):
        assert not bs.valid_max_request(bad)


def test_send_buffer_falls_back_to_linuxs_default(tmp_path):
    assert bs.send_buffer(str(tmp_path / "missing")) == bs.DEFAULT_SEND_BUFFER
    bad = tmp_path / "bad"
    bad.write_text("nonsense\n")
    assert bs.send_buffer(str(bad)) == bs.DEFAULT_SEND_BUFFER
    good = tmp_path / "good"
    good.write_text("425984\n")
    assert bs.send_buffer(str(good)) == 425984
