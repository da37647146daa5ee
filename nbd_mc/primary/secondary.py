"""The secondary, seen from the primary: its control channel and what it says.

Every failure to talk to it becomes SecondaryFailed (the secondary is lost to us);
a secondary that can never take our checkpoints (promoted, fenced, another group)
is a PrimaryError.
"""

from __future__ import annotations

from ..control import ControlClient, ControlError, TlsFiles, parse_address
from ..errors import NbdMcError
from .errors import PrimaryError, SecondaryFailed, SecondaryRefused, why as _why
from .options import DriveSpec


def connect(address: str, tls_certificates: str | None = None,
            timeout: float | None = None) -> ControlClient:
    """The control channel. TLS protects it over TCP only; a unix socket is plain (0600)."""
    tcp = parse_address(address)[0] == "tcp"
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


def commit(ctl: ControlClient, epoch: int) -> dict:
    """Commit ``epoch`` on the secondary; any failure means the secondary is lost to us."""
    try:
        return ctl.execute("commit", epoch=epoch)
    except ControlError as e:
        if e.error_class == "Fenced":
            raise SecondaryRefused(f"the secondary refused to commit epoch {epoch}: {e}") from None
        raise SecondaryFailed(f"the secondary refused to commit epoch {epoch}: {e}") from None
    except (OSError, NbdMcError) as e:
        raise SecondaryFailed(f"lost the control connection to the secondary while committing "
                              f"epoch {epoch}: {_why(e)}") from None


def new_session(ctl: ControlClient, stale_after: float) -> dict:
    """Tell the secondary a primary (re)attaches: NBD connections of earlier sessions
    can no longer write (a hung secondary that comes back may still hold their
    writes), and after ``stale_after`` seconds without a commit it reports its
    protection stale.  Returns its generation, group id and committed epoch."""
    try:
        return ctl.execute("new-session", stale_after=stale_after)
    except ControlError as e:
        if e.error_class == "Fenced":
            raise SecondaryRefused(f"the secondary refused the session: {e}") from None
        raise SecondaryFailed(f"the secondary refused new-session: {e}") from None
    except (OSError, NbdMcError) as e:
        raise SecondaryFailed(f"lost the control connection to the secondary: {_why(e)}") from None
