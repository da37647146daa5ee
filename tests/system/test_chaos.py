"""The chaos soak (tests/support/chaos.py), short: two shuffled rounds of every
fault class against a protected real Linux guest -- including a full undo
file system that must really make the secondary refuse a write, and a failover
in the middle of the run after which the guest runs on the other disk and is
protected into the one it left (so the second one is a failback) -- then kill -9
of the primary, failover, and the guest's own verification.  `make soak` runs it for
NBD_MC_SOAK_SECONDS with the seed NBD_MC_CHAOS_SEED (default "chaos")."""

import os
import shutil

import pytest

from support import chaos
from support.reliability import record
from support.servers import short_tmpdir

pytestmark = pytest.mark.qemu

SOAK = float(os.environ.get("NBD_MC_SOAK_SECONDS") or 0)
SEED = os.environ.get("NBD_MC_CHAOS_SEED", "chaos")
SHORT_ROUNDS = 2  # in `make test`: two failovers mid-run, then the final one (~50 s)


@pytest.fixture
def workdir():
    d = short_tmpdir("nbdmc-chaos-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_chaos(workdir):
    lines = []
    try:
        res = chaos.run(workdir, seconds=SOAK, seed=SEED, say=lines.append,
                        rounds=None if SOAK else SHORT_ROUNDS)
    except Exception:
        print("\n".join(lines))
        raise
    text = "\n".join(lines) + "\n" + chaos.report(res)
    print(f"\nchaos soak, seed {SEED!r}, {res.chaos_seconds:.1f} s of faults\n"
          + chaos.report(res))
    d = res.demo
    ok = d.ok and res.lost == 0 and all(f.check and f.check.ok for f in res.failovers)
    record("chaos: faults on a protected Linux guest", sum(res.counts.values()),
           0 if ok else 1, seconds=round(res.chaos_seconds),
           committed=d.last_commit, records=d.check.maxseq if d.check else 0,
           records_checked=res.records_checked, lost=res.lost,
           vm_resumed_after_copy_error=res.copy_error_resumes, **res.counts)
    assert not os.path.ismount(os.path.join(workdir, "undo")), "the undo fs is still mounted"
    assert d.ok and d.identical, text
    assert all(n >= 1 for n in res.counts.values()), res.counts
    check = d.check
    assert check.fsck == 0 and check.bad == 0 and check.gaps == 0 and check.minseq == 1, text
    # acknowledged, committed records lost: 0 (and the guest did commit some)
    assert res.committed_seq >= 1 and res.lost == 0, text
    p = d.protect  # the last protect: it saw the primary die, and its commits match
    assert p["primary_gone"] and p["committed"] == d.last_commit, p
    assert d.failover["committed"] == d.last_commit
    # killed mid-epoch: a record written entirely after the last commit is not there
    if d.last_commit == d.kill_epoch:
        assert check.maxseq < d.seq_after_commit, text
    # every full undo file system hit: the secondary refused writes, protect lost it
    # and claimed it again (a resync attempt)
    assert len(res.full_fs) == res.counts["full_fs"], text
    for hit in res.full_fs:
        assert hit.errors >= 1 and hit.claims >= 1, (hit, text)
    # every mid-run failover: the disk it left was the checkpoint's, checked by the
    # guest with every committed record there; then the guest went on on that disk
    assert len(res.failovers) == res.counts["failover"], text
    for f in res.failovers:
        assert f.identical and f.check.ok and f.check.fsck == 0, (f, text)
        assert f.committed_seq >= 1 and f.maxseq >= f.committed_seq, (f, text)
        if f.commit == f.kill_epoch:
            assert f.maxseq < f.seq_after_commit, (f, text)
