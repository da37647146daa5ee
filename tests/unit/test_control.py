"""The control channel at its wire: what a peer can send, and what it gets back.

The handler is a small dict-backed counter: a real implementation of the
handler contract, standing in for the engine at the protocol boundary, so these
tests say nothing about commit or rollback, only about the channel.
"""

import json
import os
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from nbd_mc import sockfile
from nbd_mc.address import TCPAddress, UnixAddress, format_address, parse_address
from nbd_mc.control import (AfterReply, ControlClient, ControlError, ControlProtocolError,
                            ControlServer)
from nbd_mc.tls import TlsFiles
from nbd_mc.errors import CommandNotFound, EpochMismatch
from support.servers import connect_as_children, wait_until

REPO = Path(__file__).resolve().parents[2]
MAKE_CERTS = REPO / "tools" / "make-certs.sh"
WIRE_TIMEOUT = 10           # a safety net against hangs, never a synchronisation
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


# --- a real handler -------------------------------------------------------

class Counter:
    """Named counters, plus a few commands that misbehave on purpose."""

    def __init__(self):
        self.values = {}
        self.calls = []
        self.lock = threading.Lock()
        self.gate = threading.Event()       # "wait" blocks on it
        self.entered = threading.Event()    # set when "wait" has started
        self.barrier = None                 # "meet" waits on it
        self.after = None                   # what "later" runs once its reply is sent

    def __call__(self, name, arguments):
        with self.lock:
            self.calls.append((name, arguments))
        command = getattr(self, "cmd_" + name.replace("-", "_"), None)
        if command is None:
            raise CommandNotFound(f"no command {name!r}")
        return command(**arguments)

    def cmd_add(self, key, amount=1):
        with self.lock:
            self.values[key] = self.values.get(key, 0) + amount
            return {"value": self.values[key]}

    def cmd_get(self, key):
        with self.lock:
            return {"value": self.values.get(key, 0)}

    def cmd_epoch(self):
        raise EpochMismatch("epoch 7 is not the open epoch 3")

    def cmd_crash(self):
        raise ZeroDivisionError("division by zero in the engine")

    def cmd_bad_return(self):
        return {"set": {1, 2}}

    def cmd_not_a_dict(self):
        return [1, 2]

    def cmd_wait(self):
        self.entered.set()
        self.gate.wait(WIRE_TIMEOUT)
        return {}

    def cmd_meet(self):
        self.barrier.wait(WIRE_TIMEOUT)
        return {}

    def cmd_later(self):
        return AfterReply({"later": True}, self.after)


class Recorder:
    """Echoes every call, so a fuzzed request can be checked end to end."""

    def __init__(self):
        self.calls = []

    def __call__(self, name, arguments):
        self.calls.append((name, arguments))
        return {"name": name, "arguments": arguments}


def greeting_of(counter):
    return lambda: {"version": "test", "committed": counter.values.get("committed", 0),
                    "disks": ["vda"]}


# --- wire-level peer ------------------------------------------------------

class Peer:
    """A raw connection that can send anything, as a hostile client would."""

    opened = []                 # closed after each test by close_peers

    def __init__(self, address, family=socket.AF_UNIX):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        Peer.opened.append(self.sock)
        self.sock.settimeout(WIRE_TIMEOUT)
        self.sock.connect(address)
        self.buf = b""

    def send(self, data: bytes):
        self.sock.sendall(data)

    def line(self):
        """The next line, or None at end of stream."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                assert self.buf == b"", f"unterminated line {self.buf!r}"
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def message(self):
        line = self.line()
        return None if line is None else json.loads(line)

    def ask(self, request):
        self.send(json.dumps(request).encode() + b"\n")
        return self.message()

    def shut_write(self):
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self):
        """Close with RST instead of FIN (unix sockets just close)."""
        if self.sock.family != socket.AF_UNIX:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self):
        self.sock.close()


def bad_request(reply):
    return reply is not None and "error" in reply and reply["error"]["class"] == "BadRequest"


MARKER = {"execute": "get", "arguments": {"key": "k"}, "id": "marker"}


def still_answers(address):
    with ControlClient(address, timeout=WIRE_TIMEOUT) as client:
        return client.execute("get", key="k") == {"value": 0}


def control_threads(server):
    return [t for t in threading.enumerate()
            if t.name.startswith("nbd-mc-control") and t.name.endswith(server.address)]


def drain(sock) -> bytes:
    """Everything a peer sends until it hangs up (a reset counts as hanging up)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


# --- fixtures -------------------------------------------------------------

@pytest.fixture(autouse=True)
def close_peers():
    yield
    while Peer.opened:
        Peer.opened.pop().close()


