"""History: retained checkpoints besides the last commit (`serve --history`).

The undo overlay returns the disks to the *last* commit only.  With history on,
some commits are *retained*: for each retained epoch N every disk has a history
layer, ``STATE_DIR/NAME.epoch-N.qcow2``, a qcow2 file of the same kind as the undo
overlay (nbd_mc/qcow2/) that holds the old data, as of commit N, of every unit
first written after commit N and before the next retained commit.  The layers
form a backing chain, oldest on top:

    NAME.epoch-N1.qcow2 -> NAME.epoch-N2.qcow2 -> ... -> NAME.epoch-Nk.qcow2 -> image

so any qcow2 reader opening ``NAME.epoch-N.qcow2`` sees the disk exactly as of
commit N: a unit comes from the oldest layer at or after N that holds it (its
value at the checkpoint that layer starts from, which is the value at N since it
was not written in between), else from the image (not written since N).  The
newest layer is *open*: every first write after checkpoint Nk copies the old
data into it before the image is overwritten (Disk.preserve_layer), also across
non-retained commits, whose own undo overlay is dropped as before.  A unit is
therefore copied at most once per retained interval: the write, the undo copy
and the history copy are the 3x floor of write amplification.

The state file is the single source of truth: ``GroupState.history`` lists the
retained epochs (with their commit times), and a layer belongs to the group
exactly when it is listed.  Every change is ordered so kill -9 (and, with
``--durability power``, power loss) at any instant leaves every listed
checkpoint exact:

* retain M (at the commit of M, gate closed): create the empty layer M (backing
  the image) -> rebase the newest layer Nk onto layer M (one header write;
  inserting an *empty* layer changes no byte of what Nk reads) -> the commit's
  state write lists M -> the open layer becomes M.  A crash before the state
  write leaves an unlisted empty layer M: recovery points Nk back at the image
  and deletes M.
* expire (oldest first, whole layers, nothing rewritten): the state write drops
  the epoch -> the files are deleted.  Nothing backs onto the oldest layer, so an
  unlisted leftover is simply deleted by recovery.
* return to epoch N (`failover --to-epoch N`): the state records ``rewind: N``
  first; then the undo overlay and the layers from the newest down to N are
  applied to the images (each apply is idempotent and the whole sequence is too:
  a unit ends with the value of the oldest layer at or after N that holds it),
  the images synced, the undo overlay re-stamped; only then the state says N.
  Recovery repeats the sequence while ``rewind`` is set.

Which export reads which epoch: ``NAME@epoch-N`` is served read-only while N is
retained (``epoch_access``); reads walk the same chain as qemu-img (``read``).

Standard library only: this runs inside nbdkit's embedded Python.
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time

from .. import crashpoints, qcow2
from ..errors import BadRequest, IOFailure, NbdMcError, NotRetained, StateError, io_failure
from ..fileio import pread_into

EPOCH_PREFIX = "epoch-"
_LAYER_FILE = re.compile(r"^(?P<disk>.+)\.epoch-(?P<epoch>\d+)\.qcow2(?P<tmp>\.tmp\.\d+)?$")
#: Frozen layers kept open for reads at once (each holds a bitmap and a descriptor).
OPEN_LAYERS = 64


def layer_path(state_dir: str, disk: str, epoch: int) -> str:
    """The file of disk ``disk``'s history layer for retained epoch ``epoch``."""
    return os.path.join(state_dir, f"{disk}.epoch-{epoch}.qcow2")


def epoch_export(disk: str, epoch: int) -> str:
    return f"{disk}@{EPOCH_PREFIX}{epoch}"


def parse_epoch_suffix(suffix: str | None) -> int | None:
    """``epoch-N`` -> N; anything else -> None."""
    if suffix and suffix.startswith(EPOCH_PREFIX) and suffix[len(EPOCH_PREFIX):].isdigit():
        return int(suffix[len(EPOCH_PREFIX):])
    return None


