"""kill -9 of the real server, then restart (`nbd-mc serve --state-dir DIR`) or
`nbd-mc recover --state-dir DIR`: every disk of the group must be exactly at the
committed epoch the state reports, and every overlay a valid qcow2 file.

Two kinds of kill:
* deterministic: NBD_MC_CRASHPOINT=NAME[:N] makes the server SIGKILL itself at a
  named instant (every name of crashpoints.POINTS, plus a sample of `*:N`);
* random: a real SIGKILL of the pid in DIR/nbdkit.pid in the middle of a stream
  of asynchronous writes from several connections, or right after a commit or a
  rollback was sent.
"""

from __future__ import annotations

import json
import os
import random
import signal

import pytest

from nbd_mc import crashpoints
from nbd_mc.control import ControlClient
from nbd_mc.secondary.engine import Group
from support.servers import (GroupModel, RawControl, assert_bytes, assert_check, assert_compare,
                             describe, is_connection_loss, make_image, nbd_mc, read_all, read_file,
                             subprocess_env, write_file)
from support.stress import Stress


MiB = 1 << 20
SIZES = {"vda": 2 * MiB, "vdb": 1 * MiB + 3 * 512}


def committed_group(servers, seed: int, sub: str = "g", **kw):
    """Two disks with random contents, epoch 1 committed (set up offline with the
    engine itself, so no server start is spent on it), in directory ``sub``."""
    rng = random.Random(seed)
    os.makedirs(servers.path(sub))
    images, initial = {}, {}
    for name, size in SIZES.items():
        images[name] = servers.path(sub, f"{name}.raw")
        initial[name] = make_image(images[name], size, rng)
    s = servers.new(images, state_dir=servers.path(sub, "st"), **kw)
    g = Group(s.state_dir, list(images.items()),
              cluster_size=kw.get("cluster_size"), durability=kw.get("durability") or "process")
    try:
        g.commit(1)
    finally:
        g.close()
    model = GroupModel(initial)
    model.commit(1)
    return s, model, rng


# --- the deterministic workload --------------------------------------------------------------
class Crashed(Exception):
    def __init__(self, step: str, possible: set):
        super().__init__(step)
        self.step = step
        self.possible = possible


def write_batch(hs, model, rng, tag: int) -> None:
    """Writes, a write-zeroes and a trim on each disk, on separate clusters (so a
    rollback restores several runs)."""
    for d, h in hs.items():
        size = len(model.live[d])
        for k, base in enumerate((0, 5 * 65536 + 1000, 11 * 65536 - 77)):
            off = min(base + rng.randint(0, 4096), size - 1)
            n = min(rng.randint(1, 100000), size - off)
            data = bytes([tag + k]) * n
            h.pwrite(data, off)
            model.write(d, off, data)
        off = min(14 * 65536 + 333, size - 9000)
        h.zero(9000, off)
        model.zero(d, off, 9000)
        h.trim(65536, size - 65536)
        model.zero(d, size - 65536, 65536)


def workload(s, model, rng) -> str:
    """write, commit, write, rollback, write, commit, write, failover.

    Raises Crashed with the set of committed epochs the group may be at when the
    server dies under a step; returns "completed" otherwise.
    """
    step = "connect"
    possible = {model.epoch}
    try:
        hs = {d: s.connect(d) for d in model.live}
        c = ControlClient(s.control_path, timeout=60)
        for step in ("write", "commit", "write", "rollback", "write", "commit", "write",
                     "failover"):
            possible = {model.epoch}
            if step == "write":
                write_batch(hs, model, rng, tag=len(model.history) * 16)
            elif step == "commit":
                epoch = model.epoch + 1
                possible = {model.epoch, epoch}
                assert c.execute("commit", epoch=epoch)["committed"] == epoch
                model.commit(epoch)
            elif step == "rollback":
                c.execute("rollback")
                model.rollback()
            else:
                r = c.execute("failover")
                assert r["committed"] == model.epoch
                model.rollback()
        c.close()
        return "completed"
    except Exception as e:  # noqa: BLE001 - sorted out right here
        if not is_connection_loss(e):
            raise
        if "commit" in step and max(possible) not in model.history:
            model.history[max(possible)] = {n: bytes(b) for n, b in model.live.items()}
        raise Crashed(step, possible) from e


