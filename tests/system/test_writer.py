"""One writer: after a failover (server left running) or a newer claim, nothing a
stale client sends changes the disks; only the current writer's export writes.

The stale clients are real: libnbd connections opened before the failover (their
writes are refused), plain connections opened after it and reconnects to a
superseded writer export (what QEMU's reconnect-delay or a forgotten qemu-io/nbdsh
would make: refused at open), and a QEMU NBD node with reconnect-delay that
reconnects by itself after the server restarts.  libnbd's strict mode is switched
off, so a write reaches the server even on a read-only export: the server, not the
client library, must refuse it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import threading
import time

import nbd
import pytest

from nbd_mc import primary
from nbd_mc.secondary import writer
from nbd_mc.control import ControlError
from support.reliability import record
from support.servers import (GroupModel, assert_bytes, describe, make_image, read_all, read_file,
                             run, wait_until)


MiB = 1 << 20
DISKS = ("vda", "vdb")


def group(servers, seed=1):
    rng = random.Random(seed)
    images = {d: servers.path(f"{d}.raw") for d in DISKS}
    model = GroupModel({d: make_image(p, 2 * MiB, rng) for d, p in images.items()})
    srv = servers.new(images)
    srv.start()
    return srv, model


def images_of(srv):
    return {d: read_file(srv.image(d)) for d in DISKS}


def lax(h: nbd.NBD) -> nbd.NBD:
    """Send every request, even a write to a read-only export: let the server judge."""
    h.set_strict_mode(0)
    return h


def refused_write(h: nbd.NBD, what: str) -> None:
    for op in (lambda: h.pwrite(b"\xee" * 4096, 8192), lambda: h.zero(65536, 0),
               lambda: h.trim(65536, 65536)):
        with pytest.raises(nbd.Error) as e:
            op()
        assert e.value.errnum in (errno.EPERM, errno.EROFS), f"{what}: {e.value}"


def open_refused(srv, export: str) -> str:
    h = nbd.NBD()
    h.set_export_name(export)
    with pytest.raises(nbd.Error) as e:
        h.connect_unix(srv.sock)
    return str(e.value)


def test_after_failover_only_the_new_primary_writes(servers):
    srv, model = group(servers)
    old = lax(srv.connect("vda"))  # the old primary, unclaimed (plain export)
    srv.execute("commit", epoch=1)
    model.commit(1)
    data = random.Random(2).randbytes(200000)
    old.pwrite(data, 4096)
    model.write("vda", 4096, data)
    r = json.loads(srv.cli("failover", "--json").stdout)
    model.rollback()
    assert r["committed"] == 1
    new_exports = {d["name"]: d["export"] for d in r["disks"]}
    w = srv.execute("query-status")["writer"]
    assert writer.is_writer_id(w) and w.startswith(f"g{srv.execute('query-status')['generation']}-")
    assert new_exports == {d: f"{d}@{w}" for d in DISKS}
    for d in r["disks"]:
        assert d["uri"] == f"nbd+unix:///{d['export']}?socket={srv.sock}", d
    frozen = images_of(srv)
    assert frozen == model.committed
    # the stale connection cannot write; a plain reconnect cannot even open
    refused_write(old, "old connection")
    for export in ("vda", "vdb", ""):
        open_refused(srv, export)
    assert images_of(srv) == frozen, "a stale client changed the promoted disks"
    # NAME@committed no longer exists: it would show the new primary's writes
    open_refused(srv, "vda@committed")
    # the new primary writes through the URI failover printed
    new = nbd.NBD()
    new.connect_uri(r["disks"][0]["uri"])
    assert not new.is_read_only()
    new.pwrite(b"new primary", 0)
    model.write("vda", 0, b"new primary")
    assert_bytes(read_file(srv.image("vda")), model.live["vda"], "vda written by the new primary")
    # the old primary's later attempts still change nothing, also after a restart
    srv.kill9()
    srv.start(with_disks=False)
    for export in ("vda", "vdb", "", "vda@" + writer.new_writer_id(1), "vda@committed"):
        open_refused(srv, export)
    assert srv.execute("query-status")["writer"] == w
    srv.connect(new_exports["vdb"]).pwrite(b"after restart", 0)
    model.write("vdb", 0, b"after restart")
    assert images_of(srv) == {d: bytes(model.live[d]) for d in DISKS}


def test_committed_view_is_refused_after_failover(servers):
    srv, model = group(servers, seed=3)
    srv.execute("commit", epoch=1)
    early = srv.connect("vda@committed")
    assert read_all(early) == model.committed["vda"]
    srv.execute("failover")
    open_refused(srv, "vda@committed")
    assert "vda@committed" not in list_exports(srv)
    with pytest.raises(nbd.Error):
        early.pread(4096, 0)  # an open one stops answering too


def list_exports(srv) -> list[str]:
    r = run(["nbdinfo", "--list", "--json", srv.uri()])
    assert r.returncode == 0, describe(r)
    return [e["export-name"] for e in json.loads(r.stdout)["exports"]]


def test_claim_supersedes_the_previous_writer(servers):
    """protect claims before it mirrors; a later claim (a new protect) cuts the old
    one off: its connections, its reconnects and its commits are refused."""
    srv, model = group(servers, seed=4)
    a = srv.execute("claim")
    assert a["exports"] == {d: f"{d}@{a['writer']}" for d in DISKS}
    assert a["uris"]["vda"] == f"nbd+unix:///vda@{a['writer']}?socket={srv.sock}"
    ha = lax(srv.connect(a["exports"]["vda"]))
    ha.pwrite(b"A" * 4096, 0)
    model.write("vda", 0, b"A" * 4096)
    refused_write(lax(srv.connect("vda")), "plain export of a claimed secondary")
    assert srv.execute("commit", epoch=1, writer=a["writer"])["committed"] == 1
    model.commit(1)
    assert sorted(list_exports(srv)) == sorted(
        [e for d in DISKS for e in (d, f"{d}@committed", a["exports"][d])])
    b = srv.execute("claim")
    assert b["generation"] == a["generation"] + 1 and b["writer"] != a["writer"]
    refused_write(ha, "A's connection after B's claim")
    open_refused(srv, a["exports"]["vda"])  # A's reconnect
    with pytest.raises(ControlError) as e:
        srv.execute("commit", epoch=2, writer=a["writer"])
    assert e.value.error_class == "Fenced" and "superseded" in e.value.desc
    hb = srv.connect(b["exports"]["vdb"])
    hb.pwrite(b"B" * 4096, 8192)
    model.write("vdb", 8192, b"B" * 4096)
    assert srv.execute("commit", epoch=2, writer=b["writer"])["committed"] == 2
    model.commit(2)
    assert images_of(srv) == model.committed
    # bad writer arguments are clear refusals, nothing changes
    for bad, cls in ((5, "BadRequest"), ("g1-00000000", "Fenced")):
        with pytest.raises(ControlError) as e:
            srv.execute("commit", epoch=3, writer=bad)
        assert e.value.error_class == cls
    for bad in ("vda@nobody", "vda@g1", "nosuch@" + b["writer"]):
        open_refused(srv, bad)
    assert srv.execute("query-status")["committed"] == 2
    # after a failover nobody claims any more: the new primary is the writer
    srv.execute("failover")
    with pytest.raises(ControlError) as e:
        srv.execute("claim")
    assert e.value.error_class == "Fenced"
    open_refused(srv, b["exports"]["vda"])  # B's reconnect after failover


def test_fenced_group_refuses_claims(servers):
    srv, _ = group(servers, seed=5)
    srv.execute("fence")
    with pytest.raises(ControlError) as e:
        srv.execute("claim")
    assert e.value.error_class == "Fenced"


def test_instant_failover_serves_nothing_uncommitted(servers):
    srv, model = group(servers, seed=6)
    h = srv.connect("vdb")
    srv.execute("commit", epoch=1)
    model.commit(1)
    data = random.Random(7).randbytes(300000)
    h.pwrite(data, 1000)  # uncommitted: in the image, undone only in the overlay
    model.write("vdb", 1000, data)
    r = srv.execute("failover", instant=True)
    assert all(d["export"] is None and d["uri"] is None for d in r["disks"]), r
    # no export can be opened, by any name
    for export in ("vdb", "", "vdb@committed", "vda", "vdb@" + writer.new_writer_id(1)):
        open_refused(srv, export)
    assert list_exports(srv) == []
    # the connection that was open reads nothing any more (its image holds the
    # uncommitted data) and writes nothing
    with pytest.raises(nbd.Error):
        h.pread(4096, 1000)
    refused_write(lax(h), "open connection after instant failover")
    assert_bytes(read_file(srv.image("vdb")), model.live["vdb"], "vdb image untouched")


def test_failover_cli_prints_the_writer_exports(servers):
    srv, _ = group(servers, seed=8)
    srv.execute("commit", epoch=1)
    r = srv.cli("failover")
    assert r.returncode == 0, describe(r)
    w = srv.execute("query-status")["writer"]
    for d in DISKS:
        assert f"{d}: nbd+unix:///{d}@{w}?socket={srv.sock}" in r.stdout, r.stdout
    st = srv.cli("status")
    assert f"writer {w}" in st.stdout, st.stdout


# --- QEMU's own NBD client, reconnecting by itself ------------------------------------------------
@pytest.mark.qemu
def test_qemu_reconnecting_after_failover_cannot_write(servers, qemu_vms, workdir):
    """The old primary's QEMU mirrored into its writer export with reconnect-delay:
    the server restarts after the failover, QEMU reconnects by itself under the same
    export name -- and its writes are refused; a plain-name node cannot write either;
    the new primary's node can."""
    srv, model = group(servers, seed=9)
    c = srv.execute("claim")
    q = qemu_vms(workdir)
    q.add_nbd("old", srv.sock, c["exports"]["vda"], **{"reconnect-delay": 5})
    assert "wrote 65536/65536" in q.qemu_io("old", "write -P 0x11 0 65536")
    model.write("vda", 0, b"\x11" * 65536)
    srv.execute("commit", epoch=1, writer=c["writer"])
    model.commit(1)
    assert "wrote" in q.qemu_io("old", "write -P 0x12 65536 65536")  # uncommitted: rolled back
    r = srv.execute("failover")
    model.rollback()
    assert images_of(srv) == model.committed
    assert "failed" in q.qemu_io("old", "write -P 0x21 0 4096")  # its open connection: refused
    srv.kill9()  # the connection drops; QEMU reconnects under the same name
    srv.start(with_disks=False)
    out = q.qemu_io("old", "write -P 0x22 0 65536")
    assert "write failed" in out and "wrote" not in out, out
    # a fresh QEMU node on the plain name cannot even open
    with pytest.raises(primary.QmpCommandError):
        q.add_nbd("plain", srv.sock, "vda")
    assert images_of(srv) == model.committed, "a stale QEMU changed the promoted disk"
    # the new primary's export, as failover returned it
    q.add_nbd("new", srv.sock, r["disks"][0]["export"])
    assert "wrote 4096/4096" in q.qemu_io("new", "write -P 0x33 0 4096")
    model.write("vda", 0, b"\x33" * 4096)
    assert_bytes(read_file(srv.image("vda")), model.live["vda"], "vda of the new primary")


