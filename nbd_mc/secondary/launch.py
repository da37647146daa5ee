"""Starting nbdkit with our plugin, and knowing when it is really serving.

`nbd-mc serve` checks what it can before nbdkit starts (so refusals are one clear
line, not an nbdkit log), then runs nbdkit -- in the background by default -- and
returns only when both the NBD socket and the control socket answer.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .. import nbduri, sockfile
from . import disk
from ..address import UNIX_PATH_MAX, default_control, parse_address
from ..control import ControlClient
from ..errors import NbdMcError, StateError
from ..fileio import fsync_dir
from ..statedir import StateDir
from .state import DirLock, load, lock_held
from ..tls import TlsFiles

READY_TIMEOUT = 60.0
POLL = 0.01


def plugin_path() -> str:
    """The plugin file nbdkit loads: nbd_mc/plugins/nbd_mc.py of the installed package
    (nbd_mc/plugins/__init__.py says why it lives there)."""
    from ..plugins import plugin_file
    return plugin_file()


@dataclass
class ServeOptions:
    state_dir: str
    disks: list = field(default_factory=list)  # [(name, path)]
    socket: str | None = None
    port: int | None = None
    bind: str | None = None
    cluster_size: int | None = None
    subclusters: bool | None = None  # undo granularity of a new group (None: default)
    durability: str | None = None
    tls: str = "off"  # off | on | require
    tls_certificates: str | None = None
    control: str | None = None
    foreground: bool = False
    pidfile: str | None = None
    thread_model: str = "serialize"
    threads: int | None = None
    #: (keep seconds, every seconds, max bytes) from --history; None: keep the
    #: group's stored policy (keep 0 turns history off)
    history: tuple | None = None

    def resolve(self) -> None:
        self.state_dir = os.path.abspath(self.state_dir)
        if self.port is None and not self.socket:
            self.socket = StateDir(self.state_dir).nbd_socket
        if self.socket:
            self.socket = os.path.abspath(self.socket)
        if not self.control:
            self.control = default_control(self.state_dir)
        if not parse_address(self.control).is_tcp:
            self.control = os.path.abspath(parse_address(self.control).path)
        if not self.pidfile:
            self.pidfile = StateDir(self.state_dir).pidfile
        self.pidfile = os.path.abspath(self.pidfile)
        if self.tls_certificates:
            self.tls_certificates = os.path.abspath(self.tls_certificates)

    @property
    def log_path(self) -> str:
        return StateDir(self.state_dir).log


def nbd_uri(opts: ServeOptions, export: str = "") -> str:
    return nbduri.server_uri(socket=opts.socket, host=opts.bind, port=opts.port,
                             tls=opts.tls == "require", export=export)


def nbdkit_command(opts: ServeOptions) -> list[str]:
    cmd = ["nbdkit", "--log=stderr", "-P", opts.pidfile]
    if opts.socket:
        cmd += ["-U", opts.socket]
    else:
        cmd += ["-p", str(opts.port)]
        if opts.bind:
            cmd += ["-i", opts.bind]
    if opts.foreground:
        cmd.append("-f")
    if opts.tls != "off":
        # --tls-verify-peer: a client must present a certificate signed by our CA.
        # Without it TLS only encrypts, and anyone who can reach the port can write
        # to the replica.
        cmd += [f"--tls={opts.tls}", f"--tls-certificates={opts.tls_certificates}",
                "--tls-verify-peer"]
    if opts.threads:
        cmd += ["-t", str(opts.threads)]
    cmd += ["python", plugin_path(), f"state_dir={opts.state_dir}", f"control={opts.control}",
            f"threads={opts.thread_model}", f"nbd_uri={nbd_uri(opts)}"]
    if opts.durability:
        cmd.append(f"durability={opts.durability}")
    cmd += [f"disk={name}={path}" for name, path in opts.disks]
    if opts.cluster_size:
        cmd.append(f"cluster_size={opts.cluster_size}")
    if opts.subclusters is not None:
        cmd.append(f"subclusters={'on' if opts.subclusters else 'off'}")
    if opts.history is not None:
        keep, every, most = opts.history
        cmd.append(f"history={keep!r}:{every!r}:{int(most or 0)}")
    if parse_address(opts.control).is_tcp:
        cmd.append(f"control_tls={opts.tls_certificates}")
    return cmd


def control_tls(opts: ServeOptions) -> TlsFiles | None:
    """TLS for our own control connections: only over tcp://.  The server speaks TLS
    on the control channel only there (a unix socket is guarded by its mode 0600),
    so wrapping a unix connection in TLS would never get past the handshake."""
    if opts.tls_certificates and parse_address(opts.control).is_tcp:
        return TlsFiles(opts.tls_certificates)
    return None


def _claim_unix_socket(path: str, what: str) -> None:
    """Refuse a socket another server answers on (or one we cannot tell about);
    remove one left by a dead server (nbd_mc/sockfile.py says how they differ)."""
    # 0700 like the state directory it usually is: it holds the overlays, whose
    # undo data is guest data (this runs before Group creates the directory)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        with sockfile.claimed(path):
            sockfile.remove_stale(path, f"{what} socket")
    except OSError as e:
        raise StateError(e.strerror or str(e)) from None


def preflight(opts: ServeOptions) -> tuple:
    """Every refusal we can give before nbdkit starts; changes nothing on disk."""
    if opts.tls != "off" and not opts.tls_certificates:
        raise StateError("--tls needs --tls-certificates DIR")
    if opts.tls_certificates:
        TlsFiles(opts.tls_certificates)
    if parse_address(opts.control).is_tcp and not opts.tls_certificates:
        raise StateError("a tcp:// control address needs --tls-certificates DIR "
                         "(clients must present a certificate)")
    if opts.socket and len(os.fsencode(opts.socket)) > UNIX_PATH_MAX:
        # else nbdkit refuses -U only after the plugin has created the state directory
        raise StateError(f"NBD socket path {opts.socket} is longer than {UNIX_PATH_MAX} "
                         "bytes, the limit of a unix socket (give a shorter --socket)")
    state, new = disk.plan_group(opts.state_dir, opts.disks or None, opts.cluster_size)
    for d in state.disks if new else ():  # refuse --subclusters on with small clusters now
        disk.subclusters_for(d.cluster_size, opts.subclusters)
    if os.path.isdir(opts.state_dir):
        DirLock(opts.state_dir).release()  # raises if a server holds it
    if opts.socket:
        _claim_unix_socket(opts.socket, "NBD")
    if not parse_address(opts.control).is_tcp:
        _claim_unix_socket(opts.control, "control")
    return state, new


def _read_new(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


#: The last line of a Python traceback: "ImportError: ...", "ssl.SSLError: ...".
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b[^:]*: ")


def _nbdkit_failure(log_text: str) -> str:
    """The line of the log that says why, without Python tracebacks -- but with
    the exception a traceback ends in: nbdkit's own last line ("error running
    this script") does not say that, say, ``_ssl`` failed to import because
    another python3 came first on PATH."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("nbd-mc:"):
            return ln[len("nbd-mc:"):].strip()
    errors = [ln for ln in lines if "error" in ln.lower()]
    last = (errors or lines or ["nbdkit exited without a message"])[-1]
    causes = [ln for ln in lines
              if _EXCEPTION_LINE.match(ln.rsplit("error: ", 1)[-1]) and ln not in last]
    return f"{last} (cause: {causes[-1]})" if causes else last


