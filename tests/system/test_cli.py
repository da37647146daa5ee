"""Every refusal through the real command line (exit 1 and a message that says
why), the epoch rules, fencing and failover against the real server, and usage
errors (exit 2)."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess

import nbd
import pytest

from nbd_mc.secondary import launch
from nbd_mc.control import ControlClient, ControlServer
from nbd_mc.errors import StateError
from support.servers import (GroupModel, assert_bytes, assert_check, assert_compare, describe,
                             make_image, nbd_mc, nbd_mc_argv, pid_alive, read_all, read_file,
                             subprocess_env, write_file)


MiB = 1 << 20


def refused(r, *needles):
    """Exit status 1, one clear message on stderr naming the reason."""
    assert r.returncode == 1, describe(r)
    msg = r.stderr.strip()
    assert msg.startswith("nbd-mc: error:"), describe(r)
    assert "Traceback" not in r.stderr, describe(r)
    for n in needles:
        assert n.lower() in msg.lower(), f"{n!r} not in: {msg}"
    return msg


def ok(r):
    assert r.returncode == 0, describe(r)
    return r


def group(servers, rng=None, sizes=(2 * MiB, 1 * MiB), **kw):
    rng = rng or random.Random(1)
    images, initial = {}, {}
    for name, size in zip(("vda", "vdb"), sizes):
        images[name] = servers.path(f"{name}.raw")
        initial[name] = make_image(images[name], size, rng)
    return servers.new(images, **kw), GroupModel(initial)


# --- serve refusals ----------------------------------------------------------------------
def test_serve_refuses_missing_image(servers):
    missing = servers.path("nope.raw")
    r = nbd_mc("serve", missing, "--state-dir", servers.path("st"))
    refused(r, missing, "does not exist")
    assert not os.path.exists(servers.path("st", "state.json"))


def test_serve_refuses_bad_disk_lists(servers):
    a, b = servers.path("a.raw"), servers.path("b.raw")
    make_image(a, MiB)
    make_image(b, MiB)
    st = servers.path("st")
    refused(nbd_mc("serve", f"x={a}", f"x={b}", "--state-dir", st), "unique")
    refused(nbd_mc("serve", f"x@y={a}", "--state-dir", st), "@")
    refused(nbd_mc("serve", servers.root, "--state-dir", st), "not a regular file")
    refused(nbd_mc("serve", a, "--state-dir", st, "--cluster-size", "3K"))
    assert not os.path.exists(os.path.join(st, "state.json"))


def test_serve_refuses_socket_paths_too_long(servers):
    img = servers.path("a.raw")
    make_image(img, MiB)
    deep = servers.path("d" * 100)
    os.makedirs(deep)
    st = servers.path("st")
    refused(nbd_mc("serve", img, "--state-dir", st, "--socket", os.path.join(deep, "n.sock")),
            "longer than 107 bytes")
    refused(nbd_mc("serve", img, "--state-dir", st, "--control", os.path.join(deep, "c.sock")),
            "longer than 107 bytes")
    refused(nbd_mc("serve", img, "--state-dir", deep), "longer than 107 bytes")
    assert not os.path.exists(os.path.join(st, "state.json"))
    assert not os.path.exists(os.path.join(deep, "state.json"))


def test_serve_refuses_size_not_multiple_of_512(servers):
    for size in (1000, 512 * 3 + 1, 0):
        img = servers.path(f"odd{size}.raw")
        with open(img, "wb") as f:
            f.truncate(size)
        r = nbd_mc("serve", img, "--state-dir", servers.path(f"st{size}"))
        refused(r, "512")
        assert not os.path.exists(servers.path(f"st{size}", "state.json"))


def test_serve_refuses_resized_image(servers):
    s, _ = group(servers)
    s.start()
    s.stop()
    with open(s.image("vdb"), "r+b") as f:
        f.truncate(1 * MiB + 4096)
    refused(s.start(check=False), s.image("vdb"), str(1 * MiB + 4096), str(1 * MiB))
    refused(s.start(check=False, with_disks=False), "vdb")
    refused(s.cli("recover"), "vdb")
    # back to the right size: serving works again
    with open(s.image("vdb"), "r+b") as f:
        f.truncate(1 * MiB)
    s.start()


def test_serve_refuses_state_dir_of_another_disk_set(servers):
    s, _ = group(servers)
    s.start()
    s.stop()
    other = servers.path("other.raw")
    make_image(other, 1 * MiB)
    r = nbd_mc("serve", f"vda={s.image('vda')}", f"vdb={other}", "--state-dir", s.state_dir)
    refused(r, "belongs to disks", other)
    r = nbd_mc("serve", f"vda={s.image('vda')}", "--state-dir", s.state_dir)
    refused(r, "belongs to disks")
    r = nbd_mc("serve", f"x={s.image('vda')}", f"vdb={s.image('vdb')}", "--state-dir", s.state_dir)
    refused(r, "belongs to disks")
    r = nbd_mc("serve", *[f"{n}={p}" for n, p in s.disks.items()], "--state-dir", s.state_dir,
               "--cluster-size", "4K")
    refused(r, "cluster size")
    # the directory is unchanged: the right disks still serve from it
    s.start()
    assert [d["name"] for d in s.execute("query-status")["disks"]] == ["vda", "vdb"]


def test_serve_refuses_sockets_in_use(servers):
    s, _ = group(servers)
    s.start()
    # the same state directory twice
    r = nbd_mc(*s.serve_argv())
    refused(r, "in use")
    r = nbd_mc("serve", "--state-dir", s.state_dir)
    refused(r, "in use")
    # another group on the same NBD socket
    img = servers.path("c.raw")
    make_image(img, 1 * MiB)
    r = nbd_mc("serve", img, "--state-dir", servers.path("st2"), "--socket", s.sock)
    refused(r, "NBD socket", s.sock, "in use")
    # ... or on the same control socket
    r = nbd_mc("serve", img, "--state-dir", servers.path("st3"), "--control", s.control_path)
    refused(r, "control socket", "in use")
    # the first server is unharmed
    assert s.running()
    assert s.execute("query-status")["committed"] == 0
    h = s.connect("vda")
    h.pwrite(b"still here", 0)
    # recover refuses a directory a server is using
    refused(s.cli("recover"), "in use")


def test_concurrent_serves_on_one_control_socket(servers):
    """Two serves started at once on one control socket: one serves, the other
    says why it does not -- never both "serving" while one nbdkit answers for both."""
    control = servers.path("ctl.sock")
    procs = []
    for name in ("a", "b"):
        img = servers.path(f"{name}.raw")
        make_image(img, 1 * MiB)
        servers.new({name: img}, state_dir=servers.path(f"st-{name}"))  # stopped at teardown
        procs.append(subprocess.Popen(
            nbd_mc_argv() + ["serve", f"{name}={img}", "--state-dir", servers.path(f"st-{name}"),
                             "--control", control], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=subprocess_env()))
    outputs = [p.communicate(timeout=120) for p in procs]
    results = [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    served = [i for i, (rc, _, _) in enumerate(results) if rc == 0]
    assert len(served) == 1, results
    rc, _, err = results[1 - served[0]]
    assert rc == 1 and "control socket" in err and "in use" in err, results
    winner = servers.made[served[0]]
    winner.pid = int(read_file(winner.pidfile).strip())
    with ControlClient(control, timeout=60) as c:
        assert c.greeting["pid"] == winner.pid
        assert c.greeting["disks"] == list(winner.disks)
    assert f"serving {list(winner.disks)[0]} (pid {winner.pid})" in results[served[0]][1]


@pytest.mark.parametrize("foreign", ["control", "nbd"])
def test_serve_never_reports_another_servers_answer(workdir, foreign):
    """Readiness is our nbdkit's own answer: a process whose pidfile is written but
    whose control address (or unix NBD socket) another server answers is not
    reported as serving (and, unreachable, is stopped)."""
    started = subprocess.Popen(["sleep", "600"])  # stands in for the nbdkit just started
    opts = launch.ServeOptions(state_dir=os.path.join(workdir, "st"),
                               control=os.path.join(workdir, "ctl.sock"))
    opts.resolve()
    os.makedirs(opts.state_dir)
    write_file(opts.pidfile, f"{started.pid}\n".encode())
    answering = os.getpid() if foreign == "control" else started.pid
    control = ControlServer(opts.control, lambda name, args: {}, lambda: {"pid": answering})
    control.start()
    nbd_sock = socket.socket(socket.AF_UNIX)  # listened on by this process, not by `started`
    nbd_sock.bind(opts.socket)
    nbd_sock.listen(8)
    try:
        with pytest.raises(StateError, match="answered by another server" if foreign == "control"
                           else f"NBD socket {opts.socket} is not served by"):
            launch.wait_ready(opts, None, 0, nbd_listener=started.pid)
        assert started.wait(timeout=60) == -signal.SIGTERM
    finally:
        started.kill()
        started.wait()
        control.close()
        nbd_sock.close()


def test_foreground_readiness_deadline_starts_after_recovery(workdir, monkeypatch):
    """In the foreground, nbdkit opens and recovers the group before it writes its
    pidfile, for as long as the undo data needs: that must not count against the
    readiness deadline (in the background, serve waits for it without one)."""
    control = os.path.join(workdir, "ctl.sock")
    opts = launch.ServeOptions(state_dir=os.path.join(workdir, "st"), control=control,
                               foreground=True)
    opts.resolve()
    os.makedirs(opts.state_dir)
    # stands in for nbdkit -f: "recovers" for a while, then writes its pidfile
    recovering = subprocess.Popen(["sh", "-c", f"sleep 1; echo $$ > {opts.pidfile}; exec sleep 600"])
    answering = ControlServer(control, lambda name, args: {},
                              lambda: {"pid": int(read_file(opts.pidfile))})
    answering.start()
    monkeypatch.setattr(launch, "READY_TIMEOUT", 0.2)  # far less than the "recovery"
    try:
        assert launch.wait_ready(opts, recovering, 0) == recovering.pid
    finally:
        recovering.kill()
        recovering.wait()
        answering.close()


def test_serve_after_kill9_reuses_stale_sockets(servers):
    s, _ = group(servers)
    s.start()
    s.kill9()
    assert os.path.exists(s.sock)  # left behind by the dead server
    s.start(with_disks=False)
    assert s.execute("query-status")["committed"] == 0


def test_durability_is_remembered_across_restarts(servers):
    """A restart without --durability keeps the group's mode; an explicit one changes it."""
    s, _ = group(servers, durability="power")
    s.start()
    assert s.execute("query-status")["durability"] == "power"
    s.stop()
    s.args = []  # serve again without --durability
    s.start(with_disks=False)
    assert s.execute("query-status")["durability"] == "power"
    assert s.state()["durability"] == "power"
    s.stop()
    s.args = ["--durability", "process"]
    s.start(with_disks=False)
    assert s.execute("query-status")["durability"] == "process"
    assert s.state()["durability"] == "process"


