"""Offline inspection of an overlay or a state directory (`nbd-mc inspect`).

Reads only: opens overlays read-only and never takes the state directory's lock,
so it is safe to run beside a live server (what it shows may then be a moment old).
"""

from __future__ import annotations

import os

from .. import qcow2
from .disk import check_disk, undo_status
from ..errors import NbdMcError, StateError
from .state import load, lock_held
from ..statedir import StateDir

#: The ``undo`` field of a disk in the --json report, for each undo_status.
_UNDO_TEXT = {"current": "current", "stale": "stale (dropped on recovery)",
              "foreign": "from another epoch: does not belong to this state"}


def _owner(path: str) -> tuple:
    """(image, size) that the state file beside an overlay gives it, else (None, None)."""
    try:
        state = load(os.path.dirname(os.path.abspath(path)))
    except NbdMcError:
        return None, None
    for d in state.disks if state else ():
        if os.path.realpath(d.overlay) == os.path.realpath(path):
            return d.image, d.size
    return None, None


def inspect_overlay(path: str, expected_image: str | None = None,
                    expected_size: int | None = None) -> dict:
    """Summary of one overlay file, with ``valid`` and ``problem``.

    An overlay inside a state directory is checked against the disk the state
    file gives it (image, size), as `serve` and `recover` would check it.
    """
    out = {"path": path, "valid": False}
    if expected_image is None and expected_size is None:
        expected_image, expected_size = _owner(path)
    image_fd = -1
    try:
        probe = qcow2.UndoOverlay(path, -1, readonly=True)
        backing = qcow2.resolve_backing(path, probe.backing) if probe.backing else None
        probe.close()
        if backing and os.path.exists(backing):
            image_fd = os.open(backing, os.O_RDONLY)
        ov = qcow2.UndoOverlay(path, image_fd, readonly=True, expected_size=expected_size,
                               expected_image=expected_image)
        out.update(ov.summary())
        out["backing_path"] = backing
        out["backing_exists"] = image_fd >= 0
        ov.close()
        out["valid"] = True
        if ov.epoch is None:
            out["valid"] = False
            out["problem"] = "not an nbd-mc overlay (no epoch record)"
        elif ov.backing_format not in (None, "raw"):
            out["valid"] = False
            out["problem"] = f"backing format is {ov.backing_format}, expected raw"
        elif backing and image_fd < 0:
            out["valid"] = False
            out["problem"] = f"backing file {backing} does not exist"
    except NbdMcError as e:
        out["problem"] = e.desc
    finally:
        if image_fd >= 0:
            os.close(image_fd)
    return out


def inspect_state_dir(state_dir: str) -> dict:
    out = {"kind": "state-dir", "path": os.path.abspath(state_dir), "valid": False,
           "files": StateDir(os.path.abspath(state_dir)).files()}
    try:
        state = load(state_dir)
    except NbdMcError as e:
        out["problem"] = e.desc
        return out
    if state is None:
        out["problem"] = f"no state file in {state_dir}"
        return out
    out.update(committed=state.committed, role=state.role, fenced=state.fenced,
               generation=state.generation, handoff=state.handoff,
               server_running=lock_held(state_dir))
    disks = []
    valid = True
    for d in state.disks:
        info = {"name": d.name, "image": d.image, "size": d.size, "cluster_size": d.cluster_size}
        try:
            check_disk(d)  # the check `serve` and `recover` make, with their words
            info["image_size_ok"] = True
        except StateError as e:
            info["image_size_ok"] = False
            info["problem"] = e.desc
        ov = inspect_overlay(d.overlay, expected_image=d.image, expected_size=d.size)
        info["overlay"] = ov
        if ov["valid"]:
            status = undo_status(ov.get("epoch"), state.committed)
            info["undo"] = _UNDO_TEXT[status]
            if status == "foreign":
                ov["valid"] = False
                ov["problem"] = (f"returns to epoch {ov.get('epoch')}, but the state file says "
                                 f"{state.committed} is committed")
        valid = valid and ov["valid"] and info["image_size_ok"]
        disks.append(info)
    out["disks"] = disks
    out["valid"] = valid
    return out


def _text(report: dict) -> str:
    if report.get("kind") == "state-dir":
        if "committed" not in report:
            return f"{report['path']}: INVALID: {report.get('problem')}"
        lines = [f"{report['path']}: nbd-mc state, committed epoch {report['committed']}, "
                 f"role {report['role']}, generation {report['generation']}"
                 f"{', fenced' if report['fenced'] else ''}"
                 f"{', server running' if report['server_running'] else ''}"
                 f" -- {'valid' if report['valid'] else 'INVALID'}"]
        for d in report["disks"]:
            ov = d["overlay"]
            state = (f"{ov.get('preserved_clusters')} clusters preserved, undo {d.get('undo')}"
                     if ov["valid"] else f"INVALID overlay: {ov.get('problem')}")
            lines.append(f"  {d['name']}: {d['image']} ({d['size']} bytes)"
                         f"{' ' + d['problem'] if d.get('problem') else ''}; {state}")
        return "\n".join(lines)
    if not report["valid"]:
        return f"{report['path']}: INVALID: {report.get('problem')}"
    return (f"{report['path']}: qcow2 undo overlay, {report['size']} bytes virtual, cluster "
            f"{report['cluster_size']}, backing {report['backing']} ({report['backing_format']}), "
            f"returns to epoch {report['epoch']}, {report['preserved_clusters']} clusters preserved "
            f"({report['undo_bytes']} bytes of undo data) -- valid")


def inspect_path(path: str) -> dict:
    if os.path.isdir(path):
        report = inspect_state_dir(path)
    else:
        report = {"kind": "overlay", **inspect_overlay(path)}
    report["text"] = _text(report)
    return report
