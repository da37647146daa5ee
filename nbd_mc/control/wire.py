"""The control protocol on the wire: JSON lines, framed and parsed strictly.

Shared by the server and the client (docs/control-protocol.md describes the
protocol).  Standard library only: the server half runs inside nbdkit's
embedded /usr/bin/python3, where nothing else is certain to be importable.
"""

import json
import logging
import math
import socket
import ssl

from nbd_mc.errors import BadRequest

log = logging.getLogger("nbd_mc.control")

#: A request line longer than this is refused and its connection closed: the
#: largest real request is a few dozen bytes, so this only bounds memory.
MAX_LINE = 1 << 20
#: Replies (query-status of a big group) can be long; still, bound the client.
CLIENT_MAX_LINE = 64 << 20

REQUEST_KEYS = frozenset({"execute", "arguments", "id"})
#: "the request had no id" (None is a valid id).
NO_ID = object()


class LineTooLong(Exception):
    """A peer sent more than the line limit without a newline."""


class LineReader:
    """Splits a byte stream into lines without ever holding more than a bound.

    socket.makefile would do the splitting, but it cannot bound a line without
    reading it whole first, and it does not mix well with shutdown() from
    another thread.
    """

    def __init__(self, sock, limit: int):
        self._sock = sock
        self._limit = limit
        self._buf = bytearray()
        self._scanned = 0       # bytes of _buf known to hold no newline
        self._eof = False

    def readline(self):
        """Next line without its newline; None at end of stream.

        A final line without a newline still counts, so that
        `printf '{"execute":"quit"}' | socat - UNIX:ctl.sock` works.
        """
        while True:
            i = self._buf.find(b"\n", self._scanned)
            if i >= 0:
                return self._take(i, i + 1)
            self._scanned = len(self._buf)
            if self._scanned > self._limit:
                raise LineTooLong()
            if self._eof:
                return self._take(len(self._buf), len(self._buf)) if self._buf else None
            chunk = self._sock.recv(65536)
            if chunk:
                self._buf += chunk
            else:
                self._eof = True

    def _take(self, end: int, consumed: int) -> bytes:
        line = bytes(self._buf[:end])
        del self._buf[:consumed]
        self._scanned = 0
        if len(line) > self._limit:
            raise LineTooLong()
        return line


def encode(message: dict) -> bytes:
    """One message as one line of strict JSON."""
    # ensure_ascii keeps lone surrogates (legal in JSON escapes) encodable;
    # allow_nan=False keeps the output strict JSON for other languages' parsers.
    return json.dumps(message, allow_nan=False, separators=(",", ":")).encode() + b"\n"


def send(sock, data: bytes) -> None:
    if isinstance(sock, ssl.SSLSocket):
        sock.sendall(data)
    else:
        # No SIGPIPE even if the embedding process did not ignore it.
        sock.sendall(data, socket.MSG_NOSIGNAL)


def shutdown(sock) -> None:
    """Wake a thread blocked on sock without closing the fd under it.

    The base-class method is called on purpose: SSLSocket.shutdown drops its
    SSL object, which the reading thread may be using at that moment.
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


# --- requests -------------------------------------------------------------

class Malformed(BadRequest):
    """A BadRequest that remembers the id, if one could be read."""

    def __init__(self, desc: str, request_id=NO_ID):
        super().__init__(desc)
        self.request_id = request_id


class _Refused(ValueError):
    """A request JSON decodes but the protocol does not accept (the message says why)."""


def _reject_constant(name):
    raise _Refused(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    """A JSON number with a fraction or exponent; one too large for a double
    (``1e400``) would silently become infinity (so ``stale_after: 1e400``
    would mean "never stale"): refused instead."""
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:40]} is out of range (not finite)")
    return value


def _unique_members(pairs: list) -> dict:
    """An object whose members all have different names: with duplicates JSON
    decoders disagree which one counts (Python's keeps the last), so
    ``{"execute":"query-status","execute":"quit"}`` would stop the server."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"member {key[:40]!r} appears more than once")
        out[key] = value
    return out


def decode_strict(text: str):
    """JSON as the control protocol takes it: no NaN or Infinity, no number that
    is not finite, no object with a duplicated member (at any depth)."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite,
                      object_pairs_hook=_unique_members)


def parse_request(line: bytes) -> tuple:
    """Decode one request line into (name, arguments, id or NO_ID).

    Strict on purpose: a typo such as "argument" would otherwise run the
    command without its arguments.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Malformed(f"request is not valid UTF-8 (byte {e.start})") from None
    try:
        request = decode_strict(text)
    except RecursionError:
        raise Malformed("request is nested too deeply") from None
    except _Refused as e:
        raise Malformed(f"request refused: {e}") from None
    except ValueError as e:
        raise Malformed(f"request is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise Malformed(f"request must be a JSON object, not {json_type(request)}")
    request_id = request.get("id", NO_ID)
    extra = sorted(set(request) - REQUEST_KEYS)
    if extra:
        raise Malformed(f"unexpected member {extra[0]!r} in request "
                         "(allowed: execute, arguments, id)", request_id)
    name = request.get("execute")
    if not isinstance(name, str):
        what = "missing" if "execute" not in request else f"a {json_type(name)}"
        raise Malformed(f"'execute' must be a string naming the command, it is {what}",
                         request_id)
    arguments = request.get("arguments", {})
    if not isinstance(arguments, dict):
        raise Malformed(f"'arguments' must be an object, not {json_type(arguments)}",
                         request_id)
    return name, arguments, request_id


def json_type(value) -> str:
    """The JSON name of a decoded value's type, for messages."""
    for kind, name in ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"),
                       (list, "array"), (dict, "object"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def error_reply(error_class: str, desc: str) -> dict:
    """The body of an error reply (without the id)."""
    return {"error": {"class": error_class, "desc": desc}}


def reply_line(reply: dict, request_id) -> bytes:
    """Serialise a reply, falling back to a plain error if it cannot be.

    A handler returning something JSON cannot express (a set, NaN) is a bug,
    but it must cost one error reply, not the connection.
    """
    if request_id is not NO_ID:
        reply = dict(reply, id=request_id)
    try:
        return encode(reply)
    except (TypeError, ValueError, RecursionError) as e:
        log.error("control reply not serialisable: %s", e)
        fallback = error_reply("GenericError", f"reply could not be encoded as JSON: {e}")
        try:
            return encode(dict(fallback, id=request_id) if request_id is not NO_ID else fallback)
        except (TypeError, ValueError, RecursionError):
            return encode(fallback)
