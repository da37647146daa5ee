"""Online verify, the primary's side: a walk over every drive, one slice per checkpoint.

* at a checkpoint, with the VM stopped and the mirrors drained, protect copies one
  *slice* of one drive out of the primary's image (the pause cost: one pread; the
  hashing happens after ``cont``);
* once epoch N is committed and the VM runs again, protect hashes the copy
  (nbd_mc/verify.py) and asks the secondary for the hash of the same range of its
  committed view -- ``verify-range {disk, offset, length, epoch}`` -- which is
  refused with ``EpochMismatch`` unless N is still the committed epoch, so both
  hashes describe the same checkpoint;
* a differing slice is narrowed down in the same round to the differing sectors;
* slice after slice (one per checkpoint) the walk covers every drive, with
  progress and an ETA, then starts over.

The primary's side reads the drive through the primary's data source
(primary/source.py): its local raw image file when it is one, otherwise a
read-only NBD export of the drive's node made by QEMU itself; with the VM
stopped and drained both give exactly the state of the checkpoint.  A mismatch
is handed to ``repair`` (a callable, None by default) with the disk and range:
protect passes its targeted resync (primary/repair.py), which copies the range
at the next checkpoint and checks it again once that commits; what it repaired
is counted in ``Stats.repaired``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from ..errors import NbdMcError
from ..verify import (DEFAULT_SLICE, MAX_LENGTH, SECTOR, block_digests, differing_ranges,
                      digest)


@dataclass
class Mismatch:
    disk: str
    offset: int
    length: int
    epoch: int

    def as_dict(self) -> dict:
        return {"disk": self.disk, "offset": self.offset, "length": self.length,
                "epoch": self.epoch}


@dataclass
class Target:
    """One drive to verify: the primary's drive and its disk on the secondary;
    ``where`` says where its data is read from (for messages)."""

    drive: str
    disk: str
    where: str
    size: int


@dataclass
class Stats:
    """What a walk did, for the report."""

    verified_bytes: int = 0
    slices: int = 0
    passes: int = 0
    mismatches: list = field(default_factory=list)
    repaired: list = field(default_factory=list)      # Mismatch: the epoch that holds the fix
    capture_s: list = field(default_factory=list)   # VM paused: copying one slice
    check_s: list = field(default_factory=list)     # VM running: hash + verify-range
    refused: int = 0                                  # slices the secondary would not hash
    unread: int = 0                                   # captures the primary's source failed
    started: float | None = None                      # the first capture (after the sync)

    def as_dict(self, slice_size: int) -> dict:
        cap = sorted(self.capture_s)
        chk = sorted(self.check_s)
        seconds = time.monotonic() - self.started if self.started else 0.0
        return {
            "verified_bytes": self.verified_bytes, "slices": self.slices,
            "passes": self.passes, "slice_bytes": slice_size, "refused": self.refused,
            "unread": self.unread,
            "mismatches": [m.as_dict() for m in self.mismatches],
            "repaired": {"ranges": [m.as_dict() for m in self.repaired],
                         "bytes": sum(m.length for m in self.repaired)},
            "capture_ms": {"median": round(statistics.median(cap) * 1000, 3) if cap else None,
                           "worst": round(cap[-1] * 1000, 3) if cap else None,
                           "per_mib": round(statistics.median(cap) * 1000 * (1 << 20)
                                            / slice_size, 3) if cap else None},
            "check_ms": {"median": round(statistics.median(chk) * 1000, 3) if chk else None},
            "mib_per_s": round(self.verified_bytes / (1 << 20) / seconds, 2) if seconds else None,
        }


class Verifier:
    """Walks every target slice by slice, one slice per committed checkpoint.

    State: ``_pos`` (target index, offset) is the next slice; ``_captured`` the
    bytes copied at the current checkpoint (None when nothing is pending) -- both
    touched only by protect's checkpoint thread.
    """

    def __init__(self, targets: list[Target], source, slice_size: int = DEFAULT_SLICE,
                 passes: int | None = None, say=lambda text: None, repair=None):
        """``source``: how the primary's drives are read (primary/source.py's
        PrimarySource, or anything with ``read_into(drive, view, offset)``); the
        caller owns it and closes it."""
        if slice_size < SECTOR or slice_size % SECTOR or slice_size > MAX_LENGTH:
            raise ValueError(f"verify slice must be a multiple of {SECTOR} bytes, at most "
                             f"{MAX_LENGTH >> 20} MiB")
        self.targets = targets
        self.slice_size = slice_size
        self.passes = passes
        self.say = say
        self.repair = repair
        self.stats = Stats()
        self.total = sum(t.size for t in targets)
        self._pos = (0, 0)
        self._pass_done = 0
        self.source = source
        self._buf = bytearray(slice_size)
        self._captured = None
        self._periods: list[float] = []
        self._last = None

    @property
    def done(self) -> bool:
        return self.passes is not None and self.stats.passes >= self.passes

    def hook(self, user_hook=None, run_hook=None):
        """The checkpoint hook: the user's first (it may skip the commit), then the copy.

        ``user_hook`` is a callable(epoch) or a shell command run with ``run_hook``.
        """
        def at_checkpoint(epoch: int):
            skipped = None
            if callable(user_hook):
                skipped = user_hook(epoch)
            elif user_hook:
                skipped = run_hook(user_hook, epoch)
            if skipped or self.done:
                self._captured = None
                return skipped
            self.capture()
            return None
        return at_checkpoint

    def capture(self) -> None:
        """With the VM stopped and drained: copy the next slice of the primary's disk.

        A read that fails (the source's error: an I/O error, QEMU's export not
        answering) leaves nothing captured -- the same slice is tried at the next
        checkpoint -- and is counted and said (the first time and every 100th):
        protection goes on, only this checkpoint verifies nothing."""
        i, off = self._pos
        t = self.targets[i]
        n = min(self.slice_size, t.size - off)
        if self.stats.started is None:
            self.stats.started = time.monotonic()
        t0 = time.perf_counter()
        self._captured = None
        try:
            self.source.read_into(t.drive, memoryview(self._buf)[:n], off)
        except NbdMcError as e:
            self.stats.unread += 1
            if self.stats.unread % 100 == 1:
                self.say(f"  verify: {t.drive} [{off}, +{n}) not read ({self.stats.unread} "
                         f"time(s) so far): {e.desc}")
            return
        self.stats.capture_s.append(time.perf_counter() - t0)
        self._captured = (i, off, n)

    def after_commit(self, ctl, epoch: int) -> None:
        """With the VM running again: compare the copied slice with epoch ``epoch`` of
        the secondary (ctl: a control client); report and repair differences."""
        now = time.monotonic()
        if self._last is not None:
            self._periods.append(now - self._last)
        self._last = now
        if self._captured is None:
            return
        i, off, n = self._captured
        self._captured = None
        t = self.targets[i]
        t0 = time.perf_counter()
        data = memoryview(self._buf)[:n]
        from ..control import ControlError
        try:
            r = ctl.execute("verify-range", disk=t.disk, offset=off, length=n, epoch=epoch)
            if r["digest"] != digest(data):
                r = ctl.execute("verify-range", disk=t.disk, offset=off, length=n, epoch=epoch,
                                block=SECTOR)
                for a, length in differing_ranges(block_digests(data, SECTOR), r["blocks"],
                                                  off, SECTOR, n):
                    self._mismatch(Mismatch(t.disk, a, length, epoch), t)
        except ControlError as e:
            self.stats.refused += 1
            self.say(f"  verify: {t.disk} [{off}, +{n}) not checked: {e}")
            return  # the same slice is tried again at the next checkpoint
        self.stats.check_s.append(time.perf_counter() - t0)
        self.stats.slices += 1
        self.stats.verified_bytes += n
        self._advance(i, off + n)

    def _mismatch(self, m: Mismatch, t: Target) -> None:
        self.stats.mismatches.append(m)
        self.say(f"  verify: MISMATCH {m.disk} offset {m.offset} length {m.length} "
                 f"(epoch {m.epoch}): the secondary's committed data differs from the primary's")
        if self.repair is not None:
            self.repair(t, m)

    def _advance(self, i: int, off: int) -> None:
        if off >= self.targets[i].size:
            i, off = i + 1, 0
        if i >= len(self.targets):
            self.stats.passes += 1
            i = 0
            bad = sum(1 for m in self.stats.mismatches)
            self.say(f"  verify: pass {self.stats.passes} complete: {_mib(self.total)} checked, "
                     f"{bad} mismatched range(s) so far")
        self._pos = (i, off)
        self._progress()

    def progress(self) -> tuple[int, int, float | None]:
        """(bytes verified in this pass, bytes per pass, seconds left or None)."""
        i, off = self._pos
        done = sum(t.size for t in self.targets[:i]) + off
        if not self._periods:
            return done, self.total, None
        period = statistics.median(self._periods[-50:])
        left = -(-(self.total - done) // self.slice_size)
        return done, self.total, left * period

    def _progress(self) -> None:
        done, total, eta = self.progress()
        pct = done * 100 // total if total else 100
        # one line per 10% (plain lines: protect's console may not be a terminal)
        step = pct // 10
        if step != getattr(self, "_last_step", None) and done:
            self._last_step = step
            self.say(f"  verify: pass {self.stats.passes + 1}: {pct}% "
                     f"({_mib(done)} of {_mib(total)})"
                     + (f", ETA {eta:.0f} s" if eta is not None else ""))

    def close(self) -> None:
        """Nothing of its own to close (the source is the caller's)."""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def targets_for(drives, sizes: dict[str, int], source) -> list[Target]:
    """The drives protect mirrors, as verify targets (call before the claim renames
    the exports, so ``d.export`` is the secondary's disk name); ``source`` is the
    PrimarySource that reads them."""
    return [Target(d.drive, d.export, source.where(d.drive), sizes[d.drive]) for d in drives]
