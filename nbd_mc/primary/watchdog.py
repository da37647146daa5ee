"""A watchdog child: the VM never stays paused because protect died.

protect pauses the VM at every checkpoint (and for the final resync round).  If
protect is killed in that window nobody would ever send ``cont``.  The watchdog
is a small child process in its own session (a Ctrl-C for protect does not reach
it) that listens on a pipe: protect writes ``P`` before it pauses the VM, ``R``
after it resumed it, ``Q`` when it exits normally.  When the pipe reaches end of
file without ``Q`` -- protect is gone, whatever killed it -- and the last word
was ``P``, the watchdog connects to QEMU's QMP socket and resumes the VM if it is
still paused.  QEMU serves one client per QMP socket, and the dead protect's
connection closed with it, so the watchdog can connect then.

Started as ``python -c ... QMP_PATH FD`` (the command line names
nbd_mc.primary.watchdog, so it can be found with pgrep); for a libvirt domain
``python -c ... - FD DOMAIN URI``: it resumes the domain through libvirt (libvirt.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

_RUN = "import sys; from nbd_mc.primary.watchdog import main; sys.exit(main(sys.argv[1:]))"
#: How long the watchdog tries to get the QMP socket after protect died.
CONNECT_FOR = 30.0


class Watchdog:
    """protect's end of the pipe.

    State: ``_w`` (the pipe's write end, -1 once closed) and ``proc`` are touched
    only by the thread that runs protect."""

    def __init__(self, qmp_path: str | None, domain: str | None = None,
                 uri: str | None = None):
        r, w = os.pipe()
        vm = [qmp_path or "-", str(r)] + ([domain, uri] if domain else [])
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _RUN, *vm],
                pass_fds=(r,), stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(r)
        self._w = w

    def _say(self, word: bytes) -> None:
        if self._w >= 0:
            try:
                os.write(self._w, word)
            except OSError:  # the watchdog died: protect goes on without it
                pass

    def pausing(self) -> None:
        self._say(b"P")

    def resumed(self) -> None:
        self._say(b"R")

    def close(self) -> None:
        self._say(b"Q")
        if self._w >= 0:
            os.close(self._w)
            self._w = -1
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _resume(qmp_path: str, domain: str | None = None, uri: str | None = None) -> str:
    from .errors import PrimaryError
    from .qmp import Qmp
    deadline = time.monotonic() + CONNECT_FOR
    while True:
        try:
            if domain:
                from .libvirt import LibvirtQmp
                q = LibvirtQmp(domain, uri, timeout=10, exclusive=False)
            else:
                q = Qmp(qmp_path, timeout=10)
            break
        except PrimaryError as e:
            # no greeting: QEMU still serves the dead protect's connection; anything
            # else (refused, no socket): QEMU is gone, nothing to resume
            if "did not greet" not in e.desc or time.monotonic() > deadline:
                return "" if "did not greet" not in e.desc else \
                    f"could not reach QEMU to resume the VM: {e.desc}"
            time.sleep(0.1)  # polling for the socket to become free, with a deadline
    try:
        if q.cmd("query-status").get("status") == "paused":
            q.cmd("cont")
            return "protect died with the VM paused: resumed it"
        return ""
    except PrimaryError as e:
        return f"could not resume the VM: {e.desc}"
    finally:
        q.close()


def main(argv: list[str]) -> int:
    qmp_path, fd = argv[0], int(argv[1])
    domain, uri = (argv[2], argv[3]) if len(argv) > 3 else (None, None)
    paused = False
    while True:
        try:
            data = os.read(fd, 64)
        except InterruptedError:
            continue
        if not data:
            break
        for b in data:
            if b == ord("Q"):
                return 0
            paused = b == ord("P") if b in b"PR" else paused
    if paused:
        msg = _resume(qmp_path, domain, uri)
        if msg:
            print(f"nbd-mc protect watchdog: {msg}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
