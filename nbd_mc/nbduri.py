"""NBD URIs of our exports (the nbd URI specification, as libnbd and QEMU read it).

`serve` prints them, the plugin puts the writer's into the replies of ``claim`` and
``failover`` (``uris``, ``disks[].uri``): one place builds them, so the two always
agree.  The primary's reading of a --target URI is primary/options.py's
``parse_nbd_uri``.  Standard library only: nbdkit's plugin imports it.
"""

from __future__ import annotations

import urllib.parse


def server_uri(*, socket: str | None = None, host: str | None = None, port: int | None = None,
               tls: bool = False, export: str = "") -> str:
    """The URI of ``export`` on a server listening on a unix ``socket``, or on TCP
    ``host``:``port`` (``tls``: the server requires TLS, so the scheme is nbds)."""
    if socket:
        return f"{'nbds+unix' if tls else 'nbd+unix'}:///{export}?socket={socket}"
    host = host or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{'nbds' if tls else 'nbd'}://{host}:{port}/{export}"


def export_uri(base: str | None, export: str) -> str | None:
    """The NBD URI of ``export`` on the server whose URI (any export) is ``base``."""
    if not base:
        return None
    u = urllib.parse.urlsplit(base)
    # (urlunsplit would drop the empty authority of nbd+unix:///...)
    return (f"{u.scheme}://{u.netloc}/{urllib.parse.quote(export, safe='@')}"
            + (f"?{u.query}" if u.query else ""))
