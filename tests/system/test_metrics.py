"""`nbd-mc status --prometheus` and `--watch` against the real server.

The exposition text is parsed with prometheus_client's own parser (what a
Prometheus server or node_exporter's textfile collector reads), and every value is
checked against the server's query-status reply taken right after it.
(protect's --metrics-file is checked in test_libvirt.py, on a protected domain.)
"""

from __future__ import annotations

import os
import time

import nbd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.servers import describe, nbd_mc


def parse(text: str) -> dict:
    """{(sample name, frozenset(labels)): value} and the family types."""
    samples, types = {}, {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_status_prometheus_matches_query_status(servers):
    images = {}
    for name, size in (("vda", 4 << 20), ("vdb", 2 << 20)):
        images[name] = servers.path(f"{name}.raw")
        with open(images[name], "wb") as f:
            f.truncate(size)
    server = servers.new(images)
    server.start()
    group = "test-group"

    r = nbd_mc("status", "--state-dir", server.state_dir, "--prometheus", "--group", group)
    assert r.returncode == 0, describe(r)
    samples, types = parse(r.stdout)
    assert value(samples, "nbd_mc_protected", group=group) == 0
    assert value(samples, "nbd_mc_stale", group=group) == 1  # epoch 0: nothing to fail over to
    assert ("nbd_mc_since_last_commit_seconds", frozenset({("group", group)})) not in samples

    h = server.connect("vda")
    h.pwrite(b"\x5a" * 65536, 0)
    t_before = time.time()
    server.execute("commit", epoch=1)
    h.pwrite(b"\xa5" * 3 * 65536, 65536 * 4)  # 3 clusters preserved in epoch 2
    h.pwrite(b"\x11" * 512, 0)               # and one more
    r = nbd_mc("commit", "7", "--state-dir", server.state_dir)
    assert r.returncode == 1, describe(r)  # a refused commit is counted

    r = nbd_mc("status", "--state-dir", server.state_dir, "--prometheus", "--group", group)
    t_after = time.time()
    assert r.returncode == 0, describe(r)
    st = server.execute("query-status")
    samples, types = parse(r.stdout)
    g = {"group": group}
    assert value(samples, "nbd_mc_up", **g) == 1
    assert value(samples, "nbd_mc_committed_epoch", **g) == st["committed"] == 1
    assert value(samples, "nbd_mc_protected", **g) == 1
    assert value(samples, "nbd_mc_stale", **g) == 0
    assert value(samples, "nbd_mc_fenced", **g) == 0
    assert value(samples, "nbd_mc_info", group=group, role="secondary",
                 durability=st["durability"]) == 1
    assert value(samples, "nbd_mc_last_commit_timestamp_seconds", **g) == \
        st["last_commit_time"]
    assert t_before <= st["last_commit_time"] <= t_after
    assert 0 <= value(samples, "nbd_mc_since_last_commit_seconds", **g) <= t_after - t_before
    for d in st["disks"]:
        labels = {"group": group, "disk": d["name"]}
        assert value(samples, "nbd_mc_disk_undo_bytes", **labels) == d["undo_bytes"]
        assert value(samples, "nbd_mc_disk_preserved_clusters", **labels) == \
            d["preserved_clusters"]
        assert value(samples, "nbd_mc_disk_size_bytes", **labels) == d["size"]
        assert value(samples, "nbd_mc_disk_cluster_size_bytes", **labels) == d["cluster_size"]
    by_name = {d["name"]: d for d in st["disks"]}
    assert by_name["vda"]["preserved_clusters"] == 4 and by_name["vdb"]["preserved_clusters"] == 0
    assert value(samples, "nbd_mc_commits_total", **g) == st["stats"]["commits"] == 1
    assert value(samples, "nbd_mc_commit_refusals_total", **g) == \
        st["stats"]["refused_commits"] == 1
    assert value(samples, "nbd_mc_writes_total", **g) == st["stats"]["writes"] == 3
    assert types["nbd_mc_commits"] == "counter" and types["nbd_mc_committed_epoch"] == "gauge"

    # stale: no commit for longer than --stale-after; fenced: a write refused
    r = nbd_mc("status", "--state-dir", server.state_dir, "--prometheus", "--stale-after", "0")
    samples, _ = parse(r.stdout)
    default_group = os.path.abspath(server.control_path)
    assert value(samples, "nbd_mc_stale", group=default_group) == 1
    server.execute("fence")
    with pytest.raises(nbd.Error):  # a connection from before the fence may not write
        h.pwrite(b"\x22" * 512, 0)
    r = nbd_mc("status", "--state-dir", server.state_dir, "--prometheus", "--group", group)
    samples, _ = parse(r.stdout)
    st = server.execute("query-status")
    assert value(samples, "nbd_mc_fenced", **g) == 1 and value(samples, "nbd_mc_stale", **g) == 1
    assert value(samples, "nbd_mc_write_refusals_total", **g) == st["stats"]["refused_writes"] >= 1
    h.shutdown()

    # a server that does not answer: nbd_mc_up 0 and exit status 1
    server.stop()
    r = nbd_mc("status", "--state-dir", server.state_dir, "--prometheus", "--group", group)
    assert r.returncode == 1 and "cannot reach" in r.stderr, describe(r)
    samples, _ = parse(r.stdout)
    assert value(samples, "nbd_mc_up", **g) == 0


def test_status_watch_plain_lines(servers):
    img = servers.path("vda.raw")
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    server = servers.new({"vda": img})
    server.start()
    server.execute("commit", epoch=1)
    r = nbd_mc("status", "--state-dir", server.state_dir, "--watch", "--interval", "50ms",
               "--count", "3")
    assert r.returncode == 0, describe(r)
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout
    assert all(" epoch 1 protected, role secondary; last commit " in line for line in lines)
    assert "commits/s" in lines[2] and "undo vda=0 B/0cl" in lines[2]
    for bad, text in ((["--watch", "--prometheus"], "not both"),
                      (["--watch", "--interval", "soon"], "not a duration")):
        r = nbd_mc("status", "--state-dir", server.state_dir, *bad)
        assert r.returncode == 2 and text in r.stderr, describe(r)
