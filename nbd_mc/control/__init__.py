"""The control channel: JSON lines over a unix socket, or over TCP with TLS.

    wire.py     framing, strict request parsing, reply encoding (both sides)
    server.py   ControlServer: accept, answer, never raise into nbdkit
    client.py   ControlClient: one blocking request at a time

The commands themselves (their names, arguments and meaning) are in
nbd_mc/secondary/commands.py; addresses in nbd_mc/address.py; certificates in
nbd_mc/tls.py.  docs/control-protocol.md describes the protocol.
"""

from .client import ControlClient, ControlError, ControlProtocolError
from .server import MAX_CLIENTS, MAX_PER_PEER, AfterReply, ControlServer
from .wire import MAX_LINE

__all__ = ["AfterReply", "ControlClient", "ControlError", "ControlProtocolError", "ControlServer",
           "MAX_CLIENTS", "MAX_LINE", "MAX_PER_PEER"]
