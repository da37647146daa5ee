"""History (serve --history) in-process: retained layers against a byte model.

Random writes, zeroes and trims over many epochs with every commit retained; every
retained epoch read through the engine (what ``NAME@epoch-N`` serves) and, as
the oracle, through ``qemu-img compare`` on the layer file (the qcow2 backing
chain down to the image) equals the model at that commit; ``failover
--to-epoch`` leaves the images equal to the model; crashes at the history crash
points leave every retained checkpoint exact or cleanly absent.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from nbd_mc.errors import NotRetained
from nbd_mc.secondary.metrics import render_status
from nbd_mc.secondary import history
from nbd_mc.secondary.engine import Group
from support.servers import (GroupModel, assert_bytes, assert_check, describe, group_on_images,
                             read_file, run, subprocess_env, write_file)

C = 65536
SIZES = {"vda": 6 * C, "vdb": 3 * C}
EVERY_COMMIT = history.make_policy(3600, 0, 0)


@pytest.fixture
def made(tmp_path):
    with group_on_images(tmp_path, SIZES) as (open_group, model, st, rng):
        yield open_group, model, st, rng, tmp_path


def random_ops(g: Group, model: GroupModel, rng: random.Random, n: int) -> None:
    """Writes, zeroes and trims of random sizes, unaligned, across cluster edges."""
    for _ in range(n):
        name = rng.choice(list(SIZES))
        size = SIZES[name]
        offset = rng.randrange(0, size - 1)
        count = min(rng.choice((512, 1000, 4096, 9000, C, 2 * C + 3)), size - offset)
        kind = rng.random()
        d = g.disk(name)
        if kind < 0.7:
            data = rng.randbytes(count)
            g.write(d, g.generation, data, offset)
            model.write(name, offset, data)
        else:
            g.zero(d, g.generation, count, offset, trim=kind > 0.85)
            model.zero(name, offset, count)


def read_epoch(g: Group, name: str, epoch: int) -> bytes:
    d = g.disk(name)
    buf = bytearray(d.size)
    # in odd pieces, so runs start and end inside units
    pos = 0
    for step in (3000, 70000, 1 << 20):
        n = min(step, d.size - pos)
        if n <= 0:
            break
        g.read_epoch(d, epoch, memoryview(buf)[pos:pos + n], pos)
        pos += n
    return bytes(buf)


def compare_layer(layer: str, expected: bytes, tmp_path) -> None:
    raw = str(tmp_path / "expected.raw")
    write_file(raw, expected)
    r = run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", layer, raw])
    assert r.returncode == 0, f"qemu-img compare {layer}: {describe(r)}"


def check_all(g: Group, model: GroupModel, st: str, tmp_path, qemu: bool = True) -> None:
    kept = history.retained(g.state)
    assert kept, "history holds nothing"
    for n in kept:
        for name in SIZES:
            assert_bytes(read_epoch(g, name, n), model.history[n][name], f"{name}@epoch-{n}")
            if qemu:
                layer = history.layer_path(st, name, n)
                compare_layer(layer, model.history[n][name], tmp_path)


def test_every_retained_epoch_reads_as_the_model_and_failover_returns_to_it(made):
    open_group, model, st, rng, tmp_path = made
    g = open_group(history_policy=EVERY_COMMIT)
    random_ops(g, model, rng, 5)  # epoch 0: the initial sync keeps nothing
    for epoch in range(1, 13):
        g.commit(epoch)
        model.commit(epoch)
        random_ops(g, model, rng, rng.randrange(0, 12))
    assert history.retained(g.state) == list(range(1, 13))
    check_all(g, model, st, tmp_path)
    listing = g.history_listing()
    assert (listing["oldest_epoch"], listing["newest_epoch"], listing["count"]) == (1, 12, 12)
    assert listing["bytes"] > 0 and g.status()["history"]["oldest_epoch"] == 1
    for n in history.retained(g.state):
        for name in SIZES:
            assert assert_check(history.layer_path(st, name, n), allowed=(0,)) == 0
    with pytest.raises(NotRetained, match="epoch 0 is not retained"):
        g.failover(to_epoch=0)
    with pytest.raises(NotRetained, match="is not committed"):
        g.failover(to_epoch=13)
    target = rng.randrange(1, 12)
    r = g.failover(to_epoch=target)
    assert r["committed"] == target and g.state.role == "primary"
    for name in SIZES:
        assert_bytes(read_file(g.disk(name).spec.image), model.history[target][name],
                     f"{name} after failover --to-epoch {target}")
    g.close()  # (the layers are deleted after the reply; close waits for that)
    assert g.state.history == [] and not [f for f in os.listdir(st) if ".epoch-" in f]


def test_history_survives_a_restart_and_a_rollback(made):
    open_group, model, st, rng, tmp_path = made
    g = open_group(history_policy=EVERY_COMMIT)
    for epoch in range(1, 6):
        g.commit(epoch)
        model.commit(epoch)
        random_ops(g, model, rng, 8)
    g.rollback()
    model.rollback()
    random_ops(g, model, rng, 8)
    g.close()  # as kill -9 leaves it: undo of the open epoch in the overlays
    model.rollback()
    g = open_group()  # the policy is kept in the state file
    assert g.state.history_policy == EVERY_COMMIT
    check_all(g, model, st, tmp_path)
    for epoch in range(6, 9):
        random_ops(g, model, rng, 8)
        g.commit(epoch)
        model.commit(epoch)
    check_all(g, model, st, tmp_path, qemu=False)
    g.close()
    g = open_group(history_policy=None)  # --history 0: history goes
    assert g.state.history == [] and not [f for f in os.listdir(st) if ".epoch-" in f]


def test_checkpoints_every_interval_and_expiry(made, monkeypatch):
    open_group, model, st, rng, tmp_path = made
    clock = [1000.0]
    monkeypatch.setattr("nbd_mc.secondary.engine.time.time", lambda: clock[0])
    g = open_group(history_policy=history.make_policy(10, 2, 0))
    for epoch in range(1, 16):
        random_ops(g, model, rng, 3)
        g.commit(epoch)
        model.commit(epoch)
        clock[0] += 0.75
    # commits at 1000, 1000.75, ...: the first at or after each 2 s boundary is
    # retained (1, 4, 7, 9, 12, 15); at the commit at 1010.5 epoch 1 is older than 10 s
    kept = history.retained(g.state)
    times = dict((n, t) for n, t in g.state.history)
    assert kept == [4, 7, 9, 12, 15], kept
    assert all(int(times[b] // 2) > int(times[a] // 2) for a, b in zip(kept, kept[1:]))
    check_all(g, model, st, tmp_path, qemu=False)
    clock[0] += 8  # 1 and 3 are older than 10 s at the next commit
    random_ops(g, model, rng, 3)
    g.commit(16)
    model.commit(16)
    kept = history.retained(g.state)
    assert kept == [15, 16], kept
    assert not os.path.exists(history.layer_path(st, "vda", 1))
    check_all(g, model, st, tmp_path)
    # status and the Prometheus text say the same: oldest epoch, its age, bytes held
    st_ = g.status()["history"]
    assert (st_["count"], st_["oldest_epoch"], st_["newest_epoch"]) == (2, 15, 16)
    assert st_["oldest_age"] == pytest.approx(clock[0] - times[15], abs=0.01)
    text = render_status(g.status(), "g", now=clock[0])
    assert 'nbd_mc_history_oldest_epoch{group="g"} 15.0' in text
    assert 'nbd_mc_history_checkpoints{group="g"} 2.0' in text
    assert f'nbd_mc_history_bytes{{group="g"}} {float(st_["bytes"])}' in text
    assert 'nbd_mc_history_oldest_age_seconds{group="g"} 8.75' in text
    # the space bound: only the newest survives a bound of one byte
    g.close()
    g = open_group(history_policy=history.make_policy(3600, 0, 1))
    random_ops(g, model, rng, 3)
    g.commit(17)
    model.commit(17)
    assert history.retained(g.state) == [17]
    check_all(g, model, st, tmp_path)


# "preserve.before-l2:2", "preserve.before-l1:2": the second preserve of the first
# write, the copy into the open history layer (the first is the undo overlay's)
CRASH_POINTS = ("history.after-create", "history.after-rebase", "commit.after-state",
                "history.before-unlink", "drop.after-l1", "preserve.before-l2",
                "preserve.before-data:2", "preserve.before-l2:2", "preserve.before-l1:2",
                "write.before-image", "failover.after-fence", "history.rewind-after-layer",
                "rewind.after-apply", "failover.before-promote")

CHILD = r"""
import json, os, random, sys
sys.path.insert(0, sys.argv[1])
from nbd_mc.secondary import history
from nbd_mc.secondary.engine import Group
st, seed = sys.argv[2], int(sys.argv[3])
with open(sys.argv[4]) as f:
    ops = json.load(f)
