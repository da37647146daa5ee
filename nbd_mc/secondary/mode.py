"""The group's mode, and the one table of what each mode allows.

The state file keeps ``role``, ``fenced`` and ``handoff`` as separate fields
(nbd_mc/secondary/state.py); only five combinations exist, and what each allows
was once re-derived wherever it mattered.  Here it is written once: ``mode_of``
names the combination, ``TABLE`` says for every mode and every operation whether
it is allowed and, if not, the sentence and error class of the refusal.  The
engine asks ``refusal()`` before every open, read, write, commit, claim, fence and
range request; the nbdkit adapter only translates the answer into an errno.

Modes:

- ``secondary``: a replica the primary mirrors into; everything is allowed.
- ``fenced``: a replica cut off by ``fence`` (or a failover half done): nobody
  writes, nothing commits, reads go on.
- ``promoted``: failed over in place.  The images are the new primary's disk,
  written through its writer export ``NAME@WRITER``.  ``fence`` is *refused*
  here: fencing exists to protect the side a failover promotes, and a stray
  ``fence`` (an operator, an old script) would cut that side off its own disk.
  The operator who really wants the new primary to stop writing says so with
  ``fence-primary``.
- ``promoted-fenced``: a promoted group after ``fence-primary``: nobody writes;
  ``failover`` (run again on this node) gives the new primary its disk back.
- ``handed-out``: after ``failover --instant`` the overlays belong to the new
  primary, which opens them itself: nothing is served.

``broken`` (an I/O failure of the state file or an overlay) is not a mode: it
refuses what writes, after the mode allowed it, until a restart (engine.py).

Not the rule here: which export *name* a connection may open (a superseded
writer id, the plain name after a claim) is nbd_mc/secondary/writer.py's, and a
connection's generation (opened before the last fence, claim or session) is
checked by the engine on every write.

To add a kind of export (e.g. a read-only view of a retained epoch), add it to
``EXPORT_KINDS`` and give every mode an ``open KIND`` and ``read KIND`` entry:
the unit test over modes x operations fails until each mode has one.

Standard library only: this runs inside nbdkit's embedded Python.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import Enum

from ..errors import Fenced, NbdMcError, NotProtected


class Mode(str, Enum):
    SECONDARY = "secondary"
    FENCED = "fenced"
    PROMOTED = "promoted"
    PROMOTED_FENCED = "promoted-fenced"
    HANDED_OUT = "handed-out"


def mode_of(state) -> Mode:
    """The mode a state.GroupState is in."""
    if state.handoff:
        return Mode.HANDED_OUT
    if state.role == "primary":
        return Mode.PROMOTED_FENCED if state.fenced else Mode.PROMOTED
    return Mode.FENCED if state.fenced else Mode.SECONDARY


#: The kinds of export a connection can open (writer.Access.kind).
EXPORT_KINDS = ("live", "committed", "writer", "epoch")
#: Every operation the table decides.  "open KIND" / "read KIND": a connection to
#: an export of that kind; "write": a write, zero or trim.
OPERATIONS = tuple(f"{op} {k}" for op in ("open", "read") for k in EXPORT_KINDS) + (
    "write", "commit", "claim", "new-session", "rollback", "fence", "fence-primary",
    "failover", "checksum-range", "verify-range")


@dataclass(frozen=True)
class Refusal:
    """A refused operation: the error class, the errno an NBD client gets, and the
    sentence (``{op}``, ``{generation}``, ``{writer}``, ``{name}``, ``{export}``
    are filled in from the state and the request)."""

    error: type
    sentence: str
    errno: int = errno.EPERM


#: The reasons, each written once.
_FENCED = "{op} refused: the group is fenced (generation {generation})"
_PROMOTED = "{op} refused: this node was promoted to primary by a failover"
_HANDED = "{op} refused: the disks were handed out by an instant failover"
_PRIMARY_FENCED = ("{op} refused: the new primary was stopped by `nbd-mc fence-primary` "
                   "(generation {generation}); `nbd-mc failover` on this node gives it its "
                   "disk back")
_NOT_PROMOTED = ("fence-primary refused: this node is a secondary, there is no new primary "
                 "to stop (`nbd-mc fence` stops the writes of the primary that mirrors "
                 "into it)")
_OPEN_HANDED = ("the disks were handed out by an instant failover: the images hold "
                "uncommitted data under the new primary's overlays; nothing is served")
_OPEN_PLAIN_PROMOTED = ("{name}: promoted by a failover; only the new primary's export "
                        "{export} is served for this disk")
_NO_COMMITTED_VIEW = ("{name}: no committed view after a failover (the images are the new "
                      "primary's disk)")

_WRITE_FENCED = Refusal(Fenced, "write refused: the group is fenced (generation {generation})",
                        errno.EROFS)

SECONDARY = {op: None for op in OPERATIONS} | {
    "fence-primary": Refusal(NotProtected, _NOT_PROMOTED),
}
FENCED = SECONDARY | {
    "write": _WRITE_FENCED,
    "commit": Refusal(Fenced, _FENCED),
    "claim": Refusal(Fenced, _FENCED),
    "new-session": Refusal(Fenced, _FENCED),
}
PROMOTED = {op: None for op in OPERATIONS} | {
    "open live": Refusal(Fenced, _OPEN_PLAIN_PROMOTED, errno.EACCES),
    "open committed": Refusal(Fenced, _NO_COMMITTED_VIEW, errno.EACCES),
    "read committed": Refusal(Fenced, "read refused: no committed view after a failover"),
    "open epoch": Refusal(Fenced, "{name}: no history after a failover (the images are the "
                                  "new primary's disk)", errno.EACCES),
    "read epoch": Refusal(Fenced, "read refused: no history after a failover"),
    "commit": Refusal(Fenced, _PROMOTED),
    "claim": Refusal(Fenced, _PROMOTED + "; its writer is {writer} (see `nbd-mc status`)"),
    "new-session": Refusal(Fenced, _PROMOTED),
    "rollback": Refusal(NotProtected, "rollback refused: promoted to primary, no undo data "
                                      "is kept"),
    "fence": Refusal(Fenced, _PROMOTED + ": its images are the new primary's disk (writer "
                     "{writer}), and a fence would cut the new primary off it. To stop the "
                     "new primary writing, run `nbd-mc fence-primary`"),
    "checksum-range": Refusal(NotProtected, _PROMOTED + ", this is no replica any more"),
    "verify-range": Refusal(NotProtected, _PROMOTED + ", there is no committed view"),
}
PROMOTED_FENCED = PROMOTED | {
    "write": Refusal(Fenced, _PRIMARY_FENCED.replace("{op}", "write"), errno.EROFS),
    "fence": None,               # stopped already; a fence changes nothing more
}
HANDED_OUT = {op: Refusal(Fenced, _HANDED) for op in OPERATIONS} | {
    **{f"open {k}": Refusal(Fenced, _OPEN_HANDED, errno.EACCES) for k in EXPORT_KINDS},
    "write": Refusal(Fenced, _HANDED, errno.EROFS),
    "rollback": PROMOTED["rollback"],
    "fence-primary": Refusal(Fenced, _HANDED + ": the new primary opens its overlays "
                                              "itself, not through this server"),
    "fence": None,               # nothing is served; harmless
    "failover": None,            # idempotent: the same answer again
    "checksum-range": PROMOTED["checksum-range"],
    "verify-range": PROMOTED["verify-range"],
}

#: What each mode allows: None, or the Refusal.
TABLE: dict[Mode, dict[str, Refusal | None]] = {
    Mode.SECONDARY: SECONDARY,
    Mode.FENCED: FENCED,
    Mode.PROMOTED: PROMOTED,
    Mode.PROMOTED_FENCED: PROMOTED_FENCED,
    Mode.HANDED_OUT: HANDED_OUT,
}


def refusal(state, op: str, name: str = "") -> NbdMcError | None:
    """The error refusing ``op`` in ``state``'s mode (to raise), or None if allowed.

    The error carries ``rule`` ("MODE: OP") so the server log can say which
    entry of the table refused."""
    mode = mode_of(state)
    rule = TABLE[mode][op]
    if rule is None:
        return None
    export = f"{name.partition('@')[0]}@{state.writer}" if state.writer else "(none)"
    e = rule.error(rule.sentence.format(op=op.partition(" ")[0], generation=state.generation,
                                        writer=state.writer, name=name, export=export))
    e.errno = rule.errno
    e.rule = f"{mode.value}: {op}"
    return e


def check(state, op: str, name: str = "") -> None:
    """Raise the refusal of ``op`` in ``state``'s mode, if any."""
    e = refusal(state, op, name)
    if e is not None:
        raise e


def allowed(state, op: str) -> bool:
    return TABLE[mode_of(state)][op] is None
