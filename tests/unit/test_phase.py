"""protect's phases (nbd_mc/primary/phase.py) and what observers hear of them,
through a real Protector's _enter with its real observer (console, metrics file,
event stream); no QEMU, no secondary."""

import io
import json

import pytest

from nbd_mc.primary.console import Console
from nbd_mc.primary.metrics import PROTECT_STATES
from nbd_mc.primary.options import Options, parse_drives, parse_nbd_uri
from nbd_mc.primary.phase import TRANSITIONS, BadTransition, Phase, check_transition
from nbd_mc.primary.protect import Protector


def test_every_phase_has_a_state_observers_know_or_is_quiet():
    for p in Phase:
        assert p.state is None or p.state in PROTECT_STATES
        assert p.heard == (p.state is not None and p is not Phase.PROTECTED)


def test_every_phase_but_the_ends_can_end():
    for p in Phase:
        if p in (Phase.DETACHED, Phase.FAILED):
            assert not TRANSITIONS[p]
        else:
            assert {Phase.DETACHED, Phase.FAILED} <= TRANSITIONS[p]


def test_every_phase_is_reachable_from_connecting():
    seen, todo = {Phase.CONNECTING}, [Phase.CONNECTING]
    while todo:
        for n in TRANSITIONS[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    assert seen == set(Phase)


def test_only_a_sync_puts_the_secondary_in_step():
    into = {p for p in Phase if Phase.IN_STEP in TRANSITIONS[p]}
    assert into == {Phase.SYNCING, Phase.RESYNCING}
    assert [p for p in Phase if p.in_step] == [Phase.IN_STEP, Phase.PROTECTED]
    # protected only by a commit in step; never straight back in step after an outage
    assert {p for p in Phase if Phase.PROTECTED in TRANSITIONS[p]} == {Phase.IN_STEP}
    assert Phase.IN_STEP not in TRANSITIONS[Phase.LOST]


@pytest.mark.parametrize("before,after", [(Phase.CONNECTING, Phase.IN_STEP),
                                          (Phase.LOST, Phase.IN_STEP),
                                          (Phase.PROTECTED, Phase.RESYNCING),
                                          (Phase.STOPPING, Phase.LOST),
                                          (Phase.DETACHED, Phase.FAILED)])
def test_a_transition_off_the_table_is_a_bug(before, after):
    with pytest.raises(BadTransition):
        check_transition(before, after)


def protector(tmp_path):
    opts = Options(qmp="/nonexistent.qmp", drives=parse_drives(["drive0=vda"]),
                   target=parse_nbd_uri("nbd+unix:///?socket=/nonexistent.sock"),
                   control="/nonexistent.ctl", events=str(tmp_path / "events.jsonl"))
    out = io.StringIO()
    return Protector(opts, Console(out), stop=lambda: False), out


def test_what_observers_hear_of_a_run_with_an_outage(tmp_path):
    p, _ = protector(tmp_path)
    for phase in (Phase.SYNCING, Phase.IN_STEP, Phase.PROTECTED, Phase.LOST, Phase.LOST,
                  Phase.RESYNCING, Phase.IN_STEP, Phase.PROTECTED, Phase.STOPPING,
                  Phase.DETACHED):
        p._enter(phase, "EOF" if phase is Phase.LOST else None)
    with open(tmp_path / "events.jsonl") as f:
        events = [json.loads(line) for line in f]
    states = [e["state"] for e in events if e["event"] == "state"]
    assert states == ["syncing", "checkpointing", "lost", "lost", "resyncing", "checkpointing",
                      "detached"]
    assert [e["reason"] for e in events if e.get("state") == "lost"] == ["EOF", "EOF"]
    assert p.observer.metrics.state == "detached"
