"""protect's phase: where a run is between attaching and detaching, as one value.

A run of `nbd-mc protect` (protect.py) goes through a few phases, and what it may
do depends on which: a commit only in step, a probe of the secondary only while it
is lost, a resync only once it answers again.  The phase is one field,
``Protector.phase``, changed only by ``Protector._enter`` along TRANSITIONS (the
unit test tests/unit/test_phase.py walks the table); everything else protect keeps
(the control channel, the mirrors) follows from it as the table below says.

    CONNECTING --> SYNCING --> IN_STEP --> PROTECTED
        |            |   ^        |            |
        |            |   |        v            v
        +----------> LOST <-------+------------+
                      |  ^
                      v  |
                    RESYNCING --> IN_STEP ...

    any phase --> DETACHED | FAILED (the end); a (re)sync or a checkpoint that a
    stop request cut short --> STOPPING --> DETACHED | FAILED

========== ===================================================== ==================
phase      what holds                                            metrics/--events
========== ===================================================== ==================
CONNECTING the secondary's status read, QEMU's drives checked;   connecting
           nothing of ours in QEMU yet
SYNCING    the first (re)sync of the run: claimed, NBD nodes     syncing
           attached, the copy runs; not protected yet
RESYNCING  the secondary came back after an outage; the same     resyncing
IN_STEP    mirrors ready: the secondary holds what the VM wrote; checkpointing
           checkpoints run, none committed since the sync
PROTECTED  a commit since the sync: a failover returns to it     checkpointing
LOST       the secondary is away: mirrors dropped (``mirrors``   lost
           None; ``drop_pending`` if QEMU was too busy to drop
           them), control channel closed (``ctl`` None); the VM
           runs unprotected; probing with backoff
STOPPING   a stop request cut a (re)sync or checkpoint short:    (none: said at
           mirrors dropped, the run ends                         the end)
DETACHED   the end: detached cleanly (exit 0)                    detached
FAILED     the end: protection could not go on (exit 1)          failed
========== ===================================================== ==================

Observers (observer.py: the console, the metrics file, the event stream) hear of
a new phase through its ``state`` -- the ``nbd_mc_protect_state`` names, which
stay as they were -- except where the table says nothing new happened for them:
IN_STEP -> PROTECTED (the event stream says ``protected`` at that commit itself)
and STOPPING.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    CONNECTING = "connecting"
    SYNCING = "syncing"
    RESYNCING = "resyncing"
    IN_STEP = "in step"
    PROTECTED = "protected"
    LOST = "lost"
    STOPPING = "stopping"
    DETACHED = "detached"
    FAILED = "failed"

    @property
    def state(self) -> str | None:
        """Its ``nbd_mc_protect_state`` (metrics.PROTECT_STATES), or None."""
        return _STATES[self]

    @property
    def in_step(self) -> bool:
        """The secondary holds what the VM wrote: checkpoints may commit."""
        return self in (Phase.IN_STEP, Phase.PROTECTED)

    @property
    def heard(self) -> bool:
        """Entering it is news for the observers (module docstring)."""
        return self not in (Phase.PROTECTED, Phase.STOPPING)


_STATES = {Phase.CONNECTING: "connecting", Phase.SYNCING: "syncing",
           Phase.RESYNCING: "resyncing", Phase.IN_STEP: "checkpointing",
           Phase.PROTECTED: "checkpointing", Phase.LOST: "lost", Phase.STOPPING: None,
           Phase.DETACHED: "detached", Phase.FAILED: "failed"}

_END = {Phase.DETACHED, Phase.FAILED}

#: Where each phase may go.  LOST -> LOST: the secondary answered a probe but was
#: lost again before its resync started (another outage).  LOST -> SYNCING: the
#: first (re)sync of the run never finished, so the next is still the initial one.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.CONNECTING: frozenset({Phase.SYNCING, Phase.LOST, Phase.STOPPING, *_END}),
    Phase.SYNCING: frozenset({Phase.IN_STEP, Phase.LOST, Phase.STOPPING, *_END}),
    Phase.RESYNCING: frozenset({Phase.IN_STEP, Phase.LOST, Phase.STOPPING, *_END}),
    Phase.IN_STEP: frozenset({Phase.PROTECTED, Phase.LOST, Phase.STOPPING, *_END}),
    Phase.PROTECTED: frozenset({Phase.LOST, Phase.STOPPING, *_END}),
    Phase.LOST: frozenset({Phase.SYNCING, Phase.RESYNCING, Phase.LOST, Phase.STOPPING,
                           *_END}),
    Phase.STOPPING: frozenset(_END),
    Phase.DETACHED: frozenset(),
    Phase.FAILED: frozenset(),
}


class BadTransition(RuntimeError):
    """A change of phase the table does not allow: a bug in protect, never the
    user's or the secondary's doing."""


def check_transition(before: Phase, after: Phase) -> None:
    if after not in TRANSITIONS[before]:
        raise BadTransition(f"protect cannot go from {before.name} to {after.name}")
