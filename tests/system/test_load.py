"""Load under checkpoints: 8 connections of mixed I/O with a commit every 50 ms,
quiesced commit/rollback cycles checked byte for byte (tests/support/load.py).

~20 s here; `make soak` runs it for SOAK_SECONDS in both durability modes.
"""

from __future__ import annotations

import os

import pytest

from support.load import Load
from support.reliability import record
from support.servers import plugin_pids

SOAK = float(os.environ.get("NBD_MC_SOAK_SECONDS") or 0)
MODES = ["process", "power"] if SOAK else ["process"]


@pytest.mark.timeout(int(SOAK * 1.5) + 300 if SOAK else 300)
@pytest.mark.parametrize("durability", MODES)
def test_load_with_commits_every_50ms(workdir, durability):  # noqa: F811
    load = Load(workdir, SOAK or 20.0, durability)
    try:
        fig = load.run()
    finally:
        try:
            load.srv.stop()
        finally:
            load.srv.kill_all()
    print(fig.line())
    record(f"load, {durability} durability", fig.operations, len(fig.errors),
           seconds=round(fig.seconds), racing_commits=fig.racing_commits,
           quiesced_commits=fig.quiesced_commits, rollbacks=fig.rollbacks,
           exact_checks=fig.exact_checks, mib_written=fig.bytes_written >> 20,
           mib_read_checked=fig.bytes_read >> 20, ops=fig.ops)
    assert not fig.errors, fig.errors[:5]
    assert fig.racing_commits > 0 and fig.rollbacks > 0 and fig.operations > 0
    assert not plugin_pids(workdir + "/")
