"""The consistency group and its epochs: the heart of the secondary.

One group serves one or more disks with ONE epoch.  Every request that touches
undo state passes the *gate*; a commit, rollback or failover closes the gate,
which waits for requests in flight and holds new ones back, so no write slips
between epochs.  Before a write reaches an image, every cluster it touches that is
not yet preserved in this epoch is copied into the disk's undo overlay (modelled on
QEMU's copy-before-write filter).

Crash safety comes from ordering, never from luck:
  commit:   [power: images durable] -> state file says N -> each overlay dropped,
            recording "returns to N" (a crash in between leaves stale undo, which
            recovery recognises by its older epoch and drops, never applies);
  rollback: apply every overlay -> images durable -> drop (apply is idempotent, so
            a crash at any point is repaired by applying again).
"""

from __future__ import annotations

import errno
import os
import threading
import time
import uuid
from contextlib import contextmanager

from . import crashpoints, qcow2
from .errors import (BadRequest, EpochMismatch, Fenced, IOFailure, NbdMcError, NotProtected,
                     StateError, io_failure)
from .fileio import pread_into, punch_hole, pwrite_all, runs
from .state import DirLock, DiskState, GroupState, StateFile, load, save
from .sync import Gate, GroupSync

DURABILITY_MODES = ("process", "power")
SECTOR = 512
#: The read-only export of a disk as of the last commit is NAME + this suffix
#: (which is why a disk name may not contain '@').
COMMITTED_SUFFIX = "@committed"
#: Seconds without a commit after which a protected group is reported stale, until a
#: primary says how often it checkpoints (new-session).
DEFAULT_STALE_AFTER = 30.0


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
        if length <= 0:
            return
        first = offset >> self.bits
        last = (offset + length - 1) >> self.bits
        ov = self.overlay
        if not self.power:
            if first == last:
                if ov.is_preserved(first):
                    return
            elif all(ov.is_preserved(c) for c in range(first, last + 1)):
                return
        with self._lock:
            todo = [c for c in range(first, last + 1) if not ov.is_preserved(c)]
            for start, n in runs(todo):
                ov.preserve(start, n)
            if todo:
                self.overlay_sync.note_write()
            # Under the lock: a cluster another request preserved has been counted.
            upto = self.overlay_sync.written
        if self.power:
            self.overlay_sync.wait_durable(upto)

    def read_committed(self, view: memoryview, offset: int) -> None:
        """The committed view, safe against a concurrent preserve + overwrite.

        A cluster read from the image is re-checked afterwards: if it became
        preserved meanwhile, an overwrite may have raced the read, so read again
        (now from the overlay).  Preserve publishes before the image write starts.
        """
        first = offset >> self.bits
        last = (offset + len(view) - 1) >> self.bits
        while True:
            before = [c for c in range(first, last + 1) if not self.overlay.is_preserved(c)]
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
        overlay = os.path.join(os.path.abspath(state_dir), f"{name}.undo.qcow2")
        specs.append(DiskState(name, path, overlay, size, cs))
    return GroupState(disks=specs), True


