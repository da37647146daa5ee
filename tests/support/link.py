"""A link emulator for the tests and the bench: a TCP forwarder that delays each
direction by a set time and can cap its bandwidth.

Why hand-written: netem (``tc qdisc ... netem``) is not available on these
machines, and the slow links the async mode is for (5-50 ms round trips between
sites) need nothing more than a delay and a cap, with the real secondary behind
them.  It listens on a loopback TCP port and forwards every connection to a
target (a unix socket, as the secondary's NBD and control sockets are, or a TCP
address).  Each direction of a connection is two threads: a reader that stamps
every chunk with the instant it may leave (now + the one-way delay) and a sender
that sends it then -- no earlier, and no faster than the cap (a token bucket, one
per direction, so the cap is per connection and direction like a full-duplex
line).  The round trip is twice the one-way delay.  ``cut()`` drops every
connection and refuses new ones until ``restore()``: an outage of the link.

Run as a program (``python -m support.link --listen PORT --to PATH --rtt 20ms``)
it prints its port and forwards until killed (the bench runs it so, away from
the measuring process's GIL).
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import sys
import threading
import time

CHUNK = 64 << 10
#: A cap's bucket holds this much time's worth of bytes (bursts beyond are smoothed).
BURST_SECONDS = 0.005


def _target_socket(target) -> socket.socket:
    if isinstance(target, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.connect(target)
    return s


class _Direction:
    """One direction of one connection: src -> (delay, cap) -> dst."""

    def __init__(self, link: "Link", src: socket.socket, dst: socket.socket):
        self.link = link
        self.src, self.dst = src, dst
        self.queue: collections.deque = collections.deque()  # (due, bytes or None=EOF)
        self.cond = threading.Condition()
        self.closed = False
        self.threads = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._send, daemon=True)]
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.src.recv(CHUNK)
            except OSError:
                data = b""
            with self.cond:
                self.queue.append((time.monotonic() + self.link.one_way, data or None))
                self.cond.notify()
            if not data:
                return

    def _send(self) -> None:
        tokens, last = 0.0, time.monotonic()
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                due, data = self.queue[0]
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
                continue
            if data is None:
                try:
                    self.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            rate = self.link.rate
            if rate:
                now = time.monotonic()
                tokens = min(tokens + (now - last) * rate, max(rate * BURST_SECONDS, CHUNK))
                last = now
                if tokens < len(data):
                    time.sleep((len(data) - tokens) / rate)
                    continue
                tokens -= len(data)
            else:
                last = time.monotonic()
            with self.cond:
                self.queue.popleft()
            try:
                self.dst.sendall(data)
            except OSError:
                self.link._drop(self)
                return

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()


class Link:
    """A delaying, optionally capped TCP forwarder on 127.0.0.1 (threads in this process).

    ``rtt``: the added round trip in seconds (each direction is delayed by half);
    ``rate``: bytes per second per direction, None for no cap.  Both may be changed
    while it runs (they apply to chunks read from then on).  State: ``conns``
    (guarded by ``lock``) lists the live (client, server, directions) triples.
    """

    def __init__(self, target, rtt: float = 0.0, rate: float | None = None,
                 port: int = 0, path: str | None = None):
        """Listens on 127.0.0.1:``port`` (0: any free port), or on the unix socket
        ``path`` (the control channel: TCP would need TLS there)."""
        self.target = target
        self.rtt = rtt
        self.rate = rate
        self.lock = threading.Lock()
        self.conns: list = []
        self.refusing = False
        #: numbers (1 = the first) of the connections accepted after the last
        #: restore() that are closed at once instead of forwarded; ``accepted``
        #: counts them (both written under ``lock``)
        self.drop_at: frozenset = frozenset()
        self.accepted = 0
        self.path = path
        if path:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(path)
            self.port = None
        else:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        if not path:
            self.port = self.listener.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    @property
    def one_way(self) -> float:
        return self.rtt / 2

    def nbd_uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            with self.lock:
                self.accepted += 1
                dropped = self.accepted in self.drop_at
            if dropped:
                client.close()
                continue
            if not self.path:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                server = _target_socket(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                dirs = [_Direction(self, client, server), _Direction(self, server, client)]
                self.conns.append((client, server, dirs))

    def _drop(self, direction) -> None:
        with self.lock:
            for conn in list(self.conns):
                if direction in conn[2]:
                    self._close(conn)
                    self.conns.remove(conn)

    @staticmethod
    def _close(conn) -> None:
        client, server, dirs = conn
        for d in dirs:
            d.close()
        for s in (client, server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def cut(self) -> None:
        """An outage: every connection is dropped, new ones are refused."""
        self.refusing = True
        with self.lock:
            for conn in self.conns:
                self._close(conn)
            self.conns = []

    def restore(self, drop_at=()) -> None:
        """The link is back; of the connections accepted from now on, those whose
        numbers (1 = the first) are in ``drop_at`` are closed at once (a peer that
        goes away again between two connections of a client)."""
        with self.lock:
            self.accepted = 0
            self.drop_at = frozenset(drop_at)
        self.refusing = False

    def close(self) -> None:
        self.cut()
        self.listener.close()
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def parse_duration(text: str) -> float:
    t = text.strip().lower()
    if t.endswith("ms"):
        return float(t[:-2]) / 1000
    return float(t.rstrip("s"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="0",
                   help="TCP port on 127.0.0.1 (0: any), or a unix socket path")
    p.add_argument("--to", required=True, help="unix socket path or HOST:PORT")
    p.add_argument("--rtt", default="0ms", help="added round trip (e.g. 20ms)")
    p.add_argument("--rate", type=float, default=None, help="cap, bytes/s per direction")
    a = p.parse_args(argv)
    target = a.to
    if os.path.sep not in a.to and ":" in a.to:
        host, port = a.to.rsplit(":", 1)
        target = (host, int(port))
    if a.listen.isdigit():
        link = Link(target, parse_duration(a.rtt), a.rate, port=int(a.listen))
    else:
        link = Link(target, parse_duration(a.rtt), a.rate, path=a.listen)
    print(link.port or link.path, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    link.close()


if __name__ == "__main__":
    sys.exit(main())
