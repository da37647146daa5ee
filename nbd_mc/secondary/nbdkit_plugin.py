"""nbdkit callbacks (python plugin API_VERSION 2), adapted to the engine.

plugins/nbd_mc.py re-exports these names.  A thin adapter: it translates
between nbdkit's vocabulary (exports, handles, flags, errno) and the Group's,
and binds the control server to the command table.  Every rule -- what may be
written, what the committed view refuses, what a command accepts -- lives in
the engine or in nbd_mc/secondary/commands.py.  Imported only inside nbdkit, where the
``nbdkit`` module exists.  The callbacks run on nbdkit's worker threads; the
Group does its own locking.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time

import nbdkit

from . import commands, history, writer
from .. import blocksize
from ..address import default_control
from ..control import ControlServer
from .disk import COMMITTED_SUFFIX, parse_disk_spec
from .engine import KEEP, Group
from ..errors import NbdMcError
from ..fileio import data_extents
from ..tls import TlsFiles

_config = {"disks": [], "state_dir": None, "cluster_size": None, "durability": None,
           "subclusters": None, "nbd_uri": None, "history": KEEP,
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
    elif key == "subclusters":
        if value not in ("on", "off"):
            raise RuntimeError("subclusters must be on or off")
        _config["subclusters"] = value == "on"
    elif key == "history":  # KEEP:EVERY:MAX in seconds and bytes (launch.py writes it)
        try:
            keep, every, most = (float(x) for x in value.split(":"))
            _config["history"] = history.make_policy(keep, every, int(most))
        except (ValueError, NbdMcError) as e:
            raise RuntimeError(f"history must be KEEP:EVERY:MAX ({e})") from None
    elif key in ("durability", "control", "control_tls", "threads", "nbd_uri"):
        _config[key] = value
    else:
        raise RuntimeError(f"unknown parameter {key!r}")


def config_complete() -> None:
    if not _config["state_dir"]:
        raise RuntimeError("state_dir=DIR is required")
    if _config["threads"] not in ("parallel", "serialize"):
        raise RuntimeError("threads must be parallel or serialize")
    if not _config["control"]:
        _config["control"] = default_control(_config["state_dir"])


def thread_model():
    if _config["threads"] == "serialize":
        return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS
    return nbdkit.THREAD_MODEL_PARALLEL


def get_ready() -> None:
    """Open the group (recovering it) and listen on the control address before
    nbdkit forks, so errors reach `serve`: after the fork nbdkit's stderr is
    /dev/null, and its pidfile would already say the server runs.

    A refusal exits with a one-line message instead of a Python traceback.
    """
    global _group, _control
    try:
        _group = Group(_config["state_dir"], _config["disks"] or None,
                       cluster_size=_config["cluster_size"], durability=_config["durability"],
                       subclusters=_config["subclusters"],
                       history_policy=_config["history"])
    except (NbdMcError, ValueError) as e:
        _refuse(getattr(e, "desc", e))
    try:
        tls = TlsFiles(_config["control_tls"]) if _config["control_tls"] else None
        session = commands.Session(_group, on_quit=_quit, nbd_uri=_config["nbd_uri"])
        _control = ControlServer(_config["control"], commands.handler(session),
                                 lambda: commands.greeting(_group), tls=tls)
        _control.listen()
    except (NbdMcError, ValueError, OSError) as e:
        _group.close()
        _refuse(getattr(e, "desc", None) or getattr(e, "strerror", None) or e)
    rec = _group.recovered
    if rec["restored_clusters"] or rec["stale_dropped"]:
        nbdkit.debug(f"nbd-mc: recovered to epoch {rec['committed']}: {rec}")


def _refuse(why) -> None:
    """Exit before serving, with the one line `serve` shows as the reason."""
    sys.stderr.write(f"nbd-mc: {why}\n")
    sys.stderr.flush()
    os._exit(1)


def after_fork() -> None:
    """Threads may start only now (a thread started before the fork would be lost)."""
    _group.lock.record_pid()
    _control.start()


_connections = 0
_connections_lock = threading.Lock()


def _quit() -> None:
    """Control command quit (runs in its own thread, after the reply).

    nbdkit 1.32 exits only once every client has disconnected (nbdkit.disconnect
    arrived in 1.34), and the primary's mirror connection never does: with clients
    connected, let the requests in flight finish, hold new ones back, and exit.
    """
    nbdkit.shutdown()
    with _connections_lock:
        if not _connections:
            return  # nbdkit exits by itself and runs cleanup()
    with _group.quiesced():
        os._exit(0)


def cleanup() -> None:
    if _control is not None:
        _control.close()
    if _group is not None:
        _group.close()


# --- exports --------------------------------------------------------------------
def list_exports(readonly, is_tls):
    listed = writer.listing(_group.state, [d.name for d in _group.disks])
    if not _group.has_committed_view:  # before the first commit there is nothing to show
        listed = [(n, d) for n, d in listed if not n.endswith(COMMITTED_SUFFIX)]
    return listed


def default_export(readonly, is_tls):
    return _group.disks[0].name


class Handle:
    __slots__ = ("disk", "committed", "generation", "writable", "access", "epoch")

    def __init__(self, disk, committed, generation, writable, access=None, epoch=None):
        self.disk = disk
        self.epoch = epoch  # NAME@epoch-N: the retained epoch it reads, else None
        self.committed = committed
        self.generation = generation
        self.writable = writable
        self.access = access


def open(readonly):  # noqa: A001 - nbdkit's callback name
    name = nbdkit.export_name() or _group.disks[0].name
    disk = _group.by_name.get(writer.split_export(name)[0])
    if disk is None:
        nbdkit.set_error(errno.ENOENT)
        raise RuntimeError(f"no export {name!r}")
    access = writer.decide(_group.state, name, readonly)
    if access.refusal:
        nbdkit.set_error(errno.EACCES)
        raise RuntimeError(access.refusal)
    committed = access.kind == "committed"
    if committed:
        try:
            _group.check_committed_view(disk)
        except NbdMcError as e:
            _fail(e)
    writable = access.writable and not _group.read_only
    global _connections
    with _connections_lock:
        _connections += 1
    epoch = history.parse_epoch_suffix(writer.split_export(name)[1]) \
        if access.kind == "epoch" else None
    return Handle(disk, committed, _group.generation, writable, access, epoch)


def export_description(h):
    if h.committed:
        return f"{h.disk.name} as of commit {_group.committed} (read-only)"
    return h.access.description


def get_size(h):
    return h.disk.size


def block_size(h):
    # the writer's max_request (from its claim) applies to its own exports only
    asked = _group.max_request if h.access.kind == "writer" else None
    return blocksize.block_sizes(h.disk.cluster_size, asked)


def can_write(h):
    return h.writable


def _yes(h):
    return True


can_flush = can_trim = can_zero = can_fast_zero = can_multi_conn = _yes


def can_extents(h):
    return not h.committed and h.epoch is None


def is_rotational(h):
    return False


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_cache(h):
    return nbdkit.CACHE_EMULATE  # nbdkit reads ahead through pread; no cache() callback


# --- data path --------------------------------------------------------------------
def _fail(e: NbdMcError):
    """Hand ``e`` to nbdkit: its errno to the client (EROFS or EPERM for a refusal,
    EIO and the like only for a real I/O failure), its sentence and the rule that
    refused (mode.py's "MODE: OP", or "generation") to the server log."""
    nbdkit.set_error(e.errno)
    rule = getattr(e, "rule", None)
    if rule:
        _log_refusal(e.desc, rule)
    raise RuntimeError(f"{e.desc} [rule {rule}]" if rule else e.desc) from None


#: A refused request's line in the state directory's nbdkit.log: nbdkit in the
#: background sends its own stderr (where the RuntimeError above goes) to
#: /dev/null.  At most one line per rule per REFUSAL_LOG_EVERY seconds, with the
#: count of those left out: an old primary hammering a fenced group must not
#: fill the disk.
REFUSAL_LOG_EVERY = 1.0
_refusals = {"last": {}, "skipped": {}}
_refusals_lock = threading.Lock()


def _log_refusal(desc: str, rule: str) -> None:
    now = time.monotonic()
    with _refusals_lock:
        if now - _refusals["last"].get(rule, -REFUSAL_LOG_EVERY) < REFUSAL_LOG_EVERY:
            _refusals["skipped"][rule] = _refusals["skipped"].get(rule, 0) + 1
            return
        _refusals["last"][rule] = now
        skipped = _refusals["skipped"].pop(rule, 0)
    more = f" ({skipped} more refused by this rule since the last line)" if skipped else ""
    line = (f"{time.strftime('%Y-%m-%dT%H:%M:%S')} nbd-mc: {desc} [rule {rule}]{more}\n")
    try:
        fd = os.open(os.path.join(_config["state_dir"], "nbdkit.log"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode(errors="replace"))
        finally:
            os.close(fd)
    except OSError:
        pass  # a log line is never worth failing the request over


def _request_failed(e: NbdMcError):
    _group.request_failed(e)
    _fail(e)


def pread(h, buf, offset, flags):
    try:
        _group.check_read(h.access.kind)  # a failover may come while a client reads
        if h.epoch is not None:
            _group.read_epoch(h.disk, h.epoch, buf, offset)
        elif h.committed:
            _group.read_committed(h.disk, buf, offset)
        else:
            _group.read(h.disk, buf, offset)
    except NbdMcError as e:
        _request_failed(e)


def pwrite(h, buf, offset, flags):
    try:
        _group.write(h.disk, h.generation, buf, offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except NbdMcError as e:
        _request_failed(e)


def flush(h, flags):
    try:
        _group.flush(h.disk)
    except NbdMcError as e:
        _request_failed(e)


def trim(h, count, offset, flags):
    try:
        _group.zero(h.disk, h.generation, count, offset, fua=bool(flags & nbdkit.FLAG_FUA),
                    trim=True)
    except NbdMcError as e:
        _request_failed(e)


def zero(h, count, offset, flags):
    try:
        _group.zero(h.disk, h.generation, count, offset, fua=bool(flags & nbdkit.FLAG_FUA),
                    fast=bool(flags & nbdkit.FLAG_FAST_ZERO))
    except NbdMcError as e:
        _request_failed(e)


def extents(h, count, offset, flags):
    """Holes of the live image (nbdinfo --map), in nbdkit's extent vocabulary."""
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    end = min(offset + count, h.disk.size)
    return [(start, length, 0 if data else hole)
            for start, length, data in data_extents(h.disk.fd, offset, end,
                                                    first_only=bool(flags & nbdkit.FLAG_REQ_ONE))]


def close(h):
    global _connections
    with _connections_lock:
        _connections -= 1