def test_serve_refuses_unknown_state_dir_without_disks(servers):
    r = nbd_mc("serve", "--state-dir", servers.path("empty"))
    refused(r, "no nbd-mc state")
    r = nbd_mc("recover", "--state-dir", servers.path("empty"))
    refused(r, "no nbd-mc state")


# --- epochs ------------------------------------------------------------------------------------
def test_commit_rules(servers):
    s, model = group(servers)
    s.start()
    st = json.loads(ok(s.cli("status", "--json")).stdout)
    assert st["committed"] == 0 and st["protected"] is False and st["open_epoch"] == 1
    with pytest.raises(nbd.Error):  # no committed state exists yet: refused at connect
        s.connect("vda@committed")
    refused(s.cli("rollback"), "NotProtected")
    refused(s.cli("failover"), "NotProtected")
    refused(s.cli("commit", "2"), "EpochMismatch", "epoch 0 is committed")
    r = json.loads(ok(s.cli("commit", "1", "--json")).stdout)
    assert r["committed"] == 1
    model.commit(1)
    early = s.connect("vda@committed")
    assert_bytes(read_all(early), model.committed["vda"], "vda@committed after commit 1")
    ok(s.cli("commit", "1"))  # a retry of the committed epoch
    assert "committed epoch 1" in ok(s.cli("commit", "1")).stdout
    refused(s.cli("commit", "0"), "EpochMismatch")
    refused(s.cli("commit", "3"), "EpochMismatch", "open epoch is 2")
    h = s.connect("vda")
    h.pwrite(b"\x11" * 100000, 5000)
    model.write("vda", 5000, b"\x11" * 100000)
    st = json.loads(ok(s.cli("status", "--json")).stdout)
    assert st["protected"] is True and st["disks"][0]["preserved_clusters"] >= 2
    assert "protected" in ok(s.cli("status")).stdout
    r = json.loads(ok(s.cli("rollback", "--json")).stdout)
    assert r["committed"] == 1 and r["restored_clusters"] >= 2
    model.rollback()
    assert_bytes(read_file(s.image("vda")), model.committed["vda"], "vda after rollback")
    ok(s.cli("rollback"))  # nothing to undo: still fine
    ok(s.cli("commit", "2"))
    assert json.loads(ok(s.cli("status", "--json")).stdout)["committed"] == 2
    # the control address given explicitly, and through the environment
    r = nbd_mc("status", "--json", "--control", s.control_path)
    assert json.loads(ok(r).stdout)["committed"] == 2


