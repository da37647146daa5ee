"""Issue 12's small ones: fair control slots, ``NAME@committed`` before the first
commit, the real maximum request size."""

from __future__ import annotations

import json
import socket

import nbd
import pytest

from nbd_mc.control import MAX_CLIENTS, MAX_PER_PEER
from nbd_mc import blocksize
from support.servers import (DEADLINE, connect_as_children, describe, free_port, make_image,
                             read_all, run, wait_until)

MiB = 1 << 20
NBDKIT_MAX_REQUEST = blocksize.NBDKIT_MAX_REQUEST


def _greeted(s: socket.socket) -> dict | None:
    line = b""
    while not line.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            return None
        line += chunk
    return json.loads(line)


def test_one_client_cannot_take_every_control_slot(servers):
    path = servers.path("v.raw")
    make_image(path, MiB)
    s = servers.new({"v": path})
    s.start()
    s.close_clients()
    mine, refused = [], []
    for _ in range(MAX_PER_PEER + 3):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(DEADLINE)
        c.connect(s.control_path)
        msg = _greeted(c)
        (mine if msg and "nbd-mc" in msg else refused).append((c, msg))
    assert len(mine) == MAX_PER_PEER and len(refused) == 3, (len(mine), len(refused))
    assert all("too many control connections from this client" in m["error"]["desc"]
               for _, m in refused), refused[0][1]
    # while this process holds its share, others are served: the CLI, and more
    # processes up to the global limit
    r = s.cli("status", "--json")
    assert r.returncode == 0, describe(r)
    others = connect_as_children(s.control_path, MAX_CLIENTS - MAX_PER_PEER, MAX_PER_PEER // 2)
    for c in others:
        c.settimeout(DEADLINE)
        assert "nbd-mc" in _greeted(c)
    for c, _ in mine + refused:
        c.close()
    for c in others:
        c.close()
    wait_until(lambda: s.cli("status").returncode == 0, "a free slot")


def test_committed_export_is_refused_before_the_first_commit(servers):
    path = servers.path("v.raw")
    data = make_image(path, MiB)
    s = servers.new({"v": path})
    s.start()
    r = run(["nbdinfo", s.uri("v@committed")])
    assert r.returncode != 0 and "v@committed" in r.stderr, describe(r)
    # the list says why: the export does not exist yet
    listed = json.loads(run(["nbdinfo", "--list", "--json", s.uri()]).stdout)["exports"]
    assert [e["export-name"] for e in listed] == ["v"]
    with pytest.raises(nbd.Error):
        s.connect("v@committed")
    s.execute("commit", epoch=1)
    h = s.connect("v@committed")
    assert read_all(h) == data
    assert "as of commit 1" in run(["nbdinfo", s.uri("v@committed")]).stdout
    listed = json.loads(run(["nbdinfo", "--list", "--json", s.uri()]).stdout)["exports"]
    assert [e["export-name"] for e in listed] == ["v", "v@committed"]


def test_the_advertised_maximum_request_is_accepted(servers):
    """Over TCP the maximum is nbdkit's own, and a request that large is served."""
    path = servers.path("big.raw")
    with open(path, "wb") as f:
        f.truncate(NBDKIT_MAX_REQUEST + MiB)
    s = servers.new({"big": path})
    port = free_port()
    s.args += ["--port", str(port), "--bind", "127.0.0.1"]
    s.start()
    uri = f"nbd://127.0.0.1:{port}/big"
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == NBDKIT_MAX_REQUEST
    payload = bytes([7]) * NBDKIT_MAX_REQUEST
    h.pwrite(payload, MiB)           # the largest request the server says it takes
    assert h.pread(4096, MiB + NBDKIT_MAX_REQUEST - 4096) == payload[:4096]
    h.shutdown()
    r = run(["nbdinfo", "--json", uri])
    assert json.loads(r.stdout)["exports"][0]["block_size_maximum"] == NBDKIT_MAX_REQUEST


def test_a_claim_asks_its_exports_for_a_smaller_maximum(servers):
    """``claim`` with ``max_request`` (what protect sends when QEMU reaches the
    secondary over a unix socket, nbd_mc/blocksize.py says why): the writer's exports
    advertise it, the other exports keep nbdkit's maximum, a client that sends more
    is still served, the next claim without it gives the default back, and a value
    that is no power of two in range is refused."""
    path = servers.path("v.raw")
    make_image(path, 4 * MiB)
    s = servers.new({"v": path})
    s.start()
    maximum = blocksize.unix_maximum(blocksize.send_buffer())
    assert blocksize.QEMU_REQUESTS * (maximum + blocksize.PER_REQUEST_OVERHEAD) \
        <= blocksize.send_buffer()
    r = s.execute("claim", max_request=maximum)
    assert r["max_request"] == maximum
    h = s.connect(r["exports"]["v"])
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == maximum
    assert h.get_block_size(nbd.SIZE_PREFERRED) <= maximum
    payload = bytes([9]) * (2 * MiB)
    h.pwrite(payload, MiB)
    assert h.pread(2 * MiB, MiB) == payload
    assert s.connect("v").get_block_size(nbd.SIZE_MAXIMUM) == NBDKIT_MAX_REQUEST
    r = s.execute("claim")
    assert "max_request" not in r
    assert s.connect(r["exports"]["v"]).get_block_size(nbd.SIZE_MAXIMUM) == NBDKIT_MAX_REQUEST
    for bad in (3000, 2048, 2 * NBDKIT_MAX_REQUEST, True, "8192", 8192.0, -4096):
        with pytest.raises(Exception, match="max_request"):
            s.execute("claim", max_request=bad)
