#!/usr/bin/env python3
"""A forced cancel of a READY write-blocking mirror with guest writes in flight
corrupts QEMU's heap.

The bug (block/mirror.c): a mirror job that leaves its loop because it was
force-cancelled waits only for its own background copies, then frees its
in-flight bitmap; a guest write that the write-blocking filter is copying to the
target at that moment settles afterwards and clears its bits in the freed
memory.  QEMU then dies later, anywhere (SIGSEGV in malloc, SIGABRT "malloc():
unaligned tcache chunk detected", "corrupted double-linked list"), or runs on
with a corrupt heap.

How: a write-blocking mirror into nbdkit's memory plugin behind its delay filter
(every target write takes 50 ms), eight HMP ``qemu-io aio_write``s (they return
at once: the writes are in flight on the target), ``block-job-cancel force=true``,
then some more I/O and QMP so that a corrupt heap shows.  With the VM stopped
first (``stop`` drains every guest write) the same sequence is safe: that is
nbd-mc's workaround (nbd_mc/primary/lifecycle.py, HeldStill in mirrors.py).

    python3 tools/qemu-bugs/force-cancel-write-blocking-mirror.py [--qemu PATH] [--tries N]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qemubug  # noqa: E402

SIZE = 64 << 20


def attempt(qemu: str, d: str, stopped: bool) -> str | None:
    """One try; None if QEMU survived, else how it died."""
    img = qemubug.image(d, "disk.raw", SIZE)
    target = qemubug.Nbdkit(d, "--filter=delay", "memory", str(SIZE), "wdelay=50ms")
    vm = qemubug.Qemu(qemu, d, {"drive0": img})
    try:
        m = vm.main
        m.cmd("blockdev-add", driver="nbd", **{"node-name": "target"}, server=target.server(),
              export="")
        m.cmd("blockdev-mirror", **{"job-id": "m0", "device": "drive0", "target": "target",
                                    "sync": "full", "copy-mode": "write-blocking",
                                    "on-target-error": "report"})
        if not m.wait_event("BLOCK_JOB_READY", 60):
            raise RuntimeError("the mirror did not become ready")
        for i in range(8):
            m.hmp(f'qemu-io drive0 "aio_write -P {i + 1} {i * 1048576} 1048576"')
        if stopped:
            m.cmd("stop")
        m.cmd("block-job-cancel", device="m0", force=True)
        m.wait_event("BLOCK_JOB_CANCELLED", 30)
        if stopped:
            m.cmd("cont")
        for i in range(16):  # more allocation and I/O: a corrupt heap shows
            m.hmp(f'qemu-io drive0 "write -P 9 {i * 65536} 65536"')
            m.cmd("query-block-jobs")
        m.cmd("blockdev-del", **{"node-name": "target"})
        m.cmd("query-named-block-nodes")
        return None
    except qemubug.QemuDied:
        vm.died()
        return vm.how_it_died()
    finally:
        vm.close()
        target.close()


def main() -> int:
    args = qemubug.arguments(__doc__, tries=30)
    qemubug.need("nbdkit")
    d = qemubug.workdir(args.keep)
    hits, how = 0, ""
    for _ in range(args.tries):
        died = attempt(args.qemu, d, stopped=False)
        if died:
            hits, how = hits + 1, died
    status = qemubug.verdict("forced cancel of a write-blocking mirror with writes in flight "
                             "corrupts the heap", args.qemu, hits, args.tries, how)
    safe = sum(attempt(args.qemu, d, stopped=True) is not None for _ in range(args.tries // 3))
    print(f"  the same with the VM stopped first (nbd-mc's workaround): QEMU died in {safe} "
          f"of {args.tries // 3}")
    return status


if __name__ == "__main__":
    sys.exit(main())