@pytest.fixture
def short_dir():
    """A directory short enough for unix socket paths (pytest's can exceed 107 bytes)."""
    path = tempfile.mkdtemp(prefix="nbdmc-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def counter():
    return Counter()


@pytest.fixture
def make_server(short_dir, counter):
    servers = []

    def make(address=None, **kwargs):
        kwargs.setdefault("handler", counter)
        kwargs.setdefault("greeting", greeting_of(counter))
        server = ControlServer(address or str(short_dir / "ctl.sock"), **kwargs)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture(scope="module")
def fuzz_server():
    """One server for all fuzz examples, with a small line limit to reach it cheaply."""
    path = tempfile.mkdtemp(prefix="nbdmc-", dir="/tmp")
    recorder = Recorder()
    srv = ControlServer(os.path.join(path, "ctl.sock"), recorder, lambda: {"version": "fuzz"},
                        max_line=512)
    srv.start()
    srv.recorder = recorder
    yield srv
    srv.close()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Two independent CAs, and a directory mixing our CA with the other CA's client."""
    root = tmp_path_factory.mktemp("certs")
    for name in ("good", "other"):
        subprocess.run([str(MAKE_CERTS), str(root / name)], check=True)
    rogue = root / "rogue"
    rogue.mkdir()
    shutil.copy(root / "good" / "ca-cert.pem", rogue)
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(root / "other" / name, rogue)
    return {name: TlsFiles(str(root / name)) for name in ("good", "other", "rogue")}


@pytest.fixture
def tls_server(make_server, certs):
    return make_server("tcp://127.0.0.1:0", tls=certs["good"])


# --- addresses ------------------------------------------------------------

@pytest.mark.parametrize("addr, parsed", [
    ("/run/nbd-mc/control.sock", UnixAddress("/run/nbd-mc/control.sock")),
    ("unix:/run/ctl.sock", UnixAddress("/run/ctl.sock")),
    ("unix:///run/ctl.sock", UnixAddress("/run/ctl.sock")),
    ("ctl.sock", UnixAddress("ctl.sock")),
    ("tcp://127.0.0.1:10809", TCPAddress("127.0.0.1", 10809)),
    ("tcp://secondary.example:0", TCPAddress("secondary.example", 0)),
    ("tcp://[::1]:65535", TCPAddress("::1", 65535)),
    ("tcp://host:7/", TCPAddress("host", 7)),
])
def test_parse_address_accepts(addr, parsed):
    assert parse_address(addr) == parsed


@pytest.mark.parametrize("addr", [
    "", "unix:", "tcp://", "tcp://host", "tcp://:80", "tcp://host:", "tcp://host:http",
    "tcp://host:65536", "tcp://host:-1", "tcp://::1:80", "tcp://[::1]80", "tcp://[nope]:80",
    "tcp://a b:80", "http://host:80", "/tmp/a\0b", "/" + "x" * 107,
])
def test_parse_address_rejects_with_value_error(addr):
    with pytest.raises(ValueError, match="control|address|port|path"):
        parse_address(addr)


@given(st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_parse_address_raises_only_value_error_and_round_trips(addr):
    try:
        parsed = parse_address(addr)
    except ValueError:
        return
    assert parse_address(format_address(parsed)) == parsed


# --- greeting and replies -------------------------------------------------

def test_greeting_is_the_first_line_of_every_connection(server, counter):
    first = Peer(server.address)
    assert first.message() == {"nbd-mc": {"version": "test", "committed": 0, "disks": ["vda"]}}
    counter.values["committed"] = 5
    second = Peer(server.address)
    assert second.message()["nbd-mc"]["committed"] == 5, "greeting() is called per connection"
    with ControlClient(server.address) as client:
        assert client.greeting == {"version": "test", "committed": 5, "disks": ["vda"]}
    first.close()
    second.close()
    assert counter.calls == []


@pytest.mark.parametrize("request_id", [0, 17, "abc", None, 1.5, True, [1, {"a": None}],
                                        {"nested": ["x"]}])
def test_reply_echoes_any_id(server, request_id):
    peer = Peer(server.address)
    peer.message()
    reply = peer.ask({"execute": "add", "arguments": {"key": "k", "amount": 2},
                      "id": request_id})
    assert reply == {"return": {"value": 2}, "id": request_id}


def test_reply_without_id_has_no_id(server):
    peer = Peer(server.address)
    peer.message()
    assert peer.ask({"execute": "get", "arguments": {"key": "k"}}) == {"return": {"value": 0}}
    assert peer.ask({"execute": "epoch"}) == {
        "error": {"class": "EpochMismatch", "desc": "epoch 7 is not the open epoch 3"}}


def test_client_execute_round_trip(server, counter):
    with ControlClient(server.address) as client:
        assert client.execute("add", key="a") == {"value": 1}
        assert client.execute("add", key="a", amount=41) == {"value": 42}
        assert client.call("get", {"key": "a"}) == {"value": 42}
    assert counter.calls == [("add", {"key": "a"}), ("add", {"key": "a", "amount": 41}),
                             ("get", {"key": "a"})]


def test_engine_error_keeps_its_class(server):
    with ControlClient(server.address) as client:
        with pytest.raises(ControlError) as caught:
            client.execute("epoch")
        assert caught.value.error_class == "EpochMismatch"
        assert caught.value.desc == "epoch 7 is not the open epoch 3"
        assert client.execute("get", key="k") == {"value": 0}


def test_unknown_command_is_the_handlers_business(server, counter):
    with ControlClient(server.address) as client:
        with pytest.raises(ControlError) as caught:
            client.execute("frobnicate", x=1)
    assert caught.value.error_class == "CommandNotFound"
    assert counter.calls == [("frobnicate", {"x": 1})]


@pytest.mark.parametrize("command, desc", [
    ("crash", "division by zero in the engine"),
    ("bad-return", "reply could not be encoded as JSON"),
    ("not-a-dict", "did not return an object"),
])
def test_handler_bug_is_a_generic_error_and_the_connection_lives(server, command, desc):
    with ControlClient(server.address) as client:
        with pytest.raises(ControlError, match=desc) as caught:
            client.execute(command)
        assert caught.value.error_class == "GenericError"
        assert client.execute("add", key="k") == {"value": 1}


def test_argument_error_in_handler_is_reported(server):
    with ControlClient(server.address) as client:
        with pytest.raises(ControlError) as caught:
            client.execute("add", wrong=1)
        assert caught.value.error_class == "GenericError"
        assert "wrong" in caught.value.desc


# --- malformed input ------------------------------------------------------

MALFORMED = [
    (b"not json", None),
    (b"{\"execute\": \"get\"", None),
    (b"[1, 2]", None),
    (b"42", None),
    (b"\"execute\"", None),
    (b"null", None),
    (b"{}", None),
    (b"{\"id\": 3}", 3),
    (b"{\"execute\": 5, \"id\": \"x\"}", "x"),
    (b"{\"execute\": null, \"id\": [1]}", [1]),
    (b"{\"execute\": \"get\", \"arguments\": [\"k\"], \"id\": 4}", 4),
    (b"{\"execute\": \"get\", \"arguments\": null, \"id\": 5}", 5),
    (b"{\"execute\": \"get\", \"arguments\": \"k\"}", None),
    (b"{\"execute\": \"get\", \"argument\": {\"key\": \"k\"}, \"id\": 6}", 6),
    (b"{\"execute\": \"get\\u0000\", \"arguments\": {}, \"oops\": 1}", None),
    (b"{\"execute\": \"get\", \"id\": NaN}", None),
    (b"{\"execute\": \"get\", \"arguments\": {\"key\": Infinity}}", None),
    (b"{\"execute\": \"g\xff\xfe\"}", None),
    (b"\xc3\x28", None),
    (b"\xef\xbb\xbf{\"execute\": \"get\"}", None),          # a BOM is not JSON
    (b"[" * 100000 + b"]" * 100000, None),
    (b"{\"execute\": \"get\", \"id\": " + b"9" * 5000 + b"}", None),
    (b"\x00\x01\x02", None),
]


@pytest.mark.parametrize("line, request_id", MALFORMED,
                         ids=[f"malformed{i}" for i in range(len(MALFORMED))])
def test_malformed_line_is_a_bad_request_and_the_connection_lives(server, counter,
                                                                  line, request_id):
    peer = Peer(server.address)
    peer.message()
    peer.send(line + b"\n")
    reply = peer.message()
    assert bad_request(reply), reply
    assert reply["error"]["desc"]
    if request_id is None:
        assert "id" not in reply
    else:
        assert reply["id"] == request_id
    assert peer.ask(MARKER) == {"return": {"value": 0}, "id": "marker"}
    assert counter.calls == [("get", {"key": "k"})]


def test_blank_lines_are_ignored(server):
    peer = Peer(server.address)
    peer.message()
    peer.send(b"\n\n   \n\t\r\n" + json.dumps(MARKER).encode() + b"\n")
    assert peer.message()["id"] == "marker"


def test_pipelined_requests_with_crlf_are_answered_in_order(server):
    peer = Peer(server.address)
    peer.message()
    peer.send(b"".join(json.dumps({"execute": "add", "arguments": {"key": "p"}, "id": i})
                       .encode() + b"\r\n" for i in range(50)))
    for i in range(50):
        assert peer.message() == {"return": {"value": i + 1}, "id": i}


def test_request_dribbled_byte_by_byte(server):
    peer = Peer(server.address)
    peer.message()
    for byte in json.dumps(MARKER).encode() + b"\n":
        peer.send(bytes([byte]))
    assert peer.message()["id"] == "marker"


def test_line_limit_boundary(make_server, counter):
    server = make_server(max_line=1000)
    request = json.dumps(MARKER).encode()
    peer = Peer(server.address)
    peer.message()
    peer.send(request + b" " * (1000 - len(request)) + b"\n")
    assert peer.message()["id"] == "marker", "a line of exactly max_line bytes is accepted"
    peer.send(request + b" " * (1001 - len(request)) + b"\n")
    assert bad_request(peer.message())
    assert peer.line() is None, "the connection of an over-long line is closed"
    assert counter.calls == [("get", {"key": "k"})]
    assert still_answers(server.address)


def test_default_limit_stops_an_endless_line(server, counter):
    peer = Peer(server.address)
    peer.message()
    chunk = b"x" * 65536
    try:
        for _ in range(64):                 # 4 MiB, far past the 1 MiB limit
            peer.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass                                # the server stopped reading: that is the point
    reply = peer.message()
    assert bad_request(reply) and "1048576" in reply["error"]["desc"]
    assert counter.calls == []
    assert still_answers(server.address)


# --- connections that end badly -------------------------------------------

def test_half_closed_connection_gets_every_reply(server):
    peer = Peer(server.address)
    peer.message()
    peer.send(b'{"execute": "add", "arguments": {"key": "h"}, "id": 1}\n'
              b'{"execute": "add", "arguments": {"key": "h"}, "id": 2}')   # no final newline
    peer.shut_write()
    assert peer.message() == {"return": {"value": 1}, "id": 1}
    assert peer.message() == {"return": {"value": 2}, "id": 2}
    assert peer.line() is None
    assert server.wait_clients(0, WIRE_TIMEOUT)
    assert still_answers(server.address)


def test_peer_gone_while_its_command_runs(server, counter):
    peer = Peer(server.address)
    peer.message()
    peer.send(b'{"execute": "wait", "id": 1}\n')
    assert counter.entered.wait(WIRE_TIMEOUT)
    peer.reset()
    counter.gate.set()                      # the reply now goes to a closed socket
    assert server.wait_clients(0, WIRE_TIMEOUT)
    assert still_answers(server.address)


def test_peers_that_vanish_at_once(server, tls_server):
    for _ in range(20):
        Peer(server.address).reset()
        Peer(("127.0.0.1", int(tls_server.address.rsplit(":", 1)[1])), socket.AF_INET).reset()
    assert server.wait_clients(0, WIRE_TIMEOUT)
    assert tls_server.wait_clients(0, WIRE_TIMEOUT)
    assert still_answers(server.address)


# --- concurrency ----------------------------------------------------------

def run_threads(target, count):
    errors = []

    def guarded(i):
        try:
            target(i)
        except BaseException as e:          # reported below, with its thread
            errors.append((i, e))

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WIRE_TIMEOUT * 3)
    assert errors == []


def test_many_concurrent_clients_lose_no_update(server, counter):
    def client(i):
        with ControlClient(server.address) as c:
            for _ in range(25):
                c.execute("add", key="shared")

    def vandal(i):
        peer = Peer(server.address)
        peer.send(os.urandom(300).replace(b"execute", b"") + b"\n" + b"[]\n")
        peer.reset()

    run_threads(lambda i: client(i) if i % 3 else vandal(i), 48)
    assert counter.values["shared"] == 32 * 25
    assert len(counter.calls) == 32 * 25


def test_handler_calls_from_different_clients_overlap(server, counter):
    """Four calls meet at a barrier: that only returns if all four run at once."""
    counter.barrier = threading.Barrier(4)

    def meet(i):
        with ControlClient(server.address) as client:
            client.execute("meet")

    run_threads(meet, 4)


@pytest.mark.parametrize("limit", [3, None], ids=["limit3", "default64"])
def test_connections_beyond_the_limit_are_refused_cleanly(make_server, limit):
    # the global limit, from one process: lift the per-peer one for this test
    server = make_server(max_clients=limit, max_per_peer=limit) if limit \
        else make_server(max_per_peer=64)
    limit = limit or 64
    clients = [ControlClient(server.address) for _ in range(limit)]
    with pytest.raises(ControlError, match="too many control connections") as caught:
        ControlClient(server.address)
    assert caught.value.error_class == "GenericError"
    clients.pop().close()
    assert server.wait_clients(limit - 1, WIRE_TIMEOUT)
    clients.append(ControlClient(server.address))
    assert all(c.execute("add", key="n") for c in clients)
    for c in clients:
        c.close()


def test_one_peer_holds_at_most_its_share_of_the_slots(make_server):
    server = make_server(max_clients=6, max_per_peer=2)
    mine = [ControlClient(server.address) for _ in range(2)]
    with pytest.raises(ControlError, match="too many control connections from this client"):
        ControlClient(server.address)
    others = connect_as_children(server.address, 4, 2)  # two more processes, two each
    for s in others:
        s.settimeout(WIRE_TIMEOUT)
        assert b'"nbd-mc"' in s.recv(65536)
    with pytest.raises(ControlError, match=r"too many control connections \(6\)"):
        ControlClient(server.address)  # all six taken: the global limit speaks
    for c in mine:
        c.close()
    for s in others:
        s.close()


# --- actions after the reply, and close -------------------------------------------------------

def test_after_reply_runs_its_action_in_another_thread_after_the_reply(server, counter):
    called = []
    done = threading.Event()

    def action():
        called.append(threading.current_thread().name)
        done.set()

    counter.after = action
    peer = Peer(server.address)
    peer.message()
    assert peer.ask({"execute": "later", "id": "q"}) == {"return": {"later": True}, "id": "q"}
    assert done.wait(WIRE_TIMEOUT)
    assert called == [f"nbd-mc-control later {server.address}"]
    assert peer.ask(MARKER)["id"] == "marker", "the action decides whether to stop"


def test_an_action_after_the_reply_may_close_the_server(server, counter):
    counter.after = server.close
    path = server.address
    peer = Peer(path)
    peer.message()
    assert peer.ask({"execute": "later"}) == {"return": {"later": True}}
    assert peer.line() is None, "closing the server hangs up on its clients"
    assert not os.path.exists(path), "and, before that, removed the socket file"
    with pytest.raises(FileNotFoundError, match="cannot connect to control server"):
        ControlClient(path)


def test_close_drops_clients_removes_socket_and_ends_threads(make_server):
    server = make_server()
    clients = [ControlClient(server.address) for _ in range(5)]
    silent = Peer(server.address)
    assert silent.message()["nbd-mc"]
    assert len(control_threads(server)) == 7
    server.close()
    server.close()                              # idempotent
    assert control_threads(server) == []
    assert not os.path.exists(server.address)
    for c in clients:
        with pytest.raises(ConnectionError):
            c.execute("get", key="k")
        c.close()
    assert silent.line() is None


def test_start_returns_at_once_with_daemon_threads(make_server):
    server = make_server()
    peer = Peer(server.address)
    peer.message()
    threads = control_threads(server)
    assert len(threads) == 2 and all(t.daemon for t in threads)


def test_failing_greeting_is_an_error_to_the_client(make_server):
    def greeting():
        raise EpochMismatch("state not loaded")

    server = make_server(greeting=greeting)
    with pytest.raises(ControlError) as caught:
        ControlClient(server.address)
    assert caught.value.error_class == "EpochMismatch"


# --- the unix socket ------------------------------------------------------

def test_unix_socket_is_private_whatever_the_umask(make_server):
    old = os.umask(0)
    try:
        server = make_server()
    finally:
        os.umask(old)
    mode = os.stat(server.address).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_relative_path_is_resolved_before_nbdkit_chdirs(make_server, short_dir, monkeypatch):
    monkeypatch.chdir(short_dir)
    server = make_server("ctl.sock")
    assert server.address == str(short_dir / "ctl.sock")
    monkeypatch.chdir("/")
    assert still_answers(server.address)


def test_stale_socket_of_a_dead_server_is_replaced(make_server, short_dir):
    path = str(short_dir / "ctl.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()                                # the file stays, nobody listens
    server = make_server(path)
    assert still_answers(server.address)


def test_socket_of_a_live_server_is_not_taken(make_server, short_dir, counter):
    first = make_server()
    second = ControlServer(first.address, counter, greeting_of(counter))
    with pytest.raises(OSError, match="is in use"):
        second.start()
    second.close()
    assert still_answers(first.address)


def test_a_starting_servers_socket_is_not_taken(make_server, short_dir, counter, monkeypatch):
    """A server between bind() and listen() is refused like a dead one: a probe
    then must not happen, or the path would be taken from a server about to serve."""
    path = str(short_dir / "ctl.sock")
    starting = socket.socket(socket.AF_UNIX)
    with sockfile.claimed(path):                # what a starting server holds
        starting.bind(path)                     # bound, not listening yet
        inode = os.stat(path).st_ino
        monkeypatch.setattr(sockfile, "LOCK_TIMEOUT", 0.2)
        second = ControlServer(path, counter, greeting_of(counter))
        with pytest.raises(OSError, match="cannot claim"):
            second.listen()
        second.close()
        assert os.stat(path).st_ino == inode    # still the starting server's file
        starting.listen(1)
    third = ControlServer(path, counter, greeting_of(counter))
    with pytest.raises(OSError, match="is in use"):
        third.listen()
    third.close()
    assert os.stat(path).st_ino == inode
    starting.close()


def test_a_server_with_a_full_accept_queue_is_in_use(short_dir, counter):
    """A busy (or stopped) server that accepts nothing for a while is still there:
    its socket is refused at once, neither taken nor waited for."""
    path = str(short_dir / "ctl.sock")
    busy = socket.socket(socket.AF_UNIX)
    busy.bind(path)
    busy.listen(0)
    queued = []
    while True:                                 # fill its accept queue
        c = socket.socket(socket.AF_UNIX)
        c.setblocking(False)
        queued.append(c)
        try:
            c.connect(path)
        except BlockingIOError:
            break
    assert sockfile.answers(path)
    second = ControlServer(path, counter, greeting_of(counter))
    with pytest.raises(OSError, match="is in use"):
        second.listen()
    second.close()
    for c in queued:
        c.close()
    busy.close()


def test_listen_queues_connections_until_start(short_dir, counter):
    """The plugin listens before nbdkit forks and accepts only after it."""
    path = str(short_dir / "ctl.sock")
    server = ControlServer(path, counter, greeting_of(counter))
    server.listen()
    try:
        early = socket.socket(socket.AF_UNIX)
        early.settimeout(WIRE_TIMEOUT)
        early.connect(path)                     # queued by the kernel
        server.start()
        assert json.loads(early.makefile().readline())["nbd-mc"]["version"] == "test"
        early.close()
    finally:
        server.close()
    assert not os.path.exists(path)


def test_close_after_listen_alone_removes_the_socket(short_dir, counter):
    path = str(short_dir / "ctl.sock")
    server = ControlServer(path, counter, greeting_of(counter))
    server.listen()
    server.close()
    assert not os.path.exists(path)


def test_a_file_that_is_not_a_socket_is_left_alone(short_dir, counter):
    path = short_dir / "ctl.sock"
    path.write_text("precious")
    server = ControlServer(str(path), counter, greeting_of(counter))
    with pytest.raises(FileExistsError, match="not a socket"):
        server.start()
    assert path.read_text() == "precious"


def test_close_removes_only_its_own_socket_file(make_server, short_dir):
    old = make_server()
    os.unlink(old.address)
    new = make_server(old.address)
    old.close()
    assert os.path.exists(new.address)
    assert still_answers(new.address)


def test_client_names_the_socket_it_could_not_reach(short_dir):
    with pytest.raises(FileNotFoundError, match=str(short_dir / "nothing.sock")):
        ControlClient(str(short_dir / "nothing.sock"))


def test_client_refuses_a_server_that_is_not_nbd_mc(short_dir):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(short_dir / "other.sock"))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        conn.sendall(b'{"QMP": {"version": {}}}\n')
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    with pytest.raises(ControlProtocolError, match="not an nbd-mc control server"):
        ControlClient(str(short_dir / "other.sock"))
    thread.join()
    listener.close()


# --- TCP and TLS ----------------------------------------------------------

def test_tcp_without_tls_is_refused_on_both_sides(counter):
    with pytest.raises(ValueError, match="TLS"):
        ControlServer("tcp://127.0.0.1:0", counter, greeting_of(counter))
    with pytest.raises(ValueError, match="TLS"):
        ControlClient("tcp://127.0.0.1:1")


def test_tls_round_trip_on_a_resolved_port(tls_server, certs, counter):
    assert tls_server.address.startswith("tcp://127.0.0.1:")
    assert not tls_server.address.endswith(":0")
    with ControlClient(tls_server.address, tls=certs["good"]) as client:
        assert client.greeting["version"] == "test"
        assert client.execute("add", key="t") == {"value": 1}
    assert counter.calls == [("add", {"key": "t"})]


def test_tls_works_on_a_unix_socket_too(make_server, certs):
    server = make_server(tls=certs["good"])
    with ControlClient(server.address, tls=certs["good"]) as client:
        assert client.execute("get", key="k") == {"value": 0}


def test_tls_refuses_a_client_cert_from_another_ca(tls_server, certs, counter):
    with pytest.raises(OSError):
        with ControlClient(tls_server.address, tls=certs["rogue"]) as client:
            client.execute("add", key="t")
    assert counter.calls == []
    assert tls_server.wait_clients(0, WIRE_TIMEOUT)
    with ControlClient(tls_server.address, tls=certs["good"]) as client:
        assert client.execute("get", key="t") == {"value": 0}


def tls_peer_is_greeted(address, context) -> bool:
    """Whether a hand-made TLS client gets as far as the greeting."""
    parsed = parse_address(address)
    host, port = parsed.host, parsed.port
    with socket.create_connection((host, port), timeout=WIRE_TIMEOUT) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                return tls.recv(100).startswith(b'{"nbd-mc"')
        except (ssl.SSLError, ConnectionError):
            return False


def test_tls_refuses_a_client_without_certificate(tls_server, certs, counter):
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(os.path.join(certs["good"].directory, "ca-cert.pem"))
    assert not tls_peer_is_greeted(tls_server.address, bare)
    assert tls_peer_is_greeted(tls_server.address, certs["good"].client_context())
    assert counter.calls == []


def test_tls_server_ignores_plaintext(tls_server, counter):
    port = int(tls_server.address.rsplit(":", 1)[1])
    peer = Peer(("127.0.0.1", port), socket.AF_INET)
    peer.send(json.dumps(MARKER).encode() + b"\n")
    received = drain(peer.sock)
    assert b"nbd-mc" not in received and b"marker" not in received
    assert counter.calls == []


def test_client_refuses_a_server_of_another_ca(tls_server, certs):
    with pytest.raises(ssl.SSLCertVerificationError):
        ControlClient(tls_server.address, tls=certs["other"])


def test_silent_tls_peer_loses_its_slot_after_the_handshake_timeout(make_server, certs):
    server = make_server("tcp://127.0.0.1:0", tls=certs["good"], max_clients=1,
                         handshake_timeout=0.2)
    port = int(server.address.rsplit(":", 1)[1])
    silent = Peer(("127.0.0.1", port), socket.AF_INET)
    assert silent.sock.recv(1) == b"", "the server hangs up on a peer that never speaks"
    assert server.wait_clients(0, WIRE_TIMEOUT)
    with ControlClient(server.address, tls=certs["good"]) as client:
        assert client.execute("get", key="k") == {"value": 0}


def test_tls_files_name_what_is_missing(tmp_path):
    files = TlsFiles(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no ca-cert.pem"):
        files.server_context()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TlsFiles(str(tmp_path / "nowhere"))


def test_tls_files_reject_garbage(tmp_path, certs):
    for name in ("ca-cert.pem", "server-cert.pem"):
        shutil.copy(os.path.join(certs["good"].directory, name), tmp_path)
    (tmp_path / "server-key.pem").write_text("not a key\n")
    with pytest.raises(ValueError, match="server-key.pem"):
        TlsFiles(str(tmp_path)).server_context()


# --- certificate script ---------------------------------------------------

def test_make_certs_layout_modes_and_idempotence(tmp_path):
    out = tmp_path / "x509"
    subprocess.run([str(MAKE_CERTS), str(out), "replica.example", "192.0.2.7"], check=True)
    names = ["ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem",
             "client-key.pem"]
    for name in names:
        assert (out / name).stat().st_size > 0
    for name in ("server-key.pem", "client-key.pem", "ca-key.pem"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
    info = subprocess.run(["certtool", "-i", "--infile", str(out / "server-cert.pem")],
                          check=True, capture_output=True, text=True).stdout
    for san in ("localhost", "127.0.0.1", "replica.example", "192.0.2.7"):
        assert san in info
    before = {name: (out / name).read_bytes() for name in names}
    subprocess.run([str(MAKE_CERTS), str(out)], check=True)
    assert {name: (out / name).read_bytes() for name in names} == before
    subprocess.run([str(MAKE_CERTS), "--force", str(out)], check=True)
    assert (out / "ca-cert.pem").read_bytes() != before["ca-cert.pem"]


def test_certs_are_accepted_by_qemu_and_nbdkit(certs, tmp_path):
    good = certs["good"].directory
    for endpoint in ("server", "client"):
        subprocess.run(["qemu-img", "info", "--object",
                        f"tls-creds-x509,id=tls0,dir={good},endpoint={endpoint},verify-peer=on",
                        "/dev/null"], check=True, capture_output=True)
    nbdkit = ["nbdkit", "--tls=require", "-U", "-", "null", "--run", "true"]
    subprocess.run(nbdkit[:1] + [f"--tls-certificates={good}"] + nbdkit[1:], check=True,
                   capture_output=True)
    empty = subprocess.run(nbdkit[:1] + [f"--tls-certificates={tmp_path}"] + nbdkit[1:],
                           capture_output=True)
    assert empty.returncode != 0, "nbdkit really checks the directory"


def test_make_certs_target(tmp_path):
    def make(*args):
        return subprocess.run(["make", "-s", "-f", "mk/certs.mk", "certs", *args], cwd=REPO,
                              capture_output=True, text=True)

    assert make().returncode == 2
    assert make(f"DIR={tmp_path / 'c'}", "NAMES=node2.example").returncode == 0
    assert (tmp_path / "c" / "client-key.pem").exists()


# --- fuzzing --------------------------------------------------------------

def fuzz_peer(server):
    peer = Peer(server.address)
    assert peer.message() == {"nbd-mc": {"version": "fuzz"}}
    return peer


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
not_objects = json_values.filter(lambda v: not isinstance(v, dict))
ids = st.one_of(st.just(None), json_values).map(lambda v: {} if v is None else {"id": v})


@st.composite
def bad_requests(draw):
    """Objects that look like requests but break one rule each."""
    request = {"execute": draw(st.text(max_size=10)), **draw(ids)}
    rule = draw(st.sampled_from(["execute-type", "no-execute", "arguments-type", "extra-key"]))
    if rule == "execute-type":
        request["execute"] = draw(not_objects.filter(lambda v: not isinstance(v, str))
                                  | st.dictionaries(st.text(max_size=4), json_values))
    elif rule == "no-execute":
        del request["execute"]
    elif rule == "arguments-type":
        request["arguments"] = draw(not_objects)
    else:
        key = draw(st.text(max_size=10).filter(lambda k: k not in ("execute", "arguments", "id")))
        request[key] = draw(json_values)
    return request


@FUZZ
@given(junk=st.binary(max_size=500))
def test_fuzz_random_bytes_never_reach_the_handler(fuzz_server, junk):
    assume(b"execute" not in junk)
    calls = len(fuzz_server.recorder.calls)
    peer = fuzz_peer(fuzz_server)
    peer.send(junk + b"\n" + json.dumps(MARKER).encode() + b"\n")
    lines = [line for line in junk.split(b"\n") if line.strip()]
    for _ in lines:
        assert bad_request(peer.message())
    assert peer.message()["id"] == "marker"
    assert len(fuzz_server.recorder.calls) == calls + 1
    peer.close()


@FUZZ
@given(value=not_objects | bad_requests())
def test_fuzz_json_that_is_not_a_request(fuzz_server, value):
    line = json.dumps(value).encode()
    assume(len(line) <= 512)
    calls = len(fuzz_server.recorder.calls)
    peer = fuzz_peer(fuzz_server)
    reply = peer.ask(value)
    assert bad_request(reply), reply
    if isinstance(value, dict) and "id" in value:
        assert reply["id"] == value["id"]
    else:
        assert "id" not in reply
    assert len(fuzz_server.recorder.calls) == calls
    assert peer.ask(MARKER)["id"] == "marker"
    peer.close()


@FUZZ
@given(name=st.text(max_size=30),  # quit too: the server gives no name a meaning
       arguments=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
       request_id=ids, ascii_only=st.booleans())
def test_fuzz_any_well_formed_request_reaches_the_handler_intact(fuzz_server, name, arguments,
                                                                 request_id, ascii_only):
    request = {"execute": name, "arguments": arguments, **request_id}
    try:
        line = json.dumps(request, ensure_ascii=ascii_only).encode()
    except UnicodeEncodeError:                  # a lone surrogate needs an escape
        line = json.dumps(request).encode()
    assume(len(line) <= 512)
    peer = fuzz_peer(fuzz_server)
    peer.send(line + b"\n")
    reply = peer.message()
    assert reply == {"return": {"name": name, "arguments": arguments}, **request_id}
    assert fuzz_server.recorder.calls[-1] == (name, arguments)
    peer.close()


@FUZZ
@given(count=st.integers(1, 6), cuts=st.lists(st.integers(0, 400), max_size=12),
       half_close=st.booleans())
def test_fuzz_requests_split_anywhere(fuzz_server, count, cuts, half_close):
    stream = b"".join(json.dumps({"execute": "n", "id": i}).encode() + b"\n"
                      for i in range(count))
    if half_close:
        stream = stream[:-1]                    # the last line ends with the stream
    peer = fuzz_peer(fuzz_server)
    start = 0
    for cut in sorted({c for c in cuts if c < len(stream)} | {len(stream)}):
        peer.send(stream[start:cut])
        start = cut
    if half_close:
        peer.shut_write()
    for i in range(count):
        assert peer.message()["id"] == i
    if half_close:
        assert peer.line() is None
    peer.close()


@FUZZ
@given(length=st.integers(40, 1100), terminated=st.booleans())
def test_fuzz_line_lengths_around_the_limit(fuzz_server, length, terminated):
    calls = len(fuzz_server.recorder.calls)
    request = json.dumps({"execute": "len", "id": length}).encode()
    line = request + b" " * (length - len(request))
    peer = fuzz_peer(fuzz_server)
    peer.send(line + (b"\n" if terminated else b""))
    if length <= 512 and not terminated:
        peer.shut_write()                       # a final line needs the end of the stream
    reply = peer.message()
    if length <= 512:
        assert reply["id"] == length
        assert len(fuzz_server.recorder.calls) == calls + 1
    else:
        assert bad_request(reply)
        assert peer.line() is None
        assert len(fuzz_server.recorder.calls) == calls
    peer.close()


@FUZZ
@given(junk=st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=8),
       how=st.sampled_from(["close", "shut-write", "reset"]))
def test_fuzz_connections_that_end_mid_line(fuzz_server, junk, how):
    peer = fuzz_peer(fuzz_server)
    for piece in junk:
        peer.send(piece)
    if how == "shut-write":
        peer.shut_write()
        drain(peer.sock)
    elif how == "reset":
        peer.reset()
    peer.close()
    probe = fuzz_peer(fuzz_server)
    assert probe.ask(MARKER)["id"] == "marker"
    probe.close()


# --- admission: what a client without credentials, or with many processes, cannot do -------
# docs/control-protocol.md, "Limits", states the guarantee these tests check.

def _silent_tcp_peers(port: int, sources: list, per_source: int) -> list:
    """Connections that never start their TLS handshake, from several source addresses."""
    socks = []
    for src in sources:
        for _ in range(per_source):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            Peer.opened.append(s)
            s.bind((src, 0))
            s.connect(("127.0.0.1", port))
            socks.append(s)
    return socks


@pytest.mark.parametrize("sources", [["127.0.0.2", "127.0.0.3"],
                                     [f"127.0.1.{i}" for i in range(1, 41)]],
                         ids=["two-addresses", "forty-addresses"])
def test_peers_without_a_certificate_cannot_keep_a_certified_client_out(make_server, certs,
                                                                        counter, sources):
    """Issue 23 #2: on main, two addresses that connect and send nothing held all 64
    slots (32 each) for the handshake timeout, and no certified commit got through.
    Now a connection takes a slot only after its handshake; before, it is in a
    separate budget where a newcomer displaces the oldest (its own address's first)."""
    server = make_server("tcp://127.0.0.1:0", tls=certs["good"], handshake_timeout=60)
    port = int(server.address.rsplit(":", 1)[1])
    silent = _silent_tcp_peers(port, sources, 80 // len(sources))
    for _ in range(13):
        with ControlClient(server.address, tls=certs["good"], timeout=WIRE_TIMEOUT) as client:
            client.execute("add", key="commits")
    assert counter.values["commits"] == 13
    # the silent ones hold no slot: at most the handshake budget of them is still open
    assert server.client_count <= 16
    for s in silent:
        s.close()


def test_idle_local_processes_cannot_lock_out_a_new_one(make_server):
    """Issue 23 #3: on main two processes holding 32 connections each made every
    further `status` fail with "too many control connections (64)"."""
    server = make_server()
    hogs = connect_as_children(server.address, 64, 32)
    for s in hogs:
        s.settimeout(WIRE_TIMEOUT)
        assert b'"nbd-mc"' in s.recv(65536)
    for _ in range(5):   # `nbd-mc status` and `commit`, each a new connection
        with ControlClient(server.address, timeout=WIRE_TIMEOUT) as client:
            assert client.execute("get", key="k") == {"value": 0}
    # each of them took the slot of an idle hog connection, which was told why
    told = 0
    for s in hogs:
        s.setblocking(False)
        try:
            data = s.recv(65536)
        except BlockingIOError:
            continue
        if data:
            assert b"made room for a new client" in data
            told += 1
    assert told >= 1
    for s in hogs:
        s.close()


def _wait_idle(server, n: int) -> None:
    """Until the server counts ``n`` connections idle (between requests)."""
    def idle():
        with server._lock:
            return sum(not c.busy for c in server._clients) >= n
    wait_until(idle, f"{n} idle control connections", timeout=WIRE_TIMEOUT)


def test_a_connection_in_the_middle_of_a_request_is_never_displaced(make_server, counter):
    server = make_server(max_clients=2, max_per_peer=2)
    hogs = connect_as_children(server.address, 2, 2)
    for s in hogs:
        s.settimeout(WIRE_TIMEOUT)
        assert b'"nbd-mc"' in s.recv(65536)
    # the greeting is on the wire before its thread marks the connection idle (it is
    # busy while written to, so that no displacement writes over it): wait for that
    _wait_idle(server, 2)
    hogs[0].sendall(b'{"execute":"wait","id":1}\n')
    assert counter.entered.wait(WIRE_TIMEOUT)
    client = ControlClient(server.address, timeout=WIRE_TIMEOUT)   # displaces hogs[1]
    assert client.execute("get", key="k") == {"value": 0}
    with pytest.raises(ControlError, match=r"too many control connections \(2\)"):
        ControlClient(server.address)   # the only other one is busy: refused, not displaced
    client.close()
    counter.gate.set()
    assert json.loads(hogs[0].recv(65536)) == {"return": {}, "id": 1}
    for s in hogs:
        s.close()


def test_a_peer_holding_the_most_cannot_displace_others(make_server):
    server = make_server(max_clients=4, max_per_peer=4)
    mine = [ControlClient(server.address) for _ in range(3)]
    other = connect_as_children(server.address, 1, 1)
    other[0].settimeout(WIRE_TIMEOUT)
    assert b'"nbd-mc"' in other[0].recv(65536)
    with pytest.raises(ControlError, match=r"too many control connections \(4\)"):
        ControlClient(server.address)   # we hold 3, the other 1: no room made for us
    assert all(c.execute("get", key="k") == {"value": 0} for c in mine)
    for c in mine:
        c.close()
    other[0].close()
