"""One disk of the group: its replica image, its undo overlay, and the rules for
the files a group may be built from.

A ``Disk`` preserves (copy-before-write) what a request is about to overwrite and
reads the committed view; it knows nothing of epochs, which belong to the group
(nbd_mc/secondary/engine.py).  The checks on disk specs and images live here too, so that
`serve`, recovery and `nbd-mc inspect` state them once.
"""

from __future__ import annotations

import os
import threading

from .. import qcow2
from ..errors import BadRequest, StateError
from ..fileio import runs
from ..statedir import StateDir
from .state import DiskState, GroupState, load
from .sync import GroupSync

#: The read-only export of a disk as of the last commit is NAME + this suffix
#: (which is why a disk name may not contain '@').
COMMITTED_SUFFIX = "@committed"
SECTOR = 512


def subclusters_for(cluster_size: int, subclusters: bool | None) -> bool:
    """The undo granularity of a new overlay: subclusters (1/32 cluster, extended L2
    entries) unless turned off or the cluster is smaller than qcow2 allows for them."""
    if subclusters is None:
        return qcow2.subclusters_possible(cluster_size)
    if subclusters and not qcow2.subclusters_possible(cluster_size):
        raise StateError(f"--subclusters on needs a cluster size of at least 16K "
                         f"(got {cluster_size})")
    return subclusters


def undo_status(overlay_epoch: int | None, committed: int) -> str:
    """What the undo data of an overlay returning to ``overlay_epoch`` is, when
    ``committed`` is the committed epoch.  The one statement of the rule that
    recovery, rollback and `nbd-mc inspect` follow:

    ``current``  it returns to the committed epoch: undo data of the open epoch,
                 applied by a rollback or a recovery;
    ``stale``    it returns to the epoch before: a crash (or a failed drop) fell
                 between persisting a commit and dropping; it belongs to an epoch
                 that is committed, so it is dropped, never applied;
    ``foreign``  anything else (no epoch record, a future or far older epoch):
                 not ours to apply or drop, the group refuses to open.
    """
    if overlay_epoch is not None and overlay_epoch == committed:
        return "current"
    if overlay_epoch is not None and overlay_epoch == committed - 1:
        return "stale"
    return "foreign"


class Disk:
    """One replica image and its undo overlay.

    State: ``spec``, ``name``, ``size``, ``cluster_size``, ``bits``, ``fd``,
    ``overlay`` and ``power`` are set once here and never rebound.  ``_lock``
    serialises preserves of this disk (the overlay's allocation and tables);
    reads of ``overlay.is_preserved`` take no lock (a cluster, once published as
    preserved, stays so until a drop, and drops run with the group's gate
    closed).  ``overlay_sync`` has its own condition.
    """

    def __init__(self, spec: DiskState, durability: str):
        self.spec = spec
        self.name = spec.name
        self.size = spec.size
        self.cluster_size = spec.cluster_size
        self.fd = qcow2.open_image(spec.image)
        self._lock = threading.Lock()
        power = durability == "power"
        self.overlay_sync = GroupSync(lambda: self.overlay.fd)
        #: The open history layer (an UndoOverlay) or None; set and cleared by the
        #: group's History with the gate closed, read by preserve_layer.
        self.layer = None
        self.layer_sync = GroupSync(lambda: self.layer.fd)
        try:
            self.overlay = qcow2.UndoOverlay(
                spec.overlay, self.fd, expected_size=spec.size, expected_image=spec.image,
                barrier=self.overlay_sync if power else None)
        except BaseException:
            os.close(self.fd)
            raise
        self.power = power
        # Bookkeeping is per preserve unit (the overlay's): a subcluster or a cluster.
        self.bits = self.overlay.unit_bits

    def preserve(self, offset: int, length: int) -> None:
        """Copy-before-write: preserve every not-yet-preserved unit of
        [offset, offset+length) before a request overwrites it.

        A unit is the overlay's preserve unit (a subcluster, or a whole cluster).
        Exactly one request preserves a unit: the disk lock makes a concurrent
        request touching the same unit wait until it is in the overlay, and
        re-checking under the lock finds it preserved.  With durability ``power``
        the overlay must also be on disk before the image is overwritten, even
        when another request did the preserving: the sync is shared among all
        requests waiting at the same time.
        """
        self._preserve_into(self.overlay, self.overlay_sync, offset, length)

    def preserve_layer(self, offset: int, length: int) -> None:
        """The same copy-before-write into the open history layer (the old data as
        of the newest retained checkpoint, nbd_mc/secondary/history.py): its units
        stay preserved across commits until the next retained checkpoint, so only
        the first write after a checkpoint copies."""
        layer = self.layer
        if layer is not None:
            self._preserve_into(layer, self.layer_sync, offset, length)

    def _preserve_into(self, ov, sync, offset: int, length: int) -> None:
        if length <= 0:
            return
        first = offset >> self.bits
        last = (offset + length - 1) >> self.bits
        if not self.power and ov.all_preserved(first, last):
            return
        with self._lock:
            todo = ov.not_preserved(first, last)
            for start, n in runs(todo):
                ov.preserve(start, n)
            if todo:
                sync.note_write()
            # Under the lock: a cluster another request preserved has been counted.
            upto = sync.written
        if self.power:
            sync.wait_durable(upto)

    def read_committed(self, view: memoryview, offset: int) -> None:
        """The committed view, safe against a concurrent preserve + overwrite.

        A cluster read from the image is re-checked afterwards: if it became
        preserved meanwhile, an overwrite may have raced the read, so read again
        (now from the overlay).  Preserve publishes before the image write starts.
        """
        first = offset >> self.bits
        last = (offset + len(view) - 1) >> self.bits
        while True:
            if self.overlay.all_preserved(first, last):  # bits stay set: nothing can race
                self.overlay.read_committed(view, offset)
                return
            before = self.overlay.not_preserved(first, last)
            self.overlay.read_committed(view, offset)
            if all(not self.overlay.is_preserved(c) for c in before):
                return

    def status(self) -> dict:
        return {
            "name": self.name,
            "image": self.spec.image,
            "overlay": self.spec.overlay,
            "size": self.size,
            "cluster_size": self.cluster_size,
            "preserved_clusters": self.overlay.clusters_touched,
            "undo_bytes": self.overlay.undo_bytes,
            "subclusters": self.overlay.subclusters,
            "unit_size": self.overlay.unit_size,
            "preserved_units": self.overlay.preserved,
        }

    def close(self) -> None:
        self.overlay.close()
        os.close(self.fd)


