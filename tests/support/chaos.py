"""The chaos soak: a protected real Linux guest driven through random faults.

The setting is the demo's (demo/story.py): a work guest writes fsync'd,
checksummed records on ext4, `nbd-mc protect --json` checkpoints it every 100 ms
into `nbd-mc serve`.  For a chosen time, a seeded RNG then picks faults, in
shuffled rounds so that every class is hit at least once per round:

``secondary_kill``
    kill -9 of the secondary's nbdkit, then `nbd-mc serve` again;
``secondary_stop``
    SIGSTOP of the secondary's nbdkit for a while shorter than protect's
    ``--stall-timeout`` (the default, 10 s), then SIGCONT;
``protect_kill``
    kill -9 of `nbd-mc protect` (its watchdog resumes a VM left paused), then a
    new protect on the same VM;
``control_drop``
    `nbd-mc stop` + `nbd-mc serve` of the secondary (protect's control connection
    drops), plus a control client that sends half a request and vanishes.

After each fault the driver waits, with a deadline, until protection is back in
step: a commit newer than the last one seen before the fault.  The run ends as
the demo does: kill -9 of the primary in the middle of an epoch, `nbd-mc
failover`, `qemu-img compare` against the primary's disk recorded at the last
checkpoint, and a fresh check guest (fsck + every record).

Records acknowledged and committed: whenever the driver reads the guest's
highest durable record s and then the secondary's committed epoch c, record s
was written in an epoch <= c + 1, so it is committed once epoch c + 1 is.  The
highest such s below the final commit must be on the failed-over disk.

Why a subclass of the demo's Story: the boot, protect, failover and check steps
are exactly the demo's; only the middle (the faults) differs.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nbd_mc.control import ControlClient

from demo import story as demo
from demo.story import _bin

FAULTS = ("secondary_kill", "secondary_stop", "protect_kill", "control_drop")
STOP_HOLD = (0.2, 1.0)  # seconds a secondary stays SIGSTOPped: well below protect's
# default --stall-timeout (10 s), so the guest's writes just wait for it


@dataclass
class ChaosResult:
    demo: demo.DemoResult
    counts: dict = field(default_factory=lambda: {f: 0 for f in FAULTS})
    committed_seq: int = 0  # highest record known to be in a committed epoch at the end
    seed: str = ""
    chaos_seconds: float = 0.0

    @property
    def lost(self) -> int:
        """Acknowledged, committed records missing from the failed-over disk."""
        check = self.demo.check
        have = (check.maxseq or 0) if check and check.ok else 0
        return max(0, self.committed_seq - have)

    def table(self) -> str:
        rows = [f"| {'fault class':<16} | {'count':>5} |", f"|{'-' * 18}|{'-' * 6}:|"]
        rows += [f"| {f:<16} | {n:>5} |" for f, n in self.counts.items()]
        rows.append(f"| {'total':<16} | {sum(self.counts.values()):>5} |")
        return "\n".join(rows)


class ChaosStory(demo.Story):
    """The demo's story with a chaos phase instead of one secondary restart.

    State (all touched only by the driver's thread, except ``protect_out``,
    which the collector thread of the current protect appends to):
    ``rng`` the seeded RNG; ``samples`` (record seq, committed epoch) pairs read
    in that order; ``counts`` faults injected per class.
    """

    def __init__(self, workdir: Path, seconds: float, seed: str, say=print):
        super().__init__(workdir, seconds, say)
        self.rng = random.Random(seed)
        self.seed = seed
        self.samples: list[tuple[int, int]] = []
        self.counts = {f: 0 for f in FAULTS}
        self.chaos_seconds = 0.0

    # --- protect, restartable ------------------------------
    def start_protect(self) -> None:
        super().start_protect()
        self._argv = self.protect.args  # the same command line for every restart

    def _start_protect_again(self) -> None:
        self.protect_out = []
        self.protect = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=demo._env(), cwd=self.dir)
        threading.Thread(target=self._collect_protect, daemon=True).start()

    def _collect_protect(self) -> None:
        proc, out = self.protect, self.protect_out  # this protect's own list
        for line in proc.stdout:
            out.append(line)

    # --- the chaos phase ---------------------------------------------------------
    def let_it_work(self) -> None:
        self.step(f"Chaos for {self.seconds:g} s (seed {self.seed!r})")
        self.serial_log.wait_for(r"MC-WORK-START", demo.DEADLINE, self.qemu)
        self._wait(lambda: self._committed() >= 1, "the first commit (initial sync done)",
                   self.qemu)
        start = time.monotonic()
        while True:
            order = list(FAULTS)
            self.rng.shuffle(order)
            for fault in order:  # a whole round, so each class is hit in every run
                before = self._committed()
                getattr(self, fault)()
                self.counts[fault] += 1
                self._wait(lambda: self._committed() > before,
                           f"protection back in step after {fault}", self.qemu)
                self._sample()
            if time.monotonic() - start >= self.seconds:
                break
        self.chaos_seconds = time.monotonic() - start
        self.detail(f"{sum(self.counts.values())} faults in {self.chaos_seconds:.1f} s: "
                    + ", ".join(f"{k}={v}" for k, v in self.counts.items()))

    def restart_secondary(self) -> None:
        """Replaced by the chaos phase; only the mid-epoch moment for the kill."""
        ctl = ControlClient(str(self.state / "control.sock"))
        try:
            self._sample()
            self.result.restart_epoch = self._committed()
            self.result.kill_epoch, self.result.seq_after_commit = self._mid_epoch(ctl)
        finally:
            ctl.close()

    def _sample(self) -> None:
        """Read the guest's durable record, then the commit (in that order)."""
        self.serial_log.poll()
        seq = self.serial_log.last_seq
        self.samples.append((seq, self._committed()))

    def committed_seq(self, final: int) -> int:
        return max((s for s, c in self.samples if c + 1 <= final), default=0)

    def _committed(self) -> int:
        ctl = ControlClient(str(self.state / "control.sock"))
        try:
            return ctl.execute("query-status")["committed"]
        finally:
            ctl.close()

    def _nbdkit_pid(self) -> int:
        return int((self.state / "nbdkit.pid").read_text().strip())

    def _serve(self) -> None:
        self.sh([_bin("nbd-mc"), "serve", f"vda={self.secondary_img}",
                 "--state-dir", str(self.state)], show=False)

    # --- the faults ------------------------------------------------------------------
    def secondary_kill(self) -> None:
        pid = self._nbdkit_pid()
        os.kill(pid, signal.SIGKILL)
        self._wait(lambda: not Path(f"/proc/{pid}").exists(), "nbdkit to die", self.qemu)
        self._serve()

    def secondary_stop(self) -> None:
        pid = self._nbdkit_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            # the fault's length, chosen by the RNG; nothing waits on it
            time.sleep(self.rng.uniform(*STOP_HOLD))
        finally:
            os.kill(pid, signal.SIGCONT)

    def protect_kill(self) -> None:
        proc = self.protect
        self.protect = None  # _alive must not call this one an early exit
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        qmp = str(self.qmp)

        def watchdog_done() -> bool:
            r = subprocess.run(["pgrep", "-f", f"nbd_mc.primary.watchdog.*{qmp}"],
                               capture_output=True, text=True)
            return not r.stdout.strip()
        self._wait(watchdog_done, "protect's watchdog to finish", self.qemu)
        self._start_protect_again()

    def control_drop(self) -> None:
        # a control client that sends half a request and vanishes
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.state / "control.sock"))
        s.sendall(b'{"execute": "query-st')
        s.close()
        # the secondary's control server goes away and comes back
        self.sh([_bin("nbd-mc"), "stop", "--state-dir", str(self.state)], show=False)
        self._serve()


def run(workdir: str | os.PathLike, seconds: float, seed: str = "chaos",
        say=print) -> ChaosResult:
    """The chaos story in ``workdir`` (short path, for sockets); kills what it started."""
    story = ChaosStory(Path(workdir), seconds, seed, say)
    try:
        res = story.run()
    finally:
        story.cleanup()
    out = ChaosResult(demo=res, counts=story.counts, seed=seed,
                      chaos_seconds=story.chaos_seconds)
    out.committed_seq = story.committed_seq(res.last_commit)
    return out


def report(res: ChaosResult) -> str:
    return (res.table() + f"\nfinal commit {res.demo.last_commit}; records committed before "
            f"it: {res.committed_seq}; on the disk after failover: "
            f"{res.demo.check.maxseq if res.demo.check else None}; lost: {res.lost}")