def wait_ready(opts: ServeOptions, proc: subprocess.Popen | None, log_offset: int,
               nbd_listener: int | None = None) -> int:
    """Wait until our nbdkit greets us on the control address.  Returns its pid.

    Both sockets listen before nbdkit writes its pidfile, but only the greeting's
    pid proves that the server answering is the nbdkit we started: another
    server on the same address would answer as well.  Likewise a unix NBD socket
    must be the one ``nbd_listener`` (the nbdkit process we ran, which binds it
    before forking) listens on: nbdkit binds it outside nbd_mc/sockfile.py's
    claim, so a second server's probe could still have taken its path.

    READY_TIMEOUT bounds only the wait after the pidfile: before it, nbdkit opens
    and recovers the group, which takes as long as the undo data needs (loaded
    machine, large undo).  In the background `start` waits for that in
    proc.wait(); in the foreground (``proc``) this loop waits as long, for as long
    as nbdkit lives.
    """
    deadline = None if proc is not None else time.monotonic() + READY_TIMEOUT
    tls = control_tls(opts)
    while True:
        if proc is not None and proc.poll() is not None:
            raise StateError(f"nbdkit failed: {_nbdkit_failure(_read_new(opts.log_path, log_offset))}")
        pid = _read_pid(opts.pidfile)
        if pid and not pid_alive(pid):
            raise StateError(f"nbdkit died: {_nbdkit_failure(_read_new(opts.log_path, log_offset))}")
        if pid and deadline is None:
            deadline = time.monotonic() + READY_TIMEOUT
        if pid:
            try:
                with ControlClient(opts.control, tls=tls, timeout=5) as c:
                    theirs = c.greeting.get("pid")
            except (OSError, NbdMcError):
                theirs = None
            if theirs == pid:
                _check_nbd_socket(opts, nbd_listener, pid)
                return pid
            if theirs is not None:
                _stop(pid)  # unreachable on its own control address: useless
                raise StateError(f"control address {opts.control} is answered by another "
                                 f"server (pid {theirs}), not by the nbdkit just started "
                                 f"(pid {pid}, stopped)")
        if deadline is not None and time.monotonic() > deadline:
            raise StateError(f"nbdkit did not become ready within {READY_TIMEOUT:.0f} s; "
                             f"see {opts.log_path}")
        time.sleep(POLL)  # polling for readiness, bounded by the deadline or nbdkit's life


