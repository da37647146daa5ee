"""The control vocabulary: every command, its argument schema and what it runs.

One table, so that the names a client may send, the arguments each takes and
their types are stated once; the control server (nbd_mc/control/server.py)
knows nothing of them, and the nbdkit adapter only binds the table to its
group.  docs/control-protocol.md lists the same commands for people.

Standard library only: this runs inside nbdkit's embedded Python.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Callable

from .. import __version__, nbduri
from . import checksum, verify
from . import boot
from ..control.server import AfterReply
from ..errors import BadRequest, CommandNotFound


def _finite(value) -> bool:
    """Whether a number is a float other than infinity (an integer too large for a
    double is not: ``float()`` of it overflows)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass(frozen=True)
class Arg:
    """One argument: its name, JSON type and whether it must be given.

    ``kind`` is "epoch" (an integer >= 0), "boolean", "seconds" (a positive number),
    or "any" (the command checks it itself: writer ids, the arguments of verify-range
    and checksum-range, see their modules).
    """

    name: str
    kind: str
    required: bool = False
    default: object = None

    def check(self, command: str, value) -> None:
        if self.kind == "epoch":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BadRequest(f"{command}: '{self.name}' must be a non-negative integer")
        elif self.kind == "seconds":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
                    or not _finite(value):
                raise BadRequest(f"{command}: '{self.name}' must be a positive, finite number "
                                 "of seconds")
        elif self.kind == "boolean":
            if not isinstance(value, bool):
                raise BadRequest(f"{command}: '{self.name}' must be a boolean")
        elif self.kind == "any":
            pass
        else:  # a mistake in the table, not in the request
            raise AssertionError(f"unknown argument kind {self.kind!r}")


@dataclass(frozen=True)
class Command:
    """A command: ``run(session, arguments)`` gets arguments already checked,
    with defaults filled in.  ``lane``: see LANES (None: runs at once)."""

    name: str
    summary: str
    run: Callable
    arguments: tuple = ()
    lane: str | None = None


#: How many requests of a lane run at once; the others wait their turn.  The
#: control server runs in nbdkit's process, whose Python lock the guest's I/O
#: needs too: 60 connections looping query-status or 64 MiB range requests
#: would otherwise take it from the I/O threads and the commit.  So reads of the
#: group's state and range requests each go one at a time, while the checkpoint
#: commands (commit, claim, fence, failover, ...) never queue behind them.  One
#: range request at a time also bounds their memory in total (checksum.CHUNK).
LANES = {"query": threading.BoundedSemaphore(1), "range": threading.BoundedSemaphore(1)}


class Session:
    """What the commands act on: the group, how to stop the server, and the NBD
    URI it serves (any export; None if unknown) for the URIs of writer exports."""

    def __init__(self, group, on_quit: Callable[[], None], nbd_uri: str | None = None):
        self.group = group
        self.on_quit = on_quit
        self.nbd_uri = nbd_uri


def _with_uris(s: Session, reply: dict) -> dict:
    """Where the writer exports a reply names are served (the engine knows no address)."""
    for d in reply.get("disks", ()):
        d["uri"] = nbduri.export_uri(s.nbd_uri, d["export"]) if d.get("export") else None
    if "exports" in reply:
        reply["uris"] = {n: nbduri.export_uri(s.nbd_uri, e) for n, e in reply["exports"].items()}
    return reply


def _failover(s: Session, a: dict) -> dict:
    reply = s.group.failover(a["instant"], to_epoch=a["to_epoch"])
    reply["disks"] = boot.with_drive_options(reply["disks"])
    return _with_uris(s, reply)


def _commit(s: Session, a: dict) -> dict:
    # the writer is checked inside the engine, under the lock claim and failover hold
    return s.group.commit(a["epoch"], a["writer"])


def _claim(s: Session, a: dict) -> dict:
    return _with_uris(s, s.group.claim(a["stale_after"], a["max_request"]))


