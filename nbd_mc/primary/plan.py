"""Which resync brings a secondary back in step, and why: the decision alone.

protect's resync has two halves: deciding (incremental from a dirty bitmap, a
checksum sync, or a full sync) and doing it (resync.py, protect.py).  This module
is the deciding half, written as a function of what protect knows -- the
secondary's ``query-status``, the dirty bitmaps it holds for the secondary's
group, ``--resync`` and ``--drive-mirror`` -- so that every row of the decision
table in docs/protect.md ("Which resync") has a unit test without QEMU
(tests/unit/test_plan.py).

It does no I/O of its own.  Two facts cost I/O and are needed only for some rows:
how much data the secondary's image holds (NBD block status through libnbd) and
whether the primary's drives can be read for hashing (that opens QEMU's read-only
NBD export).  The caller hands them in as callables and plan_resync() calls each
only when the row it is on depends on it, in that order: the incremental path never
asks either, an empty image never opens a source, ``--resync full`` asks nothing.
The dirty bitmaps' epochs (one ``query-block``) are asked the same way, once the
cheaper rows are passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .console import _mib

#: The three ways (protect --json ``resyncs[].mode``), cheapest first.
KINDS = ("bitmap", "checksum", "full")


@dataclass(frozen=True)
class Plan:
    """A decided resync.

    ``kind``: one of KINDS; ``why``: why not incremental (None for "bitmap": it
    needs no reason); ``because``: why this kind rather than the other one of
    checksum and full ("" when there was no choice: --drive-mirror)."""

    kind: str
    why: str | None = None
    because: str = ""

    @property
    def reason(self) -> str:
        """What the report's ``resyncs[].reason`` adds after why the secondary was
        out of step: ``; full: WHY`` (nothing for an incremental resync)."""
        return "" if self.why is None else f"; {self.kind}: {self.why}"

    def line(self, nbytes: int, committed: int) -> str:
        """The console's one line: what is copied or compared, and why.  ``nbytes``:
        dirty bytes for "bitmap", the drives' total otherwise."""
        if self.kind == "bitmap":
            return f"  resyncing {_mib(nbytes)} changed since epoch {committed} (incremental)"
        if self.kind == "checksum":
            return f"  checksum sync of {_mib(nbytes)}: {self.why}; {self.because}"
        return (f"  full sync of {_mib(nbytes)}: {self.why}"
                + (f" ({self.because})" if self.because else ""))

    def unsupported(self, desc: str) -> "Plan":
        """The checksum sync's first request found a secondary that cannot hash its
        blocks (an older server): the full sync instead, nothing copied yet."""
        return Plan("full", self.why, f"{desc}; nothing was copied yet")

    def unreadable(self, desc: str) -> "Plan":
        """The checksum walk could not read the primary's drive: the full sync
        instead (it rewrites whatever the walk copied)."""
        return Plan("full", self.why, f"the checksum sync could not read: {desc}")


def plan_resync(status: dict, previous_group: str | None,
                epochs: Callable[[], set[int]], *, resync: str = "auto",
                drive_mirror: bool = False, image_data: Callable[[], int] = lambda: 0,
                source_refusal: Callable[[], str | None] = lambda: None) -> Plan:
    """The resync for a secondary that answered ``status`` (its ``committed`` epoch
    and ``group_id``).

    ``previous_group``: the group our bitmaps were counted for until now (None on
    the first sync of the run); ``epochs()``: the epochs of the secondary's group
    with a dirty bitmap on every drive; ``resync``: --resync (auto, full,
    checksum); ``drive_mirror``: --drive-mirror; ``image_data()``: bytes of data in
    the secondary's image; ``source_refusal()``: why the primary's drives cannot be
    read for hashing, or None if they can.  The callables are asked only when the
    decision depends on them (module docstring)."""
    committed = int(status["committed"])
    group = status.get("group_id") or None
    if drive_mirror:
        why = "--drive-mirror copies whole disks"
    elif previous_group and group != previous_group:
        why = f"a different secondary (group {group}, was {previous_group})"
    elif group is None:
        why = "the secondary has no group id"
    elif committed == 0:
        why = "the secondary holds no committed epoch yet"
    else:
        have = epochs()
        if committed in have:
            return Plan("bitmap")
        why = (f"no dirty bitmap of group {group} covers its committed epoch {committed}"
               + (f" (have: {', '.join(map(str, sorted(have)))})" if have else ""))
    return _full_or_checksum(why, resync, drive_mirror, image_data, source_refusal)


def _full_or_checksum(why: str, resync: str, drive_mirror: bool, image_data,
                      source_refusal) -> Plan:
    """When no bitmap covers the secondary: "full" or "checksum", and why.

    --resync auto takes the checksum sync when the secondary's image holds data
    (it may be a near copy: a returning old primary) and the full sync when it
    is empty (nothing to compare: hashing would only cost time)."""
    if drive_mirror:
        return Plan("full", why)
    if resync == "full":
        return Plan("full", why, "--resync full")
    if resync == "auto":
        data = image_data()
        if not data:  # (asked first: an empty replica needs no source)
            return Plan("full", why, "the secondary's image is empty")
        because = (f"the secondary's image holds {_mib(data)} of data: comparing block "
                   "hashes, copying only what differs")
    else:
        because = "--resync checksum: comparing block hashes, copying what differs"
    refusal = source_refusal()
    if refusal is not None:  # (--resync checksum: refused at the start if so)
        return Plan("full", why, f"no checksum sync: {refusal}")
    return Plan("checksum", why, because)
