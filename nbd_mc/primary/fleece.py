"""Fleecing for the resync's pre-copy rounds: a point-in-time view of a drive whose
guest writes never wait for the secondary nor fail with it.

Why not ``blockdev-backup`` from the drive itself (what the rounds did before):
its copy-before-write filter copies old data straight into the backup's target --
the secondary -- before it lets a guest write through, and in QEMU 7.2 (and 10.0)
``blockdev-backup`` fails the guest's write when that copy fails (its filter runs
with ``on-cbw-error=break-guest-write``; the command has no such option).  So a
secondary's EIO or ENOSPC reached the guest, and a hung one held its write.

Instead, per drive and round (QEMU >= 7.1, all of it plain QMP):

1. a sparse local raw file the drive's size is the *fleecing target*
   (``blockdev-add`` file + raw);
2. our own ``copy-before-write`` filter on the drive's node, with that target,
   ``on-cbw-error=break-snapshot`` and ``cbw-timeout``, is put between the guest's
   device and the drive with ``qom-set DEVICE drive FILTER`` (QEMU 7.2 has no
   ``blockdev-replace``; a realized device's ``drive`` property may be changed):
   that instant is the round's snapshot;
3. a ``snapshot-access`` node on the filter reads the drive as it was then;
4. the round's bitmap is merged into a bitmap on that node (a backup job looks for
   its bitmap on its own source node) and ``blockdev-backup sync=bitmap`` copies
   from it into the NBD node.

A guest write now copies old data into the local file only.  If that fails or
takes longer than ``cbw-timeout``, break-snapshot lets the guest's write go on and
breaks the snapshot instead: the backup job's reads fail, the round ends.  A
secondary that fails, fills up, hangs or vanishes fails the backup job only (a
hang: protect yanks the NBD connection when it ends the round).

A drive with no guest device (no ``qdev`` in ``query-block``) has nobody whose
writes could be hurt: its round copies from the drive as before.

Node names start with FLEECE_PREFIX; remove_leftovers() takes away what a protect
killed in the middle of a round left in QEMU (the watchdog calls it, and the next
protect): with the filter left in place every guest write would go on copying into
the local file.
The fleecing targets' directories carry the creating protect's pid
(``nbd-mc-fleece-<pid>-*``): remove_stale_files() removes those of protects that
are gone (protect and mirrors.remove_leftovers call it at start), so a protect
killed in a round leaks no file for longer than until the next start.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from .errors import QmpCommandError
from .options import DriveSpec
from .qmp import Qmp

FLEECE_PREFIX = "nbd-mc-fleece-"
#: Seconds a guest write's copy into the local fleecing target may take before
#: the snapshot breaks and the write goes on (the filter's ``cbw-timeout``).
CBW_TIMEOUT = 1
#: Where the fleecing targets go (a disk, not /run's tmpfs: they hold what the
#: guest overwrites during a round).
FLEECE_DIR = "/var/tmp"
#: The fleecing targets' directories: DIR_PREFIX + "<pid of the protect>-" + random.
DIR_PREFIX = "nbd-mc-fleece-"
BITMAP = "nbd-mc-fleece"


def _names(drive: str) -> dict[str, str]:
    base = FLEECE_PREFIX + drive
    return {"file": base + "-file", "target": base + "-target", "cbw": base + "-cbw",
            "access": base + "-access"}


def _devices(qmp: Qmp, drives: list[DriveSpec]) -> dict[str, tuple[str, str]]:
    """drive -> (the guest device's QOM path, the node it writes to now)."""
    out = {}
    for b in qmp.cmd("query-block"):
        ins = b.get("inserted")
        if not ins or not b.get("qdev"):
            continue
        for d in drives:
            if d.source in (b.get("device"), ins.get("node-name")):
                out[d.drive] = (b["qdev"], ins["node-name"])
    return out


class Fleece:
    """One round's snapshots of ``drives``: ``source(drive)`` and ``bitmap(drive)``
    name the node and bitmap the round's backup job copies from.

    State (the thread that runs protect): ``made`` -- drive -> (QOM path, the
    drive's node) for the filters in place; ``directory`` -- the fleecing targets'
    temporary directory, or None.
    """

    def __init__(self, qmp: Qmp, drives: list[DriveSpec], nodes: dict[str, str],
                 owner: tuple[int, int] | None = None, sizes: dict[str, int] | None = None):
        self.qmp = qmp
        self.drives = drives
        self.nodes = nodes  # drive -> the drive's node (where our bitmaps live)
        self.owner = owner
        self.made: dict[str, tuple[str, str]] = {}
        self.directory: str | None = None
        self.sizes = sizes or {}

    def take(self, bitmap: str) -> None:
        """Put the filters in (the snapshot instant), then the access nodes with
        ``bitmap`` (on the drives' nodes) merged into a bitmap of their own.

        The caller starts the next round's bitmap *before* this: a write between
        the two is copied twice, never missed."""
        remove_leftovers(self.qmp)  # an earlier round's, kept while a copy held it
        devices = _devices(self.qmp, self.drives)
        for d in self.drives:
            if d.drive not in devices:
                continue
            qdev, node = devices[d.drive]
            if node != self.nodes[d.drive]:
                continue  # something else sits above the drive: copy as before
            n = _names(d.drive)
            path = self._target_file(d.drive, self._size(node))
            self.made[d.drive] = (qdev, node)  # (whatever of it exists goes in close())
            self.qmp.cmd("blockdev-add", driver="file", **{"node-name": n["file"],
                                                           "filename": path})
            self.qmp.cmd("blockdev-add", driver="raw", **{"node-name": n["target"],
                                                          "file": n["file"]})
            self.qmp.cmd("blockdev-add", **{"driver": "copy-before-write", "node-name": n["cbw"],
                                            "file": node, "target": n["target"],
                                            "on-cbw-error": "break-snapshot",
                                            "cbw-timeout": CBW_TIMEOUT})
            self.qmp.cmd("qom-set", path=qdev, property="drive", value=n["cbw"])
            self.qmp.cmd("blockdev-add", **{"driver": "snapshot-access",
                                            "node-name": n["access"], "file": n["cbw"]})
            self.qmp.cmd("block-dirty-bitmap-add", node=n["access"], name=BITMAP)
            self.qmp.cmd("block-dirty-bitmap-merge", node=n["access"], target=BITMAP,
                         bitmaps=[{"node": node, "name": bitmap}])

    def source(self, drive: str) -> str:
        return _names(drive)["access"] if drive in self.made else self.nodes[drive]

    def bitmap(self, drive: str, bitmap: str) -> str:
        return BITMAP if drive in self.made else bitmap

    def _size(self, node: str) -> int:
        for n in self.qmp.cmd("query-named-block-nodes"):
            if n.get("node-name") == node:
                return n["image"]["virtual-size"]
        raise QmpCommandError("query-named-block-nodes", "GenericError", f"no node {node}")

    def _target_file(self, drive: str, size: int) -> str:
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-",
                                              dir=_fleece_dir())
            if self.owner is not None:
                try:
                    os.chown(self.directory, *self.owner)
                except OSError:
                    pass
        path = os.path.join(self.directory, f"{drive}.raw")
        with open(path, "wb") as f:
            f.truncate(size)
        if self.owner is not None:
            try:
                os.chown(path, *self.owner)
            except OSError:
                pass
        return path

    def close(self) -> list[str]:
        """The device writes to its drive again; every node and file of ours goes.
        The round's backup jobs must have ended.  Returns problems."""
        problems = []
        for drive, (qdev, node) in list(self.made.items()):
            problems += _remove(self.qmp, drive, qdev, node)
            del self.made[drive]
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
        return problems


