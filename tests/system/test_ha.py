"""High availability on Pacemaker: the OCF agents (ha/) and the two-node story.

* meta-data of every agent is valid OCF (xmllint against resource-agents' DTD);
* ocf-tester (resource-agents) passes on ocf:nbd-mc:replica for a replica that has
  committed an epoch, given just ``disks`` and ``state_dir``, and on the qemu agent;
* a replica that never committed an epoch is never promoted;
* the story (tests/support/ha_story.py) on two real Pacemaker nodes: QEMU killed
  -9 and later a whole node killed; each time Pacemaker promotes the other replica,
  the VM boots there and its own check (fsck, every committed record) passes; the
  nodes come back as secondaries keeping their images and are protected again in
  the other direction by a checksum resync that copies a small part of the disk
  (failback); both sides claiming primary is refused or recorded, never resolved
  silently.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from support.servers import pid_alive, short_tmpdir

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
AGENTS = ("replica", "protect", "qemu")
#: This checkout's agents, as the wrappers tools/setup-ha.sh installs, in a directory
#: of their own: /usr/lib/ocf/resource.d/nbd-mc belongs to whichever checkout ran
#: `make setup` last (several share this machine), so testing it would test theirs.
OCF_DIR = Path(short_tmpdir("nbdmc-ocf-"))
OCF_DIR.chmod(0o755)  # ocf-tester also runs the agents as nobody
VENV_BIN = Path(os.path.dirname(os.path.abspath(os.sys.executable)))


@pytest.fixture(scope="module", autouse=True)
def installed_agents():
    """This checkout's agents in OCF_DIR (what make setup installs, for this checkout)."""
    env = dict(os.environ, OCF_ROOT=str(OCF_DIR.parent / (OCF_DIR.name + "-root")))
    subprocess.run([str(REPO / "tools" / "setup-ha.sh"), str(VENV_BIN / "python"), str(REPO)],
                   check=True, capture_output=True, env=env)
    for name in AGENTS:
        (OCF_DIR / name).unlink(missing_ok=True)
        (OCF_DIR / name).symlink_to(Path(env["OCF_ROOT"], "resource.d", "nbd-mc", name))
    yield
    shutil.rmtree(env["OCF_ROOT"], ignore_errors=True)
    shutil.rmtree(OCF_DIR, ignore_errors=True)


@pytest.fixture
def tmp():
    d = short_tmpdir("nbdmc-ha-")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def nbd_mc(*args, check=True):
    env = dict(os.environ, PATH=f"{VENV_BIN}:/usr/bin:{os.environ.get('PATH', '')}")
    return subprocess.run([str(VENV_BIN / "nbd-mc"), *args], check=check, capture_output=True,
                          text=True, env=env)


def agent(name, action, params: dict, check=False):
    env = {"PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
           "OCF_ROOT": "/usr/lib/ocf", "OCF_RESOURCE_INSTANCE": "t-" + name,
           "HA_RSCTMP": params.pop("_rsctmp", "/run/resource-agents"),
           **{f"OCF_RESKEY_{k}": v for k, v in params.items()}}
    return subprocess.run([str(OCF_DIR / name), action], capture_output=True, text=True, env=env,
                          check=check)


@pytest.mark.parametrize("name", AGENTS)
def test_meta_data_is_valid_ocf(name):
    meta = subprocess.run([str(OCF_DIR / name), "meta-data"], capture_output=True, text=True,
                          check=True).stdout
    lint = subprocess.run(["xmllint", "--noout", "--valid", "-"], input=meta, text=True,
                          capture_output=True, cwd="/usr/share/resource-agents")
    assert lint.returncode == 0, lint.stderr
    assert f'<resource-agent name="{name}"' in meta


def committed_replica(tmp: Path, epochs: int = 1) -> tuple[str, str]:
    img = tmp / "vda.raw"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    st = tmp / "st"
    nbd_mc("serve", f"vda={img}", "--state-dir", str(st))
    try:
        for e in range(1, epochs + 1):
            nbd_mc("commit", str(e), "--state-dir", str(st))
    finally:
        nbd_mc("stop", "--state-dir", str(st))
    return f"vda={img}", str(st)


