"""The control channel under a flood of careless and hostile clients (issue 23).

Many clients at once -- idle ones holding slots, peers without a certificate
that connect and send nothing (TLS), busy ones looping query-status, and range
requests of the largest size (64 MiB, one 64 MiB block) -- while the clients
that matter go on: the primary's certified commit on one persistent connection,
the local operator's status on a new connection each time, and the guest's 4 KiB
writes.  The outcome is asserted: every commit, status and write is answered,
none refused or failed, and the flood really happened.  The latencies are
printed, never asserted: `python -m bench.control_flood` measures them.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from bench.control_flood import run_flood
from support.servers import REPO

MiB = 1 << 20
SIZE = 96 * MiB


def _image(path):
    with open(path, "wb") as f:      # data everywhere: a range request reads all of it
        for _ in range(SIZE // (4 * MiB)):
            f.write(os.urandom(4 * MiB))


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(r: dict, transport: str) -> None:
    print(f"\nflood over {transport}: " + json.dumps(
        {k: r[k] for k in ("quiet", "flood", "write_p99_ratio", "flooders")}, indent=1))
    for phase in ("quiet", "flood"):
        assert r[phase]["failures"] == [], (phase, r[phase]["failures"][:5])
        for probe in ("status", "commit", "write"):
            assert r[phase][probe]["n"] > 0, (phase, probe)
    f = r["flooders"]
    assert f.get("range_done", 0) > 0, f        # 64 MiB range requests were answered
    assert f.get("status_done", 0) > 0, f
    assert f.get("hog_connects", 0) >= 32, f    # idle connections held slots
    if transport == "tls":
        assert f.get("silent_connects", 0) > 0, f


@pytest.mark.parametrize("transport", ["unix", "tls"])
def test_commit_status_and_writes_go_on_through_a_flood(servers, transport):
    image = servers.path("vda.raw")
    _image(image)
    args = []
    tls_dir = None
    if transport == "tls":
        tls_dir = servers.path("pki")
        subprocess.run([os.path.join(REPO, "tools", "make-certs.sh"), tls_dir], check=True,
                       stdout=subprocess.DEVNULL)
        control = f"tcp://127.0.0.1:{_free_port()}"
        args = ["--control", control, "--tls-certificates", tls_dir]
    srv = servers.new({"vda": image}, args=args)
    srv.start()
    if transport == "unix":
        control = srv.control_path
    r = run_flood(control, tls_dir, srv.uri("vda"), "vda", SIZE, quiet=2.0, flood=5.0)
    _check(r, transport)
