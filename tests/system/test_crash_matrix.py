"""Crash matrix: kill -9 nbdkit at every named crash point, in both durability
modes, and check that recovery always lands on exactly one committed epoch.

The short version here covers every point of nbd_mc.crashpoints in each mode at
least once (hit counts and the recovery path -- offline `recover` or restarting
`serve` -- vary), a few "any point" kills, and restarts that crash again inside
their own recovery.  `make soak` runs tests/support/crash_driver.full_plan and the
open-ended "*" sweep.  Power loss itself is not simulated (see the report).
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import crash_driver
from support.crash_driver import Trial, run_trial
from nbd_mc import crashpoints
from support.servers import plugin_pids
from support.reliability import record

PARALLEL = 2  # trials at once: most of a trial is waiting for subprocesses


def run_plan(root: str, trials: list[Trial]):
    with ThreadPoolExecutor(PARALLEL) as pool:
        return list(pool.map(lambda t: run_trial(root, t), trials))


def summarise(results) -> str:
    killed = sum(r.killed for r in results)
    points = {r.trial.point for r in results if r.killed}
    lines = [f"{len(results)} trials, {killed} killed at {len(points)} distinct points, "
             f"{sum(r.second_killed for r in results)} restarts killed inside recovery, "
             f"{sum(not r.ok for r in results)} failures"]
    lines += [f"FAIL {r.trial}: {'; '.join(r.failures)}" for r in results if not r.ok]
    return "\n".join(lines)


@pytest.mark.timeout(900)  # 56 trials; history added five points (and their trials)
def test_every_crash_point_in_both_modes(workdir):  # noqa: F811
    trials = crash_driver.sample_plan(seed=int(os.environ.get("NBD_MC_CRASH_SEED", "1")))
    results = run_plan(workdir, trials)
    summary = summarise(results)
    print(summary)
    record("crash matrix (sample)", len(results), sum(not r.ok for r in results),
           kill_points=len({r.trial.point for r in results if r.killed}),
           killed=sum(r.killed for r in results),
           second_kills=sum(r.second_killed for r in results))
    assert all(r.ok for r in results), summary
    # coverage: every workload point killed the server in each mode
    for mode in ("process", "power"):
        hit = {r.trial.point for r in results if r.killed and r.trial.durability == mode}
        missing = set(crash_driver.POINTS) - hit
        assert not missing, f"{mode}: never killed at {sorted(missing)}"
        second = Counter(r.trial.second.split(":")[0] for r in results
                         if r.second_killed and r.trial.durability == mode)
        assert second, f"{mode}: no restart was killed inside its recovery"
    # a group promoted by the workload's failover was served again and read back
    promoted = [r for r in results if r.promoted and "writer export" in r.read_through]
    assert {r.trial.durability for r in promoted} == {"process", "power"}, summary
    assert set(crash_driver.POINTS) | {"recover.after-apply"} == set(crashpoints.POINTS)
    assert not plugin_pids(workdir + "/")


def full_sweep(workdir):  # noqa: F811
    """`make soak`: every named point at several hit counts, then "*:N" for
    N = 1, 2, ... until the workload runs to its end without being killed."""
    results = run_plan(workdir, crash_driver.full_plan())
    for mode in ("process", "power"):
        n = 1
        while True:
            batch = run_plan(workdir, [Trial("*", n + k, mode, seed=n + k,
                                             recovery="serve" if (n + k) % 2 else "recover")
                                       for k in range(PARALLEL * 4)])
            results += batch
            n += len(batch)
            if not all(r.killed for r in batch) or n > 2000:
                break
    summary = summarise(results)
    print(summary)
    record("crash matrix (full sweep)", len(results), sum(not r.ok for r in results),
           kill_points=len({r.trial.point for r in results if r.killed}),
           killed=sum(r.killed for r in results),
           any_point_max=n)
    assert all(r.ok for r in results), summary


if os.environ.get("NBD_MC_CRASH_SWEEP"):  # `make soak` only: collected, never skipped
    test_full_sweep = full_sweep
