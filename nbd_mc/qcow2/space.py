"""Host space of the undo overlay: which clusters of the file are used, their
refcounts, and giving back what recent epochs did not need.

The overlay asks for host clusters (``allocate``) during a preserve and, at a
drop, has the refcounts rewritten to count only metadata (``clean``) and the
unused tail given back (``give_back``).  Refcounts are written before anything
references a cluster and cleared only after nothing does (docs/qcow2-undo.md).
"""

from __future__ import annotations

import errno
import os

from .. import crashpoints
from ..errors import IOFailure
from ..fileio import punch_hole, pwrite_all, runs as _runs
from .format import REFCOUNT_ONE, U64, Layout

KEEP_EPOCHS = 8  # space used by any of the last KEEP_EPOCHS epochs stays allocated
_ZERO_BUF = bytes(4 << 20)


def zeros(n: int):
    """n zero bytes without allocating: a view of one shared zero buffer (never
    written, so its pages are the kernel's zero page, not our memory)."""
    global _ZERO_BUF
    if n > len(_ZERO_BUF):
        _ZERO_BUF = bytes(n)
    return memoryview(_ZERO_BUF)[:n]


class HostSpace:
    """Allocation and refcounts of one overlay's host clusters.

    Guarded like the overlay's mutable state: changed only by a preserve (under
    the engine's disk lock) or a drop (the group's gate closed); never read on
    the lock-free hot path.
    """

    def __init__(self, fd: int, lay: Layout):
        geo = lay.geo
        # --- State ------------------------------------------------------------
        # Fixed at open:
        self.fd = fd
        self.geo = geo
        self.cluster_size = geo.cluster_size
        self.refcount_table_offset = lay.header.refcount_table_offset
        self.capacity = lay.refcount_capacity  # clusters the refcount table can count
        # Changed when a refcount block is added (preserve):
        self.refblocks = lay.refblocks      # refcount block index -> file offset
        self.permanent = lay.permanent      # metadata clusters: never allocated, never freed
        self._metadata_index = None         # cache of permanent by refcount block
        # Changed by preserve, reset by drop:
        self.cursor = lay.top               # next host cluster allocation tries
        # refcount block -> [lo, hi) of its entries that may count more than metadata
        # (after open: all of every block; clean() rewrites only these spans)
        self.dirty = {b: (0, geo.refblock_entries) for b in lay.refblocks}
        # File length in clusters: grown (sparse) before a new host cluster is
        # referenced, since a subcluster write may not reach the cluster's end and
        # qcow2 readers refuse references past the end of the file.
        self.file_clusters = -(-os.fstat(fd).st_size // geo.cluster_size)
        # Host clusters [top, ...) hold nothing of value; [0, top) may hold space to
        # give back (the whole file after open, e.g. after a crashed drop).
        self.top = max(lay.top, self.file_clusters)
        self._recent_tops: list[int] = []  # allocation high-water of the last epochs

    def allocate(self, count: int) -> list[int]:
        """Host cluster indices for ``count`` new clusters; refcounts written (=1).

        Clusters come from a cursor that skips metadata; a missing refcount block is
        placed at the first cluster it covers that we allocate, counting itself.
        """
        out = []
        E = self.geo.refblock_entries
        while len(out) < count:
            c = self.cursor
            if c in self.permanent:
                self.cursor += 1
                continue
            if c >= self.capacity:
                raise IOFailure("overlay is full (refcount table exhausted)", errno.ENOSPC)
            if c // E not in self.refblocks:
                self._new_refblock(c // E, c)
                continue
            out.append(c)
            self.cursor += 1
        self._write_refcounts(out)
        self.top = max(self.top, self.cursor)
        if self.cursor > self.file_clusters:
            os.ftruncate(self.fd, self.cursor * self.cluster_size)
            self.file_clusters = self.cursor
        return out

    def _new_refblock(self, block: int, at: int) -> None:
        C = self.cluster_size
        content = bytearray(C)
        i = (at % self.geo.refblock_entries) * 2
        content[i:i + 2] = REFCOUNT_ONE
        pwrite_all(self.fd, [content], at * C)
        pwrite_all(self.fd, [U64.pack(at * C)], self.refcount_table_offset + block * 8)
        self.refblocks[block] = at * C
        self.permanent.add(at)
        self.cursor = max(self.cursor, at + 1)
        self.top = max(self.top, self.cursor)

    def _write_refcounts(self, clusters: list[int]) -> None:
        """Set refcount 1 for each cluster: one write per contiguous run."""
        E = self.geo.refblock_entries
        for start, n in _runs(clusters):
            while n:
                block, idx = divmod(start, E)
                k = min(n, E - idx)
                pwrite_all(self.fd, [REFCOUNT_ONE * k], self.refblocks[block] + idx * 2)
                lo, hi = self.dirty.get(block, (idx, idx + k))
                self.dirty[block] = (min(lo, idx), max(hi, idx + k))
                start += k
                n -= k

    def clean(self) -> None:
        """Rewrite the refcount entries changed since the last clean so only
        metadata is counted (a few bytes per allocated cluster, one write per
        refcount block touched).  Only call once nothing references data."""
        for block, (lo, hi) in sorted(self.dirty.items()):
            content = memoryview(self.clean_block(block))[lo * 2:hi * 2]
            pwrite_all(self.fd, [content], self.refblocks[block] + lo * 2)
        self.dirty = {}

    def restart(self) -> None:
        """After a drop: allocation starts again from the beginning of the file."""
        self.cursor = 0

    def clean_block(self, block: int):
        """A refcount block as it is with no undo data: only metadata counted.

        Most blocks count no metadata at all: they are all zeros, no allocation.
        """
        counted = self._metadata_by_block().get(block)
        if not counted:
            return zeros(self.cluster_size)
        content = bytearray(self.cluster_size)
        for i in counted:
            content[i * 2:i * 2 + 2] = REFCOUNT_ONE
        return content

    def _metadata_by_block(self) -> dict:
        """Refcount block -> indices of the metadata clusters it counts (cached; the
        metadata set changes only when a refcount block is added)."""
        if self._metadata_index is None or self._metadata_index[0] != len(self.permanent):
            E = self.geo.refblock_entries
            by_block: dict = {}
            for c in self.permanent:
                by_block.setdefault(c // E, []).append(c % E)
            self._metadata_index = (len(self.permanent), by_block)
        return self._metadata_index[1]

    def reclaim_leaks(self, referenced: set) -> int:
        """Set refcount 0 for every cluster that counts but that nothing references
        (neither metadata nor in ``referenced``, the clusters the L1/L2 tables point
        at as read at open): the leaks a preserve interrupted between its refcount
        write and its L1/L2 writes leaves.  Returns how many were cleared.

        The undo overlay never needs this (its next drop rewrites the refcounts);
        a history layer is never dropped, so recovery calls it (docs/history.md).
        Safe at any instant: a cleared cluster is referenced by nothing, and only
        a later allocation references it again, after writing its refcount anew.
        """
        E = self.geo.refblock_entries
        by_block: dict = {}
        for c in referenced:
            by_block.setdefault(c // E, []).append(c % E)
        cleared = 0
        for block, off in sorted(self.refblocks.items()):
            want = bytearray(self.clean_block(block))
            for i in by_block.get(block, ()):
                want[i * 2:i * 2 + 2] = REFCOUNT_ONE
            have = os.pread(self.fd, self.cluster_size, off)
            if have == want:
                continue
            leaks = [i for i in range(E) if have[i * 2:i * 2 + 2] != b"\0\0"
                     and want[i * 2:i * 2 + 2] == b"\0\0"]
            for start, n in _runs(leaks):
                pwrite_all(self.fd, [zeros(n * 2)], off + start * 2)
            cleared += len(leaks)
        return cleared

    def cut_tail(self) -> None:
        """Cut the file after the allocation cursor (right after open: past every
        referenced cluster and all metadata), once ``reclaim_leaks`` has cleared the
        refcounts there: leaked data no longer holds space."""
        end = max(self.cursor, max(self.permanent) + 1)
        if self.file_clusters > end:
            os.ftruncate(self.fd, end * self.cluster_size)
            self.file_clusters = end
            self.top = end

    def counts_only_metadata(self) -> bool:
        """No cluster but metadata has a refcount (no undo, no leaks)."""
        for block, off in self.refblocks.items():
            if os.pread(self.fd, self.cluster_size, off) != self.clean_block(block):
                return False
        return True

    def give_back(self, barrier) -> None:
        """Give back to the file system the host clusters that none of the last
        KEEP_EPOCHS epochs used: after a big epoch the overlay shrinks back.

        Called by a drop after ``clean``.  Safe at any instant: those clusters have
        refcount 0 (``barrier`` first makes that durable for power loss) and nothing
        references them, so no reader looks at their contents.  Clusters past the
        last metadata cluster are cut off (truncate); below it, holes are punched
        around the refcount blocks: one syscall per refcount block in the range,
        not per cluster.  Best effort: a file system that cannot punch holes (or
        any error) only keeps the space; nothing is ever written to free it.
        """
        try:
            self._give_back(barrier)
        except OSError:
            pass

    def _give_back(self, barrier) -> None:
        self._recent_tops = (self._recent_tops + [self.cursor])[-KEEP_EPOCHS:]
        keep = max(max(self._recent_tops), 1)
        if self.top <= keep:
            return
        barrier()
        if crashpoints.ARMED:  # (not in crashpoints.POINTS: the engine's crash tests
            crashpoints.reached("drop.return-space")  # don't produce big epochs)
        C = self.cluster_size
        start = keep
        end = max(keep, max(self.permanent) + 1)
        try:
            for m in sorted(c for c in self.permanent if keep <= c < self.top):
                if m > start:
                    punch_hole(self.fd, start * C, (m - start) * C, fallback=False)
                start = m + 1
            if self.top > start and start < end:
                punch_hole(self.fd, start * C, (min(self.top, end) - start) * C, fallback=False)
        except OSError:
            pass  # no hole punching here: cutting the tail off still gives space back
        if self.file_clusters > end:
            os.ftruncate(self.fd, end * C)
            self.file_clusters = end
        self.top = keep
