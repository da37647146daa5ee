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

#: Paths inside the directory, by attribute name: the state file (the one source of
#: truth for the committed epoch), its lock, and the defaults of `serve` when it gets
#: no --control, --socket/--port or --pidfile (nbdkit's pid file, its log).
INSIDE = {"state_file": "state.json", "lock": "lock", "control": "control.sock",
          "nbd_socket": "nbd.sock", "pidfile": "nbdkit.pid", "log": "nbdkit.log"}
#: Paths beside it (``DIR`` + suffix), kept by the Pacemaker replica agent
#: (docs/pacemaker.md): a copy of each undo overlay of the last promotion and its
#: summary; the group state of the last live disk given up for a failback; the
#: record of a split brain (while it exists the image is left alone); the live-disk
#: generation of the images.
BESIDE = {"rolled_back": ".rolled-back", "diverged": ".diverged",
          "split_brain": ".split-brain", "generation": ".generation"}
OVERLAY_SUFFIX = ".undo.qcow2"


class StateDir:
    """Paths of one state directory (nothing is created or checked here): each name
    of INSIDE and BESIDE is an attribute (``StateDir(d).control``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"StateDir({self.path!r})"

    def __getattr__(self, name: str) -> str:
        if name in INSIDE:
            return os.path.join(self.path, INSIDE[name])
        if name in BESIDE:
            return self.path.rstrip("/") + BESIDE[name]
        raise AttributeError(name)

    def overlay(self, disk: str) -> str:
        """The undo overlay of ``disk`` (absolute: the state file records it)."""
        return os.path.join(os.path.abspath(self.path), disk + OVERLAY_SUFFIX)

    def files(self) -> dict:
        """Every path by name (``nbd-mc inspect --json`` prints it as ``files``)."""
        return {name: getattr(self, name) for name in (*INSIDE, *BESIDE)}