def _remove(qmp: Qmp, drive: str, qdev: str | None, node: str | None) -> list[str]:
    """Take one drive's fleecing out, whatever of it exists (access node first: it
    holds the filter; the device back on ``node`` before the filter goes)."""
    n = _names(drive)
    infos = {x.get("node-name"): x for x in qmp.cmd("query-named-block-nodes")}
    present = set(infos)
    problems = []

    def step(name, **args):
        try:
            qmp.cmd(name, **args)
        except QmpCommandError as e:
            problems.append(f"fleecing of {drive}: {name}: {e.desc}")
    if n["access"] in present:
        # its bitmap goes first, by the command that refuses a busy one: deleting the
        # node would release it unchecked, and QEMU 7.2 aborts on a busy bitmap
        # released (dirty-bitmap.c: bdrv_release_dirty_bitmap_locked, seen in the
        # guest-harm soak); while a copy still holds it, everything stays for later
        names = {b.get("name") for b in infos[n["access"]].get("dirty-bitmaps") or []}
        if BITMAP in names:
            try:
                qmp.cmd("block-dirty-bitmap-remove", node=n["access"], name=BITMAP)
            except QmpCommandError as e:
                return [f"fleecing of {drive} kept: its bitmap is in use ({e.desc})"]
        step("blockdev-del", **{"node-name": n["access"]})
    # only if the device is on our filter: QEMU 7.2 aborts on a qom-set to the node
    # it already has (block.c: bdrv_replace_child_noperm 'old_bs != new_bs', seen in
    # the guest-harm soak after a round that failed before its filter went in)
    on_filter = any(b.get("qdev") == qdev and (b.get("inserted") or {}).get("node-name")
                    == n["cbw"] for b in qmp.cmd("query-block")) if qdev else False
    if qdev and node and on_filter:
        step("qom-set", path=qdev, property="drive", value=node)
    for key in ("cbw", "target", "file"):
        if n[key] in present:
            step("blockdev-del", **{"node-name": n[key]})
    # the target's file, in its own temporary directory (Fleece._target_file)
    path = (infos.get(n["file"]) or {}).get("file") or ""
    if os.path.basename(os.path.dirname(path)).startswith(DIR_PREFIX):
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    return problems