def verify_recovered(s, model, possible: set, how: str, workdir: str) -> dict:
    """After the crash: restart or recover, and check every disk against the model of
    the committed epoch the state reports.  Returns the status (or recover report)."""
    if how == "serve":
        s.start(with_disks=False)
        st = s.execute("query-status")
        committed = st["committed"]
        assert committed in possible, f"committed {committed}, expected one of {possible}"
        model.settle(committed)
        for d in model.live:
            assert_bytes(read_file(s.image(d)), model.committed[d], f"{d} image after restart")
            assert_check(s.overlay(d), allowed=(0, 3))
            if st["role"] == "secondary":
                assert_bytes(read_all(s.connect(d + "@committed")), model.committed[d],
                             f"{d}@committed after restart")
        assert all(d["preserved_clusters"] == 0 for d in st["disks"])
        assert s.state()["committed"] == committed
        return st
    r = nbd_mc("recover", "--state-dir", s.state_dir, "--json")
    assert r.returncode == 0, describe(r)
    rep = json.loads(r.stdout)
    committed = rep["committed"]
    assert committed in possible, f"committed {committed}, expected one of {possible}"
    assert s.state()["committed"] == committed
    model.settle(committed)
    for d in model.live:
        assert_bytes(read_file(s.image(d)), model.committed[d], f"{d} image after recover")
        assert_check(s.overlay(d), allowed=(0,))
        expected = os.path.join(os.path.dirname(s.state_dir), f"{d}.expected.raw")
        write_file(expected, model.committed[d])
        assert_compare(s.overlay(d), expected)
    r = nbd_mc("inspect", s.state_dir, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["valid"], describe(r)
    # a second recover is a no-op
    r = nbd_mc("recover", "--state-dir", s.state_dir, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["restored_clusters"] == 0, describe(r)
    return rep


def still_works(s, model, rng) -> None:
    """The recovered group serves on: write, commit, write, rollback."""
    st = s.execute("query-status")
    if st["fenced"] or st["role"] != "secondary":
        return
    hs = {d: s.connect(d) for d in model.live}
    write_batch(hs, model, rng, tag=200)
    epoch = model.epoch + 1
    s.execute("commit", epoch=epoch)
    model.commit(epoch)
    write_batch(hs, model, rng, tag=220)
    s.execute("rollback")
    model.rollback()
    for d in model.live:
        assert_bytes(read_file(s.image(d)), model.committed[d], f"{d} after the sanity round")


def crash_once(servers, workdir, crashpoint: str, how: str, seed: int, sub: str = "g", **kw):
    """Run the workload on a server armed with ``crashpoint``; recover; verify.
    Returns the step the server died in, or "completed"."""
    s, model, rng = committed_group(servers, seed, sub, **kw)
    r = s.start(crashpoint=crashpoint, check=False)
    if r.returncode != 0:
        # died at startup (a `*` sweep reaches recover.after-apply while opening the group)
        assert "died" in r.stderr or "failed" in r.stderr, describe(r)
        step, possible = "startup", {model.epoch}
    else:
        try:
            step = workload(s, model, rng)
        except Crashed as c:
            step, possible = c.step, c.possible
            s.wait_dead()
        else:
            # the point was not reached: the server is alive and failed over
            st = s.execute("query-status")
            assert st["role"] == "primary" and st["committed"] == model.epoch
            for d in model.live:
                assert_bytes(read_file(s.image(d)), model.committed[d], f"{d} after failover")
            s.stop()
            return step
    verify_recovered(s, model, possible, how, workdir)
    if how == "serve":
        still_works(s, model, rng)
        s.stop()
    return step


#: Points our workload can't reach: recover.after-apply is reached only while a
#: server or recover opens the group (tested on its own below); the history points
#: need `serve --history` and `failover --to-epoch` (the crash matrix and the
#: power-loss sweep serve with history; tests/unit/test_history_engine.py kills at each).
STARTUP_ONLY = {"recover.after-apply"} | {p for p in crashpoints.POINTS
                                          if p.startswith(("history.", "rewind."))}
RUNTIME_POINTS = [p for p in crashpoints.POINTS if p not in STARTUP_ONLY]


@pytest.mark.parametrize("point", RUNTIME_POINTS)
def test_crash_point(servers, workdir, point):
    """The first time the workload reaches ``point`` (restart with serve) and the
    second time (nbd-mc recover): both return to a committed epoch."""
    seed = sum(map(ord, point))
    first = crash_once(servers, workdir, point, "serve", seed, "first")
    assert first != "completed", f"the workload never reached crash point {point}"
    crash_once(servers, workdir, f"{point}:2", "recover", seed + 1, "second")


#: The workload passes about 190 crash points in all (most in the write batches);
#: a spread sample of them, plus the very first (while opening the group).
ANYWHERE = [1] + [random.Random(2024 + i).randrange(2 + 21 * i, 23 + 21 * i) for i in range(8)]


@pytest.mark.parametrize("n", ANYWHERE)
def test_crash_anywhere(servers, workdir, n):
    """`*:N`: the N-th crash point of any name, wherever it falls."""
    step = crash_once(servers, workdir, f"*:{n}", "serve" if n % 2 else "recover", 1000 + n)
    assert step != "completed", f"the workload passed fewer than {n} crash points"


def test_crash_during_recovery(servers, workdir):
    """recover.after-apply: a crash in the middle of the recovery after a crash."""
    s, model, rng = committed_group(servers, 77)
    s.start()
    hs = {d: s.connect(d) for d in model.live}
    write_batch(hs, model, rng, tag=40)
    s.kill9()
    # recover dies after applying, before dropping
    r = nbd_mc("recover", "--state-dir", s.state_dir,
               env=subprocess_env(NBD_MC_CRASHPOINT="recover.after-apply"))
    assert r.returncode == -signal.SIGKILL, describe(r)
    # a server dies the same way while opening the group
    r = s.start(crashpoint="recover.after-apply", check=False)
    assert r.returncode == 1 and "nbd-mc: error:" in r.stderr, describe(r)
    s.pid = None
    verify_recovered(s, model, {1}, "recover", workdir)
    verify_recovered(s, model, {1}, "serve", workdir)
    still_works(s, model, rng)


# --- random SIGKILL ------------------------------------------------------------------------------
def kill_rounds(servers, workdir, seed: int, rounds: int, **kw) -> dict:
    s, model, rng = committed_group(servers, seed, **kw)
    s.start()
    tally = {"writes": 0, "commit": 0, "rollback": 0, "ops": 0, "at_new_epoch": 0}
    for rnd in range(rounds):
        stress = Stress(s, model, rng, conns_per_disk=2)
        n = rng.randint(20, 120)
        kill_at = rng.randint(0, n - 1)
        kind = rng.choice(("writes", "writes", "commit", "rollback"))
        for i in range(n):
            stress.issue()
            tally["ops"] += 1
            if i == kill_at:
                break
            if rng.random() < 0.04:
                stress.commit(racing=rng.random() < 0.5)
            elif rng.random() < 0.02:
                stress.rollback(racing=False)
        possible = {model.epoch}
        if kind == "writes":
            # requests are in flight on several connections right now
            assert stress.in_flight() >= 1
            s.kill9()
        else:
            stress.drain()
            ctl = RawControl(s.control_path)
            if kind == "commit":
                epoch = model.epoch + 1
                model.history[epoch] = {d: bytes(b) for d, b in model.live.items()}
                possible = {model.epoch, epoch}
                ctl.send(json.dumps({"execute": "commit", "arguments": {"epoch": epoch}})
                         .encode() + b"\n")
            else:
                ctl.send(b'{"execute": "rollback"}\n')
            s.kill9()
            ctl.close()
        tally[kind] += 1
        how = "serve" if rnd % 2 else "recover"
        before = model.epoch
        verify_recovered(s, model, possible, how, workdir)
        tally["at_new_epoch"] += model.epoch != before
        if how == "recover":
            s.start(with_disks=False)
    s.stop()
    return tally


def test_random_sigkill(servers, workdir):
    tally = kill_rounds(servers, workdir, seed=31337, rounds=10)
    print(f"\nrandom SIGKILL: {tally}")
    assert tally["writes"] and tally["commit"] and tally["rollback"]


def test_random_sigkill_power(servers, workdir):
    tally = kill_rounds(servers, workdir, seed=4242, rounds=4, durability="power")
    print(f"\nrandom SIGKILL (power): {tally}")
