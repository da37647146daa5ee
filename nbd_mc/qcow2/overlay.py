"""The undo overlay at work: preserve, read the committed view, drop, apply.

Before the image overwrites a preserve unit (a cluster, or with extended L2 entries
a subcluster) for the first time in an epoch, the unit's old contents are copied
into the overlay at the same guest offset.  Opening the overlay with any qcow2
reader (QEMU, qemu-img) therefore shows the disk as of the last commit, and
``qemu-img commit`` on it is the same operation as our ``apply``.

Why our own writer: no maintained Python library writes qcow2, and the one thing
we need -- ordered, crash-safe metadata updates on a file that stays valid qcow2
at every instant -- is a small subset of the format (docs/qcow2-undo.md):

* metadata is written in the order refcount -> data -> L2 entry -> L1 entry, so a
  crash can leave only leaks (allocated, unreferenced clusters), never a
  referenced cluster with refcount 0; a subcluster's "allocated" bit is set only
  after its data is written;
* dropping all undo data zeroes the L1 entries first (from then on all that is
  left is leaks), then rewrites the few refcount blocks that were touched; its
  cost does not grow with the amount of undo data, and the freed clusters are
  reused -- those beyond what recent epochs used are given back to the file
  system (holes punched, the file truncated);
* in memory we keep one bit per preserve unit ("preserved in this epoch": the hot
  path's only question), the L1 table, and a cursor for allocation.  L2 entries
  stay in the file (the page cache has them) and are read when a preserve into
  an allocated cluster, the committed view or a rollback needs them.

Our own header extension records which committed epoch the undo data returns to,
so a crash between "persist committed = N" and "drop the undo data" is recognised
on restart.  qcow2 readers ignore unknown extensions, and QEMU keeps them.
"""

from __future__ import annotations

import ctypes
import errno
import os

from .. import crashpoints
from ..errors import CorruptOverlay, io_failure
from ..fileio import pread_into, punch_hole, pwrite_all, runs as _runs
from .format import (ALL_SUBCLUSTERS, NBD_MC_EXT, NBD_MC_EXT_VERSION, OFFSET_MASK, OFLAG_COPIED,
                     OFLAG_ZERO, U64, ZERO_ENTRY, pack_u64s, read_layout, unpack_u64s)
from .space import HostSpace, zeros as _zeros

SCRATCH_MAX = 1 << 20  # preserves up to this many bytes reuse one buffer
_ONES = b"\xff" * 512  # full bitmap bytes, compared against a slice of the bitmap
ZERO_SOURCE = 1  # unit source code "reads as zeros" (host offsets are multiples of 512)


