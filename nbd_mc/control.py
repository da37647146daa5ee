"""The control channel: JSON lines over a unix socket, or over TCP with TLS.

The server half runs inside nbdkit's embedded /usr/bin/python3, where only the
standard library is certain to be importable, so this module uses nothing else.
It also runs in a process whose job is serving a disk: whatever a peer sends,
the server answers or drops that one connection, and never raises into nbdkit.

Wire format (INTERFACE.md): the server greets with ``{"nbd-mc": {...}}``, then
answers each request line ``{"execute": NAME, "arguments": {...}, "id": ANY}``
with ``{"return": {...}, "id": ...}`` or ``{"error": {"class", "desc"}, "id": ...}``,
in the order the requests arrived on that connection.
"""

import errno
import ipaddress
import itertools
import json
import logging
import os
import selectors
import socket
import ssl
import stat
import struct
import threading

from nbd_mc.errors import BadRequest, NbdMcError

log = logging.getLogger("nbd_mc.control")

#: A request line longer than this is refused and its connection closed: the
#: largest real request is a few dozen bytes, so this only bounds memory.
MAX_LINE = 1 << 20
#: Replies (query-status of a big group) can be long; still, bound the client.
CLIENT_MAX_LINE = 64 << 20
#: Concurrent connections; each costs a thread.
MAX_CLIENTS = 64
#: Concurrent connections of one peer (a local process, by SO_PEERCRED, or a
#: remote address): one client, leaking or hostile, cannot take every slot.
MAX_PER_PEER = MAX_CLIENTS // 2
#: An unauthenticated TCP peer may hold a slot only this long.
HANDSHAKE_TIMEOUT = 10.0
#: Longest unix socket path the kernel takes (sun_path is 108 bytes).
UNIX_PATH_MAX = 107

_REQUEST_KEYS = frozenset({"execute", "arguments", "id"})
_NO_ID = object()


# --- addresses ------------------------------------------------------------

def parse_address(addr: str) -> tuple:
    """Split a --control ADDR into ("unix", path) or ("tcp", host, port).

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
    return ("unix", _check_unix_path(path, addr))


def _check_unix_path(path: str, addr: str) -> str:
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


def _parse_tcp(addr: str) -> tuple:
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
    return ("tcp", host, int(port))


def format_address(parsed: tuple) -> str:
    """The inverse of parse_address, for messages and the resolved .address."""
    if parsed[0] == "unix":
        path = parsed[1]
        ambiguous = path.startswith("unix:") or "://" in path
        return "unix://" + path if ambiguous else path
    host = parsed[1]
    if ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{parsed[2]}"


# --- TLS ------------------------------------------------------------------

class TlsFiles:
    """An x509 directory laid out as nbdkit and QEMU expect it.

    One directory serves all three programs, so an operator makes certificates
    once (tools/make-certs.sh) and points nbdkit, QEMU and nbd-mc at it.
    """

    CA = "ca-cert.pem"
    SERVER = ("server-cert.pem", "server-key.pem")
    CLIENT = ("client-cert.pem", "client-key.pem")

    def __init__(self, directory: str):
        # Absolute, because nbdkit chdirs to / when it daemonises.
        self.directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(errno.ENOENT,
                                    f"TLS certificate directory {self.directory} does not exist")

    def __repr__(self):
        return f"TlsFiles({self.directory!r})"

    def server_context(self) -> ssl.SSLContext:
        """A server context that admits only clients with a cert from our CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self._load(ctx, self.SERVER)
        return ctx

    def client_context(self, check_hostname: bool = True) -> ssl.SSLContext:
        """A client context that proves itself and trusts only our CA.

        check_hostname=False is for unix sockets, which have no host name to
        check; the server's certificate must still come from the CA.
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
        self._load(ctx, self.CLIENT)
        return ctx

    def _load(self, ctx: ssl.SSLContext, pair: tuple) -> None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ca = self._file(self.CA)
        cert, key = self._file(pair[0]), self._file(pair[1])
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"cannot load CA certificate {ca}: {e}") from e
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"cannot load certificate {cert} with key {key}: {e}") from e

    def _file(self, name: str) -> str:
        path = os.path.join(self.directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT,
                                    f"TLS certificate directory {self.directory} has no {name} "
                                    "(expected ca-cert.pem, server-cert.pem, server-key.pem, "
                                    "client-cert.pem, client-key.pem; see tools/make-certs.sh)")
        return path


# --- line framing ---------------------------------------------------------

class LineTooLong(Exception):
    """A peer sent more than the line limit without a newline."""


class _LineReader:
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


def _encode(message: dict) -> bytes:
    # ensure_ascii keeps lone surrogates (legal in JSON escapes) encodable;
    # allow_nan=False keeps the output strict JSON for other languages' parsers.
    return json.dumps(message, allow_nan=False, separators=(",", ":")).encode() + b"\n"


def _send(sock, data: bytes) -> None:
    if isinstance(sock, ssl.SSLSocket):
        sock.sendall(data)
    else:
        # No SIGPIPE even if the embedding process did not ignore it.
        sock.sendall(data, socket.MSG_NOSIGNAL)


def _shutdown(sock) -> None:
    """Wake a thread blocked on sock without closing the fd under it.

    The base-class method is called on purpose: SSLSocket.shutdown drops its
    SSL object, which the reading thread may be using at that moment.
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


