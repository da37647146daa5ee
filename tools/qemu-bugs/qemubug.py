"""Shared plumbing of the QEMU bug reproducers in this directory (no nbd-mc code).

Each reproducer is a standalone script: it starts a QEMU without a guest
(``-machine none``) on raw images in a temporary directory, an nbdkit as the NBD
target where it needs one, drives QEMU over plain QMP sockets (this module's
tiny client: the reproducers must not depend on the code whose workaround they
justify), and prints one line saying whether the QEMU it ran has the bug.

    python3 tools/qemu-bugs/<bug>.py [--qemu PATH] [--tries N]

Exit status: 0 the bug did not show, 1 it showed, 2 the reproducer itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def arguments(doc: str, tries: int, more=None) -> argparse.Namespace:
    """The common options; ``more(parser)`` adds a reproducer's own."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--qemu", default="qemu-system-x86_64",
                    help="the QEMU to try (default: qemu-system-x86_64 on PATH)")
    ap.add_argument("--tries", type=int, default=tries, help=f"attempts (default {tries})")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    if more:
        more(ap)
    return ap.parse_args()


def version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].replace("QEMU emulator version ", "QEMU ") if out else qemu


class QemuDied(Exception):
    """QEMU exited (aborted, crashed) while we talked to it."""


class Qemu:
    """QEMU -machine none with raw drives and QMP sockets: ``main`` (this object),
    and ``extra`` more, each a Monitor (one per client, as a test harness and
    nbd-mc protect each have their own)."""

    def __init__(self, qemu: str, workdir: str, drives: dict[str, str], monitors: int = 1,
                 args: tuple = ()):
        self.workdir = workdir
        self.log = os.path.join(workdir, f"qemu-{time.monotonic_ns()}.log")
        socks = [os.path.join(workdir, f"m{i}-{time.monotonic_ns()}.qmp") for i in range(monitors)]
        argv = [qemu, "-machine", "none", "-nodefaults", "-display", "none"]
        for s in socks:
            argv += ["-qmp", f"unix:{s},server=on,wait=off"]
        for drive, path in drives.items():
            argv += ["-drive", f"if=none,id={drive},file={path},format=raw"]
        self.proc = subprocess.Popen(argv + list(args), stdin=subprocess.DEVNULL,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        self.monitors = [Monitor(self, s) for s in socks]

    @property
    def main(self) -> "Monitor":
        return self.monitors[0]

    def died(self) -> bool:
        try:
            self.proc.wait(0.5)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stderr(self) -> str:
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")

    def how_it_died(self) -> str:
        rc = self.proc.returncode
        lines = [l for l in self.stderr().splitlines()
                 if "qemu-system" in l or "Assertion" in l or "malloc" in l or "corrupt" in l]
        sig = f"signal {signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"exit {rc}"
        return f"{sig}: {lines[-1] if lines else '(nothing on stderr)'}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Monitor:
    """One QMP connection (blocking; events are kept for wait_event)."""

    def __init__(self, qemu: Qemu, path: str, oob: bool = True):
        self.qemu = qemu
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if qemu.proc.poll() is not None or time.monotonic() > deadline:
                    raise QemuDied(qemu.stderr())
                time.sleep(0.02)
        self._buf = b""
        self.events: list[dict] = []
        self._id = 0
        self._readline()
        self.cmd("qmp_capabilities", **({"enable": ["oob"]} if oob else {}))

    def _readline(self, timeout: float | None = None) -> dict | None:
        """The next message; None if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    return None
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                raise QemuDied(self.qemu.stderr())
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, command: str, /, oob: bool = False, **args) -> str:
        self._id += 1
        msg = {"exec-oob" if oob else "execute": command, "id": str(self._id)}
        if args:
            msg["arguments"] = args
        try:
            self.sock.sendall((json.dumps(msg) + "\n").encode())
        except OSError:
            raise QemuDied(self.qemu.stderr()) from None
        return str(self._id)

    def reply(self, ident: str) -> dict:
        while True:
            r = self._readline()
            if "event" in r:
                self.events.append(r)
            elif r.get("id") == ident:
                return r

    def cmd(self, command: str, /, **args) -> dict:
        """The reply's ``return``; RuntimeError with QEMU's message on an error."""
        r = self.reply(self.send(command, **args))
        if "error" in r:
            raise RuntimeError(f"{command}: {r['error'].get('desc')}")
        return r["return"]

    def try_cmd(self, command: str, /, **args) -> dict:
        """The whole reply (an error is an answer too)."""
        return self.reply(self.send(command, **args))

    def hmp(self, line: str) -> str:
        return self.cmd("human-monitor-command", **{"command-line": line})

    def wait_event(self, name: str, timeout: float = 30, **match) -> dict | None:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e["event"] == name and all((e.get("data") or {}).get(k) == v
                                              for k, v in match.items()):
                    self.events.remove(e)
                    return e
            r = self._readline(deadline - time.monotonic())
            if r is None:
                return None
            if "event" in r:
                self.events.append(r)


def node_of(mon: Monitor, drive: str) -> str:
    return next(b["inserted"]["node-name"] for b in mon.cmd("query-block")
                if b["device"] == drive)


class Nbdkit:
    """An nbdkit serving ``plugin args`` over TCP on 127.0.0.1 (QEMU's yank needs a
    socket to shut down: a TCP one, like a real secondary), or with ``unix=True``
    on a unix socket in ``workdir``."""

    def __init__(self, workdir: str, *plugin, unix: bool = False):
        self.pidfile = os.path.join(workdir, f"nbdkit-{time.monotonic_ns()}.pid")
        self.port = self.path = None
        if unix:
            self.path = os.path.join(workdir, f"nbdkit-{time.monotonic_ns()}.sock")
            listen = ["-U", self.path]
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            listen = ["-i", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(["nbdkit", "-f", *listen, "-P", self.pidfile, *plugin],
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.pidfile):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nbdkit did not start")
            time.sleep(0.02)

    def server(self) -> dict:
        if self.path:
            return {"type": "unix", "path": self.path}
        return {"type": "inet", "host": "127.0.0.1", "port": str(self.port)}

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


def workdir(keep: bool) -> str:
    d = tempfile.mkdtemp(prefix="qemu-bug-")
    if not keep:
        import atexit
        atexit.register(shutil.rmtree, d, True)
    return d


def image(d: str, name: str, size: int) -> str:
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def verdict(bug: str, qemu: str, hits: int, tries: int, how: str = "") -> int:
    """Print the one line and return the exit status."""
    v = version(qemu)
    if hits:
        print(f"{v}: HAS the bug ({bug}): {hits} of {tries} tries; {how}")
        return 1
    print(f"{v}: the bug did not show ({bug}): 0 of {tries} tries")
    return 0


def need(tool: str) -> None:
    if not shutil.which(tool):
        print(f"needs {tool}", file=sys.stderr)
        sys.exit(2)
