"""What protect's two libnbd clients share: the late import and block status as runs.

protect speaks NBD itself in two places, both through libnbd's asynchronous API so
that every wait is bounded: the writer of chosen ranges into the secondary
(ranges.py) and the reader of QEMU's read-only export of a drive (source.py).
Their errors differ (a stalled secondary, an unreadable source), so each keeps
its own waiting; the walk over ``base:allocation`` replies is the same and lives
here once.
"""

from __future__ import annotations

#: One block-status request asks about this much at most.
STATUS_SPAN = 1 << 30


def nbd():
    """Debian's python3-libnbd, imported late: only protect needs it."""
    import nbd as module
    return module


def status_runs(offset: int, end: int, ask):
    """(start, length, flags) runs of [offset, end) from ``base:allocation``.

    ``ask(pos, count, extent)`` sends one block-status request with the callback
    ``extent`` and waits for its answer.  Runs are clipped to ``end``; a reply that
    describes nothing leaves the rest as one run with flags None (unknown)."""
    pos = offset
    while pos < end:
        found: list[int] = []

        def extent(metacontext, at, entries, err):
            if metacontext == "base:allocation":
                found.extend(entries)
            return 0
        ask(pos, min(end - pos, STATUS_SPAN), extent)
        advanced = 0
        for i in range(0, len(found) - 1, 2):
            n = min(found[i], end - pos - advanced)
            if n <= 0:
                break
            yield pos + advanced, n, found[i + 1]
            advanced += n
        if advanced <= 0:
            yield pos, end - pos, None
            return
        pos += advanced
