"""The control client: one blocking request at a time, shareable between threads."""

import itertools
import json
import socket
import threading

from nbd_mc.address import Address, TCPAddress, UnixAddress, parse_address
from nbd_mc.errors import NbdMcError
from nbd_mc.tls import TlsFiles

from .wire import CLIENT_MAX_LINE, LineReader, LineTooLong, encode, send


class ControlError(NbdMcError):
    """An error reply from the server; error_class is the reply's class."""

    def __init__(self, error_class: str, desc: str, reply: "dict | None" = None):
        super().__init__(desc)
        self.error_class = error_class
        self.reply = reply

    def __str__(self):
        return f"{self.error_class}: {self.desc}"

    @property
    def committed(self) -> "int | None":
        """The epoch the state file holds, sent with every commit error."""
        error = (self.reply or {}).get("error")
        return error.get("committed") if isinstance(error, dict) else None


class ControlProtocolError(NbdMcError):
    """The server said something that is not the control protocol."""

    error_class = "ProtocolError"


class ControlClient:
    """A blocking client; one request at a time (a lock makes it shareable)."""

    def __init__(self, address: str, tls: "TlsFiles | None" = None,
                 timeout: "float | None" = 30):
        self.address = address
        self.timeout = timeout
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._sock = _connect(parse_address(address), tls, timeout)
        try:
            self._reader = LineReader(self._sock, CLIENT_MAX_LINE)
            self.greeting = self._read_greeting()
        except BaseException:
            self._sock.close()
            raise

    def _read_greeting(self) -> dict:
        message = self._read_message("greeting")
        if "error" in message:
            raise _controlerror_reply(message)
        greeting = message.get("nbd-mc")
        if not isinstance(greeting, dict):
            raise ControlProtocolError(f"{self.address} is not an nbd-mc control server "
                                       f"(it greeted with {_brief(message)})")
        return greeting

    def execute(self, name: str, **arguments) -> dict:
        """Run one command; its "return" object, or ControlError."""
        return self.call(name, arguments)

    def call(self, name: str, arguments: "dict | None" = None) -> dict:
        """execute() for argument names that are not Python identifiers."""
        with self._lock:
            if self._sock is None:
                raise ConnectionError(f"control connection to {self.address} is closed")
            request_id = next(self._ids)
            request = {"execute": name, "id": request_id}
            if arguments:
                request["arguments"] = arguments
            try:
                send(self._sock, encode(request))
                reply = self._read_message(name)
            except TimeoutError:
                # A late reply would be taken for the next request's: give up
                # on this connection rather than risk answering out of turn.
                self._close_locked()
                raise TimeoutError(f"no reply to {name} from {self.address} "
                                   f"within {self.timeout} s") from None
        if reply.get("id") != request_id:
            raise ControlProtocolError(f"reply to {name} has id {reply.get('id')!r}, "
                                       f"expected {request_id}")
        if "error" in reply:
            raise _controlerror_reply(reply)
        if "return" not in reply:
            raise ControlProtocolError(f"reply to {name} has neither return nor error: "
                                       f"{_brief(reply)}")
        return reply["return"]

    def _read_message(self, what: str) -> dict:
        try:
            line = self._reader.readline()
        except LineTooLong:
            raise ControlProtocolError(f"{what}: reply longer than {CLIENT_MAX_LINE} bytes") from None
        if line is None:
            raise ConnectionError(f"control server {self.address} closed the connection "
                                  f"(waiting for {what})")
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise ControlProtocolError(f"{what}: reply is not JSON: {e}") from None
        if not isinstance(message, dict):
            raise ControlProtocolError(f"{what}: reply is not an object: {_brief(message)}")
        return message

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _connect(parsed: Address, tls: "TlsFiles | None", timeout):
    """A connected (and, with tls, handshaken) socket, with readable errors."""
    if isinstance(parsed, TCPAddress) and tls is None:
        raise ValueError(f"control address {parsed}: TCP needs TLS "
                         "(give the TLS certificate directory)")
    if isinstance(parsed, UnixAddress):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        target, server_hostname = parsed.path, None
    else:
        sock, target, server_hostname = None, (parsed.host, parsed.port), parsed.host
    try:
        if sock is None:
            sock = socket.create_connection(target, timeout=timeout)
        else:
            sock.connect(target)
    except OSError as e:
        if sock is not None:
            sock.close()
        if e.errno is None:
            raise
        raise type(e)(e.errno, f"cannot connect to control server {parsed}: "
                               f"{e.strerror}") from e
    if tls is None:
        return sock
    try:
        ctx = tls.client_context(check_hostname=server_hostname is not None)
        return ctx.wrap_socket(sock, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise


def _controlerror_reply(reply: dict) -> ControlError:
    error = reply.get("error")
    if not isinstance(error, dict):
        return ControlError("GenericError", f"malformed error reply: {_brief(reply)}", reply)
    return ControlError(str(error.get("class", "GenericError")), str(error.get("desc", "")), reply)


def _brief(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 200 else text[:200] + "..."
