"""nbdkit callbacks (python plugin API_VERSION 2), adapted to the engine.

plugins/nbd_mc.py re-exports these names; nothing here knows about epochs, it only
translates between nbdkit's vocabulary and the Group's.  Imported only inside
nbdkit, where the ``nbdkit`` module exists.
"""

from __future__ import annotations

import errno
import os
import sys
import threading

import nbdkit

from . import __version__
from .control import ControlServer, TlsFiles
from .engine import Group, parse_disk_spec
from .errors import BadRequest, CommandNotFound, NbdMcError

COMMITTED_SUFFIX = "@committed"
MAX_REQUEST = 32 << 20

_config = {"disks": [], "state_dir": None, "cluster_size": None, "durability": None,
           "control": None, "control_tls": None, "threads": "serialize"}
_group: Group | None = None
_control: ControlServer | None = None


# --- configuration -----------------------------------------------------------
def config(key: str, value: str) -> None:
    if key == "disk":
        _config["disks"].append(parse_disk_spec(value))
    elif key == "state_dir":
        _config["state_dir"] = os.path.abspath(value)
    elif key == "cluster_size":
        _config["cluster_size"] = nbdkit.parse_size(value)
    elif key in ("durability", "control", "control_tls", "threads"):
        _config[key] = value
    else:
        raise RuntimeError(f"unknown parameter {key!r}")


def config_complete() -> None:
    if not _config["state_dir"]:
        raise RuntimeError("state_dir=DIR is required")
    if _config["threads"] not in ("parallel", "serialize"):
        raise RuntimeError("threads must be parallel or serialize")
    if not _config["control"]:
        _config["control"] = os.path.join(_config["state_dir"], "control.sock")


def thread_model():
    if _config["threads"] == "serialize":
        return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS
    return nbdkit.THREAD_MODEL_PARALLEL


def get_ready() -> None:
    """Open the group (recovering it) before nbdkit forks, so errors reach `serve`.

    A refusal exits with a one-line message instead of a Python traceback.
    """
    global _group
    try:
        _group = Group(_config["state_dir"], _config["disks"] or None,
                       cluster_size=_config["cluster_size"], durability=_config["durability"])
    except (NbdMcError, ValueError) as e:
        sys.stderr.write(f"nbd-mc: {getattr(e, 'desc', e)}\n")
        sys.stderr.flush()
        os._exit(1)
    rec = _group.recovered
    if rec["restored_clusters"] or rec["stale_dropped"]:
        nbdkit.debug(f"nbd-mc: recovered to epoch {rec['committed']}: {rec}")


def after_fork() -> None:
    """Threads may start only now (a thread started before the fork would be lost)."""
    global _control
    _group.lock.record_pid()
    tls = TlsFiles(_config["control_tls"]) if _config["control_tls"] else None
    _control = ControlServer(_config["control"], handle_control, greeting, tls=tls,
                             on_quit=_quit)
    _control.start()


_connections = 0
_connections_lock = threading.Lock()


def _quit() -> None:
    """Control command quit (runs in its own thread).

    nbdkit 1.32 exits only once every client has disconnected (nbdkit.disconnect
    arrived in 1.34), and the primary's mirror connection never does: with clients
    connected, let the requests in flight finish, hold new ones back, and exit.
    """
    nbdkit.shutdown()
    with _connections_lock:
        if not _connections:
            return  # nbdkit exits by itself and runs cleanup()
    with _group._control, _group.gate.closed():
        for d in _group.disks:
            try:
                os.fdatasync(d.fd)
            except OSError:
                pass
        os._exit(0)


def cleanup() -> None:
    if _control is not None:
        _control.close()
    if _group is not None:
        _group.close()


# --- control channel ------------------------------------------------------------
def greeting() -> dict:
    return {"version": __version__, "committed": _group.committed,
            "disks": [d.name for d in _group.disks]}


_COMMANDS = {
    "query-status": ((), lambda g, a: g.status()),
    "commit": (("epoch",), lambda g, a: g.commit(a["epoch"])),
    "rollback": ((), lambda g, a: g.rollback()),
    "fence": ((), lambda g, a: g.fence()),
    "failover": (("instant",), lambda g, a: g.failover(a.get("instant", False))),
    "new-session": (("stale_after",), lambda g, a: g.new_session(a.get("stale_after"))),
}


def handle_control(name: str, arguments: dict) -> dict:
    entry = _COMMANDS.get(name)
    if entry is None:
        raise CommandNotFound(f"unknown command {name!r}; known: {', '.join(sorted(_COMMANDS))}, quit")
    allowed, run = entry
    extra = set(arguments) - set(allowed)
    if extra:
        raise BadRequest(f"{name}: unexpected arguments {', '.join(sorted(extra))}")
    if name == "commit" and "epoch" not in arguments:
        raise BadRequest("commit: missing argument 'epoch'")
    return run(_group, arguments)