COMMANDS = {c.name: c for c in (
    Command("query-status", "the group: epochs, role, fencing, per-disk undo, counters",
            lambda s, a: s.group.status(), lane="query"),
    Command("commit", "commit the open epoch (the committed one again is a harmless retry)",
            _commit, (Arg("epoch", "epoch", required=True), Arg("writer", "any"))),
    Command("rollback", "return every disk to the last commit and keep serving",
            lambda s, a: s.group.rollback()),
    Command("fence", "stop every write to this replica, from connections open now and later "
            "(refused on a promoted group: see nbd_mc/secondary/mode.py)",
            lambda s, a: s.group.fence()),
    Command("fence-primary", "after an in-place failover: stop the new primary's writes "
            "through this server (failover again gives them back)",
            lambda s, a: s.group.fence_primary()),
    Command("failover", "fence, return to the last commit (or to a retained epoch, to_epoch; "
            "or hand out the overlays) and promote",
            _failover, (Arg("instant", "boolean", default=False), Arg("to_epoch", "epoch"))),
    Command("query-history", "the retained checkpoints (serve --history): epoch, commit time, "
            "bytes held, how far back history reaches",
            lambda s, a: s.group.history_listing()),
    Command("new-session", "a primary (re)attaches: connections of earlier sessions can no "
            "longer write; stale_after is how long without a commit makes protection stale",
            lambda s, a: s.group.new_session(a["stale_after"]), (Arg("stale_after", "seconds"),)),
    Command("claim", "new-session plus a new writer identity: the previous writer can no "
            "longer write, not even by reconnecting (what protect sends at every sync); "
            "max_request: the largest request the writer's exports advertise",
            _claim, (Arg("stale_after", "seconds"), Arg("max_request", "any"))),
    Command("verify-range", "hash a range of a disk's committed view at an epoch (online verify)",
            lambda s, a: verify.verify_range(s.group, a),
            tuple(Arg(n, "any") for n in ("disk", "offset", "length", "epoch", "block")),
            lane="range"),
    Command("checksum-range", "hash each block of a range of a disk's live image (checksum "
            "sync: which blocks differ from the primary's)",
            lambda s, a: checksum.checksum_range(s.group, a),
            tuple(Arg(n, "any") for n in ("disk", "offset", "length", "block")), lane="range"),
    Command("quit", "reply, then stop serving (requests in flight finish first)",
            lambda s, a: AfterReply({}, s.on_quit)),
)}


def check_arguments(command: Command, arguments: dict) -> dict:
    """The arguments with defaults filled in; BadRequest for anything the schema refuses.

    Strict on purpose: a typo such as "epoc" must not run the command without it
    (and ``quit`` with an unexpected argument must not stop the server).
    """
    known = {a.name: a for a in command.arguments}
    extra = sorted(set(arguments) - set(known))
    if extra:
        raise BadRequest(f"{command.name}: unexpected arguments {', '.join(extra)}")
    out = {}
    for arg in command.arguments:
        if arg.name in arguments:
            arg.check(command.name, arguments[arg.name])
            out[arg.name] = arguments[arg.name]
        elif arg.required:
            raise BadRequest(f"{command.name}: missing argument '{arg.name}'")
        else:
            out[arg.name] = arg.default
    return out


def handler(session: Session):
    """The ControlServer handler for ``session``: look up, check, run."""
    def handle(name: str, arguments: dict):
        command = COMMANDS.get(name)
        if command is None:
            raise CommandNotFound(f"unknown command {name!r}; known: {', '.join(sorted(COMMANDS))}")
        arguments = check_arguments(command, arguments)
        if command.lane is None:
            return command.run(session, arguments)
        with LANES[command.lane]:
            return command.run(session, arguments)
    return handle


#: Which run of the server a client talks to: a commit retried after a restart must
#: not be sent again blindly (recovery rolled the open epoch's writes back).
INSTANCE = os.urandom(8).hex()


def greeting(group) -> dict:
    """The first line a client reads: who we are, which run of the server (and
    which process: `serve` knows its nbdkit is the one answering), and where the
    group stands."""
    return {"version": __version__, "committed": group.committed,
            "disks": [d.name for d in group.disks], "instance": INSTANCE, "pid": os.getpid()}
