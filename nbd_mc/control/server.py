"""The control server: accepts connections, answers requests, never raises into nbdkit.

It runs in a process whose job is serving a disk: whatever a peer sends, the
server answers or drops that one connection.  It knows nothing of commands: a
handler (nbd_mc.secondary.commands in the plugin) gives the meaning of each request.
"""

import errno
import logging
import os
import selectors
import socket
import ssl
import struct
import threading
import time

from nbd_mc import sockfile
from nbd_mc.address import TCPAddress, UnixAddress, check_unix_path, format_address, parse_address
from nbd_mc.errors import NbdMcError
from nbd_mc.tls import TlsFiles

from .wire import (MAX_LINE, LineReader, LineTooLong, Malformed, encode, error_reply,
                   json_type, parse_request, reply_line, send, shutdown)

log = logging.getLogger("nbd_mc.control")

#: Concurrent connections; each costs a thread.
MAX_CLIENTS = 64
#: Concurrent connections of one peer (a local process, by SO_PEERCRED, or a
#: remote address): one client, leaking or hostile, cannot take every slot.
MAX_PER_PEER = MAX_CLIENTS // 2
#: TCP connections whose TLS handshake is not done yet: a budget of their own,
#: outside the 64 slots, so peers without a certificate cannot take a slot.
MAX_HANDSHAKING = 16
#: ... of which one address may hold this many.
MAX_HANDSHAKING_PER_PEER = 4
#: An unauthenticated TCP peer may take this long to finish its handshake.
HANDSHAKE_TIMEOUT = 5.0


class AfterReply:
    """A handler's result whose ``action`` runs once the reply is sent.

    The action runs in a fresh thread, so it may close the server (or end the
    process) without cutting off the reply that announced it.
    """

    __slots__ = ("result", "action")

    def __init__(self, result: dict, action):
        self.result = result
        self.action = action


