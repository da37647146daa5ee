"""The mode table (nbd_mc/secondary/mode.py) over every mode and every operation.

Two halves: the table itself, checked exhaustively against what the protocol
says each mode allows; and the engine, driven into each mode on real files,
deciding each operation the way the table says (the table is the engine's only
rule, so a check that the engine and the table agree everywhere is what keeps a
re-derived rule from creeping back)."""

from __future__ import annotations

import errno

import pytest

from nbd_mc.errors import Fenced, NbdMcError, NotProtected
from nbd_mc.secondary import mode, writer
from nbd_mc.secondary.engine import Group
from nbd_mc.secondary.mode import EXPORT_KINDS, OPERATIONS, TABLE, Mode
from nbd_mc.secondary.state import GroupState
from support.servers import make_image

import random

#: What the protocol documents (docs/control-protocol.md, "Modes"), written out
#: by hand as the oracle: the operations each mode allows.
ALLOWED = {
    Mode.SECONDARY: set(OPERATIONS) - {"fence-primary"},
    Mode.FENCED: set(OPERATIONS) - {"fence-primary", "write", "commit", "claim", "new-session"},
    Mode.PROMOTED: {"open writer", "read live", "read writer", "write", "fence-primary",
                    "failover"},
    Mode.PROMOTED_FENCED: {"open writer", "read live", "read writer", "fence", "fence-primary",
                           "failover"},
    Mode.HANDED_OUT: {"fence", "failover"},
}

STATES = {
    Mode.SECONDARY: GroupState(committed=2, generation=3, writer="g3-00000000"),
    Mode.FENCED: GroupState(committed=2, generation=4, fenced=True, writer="g3-00000000"),
    Mode.PROMOTED: GroupState(committed=2, generation=4, role="primary", writer="g4-11111111"),
    Mode.PROMOTED_FENCED: GroupState(committed=2, generation=5, role="primary", fenced=True,
                                     writer="g4-11111111"),
    Mode.HANDED_OUT: GroupState(committed=2, generation=4, fenced=True, role="primary",
                                handoff="instant"),
}


def test_every_mode_decides_every_operation():
    assert set(TABLE) == set(Mode)
    for m, row in TABLE.items():
        assert set(row) == set(OPERATIONS), m
    assert {f"{op} {k}" for op in ("open", "read") for k in EXPORT_KINDS} <= set(OPERATIONS)


def test_the_states_name_their_modes():
    for m, state in STATES.items():
        assert mode.mode_of(state) is m


@pytest.mark.parametrize("m", list(Mode), ids=lambda m: m.value)
@pytest.mark.parametrize("op", OPERATIONS)
def test_each_mode_allows_exactly_what_the_protocol_says(m, op):
    state = STATES[m]
    e = mode.refusal(state, op, "vda")
    if op in ALLOWED[m]:
        assert e is None and mode.allowed(state, op)
        return
    assert isinstance(e, NbdMcError) and not mode.allowed(state, op)
    assert e.rule == f"{m.value}: {op}"
    verb = op.partition(" ")[0]
    assert e.desc.startswith((f"{verb} refused:", "vda", "the disks were handed out")), e.desc
    assert "{" not in e.desc, e.desc    # every placeholder filled in
    # "not yours to write": a refused write says EROFS, a refused read EPERM (never EIO
    # or EINVAL, which would tell QEMU the disk is broken or the request wrong)
    if op == "write":
        assert e.errno == errno.EROFS and isinstance(e, Fenced)
    elif op.startswith("read"):
        assert e.errno == errno.EPERM
    assert e.errno not in (errno.EIO, errno.EINVAL)


def test_fence_is_refused_where_it_would_hurt_the_new_primary():
    e = mode.refusal(STATES[Mode.PROMOTED], "fence")
    assert isinstance(e, Fenced)
    assert "g4-11111111" in e.desc and "nbd-mc fence-primary" in e.desc


def test_writer_decide_asks_the_table_for_each_kind():
    for m, state in STATES.items():
        names = {"live": "vda", "committed": "vda@committed",
                 "writer": f"vda@{state.writer or 'g1-00000000'}"}
        for kind, name in names.items():
            a = writer.decide(state, name)
            assert a.kind == kind
            if not mode.allowed(state, f"open {kind}"):
                assert a.refusal, (m, kind)
            elif kind != "writer" or state.writer:
                assert a.refusal is None, (m, kind, a.refusal)


