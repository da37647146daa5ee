"""The undo overlay: a real qcow2 v3 file whose backing file is the replica image.

Before the image overwrites a cluster for the first time in an epoch, the cluster's
old contents are copied here at the same guest offset.  Opening the overlay with any
qcow2 reader (QEMU, qemu-img) therefore shows the disk as of the last commit, and
``qemu-img commit`` on it is the same operation as our ``apply``.

Why our own writer: no maintained Python library writes qcow2, and the one thing we
need -- ordered, crash-safe metadata updates on a file that stays valid qcow2 at every
instant -- is a small subset of the format (docs/qcow2-undo-format.md):

* metadata is written in the order refcount -> data -> L2 entry -> L1 entry, so a
  crash can leave only leaks (allocated, unreferenced clusters), never a referenced
  cluster with refcount 0;
* dropping all undo data zeroes the L1 entries first (from then on all that is left
  is leaks), then rewrites the few refcount blocks that were touched; its cost does
  not grow with the amount of undo data, and the freed clusters are reused;
* in memory we keep one bit per guest cluster ("preserved in this epoch": the hot
  path's only question), the L1 table, and a cursor for allocation.  L2 entries
  stay in the file (the page cache has them) and are read when the committed
  view or a rollback needs them.  Memory is thus one bit per cluster (2 MiB for
  1 TiB at 64 KiB), whatever was preserved, and dropping frees no Python objects
  per cluster (freeing 100 k dict entries alone would take milliseconds).

Our own header extension (type ``EXT_NBD_MC``) records which committed epoch the
undo data returns to, so a crash between "persist committed = N" and "drop the undo
data" is recognised on restart.  qcow2 readers ignore unknown extensions, and QEMU
keeps them when it rewrites the header.
"""

from __future__ import annotations

import ctypes
import os
import struct
from array import array
from dataclasses import dataclass

from . import crashpoints
from .fileio import pread_into, punch_hole, pwrite_all, runs as _runs
from .errors import CorruptOverlay, IOFailure
from .errors import io_failure as _io_error

MAGIC = b"QFI\xfb"
HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # the 104 bytes of a v3 header
HEADER_LENGTH = 112  # + compression_type byte and 7 bytes of padding
EXT = struct.Struct(">II")
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_NBD_MC = 0x6E62646D  # "nbdm"
NBD_MC_EXT = struct.Struct(">QQ")  # base epoch, format version of the extension
NBD_MC_EXT_VERSION = 1

OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L2_RESERVED = 0x3F000000000001FE  # bits 1-8 and 56-61 must be zero

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
REFCOUNT_ORDER = 4  # 16-bit refcounts, what qemu-img creates
MIN_CLUSTER_BITS = 12
MAX_CLUSTER_BITS = 21

ZERO_ENTRY = OFLAG_ZERO  # "reads as zero", no data cluster
REFCOUNT_ONE = b"\x00\x01"


def cluster_bits_of(cluster_size: int) -> int:
    bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << bits or not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        raise ValueError(
            f"cluster size {cluster_size} must be a power of two from "
            f"{1 << MIN_CLUSTER_BITS} to {1 << MAX_CLUSTER_BITS}")
    return bits


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Geometry:
    """Sizes derived from the virtual size and the cluster size."""

    size: int
    cluster_bits: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def clusters(self) -> int:
        return _ceil_div(self.size, self.cluster_size)

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - 3

    @property
    def l1_size(self) -> int:
        return max(1, _ceil_div(self.clusters, 1 << self.l2_bits))

    @property
    def refblock_entries(self) -> int:
        return self.cluster_size * 8 // (1 << REFCOUNT_ORDER)

    def max_host_clusters(self, metadata: int) -> int:
        """Most clusters the overlay can ever use: everything preserved."""
        data = self.clusters + self.l1_size + metadata
        refblocks = _ceil_div(data, self.refblock_entries - 1) + 1
        return data + refblocks


@dataclass
class Header:
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    incompatible: int
    header_length: int
    nb_snapshots: int
    crypt_method: int
    refcount_order: int
    compatible: int
    autoclear: int

    @classmethod
    def parse(cls, raw: bytes) -> "Header":
        (magic, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
         nb_snap, _snap_off, incompat, compat, autoclear, rc_order, hlen) = HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise CorruptOverlay("not a qcow2 file (bad magic)")
        if version != 3:
            raise CorruptOverlay(f"qcow2 version {version}; only version 3 is supported")
        return cls(bfo, bfs, cbits, size, l1_size, l1_off, rt_off, rt_clusters, incompat, hlen,
                   nb_snap, crypt, rc_order, compat, autoclear)