def test_clients_without_a_server(servers):
    d = servers.path("nothing")
    os.makedirs(d)
    for cmd in (["status"], ["commit", "1"], ["rollback"], ["fence"], ["stop"]):
        r = nbd_mc(*cmd, "--state-dir", d)
        refused(r, "cannot reach")


# --- fence and failover --------------------------------------------------------------------------
def test_fence_refuses_old_connections_and_commits(servers):
    s, model = group(servers)
    s.start()
    ok(s.cli("commit", "1"))
    model.commit(1)
    old = s.connect("vda")
    old.pwrite(b"before fence", 0)
    model.write("vda", 0, b"before fence")
    r = json.loads(ok(s.cli("fence", "--json")).stdout)
    assert r["generation"] == 1
    with pytest.raises(nbd.Error) as e:
        old.pwrite(b"after fence", 100)
    assert e.value.errnum == errno.EPERM, e.value  # EROFS travels as EPERM: NBD has no EROFS
    with pytest.raises(nbd.Error) as e:
        old.zero(4096, 8192)
    assert e.value.errnum == errno.EPERM
    with pytest.raises(nbd.Error) as e:
        old.trim(4096, 8192)
    assert e.value.errnum == errno.EPERM
    # reads still work; nothing changed on disk
    assert old.pread(12, 0) == b"before fence"
    assert_bytes(read_file(s.image("vda")), model.live["vda"], "vda after refused writes")
    refused(s.cli("commit", "2"), "Fenced")
    st = json.loads(ok(s.cli("status", "--json")).stdout)
    assert st["fenced"] is True and st["committed"] == 1
    # fencing survives a restart
    s.stop()
    s.start(with_disks=False)
    st = s.execute("query-status")
    assert st["fenced"] is True and st["generation"] == 1
    h = s.connect("vdb")
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x", 0)
    assert e.value.errnum == errno.EPERM


