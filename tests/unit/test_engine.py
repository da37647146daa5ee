"""The engine's rules in-process, without nbdkit: a real Group on real files.

What a secondary accepts and refuses at each step of its life (commit, retry,
rollback, fence, failover, instant failover, recovery after a crash), checked
against a byte model, with `qemu-img check` as the oracle for the overlays.
The same rules over the wire (nbdkit, the CLI) are in tests/system/test_cli.py.
"""

from __future__ import annotations

import os
import threading

import pytest

from nbd_mc.secondary import disk
from nbd_mc.secondary.engine import Group, undo_status
from nbd_mc.errors import EpochMismatch, Fenced, IOFailure, NotProtected, StateError
from support.servers import GroupModel, assert_bytes, assert_check, group_on_images, read_file

C = 65536
SIZES = {"vda": 8 * C, "vdb": 5 * C}


@pytest.fixture
def made(tmp_path):
    """A new two-disk group and its model; the group is closed afterwards."""
    with group_on_images(tmp_path, SIZES) as (open_group, model, st, _rng):
        yield open_group, model, st


def write(g: Group, model: GroupModel, name: str, offset: int, data: bytes, generation=None):
    g.write(g.disk(name), g.generation if generation is None else generation, data, offset)
    model.write(name, offset, data)


def read(g: Group, name: str, committed: bool = False) -> bytes:
    d = g.disk(name)
    buf = bytearray(d.size)
    (g.read_committed if committed else g.read)(d, memoryview(buf), 0)
    return bytes(buf)


def assert_group(g: Group, model: GroupModel, what: str) -> None:
    for name in SIZES:
        assert_bytes(read(g, name), bytes(model.live[name]), f"{what}: {name} live")
        if g.committed:
            assert_bytes(read(g, name, committed=True), model.committed[name],
                         f"{what}: {name}@committed")


def test_undo_status_is_the_one_rule():
    assert undo_status(5, 5) == "current"
    assert undo_status(4, 5) == "stale"
    for epoch in (None, 6, 3, 0):
        assert undo_status(epoch, 5) == "foreign"
    assert undo_status(0, 0) == "current" and undo_status(None, 0) == "foreign"


def test_commit_rules(made):
    open_group, model, _ = made
    g = open_group()
    st = g.status()
    assert (st["committed"], st["open_epoch"], st["protected"]) == (0, 1, False)
    assert not g.has_committed_view
    with pytest.raises(IOFailure, match="nothing is committed yet"):
        read(g, "vda", committed=True)
    with pytest.raises(NotProtected):
        g.rollback()
    with pytest.raises(NotProtected):
        g.failover()
    with pytest.raises(EpochMismatch, match="epoch 0 is committed") as refused:
        g.commit(2)
    assert refused.value.details == {"committed": 0}  # every commit error says where we stand
    write(g, model, "vda", 100, b"\x01" * 3000)  # epoch 0: the initial sync, no undo
    assert g.status()["disks"][0]["preserved_clusters"] == 0
    assert g.commit(1)["committed"] == 1
    model.commit(1)
    assert g.commit(1) == {"committed": 1, "seconds": 0.0, "retry": True}
    with pytest.raises(EpochMismatch):
        g.commit(0)
    with pytest.raises(EpochMismatch, match="open epoch is 2") as refused:
        g.commit(3)
    assert refused.value.details == {"committed": 1} and g.has_committed_view
    assert g.status()["protected"] is True
    write(g, model, "vda", 5000, b"\x11" * 100000)  # clusters 0..1
    write(g, model, "vdb", 4 * C - 1, b"\x22" * 2)  # clusters 3 and 4
    assert_group(g, model, "after writes in epoch 2")
    st = g.status()
    assert [d["preserved_clusters"] for d in st["disks"]] == [2, 2]
    r = g.rollback()
    assert r["committed"] == 1 and r["restored_clusters"] == 4
    model.rollback()
    assert_group(g, model, "after rollback")
    assert g.rollback()["restored_clusters"] == 0  # nothing to undo: still fine
    write(g, model, "vdb", 0, b"\x33" * C)
    g.commit(2)
    model.commit(2)
    assert_group(g, model, "after commit 2")
    assert [d["preserved_clusters"] for d in g.status()["disks"]] == [0, 0]
    stats = g.status()["stats"]
    assert (stats["commits"], stats["rollbacks"], stats["writes"]) == (2, 2, 4)
    g.close()
    for name in SIZES:
        assert_check(os.path.join(made[2], f"{name}.undo.qcow2"), allowed=(0,))


def test_fence_refuses_old_connections_and_checkpoints(made):
    open_group, model, _ = made
    g = open_group()
    g.commit(1)
    model.commit(1)
    old = g.generation
    assert g.fence() == {"generation": old + 1}
    with pytest.raises(Fenced, match="fenced"):
        write(g, model, "vda", 0, b"x" * 512, generation=old)
    with pytest.raises(Fenced, match="fenced"):
        write(g, model, "vda", 0, b"x" * 512)  # a new connection too: fenced is fenced
    with pytest.raises(Fenced):
        g.commit(2)
    assert g.status()["stats"]["refused_writes"] == 2
    assert_group(g, model, "nothing was written")


