"""A watchdog child: the VM never stays paused, and its writes never wait for the
secondary, because protect died.

protect pauses the VM at every checkpoint (and for the final resync round).  If
protect is killed in that window nobody would ever send ``cont``.  The watchdog
is a small child process in its own session (a Ctrl-C for protect does not reach
it) that listens on a pipe: protect writes ``P`` before it pauses the VM, ``R``
after it resumed it, ``Q`` when it exits normally.  When the pipe reaches end of
file without ``Q`` -- protect is gone, whatever killed it -- and the last word
was ``P``, the watchdog connects to QEMU's QMP socket and resumes the VM if it is
still paused.  QEMU serves one client per QMP socket, and the dead protect's
connection closed with it, so the watchdog can connect then.

And whatever the last word was, it takes away what protect had put into QEMU
(mirrors.remove_leftovers: the write-blocking mirrors, after a ``yank`` of their
NBD connections; resync copies; fleecing filters, fleece.py).  A write-blocking
mirror makes every guest write wait for the secondary, and without protect
nothing would ever notice that the secondary hangs: a dead protect's mirror
would hold the guest's writes as long as the secondary does.  So the bound on a
hang without protect is the watchdog's own reaction (it connects as soon as
protect's connection is closed: well under a second).  The dirty bitmaps stay:
the next protect resyncs from them, as it would after removing the leftovers
itself.  A new protect that got the QMP socket first removes them itself (for a
libvirt domain the watchdog takes the domain's protect lock, and leaves the
domain alone if a new protect holds it).

Started as ``python -c ... QMP_PATH FD DRIVES`` (the command line names
nbd_mc.primary.watchdog, so it can be found with pgrep; DRIVES: protect's drive
ids, comma-separated); for a libvirt domain ``python -c ... - FD DRIVES DOMAIN
URI``: it works through libvirt (libvirt.py).
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
                 uri: str | None = None, drives=()):
        r, w = os.pipe()
        vm = [qmp_path or "-", str(r), ",".join(d.drive for d in drives)] + \
            ([domain, uri] if domain else [])
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


def _connect(qmp_path: str, domain: str | None, uri: str | None):
    """QEMU's QMP socket once the dead protect's connection is gone (or libvirt,
    holding the domain's protect lock); None when QEMU is gone or a new protect
    has it (then that protect cleans up)."""
    from .errors import PrimaryError
    from .qmp import Qmp
    deadline = time.monotonic() + CONNECT_FOR
    while True:
        try:
            if domain:
                from .libvirt import LibvirtQmp
                return LibvirtQmp(domain, uri, timeout=10, exclusive=True)
            return Qmp(qmp_path, timeout=10)
        except PrimaryError as e:
            # no greeting: QEMU still serves the dead protect's connection (or a new
            # protect's); anything else (refused, no socket, the lock): leave it
            if "did not greet" not in e.desc or time.monotonic() > deadline:
                return None
            time.sleep(0.1)  # polling for the socket to become free, with a deadline


def _clean_up(qmp_path: str, drives: list[str], paused: bool, domain: str | None = None,
              uri: str | None = None) -> str:
    """Take protect's leftovers out of QEMU; resume the VM if protect left it paused.
    Returns what was done (empty: nothing)."""
    from .errors import PrimaryError
    from .mirrors import remove_leftovers, yank
    from .options import DriveSpec
    q = _connect(qmp_path, domain, uri)
    if q is None:
        return ""
    said = []
    specs = [DriveSpec(d, d) for d in drives if d]
    try:
        # the VM first: its writes are cut off the secondary (a ``stop`` protect left
        # draining them ends), the pause ends now; the clean-up pauses it again only
        # for the moment of the forced cancel (mirrors.HeldStill)
        yank(q, specs)
        if paused and q.cmd("query-status").get("status") == "paused":
            q.cmd("cont")
            said.append("protect died with the VM paused: resumed it")
        try:
            done = remove_leftovers(q, specs, resume_paused=False)
            if done:
                said.append(done)
        except PrimaryError as e:
            said.append(f"could not remove protect's mirrors: {e.desc}")
        return "; ".join(said)
    except PrimaryError as e:
        return "; ".join(said + [f"could not resume the VM: {e.desc}"])
    finally:
        q.close()


def main(argv: list[str]) -> int:
    qmp_path, fd = argv[0], int(argv[1])
    drives = argv[2].split(",") if len(argv) > 2 else []
    domain, uri = (argv[3], argv[4]) if len(argv) > 4 else (None, None)
    # imported now, not once protect is dead: a VM it left paused waits for them
    from . import mirrors, qmp  # noqa: F401
    if domain:
        from . import libvirt  # noqa: F401
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
    msg = _clean_up(qmp_path, drives, paused, domain, uri)
    if msg:
        print(f"nbd-mc protect watchdog: {msg}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