class _Client:
    """One connection's socket, swapped for its TLS wrapper after accept, and who
    is at the other end (for the per-peer limit).

    ``busy``: being greeted or answering a request (such a connection is never
    displaced); ``idle_since``: when it last finished one (monotonic);
    ``displaced``: its slot was given to a newcomer.  All three under the
    server's ``_lock``."""

    def __init__(self, sock):
        self.sock = sock
        self.thread = None
        self.peer = _peer_of(sock)
        self.busy = True
        self.idle_since = time.monotonic()
        self.displaced = False


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
    A handler that must act only once its reply is on its way (``quit``: stop
    the server that sends the reply) returns an AfterReply.

    Admission (docs/control-protocol.md, "Limits"): at most ``max_clients``
    connections hold a slot, at most ``max_per_peer`` of them one peer's.  When
    every slot is taken, a newcomer whose peer holds fewer slots than the peer
    holding the most takes the slot of that peer's longest idle connection
    (never one in the middle of a request); otherwise it is refused.  So no
    number of idle connections, from any number of processes, keeps a new
    process out.  Over TLS a connection takes a slot only once its handshake is
    done; until then it is in a separate budget (``MAX_HANDSHAKING``, of which
    ``MAX_HANDSHAKING_PER_PEER`` per address), where a newcomer over the budget
    displaces the oldest handshaking connection of its own address if that one
    holds its share, else of the address holding the most, and which it must
    leave within ``handshake_timeout``.

    State: ``_lock`` (a Condition) guards ``_clients``, ``_handshaking``, ``_closing``,
    ``_listening``, ``_started``, ``_listener`` until the accept thread runs,
    ``_accept_thread`` and each client's ``sock`` swap; the listener and the
    wake pipe belong to the accept thread once it runs.
    """

    def __init__(self, address: str, handler, greeting, tls: "TlsFiles | None" = None,
                 *, max_clients: int = MAX_CLIENTS, max_per_peer: int = MAX_PER_PEER,
                 max_line: int = MAX_LINE,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_handshaking: int = MAX_HANDSHAKING,
                 max_handshaking_per_peer: int = MAX_HANDSHAKING_PER_PEER):
        parsed = parse_address(address)
        if isinstance(parsed, UnixAddress):
            # Absolute now: the plugin builds us before nbdkit chdirs to /.
            parsed = UnixAddress(check_unix_path(os.path.abspath(parsed.path), address))
        elif tls is None:
            raise ValueError(f"control address {address}: TCP needs TLS with client "
                             "certificates (give a TLS certificate directory), "
                             "or use a unix socket")
        self._parsed = parsed
        self.address = format_address(parsed)
        self._handler = handler
        self._greeting = greeting
        # Built now so bad certificates fail at startup, not at first connection.
        self._ssl = tls.server_context() if tls is not None else None
        self._max_clients = max_clients
        self._max_per_peer = max_per_peer
        self._max_line = max_line
        self._handshake_timeout = handshake_timeout
        self._max_handshaking = max_handshaking
        self._max_handshaking_per_peer = max_handshaking_per_peer
        self._lock = threading.Condition()
        self._clients = set()
        self._handshaking = []          # oldest first
        self._closing = False
        self._listening = False
        self._started = False
        self._listener = None
        self._socket_id = None          # (st_dev, st_ino) of the socket file we made
        self._wake_r = self._wake_w = None
        self._accept_thread = None

    def __repr__(self):
        return f"ControlServer({self.address!r})"

    # lifecycle

    def listen(self) -> None:
        """Bind and listen now (errors raise here); connections queue until start().

        The plugin calls it in get_ready, before nbdkit forks into the
        background: an address in use then fails `nbd-mc serve` with its reason
        (after the fork nbdkit's stderr is /dev/null) before any pidfile says the
        server runs.
        """
        with self._lock:
            if self._listening:
                raise RuntimeError("control server already listening")
            self._listening = True
        listener = self._listen_tcp() if self._parsed.is_tcp else self._listen_unix()
        listener.setblocking(False)
        with self._lock:
            if not self._closing:
                self._listener = listener
                return
        listener.close()                # close() raced with listen()
        self._unlink_own_socket()

    def start(self) -> None:
        """Accept in a daemon thread, after listen() (called here if it was not).

        Called from the plugin's after_fork: a thread started before nbdkit
        forks would not exist in the daemon.
        """
        with self._lock:
            if self._started:
                raise RuntimeError("control server already started")
            self._started = True
            listening = self._listening
        if not listening:
            self.listen()
        thread = threading.Thread(target=self._accept_loop,
                                  name=f"nbd-mc-control-accept {self.address}", daemon=True)
        with self._lock:
            if self._closing:           # close() raced with start()
                listener, self._listener = self._listener, None
                if listener is not None:
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
            clients = list(self._clients) + self._handshaking
            thread = self._accept_thread
            idle = self._listener if thread is None else None  # listen() without start()
            if idle is not None:
                self._listener = None
        if idle is not None:
            idle.close()
            self._unlink_own_socket()
        if thread is not None:
            os.write(self._wake_w, b"x")
            self._join(thread, timeout)
            if not thread.is_alive():
                # Only now: a closed fd number could be reused by anyone.
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = None
        for client in clients:
            shutdown(client.sock)
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
        """Connections holding a slot or handshaking."""
        with self._lock:
            return len(self._clients) + len(self._handshaking)

    def wait_clients(self, count: int, timeout: "float | None" = None) -> bool:
        """Wait until exactly `count` connections are open (holding a slot or
        handshaking); False on timeout.

        Lets a caller (a test, a shutdown path) know that the server has seen
        a disconnect, without polling.
        """
        with self._lock:
            return self._lock.wait_for(
                lambda: len(self._clients) + len(self._handshaking) == count, timeout)

    # listening

    def _listen_unix(self) -> socket.socket:
        path = self._parsed.path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Probe, bind and listen as one claim (nbd_mc/sockfile.py): another
            # nbd-mc server's probe never sees this file bound but not listening,
            # which it could not tell from a dead server's and would remove.
            with sockfile.claimed(path):
                sockfile.remove_stale(path, "control socket")
                try:
                    sock.bind(path)
                except OSError as e:
                    raise OSError(e.errno, f"cannot create control socket {path}: "
                                           f"{e.strerror}") from e
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

    def _listen_tcp(self) -> socket.socket:
        host, port = self._parsed.host, self._parsed.port
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
        self.address = str(TCPAddress(host, sock.getsockname()[1]))
        return sock

    def _unlink_own_socket(self) -> None:
        """Remove the socket file only if it is still the one we created."""
        if self._parsed.is_tcp or self._socket_id is None:
            return
        path = self._parsed.path
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
        """Give a new connection a thread: over TLS into the handshake budget,
        otherwise straight into a slot (or refuse it)."""
        client = _Client(sock)
        if self._ssl is not None:
            with self._lock:
                if self._closing:
                    victim, admitted = None, False
                else:
                    victim, admitted = self._make_handshake_room(client), True
                    self._handshaking.append(client)
                    self._lock.notify_all()
            if victim is not None:
                log.warning("control server: dropping a connection from %s that has not "
                            "finished its TLS handshake, to make room", victim.peer)
                shutdown(victim.sock)
            if not admitted:
                sock.close()
                return
        elif not self._take_slot(client):
            return
        client.thread = threading.Thread(target=self._serve, args=(client,),
                                         name=f"nbd-mc-control {self.address}", daemon=True)
        try:
            client.thread.start()
        except RuntimeError as e:       # can't start new thread
            log.warning("control server: %s", e)
            self._forget(client)
            sock.close()

    def _make_handshake_room(self, client):
        """Under ``_lock``: the handshaking connection to drop so that ``client``
        fits the handshake budget (None if it fits).  Its own address's oldest
        if that address holds its share, so one address flooding connections only
        displaces its own; else the oldest of the address holding the most."""
        mine = [c for c in self._handshaking if c.peer == client.peer]
        if len(mine) >= self._max_handshaking_per_peer:
            victim = mine[0]
        elif len(self._handshaking) >= self._max_handshaking:
            counts = {}
            for c in self._handshaking:
                counts[c.peer] = counts.get(c.peer, 0) + 1
            top = max(counts.values())
            # the oldest of the address holding the most (a lone handshake of a
            # certified client is displaced only when every address holds one)
            victim = next(c for c in self._handshaking if counts[c.peer] == top)
        else:
            return None
        self._handshaking.remove(victim)
        victim.displaced = True
        return victim

    def _take_slot(self, client) -> bool:
        """Admit ``client`` to a slot, displacing another if the rule says so
        (the class docstring); on refusal tell it why and close it."""
        with self._lock:
            victim, why = self._choose_slot(client)
            if why is None:
                self._clients.add(client)
                self._lock.notify_all()
        if why is not None:
            self._refuse(client.sock, why)
            return False
        if victim is not None:
            self._displace(victim)
        return True

    def _choose_slot(self, client) -> tuple:
        """Under ``_lock``: (connection to displace or None, None) to admit
        ``client``, or (None, the reason) to refuse it."""
        if self._closing:
            return None, f"too many control connections ({self._max_clients}); close one and retry"
        counts = {}
        for c in self._clients:
            counts[c.peer] = counts.get(c.peer, 0) + 1
        mine = counts.get(client.peer, 0) if client.peer is not None else 0
        hog = client.peer is not None and mine >= self._max_per_peer
        if len(self._clients) < self._max_clients:
            if hog:
                return None, (f"too many control connections from this client "
                              f"({client.peer[0]} {client.peer[1]} holds {self._max_per_peer} "
                              f"of {self._max_clients}); close one and retry")
            return None, None
        idle = [c for c in self._clients if not c.busy and c.peer != client.peer]
        if idle and not hog:
            top = max(counts[c.peer] for c in idle)
            if top > mine:
                victim = min((c for c in idle if counts[c.peer] == top),
                             key=lambda c: c.idle_since)
                self._clients.discard(victim)
                victim.displaced = True
                self._clients.add(client)
                return victim, None
        return None, f"too many control connections ({self._max_clients}); close one and retry"

    def _displace(self, victim) -> None:
        """End a connection whose slot went to a newcomer: on a unix socket with a
        one-line reason (it is idle: nothing else is being written to it)."""
        why = (f"control connection closed: all {self._max_clients} connections were taken "
               "and this one, idle the longest of the client holding the most, made room "
               "for a new client; reconnect to go on")
        log.warning("control server: displacing an idle connection of %s", victim.peer)
        if self._ssl is None:
            try:
                victim.sock.send(encode(error_reply("GenericError", why)),
                                 socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            except OSError:
                pass
        shutdown(victim.sock)

    def _refuse(self, sock, why: str) -> None:
        """Tell a connection over the limit why it is dropped, without blocking.

        Over TLS (after its handshake) the reason goes through the TLS socket,
        which is blocking: a short timeout bounds it.
        """
        log.warning("control server: refusing a connection: %s", why)
        if not self._closing:
            try:
                data = encode(error_reply("GenericError", why))
                if isinstance(sock, ssl.SSLSocket):
                    sock.settimeout(1.0)
                    sock.sendall(data)
                else:
                    sock.setblocking(False)
                    sock.send(data, socket.MSG_NOSIGNAL)
            except (OSError, ValueError):
                pass
        sock.close()

    def _forget(self, client) -> None:
        with self._lock:
            self._clients.discard(client)
            if client in self._handshaking:
                self._handshaking.remove(client)
            self._lock.notify_all()

    # one connection

    def _serve(self, client) -> None:
        try:
            if self._ssl is not None:
                if not self._handshake(client):
                    return
                with self._lock:
                    if client.displaced or client not in self._handshaking:
                        return
                    self._handshaking.remove(client)
                    self._lock.notify_all()
                client.peer = _peer_of(client.sock)
                if not self._take_slot(client):
                    return
            if self._closing or not self._greet(client.sock):
                return
            with self._lock:
                client.busy = False
                client.idle_since = time.monotonic()
            self._converse(client)
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
            data = encode({"nbd-mc": greeting})
        except Exception as e:
            log.exception("control server: greeting failed")
            send(sock, encode(error_reply(getattr(e, "error_class", "GenericError"),
                                       f"cannot greet: {e}")))
            return False
        send(sock, data)
        return True

    def _converse(self, client) -> None:
        sock = client.sock
        reader = LineReader(sock, self._max_line)
        # No check of _closing here: close() ends this loop by shutting the
        # socket down, after the listener is gone, so a client that sees EOF
        # knows the socket file is gone too.
        while True:
            try:
                line = reader.readline()
            except LineTooLong:
                send(sock, encode(error_reply("BadRequest", f"request line longer than "
                                                         f"{self._max_line} bytes")))
                return
            if line is None:
                return
            if line.strip():
                with self._lock:
                    if client.displaced:    # its slot went to another: answer nothing more
                        return
                    client.busy = True
                try:
                    self._answer(sock, line)
                finally:
                    with self._lock:
                        client.busy = False
                        client.idle_since = time.monotonic()

    def _answer(self, sock, line: bytes) -> None:
        try:
            name, arguments, request_id = parse_request(line)
        except Malformed as e:
            send(sock, reply_line(error_reply(e.error_class, e.desc), e.request_id))
            return
        reply, then = self._call(name, arguments)
        send(sock, reply_line(reply, request_id))
        if then is not None:
            threading.Thread(target=self._after_reply, args=(name, then),
                             name=f"nbd-mc-control {name} {self.address}", daemon=True).start()

    def _call(self, name: str, arguments: dict) -> tuple:
        """(reply body, action to run after the reply or None); never raises."""
        then = None
        try:
            result = self._handler(name, arguments)
        except NbdMcError as e:
            reply = error_reply(e.error_class, e.desc)
            reply["error"].update(getattr(e, "details", None) or {})  # e.g. commit's "committed"
            return reply, None
        except Exception as e:
            log.exception("control command %r failed", name)
            return error_reply("GenericError", str(e) or type(e).__name__), None
        if isinstance(result, AfterReply):
            result, then = result.result, result.action
        if result is None:
            result = {}
        if not isinstance(result, dict):
            log.error("control command %r returned %s, not a dict", name, type(result).__name__)
            return error_reply("GenericError", f"command {name} did not return an object "
                                               f"(it returned {json_type(result)})"), None
        return {"return": result}, then

    @staticmethod
    def _after_reply(name: str, action) -> None:
        try:
            action()
        except Exception:
            log.exception("control server: %s failed after its reply", name)
