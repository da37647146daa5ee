"""--rate and --rate-file (nbd_mc/primary/rate.py): what a rate may look like, and
how a changed file is picked up (and a bad one refused, the rate in force kept)."""

import os

import pytest

from nbd_mc.primary.rate import Pacer, Rate, describe, parse_rate


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


class FakeClock:
    """time.monotonic and time.sleep of a clock that moves only when slept on (or
    when the test says a copy took time): the pacing is checked exactly."""

    def __init__(self):
        self.now = 100.0

    def clock(self):
        return self.now

    def sleep(self, s):
        self.now += s


def test_pacer_holds_copies_to_the_rate():
    """The checksum sync's own copies: 40 copies of 1 MiB at 4 MiB/s take 10 s of
    the (fake) clock, whatever each copy itself took; a new rate starts a new
    count; 0 waits for nothing; a stop request ends a wait."""
    t = FakeClock()
    rate = [4 << 20]
    p = Pacer(lambda: rate[0], t.clock, t.sleep)
    start = t.now
    for _ in range(40):
        t.now += 0.01  # the copy itself
        p.sent(1 << 20)
    # (the count starts as the first copy is reported: its own 0.01 s comes first)
    assert t.now - start == pytest.approx(0.01 + (40 << 20) / (4 << 20))
    rate[0] = 1 << 20  # the --rate-file changed
    start = t.now
    p.sent(2 << 20)
    assert t.now - start == pytest.approx(2.0)
    rate[0] = 0
    start = t.now
    assert p.sent(64 << 20) == 0 and t.now == start
    rate[0] = 1 << 20
    calls = []
    assert p.sent(8 << 20, stop=lambda: calls.append(1) or len(calls) > 3) == \
        pytest.approx(3 * Pacer.SLICE)


def test_a_go_checkpoint_that_gives_way_counts_as_an_extended_epoch():
    """shipping.Shipper: a "go" checkpoint whose drain gave way at the pause's
    deadline is an extension (the epoch goes on), not back-pressure."""
    from nbd_mc.primary.shipping import Shipper
    sh = Shipper(max_lag=1.0)
    sh.action = "go"
    sh.gave_way(4 << 20, interval=1.0)
    sh.gave_way(4 << 20, interval=1.0)
    assert sh.extended == 2 and sh.forced == 0 and sh.slices == 0
    assert sh.wait(1.0) == 1.0  # the next look after the interval


def test_back_pressure_is_slices_whose_gap_adapts_to_the_backlog():
    """shipping.Shipper under back-pressure (press): each forced checkpoint that
    gave way is a paused slice, not an extension; the VM runs ``gap`` before the
    next one, a gap that halves while the backlog does not shrink (never below
    SLICE_GAP_MIN), grows again when it does (never past the interval), and the
    episode ends at the commit: the interval again."""
    from nbd_mc.primary.shipping import SLICE_GAP_FIRST, SLICE_GAP_MIN, Shipper
    sh = Shipper(max_lag=1.0)
    assert sh.press() and not sh.press()  # one episode
    assert sh.wait(1.0) == SLICE_GAP_FIRST
    sh.gave_way(8 << 20, interval=1.0)
    assert sh.slices == 1 and sh.extended == 0 and sh.gap == SLICE_GAP_FIRST
    for _ in range(20):  # the backlog does not shrink: the VM runs less and less
        sh.gave_way(8 << 20, interval=1.0)
    assert sh.gap == SLICE_GAP_MIN
    for left in range(7, 0, -1):  # it shrinks: the gap grows back, up to the interval
        sh.gave_way(left << 20, interval=0.05)
    assert sh.gap == 0.05 and sh.wait(0.05) == 0.05
    sh.committed(cut_at=0.0)
    assert not sh.pressing and sh.wait(1.0) == 1.0 and sh.slices == 28
    assert sh.press() and sh.gap == SLICE_GAP_FIRST  # a new episode starts afresh


def test_back_pressure_that_does_not_hold_the_bound_is_said_once_per_episode():
    """shipping.Shipper.outrunning: true once per episode when the lag reaches
    OUTRUN times --max-lag (a guest outrunning the pauses on a very slow link);
    never outside an episode, never without a bound."""
    from nbd_mc.primary.shipping import OUTRUN, Shipper
    sh = Shipper(max_lag=1.0)
    assert not sh.outrunning(10.0)  # no episode
    sh.press()
    assert not sh.outrunning(OUTRUN * 0.99)
    assert sh.outrunning(OUTRUN) and not sh.outrunning(OUTRUN * 3)
    sh.committed(cut_at=0.0)
    sh.press()
    assert sh.outrunning(OUTRUN)  # the next episode says it again
    assert not Shipper(max_lag=None).outrunning(1e9)
