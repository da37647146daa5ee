"""Load: 8 connections of mixed I/O (writes, FUA writes, reads checked against the
model, write-zeroes, trims, flushes) on two disks, a commit every 50 ms racing
them, and every couple of seconds a quiesced checkpoint that is checked exactly:

    pause everybody -> commit E -> {disk}@committed and the images equal the model
    -> a burst of I/O with no commit -> pause -> rollback -> the images, the live
    exports and {disk}@committed equal the model at E -> resume.

Each connection owns one quarter of one disk, so its byte model is exact even with
the other seven writing at the same time: every read it does is checked.  Racing
commits are not checked byte-wise here (which side of a commit an in-flight
request lands on is timing); tests/support/stress.py does that in one thread.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import nbd

from nbd_mc.control import ControlClient
from support.servers import DEADLINE, Server, assert_bytes, make_image, read_all, read_file

MiB = 1 << 20
DISK_SIZE = 16 * MiB
DISKS = ("vda", "vdb")
WORKERS = 8
COMMIT_EVERY = 0.05
RACING_PHASE = 2.0
BURST = 0.3


class Phase:
    """Participants park between requests when the controller pauses them."""

    def __init__(self, n: int):
        self.cond = threading.Condition()
        self.n = n
        self.running = False
        self.parked = 0
        self.stopped = False

    def checkpoint(self) -> bool:
        """Between two requests; False when the run is over."""
        with self.cond:
            if self.running:
                return True
            self.parked += 1
            self.cond.notify_all()
            while not self.running and not self.stopped:
                self.cond.wait()
            self.parked -= 1
            return not self.stopped

    def pause(self) -> None:
        with self.cond:
            self.running = False
            if not self.cond.wait_for(lambda: self.parked == self.n or self.stopped, DEADLINE):
                raise TimeoutError("participants did not pause")

    def resume(self) -> None:
        with self.cond:
            self.running = True
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.running = False
            self.cond.notify_all()


@dataclass
class Figures:
    seconds: float = 0.0
    ops: dict = field(default_factory=lambda: {k: 0 for k in (
        "write", "write_fua", "read", "zero", "trim", "flush")})
    bytes_written: int = 0
    bytes_read: int = 0
    racing_commits: int = 0
    quiesced_commits: int = 0
    rollbacks: int = 0
    exact_checks: int = 0
    errors: list = field(default_factory=list)

    @property
    def operations(self) -> int:
        return sum(self.ops.values())

    def line(self) -> str:
        return (f"{self.seconds:.0f} s, {WORKERS} connections: {self.operations} requests "
                f"({', '.join(f'{k} {v}' for k, v in self.ops.items())}), "
                f"{self.bytes_written / MiB:.0f} MiB written, {self.bytes_read / MiB:.0f} MiB "
                f"read and checked, {self.racing_commits} racing commits, "
                f"{self.quiesced_commits} quiesced commits, {self.rollbacks} rollbacks, "
                f"{self.exact_checks} exact checks, {len(self.errors)} errors")


class Worker(threading.Thread):
    def __init__(self, load: "Load", i: int):
        super().__init__(name=f"load-{i}", daemon=True)
        self.load = load
        self.i = i
        self.disk = DISKS[i % 2]
        quarter = DISK_SIZE // (WORKERS // 2)
        self.base = (i // 2) * quarter
        self.size = quarter
        self.rng = random.Random(1000 + i)
        self.h = load.srv.connect(self.disk)
        self.ops = {k: 0 for k in Figures().ops}
        self.written = self.read = 0

    @property
    def model(self) -> bytearray:
        return self.load.live[self.disk]

    def span(self):
        r = self.rng.random()
        n = (self.rng.randint(1, 8) * 512 if r < 0.4 else self.rng.randint(1, 64) * 4096
             if r < 0.85 else self.rng.randint(1, 4) * 65536)
        if self.rng.random() < 0.1:
            n = self.rng.randint(1, 70000)  # unaligned
        n = min(n, self.size)
        off = self.rng.randint(0, self.size - n)
        if self.rng.random() < 0.7:
            off -= off % 512
        return self.base + off, n

    def run(self):
        try:
            while self.load.workers.checkpoint():
                self.one()
        except Exception as e:  # noqa: BLE001 - every error is a finding
            self.load.fail(f"worker {self.i}: {e!r}")
            self.load.workers.stop()

    def one(self):
        kind = self.rng.choices(("write", "write_fua", "read", "zero", "trim", "flush"),
                                (40, 5, 30, 10, 10, 5))[0]
        off, n = self.span()
        h, m = self.h, self.model
        if kind in ("write", "write_fua"):
            data = self.rng.randbytes(n)
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if kind == "write_fua" else 0)
            m[off:off + n] = data
            self.written += n
        elif kind == "read":
            got = h.pread(n, off)
            if got != m[off:off + n]:
                raise AssertionError(f"{self.disk} read at {off}+{n} differs from the model")
            self.read += n
        elif kind == "zero":
            h.zero(n, off)
            m[off:off + n] = bytes(n)
        elif kind == "trim":
            h.trim(n, off)
            m[off:off + n] = bytes(n)
        else:
            h.flush()
        self.ops[kind] += 1


class Load:
    def __init__(self, root: str, seconds: float, durability: str = "process"):
        self.root = root
        self.seconds = seconds
        rng = random.Random(99)
        images = {d: f"{root}/{d}.raw" for d in DISKS}
        self.live = {d: bytearray(make_image(p, DISK_SIZE, rng)) for d, p in images.items()}
        self.srv = Server(root, images, durability=durability)
        self.workers = Phase(WORKERS)
        self.committer_phase = Phase(1)
        self.fig = Figures()
        self.epoch = 0
        self.committed = {d: bytes(b) for d, b in self.live.items()}
        self._errors_lock = threading.Lock()

    def fail(self, msg: str) -> None:
        with self._errors_lock:
            self.fig.errors.append(msg)

    def committer(self):
        ctl = ControlClient(self.srv.control_path, timeout=DEADLINE)
        pace = threading.Event()
        try:
            while self.committer_phase.checkpoint():
                r = ctl.execute("commit", epoch=self.epoch + 1)
                if r["committed"] != self.epoch + 1:
                    raise AssertionError(f"commit returned {r}")
                self.epoch += 1
                self.fig.racing_commits += 1
                pace.wait(COMMIT_EVERY)  # the commit interval (pacing, not synchronisation)
        except Exception as e:  # noqa: BLE001
            self.fail(f"committer: {e!r}")
            self.committer_phase.stop()
        finally:
            ctl.close()

    def pause_all(self):
        self.committer_phase.pause()
        self.workers.pause()
        if self.fig.errors:
            raise AssertionError(self.fig.errors[0])

    def check(self, what: str, expected: dict, committed_too: bool = True):
        for d in DISKS:
            assert_bytes(read_file(self.srv.image(d)), expected[d], f"{d} image ({what})")
            if committed_too:
                with_h = self.srv.connect(f"{d}@committed")
                assert_bytes(read_all(with_h), self.committed[d], f"{d}@committed ({what})")
                with_h.shutdown()
        self.fig.exact_checks += 1

    def quiesced_cycle(self, ctl: ControlClient):
        """Everybody paused: commit, check, burst without commits, rollback, check."""
        self.pause_all()
        self.epoch += 1
        ctl.execute("commit", epoch=self.epoch)
        self.fig.quiesced_commits += 1
        self.committed = {d: bytes(b) for d, b in self.live.items()}
        self.check(f"after quiesced commit {self.epoch}", self.committed)
        self.workers.resume()
        run_for(BURST)
        self.workers.pause()
        if self.fig.errors:
            raise AssertionError(self.fig.errors[0])
        r = ctl.execute("rollback")
        assert r["committed"] == self.epoch
        self.fig.rollbacks += 1
        for d in DISKS:
            self.live[d][:] = self.committed[d]
        self.check(f"after rollback to {self.epoch}", self.committed)
        for d in DISKS:
            h = self.srv.connect(d)
            assert_bytes(read_all(h), self.committed[d], f"{d} live export after rollback")
            h.shutdown()

    def run(self) -> Figures:
        self.srv.start()
        ctl = ControlClient(self.srv.control_path, timeout=DEADLINE)
        workers = [Worker(self, i) for i in range(WORKERS)]
        committer = threading.Thread(target=self.committer, name="committer", daemon=True)
        t0 = time.monotonic()
        try:
            self.epoch = 1
            ctl.execute("commit", epoch=1)
            for w in workers:
                w.start()
            committer.start()
            while time.monotonic() - t0 < self.seconds:
                self.workers.resume()
                self.committer_phase.resume()
                run_for(min(RACING_PHASE, max(0.1, self.seconds - (time.monotonic() - t0))))
                self.quiesced_cycle(ctl)
            self.fig.seconds = time.monotonic() - t0
            st = ctl.execute("query-status")
            assert st["committed"] == self.epoch and st["broken"] is None, st
        finally:
            self.workers.stop()
            self.committer_phase.stop()
            for w in workers:
                w.join(DEADLINE)
            committer.join(DEADLINE)
            ctl.close()
        for w in workers:
            for k, v in w.ops.items():
                self.fig.ops[k] += v
            self.fig.bytes_written += w.written
            self.fig.bytes_read += w.read
        return self.fig


def run_for(seconds: float) -> None:
    """Let the load run (the length of a phase: pacing, not synchronisation)."""
    threading.Event().wait(seconds)
