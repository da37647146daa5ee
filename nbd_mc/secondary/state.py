"""The group's persistent state: one small JSON file, replaced atomically.

The state file is the single source of truth for "which epoch is committed": a
commit is exactly the moment the new contents land.  Two ways to land them:

* durable (power loss): temp file -> fsync -> rename -> fsync of the directory;
* process (kill -9): one pwrite of one page over the old contents, in place.  A
  write that fits in one page is copied into the page cache whole or not at all,
  and the page cache survives the process.  This matters because a rename that
  replaces a file makes ext4 start writeback of the new file (auto_da_alloc), a
  millisecond or more per commit.

The file is padded with spaces to a whole page, so in-place writes never change
its length (JSON ignores trailing whitespace).  A state that outgrows a page (a
long history: about 23 bytes per retained checkpoint) is always replaced by
rename, in process durability too: a kill -9 before the rename leaves the old
file whole (only the spare was written), after it the new one.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field

from .. import crashpoints
from ..errors import StateError
from ..fileio import fsync_dir
from ..statedir import StateDir

FORMAT = "nbd-mc-state"
VERSION = 1
ROLES = ("secondary", "primary")


@dataclass
class DiskState:
    name: str
    image: str
    overlay: str
    size: int
    cluster_size: int


@dataclass
class GroupState:
    committed: int = 0
    generation: int = 0
    fenced: bool = False
    role: str = "secondary"
    handoff: str | None = None  # "instant": overlays were handed to a new primary
    durability: str = "process"  # the mode the group was last served with
    writer: str | None = None  # the writer identity granted last (nbd_mc/secondary/writer.py)
    disks: list[DiskState] = field(default_factory=list)
    #: The group's identity, made once when the group is created (older state files
    #: get one at their next start): a primary resyncs incrementally only against
    #: the group whose commits its dirty bitmaps count from.
    group_id: str = ""
    commit_time: float = 0.0  # wall-clock time of the last commit (0: none yet)
    #: Retained checkpoints, oldest first: [[epoch, commit time], ...]; the
    #: files are the history layers (nbd_mc/secondary/history.py).  A layer exists
    #: for the group exactly when it is listed here.
    history: list = field(default_factory=list)
    #: What `serve --history` asked for: {"keep": s, "every": s, "max": bytes or 0}
    #: or None (no history); kept across restarts like the durability mode.
    history_policy: dict | None = None
    #: `failover --to-epoch N` in progress: the epoch every disk is being returned
    #: to (None otherwise); recovery finishes the return.
    rewind: int | None = None

    def to_json(self) -> str:
        body = {"format": FORMAT, "version": VERSION, "committed": self.committed,
                "generation": self.generation, "fenced": self.fenced, "role": self.role,
                "handoff": self.handoff, "durability": self.durability, "writer": self.writer,
                "group_id": self.group_id, "commit_time": self.commit_time,
                "disks": [d.__dict__ for d in self.disks]}
        text = json.dumps(body, indent=2)
        if self.history or self.history_policy or self.rewind is not None:
            # (absent without history: files of groups without it stay as they were)
            # The checkpoint list on one line, in C: json.dumps with ``indent`` runs
            # Python's own encoder and spends four lines on each checkpoint, which
            # made a commit with 360 checkpoints listed cost about 12 ms (and the
            # file outgrow a page at 70 of them instead of about 140).
            extra = {"history": [[n, round(t, 3)] for n, t in self.history],
                     "history_policy": self.history_policy, "rewind": self.rewind}
            text = text[:-2] + "".join(
                f',\n  "{k}": {json.dumps(v, separators=(",", ":"))}' for k, v in extra.items()
            ) + "\n}"
        return text + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "GroupState":
        try:
            body = json.loads(text)
            if body.get("format") != FORMAT or body.get("version") != VERSION:
                raise ValueError("not an nbd-mc state file of a known version")
            disks = [DiskState(**d) for d in body["disks"]]
            state = cls(committed=int(body["committed"]), generation=int(body["generation"]),
                        fenced=bool(body["fenced"]), role=body["role"],
                        handoff=body.get("handoff"), disks=disks,
                        durability=body.get("durability", "process"),
                        writer=body.get("writer"),
                        group_id=str(body.get("group_id") or ""),
                        commit_time=float(body.get("commit_time") or 0.0),
                        history=[[int(n), float(t)] for n, t in body.get("history") or []],
                        history_policy=body.get("history_policy"),
                        rewind=None if body.get("rewind") is None else int(body["rewind"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StateError(f"{where}: unreadable state file ({e})") from None
        if (state.role not in ROLES or state.committed < 0 or not state.disks
                or state.durability not in ("process", "power")):
            raise StateError(f"{where}: inconsistent state file")
        return state


def state_path(state_dir: str) -> str:
    return StateDir(state_dir).state_file


def load(state_dir: str) -> GroupState | None:
    """The state of ``state_dir``, or None when no group was created there."""
    path = state_path(state_dir)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise StateError(f"{path}: cannot read state file ({e})") from None
    return GroupState.from_json(text, path)


PAGE = 4096


def _padded(state: GroupState) -> bytes:
    data = state.to_json().encode()
    return data + b" " * (-len(data) % PAGE)


def save(state_dir: str, state: GroupState, durable: bool = True) -> None:
    """Replace the state file by rename (fsync'd when ``durable``).

    The new contents are written over a *spare*, ``state.json.tmp``, that the
    previous save left behind already allocated, so replacing the state file needs
    no new space: when the overlays have filled the file system, commit and fence
    still work.  After the rename the old file's space is free again and is taken
    at once for the next spare (a commit holds every writer of the group back).
    """
    path = state_path(state_dir)
    tmp = path + ".tmp"
    data = _padded(state)
    try:
        fd = os.open(tmp, os.O_WRONLY)  # the spare: overwritten in place
    except FileNotFoundError:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)
        os.ftruncate(fd, len(data))
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    if crashpoints.ARMED:  # (not in crashpoints.POINTS: reached only by a state file
        crashpoints.reached("state.before-rename")  # past a page, or power durability)
    os.rename(tmp, path)
    if durable:
        fsync_dir(state_dir)
    if crashpoints.ARMED:
        crashpoints.reached("state.after-rename")
    _make_spare(tmp, len(data))


def _make_spare(tmp: str, size: int) -> None:
    """Allocate the next save's file now; best effort (without it, the next save
    simply has to allocate its own)."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return
    try:
        os.pwrite(fd, b" " * size, 0)
    except OSError:
        pass
    finally:
        os.close(fd)


