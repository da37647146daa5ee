"""Errors with a class name that travels unchanged over the control channel.

Every refusal the user can see is an ``NbdMcError``; its ``error_class`` is the
``class`` field of a control-protocol error reply (docs/control-protocol.md), so the CLI, the
plugin and the control server never translate between vocabularies.
"""

import errno
import os


class NbdMcError(Exception):
    """A refusal or failure with a message meant for a person."""

    error_class = "GenericError"
    errno = errno.EIO
    details = None  # extra fields of the error reply, e.g. {"committed": N} from commit

    def __init__(self, desc: str):
        super().__init__(desc)
        self.desc = desc


class BadRequest(NbdMcError):
    error_class = "BadRequest"
    errno = errno.EINVAL


class CommandNotFound(NbdMcError):
    error_class = "CommandNotFound"
    errno = errno.EINVAL


class EpochMismatch(NbdMcError):
    error_class = "EpochMismatch"
    errno = errno.EINVAL


class NotProtected(NbdMcError):
    error_class = "NotProtected"
    errno = errno.EINVAL


class NotRetained(NbdMcError):
    """An epoch that history does not hold (`failover --to-epoch`)."""
    error_class = "NotRetained"
    errno = errno.ENOENT


class Fenced(NbdMcError):
    error_class = "Fenced"
    errno = errno.EROFS


class IOFailure(NbdMcError):
    """An I/O error on an image or overlay (disk full, read error, ...)."""

    error_class = "IOError"

    def __init__(self, desc: str, err: int = errno.EIO):
        super().__init__(desc)
        self.errno = err


def io_failure(what: str, e: OSError) -> IOFailure:
    """The IOFailure for an OSError while doing ``what`` ("writing image X"):
    the one place that turns a system error into a refusal with its errno."""
    err = e.errno or errno.EIO
    return IOFailure(f"{what}: {os.strerror(e.errno) if e.errno else e}", err)


class CorruptOverlay(NbdMcError):
    """An undo overlay that is not a valid qcow2 file of ours."""

    error_class = "CorruptOverlay"


class StateError(NbdMcError):
    """A state directory, image or disk list that does not fit together."""

    error_class = "StateError"
