"""Control addresses: a unix socket path, ``unix:PATH`` or ``tcp://HOST:PORT``.

Used by `nbd-mc serve` (where nbdkit's control server listens), by every client
command and by `nbd-mc protect`: one parser, so all three refuse the same things
with the same words.  A parsed address is typed (`UnixAddress` or `TCPAddress`,
as ovirt-imageio does): callers ask ``isinstance``/``.is_tcp`` instead of testing
a tuple's first element, and ``str()`` gives the address back in the form
`parse_address` reads.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os

from .statedir import StateDir

#: Longest unix socket path the kernel takes (sun_path is 108 bytes).
UNIX_PATH_MAX = 107


def default_control(state_dir: str) -> str:
    """The control address of the server of ``state_dir`` when none was given."""
    return StateDir(state_dir).control


@dataclasses.dataclass(frozen=True)
class UnixAddress:
    """A control socket path (not checked for existence: a server binds it)."""

    path: str
    is_tcp = False

    def __str__(self) -> str:
        ambiguous = self.path.startswith("unix:") or "://" in self.path
        return "unix://" + self.path if ambiguous else self.path


@dataclasses.dataclass(frozen=True)
class TCPAddress:
    """A control address on TCP: only with TLS and client certificates."""

    host: str
    port: int
    is_tcp = True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


Address = UnixAddress | TCPAddress


def parse_address(addr: str) -> Address:
    """Parse a --control ADDR into a `UnixAddress` or a `TCPAddress`.

    Refusing anything doubtful here gives the user one clear message at the
    command line instead of a confusing socket error later.
    """
    if not isinstance(addr, str) or not addr:
        raise ValueError("control address is empty: give a socket path or tcp://HOST:PORT")
    if "\0" in addr:
        raise ValueError("control address contains a NUL byte")
    if addr.startswith("tcp://"):
        return _parse_tcp(addr)
    if addr.startswith("unix:"):
        path = addr[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
    elif "://" in addr:
        raise ValueError(f"control address {addr!r}: unknown scheme "
                         "(use a socket path, unix:PATH or tcp://HOST:PORT)")
    else:
        path = addr
    return UnixAddress(check_unix_path(path, addr))


def check_unix_path(path: str, addr: str) -> str:
    """``path`` if a unix socket can be bound there; ValueError naming ``addr`` if not."""
    if not path:
        raise ValueError(f"control address {addr!r}: the socket path is empty")
    try:
        encoded = os.fsencode(path)
    except UnicodeEncodeError:
        raise ValueError(f"control socket path {path!r} cannot be encoded as a file name") from None
    if len(encoded) > UNIX_PATH_MAX:
        raise ValueError(f"control socket path {path!r} is longer than "
                         f"{UNIX_PATH_MAX} bytes, the limit of a unix socket")
    return path


def _parse_tcp(addr: str) -> TCPAddress:
    rest = addr[len("tcp://"):]
    if rest.endswith("/"):
        rest = rest[:-1]
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
        if not sep:
            raise ValueError(f"control address {addr!r}: expected tcp://[IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"control address {addr!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = rest.rpartition(":")
        if not sep:
            raise ValueError(f"control address {addr!r}: expected tcp://HOST:PORT")
        if ":" in host:
            raise ValueError(f"control address {addr!r}: put an IPv6 address in brackets, "
                             "tcp://[::1]:PORT")
    if not host or any(c.isspace() or c in "/?#@[]" for c in host):
        raise ValueError(f"control address {addr!r}: bad or missing host")
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"control address {addr!r}: port must be a number 0-65535")
    return TCPAddress(host, int(port))


def format_address(parsed: Address) -> str:
    """The inverse of parse_address, for messages and the resolved .address."""
    return str(parsed)