def _encode_header(geo: Geometry, l1_offset: int, rt_offset: int, rt_clusters: int,
                   backing: bytes, epoch: int) -> bytes:
    """Cluster-0 contents: header, our extension, backing format, backing name."""
    exts = b"".join([
        EXT.pack(EXT_NBD_MC, NBD_MC_EXT.size), NBD_MC_EXT.pack(epoch, NBD_MC_EXT_VERSION),
        EXT.pack(EXT_BACKING_FORMAT, 3), b"raw".ljust(8, b"\0"),
        EXT.pack(EXT_END, 0),
    ])
    backing_offset = HEADER_LENGTH + len(exts)
    head = HEADER.pack(MAGIC, 3, backing_offset, len(backing), geo.cluster_bits, geo.size,
                       0, geo.l1_size, l1_offset, rt_offset, rt_clusters, 0, 0,
                       0, 0, 0, REFCOUNT_ORDER, HEADER_LENGTH)
    out = head + bytes(HEADER_LENGTH - len(head)) + exts + backing
    if len(out) > geo.cluster_size:
        raise ValueError("backing file name too long for the header cluster")
    return out


def backing_name_for(overlay_path: str, image_path: str) -> str:
    """Relative name when image and overlay share a directory (the pair can move)."""
    image = os.path.abspath(image_path)
    if os.path.dirname(os.path.abspath(overlay_path)) == os.path.dirname(image):
        return os.path.basename(image)
    return image


def resolve_backing(overlay_path: str, name: str) -> str:
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(overlay_path)), name)


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create(path: str, image_path: str, size: int, cluster_size: int = 65536,
           epoch: int = 0) -> None:
    """Create an empty overlay atomically (temp file, fsync, rename).

    Layout: header, refcount table (sized for the largest the overlay can grow, so it
    never has to move), L1 table, then the refcount blocks that count the metadata.
    Everything past the header and the first refcount block is a sparse hole.
    """
    geo = Geometry(size, cluster_bits_of(cluster_size))
    backing = backing_name_for(path, image_path).encode()
    if len(backing) > 1023:
        raise ValueError("backing file name longer than 1023 bytes")
    C = geo.cluster_size
    l1_clusters = _ceil_div(geo.l1_size * 8, C)
    rt_clusters = 1
    while True:  # the refcount table must cover every cluster the file may ever hold
        metadata = 1 + rt_clusters + l1_clusters
        blocks = _ceil_div(geo.max_host_clusters(metadata), geo.refblock_entries)
        need = _ceil_div(blocks * 8, C)
        if need <= rt_clusters:
            break
        rt_clusters = need
    rt_offset = C
    l1_offset = (1 + rt_clusters) * C
    first_block = 1 + rt_clusters + l1_clusters
    nblocks = 1
    while (first_block + nblocks) > nblocks * geo.refblock_entries:
        nblocks += 1
    used = first_block + nblocks  # clusters [0, used) are metadata with refcount 1

    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, used * C)
        pwrite_all(fd, [_encode_header(geo, l1_offset, rt_offset, rt_clusters, backing, epoch)], 0)
        table = b"".join(struct.pack(">Q", (first_block + i) * C) for i in range(nblocks))
        pwrite_all(fd, [table], rt_offset)
        counts = REFCOUNT_ONE * used
        pwrite_all(fd, [counts], first_block * C)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    _fsync_dir(path)


