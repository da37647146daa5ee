"""`nbd-mc protect --mode async` with a real QEMU and the real secondary behind an
emulated slow link (tests/support/link.py: NBD over TCP and the control channel,
each direction delayed, optionally capped).

The oracle is test_primary's: the test plays a guest that respects checkpoints
(Coordinated: its checkpoint hook records the primary's disks while the VM is
paused and drained); after a kill -9 of the primary QEMU, failover must give
exactly the disks recorded at the epoch the secondary acknowledged.
"""

from __future__ import annotations

import json
import os
import random

import pytest

from support.link import Link
from support.protect_proc import spawn_protect
from support.servers import describe, read_file, wait_until
from test_primary import (DEADLINE, EXPORTS, SIZES, Coordinated, PrimaryVM,  # noqa: F401
                          assert_secondary_is, committed, failover, finished, make_pair, vms)

pytestmark = pytest.mark.qemu

RTT = 0.020  # the emulated round trip between the sites


@pytest.fixture
def links():
    made = []
    yield lambda *a, **kw: made.append(Link(*a, **kw)) or made[-1]
    for link in made:
        link.close()


def slow_link(links, server, root, rtt: float = RTT, rate=None):
    """The secondary's NBD socket behind a TCP link and its control socket behind a
    unix one, both delayed by ``rtt`` per round trip; returns (nbd link, control link)."""
    nbd = links(server.sock, rtt=rtt, rate=rate)
    ctl = links(server.control_path, rtt=rtt, path=os.path.join(root, "ctl-link.sock"))
    return nbd, ctl


def start_async(procs, vm, root, nbd, ctl, *args, drives=("drive0", "drive1")):
    drive_args = [a for d in drives for a in ("--drive", f"{d}={EXPORTS[d]}")]
    return spawn_protect(procs, root, "--qmp", vm.qmp_path, "--target", nbd.nbd_uri(),
                         "--control", ctl.path, "--mode", "async", *drive_args, *args)


def test_async_kill_primary_over_slow_link(servers, vms, procs, links):
    """Async over a 20 ms round trip: the guest writes, QEMU is killed -9 mid-epoch;
    failover gives exactly the disks recorded at the acknowledged epoch."""
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    vm, server = make_pair(servers, vms, rng)
    nbd, ctl = slow_link(links, server, servers.root)
    co = Coordinated(servers.root, vm, rng)
    proc = start_async(procs, vm, servers.root, nbd, ctl, "--interval", "20ms",
                       "--checkpoint-hook", co.hook, "--stall-timeout", "5s")
    target = rng.randrange(4, 12)
    co.play(lambda: committed(server) >= target or proc.poll() is not None)
    co.play(lambda: proc.poll() is not None, ops=rng.randrange(1, 30))
    vm.kill9()
    rc, out, err = finished(proc)
    print(out, err)
    assert rc == 1, (out, err)
    last = committed(server)
    assert last >= target
    assert "The primary QEMU is gone" in err and f"the secondary holds epoch {last}," in err, err
    out = failover(server)
    assert out["committed"] == last
    assert_secondary_is(server, co.record(last), server.disks, "async, after QEMU was killed")
