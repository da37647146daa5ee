"""Who may write: one writer identity per group, and what each export allows.

Fencing by generation alone refuses the connections that were open before a
fence or failover, but not the ones opened afterwards: an old primary whose QEMU
reconnects (``reconnect-delay``), a stale ``protect``, a forgotten ``qemu-io``
would write into the promoted disk through the plain export name.  So a writer
has an *identity*, granted by the secondary and written into the export name it
writes through:

    writer id      g<generation>-<8 hex digits>     e.g. g3-5be0a1c2
    writer export  NAME@<writer id>                 e.g. vda@g3-5be0a1c2

The id is granted by ``claim`` (what ``nbd-mc protect`` sends at every (re)sync,
before it mirrors: ``claim`` is ``new-session`` plus a new id, see
engine.Group.new_session) and by ``failover`` (the new primary's), stored in the
state file, and a new grant supersedes the old one at once: the generation goes
up, so every connection of the old writer is refused, and its export name (the
only one a reconnect knows) is refused at open from then on.  A bare
``new-session`` raises the generation too but keeps the writer id.  The random part makes an id unique
across state directories and restarts, so a client of an earlier life of the
server cannot match it by accident; it is not a secret (``nbdinfo --list`` and
``status`` show it): the guard is against stale writers, not against someone with
access to the NBD socket.

The rule, by export name (``decide`` is the one place it is written; what the
group's mode allows for each kind of export is the table in mode.py):

- ``NAME@<current writer>``: read-write.
- ``NAME@<any other writer id>``: refused at open (a superseded writer).
- ``NAME``: on a secondary, read-write until a writer claims it (the initial
  state: tools and tests write directly), read-only afterwards; after a failover
  refused at open.

Refused rather than read-only where a stale writer may come back: QEMU 7.2's NBD
client, reconnecting (``reconnect-delay``) to an export that has become read-only,
holds the guest's request forever (measured: still hanging after 60 s), whereas a
refused reconnect fails the request with EIO once the reconnect delay is over.
- ``NAME@committed``: read-only, the last commit; refused after a failover (the
  promoted images are the new primary's disk, there is no committed view).
- after ``failover --instant`` every export is refused: the images are the
  backing files of the overlays the new primary now writes, and they still hold
  the open epoch's uncommitted writes.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from . import history, mode
from ..errors import BadRequest, Fenced

COMMITTED = "committed"
_WRITER_ID = re.compile(r"g(\d+)-[0-9a-f]{8}")


def new_writer_id(generation: int) -> str:
    """A fresh identity for the writer granted at ``generation``."""
    return f"g{generation}-{secrets.token_hex(4)}"


def is_writer_id(text: str) -> bool:
    return _WRITER_ID.fullmatch(text) is not None


def writer_export(disk: str, writer: str) -> str:
    return f"{disk}@{writer}"


def writer_exports(disks, writer: str | None) -> dict[str, str]:
    """{disk name: the export its writer writes through} ({} with no writer)."""
    return {d: writer_export(d, writer) for d in disks} if writer else {}


@dataclass(frozen=True)
class Access:
    """What one connection may do, decided when it opens.

    ``refusal``: the export cannot be opened (why).  ``writable``: writes are
    accepted (still subject to the generation check on every write).
    """

    disk: str
    kind: str  # "live" | "committed" | "writer" | "epoch"
    writable: bool
    refusal: str | None
    description: str


def split_export(name: str) -> tuple[str, str | None]:
    """``NAME`` -> (NAME, None); ``NAME@SUFFIX`` -> (NAME, SUFFIX)."""
    base, sep, suffix = name.partition("@")
    return base, (suffix if sep else None)


def decide(state, name: str, readonly: bool = False) -> Access:
    """The rule (see the module docstring) for export ``name`` of a group in ``state``
    (a state.GroupState); the disk must exist (the caller checks).  Whether the
    group's mode lets an export of this kind open at all is nbd_mc/secondary/mode.py's."""
    disk, suffix = split_export(name)
    epoch = history.parse_epoch_suffix(suffix)
    kind = ("live" if suffix is None else "committed" if suffix == COMMITTED
            else "epoch" if epoch is not None else "writer")
    refused = mode.refusal(state, "open " + kind, name or disk)
    if refused is not None:
        return Access(disk, kind, False, refused.desc, "")
    if kind == "epoch":  # NAME@epoch-N: which epochs are retained is history.py's rule
        refusal = history.epoch_access(state, name, epoch)
        return Access(disk, "epoch", False, refusal,
                      "" if refusal else f"{disk} as of retained epoch {epoch} (read-only)")
    if kind == "committed":
        return Access(disk, "committed", False, None,
                      f"{disk} as of the last commit (read-only)")
    if kind == "writer":
        if not is_writer_id(suffix):
            return Access(disk, "writer", False,
                          f"no export {name!r}: after '@' comes 'committed', 'epoch-N' or a "
                          "writer id", "")
        if suffix == state.writer:
            return Access(disk, "writer", not readonly, None,
                          f"{disk} for writer {suffix} (nbd-mc {state.role})")
        return Access(disk, "writer", False,
                      f"{name}: writer {suffix} was superseded"
                      + (f" by {state.writer}" if state.writer else ""), "")
    if state.writer:
        return Access(disk, "live", False, None,
                      f"live replica of {disk} (read-only: writer {state.writer} claimed it)")
    return Access(disk, "live", not readonly, None, f"live replica of {disk} (nbd-mc secondary)")


def listing(state, disks) -> list[tuple[str, str]]:
    """(export, description) pairs for NBD_OPT_LIST: what may be opened now."""
    out = []
    for d in disks:
        epochs = [history.epoch_export(d, n) for n in history.retained(state)]
        for name in (d, f"{d}@{COMMITTED}", writer_export(d, state.writer) if state.writer else None,
                     *epochs):
            if name is None:
                continue
            a = decide(state, name)
            if a.refusal is None:
                out.append((name, a.description))
    return out


# --- granting an identity ---------------------------------------------------------------
def check_commit_writer(state, writer) -> None:
    """A commit that names its writer is refused unless that writer is the current
    one: a superseded protect must not commit the epoch its successor is syncing."""
    if writer is None:
        return
    if not isinstance(writer, str):
        raise BadRequest("commit: 'writer' must be a string (the id `claim` returned)")
    mode.check(state, "commit")  # the mode's refusal first: it says more than "superseded"
    if writer != state.writer:
        raise Fenced(f"commit refused: writer {writer} was superseded"
                     + (f" by {state.writer}" if state.writer else ""))

