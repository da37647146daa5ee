"""Unix socket files a server listens on: in use, left by a dead server, or free.

A socket file outlives the server that bound it (kill -9 leaves it), so starting a
server means telling a live server's file (refuse: taking its path would leave it
running but unreachable) from a dead one's (remove it, or every crash would need a
hand to clean up).  Only the kernel's answer to a connect tells them apart, and
it answers at once, however loaded the machine: a listening socket takes the
connection into its accept queue (EAGAIN if that queue is full: still a live
server), a dead one refuses it.  Anything else -- e.g. no permission -- means
"cannot tell", never "free"; no answer is ever awaited, so no timeout can turn
a slow server into a free path.

The probe alone still races with a server that has bound its file but not yet
called listen(): a connect in between is refused, exactly as by a dead server.  So
every nbd-mc process that probes, removes or creates a socket file does it holding
an exclusive flock on the file's directory (``claimed``): a probe then never falls
into another nbd-mc server's bind-to-listen window, and two servers starting at
once never both remove the same stale file and then one of them the other's fresh
socket.  nbdkit binds the NBD socket itself, outside this lock (it calls listen()
right after bind() in C, a window of microseconds): `serve` checks afterwards that
the process listening there is the nbdkit it ran (``listener_pid``), so a server
whose path was taken in that window is refused, not reported as serving.
"""

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct
import time

#: How long to wait for another nbd-mc process to finish claiming a socket in the
#: same directory; it holds the lock only for a probe, an unlink and a bind.
LOCK_TIMEOUT = 30.0
_LOCK_POLL = 0.01


@contextlib.contextmanager
def claimed(path: str):
    """Hold the exclusive claim on socket files in the directory of ``path``.

    flock rather than a lock file: nothing is left behind, and the lock goes with
    the process that holds it, also on kill -9.  Polled with a deadline instead of
    a blocking flock, so a stuck or foreign holder gives an error, not a hang.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise type(e)(e.errno, f"cannot claim socket {path}: directory {directory}: "
                               f"{e.strerror}") from None
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OSError(errno.EBUSY, f"cannot claim socket {path}: another process "
                                  f"has held the lock of {directory} for {LOCK_TIMEOUT:.0f} s") from None
                time.sleep(_LOCK_POLL)  # waiting for the holder's claim, bounded by the deadline
        yield
    finally:
        os.close(fd)  # releases the flock


def answers(path: str) -> bool:
    """Whether a server listens on the socket file ``path``.

    False only when the kernel says nobody does (connection refused, or no file);
    OSError when it cannot be told (e.g. permission denied).  Non-blocking: a
    wedged server with a full accept queue is "in use" at once, not a hang.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)  # a unix connect completes (or fails) at once
        return True
    except BlockingIOError:  # EAGAIN: a listener whose accept queue is full
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as e:
        raise OSError(e.errno, f"{path}: cannot tell whether a server uses it: "
                               f"{e.strerror}") from e
    finally:
        probe.close()


def listener_pid(path: str) -> int | None:
    """The pid of the process that called listen() on the socket at ``path``
    (SO_PEERCRED of a connection to it); None if nobody listens."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]
    finally:
        probe.close()


def remove_stale(path: str, what: str) -> None:
    """Make ``path`` free for a new socket: remove a dead server's socket file.

    Raises OSError (EADDRINUSE) if a server answers on it, FileExistsError if it is
    not a socket, OSError if it cannot be told.  Call it inside ``claimed(path)``.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{what} path {path} exists and is not a socket")
    try:
        live = answers(path)
    except OSError as e:
        raise OSError(e.errno, f"{what} {e.strerror}") from e
    if live:
        raise OSError(errno.EADDRINUSE, f"{what} {path} is in use by another server")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
