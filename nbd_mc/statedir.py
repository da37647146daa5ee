"""The state directory's layout: the one place that spells its file names.

A group lives in one directory (``--state-dir DIR``): the state file, the lock,
one undo overlay per disk, and -- when `serve` chooses the defaults -- the NBD and
control sockets, nbdkit's pid file and log.  The Pacemaker replica agent keeps
three more things *beside* it, on the same file system (``DIR.rolled-back/``,
``DIR.diverged/``, ``DIR.split-brain``, ``DIR.generation``).  Every module, the
agents, bench and demo ask a `StateDir` for these paths instead of joining names
themselves, so a name changes in one place; ``nbd-mc inspect --json DIR`` reports
the same paths (``files``) for a tool that does not import nbd_mc.

Standard library only: nbdkit's plugin imports it.
"""

from __future__ import annotations

import os

STATE_FILE = "state.json"
LOCK_FILE = "lock"
CONTROL_SOCKET = "control.sock"
NBD_SOCKET = "nbd.sock"
PID_FILE = "nbdkit.pid"
LOG_FILE = "nbdkit.log"
OVERLAY_SUFFIX = ".undo.qcow2"


class StateDir:
    """Paths of one state directory (nothing is created or checked here)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"StateDir({self.path!r})"

    def _in(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _beside(self, suffix: str) -> str:
        return self.path.rstrip("/") + suffix

    @property
    def state_file(self) -> str:
        return self._in(STATE_FILE)

    @property
    def lock(self) -> str:
        return self._in(LOCK_FILE)

    @property
    def control(self) -> str:
        """The default control socket (when `serve` got no --control)."""
        return self._in(CONTROL_SOCKET)

    @property
    def nbd_socket(self) -> str:
        """The default NBD socket (when `serve` got neither --socket nor --port)."""
        return self._in(NBD_SOCKET)

    @property
    def pidfile(self) -> str:
        """nbdkit's pid file by default (`serve --pidfile` overrides it)."""
        return self._in(PID_FILE)

    @property
    def log(self) -> str:
        return self._in(LOG_FILE)

    def overlay(self, disk: str) -> str:
        """The undo overlay of ``disk`` (absolute: the state file records it)."""
        return os.path.join(os.path.abspath(self.path), disk + OVERLAY_SUFFIX)

    # Beside the directory, kept by the Pacemaker replica agent (docs/pacemaker.md).

    @property
    def rolled_back(self) -> str:
        """A copy of each undo overlay of the last promotion and its summary."""
        return self._beside(".rolled-back")

    @property
    def diverged(self) -> str:
        """The group state of the last live disk given up for a failback."""
        return self._beside(".diverged")

    @property
    def split_brain(self) -> str:
        """The record of a split brain: while it exists the image is left alone."""
        return self._beside(".split-brain")

    @property
    def generation(self) -> str:
        """The live-disk generation of the images."""
        return self._beside(".generation")

    def files(self) -> dict:
        """Every default path, by name (``nbd-mc inspect --json`` prints it)."""
        return {"state": self.state_file, "lock": self.lock, "control": self.control,
                "nbd_socket": self.nbd_socket, "pidfile": self.pidfile, "log": self.log,
                "rolled_back": self.rolled_back, "diverged": self.diverged,
                "split_brain": self.split_brain, "generation": self.generation}
