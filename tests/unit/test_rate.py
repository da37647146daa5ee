"""--rate and --rate-file (nbd_mc/primary/rate.py): what a rate may look like, and
how a changed file is picked up (and a bad one refused, the rate in force kept)."""

import os

import pytest

from nbd_mc.primary.rate import Rate, describe, parse_rate


@pytest.mark.parametrize("text,rate", [("20M", 20 << 20), ("512K", 512 << 10),
                                       ("1000000", 1000000), ("8MiB/s", 8 << 20),
                                       ("0", 0), ("off", 0), ("unlimited", 0), (" 1G\n", 1 << 30)])
def test_parse_rate(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "-5M", "1.5M", "M"])
def test_parse_rate_refuses(text):
    with pytest.raises(ValueError, match="not a rate|must not be negative"):
        parse_rate(text)


def test_describe():
    assert describe(0) == "unlimited" and describe(5 << 20) == "5.0 MiB/s"


def test_rate_file(tmp_path):
    path = tmp_path / "rate"
    r = Rate(4 << 20, str(path))
    assert r.speed == 4 << 20 and not r.reload()  # no file: --rate stays
    path.write_text("1M\n")
    assert r.reload() and r.speed == 1 << 20
    assert not r.reload()  # unchanged file: nothing to do
    path.write_text("bogus\n")
    os.utime(path, ns=(1, 1))  # (a different mtime whatever the clock's resolution)
    assert not r.reload() and r.speed == 1 << 20 and "bogus" in r.error
    path.write_text("0")
    assert r.reload() and r.speed == 0 and r.error is None
