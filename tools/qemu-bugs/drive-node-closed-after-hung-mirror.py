#!/usr/bin/env python3
"""The drive's own node is closed when a filter is inserted above it after a
write-blocking mirror ended, on a failed target, inside ``stop`` (QEMU 7.2 aborts:
busy bitmap).

The bug (QEMU 7.2; core dump of nbd-mc's test_secondary_hung_then_continued):
``transaction`` [block-dirty-bitmap-add, blockdev-backup sync=bitmap] ->
backup_job_create -> bdrv_cbw_append -> bdrv_insert_node -> bdrv_replace_node,
whose last ``bdrv_unref`` of the drive's node brings its reference count to 0:
bdrv_close releases the node's named bitmaps, one of them is busy (the backup just
gave it a successor), and QEMU aborts with ``bdrv_release_dirty_bitmap_locked:
Assertion '!bdrv_dirty_bitmap_busy(bitmap)'``.  What leaves the node one short: a
write-blocking mirror whose target failed (yanked) ends *inside* a ``stop``: its
exit runs in a poll of ``bdrv_flush_all()``, whose ``bdrv_next()`` walk holds a
reference on the top of each drive's BlockBackend (the mirror filter) and then
drops one on whatever is on top *then* -- the drive's node, which the exit has put
back.  The filter leaks (still listed, driver ``mirror_top``, still a parent of the
drive), the drive's node is one reference short.  Fixed upstream in QEMU 9.0
(f6d38c9f6dae, "block-backend: fix edge case in bdrv_next() where BDS associated
to BB changes"); docs/qemu-versions.md.  After each outage this script counts the
outages that leaked the filter, and the deaths that followed one.

This script: two drives, READY write-blocking mirrors into nbdkit over TCP, a guest
writing all the time (HMP qemu-io from its own thread), the target SIGSTOPped, a
``yank`` of the NBD nodes (out of band), ``stop`` (the mirrors end inside it),
``cont``, ``blockdev-del`` and ``blockdev-add`` of the NBD nodes, the target
continued, and the resync round's transaction; 15 outages per try.

    python3 tools/qemu-bugs/drive-node-closed-after-hung-mirror.py [--qemu PATH] [--tries N]
        [--wait-end | --pause-jobs]

Measured (2026-12-07, 15 outages per try): QEMU 7.2.22 has it in 27 of 40 tries
(8 of 10 with the guest's writes held from the yank to the ``cont``; 6 of 10 with
the guest writing through QEMU's NBD server, an asynchronous path like a real
guest's, instead of HMP); 0 of 10 with ``--wait-end`` (the failing mirrors end by
themselves before the ``stop``).  QEMU 10.0.2: 0 of 12.  The leak (2026-12-07):
7.2 leaked the filter in 3 of 38 outages, and each of its 3 deaths came in the
outage right after one; with ``--pause-jobs`` 0 of 45; 10.0 0 of 45.  The guest-harm test hit
the same abort with a real Linux guest on 7.2 (a mirror ended inside protect's
``stop``; the resync's final round then aborted).  nbd-mc pauses the mirror jobs
before it pauses the VM to end them (``--pause-jobs``; lifecycle.py rule 5).
"""

import os
import random
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qemubug  # noqa: E402

SIZE = 8 << 20
OPS = ["write -P 7", "write -z", "write -z -u", "discard"]
#: --wait-end: let the failing mirrors end by themselves before the ``stop``;
#: --pause-jobs: ``block-job-pause`` the mirrors before the yank and the ``stop``
#: (nbd-mc's way around it, lifecycle rule 5).
WAIT_END = "--wait-end" in sys.argv
PAUSE_JOBS = "--pause-jobs" in sys.argv
sys.argv = [a for a in sys.argv if a not in ("--wait-end", "--pause-jobs")]
#: Per outage (all tries): whether the mirror's implicit filter (driver mirror_top)
#: was still listed after its job had ended, and whether QEMU then died.
LEAKS = {"outages": 0, "leaked": 0, "died_after_leak": 0, "died_without_leak": 0}