def retained(state) -> list[int]:
    """The retained epochs.  While a `failover --to-epoch N` is under way
    (``state.rewind``) only those up to N: the layers of later epochs are still
    listed (the return applies them) but the images no longer hold what those
    epochs read from them."""
    if state.rewind is not None:
        return [n for n, _t in state.history if n <= state.rewind]
    return [n for n, _t in state.history]


# --- the policy -------------------------------------------------------------------------
_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d|)\s*$")


def parse_duration(text: str) -> float:
    """``30d``, ``1h``, ``10m``, ``1s``, ``100ms``, ``2`` (seconds) -> seconds; ``off``
    is 0.  ValueError saying what is accepted."""
    if text.strip().lower() == "off":
        return 0.0
    m = _DURATION.match(text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 30d, 1h, 10m, 1s, 100ms, or off)")
    return float(m[1]) * _UNITS[m[2]]


def make_policy(keep: float, every: float, max_bytes: int | None) -> dict | None:
    """The policy `serve --history KEEP --history-every EVERY --history-max SIZE`
    stores in the state file; KEEP 0 turns history off (None)."""
    if keep < 0 or every < 0 or (max_bytes is not None and max_bytes < 0):
        raise BadRequest("--history, --history-every and --history-max must not be negative")
    if not keep:
        return None
    return {"keep": float(keep), "every": float(every), "max": int(max_bytes or 0)}


