"""History with a real guest (issue 19): back to a checkpoint from before the damage.

The test guest (demo/guest.py, real qemu-system-x86_64) writes fsync'd records to
a file system on the secondary's live export while the test commits epochs, every
one retained (`serve --history 1h --history-every 0`).  Then "ransomware" strikes:
a later epoch overwrites the file system's metadata and records through the same
export and is committed too.  `failover --to-epoch` an epoch from before the
damage, and a fresh check guest must find a clean file system (e2fsck) with every
record the guest had reported durable before that epoch was committed.
"""

from __future__ import annotations

import json
import random

import pytest

from demo import guest
from support.servers import describe, make_image  # noqa: F401  (make_image: same helpers)

pytestmark = pytest.mark.qemu

DISK_SIZE = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def files():
    return guest.build()


@pytest.mark.timeout(2400)
def test_failover_to_an_epoch_before_the_damage(files, servers):
    image = servers.path("vda.raw")
    guest.format_disk(image, DISK_SIZE)
    s = servers.new({"vda": image}, args=["--history", "1h", "--history-every", "0"])
    s.start()
    s.execute("commit", epoch=1)
    drive = (f"if=none,id=drive0,file=nbd+unix:///vda?socket={s.sock},format=raw,"
             "cache=writeback")
    log = servers.path("work.log")
    # no_timer_check: at load 20+ a TCG guest kernel failed its IO-APIC timer check and
    # panicked at boot ("IO-APIC + timer doesn't work"), before any of our code ran
    proc = guest.start_guest(files, "work", ["-drive", drive, "-device",
                                             "virtio-blk-pci,drive=drive0"], log,
                             every=1, keep=0, append=["no_timer_check"])
    durable = {}  # epoch -> the last record the guest reported durable before it
    try:
        serial = guest.SerialLog(log)
        # (a TCG boot; on this shared machine at load 20+ it took over 200 s)
        serial.wait_for(r"MC-WORK-START next=1 ", 900, proc)
        epoch = 1
        for target in (5, 10, 15, 20):
            serial.wait_seq(target, 600, proc)
            seen = serial.last_seq
            epoch += 1
            s.execute("commit", epoch=epoch)
            durable[epoch] = seen
        good = epoch
        # the damage: garbage over the first 4 MiB (superblock, group descriptors,
        # bitmaps, inode tables) and over random places of the rest
        h = s.connect("vda")
        rng = random.Random(19)
        h.pwrite(rng.randbytes(4 << 20), 0)
        for _ in range(64):
            h.pwrite(rng.randbytes(65536), rng.randrange(0, DISK_SIZE - 65536, 512))
        h.flush()
        h.shutdown()
        epoch += 1
        s.execute("commit", epoch=epoch)  # the damage is committed: the last commit is bad
        epoch += 1
        s.execute("commit", epoch=epoch)
    finally:
        guest.kill(proc)
    # the last commit shows the damage
    listing = json.loads(s.cli("history", "--json").stdout)
    assert good in [c["epoch"] for c in listing["checkpoints"]]
    r = s.cli("failover", "--to-epoch", str(good), "--json")
    assert r.returncode == 0, describe(r)
    assert json.loads(r.stdout)["committed"] == good
    s.stop()
    result = guest.run_check(files, image, timeout=900)
    assert result.ok, result.log
    assert result.fsck == 0, result.fsck_output
    assert result.bad == 0 and result.gaps == 0 and result.minseq == 1
    assert result.maxseq >= durable[good], (result.maxseq, durable)
