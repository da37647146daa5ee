"""The block sizes the secondary advertises to its NBD clients, and the smaller
largest request protect asks for when QEMU reaches the secondary over a unix
socket: so that a hung secondary never leaves a QEMU write stuck where protect's
``yank`` cannot release it.

The QEMU bug this avoids (7.2 and 10.0; tools/qemu-bugs/
yank-leaves-unix-socket-write-stuck.py): a QEMU write to an NBD server that
stopped reading waits, once the socket's send buffer is full, for the socket to
become writable.  ``yank`` shuts the socket down.  Over TCP the kernel then reports
it writable, the write fails at once and the guest's request goes on.  Over a unix
socket the kernel reports only a hang-up, never "writable" while the bytes the
server has not read still fill the buffer, and QEMU wakes a coroutine waiting to
write only on "writable" or an error: the write stays stuck, and so does every
``stop`` (a checkpoint's pause) that drains it, until the server reads again.

So over a unix socket a QEMU write must never wait for buffer space at all.
QEMU's NBD client keeps at most QEMU_REQUESTS requests in flight
(``MAX_NBD_REQUESTS`` in block/nbd.c, 16 in 7.2 and 10.0) and splits a write
larger than the server's advertised maximum into several.  A maximum that keeps
QEMU_REQUESTS requests, with the kernel's bookkeeping for each, inside the
socket's send buffer (a unix socket's sender is charged for every byte the
receiver has not read; QEMU sets no buffer size, so it gets the host's
``net.core.wmem_default``: 208 KiB by default, so 8 KiB requests) means a hung
secondary can only leave requests waiting for a reply, and those a ``yank`` ends
(the reply reader wakes on the hang-up).  Measured with the reproducer and 16
parallel 1 MiB writes: 8 KiB never stuck, 16 KiB stuck every time, on both QEMUs.

Who decides: protect, which knows that its QEMU connects straight to a unix socket
(its ``--target`` is ``nbd+unix://``) and runs on the host whose buffer size
counts; it sends the maximum in ``claim`` (``max_request``), and the secondary
advertises it on that writer's exports only.  The secondary alone could not tell:
a relay in front of its unix socket (an ``ssh -L`` forward, a link emulator) reads
all the time, and its client gains nothing from small requests over a long round
trip, only a lower throughput.  Everything else keeps nbdkit's own maximum.
Standard library only: nbdkit's plugin imports it.
"""

from __future__ import annotations

#: The largest request nbdkit itself accepts (its MAX_REQUEST_SIZE): the maximum
#: advertised by default, so a client splits larger ones instead of failing.
NBDKIT_MAX_REQUEST = 64 << 20
#: The largest preferred block size advertised (a cluster larger than this is still
#: served, only not recommended as the unit of a request).
MAX_PREFERRED = 32 << 20
#: Requests QEMU's NBD client keeps in flight on one connection (MAX_NBD_REQUESTS).
QEMU_REQUESTS = 16
#: Bytes the kernel charges per request beyond its payload: the request's header
#: and the socket buffer's own bookkeeping (an skb's overhead is under 1 KiB).
PER_REQUEST_OVERHEAD = 1024
#: Linux's default net.core.wmem_default, if it cannot be read.
DEFAULT_SEND_BUFFER = 212992
#: The smallest maximum asked for or accepted (a page).
MIN_MAXIMUM = 4096
WMEM_DEFAULT = "/proc/sys/net/core/wmem_default"


def send_buffer(path: str = WMEM_DEFAULT) -> int:
    """The send buffer a unix socket gets when its owner sets none (QEMU's)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_SEND_BUFFER


def unix_maximum(buffer: int) -> int:
    """The largest power of two (at least MIN_MAXIMUM) whose QEMU_REQUESTS requests
    fit in a send buffer of ``buffer`` bytes."""
    m = MIN_MAXIMUM
    while m * 2 <= NBDKIT_MAX_REQUEST and \
            QEMU_REQUESTS * (m * 2 + PER_REQUEST_OVERHEAD) <= buffer:
        m *= 2
    return m


def qemu_max_request(server: dict) -> int | None:
    """The ``max_request`` protect asks for, for QEMU connecting to ``server`` (its
    blockdev-add form): over a unix socket what fits this host's buffer, over TCP
    nothing (None: the secondary's default)."""
    return unix_maximum(send_buffer()) if server.get("type") == "unix" else None


def valid_max_request(value) -> bool:
    """Whether ``value`` may be asked for: an integer power of two from MIN_MAXIMUM
    to NBDKIT_MAX_REQUEST."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and MIN_MAXIMUM <= value <= NBDKIT_MAX_REQUEST and value & (value - 1) == 0)


def block_sizes(cluster_size: int, maximum: int | None = None) -> tuple[int, int, int]:
    """(minimum, preferred, maximum) for an export whose undo clusters are
    ``cluster_size`` bytes; ``maximum`` is what the writer asked for (None:
    nbdkit's own)."""
    maximum = maximum or NBDKIT_MAX_REQUEST
    preferred = min(max(cluster_size, 512), MAX_PREFERRED, maximum)
    return 1, preferred, maximum
