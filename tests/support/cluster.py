"""Real Pacemaker nodes on one machine (two or more), for the HA tests and `make demo-ha`.

Each node is a network namespace plus a private mount namespace: its own
loopback and veth address (10.88.0.N for nodeN -- only those; the veths meet on
a bridge in a hub namespace of their own), its own /run
and /dev/shm (libqb's IPC lives there and in abstract sockets, which the netns
keeps apart), and its own /etc/corosync, /var/lib/pacemaker, /var/log and the
data directory (``DATA``, where the node's disk images and nbd-mc state live)
bind-mounted from ``ROOT/<node>/``.  Everything else of the file system is
shared, like two hosts with the same software installed.

Two checkouts on one machine may run their clusters at the same time: the
namespaces' names carry a hash of the checkout's path (within one checkout, one
cluster at a time: :meth:`Cluster.start` waits for a lock on ``LOCK``, which
:meth:`Cluster.stop` releases, so that `make test`'s two xdist workers never run
two stories at once), and each node bind-mounts
its own copy of the nbd-mc OCF agents (wrappers that run this checkout's
``ha/*.py``) over ``/usr/lib/ocf/resource.d/nbd-mc``, so another checkout's
``make setup`` cannot swap the agents under a running cluster.

corosync runs in the foreground with knet over the bridge (``two_node: 1``
with two nodes, plain majority quorum with three or more); pacemakerd starts
once corosync answers.  Killing a node is
SIGKILL to every process of its network namespace (cluster daemons, QEMU,
nbdkit, agents): what a power cut looks like to the survivor.

Synchronisation is pure polling of the cluster's own answers (``crm_mon
--output-as=xml``, ``cibadmin``, the agents' files) with a deadline: no sleep
stands for "it has probably happened by now".

State block of :class:`Cluster`: ``nodes`` (name -> Node) is written by
``__init__`` only; each Node's ``proc`` (the namespace's holder process) is
set by ``Node.start`` and cleared by ``Node.kill``; all of it is used from one
thread.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

MAX_NODES = 9
ADDRS = {f"node{i}": f"10.88.0.{i}" for i in range(1, MAX_NODES + 1)}
DATA = "/var/lib/nbd-mc"  # the data directory, the same path on every node
REPO = Path(__file__).resolve().parents[2]
NS_PREFIX = f"nbdmc-{hashlib.sha1(str(REPO).encode()).hexdigest()[:4]}-"
OCF_AGENTS = "/usr/lib/ocf/resource.d/nbd-mc"  # where Pacemaker looks for ocf:nbd-mc:*
VETH = "nbdmc-v"  # + the node's number: its end of the veth; the hub's end is "p" + number
BRIDGE = "nbdmc-br"  # in the hub namespace, NS_PREFIX + "hub"
POLL = 0.1
LOCK = f"/run/lock/{NS_PREFIX}cluster.lock"  # one cluster per checkout at a time
VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))  # nbd-mc for Node.sh

COROSYNC_CONF = """\
totem {{
    version: 2
    cluster_name: nbd-mc
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: {token}
    join: 50
}}
nodelist {{
{nodes}}}
quorum {{
    provider: corosync_votequorum
{two_node}}}
logging {{
    to_logfile: yes
    logfile: /var/log/corosync/corosync.log
    to_stderr: no
    to_syslog: no
    timestamp: on
}}
"""

COROSYNC_NODE = """\
    node {{
        ring0_addr: {addr}
        name: {name}
        nodeid: {id}
    }}
"""


def corosync_conf(names: list[str], token: int = 1000) -> str:
    """corosync.conf of a cluster of ``names`` (node1..nodeN, addresses from ADDRS)."""
    nodes = "".join(COROSYNC_NODE.format(addr=ADDRS[n], name=n, id=n.removeprefix("node"))
                    for n in names)
    two = "    two_node: 1\n" if len(names) == 2 else ""
    return COROSYNC_CONF.format(nodes=nodes, two_node=two, token=token)


# The CIB a node starts with (`cibadmin --empty` plus properties that must hold
# before the first DC election: a short dc-deadtime forms the cluster in seconds).
CRM_CONFIG = """\
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="cib-bootstrap-options-stonith-enabled" name="stonith-enabled" value="{stonith}"/>
        <nvpair id="cib-bootstrap-options-dc-deadtime" name="dc-deadtime" value="2s"/>
        <nvpair id="cib-bootstrap-options-cluster-recheck-interval" name="cluster-recheck-interval" value="1min"/>
      </cluster_property_set>
    </crm_config>"""


def initial_cib(stonith: bool) -> str:
    empty = run(["cibadmin", "--empty"]).stdout
    return empty.replace("<crm_config/>", CRM_CONFIG.format(
        stonith="true" if stonith else "false").strip(), 1)


class ClusterError(AssertionError):
    """The cluster did not reach a state in time (the message says what it showed)."""


def run(cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr or p.stdout}")
    return p


def wait_for(cond, what: str, timeout: float, describe=None):
    """Poll cond() until it returns something true; ClusterError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            extra = f"\n{describe()}" if describe else ""
            raise ClusterError(f"no {what} within {timeout} s{extra}")
        time.sleep(POLL)


