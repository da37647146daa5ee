"""A power-loss simulator for tests: a FUSE file system that remembers what is durable.

Why FUSE (and not recording syscalls and replaying prefixes): the server under
test is nbdkit running our Python plugin, plus `nbd-mc recover` and restarts --
several processes, several ways of writing (pwrite, pwritev, ftruncate, rename,
create, unlink).  A file system sees every one of them without touching the code
under test, also the ones we did not think of, and the model it keeps is the one
the question is about: *which bytes and which names would a power cut keep?*
ALICE and CrashMonkey answer the same question from a recorded block or syscall
trace; here the trace is the per-file list of operations since the last sync.

The model (the strict POSIX reading, stricter than ext4's journal):

* Every regular file has a *volatile* content (what reads return) and a *durable*
  content.  ``fsync``/``fdatasync`` of the file copies volatile to durable; both
  include the size (fdatasync must flush the size when data depends on it, and
  our files' sizes always matter).  Writes and truncates since the last sync are
  kept in order as *pending* operations.
* Every directory has volatile and durable entries (name -> inode).  create,
  mkdir, mknod, rename and unlink change the volatile entries and are logged as
  pending; ``fsync`` of the directory makes its entries durable.  fsync of a file
  does NOT make its name durable (it does on ext4 in practice, not by contract).
* A *cut* materialises a directory tree from the durable state only, or the
  durable state plus a random part of what is pending (chosen with a seed):
    - ``durable``: nothing pending survives;
    - ``prefix``: each file keeps a random prefix of its pending operations, the
      last one possibly torn at a 4 KiB page boundary; each directory a random
      prefix of its entry changes (a journal commits them in order);
    - ``reorder``: each file keeps a random subset of its pending writes, split
      into 4 KiB pages (write-back persists pages in any order); directories
      as in ``prefix``.
* A *snapshot* freezes the model at an instant, without stopping anyone: the
  daemon keeps a uniform random sample (reservoir sampling, seeded) of the states
  between any two mutating operations; each can be cut later.  Together with
  *notes* the test sends (what the client had acknowledged), a snapshot is a
  power cut at a random instant of a running workload.

What the file system refuses (cleanly, with the kernel's own error): fallocate
(pyfuse3 has no handler; the kernel answers EOPNOTSUPP, so nbd-mc's punch-hole
falls back to writing zeros and a trim is not done), lseek SEEK_DATA/SEEK_HOLE
(the kernel then reports the whole file as data), links and symlinks (ENOSYS).
Files are opened direct_io, so reads always come from the model and O_DIRECT is
accepted.  Unix sockets can be bound here (mknod), but are never materialised.

Faults can be injected too: the next N syncs of a path fail with EIO (and make
nothing durable), as a dying disk's would.

Run as ``python -m support.powerloss MOUNTPOINT CONTROL_SOCKET [SEED]``; drive it
with :class:`PowerLoss` (mount, sync, note, snapshots, cut, unmount).
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time

PAGE = 4096


# --- the model ---------------------------------------------------------------------------
class Node:
    """One inode.  Files: ``data`` (volatile), ``durable``, ``pending`` (ops since the
    last sync: ("w", offset, bytes) or ("t", size)).  Directories: ``entries``,
    ``durable_entries``, ``log`` (("set", name, ino) | ("del", name) |
    ("mv", old, new, ino)).  Guarded by Model.lock."""

    def __init__(self, ino: int, mode: int):
        self.ino = ino
        self.mode = mode
        self.data = bytearray()
        self.durable = b""
        self.pending: list = []
        self.entries: dict[bytes, int] = {}
        self.durable_entries: dict[bytes, int] = {}
        self.log: list = []
        self.mtime_ns = time.time_ns()

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


class Model:
    """Every inode, an operation counter and the snapshots.

    State block: ``nodes``, ``ops``, ``note``, ``reservoir``, ``rng``, ``failing`` -- all guarded
    by ``lock`` (taken by the FUSE handlers, which never await while holding it,
    and by the control thread)."""

    def __init__(self, seed: int = 0, samples: int = 0):
        self.lock = threading.Lock()
        self.nodes: dict[int, Node] = {}
        self.next_ino = 2
        self.ops = 0
        self.note = None
        self.samples = samples
        self.reservoir: list = []
        self.rng = random.Random(seed)
        self.failing: dict[int, int] = {}  # inode -> how many more syncs of it fail (EIO)
        root = Node(1, stat.S_IFDIR | 0o755)
        self.nodes[1] = root

    # called with the lock held, before every mutating operation
    def before_op(self) -> None:
        self.ops += 1
        if not self.samples:
            return
        n = self.ops
        if len(self.reservoir) < self.samples:
            self.reservoir.append(self.snapshot())
        else:
            k = self.rng.randrange(n)
            if k < self.samples:
                self.reservoir[k] = self.snapshot()

    def snapshot(self) -> dict:
        """The durable state and what is pending, as of now (cheap: bytes are shared)."""
        files, dirs = {}, {}
        for ino, nd in self.nodes.items():
            if nd.is_dir:
                dirs[ino] = (dict(nd.durable_entries), list(nd.log))
            elif nd.is_file:
                files[ino] = (nd.durable, list(nd.pending))
        return {"op": self.ops, "note": self.note, "files": files, "dirs": dirs,
                "modes": {ino: nd.mode for ino, nd in self.nodes.items()}}

    def new_node(self, mode: int) -> Node:
        nd = Node(self.next_ino, mode)
        self.next_ino += 1
        self.nodes[nd.ino] = nd
        return nd

    def lookup_path(self, path: str) -> Node:
        nd = self.nodes[1]
        for part in [p for p in path.split("/") if p]:
            nd = self.nodes[nd.entries[os.fsencode(part)]]
        return nd

    def check_sync(self, nd: Node) -> None:
        """An injected fault: this sync fails with EIO and makes nothing durable."""
        left = self.failing.get(nd.ino, 0)
        if left:
            self.failing[nd.ino] = left - 1
            raise OSError(errno.EIO, "injected")

    def sync_all(self) -> None:
        for nd in self.nodes.values():
            if nd.is_dir:
                nd.durable_entries = dict(nd.entries)
                nd.log = []
            elif nd.is_file:
                nd.durable = bytes(nd.data)
                nd.pending = []


def _apply(content: bytearray, op) -> None:
    if op[0] == "w":
        _, off, data = op
        if len(content) < off:
            content.extend(bytes(off - len(content)))
        content[off:off + len(data)] = data
    else:
        size = op[1]
        if size < len(content):
            del content[size:]
        else:
            content.extend(bytes(size - len(content)))


def _pages(op):
    """A write split at page boundaries (write-back persists pages, not writes)."""
    if op[0] != "w":
        return [op]
    _, off, data = op
    out, pos = [], 0
    while pos < len(data):
        n = min(len(data) - pos, PAGE - (off + pos) % PAGE)
        out.append(("w", off + pos, data[pos:pos + n]))
        pos += n
    return out


def file_content(durable: bytes, pending: list, mode: str, rng: random.Random) -> bytes:
    content = bytearray(durable)
    if mode == "durable" or not pending:
        return bytes(content)
    if mode == "prefix":
        k = rng.randint(0, len(pending))
        for op in pending[:k]:
            _apply(content, op)
        if k < len(pending):  # the next one may be torn
            pieces = _pages(pending[k])
            for piece in pieces[:rng.randint(0, len(pieces) - 1)] if len(pieces) > 1 else []:
                _apply(content, piece)
    elif mode == "reorder":
        for op in pending:
            for piece in _pages(op):
                if rng.random() < 0.5:
                    _apply(content, piece)
    else:
        raise ValueError(f"unknown cut mode {mode!r}")
    return bytes(content)


def dir_entries(durable: dict, log: list, mode: str, rng: random.Random) -> dict:
    entries = dict(durable)
    if mode == "durable" or not log:
        return entries
    for rec in log[:rng.randint(0, len(log))]:
        if rec[0] == "set":
            entries[rec[1]] = rec[2]
        elif rec[0] == "del":
            entries.pop(rec[1], None)
        else:  # an atomic rename within the directory
            entries.pop(rec[1], None)
            entries[rec[2]] = rec[3]
    return entries


def materialise(snap: dict, dest: str, mode: str, seed: int) -> dict:
    """Write the tree a power cut at ``snap`` leaves (see the module docstring)."""
    rng = random.Random(seed)
    counts = {"files": 0, "dirs": 0, "pending_ops": 0, "pending_entries": 0}
    os.makedirs(dest, exist_ok=True)

    def walk(ino: int, path: str) -> None:
        durable, log = snap["dirs"][ino]
        counts["dirs"] += 1
        counts["pending_entries"] += len(log)
        for name, child in sorted(dir_entries(durable, log, mode, rng).items()):
            cpath = os.path.join(path, os.fsdecode(name))
            cmode = snap["modes"][child]
            if stat.S_ISDIR(cmode):
                os.mkdir(cpath, stat.S_IMODE(cmode))
                walk(child, cpath)
            elif stat.S_ISREG(cmode):
                durable_data, pending = snap["files"][child]
                counts["files"] += 1
                counts["pending_ops"] += len(pending)
                with open(cpath, "wb") as f:
                    f.write(file_content(durable_data, pending, mode, rng))
                os.chmod(cpath, stat.S_IMODE(cmode))
            # sockets and the like are never materialised
    walk(1, dest)
    return counts


# --- the FUSE daemon ---------------------------------------------------------------------
def _serve(mountpoint: str, control: str, seed: int, samples: int) -> None:
    import pyfuse3
    import trio

    model = Model(seed, samples)

    def attrs(nd: Node):
        a = pyfuse3.EntryAttributes()
        a.st_ino = nd.ino
        a.generation = 0
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_mode = nd.mode
        a.st_nlink = 2 if nd.is_dir else 1
        a.st_uid = os.getuid()
        a.st_gid = os.getgid()
        a.st_rdev = 0
        a.st_size = len(nd.data) if nd.is_file else 0
        a.st_blksize = PAGE
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = nd.mtime_ns
        return a

    def err(code):
        return pyfuse3.FUSEError(code)

    def node(ino) -> Node:
        try:
            return model.nodes[ino]
        except KeyError:
            raise err(errno.ENOENT) from None

    def child(parent: Node, name: bytes) -> Node:
        if name == b".":
            return parent
        ino = parent.entries.get(name)
        if ino is None:
            raise err(errno.ENOENT)
        return model.nodes[ino]

    def add_entry(parent: Node, name: bytes, mode: int) -> Node:
        if not parent.is_dir:
            raise err(errno.ENOTDIR)
        if name in parent.entries:
            raise err(errno.EEXIST)
        model.before_op()
        nd = model.new_node(mode)
        parent.entries[name] = nd.ino
        parent.log.append(("set", name, nd.ino))
        parent.mtime_ns = time.time_ns()
        return nd

    class Ops(pyfuse3.Operations):
        async def lookup(self, parent_inode, name, ctx):
            with model.lock:
                return attrs(child(node(parent_inode), name))

        async def getattr(self, inode, ctx):
            with model.lock:
                return attrs(node(inode))

        async def setattr(self, inode, attr, fields, fh, ctx):
            with model.lock:
                nd = node(inode)
                if fields.update_size:
                    if not nd.is_file:
                        raise err(errno.EINVAL)
                    model.before_op()
                    _apply(nd.data, ("t", attr.st_size))
                    nd.pending.append(("t", attr.st_size))
                if fields.update_mode:
                    nd.mode = stat.S_IFMT(nd.mode) | stat.S_IMODE(attr.st_mode)
                nd.mtime_ns = time.time_ns()
                return attrs(nd)

        async def open(self, inode, flags, ctx):
            with model.lock:
                nd = node(inode)
                if not nd.is_file:
                    raise err(errno.EACCES)
            return pyfuse3.FileInfo(fh=inode, direct_io=True)

        async def create(self, parent_inode, name, mode, flags, ctx):
            with model.lock:
                nd = add_entry(node(parent_inode), name, stat.S_IFREG | stat.S_IMODE(mode))
                return pyfuse3.FileInfo(fh=nd.ino, direct_io=True), attrs(nd)

        async def read(self, fh, off, size):
            with model.lock:
                return bytes(node(fh).data[off:off + size])

        async def write(self, fh, off, buf):
            with model.lock:
                nd = node(fh)
                model.before_op()
                op = ("w", off, bytes(buf))
                _apply(nd.data, op)
                nd.pending.append(op)
                nd.mtime_ns = time.time_ns()
                return len(buf)

        async def fsync(self, fh, datasync):
            with model.lock:
                nd = node(fh)
                model.before_op()
                try:
                    model.check_sync(nd)
                except OSError as e:
                    raise err(e.errno) from None
                nd.durable = bytes(nd.data)
                nd.pending = []

        async def opendir(self, inode, ctx):
            with model.lock:
                if not node(inode).is_dir:
                    raise err(errno.ENOTDIR)
            return inode

        async def readdir(self, fh, start_id, token):
            with model.lock:
                nd = node(fh)
                items = sorted(nd.entries.items())[start_id:]
                out = [(name, attrs(model.nodes[ino])) for name, ino in items]
            for i, (name, a) in enumerate(out):
                if not pyfuse3.readdir_reply(token, name, a, start_id + i + 1):
                    break

        async def fsyncdir(self, fh, datasync):
            with model.lock:
                nd = node(fh)
                model.before_op()
                try:
                    model.check_sync(nd)
                except OSError as e:
                    raise err(e.errno) from None
                nd.durable_entries = dict(nd.entries)
                nd.log = []

        async def mkdir(self, parent_inode, name, mode, ctx):
            with model.lock:
                return attrs(add_entry(node(parent_inode), name, stat.S_IFDIR | stat.S_IMODE(mode)))

        async def mknod(self, parent_inode, name, mode, rdev, ctx):
            with model.lock:
                return attrs(add_entry(node(parent_inode), name, mode))

        async def unlink(self, parent_inode, name, ctx):
            with model.lock:
                parent = node(parent_inode)
                nd = child(parent, name)
                if nd.is_dir:
                    raise err(errno.EISDIR)
                model.before_op()
                del parent.entries[name]
                parent.log.append(("del", name))

        async def rmdir(self, parent_inode, name, ctx):
            with model.lock:
                parent = node(parent_inode)
                nd = child(parent, name)
                if not nd.is_dir:
                    raise err(errno.ENOTDIR)
                if nd.entries:
                    raise err(errno.ENOTEMPTY)
                model.before_op()
                del parent.entries[name]
                parent.log.append(("del", name))

        async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
            if flags:
                raise err(errno.EINVAL)
            with model.lock:
                old, new = node(parent_inode_old), node(parent_inode_new)
                nd = child(old, name_old)
                target = new.entries.get(name_new)
                if target is not None and model.nodes[target].is_dir:
                    raise err(errno.EISDIR)
                model.before_op()
                del old.entries[name_old]
                new.entries[name_new] = nd.ino
                if old is new:
                    old.log.append(("mv", name_old, name_new, nd.ino))
                else:
                    new.log.append(("set", name_new, nd.ino))
                    old.log.append(("del", name_old))

        async def release(self, fh):
            pass

        async def releasedir(self, fh):
            pass

        async def flush(self, fh):
            pass

        async def forget(self, inode_list):
            pass  # inodes live as long as the daemon: a durable name may still need one

        async def statfs(self, ctx):
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = PAGE
            s.f_blocks = s.f_bfree = s.f_bavail = 1 << 20
            s.f_files = s.f_ffree = s.f_favail = 1 << 20
            s.f_namemax = 255
            return s

        async def access(self, inode, mode, ctx):
            return True

    def control_loop(listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    def handle(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                req = json.loads(line)
                try:
                    reply = {"ok": True, **command(req)}
                except Exception as e:  # reported to the test, never fatal here
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()

    def command(req: dict) -> dict:
        op = req["op"]
        if op == "sync":  # also starts the sampling afresh: the states before are moot
            with model.lock:
                model.sync_all()
                model.ops = 0
                model.reservoir = []
            return {}
        if op == "note":
            with model.lock:
                model.note = req["value"]
            return {}
        if op == "cut":  # now, or one of the sampled snapshots
            with model.lock:
                snap = model.snapshot() if req.get("sample") is None \
                    else model.reservoir[req["sample"]]
            counts = materialise(snap, req["dest"], req["mode"], req["seed"])
            return {"counts": counts, "at_op": snap["op"], "note": snap["note"]}
        if op == "fail":  # the next ``count`` fsyncs of a path (file or directory) fail
            with model.lock:
                model.failing[model.lookup_path(req["path"]).ino] = req["count"]
            return {}
        if op == "samples":
            with model.lock:
                return {"samples": [{"op": s["op"], "note": s["note"]} for s in model.reservoir],
                        "ops": model.ops}
        if op == "stats":
            with model.lock:
                return {"ops": model.ops, "inodes": len(model.nodes)}
        raise ValueError(f"unknown command {op!r}")

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(control)
    listener.listen(4)
    pyfuse3.init(Ops(), mountpoint, ["fsname=nbd-mc-powerloss", "subtype=powerloss"])
    threading.Thread(target=control_loop, args=(listener,), daemon=True).start()
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


# --- the test side -------------------------------------------------------------------------
class PowerLoss:
    """One mounted power-loss file system (a subprocess) and its control connection.

    State: ``proc`` (the daemon; set once), ``_sock``/``_file`` (the control
    connection; None after close), requests on it serialised by ``_lock``.
    """

    def __init__(self, mountpoint: str, control: str, *, seed: int = 0, samples: int = 0):
        self.mountpoint = mountpoint
        self.control = control
        os.makedirs(mountpoint, exist_ok=True)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""))
        # its stderr goes to a file: a pipe nobody reads would block the file system
        # (and every request on it) once full
        self.log = control + ".log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "support.powerloss", mountpoint, control, str(seed),
                 str(samples)], env=env, stdout=subprocess.DEVNULL, stderr=log)
        self._sock = None
        deadline = time.monotonic() + 30
        while not (os.path.ismount(mountpoint) and os.path.exists(control)):
            if self.proc.poll() is not None:
                with open(self.log, errors="replace") as f:
                    raise RuntimeError(f"powerloss file system failed: {f.read()}")
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("powerloss file system did not mount")
            time.sleep(0.01)  # polling for the mount with a deadline
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(control)
        self._file = self._sock.makefile("rwb")
        self._lock = threading.Lock()

    def _call(self, **req) -> dict:
        with self._lock:
            self._file.write(json.dumps(req).encode() + b"\n")
            self._file.flush()
            line = self._file.readline()
        if not line:
            raise RuntimeError("powerloss file system went away")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(reply["error"])
        return reply

    def sync(self) -> None:
        """Make everything durable (what `sync` plus a quiet minute would do) and
        start sampling instants afresh."""
        self._call(op="sync")

    def note(self, value) -> None:
        """Attach ``value`` to every later state: what the client knows at this point."""
        self._call(op="note", value=value)

    def fail_sync(self, path: str, count: int = 1) -> None:
        """The next ``count`` fsync/fdatasync of ``path`` (relative to the mount
        point; a file or a directory) fail with EIO and make nothing durable."""
        self._call(op="fail", path=path, count=count)

    def samples(self) -> list[dict]:
        return self._call(op="samples")["samples"]

    def stats(self) -> dict:
        return self._call(op="stats")

    def cut(self, dest: str, mode: str = "durable", seed: int = 0, sample: int | None = None) -> dict:
        """Materialise into ``dest`` what a power cut now (or at sampled state
        ``sample``) leaves behind."""
        return self._call(op="cut", dest=dest, mode=mode, seed=seed, sample=sample)

    def close(self) -> None:
        if self._sock is not None:
            self._file.close()
            self._sock.close()
            self._sock = None
        if self.proc.poll() is None:
            subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.mountpoint):
            subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0,
           int(sys.argv[4]) if len(sys.argv) > 4 else 0)