def remove_leftovers(qmp: Qmp) -> list[str]:
    """Remove every fleecing of ours in QEMU (a protect died in a round); returns
    what was done.  The device's drive goes back to the filter's ``file`` child."""
    graph = qmp.cmd("x-debug-query-block-graph")
    by_id = {x["id"]: x for x in graph["nodes"]}
    done = []
    for x in graph["nodes"]:
        name = x["name"] or ""
        if not (name.startswith(FLEECE_PREFIX) and name.endswith("-cbw")):
            continue
        drive = name[len(FLEECE_PREFIX):-len("-cbw")]
        child = next((by_id[e["child"]]["name"] for e in graph["edges"]
                      if e["parent"] == x["id"] and e["name"] == "file"), None)
        qdev = None
        for b in qmp.cmd("query-block"):
            if (b.get("inserted") or {}).get("node-name") == name and b.get("qdev"):
                qdev = b["qdev"]
        problems = _remove(qmp, drive, qdev, child)
        done.append(f"removed the fleecing of {drive} left by an earlier protect"
                    + (f" ({'; '.join(problems)})" if problems else ""))
    # nodes without a filter (a round that died while setting up: any of them)
    present = {x.get("node-name") or "" for x in qmp.cmd("query-named-block-nodes")}
    left = set()
    for name in present:
        for key in ("-file", "-target", "-access"):
            if name.startswith(FLEECE_PREFIX) and name.endswith(key):
                left.add(name[len(FLEECE_PREFIX):-len(key)])
    for drive in sorted(left):
        _remove(qmp, drive, None, None)
    return done


def _fleece_dir() -> str | None:
    """Where the fleecing targets' directories go (None: tempfile's default)."""
    return FLEECE_DIR if os.access(FLEECE_DIR, os.W_OK) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process: alive
        return True
    return True


def remove_stale_files() -> list[str]:
    """Remove the fleecing directories of protects that are gone; returns them.

    A protect killed during a round (kill -9, its watchdog killed with it) leaves its
    fleecing target, up to a drive's size of what the guest overwrote, in
    ``/var/tmp``.  Several protects (one per VM) may share the directory, so only a
    directory whose creator's pid is no longer alive goes; a recycled pid keeps one
    until a later start, never removes a live protect's file.  A QEMU that still has
    the file open (its fleecing nodes not removed yet) keeps writing to it unlinked,
    and mirrors.remove_leftovers removes those nodes."""
    base = _fleece_dir() or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in sorted(names):
        if not name.startswith(DIR_PREFIX):
            continue
        pid = name[len(DIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        path = os.path.join(base, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
