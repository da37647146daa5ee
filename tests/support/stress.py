"""The model-checked stress driver: several libnbd connections with asynchronous
writes, zeroes and trims against the real server, commits and rollbacks through
the control socket, every result checked against a byte model (tests/support/servers.py).

Requests in flight at the same time never overlap on one disk (an overlapping
request first waits for the ones it overlaps): NBD gives concurrent overlapping
requests no order, so the model could not say what the disk holds.

A commit or rollback is either *drained* (every request completed first, like the
primary does with its VM stopped) or *racing* (sent while requests are in flight).
A racing checkpoint must still put each in-flight request wholly before or wholly
after it: the model learns which from the committed view / the image and asserts
that every such request is all-old or all-new, never torn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import nbd

from support.servers import GroupModel, Server, assert_bytes, read_all, read_file

MAX_IN_FLIGHT = 16


@dataclass
class Op:
    disk: str
    h: object
    cookie: int
    kind: str
    off: int
    n: int
    old: bytes
    new: bytes
    buf: object = None  # keeps the nbd.Buffer alive until completion


@dataclass
class Counts:
    connections: int = 0
    writes: int = 0
    zeroes: int = 0
    trims: int = 0
    bytes: int = 0
    commits: int = 0
    racing_commits: int = 0
    rollbacks: int = 0
    racing_rollbacks: int = 0
    retries: int = 0
    mismatches: int = 0
    committed_checks: int = 0
    undo_checks: int = 0
    max_in_flight: int = 0
    undecided_resolved: dict = field(default_factory=lambda: {"before": 0, "after": 0})

    @property
    def operations(self) -> int:
        return self.writes + self.zeroes + self.trims


class Stress:
    def __init__(self, server: Server, model: GroupModel, rng: random.Random, *,
                 conns_per_disk: int = 3, cluster_size: int = 65536):
        self.s = server
        self.model = model
        self.rng = rng
        self.cluster = cluster_size
        self.disks = list(model.live)
        self.handles = {d: [server.connect(d) for _ in range(conns_per_disk)] for d in self.disks}
        self.committed_h = {d: server.connect(d + "@committed") for d in self.disks}
        self.inflight: dict[str, list[Op]] = {d: [] for d in self.disks}
        # preserve units (subclusters or clusters) written in the open epoch: exactly
        # these must be preserved
        self.touched: dict[str, set] = {d: set() for d in self.disks}
        self.exact = True  # False when requests raced the checkpoint that opened the epoch
        unit = server.execute("query-status")["disks"][0].get("unit_size", cluster_size)
        self.bits = unit.bit_length() - 1
        self.per_cluster = cluster_size.bit_length() - 1 - self.bits
        self.counts = Counts(connections=conns_per_disk * len(self.disks) + len(self.disks))

    # --- request generation ---------------------------------------------------------
    def _length(self, size: int) -> int:
        r = self.rng.random()
        if r < 0.35:
            n = self.rng.randint(1, 4096)
        elif r < 0.7:
            n = self.rng.randint(1, 3 * self.cluster)
        elif r < 0.9:
            n = self.rng.randint(1, 256 << 10)
        else:
            n = self.rng.randint(256 << 10, 1 << 20)
        return min(n, size)

    def _offset(self, size: int, n: int) -> int:
        r = self.rng.random()
        hi = size - n
        if r < 0.1:
            return hi  # up to the last byte (a partial last cluster on odd sizes)
        off = self.rng.randint(0, hi)
        if r < 0.35:
            off -= off % 512
        elif r < 0.55:
            off -= off % self.cluster
        return off

    def issue(self) -> Op:
        rng = self.rng
        d = rng.choice(self.disks)
        live = self.model.live[d]
        size = len(live)
        n = self._length(size)
        off = self._offset(size, n)
        kind = rng.choices(("write", "zero", "trim"), weights=(6, 2, 2))[0]
        for op in list(self.inflight[d]):
            if op.off < off + n and off < op.off + op.n:
                self.wait(op)
        while self.in_flight() >= MAX_IN_FLIGHT:
            self.wait(next(ops[0] for ops in self.inflight.values() if ops))
        h = rng.choice(self.handles[d])
        old = bytes(live[off:off + n])
        buf = None
        if kind == "write":
            data = bytearray(rng.randbytes(n))
            if rng.random() < 0.05:
                data = bytearray(n)  # zeros written as data
            buf = nbd.Buffer.from_bytearray(data)
            cookie = h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
            self.model.write(d, off, bytes(data))
            self.counts.writes += 1
            self.counts.bytes += n
        elif kind == "zero":
            flags = rng.choice((0, 0, nbd.CMD_FLAG_FAST_ZERO, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FUA))
            cookie = h.aio_zero(n, off, flags=flags)
            self.model.zero(d, off, n)
            self.counts.zeroes += 1
        else:
            # NBD leaves trimmed data undefined; our server punches a hole, which
            # reads as zeros, so the model says zeros.
            cookie = h.aio_trim(n, off)
            self.model.zero(d, off, n)
            self.counts.trims += 1
        op = Op(d, h, cookie, kind, off, n, old, bytes(live[off:off + n]), buf)
        self.touched[d].update(range(off >> self.bits, ((off + n - 1) >> self.bits) + 1))
        self.inflight[d].append(op)
        self.counts.max_in_flight = max(self.counts.max_in_flight, self.in_flight())
        return op

    # --- completion -----------------------------------------------------------------
    def in_flight(self) -> int:
        return sum(len(v) for v in self.inflight.values())

    def wait(self, op: Op) -> None:
        while not op.h.aio_command_completed(op.cookie):
            op.h.poll(-1)
        self.inflight[op.disk].remove(op)

    def drain(self) -> None:
        for d in self.disks:
            for op in list(self.inflight[d]):
                self.wait(op)

    def reap(self) -> None:
        """Retire every request whose reply has already arrived (non-blocking)."""
        for hs in self.handles.values():
            for h in hs:
                while h.aio_in_flight() and h.poll(0):
                    pass
        for d in self.disks:
            for op in list(self.inflight[d]):
                if op.h.aio_command_completed(op.cookie):
                    self.inflight[d].remove(op)

    # --- checks -------------------------------------------------------------------
    def check_committed(self, what: str) -> None:
        """NAME@committed reads as the model of the last commit (writes may be in flight)."""
        for d in self.disks:
            assert_bytes(read_all(self.committed_h[d]), self.model.committed[d],
                         f"{d}@committed ({what}, epoch {self.model.epoch})")
        self.counts.committed_checks += 1

    def check_live(self, what: str) -> None:
        """Every request completed: the image (through NBD and as a file) is the live model."""
        assert not self.in_flight()
        for d in self.disks:
            h = self.handles[d][0]
            assert_bytes(read_all(h), self.model.live[d], f"{d} over NBD ({what})")
            assert_bytes(read_file(self.s.image(d)), self.model.live[d], f"{d} image file ({what})")

    def check_undo(self) -> int:
        """Drained, in an epoch no request raced into: each disk has preserved exactly
        the units written since the last checkpoint, and keeps data only for those
        whose committed contents are not all zeros (zero units cost no data).
        Returns the number of clusters holding undo (what a rollback restores)."""
        if not self.exact or self.in_flight():
            return -1
        st = self.s.execute("query-status")
        C = 1 << self.bits
        total = 0
        for disk in st["disks"]:
            d = disk["name"]
            committed = self.model.committed[d]
            nonzero = sum(1 for c in self.touched[d] if any(committed[c * C:(c + 1) * C]))
            clusters = {u >> self.per_cluster for u in self.touched[d]}
            assert disk["preserved_clusters"] == len(clusters), (
                d, disk["preserved_clusters"], len(clusters))
            assert disk.get("preserved_units", len(self.touched[d])) == len(self.touched[d])
            assert disk["undo_bytes"] == nonzero * C, (d, disk["undo_bytes"], nonzero * C)
            total += len(clusters)
        self.counts.undo_checks += 1
        return total

    def _new_epoch(self, undecided) -> None:
        self.touched = {d: set() for d in self.disks}
        self.exact = not undecided

    # --- checkpoints ----------------------------------------------------------------
    def commit(self, racing: bool) -> None:
        epoch = self.model.epoch + 1
        if not racing:
            self.drain()
            self.check_undo()
        undecided = [op for ops in self.inflight.values() for op in ops]
        r = self.s.execute("commit", epoch=epoch)
        assert r["committed"] == epoch
        self.drain()
        committed = {d: bytearray(b) for d, b in self.model.live.items()}
        for op in undecided:
            got = self.committed_h[op.disk].pread(op.n, op.off)
            if got == op.new:
                self.counts.undecided_resolved["before"] += 1
            elif got == op.old:
                committed[op.disk][op.off:op.off + op.n] = op.old
                self.counts.undecided_resolved["after"] += 1
            else:
                raise AssertionError(
                    f"{op.kind} of {op.n} bytes at {op.off} on {op.disk}, in flight during commit "
                    f"{epoch}, is torn in {op.disk}@committed (neither before nor after the commit)")
        self.model.history[epoch] = {d: bytes(b) for d, b in committed.items()}
        self.model.epoch = epoch
        self._new_epoch(undecided)
        self.counts.commits += 1
        self.counts.racing_commits += bool(racing)
        self.check_committed(f"after commit {epoch}")
        st = self.s.execute("query-status")
        assert st["committed"] == epoch and st["protected"] is True
        if not undecided:  # else requests that landed after the commit preserved clusters
            assert all(d["preserved_clusters"] == 0 and d["undo_bytes"] == 0
                       for d in st["disks"]), st
        if self.rng.random() < 0.3:  # a retry of the committed epoch is harmless
            r = self.s.execute("commit", epoch=epoch)
            assert r["committed"] == epoch
            self.counts.retries += 1

    def rollback(self, racing: bool) -> None:
        expected = -1
        if not racing:
            self.drain()
            expected = self.check_undo()
        undecided = [op for ops in self.inflight.values() for op in ops]
        r = self.s.execute("rollback")
        assert r["committed"] == self.model.epoch
        if expected >= 0:
            assert r["restored_clusters"] == expected, (r, expected)
        self.drain()
        committed = self.model.committed
        live = {d: bytearray(b) for d, b in committed.items()}
        for op in undecided:
            got = self.handles[op.disk][0].pread(op.n, op.off)
            if got == op.new:
                live[op.disk][op.off:op.off + op.n] = op.new
                self.counts.undecided_resolved["after"] += 1
            elif got == committed[op.disk][op.off:op.off + op.n]:
                self.counts.undecided_resolved["before"] += 1
            else:
                raise AssertionError(
                    f"{op.kind} of {op.n} bytes at {op.off} on {op.disk}, in flight during a "
                    f"rollback, is torn (neither rolled back nor applied after it)")
        self.model.live = live
        self._new_epoch(undecided)
        self.counts.rollbacks += 1
        self.counts.racing_rollbacks += bool(racing)
        self.check_live(f"after rollback to {self.model.epoch}")
        self.check_committed(f"after rollback to {self.model.epoch}")

    def wrong_epoch(self) -> None:
        from nbd_mc.control import ControlError
        bad = self.model.epoch + self.rng.choice((2, 3, 100))
        try:
            self.s.execute("commit", epoch=bad)
        except ControlError as e:
            assert e.error_class == "EpochMismatch", e
        else:
            raise AssertionError(f"commit {bad} with {self.model.epoch} committed was accepted")
        self.counts.mismatches += 1

    # --- the run ----------------------------------------------------------------------
    def run(self, operations: int) -> Counts:
        rng = self.rng
        next_checkpoint = rng.randint(5, 50)
        for i in range(operations):
            self.issue()
            if i % 7 == 0:
                self.reap()
            if i % 97 == 0:  # a flush on some connection (it has no place in the model)
                h = rng.choice(rng.choice(list(self.handles.values())))
                h.flush()
            if i == next_checkpoint:
                next_checkpoint = i + rng.randint(5, 50)
                r = rng.random()
                racing = rng.random() < 0.35
                if racing:  # a burst of requests the server is still busy with
                    for _ in range(rng.randint(4, 10)):
                        self.issue()
                if r < 0.55:
                    self.commit(racing)
                elif r < 0.85:
                    self.rollback(racing)
                elif r < 0.93:
                    self.check_committed("with writes in flight")
                else:
                    self.wrong_epoch()
        self.drain()
        self.check_live("end of the run")
        self.check_committed("end of the run")
        return self.counts

    def close(self) -> None:
        self.drain()
        for hs in self.handles.values():
            for h in hs:
                h.shutdown()
        for h in self.committed_h.values():
            h.shutdown()
