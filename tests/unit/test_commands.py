"""The command table (nbd_mc/secondary/commands.py) in-process: one schema per command,
checked before anything runs, bound to a real Group without nbdkit."""

from __future__ import annotations

import os

import pytest

from nbd_mc.secondary import commands
from nbd_mc.control import AfterReply
from nbd_mc.secondary.engine import Group
from nbd_mc.errors import BadRequest, CommandNotFound

EXPECTED = {"query-status", "commit", "rollback", "fence", "fence-primary", "failover",
            "new-session", "quit", "claim", "verify-range", "checksum-range", "query-history"}


@pytest.fixture
def group(tmp_path):
    image = tmp_path / "vda.raw"
    image.write_bytes(b"\x01" * 4 * 65536)
    g = Group(str(tmp_path / "state"), [("vda", str(image))])
    yield g
    g.close()


@pytest.fixture
def session(group):
    quits = []
    return commands.Session(group, on_quit=lambda: quits.append(1)), quits


def test_the_table_is_the_whole_vocabulary():
    assert set(commands.COMMANDS) == EXPECTED
    for c in commands.COMMANDS.values():
        assert c.summary and all(a.kind in ("epoch", "boolean", "seconds", "any")
                                 for a in c.arguments)


def test_unknown_commands_name_every_known_one(session):
    handle = commands.handler(session[0])
    with pytest.raises(CommandNotFound) as e:
        handle("comit", {})
    assert all(name in e.value.desc for name in EXPECTED)


@pytest.mark.parametrize("name, arguments, words", [
    ("commit", {}, "commit: missing argument 'epoch'"),
    ("commit", {"epoch": -1}, "'epoch' must be a non-negative integer"),
    ("commit", {"epoch": True}, "'epoch' must be a non-negative integer"),
    ("commit", {"epoch": 1.0}, "'epoch' must be a non-negative integer"),
    ("commit", {"epoch": 1, "force": True}, "commit: unexpected arguments force"),
    ("failover", {"instant": "yes"}, "'instant' must be a boolean"),
    ("failover", {"instant": None}, "'instant' must be a boolean"),
    ("query-status", {"verbose": 1}, "query-status: unexpected arguments verbose"),
    ("quit", {"now": True}, "quit: unexpected arguments now"),
])
def test_the_schema_refuses_before_anything_runs(session, group, name, arguments, words):
    s, quits = session
    before = group.status()
    with pytest.raises(BadRequest, match=words):
        commands.handler(s)(name, arguments)
    assert group.status() == before and not quits


def test_commands_run_on_the_group(session, group):
    handle = commands.handler(session[0])
    assert handle("query-status", {})["committed"] == 0
    assert handle("commit", {"epoch": 1})["committed"] == 1
    assert handle("rollback", {})["restored_clusters"] == 0
    assert handle("fence", {}) == {"generation": 1}
    assert commands.greeting(group) == {"version": commands.__version__, "committed": 1,
                                        "disks": ["vda"], "instance": commands.INSTANCE,
                                        "pid": os.getpid()}


def test_failover_replies_with_the_drive_option_qemu_needs(session, group):
    group.commit(1)
    r = commands.handler(session[0])("failover", {})  # instant defaults to False
    (d,) = r["disks"]
    assert d["format"] == "raw"
    assert d["drive"] == f"file={d['path']},format=raw,if=none,id=vda"


def test_quit_replies_first_and_stops_only_after(session):
    s, quits = session
    result = commands.handler(s)("quit", {})
    assert isinstance(result, AfterReply) and result.result == {}
    assert not quits, "the server runs the action once the reply is sent"
    result.action()
    assert quits == [1]


def test_the_boot_advice_names_each_disk_and_its_drive():
    from nbd_mc.secondary import boot

    disks = boot.with_drive_options([{"name": "vda", "path": "/srv/vda.raw", "format": "raw"}])
    lines = boot.advice(disks)
    assert "same device model as the old primary" in lines[0]
    assert lines[1] == "  vda: /srv/vda.raw (raw)"
    assert lines[2].endswith("-drive file=/srv/vda.raw,format=raw,if=none,id=vda "
                             "-device virtio-blk-pci,drive=vda")


@pytest.mark.parametrize("value", [0, -1, True, "5", None, float("inf"), 10**400])
def test_new_session_refuses_a_stale_after_that_is_not_a_positive_number(session, value):
    handle = commands.handler(session[0])
    with pytest.raises(BadRequest):
        handle("new-session", {"stale_after": value})


@pytest.mark.parametrize("value", [0, -1, True, "5", None, float("inf"), 10**400])
def test_claim_refuses_a_stale_after_that_is_not_a_positive_number(session, value):
    handle = commands.handler(session[0])
    with pytest.raises(BadRequest):
        handle("claim", {"stale_after": value})


def test_claim_is_a_new_session_with_a_new_writer(session):
    """Both raise the generation (older connections cannot write); only claim grants
    a new writer id, and it sets stale_after as new-session does."""
    s = session[0]
    handle = commands.handler(s)
    g0 = s.group.state.generation
    c = handle("claim", {"stale_after": 7})
    assert c["generation"] == g0 + 1 and c["writer"] == s.group.state.writer
    assert c["group_id"] == s.group.state.group_id and "committed" in c
    assert s.group.stale_after == 7
    n = handle("new-session", {})
    assert n["generation"] == g0 + 2 and s.group.state.writer == c["writer"]
    c2 = handle("claim", {})
    assert c2["generation"] == g0 + 3 and c2["writer"] != c["writer"]


def test_a_writer_commit_during_a_failover_waits_and_hears_promoted(session, group):
    """A commit naming its writer that arrives while a failover runs (fenced, not yet
    promoted) waits for it and is refused as *promoted*: protect must tell the user
    to stop a VM that was failed over, not to start a fresh secondary.  The writer
    check once ran outside the failover's lock and saw the group merely fenced."""
    import threading
    from nbd_mc.errors import Fenced
    handle = commands.handler(session[0])
    writer_id = handle("claim", {})["writer"]
    handle("commit", {"epoch": 1, "writer": writer_id})
    inside, release = threading.Event(), threading.Event()
    rollback = group._rollback_locked

    def held_rollback():
        inside.set()  # fenced=True is persisted, the promotion not yet
        release.wait(30)
        return rollback()
    group._rollback_locked = held_rollback
    failover = threading.Thread(target=handle, args=("failover", {}))
    failover.start()
    assert inside.wait(30)
    assert group.state.fenced and group.state.role != "primary"
    result = {}
    engine_commit = group.commit

    def entering_commit(*a, **kw):  # the failover goes on once the commit is under way
        release.set()
        return engine_commit(*a, **kw)
    group.commit = entering_commit

    def commit():
        try:
            result["reply"] = handle("commit", {"epoch": 2, "writer": writer_id})
        except Fenced as e:
            result["refused"] = e.desc
        finally:
            release.set()
    committer = threading.Thread(target=commit)
    committer.start()
    failover.join(30)
    committer.join(30)
    assert "promoted" in result.get("refused", ""), result