# --- requests -------------------------------------------------------------

class _Malformed(BadRequest):
    """A BadRequest that remembers the id, if one could be read."""

    def __init__(self, desc: str, request_id=_NO_ID):
        super().__init__(desc)
        self.request_id = request_id


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def parse_request(line: bytes) -> tuple:
    """Decode one request line into (name, arguments, id or _NO_ID).

    Strict on purpose: a typo such as "argument" would otherwise run the
    command without its arguments.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Malformed(f"request is not valid UTF-8 (byte {e.start})") from None
    try:
        request = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise _Malformed("request is nested too deeply") from None
    except ValueError as e:
        raise _Malformed(f"request is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise _Malformed(f"request must be a JSON object, not {_json_type(request)}")
    request_id = request.get("id", _NO_ID)
    extra = sorted(set(request) - _REQUEST_KEYS)
    if extra:
        raise _Malformed(f"unexpected member {extra[0]!r} in request "
                         "(allowed: execute, arguments, id)", request_id)
    name = request.get("execute")
    if not isinstance(name, str):
        what = "missing" if "execute" not in request else f"a {_json_type(name)}"
        raise _Malformed(f"'execute' must be a string naming the command, it is {what}",
                         request_id)
    arguments = request.get("arguments", {})
    if not isinstance(arguments, dict):
        raise _Malformed(f"'arguments' must be an object, not {_json_type(arguments)}",
                         request_id)
    return name, arguments, request_id


def _json_type(value) -> str:
    for kind, name in ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"),
                       (list, "array"), (dict, "object"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _error(error_class: str, desc: str) -> dict:
    return {"error": {"class": error_class, "desc": desc}}


def _with_id(reply: dict, request_id) -> bytes:
    """Serialise a reply, falling back to a plain error if it cannot be.

    A handler returning something JSON cannot express (a set, NaN) is a bug,
    but it must cost one error reply, not the connection.
    """
    if request_id is not _NO_ID:
        reply = dict(reply, id=request_id)
    try:
        return _encode(reply)
    except (TypeError, ValueError, RecursionError) as e:
        log.error("control reply not serialisable: %s", e)
        fallback = _error("GenericError", f"reply could not be encoded as JSON: {e}")
        try:
            return _encode(dict(fallback, id=request_id) if request_id is not _NO_ID else fallback)
        except (TypeError, ValueError, RecursionError):
            return _encode(fallback)


# --- server ---------------------------------------------------------------

class _Client:
    """One connection's socket, swapped for its TLS wrapper after accept, and who
    is at the other end (for the per-peer limit)."""

    def __init__(self, sock):
        self.sock = sock
        self.thread = None
        self.peer = _peer_of(sock)


def _peer_of(sock):
    """("pid", N) of a local peer, ("address", IP) of a remote one, None if unknown."""
    try:
        if sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return ("pid", struct.unpack("3i", creds)[0])
        return ("address", sock.getpeername()[0])
    except OSError:
        return None


class ControlServer:
    """Serves the control protocol on a unix socket or TLS over TCP.

    handler(name, arguments) -> dict runs in the connection's thread; calls
    from different connections overlap, so the handler does its own locking.
    "quit" is answered here and then on_quit() runs in a fresh thread (so it
    may call close()); without on_quit, quit closes this server.
    """

    def __init__(self, address: str, handler, greeting, tls: "TlsFiles | None" = None,
                 on_quit=None, *, max_clients: int = MAX_CLIENTS,
                 max_per_peer: int = MAX_PER_PEER, max_line: int = MAX_LINE,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT):
        parsed = parse_address(address)
        if parsed[0] == "unix":
            # Absolute now: the plugin builds us before nbdkit chdirs to /.
            parsed = ("unix", _check_unix_path(os.path.abspath(parsed[1]), address))
        elif tls is None:
            raise ValueError(f"control address {address}: TCP needs TLS with client "
                             "certificates (give a TLS certificate directory), "
                             "or use a unix socket")
        self._parsed = parsed
        self.address = format_address(parsed)
        self._handler = handler
        self._greeting = greeting
        self._on_quit = on_quit
        # Built now so bad certificates fail at startup, not at first connection.
        self._ssl = tls.server_context() if tls is not None else None
        self._max_clients = max_clients
        self._max_per_peer = max_per_peer
        self._max_line = max_line
        self._handshake_timeout = handshake_timeout
        self._lock = threading.Condition()
        self._clients = set()
        self._closing = False
        self._started = False
        self._listener = None
        self._socket_id = None          # (st_dev, st_ino) of the socket file we made
        self._wake_r = self._wake_w = None
        self._accept_thread = None

    def __repr__(self):
        return f"ControlServer({self.address!r})"

    # lifecycle

    def start(self) -> None:
        """Bind and listen now (errors raise here), then accept in a daemon thread.

        Called from the plugin's after_fork: a thread started before nbdkit
        forks would not exist in the daemon.
        """
        with self._lock:
            if self._started:
                raise RuntimeError("control server already started")
            self._started = True
        listener = self._listen_unix() if self._parsed[0] == "unix" else self._listen_tcp()
        listener.setblocking(False)
        self._listener = listener
        thread = threading.Thread(target=self._accept_loop,
                                  name=f"nbd-mc-control-accept {self.address}", daemon=True)
        with self._lock:
            if self._closing:           # close() raced with start()
                listener.close()
                self._unlink_own_socket()
                return
            self._wake_r, self._wake_w = os.pipe()
            self._accept_thread = thread
            thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop accepting, drop every connection, remove the socket file.

        Idempotent, and safe from a handler or on_quit thread. Threads stuck in
        a handler call cannot be interrupted; they are daemons, so they are
        joined only briefly.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            clients = list(self._clients)
            thread = self._accept_thread
        if thread is not None:
            os.write(self._wake_w, b"x")
            self._join(thread, timeout)
            if not thread.is_alive():
                # Only now: a closed fd number could be reused by anyone.
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = None
        for client in clients:
            _shutdown(client.sock)
        for client in clients:
            self._join(client.thread, timeout)

    @staticmethod
    def _join(thread, timeout):
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def client_count(self) -> int:
        with self._lock:
            return len(self._clients)

    def wait_clients(self, count: int, timeout: "float | None" = None) -> bool:
        """Wait until exactly `count` connections are open; False on timeout.

        Lets a caller (a test, a shutdown path) know that the server has seen
        a disconnect, without polling.
        """
        with self._lock:
            return self._lock.wait_for(lambda: len(self._clients) == count, timeout)

    # listening

    def _listen_unix(self) -> socket.socket:
        path = self._parsed[1]
        self._remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.bind(path)
            except OSError as e:
                raise OSError(e.errno, f"cannot create control socket {path}: {e.strerror}") from e
            # Nobody can connect before listen(), so chmod-then-listen leaves no
            # window in which the socket is open to other users; umask would,
            # being process-wide while other threads create files.
            os.chmod(path, 0o600)
            st = os.stat(path)
            self._socket_id = (st.st_dev, st.st_ino)
            sock.listen(min(self._max_clients, socket.SOMAXCONN))
        except BaseException:
            sock.close()
            self._unlink_own_socket()
            raise
        return sock

    @staticmethod
    def _remove_stale_socket(path: str) -> None:
        """Replace the socket file of a dead server, never a live one.

        nbdkit killed with -9 leaves its socket file behind; refusing to start
        then would make every crash need manual cleanup.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST,
                                  f"control socket path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass
        except OSError as e:
            raise OSError(e.errno, f"control socket {path}: cannot tell whether it is in use: "
                          f"{e.strerror}") from e
        else:
            raise OSError(errno.EADDRINUSE,
                          f"control socket {path} is in use by another server")
        finally:
            probe.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _listen_tcp(self) -> socket.socket:
        _, host, port = self._parsed
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise OSError(errno.EADDRNOTAVAIL, f"control address {self.address}: {e}") from e
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as e:
                raise OSError(e.errno, f"cannot listen on {self.address}: {e.strerror}") from e
            sock.listen(min(self._max_clients, socket.SOMAXCONN))
        except BaseException:
            sock.close()
            raise
        self.address = format_address(("tcp", host, sock.getsockname()[1]))
        return sock

    def _unlink_own_socket(self) -> None:
        """Remove the socket file only if it is still the one we created."""
        if self._parsed[0] != "unix" or self._socket_id is None:
            return
        path = self._parsed[1]
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self._socket_id:
                os.unlink(path)
        except FileNotFoundError:
            pass
        self._socket_id = None

    # accepting

    def _accept_loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._closing:
                events = selector.select()
                if self._closing:
                    break
                if events:
                    self._accept_one(selector)
        except Exception:
            log.exception("control server accept loop failed")
        finally:
            selector.close()
            self._listener.close()
            self._unlink_own_socket()

    def _accept_one(self, selector) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:
            # Out of fds or memory: the listener stays readable, so back off
            # instead of spinning; the wake pipe still ends the wait at close().
            log.warning("control server cannot accept: %s", e)
            selector.unregister(self._listener)
            selector.select(0.1)
            selector.register(self._listener, selectors.EVENT_READ)
            return
        sock.setblocking(True)
        self._admit(sock)

    def _admit(self, sock) -> None:
        client = _Client(sock)
        with self._lock:
            full = self._closing or len(self._clients) >= self._max_clients
            hog = not full and client.peer is not None and sum(
                c.peer == client.peer for c in self._clients) >= self._max_per_peer
            if not (full or hog):
                self._clients.add(client)
                self._lock.notify_all()
        if full or hog:
            self._refuse(sock, client.peer if hog else None)
            return
        client.thread = threading.Thread(target=self._serve, args=(client,),
                                         name=f"nbd-mc-control {self.address}", daemon=True)
        try:
            client.thread.start()
        except RuntimeError as e:       # can't start new thread
            log.warning("control server: %s", e)
            self._forget(client)
            sock.close()

    def _refuse(self, sock, hog=None) -> None:
        """Tell a connection over the limit why it is dropped, without blocking.

        ``hog``: the peer that already holds its share of the slots.  Over TLS the
        reason cannot be sent without a handshake, which could block the accept
        thread, so those peers just see the connection close.
        """
        if hog is not None:
            why = (f"too many control connections from this client ({hog[0]} {hog[1]} holds "
                   f"{self._max_per_peer} of {self._max_clients}); close one and retry")
        else:
            why = f"too many control connections ({self._max_clients}); close one and retry"
        log.warning("control server: refusing a connection: %s", why)
        if self._ssl is None and not self._closing:
            try:
                sock.setblocking(False)
                sock.send(_encode(_error("GenericError", why)), socket.MSG_NOSIGNAL)
            except OSError:
                pass
        sock.close()

    def _forget(self, client) -> None:
        with self._lock:
            self._clients.discard(client)
            self._lock.notify_all()

    # one connection

    def _serve(self, client) -> None:
        try:
            if self._ssl is not None and not self._handshake(client):
                return
            if self._closing or not self._greet(client.sock):
                return
            self._converse(client.sock)
        except OSError as e:
            log.debug("control connection ended: %s", e)
        except Exception:
            log.exception("control connection failed")
        finally:
            try:
                client.sock.close()
            finally:
                self._forget(client)

    def _handshake(self, client) -> bool:
        # A peer that already reset is turned away here: wrap_socket would
        # raise for it after taking over the fd, leaving the fd to the
        # garbage collector.
        client.sock.getpeername()
        tls_sock = self._ssl.wrap_socket(client.sock, server_side=True,
                                         do_handshake_on_connect=False)
        with self._lock:
            client.sock = tls_sock      # from now on close() must shut this one down
        if self._closing:
            return False
        tls_sock.settimeout(self._handshake_timeout)
        try:
            tls_sock.do_handshake()
        except (ssl.SSLError, OSError) as e:
            log.warning("control server: TLS handshake refused: %s", e)
            return False
        tls_sock.settimeout(None)       # a control connection may idle for hours
        return True

    def _greet(self, sock) -> bool:
        try:
            greeting = self._greeting()
            data = _encode({"nbd-mc": greeting})
        except Exception as e:
            log.exception("control server: greeting failed")
            _send(sock, _encode(_error(getattr(e, "error_class", "GenericError"),
                                       f"cannot greet: {e}")))
            return False
        _send(sock, data)
        return True

    def _converse(self, sock) -> None:
        reader = _LineReader(sock, self._max_line)
        # No check of _closing here: close() ends this loop by shutting the
        # socket down, after the listener is gone, so a client that sees EOF
        # knows the socket file is gone too.
        while True:
            try:
                line = reader.readline()
            except LineTooLong:
                _send(sock, _encode(_error("BadRequest", f"request line longer than "
                                                         f"{self._max_line} bytes")))
                return
            if line is None:
                return
            if line.strip():
                self._answer(sock, line)

    def _answer(self, sock, line: bytes) -> None:
        try:
            name, arguments, request_id = parse_request(line)
        except _Malformed as e:
            _send(sock, _with_id(_error(e.error_class, e.desc), e.request_id))
            return
        if name == "quit":
            if arguments:  # as every command: a typo must not run it (and this one stops us)
                _send(sock, _with_id(_error("BadRequest", "quit: unexpected arguments "
                                                          f"{', '.join(sorted(arguments))}"),
                                     request_id))
                return
            _send(sock, _with_id({"return": {}}, request_id))
            threading.Thread(target=self._quit, name=f"nbd-mc-control quit {self.address}",
                             daemon=True).start()
            return
        _send(sock, _with_id(self._call(name, arguments), request_id))

    def _call(self, name: str, arguments: dict) -> dict:
        try:
            result = self._handler(name, arguments)
        except NbdMcError as e:
            reply = _error(e.error_class, e.desc)
            reply["error"].update(getattr(e, "details", None) or {})  # e.g. commit's "committed"
            return reply
        except Exception as e:
            log.exception("control command %r failed", name)
            return _error("GenericError", str(e) or type(e).__name__)
        if result is None:
            result = {}
        if not isinstance(result, dict):
            log.error("control command %r returned %s, not a dict", name, type(result).__name__)
            return _error("GenericError", f"command {name} did not return an object "
                                          f"(it returned {_json_type(result)})")
        return {"return": result}

    def _quit(self) -> None:
        try:
            if self._on_quit is None:
                self.close()
            else:
                self._on_quit()
        except Exception:
            log.exception("control server: quit failed")