@dataclass
class Node:
    name: str
    addr: str
    root: Path
    stonith: bool = False
    proc: subprocess.Popen | None = None
    env: dict = field(default_factory=dict)
    agents: Path | None = None  # this checkout's agent wrappers, mounted at OCF_AGENTS
    members: list = field(default_factory=lambda: ["node1", "node2"])  # the cluster's nodes

    @property
    def ns(self) -> str:
        return NS_PREFIX + self.name

    @property
    def data(self) -> Path:
        """The host path of this node's DATA directory."""
        return self.root / "data"

    def prepare(self) -> None:
        """The node's own directories: corosync.conf, an initial CIB, log and data dirs."""
        for sub in ("corosync", "log/corosync", "log/pacemaker", "log/crmsh", "data",
                    "pacemaker/cib", "pacemaker/pengine", "pacemaker/blackbox",
                    "pacemaker/cores"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "corosync" / "corosync.conf").write_text(corosync_conf(self.members))
        cib = self.root / "pacemaker" / "cib" / "cib.xml"
        if not cib.exists():
            cib.write_text(initial_cib(self.stonith))
            cib.chmod(0o600)
        for sub in ("pacemaker", "log/pacemaker"):
            for dirpath, dirnames, filenames in os.walk(self.root / sub):
                for n in [dirpath, *(os.path.join(dirpath, f) for f in filenames)]:
                    shutil.chown(n, "hacluster", "haclient")

    def start(self) -> None:
        """Start corosync, then pacemakerd once corosync answers, inside the namespaces."""
        r = self.root
        script = f"""
set -e
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount --bind {r}/corosync /etc/corosync
mount --bind {r}/pacemaker /var/lib/pacemaker
mount --bind {r}/log /var/log
mkdir -p {DATA}
mount --bind {r}/data {DATA}
{f"mkdir -p {OCF_AGENTS} && mount --bind {self.agents} {OCF_AGENTS}" if self.agents else ""}
mkdir -p /run/lock
corosync -f > /var/log/corosync/stdout.log 2>&1 &
echo $! > {r}/corosync.pid
until corosync-cfgtool -s > /dev/null 2>&1; do sleep 0.1; done
pacemakerd > /var/log/pacemaker/stdout.log 2>&1 &
echo $! > {r}/pacemakerd.pid
wait
"""
        for f in ("corosync.pid", "pacemakerd.pid"):
            (r / f).unlink(missing_ok=True)
        env = dict(os.environ, **self.env)
        env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin:" + env.get("PATH", "")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "-m", "--propagation", "private",
             "bash", "-c", script],
            stdin=subprocess.DEVNULL, stdout=open(r / "node.log", "ab"),
            stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_for(lambda: (r / "pacemakerd.pid").exists() or self.proc.poll() is not None,
                 f"pacemakerd on {self.name}", 60)
        if self.proc.poll() is not None:
            raise ClusterError(f"{self.name} did not start:\n{(r / 'node.log').read_text()[-2000:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        p = run(["ip", "netns", "pids", self.ns], check=False)
        return [int(x) for x in p.stdout.split()]

    def kill(self) -> None:
        """SIGKILL every process of the node (a power cut), until none is left."""
        def gone():
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return not pids
        wait_for(gone, f"end of every process of {self.name}", 30)
        if self.proc is not None:
            self.proc.wait(10)
            self.proc = None

    def sh(self, cmd: list[str] | str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a command inside the node (its network and mount namespaces)."""
        if not self.alive():
            raise ClusterError(f"{self.name} is down")
        if isinstance(cmd, str):
            cmd = ["bash", "-c", cmd]
        env = dict(os.environ, **self.env)
        env["PATH"] = f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin:" + env.get("PATH", "")
        return run(["nsenter", "-t", str(self.proc.pid), "-m", "-n", *cmd], check=check,
                   timeout=timeout, env=env)

    def crm_mon(self) -> "Status | None":
        """The cluster as this node sees it, or None while it cannot tell."""
        if not self.alive():
            return None
        try:
            p = self.sh(["crm_mon", "-1", "--output-as=xml"], check=False, timeout=20)
        except subprocess.TimeoutExpired:
            return None
        if p.returncode != 0:
            return None
        try:
            return Status(ET.fromstring(p.stdout))
        except ET.ParseError:
            return None


class Status:
    """One crm_mon --output-as=xml snapshot."""

    def __init__(self, xml: ET.Element):
        self.xml = xml

    @property
    def dc(self) -> str | None:
        d = self.xml.find("summary/current_dc")
        return d.get("name") if d is not None and d.get("present") == "true" else None

    def online(self) -> set[str]:
        return {n.get("name") for n in self.xml.iter("node")
                if n.get("online") == "true" and n.get("name")}

    def resources(self, rid: str) -> list[tuple[str, str]]:
        """(node, role) of every active instance of resource id rid (clone ids too)."""
        out = []
        clone = next((c for c in self.xml.iter("clone") if c.get("id") == rid), None)
        candidates = clone.iter("resource") if clone is not None else self.xml.iter("resource")
        for r in candidates:
            if clone is not None or r.get("id", "").split(":")[0] == rid:
                if r.get("active") == "true" and r.get("failed") != "true":
                    for n in r.findall("node"):
                        out.append((n.get("name"), r.get("role")))
        return sorted(out)

    def where(self, rid: str, role: str = "Started") -> list[str]:
        return [n for n, ro in self.resources(rid) if ro == role]

    def failures(self) -> list[str]:
        return [f"{f.get('node')}: {f.get('op_key')} rc={f.get('exitcode')} {f.get('exitreason', '')}"
                for f in self.xml.iter("failure")]

    def text(self) -> str:
        lines = [f"DC {self.dc}, online {sorted(self.online())}"]
        for r in self.xml.iter("resource"):
            nodes = ",".join(n.get("name") for n in r.findall("node"))
            lines.append(f"  {r.get('id')} {r.get('resource_agent')} {r.get('role')} "
                         f"active={r.get('active')} failed={r.get('failed')} on {nodes}")
        lines += [f"  failure {f}" for f in self.failures()]
        return "\n".join(lines)


FENCE_AGENT = Path(__file__).resolve().parent / "fence_nbdmc_netns"
FENCE_INSTALLED = Path("/usr/sbin/fence_nbdmc_netns")  # where pacemaker-fenced looks


class Cluster:
    """``size`` nodes, node1..nodeN, each on a veth to one bridge; stop() removes everything."""

    def __init__(self, root: Path, stonith: bool = False, env: dict | None = None,
                 size: int = 2):
        if not 2 <= size <= MAX_NODES:
            raise ValueError(f"a cluster of 2..{MAX_NODES} nodes, not {size}")
        self.root = Path(root)
        agents = self.root / "ocf-agents"
        names = [f"node{i}" for i in range(1, size + 1)]
        self.nodes = {n: Node(n, ADDRS[n], self.root / n, stonith=stonith, env=dict(env or {}),
                              agents=agents, members=names)
                      for n in names}
        self.hub = NS_PREFIX + "hub"  # the namespace of the bridge the nodes' veths meet on
        self._lock = None  # the open LOCK file while this cluster runs (start..stop)

    def write_agents(self) -> None:
        """The wrappers tools/setup-ha.sh installs, for this checkout only."""
        d = self.root / "ocf-agents"
        d.mkdir(parents=True, exist_ok=True)
        for agent in ("replica", "protect", "qemu"):
            w = d / agent
            w.write_text(f'#!/bin/sh\nexec {VENV_BIN}/python {REPO}/ha/{agent}.py "$@"\n')
            w.chmod(0o755)

    # --- network ------------------------------------------------------------------------
    def setup_network(self) -> None:
        self.teardown_network()
        run(["ip", "netns", "add", self.hub])
        hub = ["ip", "-n", self.hub]
        run(hub + ["link", "add", BRIDGE, "type", "bridge"])
        run(hub + ["link", "set", BRIDGE, "up"])
        for node in self.nodes.values():
            i = node.name.removeprefix("node")
            veth, port = f"{VETH}{i}", f"p{i}"
            run(["ip", "netns", "add", node.ns])
            run(["ip", "link", "add", veth, "netns", node.ns, "type", "veth",
                 "peer", "name", port, "netns", self.hub])
            run(hub + ["link", "set", port, "master", BRIDGE])
            run(hub + ["link", "set", port, "up"])
            ns = ["ip", "-n", node.ns]
            run(ns + ["addr", "add", f"{node.addr}/24", "dev", veth])
            run(ns + ["link", "set", veth, "up"])
            run(ns + ["link", "set", "lo", "up"])

    def install_fence_agent(self) -> str:
        """Install the test fence agent; returns its netns_map parameter."""
        tmp = FENCE_INSTALLED.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(FENCE_AGENT)
        tmp.rename(FENCE_INSTALLED)
        return " ".join(f"{n.name}={os.stat(f'/run/netns/{n.ns}').st_ino}"
                        for n in self.nodes.values())

    def fence_history(self, via: str) -> list[dict]:
        """Pacemaker's fencing history as a node sees it: [{target, action, status}]."""
        st = self.nodes[via].sh(["crm_mon", "-1", "--output-as=xml", "--fence-history=3"],
                                check=False)
        try:
            xml = ET.fromstring(st.stdout)
        except ET.ParseError:
            return []
        return [dict(e.attrib) for e in xml.iter("fence_event")]

    def teardown_network(self) -> None:
        for node in self.nodes.values():
            if os.path.exists(f"/run/netns/{node.ns}"):
                for pid in node.pids():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                run(["ip", "netns", "del", node.ns], check=False)
        if os.path.exists(f"/run/netns/{self.hub}"):
            run(["ip", "netns", "del", self.hub], check=False)

    # --- life cycle ---------------------------------------------------------------------
    def start(self, timeout: float = 90) -> None:
        # the namespaces' names are this checkout's: wait for another story of it
        # (the other xdist worker) to end; the test's own timeout bounds the wait
        os.makedirs(os.path.dirname(LOCK), exist_ok=True)
        self._lock = open(LOCK, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.setup_network()
        self.write_agents()
        for node in self.nodes.values():
            node.prepare()
        for node in self.nodes.values():
            node.start()
        self.wait_online(set(self.nodes), timeout)

    def stop(self) -> None:
        """Kill every node and remove the namespaces (whatever state they are in)."""
        for node in self.nodes.values():
            if os.path.exists(f"/run/netns/{node.ns}"):
                node.kill()
        self.teardown_network()
        if FENCE_INSTALLED.is_symlink() and FENCE_INSTALLED.resolve() == FENCE_AGENT:
            FENCE_INSTALLED.unlink()
        if self._lock is not None:
            self._lock.close()  # (closing releases the flock)
            self._lock = None

    def restart(self, name: str, timeout: float = 90) -> None:
        """Bring a killed node back: fresh /run (nothing running), same disks and CIB dir."""
        node = self.nodes[name]
        node.start()
        self.wait_online(set(self.nodes), timeout, via=name)

    # --- looking ------------------------------------------------------------------------
    def status(self, via: str | None = None) -> Status | None:
        for name in ([via] if via else list(self.nodes)):
            st = self.nodes[name].crm_mon()
            if st is not None and st.dc:
                return st
        return None

    def describe(self, via: str | None = None) -> str:
        st = self.status(via)
        return st.text() if st else "(no node answers crm_mon)"

    def wait(self, cond, what: str, timeout: float = 60, via: str | None = None):
        """Poll cond(Status) on a node that has a DC until it is true."""
        def check():
            st = self.status(via)
            return cond(st) if st is not None else None
        return wait_for(check, what, timeout, lambda: self.describe(via))

    def wait_online(self, names: set[str], timeout: float = 90, via: str | None = None) -> None:
        self.wait(lambda st: names <= st.online(), f"nodes {sorted(names)} online", timeout, via)

    def configure(self, crm_text: str, via: str = "node1") -> None:
        """Load a crm shell configuration (crm configure load update) on a node."""
        path = self.root / "cluster.crm"
        path.write_text(crm_text)
        p = self.nodes[via].sh(["crm", "configure", "load", "update", str(path)], check=False,
                               timeout=120)
        if p.returncode != 0:
            raise ClusterError(f"crm configure load failed: {p.stderr}{p.stdout}")