def attempt(qemu: str, d: str, seed: int, rounds: int = 15) -> str | None:
    """``rounds`` outages in one QEMU; None if it survived, else how it died.

    The guest writes all the time from its own thread (HMP qemu-io on its own
    monitor), as nbd-mc's test does: without writes concurrent with the sequence
    the replay never hit the abort (0 in 150 iterations)."""
    rng = random.Random(seed)
    leaked = False
    drives = {f"drive{i}": qemubug.image(d, f"d{i}.raw", SIZE) for i in range(2)}
    target = qemubug.Nbdkit(d, "memory", str(SIZE))
    vm = qemubug.Qemu(qemu, d, drives, monitors=3)
    m, guest, oob = vm.monitors  # protect's monitor, the "guest", the yank's
    halt = threading.Event()

    def writes():
        r = random.Random(seed + 1000)
        try:
            while not halt.is_set():
                dr = r.choice(list(drives))
                off = r.randrange(0, SIZE - 400000) // 512 * 512
                n = r.choice([512, 4096, 65536, 200192, 322367])
                line = f'qemu-io {dr} "{r.choice(OPS)} {off} {n}"'
                guest.reply(guest.send("human-monitor-command", **{"command-line": line}))
        except Exception:  # QEMU died: the main thread sees it
            pass

    writer = threading.Thread(target=writes, daemon=True)
    try:
        nodes = {dr: qemubug.node_of(m, dr) for dr in drives}
        for dr in drives:
            m.cmd("block-dirty-bitmap-add", node=nodes[dr], name="epoch")
        writer.start()
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
            time.sleep(rng.uniform(0.05, 0.3))
            target.signal(signal.SIGSTOP)  # a guest write gets stuck in a mirror
            time.sleep(rng.uniform(0.3, 1.0))
            # (the main loop waits for the stuck HMP write: these run after the yank)
            paused = [m.send("block-job-pause", device="m-" + dr)
                      for dr in drives] if PAUSE_JOBS else []
            for dr in drives:
                oob.reply(oob.send("yank", oob=True,
                                   instances=[{"type": "block-node", "node-name": "t-" + dr}]))
            for p in paused:
                m.reply(p)
            time.sleep(rng.uniform(0, 0.03))
            if WAIT_END:  # nbd-mc's way around it: the failing mirrors end before the stop
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and any(
                        j["device"].startswith("m-") for j in m.cmd("query-block-jobs")):
                    time.sleep(0.01)
            m.cmd("stop")  # the mirrors, failing on the yanked target, end inside it
            for dr in drives:
                m.try_cmd("block-job-cancel", device="m-" + dr, force=True)
            for dr in drives:
                if not (m.wait_event("BLOCK_JOB_COMPLETED", 0.1, device="m-" + dr)
                        or m.wait_event("BLOCK_JOB_CANCELLED", 30, device="m-" + dr)):
                    raise RuntimeError("a mirror did not end")
            m.cmd("cont")
            # the cause (module docstring): a leaked mirror filter still above the drive
            leaked = any(n.get("drv") == "mirror_top" for n in m.cmd("query-named-block-nodes"))
            LEAKS["outages"] += 1
            LEAKS["leaked"] += leaked
            for dr in drives:
                m.cmd("blockdev-del", **{"node-name": "t-" + dr})
            target.signal(signal.SIGCONT)
            time.sleep(rng.uniform(0, 0.2))
            for dr in drives:
                m.cmd("blockdev-add", driver="nbd", **{"node-name": "t-" + dr},
                      server=target.server(), export="")
            # the resync round: where QEMU aborts (its filter goes above the drive)
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
        LEAKS["died_after_leak" if leaked else "died_without_leak"] += 1
        return vm.how_it_died()
    finally:
        halt.set()
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
    print(f"mirror filter still listed after its job ended: in {LEAKS['leaked']} of "
          f"{LEAKS['outages']} outages; QEMU died {LEAKS['died_after_leak']} time(s) in "
          f"the outage after such a leak, {LEAKS['died_without_leak']} time(s) without one")
    return qemubug.verdict("drive node closed under a filter insertion after hung "
                           "write-blocking mirrors (15 outages per try)", args.qemu, hits,
                           args.tries, how)


if __name__ == "__main__":
    sys.exit(main())