g = Group(st, history_policy=history.make_policy(3600, 0, 2 << 20))
for op in ops:
    if op[0] == "w":
        g.write(g.disk(op[1]), g.generation, bytes.fromhex(op[3]), op[2])
    elif op[0] == "c":
        g.commit(op[1])
    elif op[0] == "f":
        g.failover(to_epoch=op[1])
g.close()  # (the layers of a failover are deleted after its reply)
print("done")
"""


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_at_every_history_crash_point(made, point):
    """A child process runs commits, writes and a failover --to-epoch and is
    killed -9 at ``point``; the recovered group's retained epochs are exact."""
    open_group, model, st, rng, tmp_path = made
    g = open_group(history_policy=history.make_policy(3600, 0, 2 << 20))
    for epoch in range(1, 4):
        random_ops(g, model, rng, 6)
        g.commit(epoch)
        model.commit(epoch)
    g.close()
    ops, expect = [], GroupModel({n: bytes(b) for n, b in model.live.items()})
    expect.history, expect.epoch = dict(model.history), model.epoch
    for epoch in range(4, 7):
        for _ in range(4):
            name = rng.choice(list(SIZES))
            off = rng.randrange(0, SIZES[name] - 5000)
            data = rng.randbytes(rng.choice((700, 4096, 5000)))
            ops.append(["w", name, off, data.hex()])
            expect.write(name, off, data)
        ops.append(["c", epoch])
        expect.commit(epoch)
    ops.append(["w", "vda", 100, (b"\xee" * 3000).hex()])
    ops.append(["f", 2])
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = subprocess_env(NBD_MC_CRASHPOINT=point)
    script = str(tmp_path / "ops.json")
    with open(script, "w") as f:
        json.dump(ops, f)
    r = subprocess.run([sys.executable, "-c", CHILD, repo, st, "0", script],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == -9, f"{point} was not reached: {r.returncode} {r.stdout} {r.stderr}"
    g = open_group()
    committed = g.state.committed
    assert committed in expect.history
    live = {n: read_file(g.disk(n).spec.image) for n in SIZES}
    if g.state.history:
        for n in history.retained(g.state):
            for name in SIZES:
                assert_bytes(read_epoch(g, name, n), expect.history[n][name], f"{name}@epoch-{n}")
                # clean: recovery gives back what a crashed copy into the open
                # layer had allocated (no leaked clusters left, qemu-img check 0)
                assert_check(history.layer_path(st, name, n), allowed=(0,))
    for name in SIZES:
        assert_bytes(live[name], expect.history[committed][name], f"{name} recovered")
        assert_check(g.disk(name).spec.overlay, allowed=(0,))  # the undo overlay too
    assert not [f for f in os.listdir(st) if ".epoch-" in f and ".tmp." in f]
    listed = {history.layer_path(st, n, e) for n in SIZES for e in history.retained(g.state)}
    assert {os.path.join(st, f) for f in os.listdir(st) if ".epoch-" in f} == listed
    if g.state.fenced:  # an interrupted failover: once more finishes it
        r = g.failover(to_epoch=2)
        assert r["committed"] == 2
        for name in SIZES:
            assert_bytes(read_file(g.disk(name).spec.image), expect.history[2][name],
                         f"{name} after the failover finished")


LONG_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from nbd_mc.secondary import history
from nbd_mc.secondary.engine import Group
st, durability = sys.argv[2], sys.argv[3]
with open(sys.argv[4]) as f:
    ops = json.load(f)
g = Group(st, durability=durability, history_policy=history.make_policy(3600, 0, 0))
for op in ops:
    if op[0] == "w":
        g.write(g.disk(op[1]), g.generation, bytes.fromhex(op[3]), op[2])
    else:
        g.commit(op[1])
g.close()
print("done")
"""


# the state file outgrows a page at about commit 140-170 (two disks; each entry is
# ~20 bytes, and the images' paths, as long as pytest's temporary directory, take
# their share): from then on state.before/after-rename are reached at every commit
# in process durability too.  230 commits reach the 15th rename with any path.
@pytest.mark.parametrize("point,durability", [("state.before-rename:15", "process"),
                                              ("state.after-rename:15", "process"),
                                              ("state.before-rename:165", "power")])
def test_a_long_history_survives_kill_in_the_state_write(made, point, durability):
    """Past about 140-170 retained checkpoints the state file outgrows a page and every
    commit replaces it by rename: a kill -9 on either side of the rename, with
    more than 150 checkpoints listed, leaves a state file that loads, lists the
    checkpoints of the old or the new commit, and each of them exact."""
    open_group, model, st, rng, tmp_path = made
    g = open_group(history_policy=EVERY_COMMIT, durability=durability)
    g.close()
    ops = []
    for epoch in range(1, 231):
        name = rng.choice(list(SIZES))
        off = rng.randrange(0, SIZES[name] - 4096)
        data = rng.randbytes(rng.choice((512, 4096)))
        ops.append(["w", name, off, data.hex()])
        model.write(name, off, data)
        ops.append(["c", epoch])
        model.commit(epoch)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = str(tmp_path / "ops.json")
    with open(script, "w") as f:
        json.dump(ops, f)
    r = subprocess.run([sys.executable, "-c", LONG_CHILD, repo, st, durability, script],
                       capture_output=True, text=True, timeout=600,
                       env=subprocess_env(NBD_MC_CRASHPOINT=point))
    assert r.returncode == -9, f"{point} was not reached: {r.returncode} {r.stdout} {r.stderr}"
    assert os.path.getsize(os.path.join(st, "state.json")) > 4096  # past a page
    g = open_group()
    kept = history.retained(g.state)
    committed = g.state.committed
    assert len(kept) > 150 and kept == list(range(1, committed + 1)), (committed, kept)
    for name in SIZES:
        assert_bytes(read_file(g.disk(name).spec.image), model.history[committed][name],
                     f"{name} recovered")
    for n in kept[::8] + kept[-3:]:
        for name in SIZES:
            assert_bytes(read_epoch(g, name, n), model.history[n][name], f"{name}@epoch-{n}")
    for n in (kept[0], kept[len(kept) // 2], kept[-1]):
        for name in SIZES:
            compare_layer(history.layer_path(st, name, n), model.history[n][name], tmp_path)
            assert_check(history.layer_path(st, name, n), allowed=(0,))
    listed = {history.layer_path(st, nm, e) for nm in SIZES for e in kept}
    assert {os.path.join(st, f) for f in os.listdir(st) if ".epoch-" in f} == listed
    # and it goes on: the next commit lists one more
    g.commit(committed + 1)
    assert history.retained(g.state)[-1] == committed + 1
