"""fleece.remove_stale_files: the fleecing files of a protect killed in a resync round
go at the next start, and never a live protect's (real directories, a real dead
process)."""

from __future__ import annotations

import os
import subprocess
import sys

from nbd_mc.primary import fleece


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _fleecing_dir(base, pid: int, tag: str) -> str:
    path = os.path.join(base, f"{fleece.DIR_PREFIX}{pid}-{tag}")
    os.mkdir(path)
    with open(os.path.join(path, "drive0.raw"), "wb") as f:
        f.truncate(1 << 20)
    return path


def test_dead_protects_files_go_live_ones_stay(tmp_path, monkeypatch):
    monkeypatch.setattr(fleece, "FLEECE_DIR", str(tmp_path))
    dead = _fleecing_dir(tmp_path, _dead_pid(), "abc123")
    live = _fleecing_dir(tmp_path, os.getpid(), "def456")
    parent = _fleecing_dir(tmp_path, os.getppid(), "ghi789")  # alive too
    unrelated = tmp_path / "nbd-mc-fleece-notapid"  # not ours to judge: stays
    unrelated.mkdir()
    other = tmp_path / "something-else"
    other.mkdir()
    assert fleece.remove_stale_files() == [dead]
    assert not os.path.exists(dead)
    assert os.path.exists(live) and os.path.exists(parent)
    assert unrelated.exists() and other.exists()
    assert fleece.remove_stale_files() == []


def test_new_directories_carry_the_pid(tmp_path, monkeypatch):
    monkeypatch.setattr(fleece, "FLEECE_DIR", str(tmp_path))
    f = fleece.Fleece(None, [], {})
    path = f._target_file("drive0", 4096)
    name = os.path.basename(os.path.dirname(path))
    assert name.startswith(f"{fleece.DIR_PREFIX}{os.getpid()}-")
    assert os.path.getsize(path) == 4096
    # a live protect's round is never touched by another protect's start
    assert fleece.remove_stale_files() == []
    assert os.path.exists(path)
    f.close()
    assert not os.path.exists(os.path.dirname(path))
