"""The demo's story with the real Linux guest, as a test (demo/story.py).

A work guest writes fsync'd, checksummed records on ext4 while `nbd-mc protect`
checkpoints it every 100 ms into `nbd-mc serve`; its QEMU is killed with SIGKILL
in the middle of an epoch (once a whole record was written after the last
commit); after `nbd-mc failover` the secondary's disk must equal the primary's
disk recorded at the last checkpoint (qemu-img compare), and a fresh guest booted
on it must find a clean file system with every record intact -- and without the
record written after that checkpoint.
"""

import shutil

import pytest

from demo import story as demo
from support.servers import short_tmpdir

pytestmark = pytest.mark.qemu


@pytest.fixture
def workdir():
    d = short_tmpdir("nbdmc-demo-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_demo_story(workdir):
    lines = []
    result = demo.run(workdir, seconds=3, say=lines.append)  # kills what it started
    text = "\n".join(lines)
    assert result.ok, text
    assert result.identical and "Images are identical." in text
    check = result.check
    assert check.fsck == 0 and check.bad == 0 and check.gaps == 0 and check.minseq == 1
    assert check.records >= 1
    p = result.protect
    assert p["primary_gone"] and p["committed"] == result.last_commit >= 1
    assert p["commits"] == p["committed"] and p["pause_ms"]["count"] >= p["commits"]
    # the secondary was killed and restarted mid-run: protection resumed by itself,
    # copying only what changed
    assert p["outages"] == 1 and result.restart_epoch >= 1, p
    assert p["resyncs"][0]["full"] and p["resyncs"][1]["full"] is False, p["resyncs"]
    assert 0 < p["resyncs"][1]["bytes"] < p["resyncs"][0]["bytes"], p["resyncs"]
    # killed mid-epoch: a record written entirely after the last commit is not there
    if result.last_commit == result.kill_epoch:
        assert check.maxseq < result.seq_after_commit, text
    assert "failover done" in result.failover["text"]