def test_failover_promotes_and_fences_old_connections(servers):
    s, model = group(servers)
    s.start()
    old = s.connect("vda")
    ok(s.cli("commit", "1"))
    model.commit(1)
    data = random.Random(3).randbytes(300000)
    old.pwrite(data, 777)
    model.write("vda", 777, data)
    r = json.loads(ok(s.cli("failover", "--json")).stdout)
    assert r["committed"] == 1
    assert [(d["name"], d["path"], d["format"]) for d in r["disks"]] == [
        ("vda", s.image("vda"), "raw"), ("vdb", s.image("vdb"), "raw")]
    model.rollback()
    for d in ("vda", "vdb"):
        assert_bytes(read_file(s.image(d)), model.committed[d], f"{d} after failover")
    with pytest.raises(nbd.Error) as e:
        old.pwrite(b"stale primary", 0)
    assert e.value.errnum == errno.EPERM
    # a plain reconnect is read-only now; the new primary writes through its export
    with pytest.raises(nbd.Error):
        s.connect("vda").pwrite(b"stale reconnect", 0)
    new = s.connect(r["disks"][0]["export"])
    new.pwrite(b"new primary", 0)
    model.write("vda", 0, b"new primary")
    assert_bytes(read_file(s.image("vda")), model.live["vda"], "vda written by the new primary")
    st = json.loads(ok(s.cli("status", "--json")).stdout)
    assert st["role"] == "primary" and st["protected"] is False and st["fenced"] is False
    refused(s.cli("rollback"), "NotProtected")
    refused(s.cli("commit", "2"), "Fenced")
    # idempotent: a second failover changes nothing
    r = json.loads(ok(s.cli("failover", "--json")).stdout)
    assert r["committed"] == 1
    new.pwrite(b"still writable", 100)