# --- the engine in each mode ----------------------------------------------------------

C = 65536


@pytest.fixture
def group_in(tmp_path):
    """A function: a real one-disk Group driven into a mode the way a user gets there."""
    opened = []

    def make(m: Mode) -> Group:
        d = tmp_path / f"{m.value}-{len(opened)}"
        d.mkdir()
        make_image(str(d / "vda.raw"), 4 * C, random.Random(1))
        g = Group(str(d / "state"), [("vda", str(d / "vda.raw"))])
        opened.append(g)
        g.commit(1)
        g.claim()
        if m is Mode.FENCED:
            g.fence()
        elif m is Mode.PROMOTED:
            g.failover()
        elif m is Mode.PROMOTED_FENCED:
            g.failover()
            g.fence_primary()
        elif m is Mode.HANDED_OUT:
            g.failover(instant=True)
        assert g.mode is m
        return g

    yield make
    for g in opened:
        g.close()


def _run(g: Group, op: str):
    d = g.disk("vda")
    buf = memoryview(bytearray(4096))
    if op.startswith("read "):
        return g.check_read(op.split()[1])
    if op.startswith("open "):
        kind = op.split()[1]
        if kind == "epoch":     # which epochs are retained is history's rule (test_history)
            mode.check(g.state, op, "vda@epoch-1")
            return None
        name = {"live": "vda", "committed": "vda@committed", "writer": f"vda@{g.state.writer}"}
        a = writer.decide(g.state, name[kind])
        if a.refusal:
            raise Fenced(a.refusal)
        return a
    return {
        "write": lambda: g.write(d, g.generation, bytes(4096), 0),
        "commit": lambda: g.commit(g.committed),       # a retry: allowed wherever commit is
        "claim": lambda: g.claim(),
        "new-session": lambda: g.new_session(),
        "rollback": lambda: g.rollback(),
        "fence": lambda: g.fence(),
        "fence-primary": lambda: g.fence_primary(),
        "failover": lambda: g.failover(instant=g.mode is Mode.HANDED_OUT),
        "checksum-range": lambda: g.check_mode("checksum-range"),
        "verify-range": lambda: g.check_mode("verify-range"),
    }[op]()


@pytest.mark.parametrize("m", list(Mode), ids=lambda m: m.value)
def test_the_engine_decides_every_operation_from_the_table(group_in, m):
    for op in OPERATIONS:
        g = group_in(m) if op in ("fence", "fence-primary", "claim", "new-session",
                                  "rollback", "failover") else _shared(group_in, m)
        if op == "open writer" and not g.state.writer:
            continue    # handed out: there is no writer export to name
        allowed = op in ALLOWED[m]
        try:
            _run(g, op)
        except NbdMcError as e:
            assert not allowed, f"{m.value}: {op} refused: {e.desc}"
            assert isinstance(e, (Fenced, NotProtected)), (op, e)
        else:
            assert allowed, f"{m.value}: {op} was allowed"


_cache: dict = {}


def _shared(group_in, m):
    """One group per mode for the operations that do not change the mode."""
    key = (id(group_in), m)
    if key not in _cache:
        _cache[key] = group_in(m)
    return _cache[key]


def test_a_stray_fence_after_a_failover_leaves_the_new_primary_writing(group_in):
    """Issue 23 #1: on main, one `fence` after an in-place failover cut the new
    primary off its own disk for good (saved `fenced`, nothing cleared it)."""
    g = group_in(Mode.PROMOTED)
    generation = g.generation
    with pytest.raises(Fenced, match="fence-primary"):
        g.fence()
    assert g.mode is Mode.PROMOTED and g.generation == generation
    g.write(g.disk("vda"), generation, b"x" * 4096, 0)     # the open connection still writes


def test_fence_primary_stops_the_new_primary_and_failover_gives_the_disk_back(group_in):
    g = group_in(Mode.PROMOTED)
    before = g.generation
    g.fence_primary()
    with pytest.raises(Fenced, match="fence-primary"):
        g.write(g.disk("vda"), g.generation, b"x" * 4096, 0)   # a connection opened after it
    g.failover()
    assert g.mode is Mode.PROMOTED and not g.state.fenced
    g.write(g.disk("vda"), g.generation, b"y" * 4096, 0)
    assert g.generation == before + 1   # connections from before fence-primary stay cut off