def _check_nbd_socket(opts: ServeOptions, listener: int | None, pid: int) -> None:
    if not opts.socket or listener is None:
        return
    try:
        holder = sockfile.listener_pid(opts.socket)
    except OSError:
        holder = None
    if holder != listener:
        _stop(pid)  # unreachable on its own NBD socket: useless
        raise StateError(f"NBD socket {opts.socket} is not served by the nbdkit just started "
                         f"(pid {pid}, stopped) but by pid {holder}")


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def pid_alive(pid: int | None) -> bool:
    """Whether a process runs; a zombie counts as gone (with --foreground nbdkit
    is our child, and a dead child answers kill(0) until it is reaped)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start(opts: ServeOptions, on_ready=None) -> int:
    """Run nbdkit; in the background return its pid once ready, in the foreground
    call on_ready(pid) and then wait for it (forwarding SIGINT/SIGTERM)."""
    opts.resolve()
    preflight(opts)
    os.makedirs(opts.state_dir, mode=0o700, exist_ok=True)
    try:
        os.unlink(opts.pidfile)
    except FileNotFoundError:
        pass
    log = open(opts.log_path, "ab")
    offset = log.tell()
    cmd = nbdkit_command(opts)
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=not opts.foreground)
    except FileNotFoundError:
        raise StateError("nbdkit is not installed (make setup installs it)") from None
    finally:
        log.close()
    if not opts.foreground:
        rc = proc.wait()
        if rc != 0:
            raise StateError(f"nbdkit failed: {_nbdkit_failure(_read_new(opts.log_path, offset))}")
        return wait_ready(opts, None, offset, nbd_listener=proc.pid)
    try:
        pid = wait_ready(opts, proc, offset, nbd_listener=proc.pid)
    except BaseException:
        proc.terminate()  # our child, and not serving: do not leave it behind
        raise
    if on_ready:
        on_ready(pid)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: proc.send_signal(signal.SIGTERM))
    rc = proc.wait()
    sys.stderr.write(_read_new(opts.log_path, offset)) if rc else None
    return pid


def _answers(path: str) -> bool:
    try:
        return sockfile.answers(path)
    except OSError:
        return True  # cannot tell: not gone yet


def wait_gone(control: str, state_dir: str | None, timeout: float = 30.0) -> None:
    """After quit: wait until the server no longer answers and its lock is free
    (it closes the control socket before it has let go of the state directory)."""
    deadline = time.monotonic() + timeout
    address = parse_address(control)
    while time.monotonic() < deadline:
        answers = not address.is_tcp and _answers(address.path)
        if not answers and not (state_dir and lock_held(state_dir)):
            return
        time.sleep(POLL)  # polling for the process to go, bounded by the deadline
    raise StateError(f"server at {control} did not stop within {timeout:.0f} s")


def _is_nbdkit(pid: int) -> bool:
    """Whether ``pid`` runs nbdkit (a pid file can outlive its process and the number
    be reused: only an nbdkit is ever signalled)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "nbdkit"
    except OSError:
        return False


