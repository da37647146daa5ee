"""The test guest under real qemu-system-x86_64 (TCG): work, SIGKILL, check.

Slow-ish (each guest boot is a few seconds of software emulation), so few tests,
sharing one crashed disk.  Under pytest-xdist the first worker makes it and the
others wait on a lock and reuse it.
"""

import fcntl
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from demo import guest

pytestmark = pytest.mark.qemu

TARGET_SEQ = 100
DISK_SIZE = 64 * 1024 * 1024


@pytest.fixture(scope="session")
def files():
    return guest.build()


def _make_crashed_disk(files, d: Path) -> dict:
    """Format, run a work guest to MC-SEQ >= TARGET_SEQ, SIGKILL it, check a copy."""
    crashed = d / "crashed.img"
    guest.format_disk(crashed, DISK_SIZE)
    log = d / "work.log"
    t0 = time.monotonic()
    proc = guest.start_work(files, guest.disk_drive_args(crashed), log)
    try:
        serial = guest.SerialLog(log)
        serial.wait_for(r"MC-WORK-START next=1 ", 120, proc)
        t_start = time.monotonic()
        serial.wait_seq(1, 60, proc)
        t_first = time.monotonic()
        first = serial.last_seq
        reached = serial.wait_seq(TARGET_SEQ, 240, proc)
        t_reached = time.monotonic()
    finally:
        guest.kill(proc)
    serial.poll()  # what was printed before the kill: all of it durable
    checked = d / "checked.img"
    shutil.copyfile(crashed, checked)
    result = guest.run_check(files, checked)
    return {
        "boot_to_work_s": t_start - t0,
        "write_rate_per_s": (reached - first) / (t_reached - t_first),
        "last_seq_seen": serial.last_seq,
        "check": {k: v for k, v in vars(result).items() if k != "log"},
        "check_log": result.log,
    }


@pytest.fixture(scope="session")
def crashed(files, tmp_path_factory, worker_id):
    """(dir with crashed.img / checked.img, facts) made once per test session."""
    base = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        base = base.parent  # shared by the xdist workers of this session
    d = base / "guest-crashed"
    d.mkdir(exist_ok=True)
    with open(d / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        facts_file = d / "facts.json"
        if not facts_file.exists():
            facts_file.write_text(json.dumps(_make_crashed_disk(files, d)))
        facts = json.loads(facts_file.read_text())
    return d, facts


def test_killed_work_guest_leaves_a_disk_that_checks_ok(crashed):
    _, facts = crashed
    c = facts["check"]
    print(f"\nboot to MC-WORK-START {facts['boot_to_work_s']:.1f} s, "
          f"{facts['write_rate_per_s']:.1f} fsync'd records/s, "
          f"check guest {c['seconds']:.1f} s, maxseq {c['maxseq']} "
          f"(last MC-SEQ seen {facts['last_seq_seen']})")
    assert c["ok"], facts["check_log"]
    assert c["fsck"] == 0
    assert c["recovered"] is True  # killed while mounted: the journal needed replay
    assert c["bad"] == 0 and c["gaps"] == 0 and c["minseq"] == 1
    assert c["records"] == c["maxseq"]
    # Every record the guest reported durable before the kill is on the disk.
    assert c["maxseq"] >= facts["last_seq_seen"] >= TARGET_SEQ


def _flip_payload_byte(image: Path, seq: int) -> None:
    """Corrupt record seq's first payload byte, found by its header in the raw image."""
    data = image.read_bytes()
    header = f"MCREC seq={seq} len=".encode()
    at = data.find(header)
    assert at >= 0, f"record {seq} not found in {image}"
    assert data.find(header, at + 1) < 0, f"record {seq} found twice"
    payload = data.index(b"\n", at) + 1
    with open(image, "r+b") as f:
        f.seek(payload)
        f.write(bytes([data[payload] ^ 0xFF]))


def _debugfs(image: Path, request: str, write: bool = False) -> str:
    args = [shutil.which("debugfs") or "/sbin/debugfs"] + (["-w"] if write else [])
    proc = subprocess.run(args + ["-R", request, str(image)], capture_output=True,
                          text=True, check=True)
    return proc.stdout


def test_corrupted_and_missing_records_are_detected(files, crashed, tmp_path):
    d, facts = crashed
    img = tmp_path / "bad.img"
    shutil.copyfile(d / "checked.img", img)  # journal replayed, clean: safe for debugfs
    _flip_payload_byte(img, 3)
    names = _debugfs(img, "ls -p /mc")
    victim = next(n for n in names.replace("/", " ").split() if n.startswith("r.000000005."))
    _debugfs(img, f"rm /mc/{victim}", write=True)  # frees the inode: e2fsck stays clean

    r = guest.run_check(files, img)
    assert not r.ok, r.log
    assert r.fsck == 0, r.fsck_output
    assert r.bad == 1 and r.bad_records[0].startswith("r.000000003.")
    assert r.bad_records[0].endswith(" checksum")
    assert r.gaps == 1
    assert r.records == facts["check"]["records"] - 1
    assert r.reason == "1 bad records"


def test_check_on_a_disk_without_file_system_fails(files, tmp_path):
    img = tmp_path / "blank.img"
    with open(img, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    r = guest.run_check(files, img)
    assert not r.ok
    assert r.reason.startswith("mount failed"), r.log
    assert r.fsck is None