class Group:
    """A consistency group: one epoch for all of its disks.

    State, and what guards it:

    ``state`` (GroupState: committed, generation, fenced, role, handoff)
        changed only by ``_persist``, which runs under ``_control`` (one
        checkpoint operation at a time) and, for every change the I/O path
        depends on, with ``gate`` closed.  Requests read it only through
        ``_write_generation`` and ``_undo``, recomputed by
        ``_refresh_fast_path`` under the same protection.
    ``broken``
        set (never cleared) under ``_control`` with the gate closed.
    ``disks``, ``by_name``, ``durability``, ``state_dir``, ``lock``
        set in the constructor, then read-only.
    ``stats``
        counters, updated under ``_stats_lock``: with nbdkit's parallel thread
        model several requests update them at once.
    ``recovered``
        the report of the recovery the constructor ran; read-only after.
    """

    def __init__(self, state_dir: str, disks: list[tuple[str, str]] | None = None, *,
                 cluster_size: int | None = None, durability: str | None = None,
                 lock: bool = True, subclusters: bool | None = None):
        """``durability`` None keeps the mode the group was last served with (a
        restart must not silently weaken a power-safe group).  ``subclusters`` is
        fixed when the group is created (None: on where the cluster size allows)."""
        if durability not in DURABILITY_MODES + (None,):
            raise BadRequest(f"durability must be one of {', '.join(DURABILITY_MODES)}")
        self.state_dir = os.path.abspath(state_dir)
        state, new = plan_group(self.state_dir, disks, cluster_size)
        self.durability = durability or state.durability
        changed = state.durability != self.durability
        state.durability = self.durability
        if not state.group_id:  # a new group, or one made before groups had an identity
            state.group_id = uuid.uuid4().hex[:16]
            changed = True
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.lock = DirLock(self.state_dir) if lock else None
        try:
            if self.lock:
                self.lock.record_pid()
            if new:
                for d in state.disks:  # overlays first: the state file makes the group exist
                    qcow2.create(d.overlay, d.image, d.size, d.cluster_size, epoch=0,
                                 subclusters=subclusters_for(d.cluster_size, subclusters))
                save(self.state_dir, state)
            elif changed and lock:
                save(self.state_dir, state)  # an explicit new mode (or a new id) is remembered
            self.state = state
            self.state_file = StateFile(self.state_dir)
            if state.handoff:
                raise StateError(
                    f"the disks of {self.state_dir} were handed out by an instant failover; the new "
                    f"primary owns the overlays ({', '.join(d.overlay for d in state.disks)})")
            self.disks = self._open_disks(state)
            if subclusters is not None and not new:
                self._check_subclusters(subclusters)
        except BaseException:
            if self.lock:
                self.lock.release()
            raise
        self.by_name = {d.name: d for d in self.disks}
        self.gate = Gate()
        self._control = threading.Lock()  # one checkpoint operation at a time
        self._stats_lock = threading.Lock()
        self.broken: str | None = None
        #: Seconds without a commit after which status calls protection stale;
        #: a primary sets it for its session (new_session), in memory only.
        self.stale_after = DEFAULT_STALE_AFTER
        self._refresh_fast_path()
        self.stats = {"writes": 0, "zeroes": 0, "trims": 0, "bytes_written": 0,
                      "commits": 0, "rollbacks": 0, "refused_writes": 0, "errors": 0}
        self.stats["refused_commits"] = 0  # commits refused or failed (metrics)
        try:
            self.recovered = self._recover()
        except BaseException:  # a refused or failed recovery keeps no fd and no lock
            self.close()
            raise

    def _check_subclusters(self, subclusters: bool) -> None:
        for d in self.disks:
            if d.overlay.subclusters != subclusters:
                for x in self.disks:
                    x.close()
                self.disks = []
                raise StateError(
                    f"state directory {self.state_dir} was created with --subclusters "
                    f"{'on' if d.overlay.subclusters else 'off'}; the undo granularity is "
                    f"fixed when the group is created")

    def _open_disks(self, state: GroupState) -> list[Disk]:
        disks = []
        try:
            for spec in state.disks:
                disks.append(Disk(spec, self.durability))
        except BaseException:
            for d in disks:
                d.close()
            raise
        return disks

    # --- recovery --------------------------------------------------------------
    def _recover(self) -> dict:
        """Bring every disk to exactly the committed epoch (restart after a crash).

        An overlay returning to the committed epoch holds undo data of the open
        epoch: apply it.  One returning to an older epoch is stale (the crash fell
        between persisting the commit and dropping): drop it, never apply.
        """
        committed = self.state.committed
        report = {"committed": committed, "restored_clusters": 0, "stale_dropped": []}
        for d in self.disks:
            if undo_status(d.overlay.epoch, committed) == "foreign":
                raise StateError(
                    f"overlay {d.spec.overlay} returns to epoch {d.overlay.epoch}, but the state "
                    f"file says {committed} is committed: the overlay does not belong to this state")
        # Also with nothing preserved when a crash in the middle of a preserve left
        # allocated but unreferenced clusters: dropping rewrites the refcounts, so a
        # recovered group's overlays are clean (qemu-img check exit 0, not 3 for leaks).
        to_drop = [d for d in self.disks
                   if undo_status(d.overlay.epoch, committed) == "stale" or not d.overlay.is_clean()]
        for d in self.disks:
            if undo_status(d.overlay.epoch, committed) == "current":
                report["restored_clusters"] += self._checked_apply(d)
        if to_drop and crashpoints.ARMED:  # (a clean start has nothing in between)
            crashpoints.reached("recover.after-apply")
        for d in self.disks:
            if d in to_drop:
                if undo_status(d.overlay.epoch, committed) == "stale":
                    report["stale_dropped"].append(d.name)
                # Recovery is rare and may run offline (`nbd-mc recover` is not told
                # the durability mode): always order the drop for power loss, or a
                # torn drop could leave referenced clusters with refcount 0.
                saved, d.overlay.barrier = d.overlay.barrier, d.overlay.sync
                try:
                    d.overlay.drop(committed)
                finally:
                    d.overlay.barrier = saved
        return report

    def _checked_apply(self, d: Disk) -> int:
        """Apply a disk's undo data; returns how many clusters it touched."""
        clusters = d.overlay.clusters_touched
        n = d.overlay.apply()
        if n:
            try:
                os.fdatasync(d.fd)
            except OSError as e:
                raise io_failure(f"syncing image {d.spec.image}", e) from None
        return clusters if n else 0

    # --- properties ---------------------------------------------------------------
    @property
    def committed(self) -> int:
        return self.state.committed

    @property
    def keeps_undo(self) -> bool:
        """Whether writes preserve old data first (the status field ``protected``):
        from the first commit on, while this node is a secondary."""
        return self.state.committed > 0 and self.state.role == "secondary"

    @property
    def generation(self) -> int:
        return self.state.generation

    def disk(self, name: str) -> Disk:
        return self.by_name[name]

    # --- the I/O path ----------------------------------------------------------------
    def _check_writable(self, generation: int) -> None:
        """Split-brain guard: a fenced group takes writes from nobody, a promoted one
        only from connections opened after the failover."""
        refusal = None
        if self.state.handoff:
            refusal = "the disks were handed out by an instant failover"
        elif self.state.fenced:
            refusal = f"the group is fenced (generation {self.state.generation})"
        elif generation != self.state.generation:
            refusal = "this connection was opened before the last fence or protect session"
        if refusal:
            self._count("refused_writes")
            raise Fenced(f"write refused: {refusal}")
        if self.broken:
            raise IOFailure(f"group is unusable until restart: {self.broken}")

    @contextmanager
    def io(self):
        self.gate.enter()
        try:
            yield
        finally:
            self.gate.leave()

    def write(self, disk: Disk, generation: int, buf, offset: int, fua: bool = False) -> None:
        """The hot path: kept flat (no context managers) because at 4 KiB the Python
        work per request is the cost."""
        gate = self.gate
        gate.enter()
        try:
            if generation != self._write_generation:
                self._check_writable(generation)
            if self._undo:
                disk.preserve(offset, len(buf))
            if crashpoints.ARMED:
                crashpoints.reached("write.before-image")
            try:
                pwrite_all(disk.fd, [buf], offset)
                if crashpoints.ARMED:
                    crashpoints.reached("write.after-image")
                if fua:
                    os.fdatasync(disk.fd)
            except OSError as e:
                raise io_failure(f"writing image {disk.spec.image}", e) from None
            with self._stats_lock:
                self.stats["writes"] += 1
                self.stats["bytes_written"] += len(buf)
        finally:
            gate.leave()

    def zero(self, disk: Disk, generation: int, count: int, offset: int, *,
             fua: bool = False, fast: bool = False, trim: bool = False) -> None:
        """Write zeroes (or trim): both overwrite data, so both preserve first."""
        with self.io():
            if generation != self._write_generation:
                self._check_writable(generation)
            if self._undo:
                disk.preserve(offset, count)
            if crashpoints.ARMED:
                crashpoints.reached("zero.before-image")
            try:
                try:
                    punch_hole(disk.fd, offset, count, fallback=not (fast or trim))
                except OSError as e:
                    if not (trim and e.errno in (errno.EOPNOTSUPP, errno.ENOSYS)):
                        raise  # a trim the file system can't do is simply not done
                if fua:
                    os.fdatasync(disk.fd)
            except OSError as e:
                raise io_failure(f"zeroing image {disk.spec.image}", e) from None
            self._count("trims" if trim else "zeroes")

    def _count(self, counter: str) -> None:
        with self._stats_lock:
            self.stats[counter] += 1

    def read(self, disk: Disk, view, offset: int) -> None:
        try:
            pread_into(disk.fd, view, offset)
        except OSError as e:
            raise io_failure(f"reading image {disk.spec.image}", e) from None

    def read_committed(self, disk: Disk, view, offset: int) -> None:
        """The disk as of the last commit; refused while nothing was ever committed
        (epoch 0 is the initial synchronisation: no consistent state to show)."""
        if not self.state.committed:
            raise IOFailure(f"{disk.name}{COMMITTED_SUFFIX}: no epoch committed yet")
        with self.io():
            try:
                disk.read_committed(view, offset)
            except OSError as e:
                raise io_failure(f"reading committed view of {disk.name}", e) from None

    def flush(self, disk: Disk) -> None:
        try:
            os.fdatasync(disk.fd)
        except OSError as e:
            raise io_failure(f"flushing image {disk.spec.image}", e) from None

    # --- checkpoint operations --------------------------------------------------------
    def commit(self, epoch: int) -> dict:
        try:
            return self._commit(epoch)
        except NbdMcError:
            self.stats["refused_commits"] += 1
            raise

    def _commit(self, epoch: int) -> dict:
        with self._control:
            self._refuse_if_fenced("commit")
            if epoch == self.state.committed:
                return {"committed": epoch, "seconds": 0.0, "retry": True}
            if self.broken:
                # An overlay may still hold undo data of an epoch already committed;
                # committing on top would leave it more than one epoch behind.
                raise IOFailure(f"commit refused until restart: {self.broken}")
            if epoch != self.state.committed + 1:
                raise EpochMismatch(
                    f"cannot commit epoch {epoch}: epoch {self.state.committed} is committed, "
                    f"the open epoch is {self.state.committed + 1}")
            t0 = time.perf_counter()
            with self.gate.closed():
                if self.durability == "power":
                    for d in self.disks:
                        self.flush(d)
                if crashpoints.ARMED:
                    crashpoints.reached("commit.before-state")
                self._persist(committed=epoch, commit_time=time.time())
                if crashpoints.ARMED:
                    crashpoints.reached("commit.after-state")
                self._drop_all(epoch)
            self._count("commits")
            return {"committed": epoch, "seconds": time.perf_counter() - t0}

    def new_session(self, stale_after: float | None = None) -> dict:
        """A primary (re)attaches: NBD connections opened before now can no longer
        write (as after a fence, but the group stays writable for new ones).

        A connection of an earlier session may still hold writes in its socket (a
        secondary that hung and came back): they must not land after the resync
        that replaces them.  ``stale_after`` is how long without a commit makes this
        primary's protection stale.
        """
        with self._control:
            self._refuse_if_fenced("new-session")
            if stale_after is not None:
                if (not isinstance(stale_after, (int, float)) or isinstance(stale_after, bool)
                        or stale_after <= 0):
                    raise BadRequest("new-session: 'stale_after' must be a positive number")
                self.stale_after = float(stale_after)
            with self.gate.closed():
                self._persist(generation=self.state.generation + 1)
            return {"generation": self.state.generation, "group_id": self.state.group_id,
                    "committed": self.state.committed}

    def _refuse_if_fenced(self, what: str) -> None:
        if self.state.role == "primary":
            raise Fenced(f"{what} refused: this node was promoted to primary by a failover")
        if self.state.fenced:
            raise Fenced(f"{what} refused: the group is fenced (generation {self.state.generation})")

    def _persist(self, **changes) -> None:
        old = {k: getattr(self.state, k) for k in changes}
        for k, v in changes.items():
            setattr(self.state, k, v)
        try:
            self.state_file.save(self.state, durable=self.durability == "power")
        except OSError as e:
            for k, v in old.items():
                setattr(self.state, k, v)
            raise io_failure("writing the state file", e) from None
        finally:
            self._refresh_fast_path()

    def _refresh_fast_path(self) -> None:
        """Precompute the two facts every write checks, so the hot path compares one
        integer and reads one boolean instead of walking the state."""
        s = self.state
        usable = not (s.handoff or s.fenced or self.broken)
        self._write_generation = s.generation if usable else -1
        self._undo = self.keeps_undo

    def _drop_all(self, epoch: int) -> None:
        for i, d in enumerate(self.disks):
            if i and crashpoints.ARMED:
                crashpoints.reached("commit.between-disks")
            try:
                d.overlay.drop(epoch)
            except NbdMcError as e:
                # The commit is persisted; the stale undo is dropped on restart.  Until
                # then the in-memory overlay can't be trusted: refuse writes.
                self.broken = f"dropping undo data of {d.name} failed: {e.desc}"
                self._refresh_fast_path()
                raise

    def rollback(self) -> dict:
        with self._control:
            if self.state.role == "primary":
                raise NotProtected("rollback refused: promoted to primary, no undo data is kept")
            if not self.state.committed:
                raise NotProtected("nothing to roll back to: no epoch was committed yet "
                                   "(epoch 0 is the initial synchronisation)")
            t0 = time.perf_counter()
            with self.gate.closed():
                restored = self._rollback_locked()
            self._count("rollbacks")
            return {"committed": self.state.committed, "restored_clusters": restored,
                    "seconds": time.perf_counter() - t0}

    def _rollback_locked(self) -> int:
        restored = 0
        for i, d in enumerate(self.disks):
            if i and crashpoints.ARMED:
                crashpoints.reached("rollback.between-disks")
            # An overlay still returning to an older epoch holds undo data of an epoch
            # that is committed (a commit's drop of it failed): as in recovery, it is
            # dropped below, never applied -- applying it would take this disk back
            # one epoch further than the others.
            if undo_status(d.overlay.epoch, self.state.committed) == "current":
                restored += self._checked_apply(d)
        if crashpoints.ARMED:
            crashpoints.reached("rollback.after-apply")
        self._drop_all(self.state.committed)
        return restored

    def fence(self) -> dict:
        with self._control:
            with self.gate.closed():  # no write of an old connection is still in flight
                self._persist(generation=self.state.generation + 1, fenced=True)
            return {"generation": self.state.generation}

    def failover(self, instant: bool = False) -> dict:
        """Fence, return to the last commit, promote.  Idempotent."""
        with self._control:
            t0 = time.perf_counter()
            if self.state.role != "primary":
                if not self.state.committed:
                    raise NotProtected("failover refused: no epoch was ever committed, the "
                                       "replica holds no consistent state")
                with self.gate.closed():
                    self._persist(generation=self.state.generation + 1, fenced=True)
                    if crashpoints.ARMED:
                        crashpoints.reached("failover.after-fence")
                    if instant:
                        self._persist(role="primary", handoff="instant")
                    else:
                        self._rollback_locked()
                        if crashpoints.ARMED:
                            crashpoints.reached("failover.before-promote")
                        self._persist(role="primary", fenced=False)
            return {"committed": self.state.committed, "disks": self.handover(),
                    "seconds": time.perf_counter() - t0}

    def handover(self) -> list[dict]:
        """Which file in which format the new primary opens for each disk
        (nbd_mc/boot.py says how QEMU opens it)."""
        out = []
        for d in self.disks:
            if self.state.handoff == "instant":
                path, fmt = d.spec.overlay, "qcow2"
            else:
                path, fmt = d.spec.image, "raw"
            out.append({"name": d.name, "path": path, "format": fmt})
        return out

    @contextmanager
    def quiesced(self):
        """No checkpoint operation and no request runs while the block runs, and
        the images are synced first: for a process that ends inside the block
        (``quit`` with clients still connected)."""
        with self._control, self.gate.closed():
            for d in self.disks:
                try:
                    os.fdatasync(d.fd)
                except OSError:
                    pass  # best effort: the process is leaving either way
            yield

    @property
    def read_only(self) -> bool:
        """After an instant failover the overlays belong to the new primary."""
        return self.state.handoff == "instant"

    # --- status -----------------------------------------------------------------
    def status(self) -> dict:
        age = time.time() - self.state.commit_time if self.state.commit_time else None
        return {
            "group_id": self.state.group_id,
            "last_commit_time": self.state.commit_time or None,
            "last_commit_age": round(age, 3) if age is not None else None,
            # protected, but no commit for a while: the primary stopped checkpointing
            "stale": bool(self.keeps_undo and age is not None and age > self.stale_after),
            "committed": self.state.committed,
            "open_epoch": self.state.committed + 1,
            "protected": self.keeps_undo,
            "role": self.state.role,
            "fenced": self.state.fenced,
            "generation": self.state.generation,
            "durability": self.durability,
            "handoff": self.state.handoff,
            "broken": self.broken,
            "disks": [d.status() for d in self.disks],
            "stats": self._stats_copy(),
        }

    def _stats_copy(self) -> dict:
        with self._stats_lock:
            return dict(self.stats)

    def close(self) -> None:
        for d in self.disks:
            d.close()
        self.state_file.close()
        if self.lock:
            self.lock.release()