def is_checkpoint(policy: dict, history: list, now: float) -> bool:
    """Whether the commit made at ``now`` is retained: every commit with
    ``every`` 0, else the first commit at or after each ``every`` boundary."""
    every = policy["every"]
    if not every or not history:
        return True
    return int(now // every) > int(history[-1][1] // every)


def to_expire(policy: dict, history: list, now: float, sizes: dict) -> list[int]:
    """Epochs to drop, oldest first: older than ``keep``, then while the bytes
    held exceed ``max``.  The newest retained checkpoint is never dropped (the
    open layer: history would otherwise stop until the next checkpoint)."""
    out = []
    rest = list(history)
    while len(rest) > 1 and rest[0][1] < now - policy["keep"]:
        out.append(rest.pop(0)[0])
    if policy.get("max"):
        total = sum(sizes.get(n, 0) for n, _t in rest)
        while len(rest) > 1 and total > policy["max"]:
            n = rest.pop(0)[0]
            total -= sizes.get(n, 0)
            out.append(n)
    return out


# --- which export reads which epoch -----------------------------------------------------
def epoch_access(state, name: str, epoch: int) -> str | None:
    """Why ``NAME@epoch-N`` cannot be opened in ``state`` (None: it can, read-only)."""
    if state.role == "primary":
        return f"{name}: no history after a failover (the images are the new primary's disk)"
    have = retained(state)
    if epoch in have:
        return None
    if not have:
        return f"no export {name!r}: no history is kept (serve --history)"
    return (f"no export {name!r}: epoch {epoch} is not retained (history holds epochs "
            f"{have[0]}..{have[-1]}, {len(have)} checkpoints; see `nbd-mc history`)")


def file_bytes(path: str) -> int:
    """Space a file holds (allocated blocks, not its sparse length)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


class History:
    """The retained layers of a group's disks, their files, reads and returns.

    Owned by the Group; every method that changes something runs under the
    group's ``_control`` with the gate closed (commit, failover, recovery), so
    no request is in flight.  ``read`` runs inside the gate, in parallel with
    other requests: it reads the open layer (``Disk.layer``, whose published
    units never change) and frozen layers, opened lazily into ``_frozen`` under
    ``_lock``.

    State: ``_frozen`` {(disk name, epoch): read-only UndoOverlay}, guarded by
    ``_lock``; ``_sizes`` {epoch: bytes held by its layers, all disks} for frozen
    layers (they no longer grow), changed with the gate closed.
    """

    def __init__(self, state_dir: str, disks: list, durability: str):
        self.state_dir = state_dir
        self.disks = disks
        self.power = durability == "power"
        self._lock = threading.Lock()
        self._frozen: dict = {}
        self._sizes: dict = {}

    # --- files --------------------------------------------------------------------
    def path(self, disk, epoch: int) -> str:
        return layer_path(self.state_dir, disk.name, epoch)

    def _backing(self, disk, history: list, i: int) -> tuple[str, str]:
        """(path, format) of the file layer ``history[i]`` of ``disk`` backs onto."""
        if i + 1 < len(history):
            return self.path(disk, history[i + 1][0]), "qcow2"
        return disk.spec.image, "raw"

    def _stray_files(self, keep: set) -> list[str]:
        """Layer files (and temp files of their creation) of our disks not in ``keep``."""
        names = {d.name for d in self.disks}
        out = []
        try:
            entries = os.listdir(self.state_dir)
        except OSError:
            return out
        for f in entries:
            m = _LAYER_FILE.match(f)
            if m and m["disk"] in names and (m["tmp"] or (m["disk"], int(m["epoch"])) not in keep):
                out.append(os.path.join(self.state_dir, f))
        return out

    def _unlink(self, paths) -> None:
        for p in paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise io_failure(f"deleting history layer {p}", e) from None

    # --- recovery -----------------------------------------------------------------
    def recover(self, state) -> list | None:
        """Make the files match the state (after a crash, or a restart).

        Returns the history list to persist when it must shrink (None: unchanged):
        a listed layer whose file is missing takes every older one with it (their
        chain passes through it); with no policy the whole history goes.
        Unlisted layer files are deleted (finish_recover, once the state lists
        the result), after the newest listed layer has been pointed back at the
        image (a crash between creating a layer and the state write that lists it
        leaves the newest backing onto that empty layer) and has given back the
        clusters a crashed copy into it had allocated (``_reclaim``).
        """
        history = list(state.history)
        if state.history_policy is None or state.role == "primary":
            history = []
        for i in range(len(history) - 1, -1, -1):
            if not all(os.path.exists(self.path(d, history[i][0])) for d in self.disks):
                history = history[i + 1:]
                break
        if history:  # only the newest is ever rebased (at the next retain)
            for d in self.disks:
                self._fix_backing(d, history, len(history) - 1)
                self._reclaim(d, history[-1][0])
        if crashpoints.ARMED and self._stray_files({(d.name, n) for d in self.disks
                                                   for n, _t in history}):
            crashpoints.reached("history.recover-before-unlink")
        changed = history != state.history
        if not changed:
            self._unlink(self._stray_files({(d.name, n) for d in self.disks for n, _t in history}))
        return history if changed else None

    def finish_recover(self, state) -> None:
        """After the state lists what ``recover`` kept: delete everything else."""
        self._unlink(self._stray_files({(d.name, n) for d in self.disks for n, _t in state.history}))

    def _reclaim(self, d, epoch: int) -> None:
        """The newest layer is the only one written into: a kill -9 in the middle
        of a copy into it leaves clusters allocated (refcount 1) that no L2 entry
        references yet.  The undo overlay's next drop cleans such leaks; a layer
        is never dropped, so they are given back here, or the layer would keep
        them (``qemu-img check`` exit 3) until it expires."""
        path = self.path(d, epoch)
        lay = qcow2.UndoOverlay(path, d.fd, expected_size=d.size, expected_image=d.spec.image)
        try:
            lay.reclaim_leaks()
        finally:
            lay.close()

    def _fix_backing(self, d, history: list, i: int) -> None:
        path = self.path(d, history[i][0])
        want, fmt = self._backing(d, history, i)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise io_failure(f"opening history layer {path}", e) from None
        try:
            lay = qcow2.read_layout(fd, path, readonly=True, expected_backing_format=fmt)
            current = os.path.realpath(qcow2.resolve_backing(path, lay.backing))
        except NbdMcError:
            current = None  # a backing format we did not expect: rewrite it
        finally:
            os.close(fd)
        if current != os.path.realpath(want):
            try:
                qcow2.rebase(path, want, fmt, durable=True)
            except OSError as e:
                raise io_failure(f"rebasing history layer {path}", e) from None

    # --- the open layer -----------------------------------------------------------
    def open(self, state, keeps_undo: bool) -> None:
        """Give each disk its open layer (the newest retained checkpoint's) while
        the group keeps undo; else none."""
        for d in self.disks:
            self._close_open(d)
        if not (keeps_undo and state.history and state.history_policy):
            return
        newest = state.history[-1][0]
        for d in self.disks:
            try:
                d.layer = qcow2.UndoOverlay(
                    self.path(d, newest), d.fd, expected_size=d.size,
                    expected_image=d.spec.image, barrier=d.layer_sync if self.power else None)
            except NbdMcError:
                for x in self.disks:
                    self._close_open(x)
                raise

    @staticmethod
    def _close_open(d) -> None:
        if d.layer is not None:
            d.layer.close()
            d.layer = None

    @property
    def active(self) -> bool:
        return any(d.layer is not None for d in self.disks)

    # --- retaining a commit -------------------------------------------------------
    def plan(self, state, epoch: int, now: float) -> list | None:
        """The history list the commit of ``epoch`` at ``now`` persists, or None
        when it stays as it is."""
        policy = state.history_policy
        if not policy or state.role != "secondary":
            return None
        history = list(state.history)
        if is_checkpoint(policy, history, now):
            history.append([epoch, now])
        for n, _t in history[:-1]:  # frozen layers no longer grow: stat them once
            if n not in self._sizes:
                self._sizes[n] = sum(file_bytes(self.path(d, n)) for d in self.disks)
        sizes = dict(self._sizes)
        if history:
            newest = history[-1][0]
            sizes[newest] = sum(file_bytes(self.path(d, newest)) for d in self.disks)
        gone = set(to_expire(policy, history, now, sizes))
        history = [h for h in history if h[0] not in gone]
        return history if history != state.history else None

    def prepare(self, state, new_history: list) -> None:
        """Before the state write that lists ``new_history``: create the layer of a
        newly retained epoch (empty, backing the image) and rebase the previous
        newest onto it."""
        old = retained(state)
        if not new_history or new_history[-1][0] in old:
            return
        epoch = new_history[-1][0]
        for d in self.disks:
            path = self.path(d, epoch)
            try:
                qcow2.create(path, d.spec.image, d.size, d.cluster_size, epoch=epoch,
                             subclusters=d.overlay.subclusters, durable=self.power)
            except OSError as e:
                raise io_failure(f"creating history layer {path}", e) from None
        if crashpoints.ARMED:
            crashpoints.reached("history.after-create")
        if old:
            for d in self.disks:
                prev = self.path(d, old[-1])
                try:
                    qcow2.rebase(prev, self.path(d, epoch), "qcow2", durable=self.power)
                except OSError as e:
                    raise io_failure(f"rebasing history layer {prev}", e) from None
            if crashpoints.ARMED:
                crashpoints.reached("history.after-rebase")

    def switch(self, old_history: list, state, keeps_undo: bool) -> None:
        """After the state write: the open layer follows the newest retained
        epoch, and the layers of epochs no longer listed are deleted."""
        kept = set(retained(state))
        old = [n for n, _t in old_history]
        if old and state.history and state.history[-1][0] != old[-1] and old[-1] in kept:
            self._sizes[old[-1]] = sum(file_bytes(self.path(d, old[-1])) for d in self.disks)
        if not state.history or not old or state.history[-1][0] != old[-1]:
            self.open(state, keeps_undo)
        self._trim()
        gone = [n for n in old if n not in kept]
        if gone:
            self._forget(gone)
            if crashpoints.ARMED:
                crashpoints.reached("history.before-unlink")
            self._unlink([self.path(d, n) for n in gone for d in self.disks])

    def _trim(self) -> None:
        """Close the frozen layers opened longest ago beyond OPEN_LAYERS.  Only
        with the gate closed (a commit): a read in flight may be using any of
        them (nbdkit's parallel thread model)."""
        with self._lock:
            while len(self._frozen) > OPEN_LAYERS:
                self._frozen.pop(next(iter(self._frozen))).close()

    def _forget(self, epochs) -> None:
        with self._lock:
            for key in [k for k in self._frozen if k[1] in epochs]:
                self._frozen.pop(key).close()
        for n in epochs:
            self._sizes.pop(n, None)

    def discard(self) -> None:
        """Close every layer and delete every layer file (the state already lists
        none: after a failover the images are the new primary's disk).  May run
        in its own thread after a failover's reply: ``_lock`` keeps it and
        ``close`` from closing a descriptor twice."""
        with self._lock:
            self._close_all()
            self._sizes.clear()
            self._unlink(self._stray_files(set()))

    def close(self) -> None:
        with self._lock:
            self._close_all()

    def _close_all(self) -> None:
        """Close every disk's open layer and every frozen layer (``_lock`` held)."""
        for d in self.disks:
            self._close_open(d)
        for ov in self._frozen.values():
            ov.close()
        self._frozen.clear()

    # --- reading an epoch ---------------------------------------------------------
    def _layer(self, d, history: list, i: int):
        """The overlay of layer ``history[i]`` of disk ``d`` (the open one, or a
        frozen one opened read-only)."""
        epoch = history[i][0]
        if i == len(history) - 1 and d.layer is not None:
            return d.layer
        key = (d.name, epoch)
        with self._lock:
            ov = self._frozen.get(key)
            if ov is None:
                want, fmt = self._backing(d, history, i)
                ov = qcow2.UndoOverlay(self.path(d, epoch), d.fd, readonly=True,
                                       expected_size=d.size, expected_image=want,
                                       expected_backing_format=fmt)
                self._frozen[key] = ov  # closed by _trim, never under a reader
            return ov

    def read(self, state, d, epoch: int, view: memoryview, offset: int) -> None:
        """Fill ``view`` with disk ``d`` as of retained epoch ``epoch``.

        A unit comes from the oldest layer at or after ``epoch`` that holds it,
        else from the image.  A unit read from the image is re-checked against the
        open layer afterwards: a write may have preserved and overwritten it
        meanwhile (preserve publishes before the image write starts), then the
        read is repeated.
        """
        history = list(state.history)
        idx = [i for i, (n, _t) in enumerate(history) if n >= epoch]
        if not idx or history[idx[0]][0] != epoch:
            raise IOFailure(f"{epoch_export(d.name, epoch)}: epoch {epoch} is no longer "
                            "retained", errno.ENOENT)
        try:
            layers = [self._layer(d, history, i) for i in idx]
        except NbdMcError as e:
            raise IOFailure(f"{epoch_export(d.name, epoch)}: {e.desc}") from None
        bits = d.bits
        U = 1 << bits
        first = offset >> bits
        count = ((offset + len(view) - 1) >> bits) - first + 1
        live = d.layer if d.layer is not None and d.layer is layers[-1] else None
        while True:
            sources = [None] * count
            pending = list(range(count))
            for ov in layers:
                found = ov.unit_sources(first, count)
                rest = []
                for i in pending:
                    if found[i]:
                        sources[i] = (ov, found[i])
                    else:
                        rest.append(i)
                pending = rest
                if not pending:
                    break
            try:
                self._read_runs(d, sources, first, U, view, offset)
            except OSError as e:
                raise io_failure(f"reading {epoch_export(d.name, epoch)}", e) from None
            if live is None or not any(live.is_preserved(first + i) for i in pending):
                return

    @staticmethod
    def _read_runs(d, sources: list, first: int, U: int, view: memoryview, offset: int) -> None:
        """Read units by their sources: one syscall per run of units that come from
        the image, read as zeros, or lie contiguous in one layer file."""
        total = len(view)
        pos = 0
        while pos < total:
            j = (offset + pos) // U - first
            src = last = sources[j]
            n = min(total - pos, (first + j + 1) * U - (offset + pos))
            while pos + n < total and _contiguous(last, sources[j + 1], U):
                j += 1
                last = sources[j]
                n += min(total - pos - n, U)
            segment = view[pos:pos + n]
            if src is None:
                pread_into(d.fd, segment, offset + pos)
            elif src[1] == qcow2.ZERO_SOURCE:
                segment[:] = bytes(n)
            else:
                pread_into(src[0].fd, segment, src[1] + ((offset + pos) & (U - 1)))
            pos += n

    # --- returning to an epoch ----------------------------------------------------
    def apply_down_to(self, state, target: int) -> int:
        """Apply the layers of every disk from the newest down to ``target`` to
        the images (the undo overlay was applied first); returns the units
        written.  Idempotent as a whole: repeated after a crash."""
        history = list(state.history)
        idx = [i for i, (n, _t) in enumerate(history) if n >= target]
        restored = 0
        for d in self.disks:
            for i in reversed(idx):
                ov = self._layer(d, history, i)
                restored += ov.apply()
                if ov is not d.layer:  # one at a time: thousands may be applied
                    with self._lock:
                        self._frozen.pop((d.name, history[i][0]), None)
                    ov.close()
                if crashpoints.ARMED:
                    crashpoints.reached("history.rewind-after-layer")
        return restored

    # --- what is held -------------------------------------------------------------
    def listing(self, state, now: float | None = None) -> dict:
        """The retained checkpoints (oldest first) with the bytes each holds, and
        how far back history reaches: `nbd-mc history`, status and metrics."""
        now = time.time() if now is None else now
        checkpoints = []
        kept = set(retained(state))
        for n, t in state.history:
            if n not in kept:
                continue
            size = self._sizes.get(n)
            if size is None:
                size = sum(file_bytes(self.path(d, n)) for d in self.disks)
            checkpoints.append({"epoch": n, "time": t, "age": round(now - t, 3), "bytes": size,
                                "exports": [epoch_export(d.name, n) for d in self.disks],
                                "files": {d.name: self.path(d, n) for d in self.disks}})
        policy = state.history_policy
        return {
            "enabled": bool(policy),
            "keep": policy["keep"] if policy else None,
            "every": policy["every"] if policy else None,
            "max": (policy["max"] or None) if policy else None,
            "checkpoints": checkpoints,
            "count": len(checkpoints),
            "bytes": sum(c["bytes"] for c in checkpoints),
            "oldest_epoch": checkpoints[0]["epoch"] if checkpoints else None,
            "oldest_time": checkpoints[0]["time"] if checkpoints else None,
            "oldest_age": checkpoints[0]["age"] if checkpoints else None,
            "newest_epoch": checkpoints[-1]["epoch"] if checkpoints else None,
        }


def _contiguous(a, b, U: int) -> bool:
    """Whether unit sources a, b (neighbours in guest order) read with one syscall."""
    if a is None or b is None:
        return a is None and b is None
    if a[0] is not b[0]:
        return False
    if a[1] == qcow2.ZERO_SOURCE or b[1] == qcow2.ZERO_SOURCE:
        return a[1] == b[1]
    return b[1] == a[1] + U


def check_target(state, target: int) -> None:
    """Why `failover --to-epoch target` is refused (raises), in one line."""
    if target == state.committed:
        return
    have = retained(state)
    if target in have:
        return
    if target > state.committed:
        raise NotRetained(f"failover refused: epoch {target} is not committed (the last commit "
                         f"is {state.committed})")
    if not have:
        raise NotRetained(f"failover refused: epoch {target} is not retained: no history is "
                         f"kept (only the last commit, {state.committed})")
    raise NotRetained(f"failover refused: epoch {target} is not retained (history holds epochs "
                     f"{have[0]}..{have[-1]}, {len(have)} checkpoints, and the last commit "
                     f"{state.committed})")


def offline_listing(state_dir: str) -> dict:
    """`nbd-mc history --state-dir` with no server running: the listing from the
    state file and the files, without opening (or locking) anything."""
    from types import SimpleNamespace

    from .state import load
    state = load(state_dir)
    if state is None:
        raise StateError(f"no nbd-mc state in {state_dir}")
    disks = [SimpleNamespace(name=d.name) for d in state.disks]
    return History(os.path.abspath(state_dir), disks, state.durability).listing(state)
