#!/usr/bin/env python3
"""The drive's own node is closed when a filter is inserted above it after
write-blocking mirrors ended on a hung target (QEMU aborts: busy bitmap).

The bug (QEMU 7.2, from a core dump of nbd-mc's test_secondary_hung_then_continued):
``transaction`` [block-dirty-bitmap-add, blockdev-backup sync=bitmap] ->
backup_job_create -> bdrv_cbw_append -> bdrv_insert_node -> bdrv_replace_node,
whose last ``bdrv_unref`` of the drive's node brings its reference count to 0:
bdrv_close releases the node's named bitmaps, one of them is busy (the backup just
gave it a successor), and QEMU aborts with ``bdrv_release_dirty_bitmap_locked:
Assertion '!bdrv_dirty_bitmap_busy(bitmap)'``.  The node's count was one short
before the transaction; where QEMU lost the reference is not known.

This script replays what preceded it in every failing run, on two drives: READY
write-blocking mirrors into nbdkit over TCP, guest writes (HMP qemu-io: write, zero,
discard), the target SIGSTOPped with a write stuck in the mirror, ``yank`` of the
NBD nodes (out of band), one more write, ``stop``, forced cancels of what is left,
``cont``, more writes, ``blockdev-del`` and ``blockdev-add`` of the NBD nodes, the
target continued, then the resync round's transaction.  It has not hit the abort
standalone yet (QEMU 7.2: 0 in 150 iterations); the test hit it in 3 of about 250
runs on 7.2 and in none of about 150 on 10.0.

    python3 tools/qemu-bugs/drive-node-closed-after-hung-mirror.py [--qemu PATH] [--tries N]
"""

import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qemubug  # noqa: E402

SIZE = 8 << 20
OPS = ["write -P 7", "write -z", "write -z -u", "discard"]


def attempt(qemu: str, d: str, seed: int, rounds: int = 15) -> str | None:
    """``rounds`` outages in one QEMU; None if it survived, else how it died."""
    rng = random.Random(seed)
    drives = {f"drive{i}": qemubug.image(d, f"d{i}.raw", SIZE) for i in range(2)}
    target = qemubug.Nbdkit(d, "memory", str(SIZE))
    vm = qemubug.Qemu(qemu, d, drives, monitors=3)
    m, guest, oob = vm.monitors  # protect's monitor, the "guest", the yank's

    def write(drive: str, stuck: bool = False):
        off = rng.randrange(0, SIZE - 400000) // 512 * 512
        line = (f'qemu-io {drive} "write -P 3 {off} 322367"' if stuck else
                f'qemu-io {drive} "{rng.choice(OPS)} {off} {rng.choice([512, 4096, 65536, 200192])}"')
        return guest.send("human-monitor-command", **{"command-line": line})

    try:
        nodes = {dr: qemubug.node_of(m, dr) for dr in drives}
        for dr in drives:
            m.cmd("block-dirty-bitmap-add", node=nodes[dr], name="epoch")
        for k in range(rounds):
            for dr in drives:
                m.cmd("blockdev-add", driver="nbd", **{"node-name": "t-" + dr},
                      server=target.server(), export="")
                m.cmd("blockdev-mirror", **{"job-id": "m-" + dr, "device": dr,
                                            "target": "t-" + dr, "sync": "full",
                                            "copy-mode": "write-blocking",
                                            "on-target-error": "report"})
            for dr in drives:
                if not m.wait_event("BLOCK_JOB_READY", 60, device="m-" + dr):
                    raise RuntimeError("a mirror did not become ready")
            for i in range(10):
                guest.reply(write(f"drive{i % 2}"))
            target.signal(signal.SIGSTOP)
            stuck = write("drive1", stuck=True)
            time.sleep(0.3)
            for dr in drives:
                oob.reply(oob.send("yank", oob=True,
                                   instances=[{"type": "block-node", "node-name": "t-" + dr}]))
            guest.reply(stuck)
            after = write("drive0")
            stop = m.send("stop")
            guest.reply(after)
            m.reply(stop)
            for dr in drives:
                m.try_cmd("block-job-cancel", device="m-" + dr, force=True)
            for dr in drives:
                if not (m.wait_event("BLOCK_JOB_COMPLETED", 0.1, device="m-" + dr)
                        or m.wait_event("BLOCK_JOB_CANCELLED", 30, device="m-" + dr)):
                    raise RuntimeError("a mirror did not end")
            m.cmd("cont")
            for i in range(12):
                guest.reply(write(f"drive{i % 2}"))
            for dr in drives:
                m.cmd("blockdev-del", **{"node-name": "t-" + dr})
            target.signal(signal.SIGCONT)
            for dr in drives:
                m.cmd("blockdev-add", driver="nbd", **{"node-name": "t-" + dr},
                      server=target.server(), export="")
            m.cmd("transaction", actions=[
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": nodes[dr], "name": f"round{k}"}} for dr in drives] + [
                {"type": "blockdev-backup",
                 "data": {"job-id": "b-" + dr, "device": nodes[dr], "target": "t-" + dr,
                          "sync": "bitmap", "bitmap": "epoch", "bitmap-mode": "never",
                          "on-target-error": "report", "auto-dismiss": True}}
                for dr in drives])
            for dr in drives:
                m.wait_event("BLOCK_JOB_COMPLETED", 60, device="b-" + dr)
            for dr in drives:
                m.cmd("block-dirty-bitmap-remove", node=nodes[dr], name=f"round{k}")
                m.cmd("blockdev-del", **{"node-name": "t-" + dr})
        return None
    except qemubug.QemuDied:
        vm.died()
        return vm.how_it_died()
    finally:
        vm.close()
        target.close()


def main() -> int:
    args = qemubug.arguments(__doc__, tries=8)
    qemubug.need("nbdkit")
    d = qemubug.workdir(args.keep)
    hits, how = 0, ""
    for seed in range(args.tries):
        died = attempt(args.qemu, d, seed)
        if died:
            hits, how = hits + 1, died
    return qemubug.verdict("drive node closed under a filter insertion after hung "
                           "write-blocking mirrors (15 outages per try)", args.qemu, hits,
                           args.tries, how)


if __name__ == "__main__":
    sys.exit(main())
