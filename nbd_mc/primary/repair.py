"""Targeted repair of what online verify found different.

verify.Verifier reports a mismatch of checkpoint N after commit N, with the VM
running again.  It is not copied then: a guest write could race the copy.  It
is queued, and at the next checkpoint -- VM stopped, mirrors drained, so the
primary's image is exactly what epoch N+1 must hold and nothing writes it --
the queued ranges are read from the primary's image and written into the
secondary's writer export (ranges.RangeWriter), before commit N+1.  Those
writes are ordinary writes of the open epoch on the secondary: preserved as
undo first, so if commit N+1 does not happen a failover still returns to epoch
N.  Once N+1 is committed the copied ranges are verified again (``verify-range``
at N+1 against the bytes that were sent) and reported repaired.

At most BUDGET bytes are copied per checkpoint (they lengthen the VM's pause);
the rest waits for the following checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import verify
from ..verify import digest
from ..errors import NbdMcError
from .source import SourceError

#: Bytes copied per checkpoint, at most (the VM is paused while they are sent).
BUDGET = 4 << 20
#: A range still different after this many repairs is left reported, not retried.
MAX_ATTEMPTS = 3


@dataclass
class Piece:
    """One range to repair: of ``target`` (verify.Target), found at ``found_epoch``."""

    target: verify.Target
    offset: int
    length: int
    found_epoch: int
    attempts: int = 0


class Repairs:
    """Mismatches waiting for their repair, and the repairs waiting for their check.

    State (protect's single thread): ``pending`` -- pieces not yet copied, oldest
    first; ``copied`` -- (piece, bytes sent) copied at the current checkpoint,
    checked once it commits (or put back in ``pending`` if it does not);
    ``stats`` -- the verify walk's Stats, whose ``repaired`` list this fills.
    """

    def __init__(self, stats: verify.Stats, say=lambda text: None, budget: int = BUDGET):
        self.stats = stats
        self.say = say
        self.budget = budget
        self.pending: list[Piece] = []
        self.copied: list[tuple[Piece, bytes]] = []

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.copied)

    def queue(self, target: verify.Target, m: verify.Mismatch) -> None:
        """The Verifier's ``repair`` hook: remember the range, in budget-sized pieces."""
        for off in range(m.offset, m.offset + m.length, self.budget):
            n = min(self.budget, m.offset + m.length - off)
            if any(p.target.drive == target.drive and p.offset < off + n
                   and off < p.offset + p.length for p, _ in self.copied):
                continue  # being repaired right now: its check will tell
            if not any(p.target.drive == target.drive and p.offset <= off
                       and off + n <= p.offset + p.length for p in self.pending):
                self.pending.append(Piece(target, off, n, m.epoch))

    def at_checkpoint(self, writer, epoch: int) -> None:
        """VM stopped, mirrors drained, before commit ``epoch``: copy up to the budget.

        ``writer`` is the current claim's ranges.RangeWriter.  Raises what the
        secondary's side raises (SecondaryFailed...): the pieces stay queued for
        after the outage.  A failed read of the primary's drive (SourceError) is
        said and leaves them queued for the next checkpoint."""
        self.abandon()
        budget = self.budget
        while self.pending and self.pending[0].length <= budget:
            p = self.pending.pop(0)
            try:
                data = bytes(writer.read(p.target.drive, p.offset, p.length))
            except SourceError as e:
                self.pending.insert(0, p)
                self.say(f"  verify: repair of {p.target.disk} offset {p.offset} waits: {e.desc}")
                return
            try:
                writer.write(p.target.drive, p.offset, data)
            except BaseException:
                self.pending.insert(0, p)
                raise
            p.attempts += 1
            self.copied.append((p, data))
            budget -= p.length

    def abandon(self) -> None:
        """The checkpoint that copied did not commit: copy those pieces again."""
        self.pending[:0] = [p for p, _ in self.copied]
        self.copied = []

    def after_commit(self, ctl, epoch: int) -> None:
        """Epoch ``epoch`` (which holds the copies) is committed: check each copied
        range against it; repaired, or queued again (at most MAX_ATTEMPTS times)."""
        from ..control import ControlError
        done, self.copied = self.copied, []
        for i, (p, data) in enumerate(done):
            try:
                r = ctl.execute("verify-range", disk=p.target.disk, offset=p.offset,
                                length=p.length, epoch=epoch)
            except ControlError as e:
                self.say(f"  verify: repair of {p.target.disk} offset {p.offset} length "
                         f"{p.length} not checked: {e}")
                self.pending.append(p)
                continue
            except (OSError, NbdMcError):
                self.copied = done[i:]  # protect's outage handling puts them back
                raise
            if r["digest"] == digest(data):
                self.stats.repaired.append(verify.Mismatch(p.target.disk, p.offset, p.length,
                                                           epoch))
                self.say(f"  verify: REPAIRED {p.target.disk} offset {p.offset} length "
                         f"{p.length} (found at epoch {p.found_epoch}, committed at epoch "
                         f"{epoch})")
            elif p.attempts < MAX_ATTEMPTS:
                self.pending.append(p)
            else:
                self.say(f"  verify: {p.target.disk} offset {p.offset} length {p.length} "
                         f"still differs after {p.attempts} repairs: giving up on it")
