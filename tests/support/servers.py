"""Shared fixtures for tests that run the real server: `nbd-mc serve` (nbdkit with
our plugin) in a short temporary directory, real libnbd clients, a byte model of
every disk, and the qemu-img oracles.

Import from test files (``from servers import ...``); the pytest fixtures
``workdir`` and ``servers`` are defined here and become visible to a test module
that imports them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import nbd
import pytest

from nbd_mc.control import ControlClient
from nbd_mc.statedir import StateDir
from nbd_mc.secondary.launch import pid_alive  # noqa: F401  (re-exported for callers of this module)
from nbd_mc.secondary.state import lock_held

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.dirname(sys.executable)
PLUGIN_MARK = "plugins/nbd_mc.py"
DEADLINE = 30.0  # a safety net for polling loops, never a synchronisation


def subprocess_env(**extra) -> dict:
    """The environment for every subprocess: venv and Debian's python first on PATH
    (nbdsh runs `python3 -m nbd`), no crash point unless asked for."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:/usr/bin:" + env.get("PATH", "")
    env.pop("NBD_MC_CRASHPOINT", None)
    env.pop("NBD_MC_CRASHPOINT_MARK", None)
    env.pop("NBD_MC_CONTROL", None)
    env["LC_ALL"] = "C"
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


def nbd_mc_argv() -> list[str]:
    exe = os.path.join(VENV_BIN, "nbd-mc")
    if os.path.exists(exe):
        return [exe]
    return [sys.executable, "-m", "nbd_mc.cli"]


def run(argv, env=None, timeout=120, input=None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env or subprocess_env(),
                          timeout=timeout, input=input)