# --- exports --------------------------------------------------------------------
def list_exports(readonly, is_tls):
    out = []
    for d in _group.disks:
        out.append((d.name, f"live replica of {d.name}"))
        out.append((d.name + COMMITTED_SUFFIX, f"{d.name} as of the last commit (read-only)"))
    return out


def default_export(readonly, is_tls):
    return _group.disks[0].name


class Handle:
    __slots__ = ("disk", "committed", "generation", "writable")

    def __init__(self, disk, committed, generation, writable):
        self.disk = disk
        self.committed = committed
        self.generation = generation
        self.writable = writable


def open(readonly):  # noqa: A001 - nbdkit's callback name
    name = nbdkit.export_name() or _group.disks[0].name
    committed = name.endswith(COMMITTED_SUFFIX)
    base = name[:-len(COMMITTED_SUFFIX)] if committed else name
    disk = _group.by_name.get(base)
    if disk is None:
        nbdkit.set_error(errno.ENOENT)
        raise RuntimeError(f"no export {name!r}")
    writable = not (readonly or committed or _group.read_only)
    global _connections
    with _connections_lock:
        _connections += 1
    return Handle(disk, committed, _group.generation, writable)


def export_description(h):
    if h.committed:
        return f"{h.disk.name} as of commit {_group.committed} (read-only)"
    return f"live replica of {h.disk.name} (nbd-mc {_group.state.role})"


def get_size(h):
    return h.disk.size


def block_size(h):
    preferred = min(max(h.disk.cluster_size, 512), MAX_REQUEST)
    return (1, preferred, 0xFFFFFFFF)


def can_write(h):
    return h.writable


def _yes(h):
    return True


can_flush = can_trim = can_zero = can_fast_zero = can_multi_conn = _yes


def can_extents(h):
    return not h.committed


def is_rotational(h):
    return False


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_cache(h):
    return nbdkit.CACHE_EMULATE


# --- data path --------------------------------------------------------------------
def _fail(e: NbdMcError):
    nbdkit.set_error(e.errno)
    raise RuntimeError(e.desc) from None


def pread(h, buf, offset, flags):
    try:
        if h.committed:
            if not _group.committed:
                nbdkit.set_error(errno.EIO)
                raise RuntimeError(f"{h.disk.name}{COMMITTED_SUFFIX}: no epoch committed yet")
            _group.read_committed(h.disk, buf, offset)
        else:
            _group.read(h.disk, buf, offset)
    except NbdMcError as e:
        _fail(e)


def pwrite(h, buf, offset, flags):
    try:
        _group.write(h.disk, h.generation, buf, offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except NbdMcError as e:
        _fail(e)


def flush(h, flags):
    try:
        _group.flush(h.disk)
    except NbdMcError as e:
        _fail(e)


def trim(h, count, offset, flags):
    try:
        _group.zero(h.disk, h.generation, count, offset, fua=bool(flags & nbdkit.FLAG_FUA),
                    trim=True)
    except NbdMcError as e:
        _fail(e)


def zero(h, count, offset, flags):
    try:
        _group.zero(h.disk, h.generation, count, offset, fua=bool(flags & nbdkit.FLAG_FUA),
                    fast=bool(flags & nbdkit.FLAG_FAST_ZERO))
    except NbdMcError as e:
        _fail(e)


SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


def extents(h, count, offset, flags):
    """Holes of the image, found with SEEK_DATA/SEEK_HOLE (nbdinfo --map)."""
    fd = h.disk.fd
    end = min(offset + count, h.disk.size)
    out = []
    pos = offset
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    while pos < end:
        try:
            data = os.lseek(fd, pos, SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                return [(offset, end - offset, 0)]
            data = end
        data = min(data, end)
        if data > pos:
            out.append((pos, data - pos, hole))
            pos = data
            if flags & nbdkit.FLAG_REQ_ONE:
                break
            continue
        try:
            nxt = min(os.lseek(fd, pos, SEEK_HOLE), end)
        except OSError:
            nxt = end
        out.append((pos, nxt - pos, 0))
        pos = nxt
        if flags & nbdkit.FLAG_REQ_ONE:
            break
    return out


def cache(h, count, offset, flags):
    pass


def close(h):
    global _connections
    with _connections_lock:
        _connections -= 1


_ = threading  # the callbacks run on nbdkit's worker threads; the Group locks