def test_ocf_tester_passes_on_a_committed_replica(tmp):
    disks, st = committed_replica(tmp)
    p = subprocess.run(["ocf-tester", "-n", "nbdmc-replica", "-o", f"disks={disks}",
                        "-o", f"state_dir={st}", str(OCF_DIR / "replica")],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "passed all tests" in p.stdout
    # ocf-tester promoted it (failover to epoch 1) and stopped it: nothing runs.
    info = json.loads(nbd_mc("inspect", st, "--json").stdout)
    assert info["role"] == "primary" and info["committed"] == 1 and info["valid"]
    assert not info["server_running"]


def test_ocf_tester_passes_on_the_qemu_agent(tmp):
    p = subprocess.run(["ocf-tester", "-n", "nbdmc-qemu",
                        "-o", "args=-machine none -nodefaults -display none",
                        "-o", f"qmp={tmp}/vm.qmp", str(OCF_DIR / "qemu")],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_replica_without_a_commit_is_never_promoted(tmp):
    img = tmp / "vda.raw"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    params = {"disks": f"vda={img}", "state_dir": str(tmp / "st"), "_rsctmp": str(tmp / "run")}
    try:
        start = agent("replica", "start", dict(params))
        assert start.returncode == 0, start.stderr
        assert "no promotion score: no epoch committed yet" in start.stderr
        promote = agent("replica", "promote", dict(params))
        assert promote.returncode == 1
        # the reason Pacemaker keeps for crm_mon: one line, the last of stderr
        assert promote.stderr.strip().splitlines()[-1].startswith(
            "ocf-exit-reason:promote: refusing to promote garbage"), promote.stderr
        assert agent("replica", "monitor", dict(params)).returncode == 0  # still unpromoted
        st = json.loads(nbd_mc("status", "--state-dir", str(tmp / "st"), "--json").stdout)
        assert st["role"] == "secondary" and st["committed"] == 0
    finally:
        assert agent("replica", "stop", dict(params)).returncode == 0
    assert agent("replica", "monitor", dict(params)).returncode == 7


@pytest.mark.timeout(600)  # about 100 s; its own waits have deadlines
def test_pacemaker_fails_the_vm_over_and_back(tmp, capsys):
    """The story of tests/support/ha_story.py: both kinds of kill, both directions."""
    from support.ha_story import Story
    lines = []
    story = Story(tmp / "story", say=lines.append)
    try:
        figures = story.run()
    except BaseException:
        print("\n".join(lines))
        print(story.cluster.describe() if story.cluster else "")
        print(story.agents_log()[-6000:])
        raise
    finally:
        story.stop()
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    report = os.environ.get("NBD_MC_HA_REPORT")
    if report:  # the figures first: a failing assertion below still leaves them
        Path(report).write_text(json.dumps(figures, indent=2))
    for kind in ("qemu_kill", "node_kill"):
        f = figures[kind]
        assert f["fsck"] == 0 and f["records_checked"] >= f["committed_seq"] > 0
    # Failback: both returning nodes were brought in step incrementally, by content.
    assert figures["initial_sync"]["mode"] == "full"
    for node in ("node1", "node2"):
        f = figures["failback"][node]
        assert f["mode"] == "checksum", f
        # (it may copy nothing: a walk done before the new VM wrote, after a rollback
        # of nothing, finds both images equal)
        assert f["bytes"] < f["disk_bytes"] // 4, f
    # Cold start with both groups primary: the newer live disk won, every record there.
    f = figures["cold_start_failover"]
    assert f["fsck"] == 0 and f["records_checked"] >= f["committed_seq"] > 0
    f = figures["cold_start"]["node1"]
    assert f["mode"] == "checksum" and f["bytes"] < f["disk_bytes"] // 4, f


def test_promotion_fails_over_records_the_rollback_and_monitor_sees_8_then_9(tmp):
    disks, st = committed_replica(tmp, epochs=2)
    params = {"disks": disks, "state_dir": st, "_rsctmp": str(tmp / "run")}
    try:
        assert agent("replica", "start", dict(params)).returncode == 0
        promote = agent("replica", "promote", dict(params))
        assert promote.returncode == 0, promote.stderr
        assert "failover: the disks hold committed epoch 2" in promote.stderr
        summary = json.loads((tmp / "st.rolled-back" / "summary.json").read_text())
        assert summary["committed"] == 2 and summary["disks"][0]["name"] == "vda"
        # a promotion by failover starts a live-disk generation (no cluster: 0 + 1)
        assert (tmp / "st.generation").read_text().strip() == "1"
        assert agent("replica", "monitor", dict(params)).returncode == 8  # running promoted
        # Something serves the live disks behind Pacemaker's back: failed promoted.
        nbd_mc("serve", "--state-dir", st)
        try:
            mon = agent("replica", "monitor", dict(params))
            assert mon.returncode == 9, mon.stderr
            assert "an nbd-mc server serves the live disks" in mon.stderr
        finally:
            nbd_mc("stop", "--state-dir", st)
        demote = agent("replica", "demote", dict(params))
        assert demote.returncode == 0
        assert "promotion score 1000: this node holds the live disks" in demote.stderr
        assert agent("replica", "monitor", dict(params)).returncode == 0
    finally:
        assert agent("replica", "stop", dict(params)).returncode == 0
    assert agent("replica", "monitor", dict(params)).returncode == 7


def test_stop_ends_a_replica_server_that_does_not_answer_within_the_action_timeout(tmp):
    """A hung server (SIGSTOP): the agent's stop goes through `nbd-mc stop --force`
    (no pid files of its own) and is done within the timeout Pacemaker gives it."""
    disks, st = committed_replica(tmp)
    params = {"disks": disks, "state_dir": st, "_rsctmp": str(tmp / "run")}
    start = agent("replica", "start", dict(params))
    assert start.returncode == 0, start.stderr
    pid = int(Path(st, "nbdkit.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        stop = agent("replica", "stop", dict(params, CRM_meta_timeout="20000"))
        assert stop.returncode == 0, stop.stderr
        assert "the server did not answer" in stop.stderr, stop.stderr
        assert not pid_alive(pid)
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    info = json.loads(nbd_mc("inspect", st, "--json").stdout)
    assert not info["server_running"] and info["committed"] == 1


def test_a_fenced_replica_gets_no_promotion_score(tmp):
    disks, st = committed_replica(tmp)
    params = {"disks": disks, "state_dir": st, "_rsctmp": str(tmp / "run")}
    try:
        start = agent("replica", "start", dict(params))
        assert start.returncode == 0 and "promotion score 100: protected replica" in start.stderr
        nbd_mc("fence", "--state-dir", st)
        mon = agent("replica", "monitor", dict(params))
        assert mon.returncode == 0
        assert "no promotion score: the group is fenced (generation 1)" in mon.stderr
    finally:
        assert agent("replica", "stop", dict(params)).returncode == 0


def test_a_stale_replica_is_promoted_with_a_low_score(tmp):
    """Every replica goes stale once its primary dies (no commit for stale_after):
    its last commit is still the newest copy there is, so it keeps a (low) promotion
    score and promote fails it over, logging the age, instead of refusing -- a
    refusal made every failover later than stale_after fail (the three-node story)."""
    from nbd_mc.control.client import ControlClient
    from nbd_mc.statedir import StateDir
    disks, st = committed_replica(tmp)
    params = {"disks": disks, "state_dir": st, "_rsctmp": str(tmp / "run")}
    try:
        assert agent("replica", "start", dict(params)).returncode == 0
        ctl = ControlClient(StateDir(st).control)
        try:
            ctl.execute("new-session", stale_after=0.2)
            ctl.execute("commit", epoch=2)
            deadline = time.monotonic() + 30
            while not ctl.execute("query-status")["stale"]:
                assert time.monotonic() < deadline, "the group never went stale"
                time.sleep(0.05)
        finally:
            ctl.close()
        mon = agent("replica", "monitor", dict(params))
        assert mon.returncode == 0, mon.stderr
        assert "promotion score 10: replica at committed epoch 2, stale" in mon.stderr
        promote = agent("replica", "promote", dict(params))
        assert promote.returncode == 0, promote.stderr
        assert "promoting a stale group: its last commit is" in promote.stderr
        assert "failover: the disks hold committed epoch 2" in promote.stderr
        assert agent("replica", "monitor", dict(params)).returncode == 8  # running promoted
    finally:
        assert agent("replica", "stop", dict(params)).returncode == 0
    info = json.loads(nbd_mc("inspect", st, "--json").stdout)
    assert info["role"] == "primary" and info["committed"] == 2


def test_ocf_tester_passes_on_the_protect_agent(tmp):
    """Start, monitor, stop of the supervisor (its peer does not exist: it waits)."""
    tls = tmp / "tls"
    subprocess.run([str(REPO / "tools" / "make-certs.sh"), str(tls)], check=True,
                   capture_output=True)
    me = os.uname().nodename  # no cluster: the agent falls back to the host name
    p = subprocess.run(["ocf-tester", "-n", "nbdmc-protect",
                        "-o", f"qmp={tmp}/vm.qmp", "-o", "drives=drive0=vda",
                        "-o", f"addresses={me}=127.0.0.1 other=127.0.0.2",
                        "-o", f"tls_certificates={tls}", "-o", "retry=0.2",
                        str(OCF_DIR / "protect")],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_split_brain_record_keeps_the_live_disks_untouched(tmp):
    """A node that recorded a split brain (it saw another node promoted while it held
    the live disks) neither serves, scores nor promotes its images until the record
    is removed (the cluster-side rules are in the story, step 6)."""
    disks, st = committed_replica(tmp)
    nbd_mc("serve", "--state-dir", st)
    nbd_mc("failover", "--state-dir", st)
    nbd_mc("stop", "--state-dir", st)  # role primary: this node's images are live disks
    (tmp / "st.split-brain").write_text(json.dumps({"peer": "node2", "seen_in": "a test"}))
    params = {"disks": disks, "state_dir": st, "_rsctmp": str(tmp / "run")}
    try:
        start = agent("replica", "start", dict(params))
        assert start.returncode == 0, start.stderr
        assert "no promotion score: SPLIT BRAIN with node2 (a test)" in start.stderr
        promote = agent("replica", "promote", dict(params))
        assert promote.returncode == 1
        assert "refusing to promote: split brain with node2 recorded" in promote.stderr
        info = json.loads(nbd_mc("inspect", st, "--json").stdout)
        assert info["role"] == "primary" and not info["server_running"]
        assert not (tmp / "st.diverged").exists()
        # The record removed, no other node promoted: the newest live disks again.
        (tmp / "st.split-brain").unlink()
        mon = agent("replica", "monitor", dict(params))
        assert mon.returncode == 0
        assert "promotion score 1000: this node holds the live disks" in mon.stderr
    finally:
        assert agent("replica", "stop", dict(params)).returncode == 0


def _free_port(host: str) -> int:
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_the_protect_agent_protects_a_libvirt_domain(tmp, domains):
    """ocf:nbd-mc:protect with domain= (the VM of ocf:heartbeat:VirtualDomain): the
    supervisor runs `nbd-mc protect --libvirt`, syncs the domain's disk into the
    peer's replica over TLS and commits; stop detaches and the domain runs on; the
    replica is the disk (qemu-img compare)."""
    from support.libvirt import domain_xml
    img, rep = tmp / "vda.raw", tmp / "replica-vda.raw"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
        for off in (0, 3 << 20, (8 << 20) - 65536):
            f.seek(off)
            f.write(os.urandom(65536))
    with open(rep, "wb") as f:
        f.truncate(8 << 20)
    tls = tmp / "tls"
    subprocess.run([str(REPO / "tools" / "make-certs.sh"), str(tls), "127.0.0.2"], check=True,
                   capture_output=True)
    peer = "127.0.0.2"
    nbd_port, control_port = _free_port(peer), _free_port(peer)
    control = f"tcp://{peer}:{control_port}"
    st = tmp / "st"
    nbd_mc("serve", f"vda={rep}", "--state-dir", str(st), "--port", str(nbd_port), "--bind",
           peer, "--tls", "require", "--tls-certificates", str(tls), "--control", control)
    name = f"nbdmc-ha-{os.getpid()}"
    domains.create(domain_xml(name, {"vda": str(img)}))
    me = os.uname().nodename  # no cluster: the agent falls back to the host name
    params = {"domain": name, "connect": "qemu:///system", "drives": "vda",
              "addresses": f"{me}=127.0.0.1 peer={peer}", "nbd_port": str(nbd_port),
              "control_port": str(control_port), "tls_certificates": str(tls),
              "interval": "100ms", "retry": "0.5", "_rsctmp": str(tmp / "run")}
    record = tmp / "run" / "nbd-mc-protect-t-protect.resync.json"

    def status():
        return json.loads(nbd_mc("status", "--control", control, "--tls-certificates",
                                 str(tls), "--json").stdout)
    try:
        _protect_domain_into_replica(name, params, record, status, tmp)
    finally:
        nbd_mc("stop", "--control", control, "--tls-certificates", str(tls), check=False)
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), str(rep)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def _protect_domain_into_replica(name, params, record, status, tmp):
    from nbd_mc.primary.libvirt import LibvirtQmp
    try:
        assert agent("protect", "validate-all", dict(params)).returncode == 0
        both = agent("protect", "validate-all", dict(params, qmp=str(tmp / "vm.qmp")))
        assert both.returncode == 6 and "give qmp or domain, not both" in both.stderr
        start = agent("protect", "start", dict(params))
        assert start.returncode == 0, start.stderr
        deadline = time.monotonic() + 120
        while not (record.exists() and status()["committed"] >= 2):
            assert time.monotonic() < deadline, (tmp / "run").joinpath(
                "nbd-mc-protect-t-protect.log").read_text()[-3000:]
            time.sleep(0.2)
        r = json.loads(record.read_text())
        assert r["peer"] == "peer" and r["mode"] == "full" and r["bytes"] == 8 << 20, r
        log = (tmp / "run" / "nbd-mc-protect-t-protect.log").read_text()
        assert f"--libvirt {name} --connect qemu:///system" in log
        assert agent("protect", "monitor", dict(params)).returncode == 0
    finally:
        stop = agent("protect", "stop", dict(params))
    assert stop.returncode == 0, stop.stderr
    assert agent("protect", "monitor", dict(params)).returncode == 7
    s = LibvirtQmp(name, exclusive=False)
    try:  # detached: the domain runs on, no job of ours is left
        assert s.cmd("query-status")["running"]
        assert s.cmd("query-block-jobs") == []
    finally:
        s.close()
    assert status()["committed"] >= 2
