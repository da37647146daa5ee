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


def _refusal(name: str, err: int, doc: str) -> type:
    """A refusal class whose ``error_class`` is its name.  They differ only in name,
    errno (what nbdkit answers on the wire) and meaning, so one line each below."""
    return type(name, (NbdMcError,), {"error_class": name, "errno": err, "__doc__": doc,
                                      "__module__": __name__})


BadRequest = _refusal("BadRequest", errno.EINVAL, "A malformed request or argument.")
CommandNotFound = _refusal("CommandNotFound", errno.EINVAL, "No such control command.")
EpochMismatch = _refusal("EpochMismatch", errno.EINVAL, "Not the epoch the group is at.")
NotProtected = _refusal("NotProtected", errno.EINVAL, "Nothing committed to return to.")
Fenced = _refusal("Fenced", errno.EROFS, "Fenced, promoted, or a superseded writer.")
NotRetained = _refusal("NotRetained", errno.ENOENT, "An epoch that history does not hold (`failover --to-epoch`).")


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
