"""The chaos soak (tests/support/chaos.py), short: one or two shuffled rounds of
every fault class against a protected real Linux guest, then kill -9 of the
primary, failover, and the guest's own verification.  `make soak` runs it for
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


@pytest.fixture
def workdir():
    d = short_tmpdir("nbdmc-chaos-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_chaos(workdir):
    lines = []
    res = chaos.run(workdir, seconds=SOAK or 30, seed=SEED, say=lines.append)
    text = "\n".join(lines) + "\n" + chaos.report(res)
    print(f"\nchaos soak, seed {SEED!r}, {res.chaos_seconds:.1f} s of faults\n"
          + chaos.report(res))
    d = res.demo
    record("chaos: faults on a protected Linux guest", sum(res.counts.values()),
           0 if d.ok and res.lost == 0 else 1, seconds=round(res.chaos_seconds),
           committed=d.last_commit, records=d.check.maxseq if d.check else 0, lost=res.lost,
           **res.counts)
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
