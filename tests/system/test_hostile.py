"""Hostile input on the control socket of the REAL server (nbdkit running our plugin).

Whatever a peer sends -- malformed JSON, wrong types, unknown commands, invalid
UTF-8, huge lines, half-closed or reset connections, more clients than allowed,
clients that never read -- the server answers or drops that connection, never
dies, never changes the group's state on a bad request (query-status and the
state file are compared after every example), and keeps its memory bounded per
connection (nbdkit's peak RSS, VmHWM, after a flood of huge lines).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nbd_mc.control import MAX_CLIENTS, MAX_LINE, MAX_PER_PEER
from support.reliability import record
from support.servers import (DEADLINE, Server, connect_as_children, make_image, pid_alive,
                     plugin_pids, read_file, short_tmpdir, wait_until)

SIZE = 1 << 20
KNOWN = ("query-status", "commit", "rollback", "fence", "failover", "quit")
COUNTS = {"examples": 0, "lines": 0, "replies": 0, "near_miss": 0}


class Target:
    """One server for the module, with undo data in its overlays (so a rollback,
    failover or commit slipping through would show in query-status)."""

    def __init__(self):
        self.root = short_tmpdir("nbdmc-hostile-")
        rng = random.Random(3)
        images = {}
        for d in ("a", "b"):
            images[d] = os.path.join(self.root, f"{d}.raw")
            make_image(images[d], SIZE, rng, data_fraction=1.0)
        self.srv = Server(self.root, images)
        self.srv.start()
        self.srv.execute("commit", epoch=1)
        for d in ("a", "b"):
            self.srv.connect(d).pwrite(rng.randbytes(3 * 65536), 65536)
        self.baseline = self.status()
        self.state_hash = self.state_digest()
        assert self.baseline["disks"][0]["preserved_clusters"] == 3

    def status(self) -> dict:
        st = self.srv.execute("query-status")
        st["stats"].pop("refused_commits", None)  # counts these very refusals (metrics)
        for clock in ("last_commit_age", "stale"):  # they change with time, not requests
            st.pop(clock, None)
        return st

    def state_digest(self) -> str:
        return hashlib.sha256(read_file(os.path.join(self.srv.state_dir, "state.json"))).hexdigest()

    def assert_unchanged(self, what) -> None:
        assert pid_alive(self.srv.pid), f"the server died after {what!r}"
        assert self.status() == self.baseline, f"state changed after {what!r}"
        assert self.state_digest() == self.state_hash, f"state.json changed after {what!r}"

    def raw(self, timeout: float = DEADLINE) -> socket.socket:
        """A connection; retried while the listen backlog is full (EAGAIN)."""
        def attempt():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(self.srv.control_path)
                return s
            except BlockingIOError:
                s.close()
                return None
        return wait_until(attempt, "room in the control socket's backlog")

    def rss(self) -> dict:
        out = {}
        with open(f"/proc/{self.srv.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "VmHWM")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
        return out

    def close(self) -> None:
        try:
            self.srv.stop()
        finally:
            self.srv.kill_all()
        leaked = plugin_pids(self.root + "/")
        assert not leaked, f"nbdkit left running: {leaked}"
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def target():
    t = Target()
    yield t
    t.close()
    if COUNTS["examples"]:  # this worker ran the fuzz: record what it threw
        record("control channel fuzz (hypothesis, real server)", COUNTS["examples"], 0,
               lines=COUNTS["lines"], replies=COUNTS["replies"])
    if COUNTS["near_miss"]:
        record("near-miss control requests (one typo from a state change)",
               COUNTS["near_miss"], 0)


def read_lines(s: socket.socket) -> list[bytes]:
    """Everything the server sends until it closes (after our half-close)."""
    data = b""
    resets = 0
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            # the server closed with our unread bytes queued (a line over the limit):
            # the kernel reports the reset once, before or after the queued reply
            resets += 1
            assert resets < 3
            continue
        if not chunk:
            break
        data += chunk
    return [ln for ln in data.split(b"\n") if ln]


def exchange(target: Target, payload: bytes) -> list[dict]:
    """Send payload, half-close, read the greeting and every reply until EOF."""
    s = target.raw()
    try:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        lines = read_lines(s)
    finally:
        s.close()
    msgs = [json.loads(ln) for ln in lines]  # every line the server sends is JSON
    assert msgs and "nbd-mc" in msgs[0], msgs[:1]
    return msgs[1:]


# --- what the fuzzer throws ------------------------------------------------------------
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                        st.floats(allow_nan=False), st.text(max_size=20))
json_value = st.recursive(json_scalar, lambda c: st.one_of(st.lists(c, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), c,
                                                                           max_size=4)),
                          max_leaves=12)
arguments = st.one_of(
    st.dictionaries(st.sampled_from(["epoch", "instant", "x", "arguments", ""]), json_value,
                    max_size=3),
    json_value)
request = st.fixed_dictionaries(
    {},
    optional={"execute": st.one_of(st.sampled_from(KNOWN), st.text(max_size=20), json_value),
              "arguments": arguments, "id": json_value,
              "extra": json_value})


def mutating(req) -> bool:
    """A *valid* request that changes state: never sent by the fuzzer."""
    if not isinstance(req, dict) or set(req) - {"execute", "arguments", "id"}:
        return False
    name, args = req.get("execute"), req.get("arguments", {})
    if not isinstance(args, dict):
        return False
    if name in ("rollback", "fence", "quit"):
        return not args
    if name == "failover":
        return set(args) <= {"instant"} and isinstance(args.get("instant", False), bool)
    if name == "commit":
        e = args.get("epoch")
        return set(args) == {"epoch"} and isinstance(e, int) and not isinstance(e, bool)
    return False


def encode(req, rng: random.Random) -> bytes:
    text = json.dumps(req, ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.2:
        text = " \t" + text + " \r"
    return text.encode("utf-8", "surrogatepass")


line_kinds = st.one_of(
    request.map(lambda r: ("req", r)),
    json_value.map(lambda v: ("json", v)),
    st.binary(max_size=200).map(lambda b: ("bytes", b.replace(b"\n", b""))),
    st.text(max_size=60).map(lambda t: ("text", t.replace("\n", ""))),
)


@settings(max_examples=int(os.environ.get("NBD_MC_FUZZ_EXAMPLES") or 300),
          deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lines=st.lists(line_kinds, min_size=1, max_size=6), seed=st.integers(0, 2**32 - 1),
       trailing_newline=st.booleans())
def test_fuzz_control_channel(target, lines, seed, trailing_newline):
    rng = random.Random(seed)
    parts = []
    for kind, value in lines:
        if kind in ("req", "json"):
            if mutating(value):
                continue
            parts.append(encode(value, rng))
        elif kind == "bytes":
            parts.append(value)
        else:
            parts.append(value.encode("utf-8", "surrogatepass"))
    payload = b"\n".join(parts) + (b"\n" if trailing_newline else b"")
    expected = sum(1 for p in parts if p.strip())
    replies = exchange(target, payload)
    COUNTS["examples"] += 1
    COUNTS["lines"] += expected
    COUNTS["replies"] += len(replies)
    assert len(replies) == expected, (payload[:300], replies)
    for r in replies:
        assert ("error" in r) != ("return" in r), r
        if "error" in r:
            assert set(r["error"]) == {"class", "desc"} and r["error"]["desc"], r
    target.assert_unchanged(payload[:200])


@pytest.mark.parametrize("request_text", [
    '{"execute": "quit", "arguments": {"now": true}}',
    '{"execute": "rollback", "arguments": {"force": 1}}',
    '{"execute": "fence", "arguments": []}',
    '{"execute": "failover", "arguments": {"instant": "yes"}}',
    '{"execute": "commit", "arguments": {"epoch": 2.0}}',
    '{"execute": "commit", "arguments": {"epoch": true}}',
    '{"execute": "commit", "arguments": {"epoch": 99}}',
    '{"execute": "commit", "arguments": {"epoch": 1e999}}',
    '{"execute": "commit", "arguments": {"epoch": 123456789012345678901234567890}}',
    '{"execute": "commit"}',
    '{"execute": "commit", "argument": {"epoch": 2}}',
    '{"execute": "COMMIT", "arguments": {"epoch": 2}}',
    '{"execute": ["commit"], "arguments": {"epoch": 2}}',
    '{"execute": "commit", "arguments": {"epoch": NaN}}',
    '[{"execute": "rollback"}]',
    '{"execute": "rollback"' + "}" * 3,
    '{"execute": "rollback", "execute": "query-status", "x": 1}',
    # issue 23 #4: duplicated members ran the last one (quit stopped the server)
    '{"execute": "query-status", "execute": "quit"}',
    '{"execute": "quit", "arguments": {}, "arguments": {"x": 1}}',
    '{"execute": "new-session", "arguments": {"stale_after": 1e400}}',
    "[" * 100000 + "]" * 100000,
])
def test_near_miss_requests_change_nothing(target, request_text):
    """Requests one typo away from a state change are refused with an error reply."""
    replies = exchange(target, request_text.encode() + b"\n")
    assert len(replies) == 1 and "error" in replies[0], replies
    target.assert_unchanged(request_text[:80])
    COUNTS["near_miss"] += 1


def test_huge_lines_bounded_memory(target):
    """Lines far over the limit, from many connections at once: each gets a
    BadRequest and is dropped; nbdkit's peak RSS grows by a bounded amount."""
    before = target.rss()
    conns, line_mib = 16, 32

    def flood(i):
        s = target.raw()
        try:
            s.recv(65536)  # greeting
            chunk = bytes([0x61 + i % 26]) * (1 << 20)
            sent = 0
            try:
                while sent < line_mib:
                    s.sendall(chunk)
                    sent += 1
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server dropped us mid-line: expected; its reply is queued
            return b"".join(read_lines(s))
        except (ConnectionResetError, BrokenPipeError):
            return b""
        finally:
            s.close()

    for _round in range(2):
        threads, results = [], {}
        for i in range(conns):
            t = threading.Thread(target=lambda i=i: results.__setitem__(i, flood(i)))
            t.start()
            threads.append(t)
        for t in threads:
            t.join(DEADLINE)
        assert all(not t.is_alive() for t in threads)
        said = [r for r in results.values() if r]
        assert said and all(b"longer than" in r for r in said), said[:2]
    after = target.rss()
    growth = after["VmHWM"] - before["VmRSS"]
    bound = conns * 2 * (MAX_LINE + 65536) + (32 << 20)
    record("huge control lines (16 x 32 MiB, twice)", 2 * conns, 0,
           peak_rss_growth_mib=round(max(growth, 0) / 2**20, 1), bound_mib=bound >> 20)
    assert growth < bound, f"peak RSS grew by {growth >> 20} MiB (bound {bound >> 20} MiB)"
    target.assert_unchanged("huge lines")
    # a line just under the limit is parsed (and refused as JSON), the connection lives
    s = target.raw()
    try:
        s.recv(65536)
        s.sendall(b'{"x": "' + b"y" * (MAX_LINE - 20) + b'"}\n{"execute":"query-status","id":7}\n')
        s.shutdown(socket.SHUT_WR)
        replies = [json.loads(x) for x in read_lines(s)]
    finally:
        s.close()
    assert replies[0]["error"]["class"] == "BadRequest" and replies[1]["id"] == 7, replies