def test_failover_returns_to_the_last_commit_and_promotes(made):
    open_group, model, _ = made
    g = open_group()
    write(g, model, "vda", 0, b"\x44" * 1000)
    g.commit(1)
    model.commit(1)
    write(g, model, "vda", 3 * C, b"\x55" * C)
    old = g.generation
    r = g.failover()
    model.rollback()
    assert r["committed"] == 1
    assert [(d["name"], d["format"]) for d in r["disks"]] == [("vda", "raw"), ("vdb", "raw")]
    assert all("drive" not in d for d in r["disks"]), "QEMU vocabulary is nbd_mc/secondary/boot.py's"
    assert_group(g, model, "after failover")
    st = g.status()
    assert (st["role"], st["fenced"], st["protected"]) == ("primary", False, False)
    with pytest.raises(Fenced, match="opened before the last fence"):
        write(g, model, "vda", 0, b"x", generation=old)
    write(g, model, "vda", 0, b"new primary")  # a connection opened after the failover
    assert g.status()["disks"][0]["preserved_clusters"] == 0, "a primary keeps no undo"
    with pytest.raises(Fenced, match="promoted"):
        g.commit(2)
    with pytest.raises(NotProtected):
        g.rollback()
    assert g.failover()["committed"] == 1, "failover is idempotent"


def test_instant_failover_hands_out_the_overlays(made):
    open_group, model, st = made
    g = open_group()
    g.commit(1)
    model.commit(1)
    write(g, model, "vdb", C, b"\x66" * C)
    r = g.failover(instant=True)
    assert [(d["format"], d["path"]) for d in r["disks"]] == [
        ("qcow2", os.path.join(st, f"{n}.undo.qcow2")) for n in SIZES]
    assert g.read_only
    with pytest.raises(Fenced, match="handed out"):
        write(g, model, "vda", 0, b"x")
    g.close()
    with pytest.raises(StateError, match="handed out by an instant failover"):
        open_group()


def test_recovery_after_a_crash_applies_the_open_epochs_undo(made):
    open_group, model, st = made
    g = open_group(durability="power")
    write(g, model, "vda", 0, b"\x77" * (2 * C))
    g.commit(1)
    model.commit(1)
    write(g, model, "vda", C // 2, b"\x88" * C)
    write(g, model, "vdb", 4 * C, b"\x99" * 10)
    g.close()  # as a crash leaves it: undo data of epoch 2 in the overlays
    g = open_group()
    assert g.durability == "power", "a restart keeps the durability mode"
    assert g.recovered == {"committed": 1, "restored_clusters": 3, "stale_dropped": []}
    model.rollback()
    assert_group(g, model, "recovered")
    for name in SIZES:
        assert_bytes(read_file(g.disk(name).spec.image), model.committed[name], name)


def test_a_stale_overlay_is_dropped_never_applied(made):
    """A crash between persisting commit N and dropping: the overlay still returns
    to N-1; applying it would take the disk back before the commit."""
    open_group, model, st = made
    g = open_group()
    g.commit(1)
    model.commit(1)
    write(g, model, "vda", 0, b"\xaa" * C)
    g._persist(committed=2)  # the state file says 2 ...
    g.close()                # ... and the drop never happened
    model.commit(2)
    g = open_group()
    assert g.recovered["stale_dropped"] == ["vda", "vdb"] and g.recovered["restored_clusters"] == 0
    assert_group(g, model, "after recovery")


def test_a_foreign_overlay_is_refused(made):
    open_group, _, st = made
    g = open_group()
    g.commit(1)
    g.commit(2)
    g.close()
    state = os.path.join(st, "state.json")
    text = open(state).read().replace('"committed": 2', '"committed": 5')
    with open(state, "w") as f:
        f.write(text)
    with pytest.raises(StateError, match="returns to epoch 2, but the state file says 5"):
        open_group()


def test_the_disk_list_and_sizes_are_checked(made, tmp_path):
    open_group, _, st = made
    open_group().close()
    image = str(tmp_path / "vda.raw")
    os.truncate(image, SIZES["vda"] + 512)
    with pytest.raises(StateError, match="resized behind"):
        open_group()
    with pytest.raises(StateError, match="belongs to disks"):
        Group(st, [("vda", image)])
    with pytest.raises(Exception, match="bad disk"):
        disk.parse_disk_spec("a@b=/x")


def test_parallel_writers_lose_no_counts_and_no_undo(made):
    """nbdkit's parallel thread model: many requests in the group at once."""
    open_group, model, _ = made
    g = open_group()
    g.commit(1)
    model.commit(1)
    threads, per_thread = 4, 200
    errors = []

    def writer(k):
        try:
            for i in range(per_thread):
                offset = (i * 4096 + k * 1024) % SIZES["vda"]
                g.write(g.disk("vda"), g.generation, bytes([k + 1]) * 512, offset)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=writer, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    st = g.status()
    assert st["stats"]["writes"] == threads * per_thread
    assert st["stats"]["bytes_written"] == threads * per_thread * 512
    assert st["disks"][0]["preserved_clusters"] == SIZES["vda"] // C
    assert_bytes(read(g, "vda", committed=True), model.committed["vda"], "committed view")
    g.rollback()
    assert_bytes(read(g, "vda"), model.committed["vda"], "after rollback")
