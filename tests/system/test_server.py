"""The real server (nbdkit + our plugin, started by `nbd-mc serve`) under real libnbd
clients: a model-checked stress of writes/zeroes/trims with commits and rollbacks,
the exports as nbdsh and nbdinfo see them, and the control socket's answers to
malformed input.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random

import nbd
import pytest

from support.servers import (GroupModel, RawControl, assert_bytes, assert_check, assert_compare,
                             describe, make_image, nbd_mc, read_all, read_file, run, write_file)
from support.stress import Stress


MiB = 1 << 20


def two_disks(srv, rng, sizes=(4 * MiB, 3 * MiB + 3 * 512)):
    """vda and vdb with random data, explicit zeros and holes (vdb's size is not a
    multiple of the cluster size: its last cluster is partial)."""
    images, initial = {}, {}
    for name, size in zip(("vda", "vdb"), sizes):
        path = srv.path(f"{name}.raw")
        initial[name] = make_image(path, size, rng)
        images[name] = path
    return images, initial


def protected_group(srv, rng, **kw):
    """A served two-disk group with epoch 1 committed; returns (server, model)."""
    images, initial = two_disks(srv, rng)
    s = srv.new(images, **kw)
    s.start()
    model = GroupModel(initial)
    s.execute("commit", epoch=1)
    model.commit(1)
    return s, model


def final_checks(s, model, stress, workdir):
    """Quiescent, with undo data: overlays are clean qcow2 files showing the last
    commit; then a last rollback returns the images to it."""
    for d in model.live:
        assert_check(s.overlay(d), allowed=(0,))
        expected = os.path.join(workdir, f"{d}.expected.raw")
        write_file(expected, model.committed[d])
        assert_compare(s.overlay(d), expected)
    stress.rollback(racing=False)
    stress.close()
    s.stop()
    for d in model.live:
        assert_bytes(read_file(s.image(d)), model.committed[d], f"{d} after stop")
        assert_check(s.overlay(d), allowed=(0,))
    r = nbd_mc("inspect", s.state_dir, "--json")
    assert r.returncode == 0, describe(r)
    report = json.loads(r.stdout)
    assert report["valid"] and report["committed"] == model.epoch


@pytest.mark.parametrize("seed,cluster_size,ops", [
    (101, 65536, 1500),
    (202, 4096, 1500),
    (303, 65536, 1500),
    (404, 2 * MiB, 800),  # clusters as big as the allowed maximum: few, much contended
])
def test_stress_model_checked(servers, workdir, seed, cluster_size, ops):
    rng = random.Random(seed)
    s, model = protected_group(servers, rng, cluster_size=cluster_size)
    stress = Stress(s, model, rng, conns_per_disk=3, cluster_size=cluster_size)
    counts = stress.run(ops)
    print(f"\nstress seed={seed} cluster={cluster_size}: {counts}")
    # the run really did what it claims to test
    assert counts.operations >= ops
    assert counts.commits >= 3 and counts.rollbacks >= 2
    assert counts.racing_commits + counts.racing_rollbacks >= 1
    assert counts.undecided_resolved["after"] >= 1  # some request really raced a checkpoint
    assert counts.max_in_flight >= 4
    st = s.execute("query-status")
    assert st["committed"] == model.epoch
    assert st["stats"]["commits"] == counts.commits + 1
    assert st["stats"]["rollbacks"] == counts.rollbacks
    final_checks(s, model, stress, workdir)


def test_durability_power_flow(servers, workdir):
    """durability=power: the same write/commit/rollback flow gives the same results,
    and a restart after kill -9 returns to the last commit."""
    rng = random.Random(404)
    s, model = protected_group(servers, rng, durability="power")
    assert s.execute("query-status")["durability"] == "power"
    stress = Stress(s, model, rng, conns_per_disk=2)
    counts = stress.run(250)
    print(f"\npower stress: {counts}")
    assert counts.commits >= 1 and counts.rollbacks >= 1
    # a few more writes in the open epoch, then kill -9 and restart
    for _ in range(20):
        stress.issue()
    stress.drain()
    s.kill9()
    s.start(with_disks=False)
    st = s.execute("query-status")
    assert st["committed"] == model.epoch and st["durability"] == "power"
    model.rollback()
    for d in model.live:
        assert_bytes(read_file(s.image(d)), model.committed[d], f"{d} after kill -9 + restart")
        assert_check(s.overlay(d), allowed=(0, 3))
    stress2 = Stress(s, model, rng, conns_per_disk=1)
    stress2.run(60)
    final_checks(s, model, stress2, workdir)


def test_restart_after_clean_stop_returns_to_commit(servers):
    """Undo data of the open epoch survives a clean stop: a restart rolls it back."""
    rng = random.Random(5)
    s, model = protected_group(servers, rng)
    h = s.connect("vdb")
    data = rng.randbytes(200000)
    h.pwrite(data, 12345)
    model.write("vdb", 12345, data)
    h.zero(70000, 1 << 20)
    model.zero("vdb", 1 << 20, 70000)
    assert_bytes(read_file(s.image("vdb")), model.live["vdb"], "vdb before stop")
    assert s.execute("query-status")["disks"][1]["preserved_clusters"] > 0
    s.stop()
    s.start(with_disks=False)
    st = s.execute("query-status")
    assert st["committed"] == 1
    assert all(d["preserved_clusters"] == 0 for d in st["disks"])
    for d in model.live:
        assert_bytes(read_file(s.image(d)), model.committed[d], f"{d} after restart")


# --- nbdsh and nbdinfo ----------------------------------------------------------------
NBDSH_SCRIPT = r"""
import errno
size = h.get_size()
assert size == 4 << 20, size
h.pwrite(b"A" * 100000, 4097)
assert h.pread(100000, 4097) == b"A" * 100000
h.zero(5000, 4097 + 1000)
assert h.pread(5000, 4097 + 1000) == bytes(5000)
h.trim(65536, 1 << 20)
assert h.pread(65536, 1 << 20) == bytes(65536)
h.flush()
print("nbdsh-ok", size, repr(h.get_export_name()), h.can_trim(), h.is_read_only())
"""


def test_nbdsh_script(servers, workdir):
    rng = random.Random(6)
    s, model = protected_group(servers, rng)
    r = run(["nbdsh", "-u", s.uri(), "-c", NBDSH_SCRIPT])
    assert r.returncode == 0, describe(r)
    assert r.stdout.split() == ["nbdsh-ok", str(4 << 20), "''", "True", "False"], r.stdout
    model.write("vda", 4097, b"A" * 100000)
    model.zero("vda", 4097 + 1000, 5000)
    model.zero("vda", 1 << 20, 65536)
    assert_bytes(read_file(s.image("vda")), model.live["vda"], "vda after nbdsh")
    # the committed export still shows epoch 1 and refuses writes
    r = run(["nbdsh", "-u", s.uri("vda@committed"), "-c",
             "import hashlib, sys; print(hashlib.sha256(h.pread(h.get_size(), 0)).hexdigest())\n"
             "assert h.is_read_only()\n"
             "try:\n    h.pwrite(b'x', 0)\nexcept nbd.Error as e:\n    print('refused', e.errno, file=sys.stderr)\n"
             "else:\n    raise SystemExit('write to @committed accepted')\n"])
    assert r.returncode == 0, describe(r)
    assert "refused" in r.stderr
    assert r.stdout.strip() == hashlib.sha256(model.committed["vda"]).hexdigest()
    h = s.connect("vda@committed")
    assert_bytes(read_all(h), model.committed["vda"], "vda@committed after nbdsh")


def test_nbdinfo_list_shows_every_export(servers):
    rng = random.Random(7)
    images, initial = two_disks(servers, rng)
    s = servers.new(images)
    s.start()
    r = run(["nbdinfo", "--list", "--json", s.uri()])  # before the first commit: no @committed
    assert r.returncode == 0, describe(r)
    assert {e["export-name"] for e in json.loads(r.stdout)["exports"]} == {"vda", "vdb"}
    s.execute("commit", epoch=1)
    r = run(["nbdinfo", "--list", "--json", s.uri()])
    assert r.returncode == 0, describe(r)
    exports = {e["export-name"]: e for e in json.loads(r.stdout)["exports"]}
    assert set(exports) == {"vda", "vda@committed", "vdb", "vdb@committed"}
    assert exports["vda"]["export-size"] == len(initial["vda"])
    assert exports["vdb@committed"]["export-size"] == len(initial["vdb"])
    assert exports["vda"]["is_read_only"] is False
    assert exports["vdb@committed"]["is_read_only"] is True
    # the text form too
    r = run(["nbdinfo", "--list", s.uri()])
    assert r.returncode == 0, describe(r)
    for name in ("vda", "vda@committed", "vdb", "vdb@committed"):
        assert f'export="{name}":' in r.stdout
    # "" is the first disk
    h = s.connect("")
    assert h.get_size() == len(initial["vda"])
    assert_bytes(read_all(h), initial["vda"], "default export")
    r = run(["nbdinfo", "--json", s.uri("")])
    assert r.returncode == 0, describe(r)
    assert json.loads(r.stdout)["exports"][0]["export-size"] == len(initial["vda"])
    # an unknown export is refused
    r = run(["nbdinfo", s.uri("nosuch")])
    assert r.returncode != 0


def test_nbdinfo_map_shows_holes(servers):
    img = servers.path("sparse.raw")
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    s = servers.new({"sp": img})
    s.start()
    h = s.connect("sp")
    h.pwrite(b"\xaa" * 65536, 2 * MiB)
    h.pwrite(b"\xbb" * 4096, 5 * MiB)
    r = run(["nbdinfo", "--map", "--json", s.uri("sp")])
    assert r.returncode == 0, describe(r)
    extents = json.loads(r.stdout)
    data = [(e["offset"], e["length"]) for e in extents if e["type"] == 0]
    holes = [(e["offset"], e["length"]) for e in extents if e["type"] == 3]
    assert sum(n for _, n in data) + sum(n for _, n in holes) == 8 * MiB
    covered = lambda off, ranges: any(o <= off < o + n for o, n in ranges)  # noqa: E731
    assert covered(2 * MiB, data) and covered(5 * MiB, data)
    assert covered(0, holes) and covered(4 * MiB, holes) and covered(7 * MiB, holes)
    assert sum(n for _, n in data) <= 2 * MiB  # mostly holes
    # the text form names them
    r = run(["nbdinfo", "--map", s.uri("sp")])
    assert r.returncode == 0 and "hole,zero" in r.stdout and "data" in r.stdout, describe(r)
    # a zeroed range becomes a hole again
    h.zero(65536, 2 * MiB)
    r = run(["nbdinfo", "--map", "--json", s.uri("sp")])
    extents = json.loads(r.stdout)
    assert not any(e["type"] == 0 and e["offset"] <= 2 * MiB < e["offset"] + e["length"]
                   for e in extents), extents


# --- the control socket under malformed input ------------------------------------------------
def test_control_malformed_lines_get_error_classes(servers):
    rng = random.Random(8)
    s, model = protected_group(servers, rng)
    c = RawControl(s.control_path)
    assert c.greeting["nbd-mc"]["disks"] == ["vda", "vdb"]
    assert c.greeting["nbd-mc"]["committed"] == 1

    def err(line: bytes) -> dict:
        reply = c.request(line)
        assert reply is not None and "error" in reply, (line[:80], reply)
        return reply

    cases = [
        (b"garbage\n", "BadRequest"),
        (b"\xff\xfe\x00\n", "BadRequest"),
        (b"[1, 2, 3]\n", "BadRequest"),
        (b'"query-status"\n', "BadRequest"),
        (b'{"execute": 7}\n', "BadRequest"),
        (b'{"arguments": {}}\n', "BadRequest"),
        (b'{"execute": "commit", "arguments": [2]}\n', "BadRequest"),
        (b'{"execute": "commit"}\n', "BadRequest"),  # missing epoch
        (b'{"execute": "commit", "arguments": {}}\n', "BadRequest"),
        (b'{"execute": "commit", "arguments": {"epoch": "2"}}\n', "BadRequest"),
        (b'{"execute": "commit", "arguments": {"epoch": 2.5}}\n', "BadRequest"),
        (b'{"execute": "commit", "arguments": {"epoch": true}}\n', "BadRequest"),
        (b'{"execute": "commit", "arguments": {"epoch": -1}}\n', "BadRequest"),
        (b'{"execute": "commit", "arguments": {"epoch": null}}\n', "BadRequest"),
        (b'{"execute": "commit", "arguments": {"epoch": 2, "force": true}}\n', "BadRequest"),
        (b'{"execute": "failover", "arguments": {"instant": "yes"}}\n', "BadRequest"),
        (b'{"execute": "rollback", "arguments": {"x": 1}}\n', "BadRequest"),
        (b'{"execute": "commit", "arguments": {"epoch": 2}, "extra": 1}\n', "BadRequest"),
        (b'{"execute": "format-disk"}\n', "CommandNotFound"),
        (b'{"execute": ""}\n', "CommandNotFound"),
        (b'{"execute": "commit", "arguments": {"epoch": 9}}\n', "EpochMismatch"),
    ]
    for line, cls in cases:
        reply = err(line)
        assert reply["error"]["class"] == cls, (line, reply)
        assert reply["error"]["desc"]
    # the id comes back, also on errors
    reply = c.request(b'{"execute": "nope", "id": "abc"}\n')
    assert reply["id"] == "abc" and reply["error"]["class"] == "CommandNotFound"
    reply = c.request(b'{"execute": "query-status", "id": 42}\n')
    assert reply["id"] == 42 and reply["return"]["committed"] == 1
    # nothing above changed the group
    assert s.execute("query-status")["committed"] == 1
    assert s.execute("query-status")["fenced"] is False
    # a huge line: refused, that connection closed, the server lives on
    try:
        c.send(b"x" * (2 << 20) + b"\n")
    except BrokenPipeError:
        pass  # the server stopped reading at the limit; its reply is already here
    reply = c.read()
    assert reply is not None and reply["error"]["class"] == "BadRequest", reply
    assert c.read() is None
    c.close()
    # many bad connections at once, then a good one
    bad = [RawControl(s.control_path) for _ in range(8)]
    for b in bad:
        b.send(b"{{{{\n")
    for b in bad:
        assert b.read()["error"]["class"] == "BadRequest"
        b.close()
    c2 = RawControl(s.control_path)
    c2.send(b'{"execute": "query-status"}')  # no newline, then the peer goes away
    c2.close()
    # the server still serves both channels, and commit still works
    h = s.connect("vda")
    h.pwrite(b"z" * 1000, 0)
    model.write("vda", 0, b"z" * 1000)
    assert s.execute("commit", epoch=2)["committed"] == 2
    model.commit(2)
    assert_bytes(read_all(s.connect("vda@committed")), model.committed["vda"], "vda@committed")


def test_fence_races_writes_in_flight(servers):
    """A fence sent while writes are in flight: each write either completed before
    the fence (its data is on disk) or failed with EPERM (no byte of it is); none
    is torn, and nothing changes after the fence returns."""
    rng = random.Random(9)
    img = servers.path("vda.raw")
    model = GroupModel({"vda": make_image(img, 16 * MiB, rng)})
    s = servers.new({"vda": img})
    s.start()
    s.execute("commit", epoch=1)
    hs = [s.connect("vda") for _ in range(4)]
    slot = 16 * MiB // 64
    writes = [(i * slot + rng.randint(0, 1000), rng.randbytes(rng.randint(1, slot - 1000)))
              for i in range(64)]  # disjoint ranges, all in flight at once
    ops = []
    for i, (off, data) in enumerate(writes):
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        h = hs[i % len(hs)]
        ops.append((h, h.aio_pwrite(buf, off), off, data, buf))
    # much of that is still queued in libnbd: it goes out only as we poll, after the fence
    assert s.execute("fence")["generation"] == 1
    image_after_fence = None
    ok = failed = 0
    for h, cookie, off, data, _ in ops:
        while True:
            try:
                if h.aio_command_completed(cookie):
                    ok += 1
                    model.write("vda", off, data)
                    break
            except nbd.Error as e:
                assert e.errnum == errno.EPERM, e
                failed += 1
                break
            h.poll(-1)
        if image_after_fence is None:
            image_after_fence = read_file(s.image("vda"))
    assert ok + failed == 64
    print(f"\nfence raced 64 writes: {ok} completed before it, {failed} refused")
    assert failed >= 1  # the writes libnbd had not sent yet reached the server after it
    assert_bytes(read_file(s.image("vda")), model.live["vda"], "vda after the fence")
    assert_bytes(image_after_fence, model.live["vda"], "vda right after the fence returned")
    assert s.execute("query-status")["stats"]["refused_writes"] == failed