# --- client ---------------------------------------------------------------

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
            self._reader = _LineReader(self._sock, CLIENT_MAX_LINE)
            self.greeting = self._read_greeting()
        except BaseException:
            self._sock.close()
            raise

    def _read_greeting(self) -> dict:
        message = self._read_message("greeting")
        if "error" in message:
            raise _control_error(message)
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
                _send(self._sock, _encode(request))
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
            raise _control_error(reply)
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


def _connect(parsed: tuple, tls: "TlsFiles | None", timeout):
    """A connected (and, with tls, handshaken) socket, with readable errors."""
    if parsed[0] == "tcp" and tls is None:
        raise ValueError(f"control address {format_address(parsed)}: TCP needs TLS "
                         "(give the TLS certificate directory)")
    if parsed[0] == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        target, server_hostname = parsed[1], None
    else:
        sock, target, server_hostname = None, (parsed[1], parsed[2]), parsed[1]
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
        raise type(e)(e.errno, f"cannot connect to control server {format_address(parsed)}: "
                               f"{e.strerror}") from e
    if tls is None:
        return sock
    try:
        ctx = tls.client_context(check_hostname=server_hostname is not None)
        return ctx.wrap_socket(sock, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise


def _control_error(reply: dict) -> ControlError:
    error = reply.get("error")
    if not isinstance(error, dict):
        return ControlError("GenericError", f"malformed error reply: {_brief(reply)}", reply)
    return ControlError(str(error.get("class", "GenericError")), str(error.get("desc", "")), reply)


def _brief(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 200 else text[:200] + "..."