def parse_disk_spec(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (name = the file's stem)."""
    if "=" in spec:
        name, path = spec.split("=", 1)
    else:
        path = spec
        name = os.path.splitext(os.path.basename(path))[0]
    if not name or "@" in name or "/" in name or not path:
        raise BadRequest(f"bad disk {spec!r}: use NAME=PATH or PATH; names may not contain '@' or '/'")
    return name, os.path.abspath(path)


def image_size(path: str) -> int:
    """The size of a replica image; StateError saying why it is not usable."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StateError(f"image {path} does not exist") from None
    except OSError as e:
        raise StateError(f"image {path}: {os.strerror(e.errno)}") from None
    if not os.path.isfile(path):
        raise StateError(f"image {path} is not a regular file")
    return st.st_size


def check_disk(d: DiskState) -> None:
    """The image exists and still has the size the group was created with."""
    size = image_size(d.image)
    if size != d.size:
        raise StateError(
            f"image {d.image} of disk {d.name} is {size} bytes, but the group was created "
            f"with {d.size} bytes (resized behind nbd-mc's back?)")


def check_disks(state: GroupState) -> None:
    """Every image of the group exists with its size (check_disk)."""
    for d in state.disks:
        check_disk(d)


def plan_group(state_dir: str, disks: list[tuple[str, str]] | None,
               cluster_size: int | None) -> tuple[GroupState, bool]:
    """The state to serve from ``state_dir`` and whether it is new; changes nothing.

    Refuses a disk list that differs from the one the directory was made for.
    """
    state = load(state_dir) if os.path.isdir(state_dir) else None
    if state is not None:
        if disks:
            want = [(n, os.path.realpath(p)) for n, p in disks]
            have = [(d.name, os.path.realpath(d.image)) for d in state.disks]
            if want != have:
                raise StateError(
                    f"state directory {state_dir} belongs to disks "
                    f"{', '.join(f'{n}={p}' for n, p in have)}; you gave "
                    f"{', '.join(f'{n}={p}' for n, p in want)}")
        if cluster_size and any(d.cluster_size != cluster_size for d in state.disks):
            raise StateError(
                f"state directory {state_dir} uses cluster size {state.disks[0].cluster_size}, "
                f"not {cluster_size}")
        check_disks(state)
        return state, False
    if not disks:
        raise StateError(f"no nbd-mc state in {state_dir}; give the disks to serve")
    names = [n for n, _ in disks]
    if len(set(names)) != len(names):
        raise StateError(f"disk names must be unique: {', '.join(names)}")
    cs = cluster_size or 65536
    qcow2.cluster_bits_of(cs)
    specs = []
    for name, path in disks:
        size = image_size(path)
        if size == 0 or size % SECTOR:
            raise StateError(f"image {path} is {size} bytes; the size must be a non-zero "
                             f"multiple of {SECTOR} (QEMU's sector size)")
        overlay = StateDir(state_dir).overlay(name)
        specs.append(DiskState(name, path, overlay, size, cs))
    return GroupState(disks=specs), True