class UndoOverlay:
    """One disk's copy-before-write store.

    Not thread-safe by itself: the engine serialises calls that change it and
    guarantees that no two preserves cover the same cluster.  ``barrier`` is called
    where a power-loss-safe writer must make earlier writes durable before later
    ones (a no-op for durability ``process``, a grouped fdatasync for ``power``).
    """

    def __init__(self, path: str, image_fd: int, *, expected_size: int | None = None,
                 expected_image: str | None = None, readonly: bool = False, barrier=None):
        self.path = path
        self.image_fd = image_fd
        self.readonly = readonly
        self.barrier = barrier or (lambda: None)
        try:
            self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as e:
            raise CorruptOverlay(f"cannot open overlay {path}: {os.strerror(e.errno)}") from None
        try:
            self._load(expected_size, expected_image)
        except BaseException:
            os.close(self.fd)
            raise

    # --- loading and validation ------------------------------------------------
    def _load(self, expected_size, expected_image) -> None:
        file_size = os.fstat(self.fd).st_size
        raw = os.pread(self.fd, 4096, 0)
        if len(raw) < HEADER.size:
            raise CorruptOverlay(f"{self.path}: truncated header ({len(raw)} bytes)")
        h = Header.parse(raw)
        self._check_header(h, file_size)
        self.geo = Geometry(h.size, h.cluster_bits)
        self.cluster_size = self.geo.cluster_size
        self.size = h.size
        self.header = h
        cluster0 = os.pread(self.fd, self.cluster_size, 0)
        self._parse_extensions(cluster0, h)
        self.backing = cluster0[h.backing_file_offset:h.backing_file_offset + h.backing_file_size].decode(
            "utf-8", "replace") if h.backing_file_offset else ""
        if expected_size is not None and h.size != expected_size:
            raise CorruptOverlay(
                f"{self.path}: overlay size {h.size} does not match image size {expected_size}")
        if expected_image is not None:
            self._check_backing(expected_image)
        self._load_refcounts(h, file_size)
        self._load_tables(h, file_size)

    def _check_header(self, h: Header, file_size: int) -> None:
        where = self.path
        if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
            raise CorruptOverlay(f"{where}: cluster_bits {h.cluster_bits} out of range")
        if h.crypt_method:
            raise CorruptOverlay(f"{where}: encrypted qcow2 is not supported")
        if h.nb_snapshots:
            raise CorruptOverlay(f"{where}: qcow2 with internal snapshots is not supported")
        if h.incompatible & INCOMPAT_CORRUPT:
            raise CorruptOverlay(f"{where}: marked corrupt by QEMU (run qemu-img check -r all)")
        if h.incompatible & INCOMPAT_DIRTY:
            raise CorruptOverlay(
                f"{where}: dirty (lazy refcounts not flushed); run 'qemu-img check -r all' first")
        if h.incompatible & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT):
            raise CorruptOverlay(f"{where}: unsupported incompatible features {h.incompatible:#x}")
        if h.refcount_order != REFCOUNT_ORDER:
            raise CorruptOverlay(f"{where}: refcount_order {h.refcount_order}; only 16-bit refcounts")
        if h.header_length < 104:
            raise CorruptOverlay(f"{where}: header_length {h.header_length} too small")
        C = 1 << h.cluster_bits
        for name, off in (("L1 table", h.l1_table_offset), ("refcount table", h.refcount_table_offset)):
            if off % C or off == 0:
                raise CorruptOverlay(f"{where}: {name} offset {off:#x} not cluster aligned")
        if h.l1_size < Geometry(h.size, h.cluster_bits).l1_size:
            raise CorruptOverlay(f"{where}: L1 table too small for the virtual size")
        if h.refcount_table_offset + h.refcount_table_clusters * C > file_size:
            raise CorruptOverlay(f"{where}: truncated (refcount table past end of file)")
        if h.l1_table_offset + h.l1_size * 8 > file_size:
            raise CorruptOverlay(f"{where}: truncated (L1 table past end of file)")

    def _parse_extensions(self, cluster0: bytes, h: Header) -> None:
        self.backing_format = None
        self._epoch_offset = None
        self.epoch = None
        off = h.header_length
        while off + EXT.size <= len(cluster0):
            etype, elen = EXT.unpack_from(cluster0, off)
            data_off = off + EXT.size
            if etype == EXT_END:
                break
            if data_off + elen > len(cluster0):
                raise CorruptOverlay(f"{self.path}: header extension runs past the header cluster")
            if etype == EXT_BACKING_FORMAT:
                self.backing_format = cluster0[data_off:data_off + elen].decode("ascii", "replace")
            elif etype == EXT_NBD_MC and elen >= NBD_MC_EXT.size:
                self.epoch, _version = NBD_MC_EXT.unpack_from(cluster0, data_off)
                self._epoch_offset = data_off
            off = data_off + ((elen + 7) & ~7)

    def _check_backing(self, expected_image: str) -> None:
        if not self.backing:
            raise CorruptOverlay(f"{self.path}: has no backing file (expected {expected_image})")
        resolved = os.path.realpath(resolve_backing(self.path, self.backing))
        if resolved != os.path.realpath(expected_image):
            raise CorruptOverlay(
                f"{self.path}: backing file is {self.backing!r}, expected {expected_image}")
        if self.backing_format not in (None, "raw"):
            raise CorruptOverlay(f"{self.path}: backing format is {self.backing_format}, expected raw")
        if self._epoch_offset is None and not self.readonly:
            raise CorruptOverlay(f"{self.path}: not an nbd-mc overlay (no epoch record)")

    def _load_refcounts(self, h: Header, file_size: int) -> None:
        """Read the refcount table; remember the blocks and the metadata clusters."""
        C = self.cluster_size
        rt = os.pread(self.fd, h.refcount_table_clusters * C, h.refcount_table_offset)
        entries = array("Q", rt)
        if struct.pack("=H", 1) != struct.pack(">H", 1):
            entries.byteswap()
        self.refblocks = {}  # block index -> file offset of the refcount block
        l1_first = h.l1_table_offset // C
        taken = {0, *range(h.refcount_table_offset // C,
                           h.refcount_table_offset // C + h.refcount_table_clusters),
                 *range(l1_first, l1_first + _ceil_div(h.l1_size * 8, C))}
        for i, e in enumerate(entries):
            off = e & OFFSET_MASK
            if e & ~OFFSET_MASK or off % C:
                raise CorruptOverlay(f"{self.path}: refcount table entry {i} is invalid ({e:#x})")
            if off:
                if off + C > file_size:
                    raise CorruptOverlay(f"{self.path}: truncated (refcount block {i} past end of file)")
                if off // C in taken:  # we would write refcounts into other metadata
                    raise CorruptOverlay(
                        f"{self.path}: refcount block {i} at {off:#x} overlaps other metadata")
                taken.add(off // C)
                self.refblocks[i] = off
        self.refcount_table_entries = len(entries)
        self.refcount_table_offset = h.refcount_table_offset
        self.permanent = set(range(h.refcount_table_offset // C,
                                   h.refcount_table_offset // C + h.refcount_table_clusters))
        self.permanent.add(0)
        l1_first = h.l1_table_offset // C
        self.permanent.update(range(l1_first, l1_first + _ceil_div(h.l1_size * 8, C)))
        self.permanent.update(off // C for off in self.refblocks.values())
        self._metadata_index = None
        needed = self.geo.max_host_clusters(len(self.permanent))
        self.refcount_capacity = self.refcount_table_entries * self.geo.refblock_entries
        if not self.readonly and self.refcount_capacity < needed:
            raise CorruptOverlay(
                f"{self.path}: refcount table covers {self.refcount_capacity} clusters, "
                f"{needed} may be needed; recreate the overlay with nbd-mc")

    def _refcount(self, host_cluster: int, cache: dict) -> int:
        block = host_cluster // self.geo.refblock_entries
        off = self.refblocks.get(block)
        if off is None:
            return 0
        data = cache.get(block)
        if data is None:
            data = cache[block] = os.pread(self.fd, self.cluster_size, off)
        i = (host_cluster % self.geo.refblock_entries) * 2
        return int.from_bytes(data[i:i + 2], "big")

    def _load_tables(self, h: Header, file_size: int) -> None:
        """Read L1 and every L2 table; check each reference against refcounts."""
        C = self.cluster_size
        raw = os.pread(self.fd, h.l1_size * 8, h.l1_table_offset)
        l1 = array("Q", raw)
        l1.byteswap()
        self.l1_offset = h.l1_table_offset
        self.l1 = l1
        self.tables = set()  # L1 indices that have an L2 table
        self.bitmap = bytearray((self.geo.clusters + 7) // 8)  # preserved clusters
        self.preserved = 0
        self.data_clusters = 0
        cache: dict = {}
        referenced = set()
        top = 0
        for i, e in enumerate(l1):
            off = e & OFFSET_MASK
            if not off:
                continue
            if e & ~(OFFSET_MASK | OFLAG_COPIED) or off % C:
                raise CorruptOverlay(f"{self.path}: L1 entry {i} is invalid ({e:#x})")
            if not e & OFLAG_COPIED:  # refcount 1 (checked below) requires COPIED
                raise CorruptOverlay(f"{self.path}: L1 entry {i} lacks the COPIED flag ({e:#x})")
            self._check_reference(off, file_size, cache, referenced, f"L2 table {i}")
            table = array("Q", os.pread(self.fd, C, off))
            table.byteswap()
            self.tables.add(i)
            top = max(top, off // C)
            for j, entry in enumerate(table):
                if not entry:
                    continue
                guest = (i << self.geo.l2_bits) + j
                if guest >= self.geo.clusters:
                    raise CorruptOverlay(f"{self.path}: L2 entry past the virtual size")
                if entry & OFLAG_COMPRESSED:
                    raise CorruptOverlay(f"{self.path}: compressed clusters are not supported")
                if entry & L2_RESERVED:
                    raise CorruptOverlay(f"{self.path}: L2 entry for cluster {guest} is invalid ({entry:#x})")
                data = entry & OFFSET_MASK
                if data:
                    if not entry & OFLAG_COPIED:  # as for L1: refcount 1 requires COPIED
                        raise CorruptOverlay(f"{self.path}: L2 entry for cluster {guest} lacks "
                                             f"the COPIED flag ({entry:#x})")
                    self._check_reference(data, file_size, cache, referenced, f"cluster {guest}")
                    top = max(top, data // C)
                    self.data_clusters += 1
                elif not entry & OFLAG_ZERO:
                    continue  # unallocated (e.g. a stray COPIED bit): reads the backing file
                self.bitmap[guest >> 3] |= 1 << (guest & 7)
                self.preserved += 1
        self.cursor = max(top + 1, max(self.permanent) + 1)
        # refcount blocks holding anything but metadata: rewritten by the next drop
        self.dirty_blocks = set(self.refblocks)

    def _check_reference(self, off: int, file_size: int, cache: dict, referenced: set, what: str):
        if off % self.cluster_size:
            raise CorruptOverlay(f"{self.path}: {what} at {off:#x} is not cluster aligned")
        if off + self.cluster_size > file_size:
            raise CorruptOverlay(f"{self.path}: truncated ({what} at {off:#x} is past end of file)")
        cluster = off // self.cluster_size
        if cluster in self.permanent or cluster in referenced:
            raise CorruptOverlay(f"{self.path}: {what} at {off:#x} overlaps other metadata or data")
        if self._refcount(cluster, cache) != 1:
            raise CorruptOverlay(
                f"{self.path}: {what} at {off:#x} has refcount {self._refcount(cluster, cache)}, expected 1")
        referenced.add(cluster)

    # --- queries -----------------------------------------------------------------
    def is_preserved(self, cluster: int) -> bool:
        return (self.bitmap[cluster >> 3] >> (cluster & 7)) & 1 == 1

    def entry(self, cluster: int) -> int:
        """Raw L2 entry of a guest cluster: 0 = not preserved."""
        return self.entries(cluster, 1)[0]

    def entries(self, first: int, count: int) -> list[int]:
        """Raw L2 entries of clusters [first, first+count), 0 where not preserved.

        Read from the file (one pread per L2 table touched), only where a bit says
        the cluster is preserved -- a bit is set only after its entry is written.
        """
        bm = self.bitmap
        out = [0] * count
        bits = self.geo.l2_bits
        mask = (1 << bits) - 1
        c = first
        end = first + count
        while c < end:
            t = c >> bits
            stop = min(end, (t + 1) << bits)
            if any((bm[x >> 3] >> (x & 7)) & 1 for x in range(c, stop)):
                lo = c & mask
                raw = array("Q", os.pread(self.fd, (stop - c) * 8,
                                          (self.l1[t] & OFFSET_MASK) + lo * 8))
                raw.byteswap()
                for x in range(c, stop):
                    if (bm[x >> 3] >> (x & 7)) & 1:
                        out[x - first] = raw[x - c]
            c = stop
        return out

    @property
    def undo_bytes(self) -> int:
        return self.data_clusters * self.cluster_size

    def preserved_clusters(self):
        """(guest cluster, raw entry) for every preserved cluster, in guest order.

        One pread per L2 table; the bitmap is scanned a byte at a time so that a
        rollback of a big epoch does not test 8192 bits per table one by one.
        """
        bits = self.geo.l2_bits
        C = self.cluster_size
        for t in sorted(self.tables):
            base = t << bits  # a multiple of 512: byte aligned in the bitmap
            marks = self.bitmap[base >> 3:(base + (1 << bits)) >> 3]
            if marks.count(0) == len(marks):
                continue
            raw = array("Q", os.pread(self.fd, C, self.l1[t] & OFFSET_MASK))
            raw.byteswap()
            for i, byte in enumerate(marks):
                if byte:
                    for k in range(8):
                        if (byte >> k) & 1:
                            yield base + i * 8 + k, raw[i * 8 + k]

    # --- allocation -----------------------------------------------------------
    def _allocate(self, count: int) -> list[int]:
        """Host cluster indices for ``count`` new clusters; refcounts written (=1).

        Clusters come from a cursor that skips metadata; a missing refcount block is
        placed at the first cluster it covers that we allocate, counting itself.
        """
        out = []
        while len(out) < count:
            c = self.cursor
            if c in self.permanent:
                self.cursor += 1
                continue
            if c >= self.refcount_capacity:
                raise IOFailure("overlay is full (refcount table exhausted)", 28)
            block = c // self.geo.refblock_entries
            if block not in self.refblocks:
                self._new_refblock(block, c)
                continue
            out.append(c)
            self.cursor += 1
        self._write_refcounts(out)
        return out

    def _new_refblock(self, block: int, at: int) -> None:
        C = self.cluster_size
        content = bytearray(C)
        i = (at % self.geo.refblock_entries) * 2
        content[i:i + 2] = REFCOUNT_ONE
        pwrite_all(self.fd, [content], at * C)
        pwrite_all(self.fd, [struct.pack(">Q", at * C)], self.refcount_table_offset + block * 8)
        self.refblocks[block] = at * C
        self.permanent.add(at)
        self.cursor = max(self.cursor, at + 1)

    def _write_refcounts(self, clusters: list[int]) -> None:
        """Set refcount 1 for each cluster: one write per contiguous run."""
        E = self.geo.refblock_entries
        for start, n in _runs(clusters):
            while n:
                block, idx = divmod(start, E)
                k = min(n, E - idx)
                pwrite_all(self.fd, [REFCOUNT_ONE * k], self.refblocks[block] + idx * 2)
                self.dirty_blocks.add(block)
                start += k
                n -= k

    # --- preserve ----------------------------------------------------------------
    def preserve(self, first: int, count: int) -> int:
        """Copy the image's current clusters [first, first+count) into the overlay.

        The caller guarantees none of them is preserved yet.  One read of the old
        data, one write of the non-zero clusters (allocated contiguously), then the
        L2 entries and L1 entries.  Returns the number of data clusters written.
        """
        C = self.cluster_size
        bits = self.geo.cluster_bits
        old = bytearray(count * C)
        view = memoryview(old)
        start = first << bits
        end = min((first + count) << bits, self.size)
        try:
            pread_into(self.image_fd, view[:end - start], start)
        except OSError as e:
            raise _io_error(f"reading old data from the image at {start}", e) from None
        nonzero = [i for i in range(count) if not _is_zero(old, i * C, C)]
        try:
            new_tables = self._tables_needed(first, count)
            hosts = self._allocate(len(new_tables) + len(nonzero))
            table_hosts = dict(zip(new_tables, hosts))
            data_hosts = hosts[len(new_tables):]
            if crashpoints.ARMED:
                crashpoints.reached("preserve.before-data")
            for (h0, n), segs in _host_runs(data_hosts, nonzero):
                pwrite_all(self.fd, [view[i * C:(i + 1) * C] for i in segs], h0 * C)
            self.barrier()
            if crashpoints.ARMED:
                crashpoints.reached("preserve.before-l2")
            entries = {first + i: ZERO_ENTRY for i in range(count)}
            for i, h in zip(nonzero, data_hosts):
                entries[first + i] = (h * C) | OFLAG_COPIED
            self._publish(entries, table_hosts)
        except OSError as e:
            raise _io_error(f"writing undo data into {self.path}", e) from None
        self.data_clusters += len(nonzero)
        self.preserved += count
        return len(nonzero)

    def _tables_needed(self, first: int, count: int) -> list[int]:
        bits = self.geo.l2_bits
        return [i for i in range(first >> bits, ((first + count - 1) >> bits) + 1)
                if i not in self.tables]

    def _publish(self, entries: dict, table_hosts: dict) -> None:
        """Write L2 entries (whole new tables, or the touched span), then L1 entries."""
        bits = self.geo.l2_bits
        mask = (1 << bits) - 1
        C = self.cluster_size
        by_table: dict = {}
        for guest, e in entries.items():
            by_table.setdefault(guest >> bits, []).append((guest & mask, e))
        for t, items in by_table.items():
            # the entries of one preserve are a contiguous run within each table
            if t in table_hosts:
                offset, lo, hi = table_hosts[t] * C, 0, C // 8
            else:
                offset = self.l1[t] & OFFSET_MASK
                lo, hi = min(j for j, _ in items), max(j for j, _ in items) + 1
            span = array("Q", bytes((hi - lo) * 8))
            for j, e in items:
                span[j - lo] = e
            pwrite_all(self.fd, [_be64(span)], offset + lo * 8)
        if table_hosts:
            self.barrier()
            if crashpoints.ARMED:
                crashpoints.reached("preserve.before-l1")
            for t, h in table_hosts.items():
                entry = (h * C) | OFLAG_COPIED
                pwrite_all(self.fd, [struct.pack(">Q", entry)], self.l1_offset + t * 8)
                self.l1[t] = entry
                self.tables.add(t)
        bm = self.bitmap
        for guest in entries:  # published: from now on readers look at the entries
            bm[guest >> 3] |= 1 << (guest & 7)

    # --- reading the committed view -----------------------------------------------
    def read_committed(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the disk as of the last commit (overlay over image).

        Runs of clusters of one kind (from the image, zero, or contiguous overlay
        data) are read with one syscall each.
        """
        C = self.cluster_size
        bits = self.geo.cluster_bits
        pos = 0
        total = len(view)
        base = offset >> bits
        table = self.entries(base, ((offset + total - 1) >> bits) - base + 1)
        while pos < total:
            cluster = (offset + pos) >> bits
            first = last = table[cluster - base]
            n = min(total - pos, ((cluster + 1) << bits) - (offset + pos))
            while pos + n < total:
                following = table[cluster + 1 - base]
                if not self._same_run(last, following, C):
                    break
                cluster += 1
                last = following
                n += min(total - pos - n, C)
            segment = view[pos:pos + n]
            if not first:
                pread_into(self.image_fd, segment, offset + pos)
            elif _data_offset(first):
                pread_into(self.fd, segment, _data_offset(first) + ((offset + pos) & (C - 1)))
            else:
                segment[:] = _zeros(n)
            pos += n

    @staticmethod
    def _same_run(a: int, b: int, C: int) -> bool:
        if not a:
            return not b
        if not _data_offset(a):
            return bool(b) and not _data_offset(b)
        return bool(_data_offset(b)) and _data_offset(b) == _data_offset(a) + C

    # --- drop (commit) and apply (rollback) ----------------------------------------
    def drop(self, epoch: int) -> None:
        """Forget all undo data and record that the overlay now returns to ``epoch``.

        Order: L1 entries to zero (afterwards everything is at worst a leak), barrier,
        refcount blocks rewritten with only metadata counted, then the epoch record.
        The cost depends on the L1 size and the number of refcount blocks touched,
        not on how much was preserved.
        """
        try:
            self._zero_l1()
            if crashpoints.ARMED:
                crashpoints.reached("drop.after-l1")
            self.barrier()
            self._clean_refblocks()
            if crashpoints.ARMED:
                crashpoints.reached("drop.before-epoch")
            self.set_epoch(epoch)
        except OSError as e:
            raise _io_error(f"dropping undo data of {self.path}", e) from None
        self._clear_bits()
        self.tables = set()
        self.preserved = 0
        self.data_clusters = 0
        self.cursor = 0

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
        """Zero the bitmap where tables exist: cost per table, not per cluster."""
        per_table_bytes = (1 << self.geo.l2_bits) // 8
        whole = (ctypes.c_char * len(self.bitmap)).from_buffer(self.bitmap)
        for start, n in self._table_spans((4 << 20) // per_table_bytes):
            lo = start * per_table_bytes
            hi = min(len(self.bitmap), (start + n) * per_table_bytes)
            ctypes.memset(ctypes.addressof(whole) + lo, 0, hi - lo)  # a real memset
        del whole  # release the export: the bytearray may not be resized while held

    def _zero_l1(self) -> None:
        for start, n in self._table_spans(1 << 17):
            pwrite_all(self.fd, [_zeros(n * 8)], self.l1_offset + start * 8)
            self.l1[start:start + n] = array("Q", bytes(n * 8))

    def _clean_refblocks(self) -> None:
        for block in sorted(self.dirty_blocks):
            pwrite_all(self.fd, [self._clean_refblock(block)], self.refblocks[block])
        self.dirty_blocks = set()

    def _clean_refblock(self, block: int):
        """A refcount block as it is with no undo data: only metadata counted.

        Most blocks count no metadata at all: they are all zeros, no allocation.
        """
        counted = self._metadata_by_block().get(block)
        if not counted:
            return _zeros(self.cluster_size)
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

    def is_clean(self) -> bool:
        """No undo data and no leaked clusters (what a crash in the middle of a
        preserve leaves: allocated, never referenced): nothing for drop() to do."""
        if self.tables or self.preserved:
            return False
        for block, off in self.refblocks.items():
            if os.pread(self.fd, self.cluster_size, off) != self._clean_refblock(block):
                return False
        return True

    def set_epoch(self, epoch: int) -> None:
        if self._epoch_offset is None:
            raise CorruptOverlay(f"{self.path}: not an nbd-mc overlay (no epoch record)")
        pwrite_all(self.fd, [NBD_MC_EXT.pack(epoch, NBD_MC_EXT_VERSION)], self._epoch_offset)
        self.epoch = epoch

    def apply(self, chunk: int = 8 << 20) -> int:
        """Write every preserved cluster back into the image; returns how many.

        Idempotent: the overlay is not changed, so an interrupted apply is simply
        repeated.  Runs of clusters contiguous in both guest and host space are
        copied with one read and one write (at most ``chunk`` bytes at a time).
        """
        fd = self.image_fd
        C = self.cluster_size
        restored = 0
        run = []
        for guest, entry in self.preserved_clusters():
            if run and (guest != run[-1][0] + 1 or not self._same_run(run[-1][1], entry, C)
                        or len(run) * C >= chunk):
                self._apply_run(fd, run)
                if crashpoints.ARMED:
                    crashpoints.reached("apply.after-run")
                run = []
            run.append((guest, entry))
            restored += 1
        if run:
            self._apply_run(fd, run)
        return restored

    def _apply_run(self, fd: int, run: list) -> None:
        C = self.cluster_size
        start = run[0][0] * C
        length = min(len(run) * C, self.size - start)
        host = _data_offset(run[0][1])
        try:
            if host:
                buf = bytearray(length)
                pread_into(self.fd, memoryview(buf), host)
                pwrite_all(fd, [buf], start)
            else:
                punch_hole(fd, start, length)  # reads as zeros, and stays sparse
        except OSError as e:
            raise _io_error(f"restoring clusters into the image at {start}", e) from None

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
            "epoch": self.epoch,
            "preserved_clusters": self.preserved,
            "undo_bytes": self.undo_bytes,
            "l2_tables": len(self.tables),
        }


# --- helpers ----------------------------------------------------------------------
def _data_offset(entry: int) -> int:
    """Where a preserved cluster's data is; 0 if it reads as zeros.  The zero flag wins
    over an offset: QEMU's write-zeroes without unmap keeps the host cluster
    allocated and sets the flag (ZERO_ALLOC), and such a cluster reads as zeros."""
    return 0 if entry & OFLAG_ZERO else entry & OFFSET_MASK


def _is_zero(buf: bytearray, start: int, length: int) -> bool:
    return buf.startswith(_zeros(length), start)


_ZERO_BUF = bytes(4 << 20)


def _zeros(n: int):
    """n zero bytes without allocating: a view of one shared zero buffer (never
    written, so its pages are the kernel's zero page, not our memory)."""
    global _ZERO_BUF
    if n > len(_ZERO_BUF):
        _ZERO_BUF = bytes(n)
    return memoryview(_ZERO_BUF)[:n]


def _be64(values: array) -> bytes:
    out = array("Q", values)
    out.byteswap()
    return out.tobytes()


def _host_runs(hosts: list[int], segs: list[int]):
    """Group data clusters whose host clusters are consecutive: one write each."""
    i = 0
    while i < len(hosts):
        j = i + 1
        while j < len(hosts) and hosts[j] == hosts[j - 1] + 1:
            j += 1
        yield (hosts[i], j - i), segs[i:j]
        i = j


def open_image(path: str, writable: bool = True) -> int:
    try:
        return os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except OSError as e:
        raise IOFailure(f"cannot open image {path}: {os.strerror(e.errno)}", e.errno) from None


__all__ = ["create", "UndoOverlay", "Geometry", "open_image", "backing_name_for"]
