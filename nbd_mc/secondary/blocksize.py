"""The block sizes the secondary advertises to its NBD clients, and why its largest
request is much smaller on a unix socket: so that a hung secondary never leaves a
QEMU write stuck where protect's ``yank`` cannot release it.

The QEMU bug this avoids (7.2 and 10.0; tools/qemu-bugs/
yank-leaves-unix-socket-write-stuck.py): a QEMU write to an NBD server that
stopped reading waits, once the socket's send buffer is full, for the socket to
become writable.  ``yank`` shuts the socket down.  Over TCP the kernel then reports
it writable, the write fails at once and the guest's request goes on.  Over a unix
socket the kernel reports only a hang-up, never "writable" while the bytes the
server has not read still fill the buffer, and QEMU wakes a coroutine waiting to
write only on "writable" or an error: the write stays stuck, and so does every
``stop`` (a checkpoint's pause) that drains it, until the server reads again.

So the write must never wait for buffer space at all.  QEMU's NBD client keeps at
most QEMU_REQUESTS requests in flight (``MAX_NBD_REQUESTS`` in block/nbd.c, 16 in
7.2 and 10.0) and splits a guest write larger than the server's advertised maximum
into several.  A maximum that keeps QEMU_REQUESTS requests, with the kernel's
bookkeeping for each, inside the socket's send buffer (a unix socket's sender is
charged for every byte the receiver has not read; QEMU sets no buffer size, so it
gets the host's ``net.core.wmem_default``, 208 KiB on Linux by default: 8 KiB
requests) means a hung secondary can only leave requests waiting for a reply, and
those a ``yank`` ends (the reply reader wakes on the hang-up).  Measured with the
reproducer and 16 parallel 1 MiB writes: 8 KiB never stuck, 16 KiB stuck every
time, on both QEMUs.

The price is more, smaller requests over a unix socket, which is a same-host
link (tests, demos, a secondary beside its primary); a TCP secondary, the real case
between hosts, keeps nbdkit's own maximum.  Standard library only: nbdkit's plugin
imports it.
"""

from __future__ import annotations

#: The largest request nbdkit itself accepts (its MAX_REQUEST_SIZE): the maximum
#: advertised over TCP, so a client splits larger ones instead of failing.
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
#: The smallest maximum advertised, whatever the buffer (a page).
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


def is_unix(nbd_uri: str | None) -> bool:
    """Whether the server's own NBD URI (nbduri.server_uri) is a unix socket's."""
    return bool(nbd_uri) and nbd_uri.split(":", 1)[0] in ("nbd+unix", "nbds+unix")


def block_sizes(cluster_size: int, unix: bool, buffer: int | None = None) -> tuple[int, int, int]:
    """(minimum, preferred, maximum) for an export whose undo clusters are
    ``cluster_size`` bytes, served over a unix socket or not."""
    maximum = unix_maximum(send_buffer() if buffer is None else buffer) if unix \
        else NBDKIT_MAX_REQUEST
    preferred = min(max(cluster_size, 512), MAX_PREFERRED, maximum)
    return 1, preferred, maximum