def test_failover_instant_hands_out_the_overlay(servers, workdir):
    s, model = group(servers)
    s.start()
    h = s.connect("vdb")
    ok(s.cli("commit", "1"))
    model.commit(1)
    data = random.Random(4).randbytes(200000)
    h.pwrite(data, 1000)
    model.write("vdb", 1000, data)
    h.zero(65536 * 3, 500000)
    model.zero("vdb", 500000, 65536 * 3)
    r = json.loads(ok(s.cli("failover", "--instant", "--json")).stdout)
    assert r["committed"] == 1
    assert [(d["name"], d["path"], d["format"]) for d in r["disks"]] == [
        ("vda", s.overlay("vda"), "qcow2"), ("vdb", s.overlay("vdb"), "qcow2")]
    for d in ("vda", "vdb"):
        expected = os.path.join(workdir, f"{d}.model.raw")
        write_file(expected, model.committed[d])
        assert_check(s.overlay(d), allowed=(0,))
        assert_compare(s.overlay(d), expected)
    # nobody writes the images any more; new connections are refused altogether
    # (the images hold the open epoch's uncommitted writes)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x", 0)
    assert e.value.errnum in (errno.EPERM, errno.EROFS), e.value
    with pytest.raises(nbd.Error):
        s.connect("vda")
    assert_bytes(read_file(s.image("vdb")), model.live["vdb"], "vdb image untouched")
    # after the hand-off the state directory is not served again
    s.stop()
    refused(s.start(check=False, with_disks=False), "instant failover")


# --- stop ------------------------------------------------------------------------------------------
def test_stop_with_a_client_connected(servers):
    """The primary's mirror never disconnects: stop must not wait for it."""
    s, _ = group(servers)
    s.start()
    h = s.connect("vda")
    h.pwrite(b"x" * 4096, 0)
    pid = s.pid
    r = s.cli("stop")
    ok(r)
    assert not pid_alive(pid)
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    s.pid = None
    s.start(with_disks=False)
    assert read_all(s.connect("vda"))[:4096] == b"x" * 4096


def test_stop_force_ends_a_server_that_does_not_answer(servers):
    """A hung server (SIGSTOP): plain stop gives up at its timeout (exit 1, nothing
    killed); stop --force ends the nbdkit of DIR's pid file, and serve recovers the
    directory to the last commit."""
    s, _ = group(servers)
    s.start()
    h = s.connect("vda")
    h.pwrite(b"c" * 4096, 0)
    s.execute("commit", epoch=1)
    h.pwrite(b"u" * 4096, 0)  # the open epoch: rolled back by the recovery
    s.close_clients()
    pid = s.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        r = nbd_mc("stop", "--timeout", "2s", "--state-dir", s.state_dir)
        refused(r)
        assert pid_alive(pid)
        r = nbd_mc("stop", "--force", "--timeout", "4s", "--state-dir", s.state_dir, "--json")
        ok(r)
        out = json.loads(r.stdout)
        assert out["forced"] is True and f"nbdkit {pid} stopped" in out["how"], out
        assert not pid_alive(pid)
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    s.pid = None
    s.start(with_disks=False)
    assert s.execute("query-status")["committed"] == 1
    assert read_all(s.connect("vda"))[:4096] == b"c" * 4096
    r = nbd_mc("stop", "--force", "--state-dir", s.state_dir)  # it answers: a clean stop
    ok(r)
    assert "server stopped" in r.stdout
    s.pid = None
    r = nbd_mc("stop", "--force", "--state-dir", s.state_dir, "--json")  # nothing runs
    ok(r)
    assert json.loads(r.stdout)["how"] == "no server was running"
    r = nbd_mc("stop", "--force", "--control", s.control_path)
    assert r.returncode == 2 and "--force needs --state-dir" in r.stderr, describe(r)


