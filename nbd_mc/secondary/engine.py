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

from .. import blocksize, crashpoints, qcow2
from . import history as hist, mode, writer
from ..errors import (BadRequest, EpochMismatch, Fenced, IOFailure, NbdMcError, NotProtected,
                     NotRetained, StateError, io_failure)
from ..fileio import fsync_dir, pread_into, punch_hole, pwrite_all
from .state import DirLock, GroupState, StateFile, load, save
from .sync import Gate
from .disk import COMMITTED_SUFFIX, Disk, plan_group, subclusters_for, undo_status

DURABILITY_MODES = ("process", "power")
#: Seconds without a commit after which a protected group is reported stale, until a
#: primary says how often it checkpoints (new-session).
DEFAULT_STALE_AFTER = 30.0
#: ``history_policy`` of a Group not told otherwise: keep the stored policy.
KEEP = "keep"


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
                 lock: bool = True, subclusters: bool | None = None, history_policy=KEEP):
        """``durability`` None keeps the mode the group was last served with (a
        restart must not silently weaken a power-safe group).  ``subclusters`` is
        fixed when the group is created (None: on where the cluster size allows).
        ``history_policy`` (history.make_policy; None turns history off) is kept
        in the state file; KEEP keeps the stored one."""
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
        if history_policy != KEEP and history_policy != state.history_policy:
            state.history_policy = history_policy  # layers it no longer wants go in recovery
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
                # The directory's own name must survive a power cut too, or the
                # first acknowledged commit could vanish with it.
                fsync_dir(os.path.dirname(self.state_dir))
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
        #: The retained checkpoints' layers (nbd_mc/secondary/history.py).
        self.history = hist.History(self.state_dir, self.disks, self.durability)
        #: the thread deleting the layers after a failover's reply (close joins it)
        self._discarding: threading.Thread | None = None
        self.gate = Gate()
        self._control = threading.Lock()  # one checkpoint operation at a time
        self._stats_lock = threading.Lock()
        self.broken: str | None = None
        #: Seconds without a commit after which status calls protection stale;
        #: a primary sets it for its session (new_session), in memory only.
        self.stale_after = DEFAULT_STALE_AFTER
        #: The largest request the current writer asked its exports to advertise
        #: (``claim``'s max_request; None: nbdkit's own), in memory only: set by each
        #: claim (nbd_mc/blocksize.py says why a writer asks).
        self.max_request: int | None = None
        self._refresh_fast_path()
        self.stats = {"writes": 0, "zeroes": 0, "trims": 0, "bytes_written": 0,
                      "commits": 0, "rollbacks": 0, "refused_writes": 0, "errors": 0}
        self.stats["refused_commits"] = 0  # commits refused or failed (metrics)
        try:
            self.recovered = self._recover()
            self.history.open(self.state, self.keeps_undo)
            self._refresh_fast_path()
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
        if self.state.rewind is not None:
            return self._finish_rewind()
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
        self._recover_history()
        return report

    def _recover_history(self) -> None:
        """The history layers' files made to match the state (history.recover)."""
        shrunk = self.history.recover(self.state)
        if shrunk is not None:
            self._persist(history=shrunk)
            self.history.finish_recover(self.state)

    def _finish_rewind(self) -> dict:
        """A `failover --to-epoch` was interrupted: finish returning every disk to
        the epoch the state names (the sequence is idempotent), then say so in the
        state.  The group stays fenced; `failover` again promotes it."""
        target = self.state.rewind
        for d in self.disks:
            if d.overlay.epoch not in (self.state.committed, target):
                raise StateError(
                    f"overlay {d.spec.overlay} returns to epoch {d.overlay.epoch}, but the state "
                    f"file says {self.state.committed} is committed and {target} is the epoch "
                    "being returned to: the overlay does not belong to this state")
        restored = self._rewind_locked(target, power_drop=True)
        self._persist(**self._rewound(target))
        self.history.discard()
        return {"committed": target, "restored_clusters": restored, "stale_dropped": [],
                "rewound_to": target}

    def _rewind_locked(self, target: int, power_drop: bool = False) -> int:
        """Apply the undo overlay and the history layers down to ``target``, sync
        the images, re-stamp the overlays "returns to ``target``" (the state
        still says ``rewind``: recovery repeats all of it)."""
        restored = 0
        for d in self.disks:
            if d.overlay.epoch == self.state.committed:
                restored += d.overlay.apply()
        restored += self.history.apply_down_to(self.state, target)
        for d in self.disks:
            try:
                os.fdatasync(d.fd)
            except OSError as e:
                raise io_failure(f"syncing image {d.spec.image}", e) from None
        if crashpoints.ARMED:
            crashpoints.reached("rewind.after-apply")
        for d in self.disks:
            saved = d.overlay.barrier
            if power_drop:
                d.overlay.barrier = d.overlay.sync
            try:
                d.overlay.drop(target)
                # The record "returns to target" must be durable before the state
                # says target: the other order would leave, after a power cut, an
                # overlay returning to an epoch after the committed one (foreign).
                d.overlay.sync()
            except OSError as e:
                raise io_failure(f"syncing overlay {d.spec.overlay}", e) from None
            finally:
                d.overlay.barrier = saved
        return restored

    def _rewound(self, target: int) -> dict:
        """The state changes that say every disk is at ``target`` now."""
        when = dict((n, t) for n, t in self.state.history).get(target, self.state.commit_time)
        return {"committed": target, "commit_time": when, "rewind": None, "history": []}

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
        """Split-brain guard: the mode's rule (a fenced group takes writes from
        nobody), then the connection's generation (a promoted or claimed group takes
        writes only from connections opened after the failover or claim)."""
        refusal = mode.refusal(self.state, "write")
        if refusal is None and generation != self.state.generation:
            refusal = Fenced("write refused: this connection was opened before the last "
                             "fence, failover, claim or protect session", )
            refusal.rule = "generation"
        if refusal:
            self._count("refused_writes")
            raise refusal
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
                if self._history:
                    disk.preserve_layer(offset, len(buf))
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
                if self._history:
                    disk.preserve_layer(offset, count)
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

    def request_failed(self, e: NbdMcError) -> None:
        """A client's read, write, zero, trim or flush failed with ``e``: an I/O
        failure counts in ``stats["errors"]`` (refusals are counted where they are
        decided)."""
        if isinstance(e, IOFailure):
            self._count("errors")

    def _count(self, counter: str) -> None:
        with self._stats_lock:
            self.stats[counter] += 1

    def check_read(self, kind: str) -> None:
        """Refuse a read on an open connection to an export of ``kind`` if the mode
        no longer allows it (a failover can come while a connection is open)."""
        if kind not in self._readable:
            mode.check(self.state, "read " + kind)

    def read(self, disk: Disk, view, offset: int) -> None:
        try:
            pread_into(disk.fd, view, offset)
        except OSError as e:
            raise io_failure(f"reading image {disk.spec.image}", e) from None

    @property
    def has_committed_view(self) -> bool:
        """Whether ``NAME@committed`` exists: from the first commit on (epoch 0 is
        the initial synchronisation: no consistent state to show)."""
        return self.state.committed > 0

    def check_committed_view(self, disk: Disk) -> None:
        """Refuse ``NAME@committed`` while nothing was ever committed; the adapter
        asks at connect time, so a client hears it at once, not on every read."""
        if not self.has_committed_view:
            raise IOFailure(f"{disk.name}{COMMITTED_SUFFIX}: nothing is committed yet (epoch 0 "
                            "is the initial synchronisation); this export exists after the "
                            "first commit", errno.ENOENT)

    def read_committed(self, disk: Disk, view, offset: int) -> None:
        """The disk as of the last commit (refused while nothing was ever committed)."""
        self.check_committed_view(disk)
        with self.io():
            try:
                disk.read_committed(view, offset)
            except OSError as e:
                raise io_failure(f"reading committed view of {disk.name}", e) from None

    def read_epoch(self, disk: Disk, epoch: int, view, offset: int) -> None:
        """``NAME@epoch-N``: the disk as of retained epoch N (history.read)."""
        with self.io():
            refusal = hist.epoch_access(self.state, hist.epoch_export(disk.name, epoch), epoch)
            if refusal:
                raise IOFailure(refusal, errno.ENOENT)
            self.history.read(self.state, disk, epoch, view, offset)

    def history_listing(self) -> dict:
        """The retained checkpoints (`nbd-mc history`, the query-history command)."""
        return self.history.listing(self.state)

    def flush(self, disk: Disk) -> None:
        try:
            os.fdatasync(disk.fd)
        except OSError as e:
            raise io_failure(f"flushing image {disk.spec.image}", e) from None

    # --- checkpoint operations --------------------------------------------------------
    def commit(self, epoch: int, writer_id: str | None = None) -> dict:
        """Commit ``epoch``; ``writer_id`` (the id ``claim`` returned, if the commit
        names one) must be the current writer's (writer.check_commit_writer).

        The writer is checked under the same lock as the commit, the claim and the
        failover: checked outside it, a commit that came during a failover saw the
        group fenced and not yet promoted, and its protect told the user to start a
        fresh secondary instead of to stop a VM that was failed over.

        Every answer says whether it is committed: a reply carries ``committed``,
        and so does every error raised here (the epoch the state file holds, read
        back after a failure).  The retry rule: after an error or a lost reply, send
        the same commit again; a reply means the epoch is committed (durably, in
        ``power`` mode: a retry re-syncs the state file)."""
        try:
            return self._commit(epoch, writer_id)
        except NbdMcError:
            self._count("refused_commits")
            raise

    def _commit(self, epoch: int, writer_id: str | None) -> dict:
        with self._control:
            try:
                writer.check_commit_writer(self.state, writer_id)
                return self._commit_locked(epoch)
            except NbdMcError as e:
                e.details = {"committed": self._committed_on_disk()}
                raise

    def _commit_locked(self, epoch: int) -> dict:
        mode.check(self.state, "commit")
        if epoch == self.state.committed:
            if self.durability == "power":
                # A retry: the first attempt's sync may have failed.  Gate closed,
                # as for every save that may mark the group broken.
                with self.gate.closed():
                    self._persist()
            reply = {"committed": epoch, "seconds": 0.0, "retry": True}
            if self.broken:
                reply["broken"] = self.broken
            return reply
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
            now = time.time()
            kept = self._retain(epoch, now)
            old_history = self.state.history
            self._persist(committed=epoch, commit_time=now,
                          **({"history": kept} if kept is not None else {}))
            if crashpoints.ARMED:
                crashpoints.reached("commit.after-state")
            if kept is not None:
                self._switch_history(old_history)
            self._drop_all(epoch)
        self._count("commits")
        return {"committed": epoch, "seconds": time.perf_counter() - t0}

    def _discard_history(self) -> None:
        try:
            self.history.discard()
        except NbdMcError:
            pass  # leftovers are unlisted: the next recovery deletes them

    def _retain(self, epoch: int, now: float) -> list | None:
        """The history list the commit of ``epoch`` persists (None: unchanged),
        with a newly retained epoch's layers already created (history.prepare).
        A failure leaves the files as they were and refuses the commit."""
        kept = self.history.plan(self.state, epoch, now)
        if kept is None:
            return None
        try:
            self.history.prepare(self.state, kept)
        except NbdMcError:
            try:  # the new layer is not listed: undo the rebase, delete it
                self.history.recover(self.state)
                self.history.finish_recover(self.state)
            except NbdMcError:
                pass  # recovery at the next start does the same
            raise
        return kept

    def _switch_history(self, old_history: list) -> None:
        try:
            self.history.switch(old_history, self.state, self.keeps_undo)
            self._refresh_fast_path()
        except NbdMcError as e:
            # The commit is persisted, but writes could not preserve into the new
            # layer: refuse them until a restart (recovery opens the layer again).
            self.broken = f"switching history layers failed: {e.desc}"
            self._refresh_fast_path()
            raise

    def _committed_on_disk(self) -> int | None:
        """The committed epoch as the state file says it, None if unreadable."""
        try:
            state = load(self.state_dir)
        except NbdMcError:
            return None
        return state.committed if state is not None else None

    def new_session(self, stale_after: float | None = None, claim: bool = False,
                    max_request: int | None = None) -> dict:
        """A primary (re)attaches: NBD connections opened before now can no longer
        write (as after a fence, but the group stays writable for new ones).

        A connection of an earlier session may still hold writes in its socket (a
        secondary that hung and came back): they must not land after the resync
        that replaces them.  ``stale_after`` is how long without a commit makes this
        primary's protection stale.  ``max_request`` (claim only) is the largest
        request the new writer's exports advertise (nbd_mc/blocksize.py).

        ``claim`` (the ``claim`` command, which is what protect sends at every
        (re)sync) also grants a new writer identity (nbd_mc/secondary/writer.py): besides the
        open connections, the previous writer's export *name* is refused from now
        on, so not even a reconnect of an earlier session writes again, and the
        plain export names turn read-only.  Without ``claim`` the writer identity is
        kept (a bare new-session only cuts off open connections).
        """
        what = "claim" if claim else "new-session"
        with self._control:
            mode.check(self.state, what)
            if claim and self.broken:
                raise IOFailure(f"claim refused until restart: {self.broken}")
            if stale_after is not None:
                if (not isinstance(stale_after, (int, float)) or isinstance(stale_after, bool)
                        or stale_after <= 0):
                    raise BadRequest(f"{what}: 'stale_after' must be a positive number")
                self.stale_after = float(stale_after)
            if max_request is not None and not blocksize.valid_max_request(max_request):
                raise BadRequest(f"{what}: 'max_request' must be a power of two from "
                                 f"{blocksize.MIN_MAXIMUM} to {blocksize.NBDKIT_MAX_REQUEST}")
            with self.gate.closed():  # no write of an earlier session is still in flight
                generation = self.state.generation + 1
                if claim:
                    self._persist(generation=generation,
                                  writer=writer.new_writer_id(generation))
                else:
                    self._persist(generation=generation)
            out = {"generation": generation, "group_id": self.state.group_id,
                   "committed": self.state.committed}
            if claim:
                self.max_request = max_request
                if max_request is not None:
                    out["max_request"] = max_request
                out["writer"] = self.state.writer
                out["exports"] = writer.writer_exports([d.name for d in self.disks],
                                                       self.state.writer)
            return out

    def claim(self, stale_after: float | None = None, max_request: int | None = None) -> dict:
        """A new session with a new writer identity (see new_session): the previous
        writer's connections and export name are refused from now on, the group
        stays usable for the new writer, whose exports advertise ``max_request``."""
        return self.new_session(stale_after, claim=True, max_request=max_request)

    def _persist(self, **changes) -> None:
        """Save the state with ``changes``.  On failure the in-memory state follows
        the file: a save can fail after its rename landed (the directory's sync),
        and memory must never say less than the file -- a rollback would then undo
        a committed epoch.  If the new state did land, its durability is unknown
        and undo data may be stale: the group refuses writes until restarted
        (recovery finishes the job) and says why."""
        old = {k: getattr(self.state, k) for k in changes}
        for k, v in changes.items():
            setattr(self.state, k, v)
        try:
            self.state_file.save(self.state, durable=self.durability == "power")
        except OSError as e:
            for k, v in old.items():
                setattr(self.state, k, v)
            failure = io_failure("writing the state file", e)
            try:
                on_disk = load(self.state_dir)
            except NbdMcError:
                on_disk = None
            if on_disk is None:
                self.broken = f"{failure.desc}; the state file is unreadable"
            elif changes and all(getattr(on_disk, k) == v for k, v in changes.items()):
                for k, v in changes.items():
                    setattr(self.state, k, v)
                self.broken = f"{failure.desc} (after it was replaced)"
            raise failure from None
        finally:
            self._refresh_fast_path()

    def _refresh_fast_path(self) -> None:
        """Precompute the two facts every write checks, so the hot path compares one
        integer and reads one boolean instead of walking the state."""
        s = self.state
        usable = mode.allowed(s, "write") and not self.broken
        self._write_generation = s.generation if usable else -1
        self._undo = self.keeps_undo
        self._readable = frozenset(k for k in mode.EXPORT_KINDS if mode.allowed(s, "read " + k))
        history = getattr(self, "history", None)
        self._history = bool(self._undo and history is not None and history.active)

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
            mode.check(self.state, "rollback")
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
        """Stop every write to a replica, from connections open now and later (the
        old primary's): refused on a promoted group (see mode.py), whose images are
        the new primary's disk."""
        return self._fence("fence")

    def fence_primary(self) -> dict:
        """The operator's explicit stop of the new primary's writes through this
        server after an in-place failover; ``failover`` again undoes it."""
        return self._fence("fence-primary")

    def _fence(self, what: str) -> dict:
        with self._control:
            mode.check(self.state, what)
            with self.gate.closed():  # no write of an old connection is still in flight
                self._persist(generation=self.state.generation + 1, fenced=True)
            return {"generation": self.state.generation}

    def check_mode(self, op: str) -> None:
        """Refuse ``op`` (mode.OPERATIONS) if the group's mode does not allow it: for
        the commands outside the engine (verify-range, checksum-range)."""
        mode.check(self.state, op)

    @property
    def mode(self) -> mode.Mode:
        return mode.mode_of(self.state)

    def failover(self, instant: bool = False, to_epoch: int | None = None) -> dict:
        """Fence, return to the last commit (or to retained epoch ``to_epoch``),
        promote.  Idempotent; on a promoted group that ``fence-primary`` stopped, it
        gives the new primary its disk back (the writer id is kept, so its
        reconnects find their export)."""
        with self._control:
            t0 = time.perf_counter()
            mode.check(self.state, "failover")
            if to_epoch is not None and to_epoch == self.state.committed:
                to_epoch = None  # the last commit: an ordinary failover
            if self.mode is mode.Mode.PROMOTED_FENCED:
                with self.gate.closed():
                    self._persist(fenced=False)
            if self.state.role != "primary":
                if not self.state.committed:
                    raise NotProtected("failover refused: no epoch was ever committed, the "
                                       "replica holds no consistent state")
                if to_epoch is not None:
                    if instant:
                        raise BadRequest("failover refused: --instant returns to the last commit "
                                         "only; --to-epoch needs the rollback")
                    hist.check_target(self.state, to_epoch)
                with self.gate.closed():
                    self._persist(generation=self.state.generation + 1, fenced=True,
                                  **({"rewind": to_epoch} if to_epoch is not None else {}))
                    if crashpoints.ARMED:
                        crashpoints.reached("failover.after-fence")
                    if instant:
                        self._persist(role="primary", handoff="instant", writer=None)
                    else:
                        if to_epoch is None:
                            self._rollback_locked()
                            done = {"history": []}
                        else:
                            self._rewind_locked(to_epoch)
                            done = self._rewound(to_epoch)
                        if crashpoints.ARMED:
                            crashpoints.reached("failover.before-promote")
                        had_history = bool(self.state.history)
                        self._persist(role="primary", fenced=False,
                                      writer=writer.new_writer_id(self.state.generation), **done)
                        if had_history and crashpoints.ARMED:  # unlisted, not yet deleted
                            crashpoints.reached("history.before-unlink")
                        self._refresh_fast_path()  # no write preserves into a layer now
                        # The images are the new primary's: the layers go, after the
                        # reply (the state lists none; recovery deletes any leftover).
                        self._discarding = threading.Thread(
                            target=self._discard_history, daemon=True,
                            name="nbd-mc history discard")
                        self._discarding.start()
            elif to_epoch is not None:
                raise NotRetained(f"failover refused: already promoted at epoch "
                                  f"{self.state.committed}; no history is kept after a failover")
            return {"committed": self.state.committed, "disks": self.handover(),
                    "seconds": time.perf_counter() - t0}

    def handover(self) -> list[dict]:
        """Which file in which format the new primary opens for each disk
        (nbd_mc/secondary/boot.py says how QEMU opens it)."""
        out = []
        exports = writer.writer_exports([d.name for d in self.disks], self.state.writer)
        for d in self.disks:
            if self.state.handoff == "instant":
                path, fmt = d.spec.overlay, "qcow2"
            else:
                path, fmt = d.spec.image, "raw"
            out.append({"name": d.name, "path": path, "format": fmt,
                        "export": exports.get(d.name)})
        return out

    @contextmanager
    def quiesced(self):
        """No checkpoint operation and no request runs while the block runs, and
        the images are synced first: for a process that ends inside the block
        (``quit`` with clients still connected)."""
        with self._control, self.gate.closed():
            self._join_discard()
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
            "writer": self.state.writer,
            "broken": self.broken,
            "history": self._history_summary(),
            "disks": [d.status() for d in self.disks],
            "stats": self._stats_copy(),
        }

    def _history_summary(self) -> dict:
        """status' ``history``: the listing without the per-checkpoint rows."""
        out = self.history.listing(self.state)
        out.pop("checkpoints")
        return out

    def _stats_copy(self) -> dict:
        with self._stats_lock:
            return dict(self.stats)

    def _join_discard(self) -> None:
        if getattr(self, "_discarding", None) is not None:
            self._discarding.join()

    def close(self) -> None:
        self._join_discard()
        history = getattr(self, "history", None)
        if history is not None:
            history.close()
        for d in self.disks:
            d.close()
        self.state_file.close()
        if self.lock:
            self.lock.release()
