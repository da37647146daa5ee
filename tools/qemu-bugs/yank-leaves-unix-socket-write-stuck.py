#!/usr/bin/env python3
"""``yank`` does not release an NBD write stuck on a full unix socket.

The bug: a write to an NBD node whose server stopped reading (a hung secondary)
blocks once the socket's send buffer is full: QEMU's request coroutine waits for
the socket to become writable.  ``yank`` shuts the socket down.  Over TCP the
kernel then reports the socket writable, the coroutine wakes, its write fails
(EPIPE) and the request ends with an error at once.  Over a unix socket the
kernel reports only a hang-up (POLLHUP) and never "writable" while the peer's
queue is full, and QEMU wakes a coroutine waiting to write only on "writable"
or an error: the write, and whatever waits for it (a drain, ``stop``), stays
stuck until the server reads again.

How: nbdkit's memory plugin, stopped (SIGSTOP) after QEMU connected; an HMP
``qemu-io aio_write`` of 16 MiB into a drive on the NBD node (it returns at once; qemu-io
prints the write's end on QEMU's stdout); ``yank`` of the node; then up to
WAIT (5) seconds for that line.  The same over TCP is the control: it ends
within milliseconds.  nbd-mc's answer: over a unix socket protect asks its
secondary (``claim``'s ``max_request``) to advertise a maximum request small enough that the 16 requests QEMU keeps in
flight fit in the socket's buffer, so no write ever waits for buffer space
(nbd_mc/blocksize.py, docs/guest-harm.md "Over a unix socket").

With ``--writes 16`` the write is 16 parallel 1 MiB writes instead (QEMU keeps
at most 16 NBD requests in flight), and ``--max-request BYTES`` has nbdkit
advertise that maximum request (its blocksize-policy filter), so QEMU splits the
writes: 8192 (what protect asks for over a unix socket with Linux's default
buffer) never leaves one stuck, 16384 does.

    python3 tools/qemu-bugs/yank-leaves-unix-socket-write-stuck.py [--qemu PATH] [--tries N]
        [--writes N] [--max-request BYTES]
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qemubug  # noqa: E402

SIZE = 64 << 20
WRITE = 16 << 20
PARALLEL_WRITE = 1 << 20
WAIT = 5.0


def ended(vm: qemubug.Qemu, before: int, wait: float, writes: int) -> float | None:
    """Seconds until qemu-io said all ``writes`` ended (a line each on QEMU's stdout)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait:
        said = vm.stderr()[before:]
        if said.count("aio_write") + said.count("wrote") >= writes:
            return time.monotonic() - t0
        if vm.proc.poll() is not None:
            raise qemubug.QemuDied(vm.stderr())
        time.sleep(0.01)
    return None


def attempt(qemu: str, d: str, unix: bool, writes: int = 1,
            max_request: int | None = None) -> tuple[float | None, float | None]:
    """One try: (seconds from yank to the writes' end or None if they did not end
    within WAIT, seconds from SIGCONT to their end)."""
    policy = (["--filter=blocksize-policy", "memory", str(SIZE),
               f"blocksize-maximum={max_request}", "blocksize-preferred=4096"]
              if max_request else ["memory", str(SIZE)])
    target = qemubug.Nbdkit(d, *policy, unix=unix)
    uri = (f"nbd+unix:///?socket={target.path}" if unix else f"nbd://127.0.0.1:{target.port}/")
    # a drive (a named BlockBackend): HMP qemu-io on a bare node would wait for the
    # write when it drops its temporary one
    vm = qemubug.Qemu(qemu, d, {}, args=("-drive", f"if=none,id=t,file={uri},format=raw"))
    try:
        m = vm.main
        nbd_node = next(i["node-name"] for i in m.cmd("query-yank")
                        if i["type"] == "block-node")
        target.signal(signal.SIGSTOP)
        before = len(vm.stderr())
        length = WRITE if writes == 1 else PARALLEL_WRITE
        for i in range(writes):
            m.hmp(f'qemu-io t "aio_write -P 7 {i * length} {length}"')
        m.cmd("yank", instances=[{"type": "block-node", "node-name": nbd_node}])
        after_yank = ended(vm, before, WAIT, writes)
        after_cont = None
        if after_yank is None:
            target.signal(signal.SIGCONT)
            after_cont = ended(vm, before, 30, writes)
        return after_yank, after_cont
    finally:
        target.close()
        vm.close()


def main() -> int:
    def more(ap):
        ap.add_argument("--writes", type=int, default=1,
                        help="parallel 1 MiB writes instead of one of 16 MiB (1 to 64)")
        ap.add_argument("--max-request", type=int, default=None,
                        help="the maximum request nbdkit advertises (default: its own)")
    args = qemubug.arguments(__doc__, tries=5, more=more)
    if not 1 <= args.writes <= SIZE // PARALLEL_WRITE:
        raise SystemExit(f"--writes: 1 to {SIZE // PARALLEL_WRITE}")
    qemubug.need("nbdkit")
    d = qemubug.workdir(args.keep)
    stuck, how = 0, ""
    for _ in range(args.tries):
        after_yank, after_cont = attempt(args.qemu, d, True, args.writes, args.max_request)
        if after_yank is None:
            stuck += 1
            how = (f"the write ended {after_cont:.2f} s after the server resumed"
                   if after_cont is not None else "the write never ended")
    status = qemubug.verdict("yank leaves an NBD write on a full unix socket stuck until "
                             f"the server reads (waited {WAIT:g} s)", args.qemu, stuck,
                             args.tries, how)
    tcp = [attempt(args.qemu, d, False, args.writes, args.max_request)[0]
           for _ in range(max(1, args.tries // 2))]
    print("  the same over TCP (the control): "
          + ", ".join("stuck" if t is None else f"ended {t * 1000:.0f} ms after the yank"
                      for t in tcp))
    return status


if __name__ == "__main__":
    sys.exit(main())