def test_connections_half_closed_reset_and_never_reading(target):
    cases = 0
    # half-closed in the middle of a request: the partial line is answered
    assert exchange(target, b'{"execute": "rollb')[0]["error"]["class"] == "BadRequest"
    # a final line without newline is still a request
    assert exchange(target, b'{"execute":"query-status","id":1}')[0]["id"] == 1
    # connect and reset at once (SO_LINGER 0), before and after the greeting
    for read_greeting in (False, True):
        for _ in range(20):
            s = target.raw()
            if read_greeting:
                s.recv(10)
            s.sendall(b'{"execute": "rollback"')
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            cases += 1
    # a client that sends requests but never reads the replies blocks only itself
    hog = target.raw()
    hog.setblocking(False)
    sent = 0
    try:
        while sent < 1_000_000:
            sent += hog.send(b'{"execute":"query-status"}\n' * 64)
    except BlockingIOError:
        pass  # its buffers are full
    target.assert_unchanged("a client that never reads")
    hog.close()
    cases += 1
    record("half-closed / reset / non-reading control connections", cases + 2, 0)


def test_more_clients_than_allowed(target):
    """MAX_CLIENTS + 36 connections at once, from several processes: every one is
    greeted or told why not; once all slots are taken a newcomer from a process
    holding fewer takes the slot of an idle connection of the process holding the
    most, which is told so and closed; at most MAX_CLIENTS stay, every one of them
    is answered (concurrently), and the slots come back after they close."""
    target.srv.close_clients()  # our own persistent connections hold slots too
    admitted, refused = [], 0
    # from several processes: one process alone may hold only MAX_PER_PEER slots
    socks = connect_as_children(target.srv.control_path, MAX_CLIENTS + 36, MAX_PER_PEER)
    for s in socks:
        s.settimeout(DEADLINE)
    after_greeting = {}
    for s in socks:
        line = b""
        while b"\n" not in line:
            chunk = s.recv(65536)
            if not chunk:
                break
            line += chunk
        line, _, after_greeting[s] = line.partition(b"\n")
        msg = json.loads(line) if line else None
        if msg and "nbd-mc" in msg:
            admitted.append(s)
        else:
            refused += 1
            assert msg is None or "too many" in msg["error"]["desc"], msg
    # a displaced connection was greeted first, then told why it is closed (the
    # server sends that before it greets the newcomer: all of it is here by now)
    displaced = []
    for s in admitted:
        s.setblocking(False)
        try:
            rest = after_greeting[s] + s.recv(65536)
        except BlockingIOError:
            rest = after_greeting[s] or None
        s.setblocking(True)
        s.settimeout(DEADLINE)
        if rest is not None:
            assert rest == b"" or b"made room for a new client" in rest, rest
            displaced.append(s)
    admitted = [s for s in admitted if s not in displaced]
    # connections of earlier tests may still be closing on the server's side, and a
    # displacement may still be on its way to a socket read above
    assert len(admitted) >= MAX_CLIENTS - 4, (len(admitted), len(displaced), refused)
    errors = []

    def ask(s):
        try:
            s.sendall(b'{"execute":"query-status","id":"q"}\n{"execute":"nope"}\n')
            buf = b""
            while buf.count(b"\n") < 2:
                buf += s.recv(65536)
            a, b = [json.loads(x) for x in buf.split(b"\n")[:2]]
            assert a["return"]["committed"] == 1 and b["error"]["class"] == "CommandNotFound"
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    answered = []

    def ask_counted(s):
        before = len(errors)
        ask(s)
        if len(errors) == before:
            answered.append(s)

    threads = [threading.Thread(target=ask_counted, args=(s,)) for s in admitted]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    for s in socks:
        s.close()

    def greeted_again():  # the server notices the closes asynchronously
        s = target.raw()
        try:
            return b'"nbd-mc"' in s.recv(65536)
        finally:
            s.close()

    wait_until(greeted_again, "a free control slot")
    target.assert_unchanged("too many clients")
    record("concurrent control clients (100, limit 64)", MAX_CLIENTS + 36, len(errors))
    assert not errors, errors[:3]


def test_socket_and_state_directory_modes(target):
    """The control socket is 0600, the state directory (overlays = guest data) 0700."""
    mode = os.stat(target.srv.control_path).st_mode & 0o777
    assert mode == 0o600, oct(mode)
    mode = os.stat(target.srv.state_dir).st_mode & 0o777
    assert mode == 0o700, oct(mode)
