"""Tell systemd that `nbd-mc serve --foreground` is ready (sd_notify, Type=notify).

The protocol is one datagram ("READY=1") on the unix socket named by
$NOTIFY_SOCKET (a path, or an abstract name starting with "@"), documented as a
stable interface in sd_notify(3).  Written here rather than taken from
python3-systemd because that is a compiled binding for this one ``sendto``, and
nbd-mc must run where it is absent.  Without $NOTIFY_SOCKET (not under systemd)
nothing happens.
"""

from __future__ import annotations

import os
import socket


def notify(state: str = "READY=1") -> bool:
    """Send ``state`` to systemd; False when not running under a notify socket."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or addr[0] not in "/@":
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:  # systemd then times the start out: visible, and the server keeps serving
        return False
    return True
