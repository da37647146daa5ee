"""The resync decision (nbd_mc/primary/plan.py): one test per row of the table
"Which resync" in docs/protect.md, in its order; no QEMU, no secondary.

Each test also checks which of the costly questions the row asks (the bitmaps'
epochs, the image's data, the primary's source): a row that asks one it does not
need would read block status or open QEMU's NBD export for nothing.
"""

import pytest

from nbd_mc.primary.plan import KINDS, Plan, plan_resync

MIB = 1 << 20


class Asked:
    """Answers plan_resync's three questions and records which were asked."""

    def __init__(self, epochs=(), data=0, refusal=None):
        self._epochs, self._data, self._refusal = set(epochs), data, refusal
        self.asked = []

    def epochs(self):
        self.asked.append("epochs")
        return self._epochs

    def data(self):
        self.asked.append("data")
        return self._data

    def source(self):
        self.asked.append("source")
        return self._refusal


def plan(committed=5, group="g1", previous="g1", resync="auto", drive_mirror=False,
         **answers):
    a = Asked(**answers)
    status = {"committed": committed, "group_id": group}
    p = plan_resync(status, previous, a.epochs, resync=resync, drive_mirror=drive_mirror,
                    image_data=a.data, source_refusal=a.source)
    assert p.kind in KINDS
    return p, a.asked


# --- is it incremental? ----------------------------------------------------------------

def test_drive_mirror_copies_whole_disks_and_asks_nothing():
    p, asked = plan(drive_mirror=True, epochs={5}, data=MIB)
    assert p == Plan("full", "--drive-mirror copies whole disks", "")
    assert asked == []


def test_a_different_secondary_is_not_incremental():
    p, asked = plan(group="g2", previous="g1", epochs={5}, data=0)
    assert p.kind == "full"
    assert p.why == "a different secondary (group g2, was g1)"
    assert "epochs" not in asked  # the bitmaps of the old group say nothing about it


def test_a_secondary_without_group_id_is_not_incremental():
    p, asked = plan(group=None, previous=None, epochs={5}, data=0)
    assert p.why == "the secondary has no group id"
    assert "epochs" not in asked


def test_a_secondary_without_committed_epoch_is_not_incremental():
    p, asked = plan(committed=0, epochs={0}, data=0)
    assert p.why == "the secondary holds no committed epoch yet"
    assert "epochs" not in asked


def test_no_bitmap_for_the_committed_epoch_names_those_there_are():
    p, asked = plan(committed=5, epochs={7, 6}, data=0)
    assert p.why == "no dirty bitmap of group g1 covers its committed epoch 5 (have: 6, 7)"
    assert asked[0] == "epochs"


def test_no_bitmap_at_all_a_restarted_qemu():
    p, _ = plan(committed=5, epochs=(), data=0)
    assert p.why == "no dirty bitmap of group g1 covers its committed epoch 5"


@pytest.mark.parametrize("previous", ["g1", None], ids=["same group", "first sync of the run"])
def test_a_bitmap_of_the_group_covering_the_committed_epoch_is_incremental(previous):
    p, asked = plan(committed=5, previous=previous, epochs={4, 5}, data=MIB, refusal="x")
    assert p == Plan("bitmap")
    assert p.why is None and p.reason == ""
    assert asked == ["epochs"]  # neither the image nor the source


# --- not incremental: checksum or full ----------------------------------------------------

def test_resync_full_asks_nothing_about_contents():
    p, asked = plan(group=None, previous=None, resync="full", data=MIB)
    assert p == Plan("full", "the secondary has no group id", "--resync full")
    assert asked == []


def test_auto_with_an_empty_image_is_full_without_opening_a_source():
    p, asked = plan(committed=0, data=0, refusal="never asked")
    assert p == Plan("full", "the secondary holds no committed epoch yet",
                     "the secondary's image is empty")
    assert asked == ["data"]


def test_auto_with_data_and_a_readable_source_is_checksum():
    p, asked = plan(committed=0, data=41 * MIB + MIB // 2)
    assert p.kind == "checksum"
    assert p.because == ("the secondary's image holds 41.5 MiB of data: comparing block "
                         "hashes, copying only what differs")
    assert asked == ["data", "source"]


def test_resync_checksum_with_a_readable_source_does_not_ask_the_image():
    p, asked = plan(committed=0, resync="checksum", data=0)
    assert p == Plan("checksum", "the secondary holds no committed epoch yet",
                     "--resync checksum: comparing block hashes, copying what differs")
    assert asked == ["source"]


@pytest.mark.parametrize("resync", ["auto", "checksum"])
def test_an_unreadable_primary_falls_back_to_full_saying_why(resync):
    p, _ = plan(committed=0, resync=resync, data=MIB, refusal="no NBD server of ours")
    assert p == Plan("full", "the secondary holds no committed epoch yet",
                     "no checksum sync: no NBD server of ours")


# --- what the checksum sync finds on its way ----------------------------------------------

def test_a_secondary_that_cannot_hash_gets_a_full_sync():
    p, _ = plan(committed=0, data=MIB)
    full = p.unsupported("the secondary's nbd-mc has no checksum-range (an older version)")
    assert full == Plan("full", p.why, "the secondary's nbd-mc has no checksum-range (an "
                        "older version); nothing was copied yet")


def test_a_walk_that_cannot_read_the_primary_ends_in_a_full_sync():
    p, _ = plan(committed=0, data=MIB)
    full = p.unreadable("EIO at 4096")
    assert full == Plan("full", p.why, "the checksum sync could not read: EIO at 4096")


# --- what the decision says ----------------------------------------------------------------

def test_the_report_reason_names_the_kind_and_why():
    p, _ = plan(committed=0, data=MIB)
    assert "initial sync" + p.reason == ("initial sync; checksum: the secondary holds no "
                                         "committed epoch yet")
    assert "initial sync" + p.unreadable("x").reason == ("initial sync; full: the "
                                                         "secondary holds no committed "
                                                         "epoch yet")


def test_the_console_line_of_each_kind():
    assert Plan("bitmap").line(3 * MIB, 7) == \
        "  resyncing 3.0 MiB changed since epoch 7 (incremental)"
    assert Plan("checksum", "W", "B").line(64 * MIB, 0) == "  checksum sync of 64.0 MiB: W; B"
    assert Plan("full", "W", "B").line(64 * MIB, 0) == "  full sync of 64.0 MiB: W (B)"
    assert Plan("full", "W").line(64 * MIB, 0) == "  full sync of 64.0 MiB: W"
