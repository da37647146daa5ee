"""The HA story on two real Pacemaker nodes (tests/system/test_ha.py and `make demo-ha`).

1. two nodes (support.cluster), a TLS directory for the pair, node1's image
   formatted with ext4 and made the first primary (the documented bootstrap),
   node2's image empty;
2. the cluster configuration of the README (ha/cluster.crm) is loaded: the
   replica clone is promoted on node1, the VM (the real test guest in
   ``service`` mode: it checks its disk at boot, then writes records) starts
   there and protect mirrors it into node2's replica;
3. failure 1: QEMU on node1 is killed with SIGKILL once a commit covers records
   the guest reported durable.  Pacemaker moves the VM: node2 is promoted (fence,
   rollback to the last commit), the VM boots there, its own check passes;
   node1's replica rejoins as a replica keeping its image (failback) and node2
   protects into it: a checksum resync copies only the blocks that differ;
4. failure 2: the whole of node2 dies (cluster daemons, QEMU, everything).  node1
   is promoted and the VM boots there; its own check passes;
5. node2 returns: it starts unpromoted, gives up its role as the live disk but
   keeps the image, and node1 protects into it (checksum resync again);
6. both sides claim primary (``split_brain``): the replica agent, run as
   Pacemaker runs it, refuses to promote node2 while node1 is promoted, and a
   node that finds itself promoted beside node1 records the split brain and
   keeps its image untouched until an operator decides.

7. a cold start with two live disks: node1 dies (node2 takes over at a newer
   live-disk generation), then node2 dies too before node1 returned; both
   nodes start again, both groups have role ``primary``: only node2 (the newer
   generation) gets a promotion score, the VM boots there with every record it
   wrote, and node1 rejoins as its replica (checksum resync).

Every failback resync is read from the protect supervisor's record
(``$HA_RSCTMP/nbd-mc-protect-protect.resync.json`` on the primary's node): its
mode and the bytes it copied go into the figures (``failback``).

Times are measured from the kill to the VM's QEMU running again (crm_mon shows
it started) and to the guest's own verdict.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from demo import guest
from nbd_mc.statedir import StateDir

from .cluster import ADDRS, DATA, Cluster, ClusterError, wait_for

REPO = Path(__file__).resolve().parents[2]
CRM_TEMPLATE = REPO / "ha" / "cluster.crm"
DISK_SIZE = 64 * 1024 * 1024
RSCTMP = "/run/resource-agents"  # pacemaker-execd's HA_RSCTMP inside a node
RESYNC_RECORD = f"{RSCTMP}/nbd-mc-protect-protect.resync.json"
REPLICA_AGENT = "/usr/lib/ocf/resource.d/nbd-mc/replica"
NBD_PORT = 10809
CONTROL_PORT = 10810


def vm_args(files: guest.GuestFiles, image: str, console: str, append: tuple = ()) -> str:
    """The qemu agent's ``args`` for the test guest (``service`` mode) on ``image``, its
    console appended to ``console`` (in a node's data dir: kept across boots)."""
    args = guest.qemu_args(files, "service", guest.disk_drive_args(image), serial="stdio",
                           append=append)[1:]
    i = args.index("-serial")
    args[i:i + 2] = ["-chardev", f"file,id=con,path={console},append=on",
                     "-serial", "chardev:con"]
    return shlex.join(args)


def render_config(tls_dir: Path, files: guest.GuestFiles, netns_map: str | None = None) -> str:
    """ha/cluster.crm with this machine's paths: the guest's QEMU arguments, the TLS dir;
    with netns_map, STONITH by the test fence agent (tests/support/fence_nbdmc_netns)."""
    text = CRM_TEMPLATE.read_text()
    if netns_map:
        text = text.replace("property stonith-enabled=false", f"""\
property stonith-enabled=true
primitive fence-nodes stonith:fence_nbdmc_netns \\
    params netns_map="{netns_map}" pcmk_host_list="node1 node2" pcmk_reboot_action=off \\
    op monitor interval=60s""")
    replace = {
        "/etc/nbd-mc/tls": str(tls_dir),
        "@QEMU_ARGS@": vm_args(files, f"{DATA}/vda.raw", f"{DATA}/console.log"),
        "node1=10.0.0.1 node2=10.0.0.2": f"node1={ADDRS['node1']} node2={ADDRS['node2']}",
    }
    for k, v in replace.items():
        text = text.replace(k, v)
    # Faster than the production values: the test wants to see failures in seconds.
    text = text.replace("interval=10s role=Promoted", "interval=2s role=Promoted")
    text = text.replace("interval=11s role=Unpromoted", "interval=3s role=Unpromoted")
    text = text.replace("op monitor interval=10s timeout=20s", "op monitor interval=1s timeout=20s")
    return text


@dataclass
class Story:
    """The story's steps (see the module docstring), each waiting by polling.

    State, all used from one thread: ``cluster`` and ``files`` are set by
    ``setup``; ``figures`` (measured times, resync bytes) grows as steps finish;
    ``logs`` holds, per node, the console log offset where the current VM's boot
    begins (set by ``mark_console`` just before a kill).
    """

    root: Path
    say: callable = print
    cluster: Cluster | None = None
    files: guest.GuestFiles | None = None
    figures: dict = field(default_factory=dict)
    logs: dict = field(default_factory=dict)  # node -> console offset at VM start

    # --- set up ------------------------------------------------------------------------
    def setup(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.files = guest.build()
        tls = self.root / "tls"
        subprocess.run([str(REPO / "tools" / "make-certs.sh"), str(tls),
                        ADDRS["node1"], ADDRS["node2"]], check=True, capture_output=True)
        self.tls = tls
        env = {"NBD_MC_OCF_LOG": str(self.root / "agents.log")}
        self.cluster = Cluster(self.root / "nodes", env=env)
        c = self.cluster
        for node in c.nodes.values():
            node.data.mkdir(parents=True, exist_ok=True)
        guest.format_disk(c.nodes["node1"].data / "vda.raw", DISK_SIZE)
        with open(c.nodes["node2"].data / "vda.raw", "wb") as f:
            f.truncate(DISK_SIZE)
        self.say("1. two Pacemaker nodes (network + mount namespaces, corosync knet over "
                 f"a bridge: {ADDRS['node1']}, {ADDRS['node2']})")
        t0 = time.monotonic()
        c.start()
        self.say(f"   both nodes online after {time.monotonic() - t0:.1f} s")
        self.bootstrap("node1")

    def bootstrap(self, name: str) -> None:
        """The documented one-time step: this node's image is the first primary."""
        n = self.cluster.nodes[name]
        st = f"{DATA}/state"
        n.sh(f"nbd-mc serve vda={DATA}/vda.raw --state-dir {st} >/dev/null && "
             f"nbd-mc commit 1 --state-dir {st} >/dev/null && "
             f"nbd-mc failover --state-dir {st} >/dev/null && nbd-mc stop --state-dir {st} >/dev/null")
        self.say(f"   {name}: its image is made the first primary (serve, commit 1, failover, stop)")

    def configure(self) -> None:
        self.say("2. crm configure load update (ha/cluster.crm): replica clone, VM, protect; "
                 "STONITH by a test fence agent that kills a node's namespace")
        netns_map = self.cluster.install_fence_agent()
        self.cluster.configure(render_config(self.tls, self.files, netns_map))

    # --- looking -----------------------------------------------------------------------
    def replica(self, name: str) -> dict | None:
        """query-status of a node's replica server, None if it does not answer."""
        n = self.cluster.nodes[name]
        if not n.alive():
            return None
        p = n.sh(["nbd-mc", "status", "--control", f"tcp://{ADDRS[name]}:{CONTROL_PORT}",
                  "--tls-certificates", str(self.tls), "--json"], check=False, timeout=20)
        if p.returncode != 0:
            return None
        return json.loads(p.stdout)

    def console(self, name: str) -> guest.SerialLog:
        """The node's VM console from where the current VM's boot began."""
        log = guest.SerialLog(self.cluster.nodes[name].data / "console.log")
        log._offset = self.logs.get(name, 0)
        return log

    def mark_console(self, name: str) -> None:
        p = self.cluster.nodes[name].data / "console.log"
        self.logs[name] = p.stat().st_size if p.exists() else 0

    def qemu_pid(self, name: str) -> int:
        for pid in self.cluster.nodes[name].pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(b"qemu-system"):
                        return pid
            except OSError:
                pass
            try:
                if os.readlink(f"/proc/{pid}/exe").endswith("qemu-system-x86_64"):
                    return pid
            except OSError:
                pass
        raise ClusterError(f"no QEMU on {name}")

    def wait_vm(self, name: str, timeout: float = 60) -> None:
        self.cluster.wait(lambda st: st.where("vm") == [name] and st.where("protect") == [name]
                          and st.where("replica-clone", "Promoted") == [name],
                          f"vm, protect and the promoted replica on {name}", timeout, via=name)

    def wait_protected(self, primary: str, secondary: str, timeout: float = 90) -> int:
        """Until the secondary commits epochs again after a full sync; returns the epoch."""
        seen = {}

        def committed():
            st = self.replica(secondary)
            if not st or not st.get("protected") or st.get("role") != "secondary":
                return None
            seen.setdefault("first", st["committed"])
            return st["committed"] if st["committed"] >= seen["first"] + 2 else None
        e = wait_for(committed, f"{primary} protecting into {secondary}", timeout,
                     self.cluster.describe)
        st = wait_for(lambda: self.replica(secondary), f"status of {secondary}", 30)
        self.figures.setdefault("resync_bytes", {})[secondary] = st["stats"]["bytes_written"]
        return e

    def resync_record(self, primary: str, secondary: str, since: float) -> dict:
        """The protect supervisor's record of its last resync into ``secondary``, made
        after ``since`` (wall clock): mode, bytes copied, seconds."""
        def read():
            p = self.cluster.nodes[primary].sh(["cat", RESYNC_RECORD], check=False)
            if p.returncode != 0:
                return None
            r = json.loads(p.stdout)
            return r if r.get("peer") == secondary and r.get("time", 0) >= since else None
        return wait_for(read, f"{primary}'s record of its resync into {secondary}", 30,
                        self.cluster.describe)

    def rolled_back(self, name: str) -> int:
        """Bytes the last promotion of ``name`` rolled back (its STATE_DIR.rolled-back)."""
        p = Path(StateDir(self.cluster.nodes[name].data / "state").rolled_back) / "summary.json"
        if not p.exists():
            return 0
        s = json.loads(p.read_text())
        return sum(d["preserved_clusters"] * d["cluster_size"] for d in s["disks"])

    def record_failback(self, returning: str, primary: str, since: float,
                        key: str = "failback") -> dict:
        r = self.resync_record(primary, returning, since)
        f = {"mode": r["mode"], "bytes": r["bytes"], "seconds": r.get("seconds"),
             "disk_bytes": DISK_SIZE, "rolled_back_bytes": self.rolled_back(primary)}
        self.figures.setdefault(key, {})[returning] = f
        return f

    def guest_progress(self, name: str, secondary: str, records: int = 5,
                       timeout: float = 90) -> int:
        """Wait for `records` new durable records, then for two commits after that;
        returns a seq every later commit contains."""
        log = self.console(name)
        log.wait_for(r"MC-WORK-START", timeout)
        start = log.last_seq
        log.wait_seq(start + records, timeout)
        seq = log.last_seq
        base = wait_for(lambda: (self.replica(secondary) or {}).get("committed"),
                        f"the committed epoch of {secondary}", 30)
        wait_for(lambda: (self.replica(secondary) or {}).get("committed", 0) >= base + 2,
                 f"two commits on {secondary} after MC-SEQ {seq}", 30)
        return seq

    def check_after_boot(self, name: str, covered: int, timeout: float = 120):
        """The new VM's own verdict (check at boot); returns the parsed result."""
        log = self.console(name)
        log.wait_for(r"MC-CHECK-(OK|FAIL)", timeout)
        result = guest.parse_check(log.text())
        if not result.ok:
            raise ClusterError(f"the guest's check failed on {name}: {result.reason}\n{log.tail()}")
        if result.maxseq < covered:
            raise ClusterError(f"record {covered} was committed but the check found only "
                               f"{result.maxseq}")
        return result

    # --- the failures ------------------------------------------------------------------
    def first_start(self) -> None:
        self.mark_console("node1")
        t0 = time.time()
        self.configure()
        self.wait_vm("node1", 90)
        self.say("   node1 promoted, VM and protect running on node1")
        e = self.wait_protected("node1", "node2")
        r = self.resync_record("node1", "node2", t0)
        self.figures["initial_sync"] = {"mode": r["mode"], "bytes": r["bytes"],
                                        "seconds": r.get("seconds")}
        self.say(f"   node2's replica is protected (committed epoch {e}; initial sync: "
                 f"{r['mode']}, {r['bytes'] / 2**20:.1f} MiB)")

    def kill_qemu(self, primary: str, secondary: str) -> None:
        seq = self.guest_progress(primary, secondary)
        self.mark_console(secondary)
        pid = self.qemu_pid(primary)
        self.say(f"3. kill -9 QEMU on {primary} (pid {pid}); records up to {seq} are committed")
        t0 = time.monotonic()
        os.kill(pid, 9)
        self.after_kill(t0, secondary, seq, "qemu_kill")

    def kill_node(self, primary: str, secondary: str) -> None:
        seq = self.guest_progress(primary, secondary)
        self.mark_console(secondary)
        self.say(f"4. kill the whole of {primary} (corosync, pacemaker, QEMU: every process of "
                 f"its namespace); records up to {seq} are committed")
        t0 = time.monotonic()
        self.cluster.nodes[primary].kill()
        self.after_kill(t0, secondary, seq, "node_kill")
        fenced = [e for e in self.cluster.fence_history(secondary)
                  if e.get("target") == primary and e.get("status") == "success"]
        if not fenced:
            raise ClusterError(f"{primary} was not fenced: {self.cluster.fence_history(secondary)}")
        self.figures["node_kill"]["fenced"] = f"{primary} {fenced[-1].get('action')} by {fenced[-1].get('delegate')}"
        self.say(f"   {primary} was fenced first (STONITH '{fenced[-1].get('action')}' "
                 f"by {fenced[-1].get('delegate')})")

    def after_kill(self, t0: float, new_primary: str, seq: int, key: str) -> None:
        self.cluster.wait(lambda st: new_primary in st.where("vm"), f"vm started on {new_primary}",
                          120, via=new_primary)
        t_vm = time.monotonic() - t0
        result = self.check_after_boot(new_primary, seq)
        t_check = time.monotonic() - t0
        self.figures[key] = {"kill_to_vm_running_s": round(t_vm, 2),
                             "kill_to_guest_check_ok_s": round(t_check, 2),
                             "records_checked": result.maxseq, "committed_seq": seq,
                             "fsck": result.fsck}
        self.say(f"   VM running on {new_primary} {t_vm:.1f} s after the kill; its own check "
                 f"passed {t_check:.1f} s after the kill (fsck {result.fsck}, records "
                 f"1..{result.maxseq}, every committed one there: >= {seq})")
        self.console(new_primary).wait_for(r"MC-WORK-START", 60)

    def failback(self, returning: str, primary: str, since: float) -> None:
        e = self.wait_protected(primary, returning, 120)
        f = self.record_failback(returning, primary, since)
        self.say(f"   {returning} is a secondary again, its image kept; {primary} protects "
                 f"into it (failback resync: {f['mode']}, {f['bytes'] / 2**20:.1f} MiB copied "
                 f"of the {DISK_SIZE >> 20} MiB disk; the promotion had rolled back "
                 f"{f['rolled_back_bytes'] / 2**20:.1f} MiB; committed epoch {e})")
        # The VM failed on the returning node (migration-threshold=1): until that failure
        # expires (failure-timeout, checked at the cluster-recheck-interval) the VM could
        # not move back there.  The operator clears it, as after any failure.
        self.cluster.nodes[primary].sh(["crm_resource", "--cleanup", "--resource", "vm",
                                        "--node", returning])
        self.cluster.wait(lambda st: not any(x.startswith(f"{returning}: vm_")
                                             for x in st.failures()),
                          f"vm's failure on {returning} cleared", 30, via=primary)
        self.say(f"   crm resource cleanup vm: the VM may run on {returning} again")

    def node_returns(self, name: str, primary: str) -> None:
        """A killed node boots again: it starts unpromoted, gives up its diverged image
        and the primary protects into it (full sync)."""
        self.say(f"5. {name} returns (corosync + pacemaker again, empty /run)")
        t0 = time.monotonic()
        since = time.time()
        self.cluster.restart(name)
        e = self.wait_protected(primary, name, 120)
        self.figures["return_to_protected_s"] = round(time.monotonic() - t0, 2)
        f = self.record_failback(name, primary, since)
        self.say(f"   {name} is a secondary again {time.monotonic() - t0:.1f} s later, its "
                 f"image kept; {primary} protects into it (failback resync: {f['mode']}, "
                 f"{f['bytes'] / 2**20:.1f} MiB copied of the {DISK_SIZE >> 20} MiB disk; "
                 f"committed epoch {e})")

    # --- both sides claim primary ----------------------------------------------------
    def agent(self, node: str, action: str, params: dict, rsctmp: str,
              as_pacemaker: bool) -> subprocess.CompletedProcess:
        """Run the replica agent on a node with the environment pacemaker-execd gives it
        (instance ``replica``: the clone's primitive, so it sees the real cluster).
        Without ``as_pacemaker`` it is run as a person on the node runs it: it reads
        the cluster but writes no promotion score into the CIB."""
        env = ["OCF_ROOT=/usr/lib/ocf", "OCF_RESOURCE_INSTANCE=replica", f"HA_RSCTMP={rsctmp}",
               *(f"OCF_RESKEY_{k}={v}" for k, v in params.items())]
        if as_pacemaker:
            env.append(f"OCF_RESKEY_CRM_meta_on_node={node}")
        return self.cluster.nodes[node].sh(["env", *env, REPLICA_AGENT, action], check=False,
                                           timeout=120)

    def expect(self, p: subprocess.CompletedProcess, rc: int, text: str, what: str) -> None:
        if p.returncode != rc or text not in p.stderr:
            raise ClusterError(f"{what}: expected rc {rc} and {text!r}, got rc "
                               f"{p.returncode}:\n{p.stderr}")

    def split_brain(self, primary: str, other: str) -> None:
        """Step 6 (see the module docstring): what the agent does when both claim primary."""
        n = self.cluster.nodes[other]
        self.say(f"6. both sides claim primary: the replica agent on {other}, while "
                 f"{primary} is promoted")
        before = wait_for(lambda: self.replica(other), f"status of {other}", 30)
        run = f"{DATA}/split-brain-run"
        n.sh(f"mkdir -p {run} && echo unpromoted > {run}/nbd-mc-replica-replica.state")
        real = {"disks": f"vda={DATA}/vda.raw", "state_dir": f"{DATA}/state",
                "addresses": f"node1={ADDRS['node1']} node2={ADDRS['node2']}",
                "nbd_port": str(NBD_PORT), "control_port": str(CONTROL_PORT),
                "tls_certificates": str(self.tls)}
        self.expect(self.agent(other, "promote", real, run, as_pacemaker=True), 1,
                    f"refusing to promote: {primary} is promoted", "promote beside a promoted node")
        wait_for(lambda: (lambda st: st and st["role"] == "secondary" and not st["fenced"]
                          and st["committed"] >= before["committed"] + 2)(self.replica(other)),
                 f"{other} still a protected, unfenced secondary", 30, self.cluster.describe)
        self.say(f"   promote of {other}'s replica (as Pacemaker runs it): refused, nothing "
                 f"fenced, {primary} goes on committing into it")

        # A node that finds itself promoted beside the promoted peer (after a partition
        # without fencing): its own group holds live disks that ran on their own.
        img, st = f"{DATA}/sb.raw", f"{DATA}/sb-state"
        n.sh(f"truncate -s 8M {img} && printf only-here | dd of={img} conv=notrunc "
             f"status=none && nbd-mc serve vda={img} --state-dir {st} >/dev/null && "
             f"nbd-mc commit 1 --state-dir {st} >/dev/null && "
             f"nbd-mc failover --state-dir {st} >/dev/null && "
             f"nbd-mc stop --state-dir {st} >/dev/null")
        run = f"{DATA}/split-brain-run2"
        n.sh(f"mkdir -p {run} && echo promoted > {run}/nbd-mc-replica-replica.state")
        params = {"disks": f"vda={img}", "state_dir": st}
        self.expect(self.agent(other, "monitor", params, run, False), 8,
                    f"SPLIT BRAIN: {primary} is promoted while this node holds the live disks",
                    "monitor of a promoted instance beside a promoted peer")
        self.expect(self.agent(other, "demote", params, run, False), 0,
                    f"no promotion score: SPLIT BRAIN with {primary}", "demote in a split brain")
        self.expect(self.agent(other, "monitor", params, run, False), 0, "", "monitor after it")
        self.expect(self.agent(other, "promote", params, run, False), 1,
                    f"refusing to promote: {primary} is promoted", "promote in a split brain")
        info = json.loads(n.sh(["nbd-mc", "inspect", st, "--json"]).stdout)
        if (info["role"] != "primary" or info["server_running"]
                or Path(StateDir(n.data / "sb-state").diverged).exists()):
            raise ClusterError(f"the split-brain side was touched: {info}")
        self.say(f"   a promoted instance on {other} that sees {primary} promoted too: SPLIT "
                 f"BRAIN recorded ({StateDir(st).split_brain}); demoted, it keeps its image untouched, "
                 f"unserved, without a promotion score, and refuses promotion")
        # The operator keeps the promoted side: removing the record lets it rejoin.  The
        # monitor only observes: it reports the failback due (not running, with the
        # reason), and the restart Pacemaker makes of it -- start -- does it.
        n.sh(["rm", StateDir(st).split_brain])
        self.expect(self.agent(other, "monitor", params, run, False), 7,
                    "ocf-exit-reason:failback due", "monitor after the operator's choice")
        self.expect(self.agent(other, "start", params, run, False), 0,
                    "keeping them as the replica images", "start after the operator's choice")
        status = json.loads(n.sh(["nbd-mc", "status", "--state-dir", st, "--json"]).stdout)
        kept = (n.data / "sb.raw").read_bytes()[:9] == b"only-here"
        if status["role"] != "secondary" or status["committed"] != 0 or not kept:
            raise ClusterError(f"after the record's removal: {status}, image kept: {kept}")
        self.expect(self.agent(other, "stop", params, run, False), 0, "", "stop")
        n.sh(f"rm -rf {img} {st} {StateDir(st).diverged} {DATA}/split-brain-run {run}")
        self.say(f"   record removed by the operator: it rejoins as a replica of {primary} "
                 f"(new group at epoch 0, its image kept for the checksum resync)")

    def cold_start(self, older: str, newer: str) -> None:
        """Step 7 (see the module docstring)."""
        self.say(f"7. cold start with two live disks: {older} dies, {newer} takes over, then "
                 f"{newer} dies too")
        seq = self.guest_progress(older, newer)
        self.mark_console(newer)
        t0 = time.monotonic()
        self.cluster.nodes[older].kill()
        self.after_kill(t0, newer, seq, "cold_start_failover")
        log = self.console(newer)
        log.wait_for(r"MC-WORK-START", 60)
        seq = log.wait_seq(log.last_seq + 5, 90)  # only on the newer disk: nobody protects
        self.say(f"   VM on {newer} wrote records up to {seq} with {older} away; now {newer} "
                 f"dies as well")
        self.cluster.nodes[newer].kill()
        self.mark_console(newer)
        since = time.time()
        for name in (older, newer):
            self.cluster.nodes[name].start()
        self.cluster.wait_online({older, newer}, 90)
        self.wait_vm(newer, 120)
        result = self.check_after_boot(newer, seq)
        self.say(f"   both back, both groups role primary: {newer} (newer live-disk "
                 f"generation) promoted, its check passed with records 1..{result.maxseq} "
                 f"(>= {seq})")
        self.wait_protected(newer, older, 120)
        f = self.record_failback(older, newer, since, key="cold_start")
        self.say(f"   {older} rejoined as its replica (resync: {f['mode']}, "
                 f"{f['bytes'] / 2**20:.1f} MiB copied)")

    def run(self) -> dict:
        """The whole story; returns the figures."""
        self.setup()
        self.first_start()
        since = time.time()
        self.kill_qemu("node1", "node2")
        self.failback("node1", "node2", since)
        self.kill_node("node2", "node1")
        self.node_returns("node2", "node1")
        self.split_brain("node1", "node2")
        self.cold_start("node1", "node2")
        return self.figures

    def agents_log(self) -> str:
        p = self.root / "agents.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