class StateFile:
    """The state file of a running group, kept open for cheap in-place updates."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.fd = -1

    def save(self, state: GroupState, durable: bool) -> None:
        data = _padded(state)
        if not durable and len(data) == PAGE:
            if self.fd < 0:
                self.fd = os.open(state_path(self.state_dir), os.O_RDWR)
            if os.fstat(self.fd).st_size == PAGE:
                if os.pwrite(self.fd, data, 0) == PAGE:
                    return
        self.close()
        save(self.state_dir, state, durable)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def lock_held(state_dir: str) -> bool:
    """Whether a server (or recover) holds the directory's lock; takes nothing
    (a shared probe, so two probes never disturb each other)."""
    try:
        fd = os.open(StateDir(state_dir).lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class DirLock:
    """An exclusive flock on DIR/lock: one server (or recover) per state directory.

    flock belongs to the open file description, so it survives nbdkit's fork into
    the background and vanishes with the last process holding it, also on kill -9.
    """

    def __init__(self, state_dir: str):
        self.path = StateDir(state_dir).lock
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise StateError(
                f"state directory {state_dir} is in use by another nbd-mc process (pid {holder})"
            ) from None

    def record_pid(self) -> None:
        """Write the holder's pid (called again after nbdkit forks)."""
        pid = str(os.getpid()).encode() + b"\n"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, pid, 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
