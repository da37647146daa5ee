"""What can stop protect, as exceptions: each says what happened and what state things are in.

PrimaryGone is the one that means the primary QEMU itself is gone (failover advice);
everything else leaves the VM running.
"""

from __future__ import annotations

from ..errors import NbdMcError


class PrimaryError(NbdMcError):
    """protect cannot go on; the message says what happened and what state things are in."""

    error_class = "ProtectError"


class PrimaryGone(PrimaryError):
    """The QMP connection to the primary's QEMU broke (QEMU exited or was killed)."""

    error_class = "PrimaryGone"


class QmpCommandError(PrimaryError):
    """QEMU answered a QMP command with an error."""

    error_class = "QMPError"

    def __init__(self, command: str, qmp_class: str, desc: str):
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command = command
        self.qmp_class = qmp_class


class QmpTimeout(PrimaryError):
    """QEMU did not answer a QMP command in time, but its connection is open: QEMU is
    alive (busy, or stuck waiting for a hung NBD target).  Never failover advice."""

    error_class = "QMPTimeout"


class SecondaryFailed(PrimaryError):
    """The secondary can no longer be trusted to hold the checkpoints: stop committing."""

    error_class = "SecondaryFailed"


class SecondaryStalled(SecondaryFailed):
    """The secondary stopped answering (hung, or a network black hole)."""

    error_class = "SecondaryStalled"


class SecondaryRefused(PrimaryError):
    """The secondary can never take our checkpoints again: promoted by a failover,
    fenced, or another group.  protect stops instead of retrying."""

    error_class = "SecondaryRefused"


def why(e: BaseException) -> str:
    """An exception as one line, with its cause if that adds something."""
    text = str(e) or type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({cause})"
    return text