# --- claims racing writers (short here, SOAK_SECONDS in `make soak`) ---------------------------
SOAK = float(os.environ.get("NBD_MC_SOAK_SECONDS") or 0)


class Hammer:
    """A superseded writer that never gives up: writes on its open connection and
    reconnects under its old export name, as fast as it can."""

    def __init__(self, srv, export: str, seed: int):
        self.srv, self.export = srv, export
        self.h = lax(srv.connect(export))
        self.stop = threading.Event()
        self.attempts = 0
        self.landed = 0
        self.unexpected = []
        self.rng = random.Random(seed)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            off = self.rng.randrange(0, 2 * MiB - 4096, 512)
            try:
                if self.rng.random() < 0.1:  # a reconnect under the old name
                    h = nbd.NBD()
                    h.set_export_name(self.export)
                    h.set_strict_mode(0)
                    h.connect_unix(self.srv.sock)
                    h.pwrite(b"\xbb" * 4096, off)
                else:
                    self.h.pwrite(b"\xaa" * 4096, off)
                self.landed += 1
            except nbd.Error as e:
                if e.errnum not in (errno.EPERM, errno.EROFS, errno.EINVAL, errno.ENOENT,
                                    errno.EACCES, None) and "server" not in str(e):
                    self.unexpected.append(str(e))
            self.attempts += 1

    def finish(self):
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.mark.timeout(int(SOAK * 1.5) + 300 if SOAK else 300)
def test_claims_racing_stale_writers(servers):
    """Claim after claim while every superseded writer keeps hammering: once a claim
    returns, only the newest writer's writes change the disks."""
    srv, model = group(servers, seed=10)
    rng = random.Random(11)
    hammers = []
    current = srv.execute("claim")
    rounds = refused = 0
    deadline = time.monotonic() + SOAK
    try:
        while True:
            h = srv.connect(current["exports"]["vda"])
            hammers.append(Hammer(srv, current["exports"]["vdb"], rounds))
            for _ in range(8):  # the current writer writes; the model follows
                off, data = rng.randrange(0, 2 * MiB - 4096, 512), rng.randbytes(4096)
                h.pwrite(data, off)
                model.write("vda", off, data)
            current = srv.execute("claim")  # supersedes it: every hammer is stale now
            frozen = images_of(srv)
            target = sum(x.attempts for x in hammers) + 50 * len(hammers)
            wait_until(lambda: sum(x.attempts for x in hammers) >= target,
                       "the stale writers to try again")
            # (the oracle is the bytes: a write that completed just before the claim
            # may be counted by its thread only after it)
            assert images_of(srv) == frozen, "a superseded writer changed the disks"
            refused += 50 * len(hammers)
            rounds += 1
            if rounds >= 4 and time.monotonic() >= deadline:
                break
            if len(hammers) > 4:  # bound the threads: the oldest stop
                hammers.pop(0).finish()
    finally:
        for x in hammers:
            x.finish()
    assert not [u for x in hammers for u in x.unexpected]
    assert images_of(srv)["vda"] == bytes(model.live["vda"])
    record("one writer: stale-writer requests after a claim", refused, 0)