class UndoOverlay:
    """One disk's copy-before-write store.

    Not thread-safe by itself: the engine serialises calls that change it (every
    preserve under its disk lock, drop/apply/set_epoch with the group's gate
    closed) and guarantees that no two preserves cover the same unit.  ``barrier``
    is called where a power-loss-safe writer must make earlier writes durable
    before later ones (a no-op for durability ``process``, a grouped fdatasync for
    ``power``).
    """

    def __init__(self, path: str, image_fd: int, *, expected_size: int | None = None,
                 expected_image: str | None = None, readonly: bool = False, barrier=None,
                 expected_backing_format: str = "raw"):
        try:
            fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as e:
            raise CorruptOverlay(f"cannot open overlay {path}: {os.strerror(e.errno)}") from None
        try:
            lay = read_layout(fd, path, expected_size=expected_size,
                              expected_image=expected_image, readonly=readonly,
                              expected_backing_format=expected_backing_format)
        except BaseException:
            os.close(fd)
            raise
        geo = lay.geo
        # --- State ------------------------------------------------------------
        # Fixed at open, never changed afterwards (read freely by anyone):
        self.path = path                    # the overlay file
        self.fd = fd                        # its descriptor; -1 once closed
        self.image_fd = image_fd            # the replica image (the backing file)
        self.readonly = readonly            # opened for reading only (inspect, probes)
        self.geo = geo                      # sizes: cluster, L2 format, preserve unit
        self.size = geo.size                # virtual size in bytes
        self.cluster_size = geo.cluster_size
        self.unit_bits = geo.unit_bits      # log2 of the preserve unit (engine's bit size)
        self.unit_size = geo.unit_size
        self.subclusters = geo.extended     # extended L2 entries: unit = cluster / 32
        self.header = lay.header            # the header as read at open
        self.backing = lay.backing          # backing file name as recorded
        self.backing_format = lay.backing_format
        self.l1_offset = lay.header.l1_table_offset
        self._epoch_offset = lay.epoch_offset  # where our epoch record lives (None: foreign)
        # Set once when the file system refuses to punch holes (disk lock / gate):
        self.can_punch = True               # new L2 tables are holes, not written zeros
        # Swapped by recovery only, while nothing else runs:
        self.barrier = barrier or (lambda: None)
        # Changed by preserve (under the engine's disk lock) and reset by drop (gate
        # closed).  The bitmap is read without a lock on the hot path: a bit is set
        # only after the unit's L2 entry (and, before it, its data) is written, and
        # cleared only by drop while no request is in flight.
        self.bitmap = lay.bitmap            # 1 bit per preserve unit: preserved this epoch
        self.preserved = lay.preserved      # number of bits set in bitmap
        self.clusters_touched = lay.clusters_touched  # guest clusters with a unit preserved
        self.data_units = lay.data_units    # preserved units with data (others read as zero)
        self.host_clusters = lay.host_clusters  # data clusters referenced by L2 entries
        self.l1 = lay.l1                    # copy of the L1 table; file written first
        self.tables = lay.tables            # L1 indices that have an L2 table
        self.unmarked_hosts = lay.unmarked_hosts  # an L2 entry has a host but no unit marked
        # Host clusters, their refcounts, the allocation cursor, space given back
        # (same guard: preserve under the disk lock, drop with the gate closed):
        self.space = HostSpace(fd, lay)
        # Changed by drop / set_epoch (gate closed):
        self.epoch = lay.epoch              # committed epoch the undo data returns to
        # The old data's buffer, reused by preserve (disk lock), grown as needed:
        self._scratch = bytearray(0)

    @property
    def refblocks(self) -> dict:
        """Refcount block index -> file offset (for tests and inspection)."""
        return self.space.refblocks

    # --- queries -----------------------------------------------------------------
    def is_preserved(self, unit: int) -> bool:
        return (self.bitmap[unit >> 3] >> (unit & 7)) & 1 == 1

    def all_preserved(self, first: int, last: int) -> bool:
        """Whether units [first, last] are all preserved.  The hot path's question
        for a request: whole bitmap bytes are compared at once (a 64 KiB write of
        2 KiB units is a 4-byte compare, not 32 calls of ``is_preserved``)."""
        bm = self.bitmap
        a, b = first, last + 1
        while a < b and a & 7:
            if not (bm[a >> 3] >> (a & 7)) & 1:
                return False
            a += 1
        while b > a and b & 7:
            b -= 1
            if not (bm[b >> 3] >> (b & 7)) & 1:
                return False
        if a < b:
            n = (b - a) >> 3
            return bm[a >> 3:b >> 3] == _ONES[:n] if n <= len(_ONES) \
                else bm[a >> 3:b >> 3].count(0xFF) == n
        return True

    def not_preserved(self, first: int, last: int) -> list[int]:
        """The units of [first, last] not yet preserved, in order."""
        if self.all_preserved(first, last):
            return []
        bm = self.bitmap
        return [u for u in range(first, last + 1) if not (bm[u >> 3] >> (u & 7)) & 1]

    @property
    def undo_bytes(self) -> int:
        return self.data_units * self.unit_size

    def _table_words(self, t: int, lo: int, hi: int) -> list[int]:
        """The 64-bit words of entries [lo, hi) of L2 table ``t`` (read from the file)."""
        w = self.geo.entry_words
        raw = os.pread(self.fd, (hi - lo) * 8 * w, (self.l1[t] & OFFSET_MASK) + lo * 8 * w)
        return unpack_u64s(raw)

    def _cluster_marked(self, c: int) -> bool:
        """Whether any unit of guest cluster ``c`` is preserved."""
        b = self.geo.units_per_cluster_bits
        if not b:
            return self.is_preserved(c)
        return any(self.bitmap[c << (b - 3):(c + 1) << (b - 3)])

    def entry(self, cluster: int) -> int:
        """Standard descriptor (first word) of a guest cluster's L2 entry; 0 if none
        of its units is preserved."""
        if not self._cluster_marked(cluster):
            return 0
        bits = self.geo.l2_bits
        j = cluster & ((1 << bits) - 1)
        return self._table_words(cluster >> bits, j, j + 1)[0]

    def _source(self, unit: int, entry: int, sub: int) -> int:
        """Where a preserved unit's old data is: a host offset, or ZERO_SOURCE.  For
        standard entries the zero flag wins over an offset (QEMU's write-zeroes
        without unmap keeps the host cluster and sets the flag, ZERO_ALLOC)."""
        if not self.subclusters:
            return ZERO_SOURCE if entry & OFLAG_ZERO or not entry & OFFSET_MASK \
                else entry & OFFSET_MASK
        x = unit & 31
        if (sub >> x) & 1:
            return (entry & OFFSET_MASK) + (x << self.unit_bits)
        return ZERO_SOURCE

    def unit_sources(self, first: int, count: int) -> list[int]:
        """For units [first, first+count): 0 = not preserved (the image has it),
        ZERO_SOURCE, or the host offset of the unit's old data.  L2 entries are read
        (one pread per table touched) only where a bit says the unit is preserved --
        a bit is set only after its entry is written."""
        bm = self.bitmap
        out = [0] * count
        geo = self.geo
        ub = geo.units_per_cluster_bits
        tbits = geo.l2_bits + ub  # units per L2 table
        w = geo.entry_words
        u, end = first, first + count
        while u < end:
            t = u >> tbits
            stop = min(end, (t + 1) << tbits)
            marked = [x for x in range(u, stop) if (bm[x >> 3] >> (x & 7)) & 1]
            if marked:
                lo = (marked[0] >> ub) & ((1 << geo.l2_bits) - 1)
                hi = ((marked[-1] >> ub) & ((1 << geo.l2_bits) - 1)) + 1
                words = self._table_words(t, lo, hi)
                for x in marked:
                    j = ((x >> ub) & ((1 << geo.l2_bits) - 1)) - lo
                    out[x - first] = self._source(x, words[j * w],
                                                  words[j * w + 1] if w == 2 else 0)
            u = stop
        return out

    def preserved_runs(self):
        """(first unit, count, source of the first unit) for the preserved units in
        guest order, grouped into runs whose data is contiguous in the file (or all
        zeros).  One pread per L2 table; the bitmap is scanned a byte (whole
        clusters) or a cluster (subclusters: one 32-bit word) at a time, and a fully
        preserved cluster is one run, so a rollback of a big epoch does not walk
        every unit one by one."""
        geo = self.geo
        ub = geo.units_per_cluster_bits
        tbits = geo.l2_bits + ub
        for t in sorted(self.tables):
            base = t << tbits  # a multiple of 512: byte aligned in the bitmap
            marks = self.bitmap[base >> 3:(base + (1 << tbits)) >> 3]
            if marks.count(0) == len(marks):
                continue
            words = self._table_words(t, 0, 1 << geo.l2_bits)
            if ub:
                yield from self._runs_extended(base, marks, words)
                continue
            for i, byte in enumerate(marks):
                if byte:
                    for k in range(8):
                        if (byte >> k) & 1:
                            u = base + i * 8 + k
                            yield u, 1, self._source(u, words[u - base], 0)

    def _runs_extended(self, base: int, marks: bytes, words: list):
        U = self.unit_size
        for j in range(-(-len(marks) // 4)):  # the last cluster's word may be short
            m = int.from_bytes(marks[j * 4:j * 4 + 4], "little")  # bit x = subcluster x
            if not m:
                continue
            entry, sub = words[2 * j], words[2 * j + 1]
            first = base + j * 32
            host = entry & OFFSET_MASK
            alloc = sub & m
            if m == ALL_SUBCLUSTERS and (alloc == m or not alloc):
                yield first, 32, (host if alloc else ZERO_SOURCE)
                continue
            x = 0
            while x < 32:
                if not (m >> x) & 1:
                    x += 1
                    continue
                data = (alloc >> x) & 1
                y = x + 1
                while y < 32 and (m >> y) & 1 and (alloc >> y) & 1 == data:
                    y += 1
                yield first + x, y - x, (host + x * U if data else ZERO_SOURCE)
                x = y

    # --- allocation -----------------------------------------------------------
    # --- preserve ----------------------------------------------------------------
    def preserve(self, first: int, count: int) -> int:
        """Copy the image's current units [first, first+count) into the overlay.

        The caller guarantees none of them is preserved yet.  One read of the old
        data; units that are all zeros are only marked "reads as zero"; the others
        are written into host clusters (new ones allocated contiguously, or the
        cluster a unit's neighbours already use); then the L2 entries and L1
        entries.  Returns the number of units whose data was written.
        """
        U = self.unit_size
        ub = self.unit_bits
        need = count * U
        if need <= SCRATCH_MAX:
            # one buffer reused by every preserve of this overlay (they are serialised
            # by the disk lock, and nothing keeps a view of it past the call)
            if len(self._scratch) < need:
                self._scratch = bytearray(max(need, len(self._scratch) * 2))
            old = self._scratch
            view = memoryview(old)[:need]
        else:  # a huge zero/trim request: not kept for the life of the server
            old = bytearray(need)
            view = memoryview(old)
        start = first << ub
        end = min((first + count) << ub, self.size)
        try:
            pread_into(self.image_fd, view[:end - start], start)
        except OSError as e:
            raise io_failure(f"reading old data from the image at {start}", e) from None
        if end - start < need:  # a last unit past the end of the disk reads as zeros
            view[end - start:] = _zeros(need - (end - start))
        zero = _zeros(U)
        if old.find(zero, 0, need) < 0:  # no run of U zero bytes: every unit has data
            nonzero = list(range(count))
        else:
            nonzero = [i for i in range(count) if not old.startswith(zero, i * U)]
        cb = self.geo.units_per_cluster_bits
        touched = sum(1 for c in range(first >> cb, ((first + count - 1) >> cb) + 1)
                      if not self._cluster_marked(c)) if cb else count
        try:
            entries = self._current_entries(first, count)
            new_tables = self._tables_needed(entries)
            needs_host = sorted({(first + i) >> cb for i in nonzero}
                                - {c for c, (e, _s) in entries.items() if e & OFFSET_MASK})
            hosts = self.space.allocate(len(new_tables) + len(needs_host))
            table_hosts = dict(zip(new_tables, hosts))
            for c, h in zip(needs_host, hosts[len(new_tables):]):
                entries[c] = ((h << self.geo.cluster_bits) | OFLAG_COPIED, entries[c][1])
            if crashpoints.ARMED:
                crashpoints.reached("preserve.before-data")
            self._write_data(first, view, nonzero, entries)
            self.barrier()
            if crashpoints.ARMED:
                crashpoints.reached("preserve.before-l2")
            self._mark_entries(first, count, nonzero, entries)
            self._publish(entries, table_hosts)
        except OSError as e:
            raise io_failure(f"writing undo data into {self.path}", e) from None
        self._set_bits(first, count)  # published: from now on readers use the entries
        self.host_clusters += len(needs_host)
        self.clusters_touched += touched
        self.data_units += len(nonzero)
        self.preserved += count
        return len(nonzero)

    def _set_bits(self, first: int, count: int) -> None:
        """Mark units [first, first+count) preserved: whole bytes at once."""
        bm = self.bitmap
        a, b = first, first + count
        while a < b and a & 7:
            bm[a >> 3] |= 1 << (a & 7)
            a += 1
        while b > a and b & 7:
            b -= 1
            bm[b >> 3] |= 1 << (b & 7)
        if a < b:
            bm[a >> 3:b >> 3] = b"\xff" * ((b - a) >> 3)

    def _current_entries(self, first: int, count: int) -> dict:
        """guest cluster -> (descriptor, subcluster bitmap) for the clusters the units
        touch: what the L2 table holds now (read only where something can be there)."""
        geo = self.geo
        cb = geo.units_per_cluster_bits
        c0, c1 = first >> cb, (first + count - 1) >> cb
        out = {c: (0, 0) for c in range(c0, c1 + 1)}
        if not cb:  # whole clusters: a unit not preserved has no entry worth keeping
            return out
        bits = geo.l2_bits
        mask = (1 << bits) - 1
        for t in range(c0 >> bits, (c1 >> bits) + 1):
            if t not in self.tables:
                continue
            lo_c, hi_c = max(c0, t << bits), min(c1, ((t + 1) << bits) - 1)
            if not self.unmarked_hosts and not any(
                    self._cluster_marked(c) for c in range(lo_c, hi_c + 1)):
                continue
            words = self._table_words(t, lo_c & mask, (hi_c & mask) + 1)
            for c in range(lo_c, hi_c + 1):
                j = (c - lo_c) * 2
                out[c] = (words[j], words[j + 1])
        return out

    def _tables_needed(self, entries: dict) -> list[int]:
        bits = self.geo.l2_bits
        return sorted({c >> bits for c in entries} - self.tables)

    def _write_data(self, first: int, view: memoryview, nonzero: list, entries: dict) -> None:
        """Write the non-zero units at their host offsets: one buffer per run of
        units contiguous in both the old data and the file, one write per run of
        buffers contiguous in the file (many small iovecs would cost far more
        than the bytes)."""
        U = self.unit_size
        cb = self.geo.units_per_cluster_bits
        mask = (1 << cb) - 1
        at, bufs = None, []  # file offset of the current write, its buffers
        lo = hi = None  # current buffer: units [lo, hi) of the old data
        end = None  # file offset where the current write ends
        for i in nonzero:
            u = first + i
            host = (entries[u >> cb][0] & OFFSET_MASK) + (u & mask) * U
            if lo is not None and i == hi and host == end:
                hi += 1
                end += U
                continue
            if lo is not None:
                bufs.append(view[lo * U:hi * U])
                if host != end:
                    pwrite_all(self.fd, bufs, at)
                    at, bufs = host, []
            else:
                at = host
            lo, hi, end = i, i + 1, host + U
        if lo is not None:
            bufs.append(view[lo * U:hi * U])
            pwrite_all(self.fd, bufs, at)

    def _mark_entries(self, first: int, count: int, nonzero: list, entries: dict) -> None:
        """The new entries: data units allocated, the others reading as zero."""
        cb = self.geo.units_per_cluster_bits
        if not cb:
            for i in range(count):
                c = first + i
                if entries[c][0] == 0:
                    entries[c] = (ZERO_ENTRY, 0)
            return
        all_data = len(nonzero) == count
        data = None if all_data or not nonzero else set(nonzero)
        end = first + count
        for c in range(first >> cb, ((end - 1) >> cb) + 1):
            base = c << cb
            x0, x1 = max(first, base) - base, min(end, base + 32) - base
            e, sub = entries[c]
            if all_data:
                sub |= ((1 << (x1 - x0)) - 1) << x0
            elif data is None:
                sub |= ((1 << (x1 - x0)) - 1) << (32 + x0)
            else:
                for x in range(x0, x1):
                    sub |= (1 << x) if base + x - first in data else (1 << (32 + x))
            entries[c] = (e, sub)

    def _publish(self, entries: dict, table_hosts: dict) -> None:
        """Write L2 entries (only the touched span of each table), then L1 entries.

        A new table's cluster may hold an old epoch's bytes (clusters are reused
        after a drop): a hole is punched there first so the rest of the table reads
        as zeros without writing 64 KiB of them every epoch; where holes cannot be
        punched the whole table is written."""
        geo = self.geo
        bits = geo.l2_bits
        mask = (1 << bits) - 1
        w = geo.entry_words
        C = self.cluster_size
        by_table: dict = {}
        for c in sorted(entries):
            by_table.setdefault(c >> bits, []).append(c)
        for t, clusters in by_table.items():
            # the clusters of one preserve are a contiguous run within each table
            lo, hi = clusters[0] & mask, (clusters[-1] & mask) + 1
            if t in table_hosts:
                offset = table_hosts[t] * C
                if not self._empty_table(offset):
                    lo, hi = 0, 1 << bits
            else:
                offset = self.l1[t] & OFFSET_MASK
            span = [0] * ((hi - lo) * w)
            for c in clusters:
                e, sub = entries[c]
                j = ((c & mask) - lo) * w
                span[j] = e
                if w == 2:
                    span[j + 1] = sub
            pwrite_all(self.fd, [pack_u64s(span)], offset + lo * 8 * w)
        if table_hosts:
            self.barrier()
            if crashpoints.ARMED:
                crashpoints.reached("preserve.before-l1")
            for t, h in table_hosts.items():
                entry = (h * C) | OFLAG_COPIED
                pwrite_all(self.fd, [U64.pack(entry)], self.l1_offset + t * 8)
                self.l1[t] = entry
                self.tables.add(t)

    def _empty_table(self, offset: int) -> bool:
        """Make a new table's cluster read as zeros by punching a hole; False where
        the file system cannot (then the caller writes the whole table)."""
        if self.can_punch:
            try:
                punch_hole(self.fd, offset, self.cluster_size, fallback=False)
                return True
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self.can_punch = False
        return False

    # --- reading the committed view -----------------------------------------------
    def read_committed(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the disk as of the last commit (overlay over image).

        Runs of units of one kind (from the image, zero, or contiguous overlay
        data) are read with one syscall each.
        """
        U = self.unit_size
        bits = self.unit_bits
        pos = 0
        total = len(view)
        base = offset >> bits
        table = self.unit_sources(base, ((offset + total - 1) >> bits) - base + 1)
        while pos < total:
            unit = (offset + pos) >> bits
            first = last = table[unit - base]
            n = min(total - pos, ((unit + 1) << bits) - (offset + pos))
            while pos + n < total:
                following = table[unit + 1 - base]
                if not _same_run(last, following, U):
                    break
                unit += 1
                last = following
                n += min(total - pos - n, U)
            segment = view[pos:pos + n]
            if not first:
                pread_into(self.image_fd, segment, offset + pos)
            elif first != ZERO_SOURCE:
                pread_into(self.fd, segment, first + ((offset + pos) & (U - 1)))
            else:
                segment[:] = _zeros(n)
            pos += n

    # --- drop (commit) and apply (rollback) ----------------------------------------
    def drop(self, epoch: int) -> None:
        """Forget all undo data and record that the overlay now returns to ``epoch``.

        Order: L1 entries to zero (afterwards everything is at worst a leak), barrier,
        refcount blocks rewritten with only metadata counted, then the epoch record,
        then space no recent epoch needed is given back.  The cost depends on the L1
        size and the number of refcount blocks touched, not on how much was preserved.
        """
        try:
            self._zero_l1()
            if crashpoints.ARMED:
                crashpoints.reached("drop.after-l1")
            self.barrier()
            self.space.clean()
            if crashpoints.ARMED:
                crashpoints.reached("drop.before-epoch")
            self.set_epoch(epoch)
            self.space.give_back(self.barrier)
        except OSError as e:
            raise io_failure(f"dropping undo data of {self.path}", e) from None
        self._clear_bits()
        self.tables = set()
        self.preserved = 0
        self.clusters_touched = 0
        self.data_units = 0
        self.host_clusters = 0
        self.unmarked_hosts = False
        self.space.restart()

    def _table_spans(self, limit: int):
        """Runs of used L1 indices to clear: one span from the first to the last if
        clearing that costs at most ``limit`` entries (a few big writes beat
        thousands of small ones), else each run on its own."""
        if not self.tables:
            return []
        lo, hi = min(self.tables), max(self.tables) + 1
        if hi - lo <= limit:
            return [(lo, hi - lo)]
        return list(_runs(sorted(self.tables)))

    def _clear_bits(self) -> None:
        """Zero the bitmap where tables exist: cost per table, not per unit."""
        per_table_bytes = (1 << (self.geo.l2_bits + self.geo.units_per_cluster_bits)) // 8
        whole = (ctypes.c_char * len(self.bitmap)).from_buffer(self.bitmap)
        for start, n in self._table_spans((4 << 20) // per_table_bytes):
            lo = start * per_table_bytes
            hi = min(len(self.bitmap), (start + n) * per_table_bytes)
            ctypes.memset(ctypes.addressof(whole) + lo, 0, hi - lo)  # a real memset
        del whole  # release the export: the bytearray may not be resized while held

    def _zero_l1(self) -> None:
        for start, n in self._table_spans(1 << 17):
            pwrite_all(self.fd, [_zeros(n * 8)], self.l1_offset + start * 8)
            self.l1[start:start + n] = [0] * n

    def is_clean(self) -> bool:
        """No undo data and no leaked clusters (what a crash in the middle of a
        preserve leaves: allocated, never referenced): nothing for drop() to do."""
        if self.tables or self.preserved:
            return False
        return self.space.counts_only_metadata()

    def set_epoch(self, epoch: int) -> None:
        if self._epoch_offset is None:
            raise CorruptOverlay(f"{self.path}: not an nbd-mc overlay (no epoch record)")
        pwrite_all(self.fd, [NBD_MC_EXT.pack(epoch, NBD_MC_EXT_VERSION)], self._epoch_offset)
        self.epoch = epoch

    def apply(self, chunk: int = 8 << 20) -> int:
        """Write every preserved unit back into the image; returns how many.

        Idempotent: the overlay is not changed, so an interrupted apply is simply
        repeated.  Runs of units contiguous in both guest and host space are copied
        with one read and one write (about ``chunk`` bytes at most at a time); units
        that were never preserved are not touched.
        """
        U = self.unit_size
        restored = 0
        run = None  # [first unit, count, source]
        for first, n, src in self.preserved_runs():
            restored += n
            if run and first == run[0] + run[1] and run[1] * U < chunk and (
                    src == run[2] == ZERO_SOURCE
                    or (src != ZERO_SOURCE and run[2] != ZERO_SOURCE
                        and src == run[2] + run[1] * U)):
                run[1] += n
                continue
            if run:
                self._apply_run(*run)
                if crashpoints.ARMED:
                    crashpoints.reached("apply.after-run")
            run = [first, n, src]
        if run:
            self._apply_run(*run)
        return restored

    def _apply_run(self, first: int, n: int, src: int) -> None:
        U = self.unit_size
        start = first * U
        length = min(n * U, self.size - start)
        try:
            if src != ZERO_SOURCE:
                buf = bytearray(length)
                pread_into(self.fd, memoryview(buf), src)
                pwrite_all(self.image_fd, [buf], start)
            else:
                punch_hole(self.image_fd, start, length)  # reads as zeros, stays sparse
        except OSError as e:
            raise io_failure(f"restoring units into the image at {start}", e) from None

    def reclaim_leaks(self) -> int:
        """After a crash: give back the clusters a preserve had allocated but not
        yet published (refcount 1, referenced by nothing; ``qemu-img check`` exit 3)
        so the file checks clean.  Only right after open, before any preserve (no
        preserve in flight, and the allocation cursor still where open put it,
        past every referenced cluster).  The refcount writes are made durable
        before the file's unreferenced tail is cut off (power loss: never a
        refcount past the end of the file).  Returns the clusters reclaimed.
        Used for history layers, which no drop ever cleans (nbd_mc/secondary/history.py)."""
        if self.readonly:
            return 0
        try:
            cleared = self.space.reclaim_leaks(self._referenced())
            if cleared:
                os.fdatasync(self.fd)
                self.space.cut_tail()
        except OSError as e:
            raise io_failure(f"reclaiming leaked clusters of {self.path}", e) from None
        return cleared

    def _referenced(self) -> set:
        """Host clusters the L1 and L2 tables point at (one pread per table)."""
        geo = self.geo
        C = self.cluster_size
        w = geo.entry_words
        out = set()
        for t in self.tables:
            off = self.l1[t] & OFFSET_MASK
            out.add(off // C)
            words = unpack_u64s(os.pread(self.fd, C, off))
            out.update((e & OFFSET_MASK) // C for e in words[::w] if e & OFFSET_MASK)
        return out

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def summary(self) -> dict:
        return {
            "path": self.path,
            "backing": self.backing,
            "backing_format": self.backing_format,
            "size": self.size,
            "cluster_size": self.cluster_size,
            "subclusters": self.subclusters,
            "unit_size": self.unit_size,
            "epoch": self.epoch,
            "preserved_clusters": self.clusters_touched,
            "preserved_units": self.preserved,
            "undo_bytes": self.undo_bytes,
            "l2_tables": len(self.tables),
        }


# --- helpers ----------------------------------------------------------------------
def _same_run(a: int, b: int, U: int) -> bool:
    """Whether unit sources a, b (in guest order) can be read with one syscall."""
    if not a or a == ZERO_SOURCE:
        return b == a
    return b == a + U


def open_image(path: str, writable: bool = True) -> int:
    try:
        return os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except OSError as e:
        raise io_failure(f"cannot open image {path}", e) from None
