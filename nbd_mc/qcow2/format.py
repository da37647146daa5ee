"""The on-disk layout of the undo overlay: constants, geometry, header, creation,
and the validation of a file before anything is written into it.

The overlay is a qcow2 version 3 file (the layout is QEMU's docs/interop/qcow2.txt;
docs/qcow2-undo.md in this repository says which subset we write and why).  Two
L2 formats are used:

* standard L2 entries (64 bits): one preserve unit = one cluster;
* extended L2 entries (incompatible feature bit 4, 128 bits: the standard
  descriptor followed by a subcluster bitmap, bits 0-31 "allocated" and bits 32-63
  "reads as zero"): one preserve unit = one of the 32 subclusters of a cluster.
  QEMU (>= 5.2) accepts them only for clusters of at least 16 KiB.

Byte order: every on-disk integer is big-endian and is packed and unpacked with
``struct`` formats that start with ``>`` -- the one convention of this package.

``read_layout`` checks a file completely (header, extensions, backing file,
refcount table, L1 and every L2 table against the refcounts) and returns what
the overlay needs to work on it; nothing is written while checking.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

from ..errors import CorruptOverlay
from ..fileio import fsync_dir, pwrite_all

MAGIC = b"QFI\xfb"
HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # the 104 bytes of a v3 header
HEADER_LENGTH = 112  # + compression_type byte and 7 bytes of padding
EXT = struct.Struct(">II")
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_NBD_MC = 0x6E62646D  # "nbdm"
NBD_MC_EXT = struct.Struct(">QQ")  # base epoch, format version of the extension
NBD_MC_EXT_VERSION = 1
U64 = struct.Struct(">Q")
U16 = struct.Struct(">H")

OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L2_RESERVED = 0x3F000000000001FE  # bits 1-8 and 56-61 must be zero

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_EXTENDED_L2 = 1 << 4
REFCOUNT_ORDER = 4  # 16-bit refcounts, what qemu-img creates
MIN_CLUSTER_BITS = 12
MAX_CLUSTER_BITS = 21
SUBCLUSTER_BITS = 5  # 32 subclusters per cluster with extended L2 entries
MIN_EXTENDED_CLUSTER_BITS = 14  # QEMU refuses extended L2 below 16 KiB clusters
ALL_SUBCLUSTERS = 0xFFFFFFFF

ZERO_ENTRY = OFLAG_ZERO  # standard entry: "reads as zero", no data cluster
REFCOUNT_ONE = b"\x00\x01"


def cluster_bits_of(cluster_size: int) -> int:
    bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << bits or not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        raise ValueError(
            f"cluster size {cluster_size} must be a power of two from "
            f"{1 << MIN_CLUSTER_BITS} to {1 << MAX_CLUSTER_BITS}")
    return bits


def subclusters_possible(cluster_size: int) -> bool:
    """Whether extended L2 entries can be used with this cluster size (QEMU's rule)."""
    return cluster_bits_of(cluster_size) >= MIN_EXTENDED_CLUSTER_BITS


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def unpack_u64s(raw: bytes) -> list[int]:
    """Big-endian 64-bit integers of ``raw`` (whose length is a multiple of 8)."""
    return list(struct.unpack(f">{len(raw) // 8}Q", raw))


def pack_u64s(values) -> bytes:
    return struct.pack(f">{len(values)}Q", *values)


def zeroed_bitmap(bits: int) -> mmap.mmap:
    """A bitmap of ``bits`` zero bits in anonymous memory: pages are allocated only
    where a bit is set (a bytearray would be written through once, so a 1 TiB disk
    with 2 KiB subclusters would cost 64 MiB of memory up front)."""
    return mmap.mmap(-1, max(1, (bits + 7) // 8))


@dataclass
class Geometry:
    """Sizes derived from the virtual size, the cluster size and the L2 format.

    The disk is cut into two granules of 2**bits bytes each, set once at creation
    (a Geometry never changes): the *cluster* (``cluster_size`` bytes, ``clusters``
    of them: allocation and L2 entries) and the *preserve unit* (``unit_bits``,
    ``unit_size``, ``units``: a subcluster with extended L2 entries, else a cluster;
    ``units`` is the length of the overlay's bitmaps).
    """

    size: int
    cluster_bits: int
    extended: bool = False

    def __post_init__(self):
        self.unit_bits = self.cluster_bits - (SUBCLUSTER_BITS if self.extended else 0)
        self.cluster_size, self.clusters = self._granule(self.cluster_bits)
        self.unit_size, self.units = self._granule(self.unit_bits)

    def _granule(self, bits: int) -> tuple[int, int]:
        """(bytes, how many the virtual size spans) of a 2**bits granule."""
        return 1 << bits, ceil_div(self.size, 1 << bits)

    @property
    def entry_words(self) -> int:
        """64-bit words per L2 entry: 2 with extended L2 entries."""
        return 2 if self.extended else 1

    @property
    def l2_bits(self) -> int:
        """log2 of the entries per L2 table."""
        return self.cluster_bits - (4 if self.extended else 3)

    @property
    def l1_size(self) -> int:
        return max(1, ceil_div(self.clusters, 1 << self.l2_bits))

    @property
    def units_per_cluster_bits(self) -> int:
        return self.cluster_bits - self.unit_bits

    @property
    def refblock_entries(self) -> int:
        return self.cluster_size * 8 // (1 << REFCOUNT_ORDER)

    def max_host_clusters(self, metadata: int) -> int:
        """Most clusters the overlay can ever use: everything preserved."""
        data = self.clusters + self.l1_size + metadata
        refblocks = ceil_div(data, self.refblock_entries - 1) + 1
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
                   backing: bytes, epoch: int, backing_format: str = "raw") -> bytes:
    """Cluster-0 contents: header, our extension, backing format, backing name.

    ``backing_format`` is "raw" (the replica image) or "qcow2" (a history layer
    backed by the next newer one, nbd_mc/secondary/history.py); both fit the same
    8 bytes, so the backing name starts at the same offset either way."""
    fmt = backing_format.encode()
    exts = b"".join([
        EXT.pack(EXT_NBD_MC, NBD_MC_EXT.size), NBD_MC_EXT.pack(epoch, NBD_MC_EXT_VERSION),
        EXT.pack(EXT_BACKING_FORMAT, len(fmt)), fmt.ljust(8, b"\0"),
        EXT.pack(EXT_END, 0),
    ])
    backing_offset = HEADER_LENGTH + len(exts)
    incompatible = INCOMPAT_EXTENDED_L2 if geo.extended else 0
    head = HEADER.pack(MAGIC, 3, backing_offset, len(backing), geo.cluster_bits, geo.size,
                       0, geo.l1_size, l1_offset, rt_offset, rt_clusters, 0, 0,
                       incompatible, 0, 0, REFCOUNT_ORDER, HEADER_LENGTH)
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


def create(path: str, image_path: str, size: int, cluster_size: int = 65536,
           epoch: int = 0, subclusters: bool = False, backing_format: str = "raw",
           durable: bool = True) -> None:
    """Create an empty overlay atomically (temp file, fsync, rename; without
    ``durable`` no syncs: a history layer of a group that only survives kill -9).

    Layout: header, refcount table (sized for the largest the overlay can grow, so it
    never has to move), L1 table, then the refcount blocks that count the metadata.
    Everything past the header and the first refcount block is a sparse hole.
    ``subclusters`` selects extended L2 entries (undo granularity 1/32 cluster).
    """
    bits = cluster_bits_of(cluster_size)
    if subclusters and bits < MIN_EXTENDED_CLUSTER_BITS:
        raise ValueError(f"subclusters need a cluster size of at least "
                         f"{1 << MIN_EXTENDED_CLUSTER_BITS} (got {cluster_size})")
    geo = Geometry(size, bits, subclusters)
    backing = backing_name_for(path, image_path).encode()
    if len(backing) > 1023:
        raise ValueError("backing file name longer than 1023 bytes")
    C = geo.cluster_size
    l1_clusters = ceil_div(geo.l1_size * 8, C)
    rt_clusters = 1
    while True:  # the refcount table must cover every cluster the file may ever hold
        metadata = 1 + rt_clusters + l1_clusters
        blocks = ceil_div(geo.max_host_clusters(metadata), geo.refblock_entries)
        need = ceil_div(blocks * 8, C)
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
        pwrite_all(fd, [_encode_header(geo, l1_offset, rt_offset, rt_clusters, backing, epoch,
                                       backing_format)], 0)
        pwrite_all(fd, [pack_u64s([(first_block + i) * C for i in range(nblocks)])], rt_offset)
        pwrite_all(fd, [REFCOUNT_ONE * used], first_block * C)
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def rebase(path: str, backing_path: str, backing_format: str, durable: bool) -> None:
    """Point the overlay at ``path`` to a new backing file (a history layer gets the
    newer layer that now sits between it and the image, or the image again).

    One pwrite of the header region, which lies within the first 4 KiB: a page is
    replaced in the page cache whole, so kill -9 leaves the old name or the new one.
    Only the backing fields and name change; everything else is re-encoded as read.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        lay = read_layout(fd, path, readonly=True, expected_backing_format=backing_format)
        h = lay.header
        backing = backing_name_for(path, backing_path).encode()
        new = _encode_header(lay.geo, h.l1_table_offset, h.refcount_table_offset,
                             h.refcount_table_clusters, backing, lay.epoch or 0, backing_format)
        old_end = h.backing_file_offset + h.backing_file_size
        if len(new) > 4096:
            raise ValueError("backing file name too long for a history layer")
        pwrite_all(fd, [new + bytes(max(0, old_end - len(new)))], 0)
        if durable:
            os.fdatasync(fd)
    finally:
        os.close(fd)


@dataclass
class Layout:
    """What validation found in a file: the starting values of an overlay's state
    (UndoOverlay's state block says what each field means once it is live)."""

    header: Header
    geo: Geometry
    backing: str = ""
    backing_format: str | None = None
    epoch: int | None = None
    epoch_offset: int | None = None
    refblocks: dict = field(default_factory=dict)
    refcount_capacity: int = 0
    permanent: set = field(default_factory=set)
    l1: list = field(default_factory=list)
    tables: set = field(default_factory=set)
    bitmap: mmap.mmap | bytearray = field(default_factory=bytearray)
    preserved: int = 0
    clusters_touched: int = 0
    data_units: int = 0
    host_clusters: int = 0
    unmarked_hosts: bool = False
    top: int = 0


def read_layout(fd: int, path: str, *, expected_size: int | None = None,
                expected_image: str | None = None, readonly: bool = False,
                expected_backing_format: str = "raw") -> Layout:
    """Validate the overlay open at ``fd`` and return its layout (reads only).

    Everything a writer could trip over is refused with CorruptOverlay: a bad
    header, features we do not write, a backing file other than the image, a
    refcount block on other metadata, and any L1/L2 reference that is misaligned,
    past the end of the file, shared, or not counted exactly once.
    """
    r = _Reader(fd, path, readonly)
    r.expected_backing_format = expected_backing_format
    return r.read(expected_size, expected_image)


class _Reader:
    """One validation pass over a file (the working state of ``read_layout``)."""

    def __init__(self, fd: int, path: str, readonly: bool):
        self.fd, self.path, self.readonly = fd, path, readonly
        self.refcache: dict = {}
        self.referenced: set = set()
        self.expected_backing_format = "raw"

    def read(self, expected_size, expected_image) -> Layout:
        fd, path = self.fd, self.path
        self.file_size = os.fstat(fd).st_size
        raw = os.pread(fd, 4096, 0)
        if len(raw) < HEADER.size:
            raise CorruptOverlay(f"{path}: truncated header ({len(raw)} bytes)")
        h = Header.parse(raw)
        self._check_header(h)
        geo = Geometry(h.size, h.cluster_bits, bool(h.incompatible & INCOMPAT_EXTENDED_L2))
        lay = self.lay = Layout(header=h, geo=geo)
        cluster0 = os.pread(fd, geo.cluster_size, 0)
        self._parse_extensions(cluster0, h)
        if h.backing_file_offset:
            lay.backing = cluster0[h.backing_file_offset:h.backing_file_offset
                                   + h.backing_file_size].decode("utf-8", "replace")
        if expected_size is not None and h.size != expected_size:
            raise CorruptOverlay(
                f"{path}: overlay size {h.size} does not match image size {expected_size}")
        if expected_image is not None:
            self._check_backing(expected_image)
        self._read_refcounts(h)
        self._read_tables(h)
        return lay

    def _check_header(self, h: Header) -> None:
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
        known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_EXTENDED_L2
        if h.incompatible & ~known:
            raise CorruptOverlay(f"{where}: unsupported incompatible features {h.incompatible:#x}")
        if h.incompatible & INCOMPAT_EXTENDED_L2 and h.cluster_bits < MIN_EXTENDED_CLUSTER_BITS:
            raise CorruptOverlay(f"{where}: extended L2 entries with clusters below 16 KiB")
        if h.refcount_order != REFCOUNT_ORDER:
            raise CorruptOverlay(f"{where}: refcount_order {h.refcount_order}; only 16-bit refcounts")
        if h.header_length < 104:
            raise CorruptOverlay(f"{where}: header_length {h.header_length} too small")
        C = 1 << h.cluster_bits
        for name, off in (("L1 table", h.l1_table_offset), ("refcount table", h.refcount_table_offset)):
            if off % C or off == 0:
                raise CorruptOverlay(f"{where}: {name} offset {off:#x} not cluster aligned")
        geo = Geometry(h.size, h.cluster_bits, bool(h.incompatible & INCOMPAT_EXTENDED_L2))
        if h.l1_size < geo.l1_size:
            raise CorruptOverlay(f"{where}: L1 table too small for the virtual size")
        if h.refcount_table_offset + h.refcount_table_clusters * C > self.file_size:
            raise CorruptOverlay(f"{where}: truncated (refcount table past end of file)")
        if h.l1_table_offset + h.l1_size * 8 > self.file_size:
            raise CorruptOverlay(f"{where}: truncated (L1 table past end of file)")

    def _parse_extensions(self, cluster0: bytes, h: Header) -> None:
        lay = self.lay
        off = h.header_length
        while off + EXT.size <= len(cluster0):
            etype, elen = EXT.unpack_from(cluster0, off)
            data_off = off + EXT.size
            if etype == EXT_END:
                break
            if data_off + elen > len(cluster0):
                raise CorruptOverlay(f"{self.path}: header extension runs past the header cluster")
            if etype == EXT_BACKING_FORMAT:
                lay.backing_format = cluster0[data_off:data_off + elen].decode("ascii", "replace")
            elif etype == EXT_NBD_MC and elen >= NBD_MC_EXT.size:
                lay.epoch, _version = NBD_MC_EXT.unpack_from(cluster0, data_off)
                lay.epoch_offset = data_off
            off = data_off + ((elen + 7) & ~7)

    def _check_backing(self, expected_image: str) -> None:
        lay = self.lay
        if not lay.backing:
            raise CorruptOverlay(f"{self.path}: has no backing file (expected {expected_image})")
        resolved = os.path.realpath(resolve_backing(self.path, lay.backing))
        if resolved != os.path.realpath(expected_image):
            raise CorruptOverlay(
                f"{self.path}: backing file is {lay.backing!r}, expected {expected_image}")
        want = self.expected_backing_format
        if lay.backing_format not in ((None, "raw") if want == "raw" else (want,)):
            raise CorruptOverlay(f"{self.path}: backing format is {lay.backing_format}, "
                                 f"expected {want}")
        if lay.epoch_offset is None and not self.readonly:
            raise CorruptOverlay(f"{self.path}: not an nbd-mc overlay (no epoch record)")

    def _read_refcounts(self, h: Header) -> None:
        """Read the refcount table; remember the blocks and the metadata clusters."""
        lay, geo = self.lay, self.lay.geo
        C = geo.cluster_size
        entries = unpack_u64s(os.pread(self.fd, h.refcount_table_clusters * C,
                                       h.refcount_table_offset))
        rt_first = h.refcount_table_offset // C
        l1_first = h.l1_table_offset // C
        permanent = {0, *range(rt_first, rt_first + h.refcount_table_clusters),
                     *range(l1_first, l1_first + ceil_div(h.l1_size * 8, C))}
        for i, e in enumerate(entries):
            off = e & OFFSET_MASK
            if e & ~OFFSET_MASK or off % C:
                raise CorruptOverlay(f"{self.path}: refcount table entry {i} is invalid ({e:#x})")
            if off:
                if off + C > self.file_size:
                    raise CorruptOverlay(f"{self.path}: truncated (refcount block {i} past end of file)")
                if off // C in permanent:  # we would write refcounts into other metadata
                    raise CorruptOverlay(
                        f"{self.path}: refcount block {i} at {off:#x} overlaps other metadata")
                permanent.add(off // C)
                lay.refblocks[i] = off
        lay.permanent = permanent
        lay.refcount_capacity = len(entries) * geo.refblock_entries
        needed = geo.max_host_clusters(len(permanent))
        if not self.readonly and lay.refcount_capacity < needed:
            raise CorruptOverlay(
                f"{self.path}: refcount table covers {lay.refcount_capacity} clusters, "
                f"{needed} may be needed; recreate the overlay with nbd-mc")

    def _refcount(self, host_cluster: int) -> int:
        geo = self.lay.geo
        block = host_cluster // geo.refblock_entries
        off = self.lay.refblocks.get(block)
        if off is None:
            return 0
        data = self.refcache.get(block)
        if data is None:
            data = self.refcache[block] = os.pread(self.fd, geo.cluster_size, off)
        return U16.unpack_from(data, (host_cluster % geo.refblock_entries) * 2)[0]

    def _read_tables(self, h: Header) -> None:
        """Read L1 and every L2 table; check each reference against refcounts."""
        lay, geo = self.lay, self.lay.geo
        C = geo.cluster_size
        lay.l1 = unpack_u64s(os.pread(self.fd, h.l1_size * 8, h.l1_table_offset))
        lay.bitmap = zeroed_bitmap(geo.units)
        top = 0
        for i, e in enumerate(lay.l1):
            off = e & OFFSET_MASK
            if not off:
                continue
            if e & ~(OFFSET_MASK | OFLAG_COPIED) or off % C:
                raise CorruptOverlay(f"{self.path}: L1 entry {i} is invalid ({e:#x})")
            if not e & OFLAG_COPIED:  # refcount 1 (checked below) requires COPIED
                raise CorruptOverlay(f"{self.path}: L1 entry {i} lacks the COPIED flag ({e:#x})")
            self._check_reference(off, f"L2 table {i}")
            lay.tables.add(i)
            top = max(top, off // C)
            words = unpack_u64s(os.pread(self.fd, C, off))
            w = geo.entry_words
            base = i << geo.l2_bits
            for j in range(1 << geo.l2_bits):
                entry = words[j * w]
                sub = words[j * w + 1] if w == 2 else 0
                if entry or sub:
                    top = max(top, self._read_entry(entry, sub, base + j))
        lay.top = max(top + 1, max(lay.permanent) + 1)

    def _read_entry(self, entry: int, sub: int, guest: int) -> int:
        """Check one L2 entry, mark its preserved units; returns its host cluster."""
        lay, geo = self.lay, self.lay.geo
        if guest >= geo.clusters:
            raise CorruptOverlay(f"{self.path}: L2 entry past the virtual size")
        if entry & OFLAG_COMPRESSED:
            raise CorruptOverlay(f"{self.path}: compressed clusters are not supported")
        reserved = L2_RESERVED | (OFLAG_ZERO if geo.extended else 0)
        if entry & reserved:
            raise CorruptOverlay(f"{self.path}: L2 entry for cluster {guest} is invalid ({entry:#x})")
        data = entry & OFFSET_MASK
        alloc, zero = sub & ALL_SUBCLUSTERS, sub >> 32
        if alloc & zero:
            raise CorruptOverlay(f"{self.path}: L2 entry for cluster {guest}: subclusters both "
                                 f"allocated and zero ({sub:#x})")
        if alloc and not data:
            raise CorruptOverlay(f"{self.path}: L2 entry for cluster {guest}: allocated "
                                 f"subclusters without a host cluster ({sub:#x})")
        if data:
            if not entry & OFLAG_COPIED:  # as for L1: refcount 1 requires COPIED
                raise CorruptOverlay(f"{self.path}: L2 entry for cluster {guest} lacks "
                                     f"the COPIED flag ({entry:#x})")
            # QEMU writes only the subclusters it needs: with extended L2 entries a
            # data cluster may end past the end of the file, but not where one of
            # its allocated subclusters lies (that data would be lost)
            self._check_reference(data, f"cluster {guest}", may_pass_eof=geo.extended)
            if alloc and data + (alloc.bit_length() << geo.unit_bits) > self.file_size:
                raise CorruptOverlay(f"{self.path}: truncated (cluster {guest} at {data:#x} "
                                     f"is past end of file)")
            lay.host_clusters += 1
        if not geo.extended:
            if data or entry & OFLAG_ZERO:  # else unallocated: reads the backing file
                self._mark(guest, 1, 1 if data else 0)
                lay.clusters_touched += 1
        else:
            marks = alloc | zero
            lay.clusters_touched += bool(marks)
            if data and not marks:
                lay.unmarked_hosts = True  # a host cluster we must find before reusing
            base = guest << SUBCLUSTER_BITS
            if marks == ALL_SUBCLUSTERS and base + 32 <= geo.units:  # byte aligned
                lay.bitmap[base >> 3:(base >> 3) + 4] = b"\xff" * 4
                lay.preserved += 32
                lay.data_units += bin(alloc).count("1")
                return data // geo.cluster_size
            for x in range(32):
                if (marks >> x) & 1 and base + x < geo.units:
                    self._mark(base + x, 1, (alloc >> x) & 1)
        return data // geo.cluster_size

    def _mark(self, unit: int, n: int, data: int) -> None:
        lay = self.lay
        lay.bitmap[unit >> 3] |= 1 << (unit & 7)
        lay.preserved += n
        lay.data_units += data

    def _check_reference(self, off: int, what: str, may_pass_eof: bool = False) -> None:
        C = self.lay.geo.cluster_size
        if off % C:
            raise CorruptOverlay(f"{self.path}: {what} at {off:#x} is not cluster aligned")
        if off >= self.file_size or (off + C > self.file_size and not may_pass_eof):
            raise CorruptOverlay(f"{self.path}: truncated ({what} at {off:#x} is past end of file)")
        cluster = off // C
        if cluster in self.lay.permanent or cluster in self.referenced:
            raise CorruptOverlay(f"{self.path}: {what} at {off:#x} overlaps other metadata or data")
        if self._refcount(cluster) != 1:
            raise CorruptOverlay(
                f"{self.path}: {what} at {off:#x} has refcount {self._refcount(cluster)}, expected 1")
        self.referenced.add(cluster)