def nbd_mc(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    """Run the `nbd-mc` command line; returns the completed process."""
    return run(nbd_mc_argv() + [str(a) for a in args], env=env, timeout=timeout)


def describe(r: subprocess.CompletedProcess) -> str:
    return f"{r.args} -> {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"


# --- qemu-img oracles -------------------------------------------------------------------
def qemu_img_check(overlay: str) -> subprocess.CompletedProcess:
    """`qemu-img check`: 0 clean, 2 corruption, 3 leaked clusters only."""
    return run(["qemu-img", "check", "-f", "qcow2", overlay])


def assert_check(overlay: str, allowed=(0, 3)) -> int:
    r = qemu_img_check(overlay)
    assert r.returncode in allowed, f"qemu-img check {overlay}: {describe(r)}"
    return r.returncode


def assert_compare(overlay: str, expected_raw: str) -> None:
    """The overlay (over its backing image) shows exactly the bytes of expected_raw."""
    r = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", overlay, expected_raw])
    assert r.returncode == 0, f"qemu-img compare: {describe(r)}"


# --- byte comparisons -------------------------------------------------------------------
def first_difference(a: bytes, b: bytes) -> int | None:
    if len(a) != len(b):
        return min(len(a), len(b))
    if a == b:
        return None
    lo, hi = 0, len(a)
    step = 1 << 16
    for off in range(0, len(a), step):
        if a[off:off + step] != b[off:off + step]:
            lo, hi = off, min(off + step, len(a))
            break
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return None


def assert_bytes(actual: bytes, expected: bytes, what: str) -> None:
    """Equality of disk contents with a readable message (never dumps megabytes)."""
    off = first_difference(bytes(actual), bytes(expected))
    if off is not None:
        end = off
        while end < min(len(actual), len(expected)) and actual[end] != expected[end]:
            end += 1
        pytest.fail(f"{what}: differs from the model at byte {off} (cluster {off >> 16} of 64K) "
                    f"for {end - off} bytes: got {bytes(actual[off:off + 16]).hex()} expected "
                    f"{bytes(expected[off:off + 16]).hex()} (sizes {len(actual)}/{len(expected)})")


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def make_image(path: str, size: int, rng: random.Random | None = None,
               data_fraction: float = 0.5, chunk: int = 32768) -> bytes:
    """A sparse image of ``size`` bytes: random data in some chunks, holes and
    explicit zeros elsewhere.  Returns its contents (the initial model)."""
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        if rng is not None:
            for off in range(0, size, chunk):
                n = min(chunk, size - off)
                r = rng.random()
                if r < data_fraction:
                    content[off:off + n] = rng.randbytes(n)
                elif r < data_fraction + 0.1:
                    pass  # explicit zeros written below
                else:
                    continue  # a hole
                f.seek(off)
                f.write(content[off:off + n])
    return bytes(content)


# --- models -------------------------------------------------------------------------------
class GroupModel:
    """What every disk of a group must hold: ``live`` (the image now) and
    ``committed`` (each epoch's committed contents, by epoch number)."""

    def __init__(self, initial: dict[str, bytes], committed_epoch: int = 0):
        self.live = {n: bytearray(b) for n, b in initial.items()}
        self.epoch = committed_epoch
        self.history = {committed_epoch: {n: bytes(b) for n, b in initial.items()}}

    @property
    def committed(self) -> dict[str, bytes]:
        return self.history[self.epoch]

    def write(self, disk: str, offset: int, data: bytes) -> None:
        self.live[disk][offset:offset + len(data)] = data

    def zero(self, disk: str, offset: int, count: int) -> None:
        self.live[disk][offset:offset + count] = bytes(count)

    def commit(self, epoch: int) -> None:
        assert epoch == self.epoch + 1
        self.history[epoch] = {n: bytes(b) for n, b in self.live.items()}
        self.epoch = epoch

    def rollback(self) -> None:
        self.live = {n: bytearray(b) for n, b in self.committed.items()}

    def settle(self, epoch: int) -> None:
        """After a crash and recovery: the group is at ``epoch`` (a known one)."""
        assert epoch in self.history, f"epoch {epoch} was never committed by the test"
        self.epoch = epoch
        for e in [e for e in self.history if e > epoch]:
            del self.history[e]
        self.rollback()


# --- NBD clients ----------------------------------------------------------------------
@contextlib.contextmanager
def group_on_images(tmp_path, sizes: dict[str, int]):
    """For an in-process engine test: images of ``sizes`` with random data, an
    opener of Groups on them sharing one state directory (the first one creates
    the group), and their model.  Yields (open_group, model, state_dir, rng);
    every group still open is closed at the end."""
    from nbd_mc.secondary.engine import Group
    rng = random.Random(str(tmp_path))
    disks, initial = [], {}
    for name, size in sizes.items():
        path = str(tmp_path / f"{name}.raw")
        initial[name] = make_image(path, size, rng)
        disks.append((name, path))
    st = str(tmp_path / "state")
    groups = []

    def open_group(**kwargs):
        g = Group(st, disks if not groups else None, **kwargs)
        groups.append(g)
        return g

    try:
        yield open_group, GroupModel(initial), st, rng
    finally:
        for g in groups:
            if g.lock is not None and g.lock.fd >= 0:
                g.close()


def connect(sock: str, export: str = "") -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(sock)
    return h


def read_all(h: nbd.NBD, chunk: int = 4 << 20) -> bytes:
    size = h.get_size()
    out = bytearray()
    for off in range(0, size, chunk):
        out += h.pread(min(chunk, size - off), off)
    return bytes(out)


def nbd_errno(e: nbd.Error) -> int | None:
    """The errno number of a libnbd error (``.errno`` is its name, e.g. "EPERM")."""
    return getattr(e, "errnum", None)


# --- the server -----------------------------------------------------------------------------
def short_tmpdir(prefix: str = "nbdmc-") -> str:
    """A directory short enough for unix socket paths (107 bytes)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")




def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, what: str, timeout: float = DEADLINE, poll: float = 0.005):
    """Poll ``cond`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(poll)  # polling a condition with a deadline


def plugin_pids(marker: str) -> list[int]:
    """nbdkit processes running our plugin whose command line contains ``marker``."""
    r = subprocess.run(["pgrep", "-f", f"{PLUGIN_MARK}.*{marker}"], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


class Server:
    """One `nbd-mc serve` state directory: start, talk to, kill, restart, stop.

    ``disks`` maps names to image paths (order = group order, first = default export).
    """

    def __init__(self, root: str, disks: dict[str, str], *, state_dir: str | None = None,
                 args=(), durability: str | None = None, cluster_size: int | None = None):
        self.root = root
        self.disks = dict(disks)
        self.state_dir = state_dir or os.path.join(root, "st")
        self.args = list(args)
        if durability:
            self.args += ["--durability", durability]
        if cluster_size:
            self.args += ["--cluster-size", str(cluster_size)]
        self.pid: int | None = None
        self.serve_result: subprocess.CompletedProcess | None = None
        self._handles: list[nbd.NBD] = []
        self._control: ControlClient | None = None

    # paths: the state directory's own names (nbd_mc/statedir.py), never spelled here
    @property
    def sock(self) -> str:
        return StateDir(self.state_dir).nbd_socket

    @property
    def control_path(self) -> str:
        return StateDir(self.state_dir).control

    @property
    def pidfile(self) -> str:
        return StateDir(self.state_dir).pidfile

    def overlay(self, name: str) -> str:
        return StateDir(self.state_dir).overlay(name)

    def image(self, name: str) -> str:
        return self.disks[name]

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def state(self) -> dict:
        with open(StateDir(self.state_dir).state_file) as f:
            return json.load(f)

    # lifecycle
    def serve_argv(self, with_disks: bool = True) -> list:
        disks = [f"{n}={p}" for n, p in self.disks.items()] if with_disks else []
        return ["serve", *disks, "--state-dir", self.state_dir, *self.args]

    def start(self, *, crashpoint: str | None = None, with_disks: bool = True,
              check: bool = True, mark: str | None = None) -> subprocess.CompletedProcess:
        """`nbd-mc serve`; ``crashpoint``/``mark``: NBD_MC_CRASHPOINT[_MARK]
        (nbd_mc/crashpoints.py)."""
        r = nbd_mc(*self.serve_argv(with_disks),
                   env=subprocess_env(NBD_MC_CRASHPOINT=crashpoint,
                                      NBD_MC_CRASHPOINT_MARK=mark if crashpoint else None))
        self.serve_result = r
        if check:
            assert r.returncode == 0, f"serve failed: {describe(r)}"
        if r.returncode == 0:
            self.pid = int(read_file(self.pidfile).strip())
            assert pid_alive(self.pid)
        return r

    def cli(self, *args) -> subprocess.CompletedProcess:
        """`nbd-mc CMD ... --state-dir DIR`."""
        return nbd_mc(*args, "--state-dir", self.state_dir)

    def control(self) -> ControlClient:
        """A control connection (one per server, reused; closed at stop)."""
        if self._control is None:
            self._control = ControlClient(self.control_path, timeout=60)
        return self._control

    def execute(self, name: str, **arguments) -> dict:
        return self.control().execute(name, **arguments)

    def connect(self, export: str = "") -> nbd.NBD:
        h = connect(self.sock, export)
        self._handles.append(h)
        return h

    def close_clients(self) -> None:
        for h in self._handles:
            try:
                h.shutdown()  # NBD_CMD_DISC: the server sees the client go
            except nbd.Error:  # a handle whose server died: nothing to shut down
                pass
        self._handles = []
        if self._control is not None:
            try:
                self._control.close()
            except OSError:
                pass
            self._control = None

    def kill9(self) -> None:
        """Real SIGKILL of nbdkit (the pid nbd-mc serve wrote), then wait until it is gone."""
        pid = self.pid or int(read_file(self.pidfile).strip())
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait_dead()

    def wait_dead(self) -> None:
        """Wait until the server process is gone (after a crash point or a kill)."""
        if self.pid is not None:
            pid = self.pid
            wait_until(lambda: not pid_alive(pid), f"nbdkit pid {pid} to die")
        self.close_clients()
        self.pid = None

    def running(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)

    def stop(self) -> None:
        """`nbd-mc stop`; SIGKILL if that does not work; then no plugin process may remain."""
        self.close_clients()
        if self.pid is not None and pid_alive(self.pid):
            r = self.cli("stop")
            if r.returncode != 0 and pid_alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
            pid = self.pid
            wait_until(lambda: not pid_alive(pid), f"nbdkit pid {pid} to stop")
        self.pid = None

    def quit(self) -> None:
        """Stop the server cleanly as `nbd-mc stop` does -- the control command quit --
        but over the control connection the test already holds, then wait until nbdkit
        is gone and has let go of the state directory.  The crash and power-loss sweeps
        stop a server after every crash state they check (thousands of times): a CLI
        process starting costs seconds on a loaded machine.  `nbd-mc stop` itself is
        tested by system/test_cli.py and every test that calls stop()."""
        if self.pid is None or not pid_alive(self.pid):
            return self.stop()
        pid = self.pid
        control = self.control()
        self._control = None
        self.close_clients()  # the NBD clients go first, as before `nbd-mc stop`
        try:
            control.execute("quit")
        finally:
            control.close()
        wait_until(lambda: not pid_alive(pid) and not lock_held(self.state_dir),
                   f"nbdkit pid {pid} to quit")
        self.pid = None

    def kill_all(self) -> None:
        """Teardown: whatever of ours is still running (also one started by hand) dies."""
        self.close_clients()
        for pid in plugin_pids(f"state_dir={self.state_dir} "):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pid = None


class Servers:
    """The ``servers`` fixture: creates Server objects in a short tmp dir and stops
    every one of them at teardown, asserting that no nbdkit of ours is left."""

    def __init__(self, root: str):
        self.root = root
        self.made: list[Server] = []

    def new(self, disks: dict[str, str], **kw) -> Server:
        s = Server(self.root, disks, **kw)
        self.made.append(s)
        return s

    def path(self, *parts) -> str:
        return os.path.join(self.root, *parts)

    def teardown(self) -> list[int]:
        for s in self.made:
            try:
                s.stop()
            except BaseException:
                s.kill_all()
        leaked = plugin_pids(self.root + "/")
        for pid in leaked:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leaked


@pytest.fixture
def workdir():
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def servers(workdir):
    s = Servers(workdir)
    yield s
    leaked = s.teardown()
    assert not leaked, f"nbdkit processes left running after the test: {leaked}"


# --- raw control socket -----------------------------------------------------------------
class RawControl:
    """A control connection that sends bytes exactly as given (for malformed input)."""

    def __init__(self, path: str, timeout: float = 30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.greeting = self.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> dict | None:
        """The next reply line as JSON, or None when the server closed the connection."""
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def request(self, data: bytes) -> dict | None:
        self.send(data)
        return self.read()

    def close(self) -> None:
        self.sock.close()


def is_connection_loss(e: BaseException) -> bool:
    """What a client sees when the server was killed under it."""
    if isinstance(e, (ConnectionError, EOFError, BrokenPipeError)):
        return True
    if isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
        return True
    return isinstance(e, nbd.Error)


def connect_as_children(path: str, count: int, per_child: int) -> list[socket.socket]:
    """``count`` unix connections to ``path``, made by child processes of
    ``per_child`` connections each and handed back over SCM_RIGHTS: to the server
    they come from several peers (SO_PEERCRED names the process that connected)."""
    socks = []
    while len(socks) < count:
        k = min(per_child, count - len(socks))
        parent, child = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the child: connect, hand over, leave at once
            try:
                conns = []
                for _ in range(k):
                    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    c.connect(path)
                    conns.append(c)
                socket.send_fds(child, [b"x"], [c.fileno() for c in conns])
            finally:
                os._exit(0)
        child.close()
        _msg, fds, _flags, _addr = socket.recv_fds(parent, 16, k)
        parent.close()
        os.waitpid(pid, 0)
        socks += [socket.socket(fileno=fd) for fd in fds]
    return socks