def test_set_aside_starts_a_fresh_group_on_the_same_images(servers):
    """The failback of an old live disk: its group is moved to DIR.diverged (refused
    while a server holds it), and serve starts a fresh group (epoch 0) on the images,
    which keep their contents."""
    s, _ = group(servers)
    s.start()
    h = s.connect("vda")
    h.pwrite(b"L" * 4096, 0)
    s.execute("commit", epoch=1)
    s.close_clients()
    refused(s.cli("set-aside"), "stop it first")
    ok(s.cli("failover"))
    ok(s.cli("stop"))
    s.pid = None
    r = nbd_mc("set-aside", "--state-dir", s.state_dir, "--json")
    ok(r)
    out = json.loads(r.stdout)
    assert out["role"] == "primary" and out["committed"] == 1, out
    assert out["moved_to"] == s.state_dir.rstrip("/") + ".diverged"
    assert not os.path.exists(s.state_dir)
    info = json.loads(nbd_mc("inspect", out["moved_to"], "--json").stdout)
    assert info["role"] == "primary" and info["committed"] == 1
    s.start()
    st = s.execute("query-status")
    assert st["committed"] == 0 and st["role"] == "secondary"
    assert read_all(s.connect("vda"))[:4096] == b"L" * 4096
    s.close_clients()
    refused(nbd_mc("set-aside", "--state-dir", s.state_dir + "-nothing"), "no nbd-mc state")


# --- usage errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    [],
    ["no-such-command"],
    ["commit"],
    ["commit", "abc"],
    ["commit", "-1"],
    ["commit", "1", "--bogus"],
    ["serve", "x.raw"],
    ["serve", "x.raw", "--state-dir", "/tmp/nbdmc-usage", "--socket", "/tmp/s", "--port", "10809"],
    ["serve", "x.raw", "--state-dir", "/tmp/nbdmc-usage", "--durability", "sometimes"],
    ["serve", "x.raw", "--state-dir", "/tmp/nbdmc-usage", "--port", "99999"],
    ["recover"],
    ["status"],
    ["inspect"],
    ["failover", "--instant=yes"],
])
def test_usage_errors_exit_2(argv):
    r = nbd_mc(*argv)  # NBD_MC_CONTROL is not set for it
    assert r.returncode == 2, describe(r)
    assert "Traceback" not in r.stderr
    assert not os.path.exists("/tmp/nbdmc-usage")


def test_recover_and_inspect_cli(servers):
    s, model = group(servers)
    s.start()
    ok(s.cli("commit", "1"))
    model.commit(1)
    h = s.connect("vda")
    h.pwrite(b"\x77" * 200000, 3)
    s.kill9()
    r = json.loads(ok(nbd_mc("recover", "--state-dir", s.state_dir, "--json")).stdout)
    assert r["committed"] == 1 and r["restored_clusters"] >= 4
    assert_bytes(read_file(s.image("vda")), model.committed["vda"], "vda after recover")
    assert_check(s.overlay("vda"), allowed=(0,))
    rep = json.loads(ok(nbd_mc("inspect", s.state_dir, "--json")).stdout)
    assert rep["valid"] and rep["committed"] == 1 and not rep["server_running"]
    rep = json.loads(ok(nbd_mc("inspect", s.overlay("vdb"), "--json")).stdout)
    assert rep["valid"] and rep["epoch"] == 1 and rep["preserved_clusters"] == 0
    bogus = servers.path("bogus.qcow2")
    write_file(bogus, b"not a qcow2 file" * 100)
    r = nbd_mc("inspect", bogus)
    assert r.returncode == 1 and "INVALID" in r.stdout, describe(r)


def test_failover_without_a_server(servers):
    """The primary died and so did the secondary's server: failover --state-dir works
    on the files, and a server started afterwards serves the new primary."""
    s, model = group(servers)
    s.start()
    ok(s.cli("commit", "1"))
    model.commit(1)
    h = s.connect("vdb")
    h.pwrite(b"\x5a" * 300000, 4096)
    s.kill9()
    r = json.loads(ok(s.cli("failover", "--json")).stdout)
    assert r["committed"] == 1 and r["disks"][1]["path"] == s.image("vdb")
    for d in ("vda", "vdb"):
        assert_bytes(read_file(s.image(d)), model.committed[d], f"{d} after offline failover")
        assert_check(s.overlay(d), allowed=(0,))
    assert s.state()["role"] == "primary"
    s.start(with_disks=False)
    st = s.execute("query-status")
    assert st["role"] == "primary" and not st["fenced"]
    s.connect(r["disks"][1]["export"]).pwrite(b"new primary", 0)
    with pytest.raises(nbd.Error):
        s.connect("vdb").pwrite(b"stale reconnect", 0)
    refused(s.cli("commit", "2"), "Fenced")