def force_stop(state_dir: str, timeout: float) -> str:
    """Stop the server of ``state_dir`` that does not answer its control channel:
    SIGTERM to the nbdkit of its pid file, SIGKILL when it is still there after half
    of ``timeout``, then wait (the rest of it) until the directory's lock is free.
    What happened, in words; StateError when it cannot be done.

    Crash safe by design: a kill -9 at any instant leaves a state directory that
    recovers to the last commit, which the next `serve` does.
    """
    deadline = time.monotonic() + timeout
    pid = _read_pid(StateDir(state_dir).pidfile)
    if not (pid_alive(pid) and _is_nbdkit(pid)):
        if not lock_held(state_dir):
            return "no server was running"
        raise StateError(f"a process holds {state_dir} but it is no nbdkit of its pid file "
                         f"({StateDir(state_dir).pidfile}): not signalled")
    _stop(pid)
    how = "SIGTERM"
    while pid_alive(pid) and time.monotonic() < deadline - timeout / 2:
        time.sleep(POLL)  # polling for the process to go, bounded by the deadline
    if pid_alive(pid) and _is_nbdkit(pid):
        os.kill(pid, signal.SIGKILL)
        how = "SIGKILL (SIGTERM was not enough)"
    while (pid_alive(pid) or lock_held(state_dir)) and time.monotonic() < deadline:
        time.sleep(POLL)
    if pid_alive(pid) or lock_held(state_dir):
        raise StateError(f"nbdkit {pid} of {state_dir} did not stop within {timeout:.0f} s")
    return f"nbdkit {pid} stopped by {how}"


def set_aside(state_dir: str) -> dict:
    """Move the group of ``state_dir`` (no server running) to ``DIR.diverged``,
    replacing an older one there, so that `serve` starts a fresh group (epoch 0) on
    the same images: what a failback does with an old live disk.  The images are
    not touched; the old group's state and overlays stay readable in DIR.diverged
    (`nbd-mc inspect`)."""
    sd = StateDir(state_dir)
    state = load(state_dir)
    if state is None:
        raise StateError(f"no nbd-mc state in {state_dir}")
    if lock_held(state_dir):
        raise StateError(f"a server holds {state_dir}: stop it first (nbd-mc stop)")
    if os.path.lexists(sd.diverged):
        shutil.rmtree(sd.diverged)
    os.replace(state_dir, sd.diverged)
    fsync_dir(os.path.dirname(os.path.abspath(state_dir)))
    return {"moved_to": sd.diverged, "committed": state.committed, "role": state.role,
            "disks": [d.name for d in state.disks]}
