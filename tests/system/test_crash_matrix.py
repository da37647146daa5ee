"""Crash matrix: kill -9 nbdkit at every named crash point, in both durability
modes, and check that recovery always lands on exactly one committed epoch.

The short version here covers every point of nbd_mc.crashpoints in each mode at
least once (hit counts and the recovery path -- offline `recover` or restarting
`serve` -- vary), a few "any point" kills, and restarts that crash again inside
their own recovery.  `make soak` runs tests/support/crash_driver.full_plan and the
open-ended "*" sweep, in parts (full_sweep_named, full_sweep_any).  Power loss itself is not simulated (see the report).
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


def test_a_kill_inside_serves_start_is_served_again(workdir):
    """"*:1" and "*:2" kill `serve` in its start, on either side of the first state
    file's rename, before anything was committed or written.  Serving again brings
    the group up at epoch 0 with the images untouched, whichever recovery the trial
    names.  (make soak's "*" sweep met this after the state file's crash points
    were added, and stopped there: every trial was expected to reach the workload.)"""
    results = run_plan(workdir, [Trial("*", n, mode, seed=n, recovery=rec)
                                 for n in (1, 2) for mode in ("process", "power")
                                 for rec in ("serve", "recover")])
    summary = summarise(results)
    assert all(r.ok for r in results), summary
    assert all(r.killed_in.startswith("serve's start (state.") for r in results), \
        [r.killed_in for r in results]


#: `make soak` runs the full sweep as tests of their own, so that pytest-xdist spreads
#: them over its workers and each records its figures as soon as it ends (the report
#: adds them up into one row): the named points per (seed, mode), and the "*" sweep
#: of each mode in ANY_PARTS interleaved parts.
NAMED_PARTS = [(seed, mode) for seed in (1, 2) for mode in ("process", "power")]
ANY_PARTS = 3


def _record_full(results, **figures) -> None:
    record("crash matrix (full sweep)", len(results), sum(not r.ok for r in results),
           killed_at=sorted({r.trial.point for r in results if r.killed and r.trial.point != "*"}),
           killed=sum(r.killed for r in results),
           second_kills=sum(r.second_killed for r in results), **figures)


def full_sweep_named(workdir, seed, mode):
    """Every named point at hit counts 1..6 (each point's chain ends at the first
    hit its workload never reached: crash_driver.full_plan), and restarts killed
    inside their recovery."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        chains = crash_driver.full_plan((seed,), (mode,))
        results = sum(pool.map(lambda c: crash_driver.run_chain(workdir, c), chains), [])
    summary = summarise(results)
    print(summary)
    _record_full(results, part=f"{mode} seed {seed}")
    assert all(r.ok for r in results), summary
    assert {r.trial.point for r in results if r.killed} >= set(crash_driver.POINTS), summary


def full_sweep_any(workdir, mode, part):
    """"*:N" (the server killed at the N-th point it passes, whatever its name) for
    N = part + 1, part + 1 + ANY_PARTS, ... until the workload runs to its end
    without being killed (each N with its own seed: a different workload)."""
    results = []
    n = part + 1
    while True:
        ns = [n + k * ANY_PARTS for k in range(PARALLEL * 2)]
        batch = run_plan(workdir, [Trial("*", m, mode, seed=m,
                                         recovery="serve" if m % 2 else "recover")
                                   for m in ns])
        results += batch
        n = ns[-1] + ANY_PARTS
        if not all(r.killed for r in batch) or n > 2000:
            break
    summary = summarise(results)
    print(summary)
    _record_full(results, any_point_max=max(r.trial.hit for r in results if r.killed),
                 part=f"{mode} * {part}")
    assert all(r.ok for r in results), summary


if os.environ.get("NBD_MC_CRASH_SWEEP"):  # `make soak` only: collected, never skipped
    test_full_sweep_named = pytest.mark.parametrize("seed,mode", NAMED_PARTS)(full_sweep_named)
    test_full_sweep_any = pytest.mark.parametrize("mode", ("process", "power"))(
        pytest.mark.parametrize("part", range(ANY_PARTS))(full_sweep_any))
