"""The secondary, seen from the primary: its control channel and what it says.

Every failure to talk to it becomes SecondaryFailed (the secondary is lost to us);
a secondary that can never take our checkpoints (promoted, fenced, another group)
is a PrimaryError.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

from . import claim as writer_claim
from ..address import parse_address
from ..control import ControlClient, ControlError
from ..tls import TlsFiles
from ..errors import NbdMcError
from .errors import PrimaryError, SecondaryFailed, SecondaryRefused, why as _why
from .options import DriveSpec


def connect(address: str, tls_certificates: str | None = None,
            timeout: float | None = None) -> ControlClient:
    """The control channel. TLS protects it over TCP only; a unix socket is plain (0600)."""
    tcp = parse_address(address).is_tcp
    tls = TlsFiles(tls_certificates) if tls_certificates and tcp else None
    kw = {} if timeout is None else {"timeout": timeout}
    try:
        return ControlClient(address, tls=tls, **kw)
    except (OSError, ValueError, NbdMcError) as e:
        raise PrimaryError(f"cannot reach the secondary's control channel {address}: "
                           f"{_why(e)}") from None


def secondary_status(ctl: ControlClient) -> dict:
    try:
        return ctl.execute("query-status")
    except ControlError as e:
        raise SecondaryFailed(f"the secondary refused query-status: {e}") from None
    except (OSError, NbdMcError) as e:
        raise SecondaryFailed(f"lost the control connection to the secondary: {_why(e)}") from None


def first_epoch(status: dict, drives: list[DriveSpec]) -> int:
    """The epoch the first commit will close (committed + 1), after checking the
    secondary is a secondary whose group is exactly our drives.

    A partial group would be committed with disks nobody mirrors: refused.
    """
    if status.get("role") != "secondary":
        raise SecondaryRefused("the secondary was promoted to primary by a failover: it takes no "
                           "more checkpoints (start a fresh `nbd-mc serve` state directory)")
    if status.get("fenced"):
        raise SecondaryRefused("the secondary is fenced: a failover or `nbd-mc fence` stopped "
                           "protection; start a fresh secondary")
    if status.get("broken"):
        raise SecondaryFailed(f"the secondary is unusable until it restarts: {status['broken']}")
    disks = [d["name"] for d in status.get("disks", [])]
    missing = [d.export for d in drives if d.export not in disks]
    if missing:
        raise PrimaryError(f"the secondary has no disk {', '.join(missing)} "
                           f"(its group: {', '.join(disks)})")
    unmirrored = [n for n in disks if n not in {d.export for d in drives}]
    if unmirrored:
        raise PrimaryError(f"the secondary's consistency group also holds "
                           f"{', '.join(unmirrored)}, which no --drive mirrors: every disk of "
                           "the group must be protected together")
    return int(status["committed"]) + 1


@contextmanager
def _rpc(failed: str, refused: str | None = None,
         lost: str = "lost the control connection to the secondary", detail=lambda e: ""):
    """How a control request's failure reads to protect, said once: a ``Fenced``
    refusal is for good (SecondaryRefused: ``refused``, default ``failed``), any
    other refusal (``failed`` plus ``detail(e)``) and a lost connection (``lost``)
    are an outage (SecondaryFailed)."""
    try:
        yield
    except ControlError as e:
        if e.error_class == "Fenced":
            raise SecondaryRefused(f"{refused or failed}: {e}") from None
        raise SecondaryFailed(f"{failed}: {e}{detail(e)}") from None
    except (OSError, NbdMcError) as e:
        raise SecondaryFailed(f"{lost}: {_why(e)}") from None


def commit(ctl: ControlClient, epoch: int) -> dict:
    """Commit ``epoch`` on the secondary; any failure means the secondary is lost to us.

    Even when the error says where the secondary stands (``committed``, sent with
    every commit error), an outage is the right answer: an epoch not committed
    after an I/O error may have lost writes (a failed sync can drop dirty pages),
    and one that did land leaves the secondary refusing writes until it
    restarts, and may not be durable.  The resync after the outage starts from the epoch
    the secondary then reports, and the bitmaps of both N-1 and N are kept until
    a commit is acknowledged, so either outcome is covered; ``committed`` only
    makes the message exact (a commit whose durability is unknown must not count
    as acknowledged: a power cut may still take it back).
    """
    with _rpc(f"the secondary refused to commit epoch {epoch}",
              lost=f"lost the control connection to the secondary while committing "
                   f"epoch {epoch}",
              detail=lambda e: _outcome(epoch, e.committed)):
        return ctl.execute("commit", epoch=epoch)


def _outcome(epoch: int, committed: int | None) -> str:
    if committed is None:
        return ""
    if committed >= epoch:
        return (f" (epoch {epoch} reached the secondary's state file, but the secondary "
                "refuses writes until it restarts)")
    return f" (epoch {epoch} is not committed: the secondary holds epoch {committed})"


def new_session(ctl: ControlClient, stale_after: float | None) -> dict:
    """Tell the secondary a primary (re)attaches: NBD connections of earlier sessions
    can no longer write (a hung secondary that comes back may still hold their
    writes), and after ``stale_after`` seconds without a commit it reports its
    protection stale.  Returns its generation, group id and committed epoch."""
    with _rpc("the secondary refused new-session", refused="the secondary refused the session"):
        return ctl.execute("new-session",
                           **({} if stale_after is None else {"stale_after": stale_after}))


def claim_writer(ctl: ControlClient, drives: list[DriveSpec], say=lambda text: None,
                 stale_after: float | None = None, max_request: int | None = None):
    """Become the secondary's one writer (nbd_mc/secondary/writer.py) in a new session.

    ``claim`` is new-session plus a new writer identity: the secondary cuts off the
    connections of earlier sessions and refuses the previous writer's export name
    from now on.  Returns the control connection to commit through (its commits
    name the writer, so a superseded protect cannot commit) and the drives with
    the writer exports to mirror into.  ``max_request``: the largest request
    those exports should advertise (nbd_mc/blocksize.py).  A secondary that
    predates writer identities gets a plain new-session, and the plain exports
    are used.  A promoted or fenced secondary refuses for good (SecondaryRefused)."""
    with _rpc("the secondary refused the writer claim"):
        got = writer_claim.claim(ctl, stale_after, max_request)
    if not got.writer:
        new_session(ctl, stale_after)
        return ctl, drives
    say(f"  writer {got.writer} (generation {got.generation}): mirroring into "
        + ", ".join(got.exports.get(d.export, d.export) for d in drives))
    return (writer_claim.WriterControl(ctl, got.writer),
            [replace(d, export=got.exports.get(d.export, d.export)) for d in drives])
