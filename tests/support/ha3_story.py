"""Many VMs in one cluster: three Pacemaker nodes, three protected VMs, one node killed
(tests/system/test_ha3.py and `make demo-ha3`).

The placement is the shipped one (ha/cluster3.crm), a ring: vm1 runs on node1 with
its replica on node2, vm2 on node2 -> node3, vm3 on node3 -> node1.

1. three nodes (support.cluster, majority quorum, STONITH by the test fence agent),
   each VM's image formatted on its first node and made the first primary there,
   the replica's image empty; the configuration loaded; every VM boots on its own
   node (the real test guest in ``service`` mode: it checks its disk at boot, then
   writes records) and is protected into the next node once its initial sync ends;
2. the whole of node2 dies (every process of it) once a commit covers records vm2
   reported durable.  Exactly vm2 fails over: node3 (its replica) is promoted and
   the VM boots there, its own check passes with every committed record.  vm1 and
   vm3 keep running, the same QEMU processes on the same nodes; vm3 (replica on
   node1) stays protected without a new resync; vm1, whose replica was on node2,
   runs on unprotected;
3. node2 returns: it starts vm1's replica again and gives vm2's image up as the live
   disk (failback); protect brings both in step (checksum resyncs) and all three
   VMs are protected again.

The short version (``size=2``, `make test`; the three-node story is `make soak`'s):
two nodes, two VMs, vm1 on node1 -> node2 and vm2 on node2 -> node1; node2 dies,
vm2 fails over onto node1, vm1 runs on unprotected, and node2's return brings both
replicas back.

Figures: per affected VM, the time from the kill to its QEMU running again (crm_mon
shows it started) and to the guest's own verdict; per VM, the time from the node's
restart (corosync starting) to that VM protected again (its replica reports
``protected`` and two commits more; each poll is an `nbd-mc status` run in a node,
so under load a figure may be late by a few seconds), and to the whole cluster
protected.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from demo import guest

from .cluster import ADDRS, DATA, Cluster, ClusterError, wait_for
from .ha_story import RSCTMP, vm_args

REPO = Path(__file__).resolve().parents[2]
CRM_TEMPLATE = REPO / "ha" / "cluster3.crm"
DISK_SIZE = 64 * 1024 * 1024
NODES = ("node1", "node2", "node3")
# vm -> (its first node, its replica's node, NBD port, control port): ha/cluster3.crm's
VMS = {"vm1": ("node1", "node2", 10809, 10810),
       "vm2": ("node2", "node3", 10811, 10812),
       "vm3": ("node3", "node1", 10813, 10814)}
#: The short version (`make test`): two nodes, two VMs, vm1 on node1 -> node2 and vm2
#: on node2 -> node1 (ha/cluster3.crm's first two VMs, vm2's pair closed on node1).
VMS2 = {"vm1": ("node1", "node2", 10809, 10810),
        "vm2": ("node2", "node1", 10811, 10812)}
EXAMPLE_ADDRS = {"node1": "10.0.0.1", "node2": "10.0.0.2", "node3": "10.0.0.3"}
#: Three (four, after the kill) TCG guests on a 2-core machine: each guest pauses after
#: every record instead of taking a whole core, or the agents' own actions (a Python
#: process each) miss their timeouts.
GUEST_APPEND = ("mc.pause=0.2",)


def ring(size: int) -> tuple[tuple, dict]:
    """The nodes and the VMs (name -> first node, replica's node, ports) of a ring."""
    return (NODES, VMS) if size == 3 else (NODES[:2], VMS2)


def ring_config(size: int) -> str:
    """ha/cluster3.crm for a ring of ``size`` nodes: as shipped for three; for two, its
    first two VMs with vm2's pair closed on node1 and no placement constraints (every
    node is in every pair)."""
    text = CRM_TEMPLATE.read_text()
    if size == 3:
        return text
    if size != 2:
        raise ValueError("a ring of 2 or 3 nodes")
    head, vm1, vm2, _vm3 = re.split(r"(?m)^(?=# == vm\d)", text)
    vm2 = vm2.replace("node3=10.0.0.3", "node1=10.0.0.1").replace("node3", "node1")
    return "".join(line for line in (head + vm1 + vm2).splitlines(keepends=True)
                   if not line.startswith("location "))


def render_config(tls_dir: Path, files: guest.GuestFiles, netns_map: str,
                  size: int = 3) -> str:
    """ha/cluster3.crm with this machine's paths and addresses and STONITH by the test
    fence agent.  The monitor intervals stay the production ones: a node's death is
    seen by corosync, not by a monitor, and nine monitors a second (one Python
    process each) would load the machine more than the three VMs do."""
    nodes, vms = ring(size)
    text = ring_config(size)
    # (load-threshold: three nodes on one machine each see the whole machine's load;
    # without it Pacemaker throttles every node to one action at a time whenever the
    # host is busy, as its default, 80 % of a node's CPUs, is exceeded)
    text = text.replace("property stonith-enabled=false", f"""\
property stonith-enabled=true load-threshold=1000%
primitive fence-nodes stonith:fence_nbdmc_netns \\
    params netns_map="{netns_map}" pcmk_host_list="{' '.join(nodes)}" pcmk_reboot_action=off \\
    op monitor interval=60s""")
    text = text.replace("/etc/nbd-mc/tls", str(tls_dir))
    for vm in vms:
        text = text.replace(f"@QEMU_ARGS_{vm}@", vm_args(
            files, f"{DATA}/{vm}/vda.raw", f"{DATA}/{vm}/console.log", GUEST_APPEND))
    for node, example in EXAMPLE_ADDRS.items():
        text = text.replace(f"{node}={example}", f"{node}={ADDRS[node]}")
    config = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    if any("10.0.0." in line or "@QEMU_ARGS" in line for line in config):
        raise ClusterError("ha/cluster3.crm has a placeholder this story does not fill in")
    return text


@dataclass
class RingStory:
    """The story's steps (see the module docstring), each waiting by polling.

    State, all used from one thread: ``cluster``, ``files`` and ``tls`` are set by
    ``setup``; ``figures`` grows as steps finish; ``logs`` holds, per (node, vm), the
    console log offset where the current boot of that VM on that node begins.
    """

    root: Path
    say: callable = print
    cluster: Cluster | None = None
    files: guest.GuestFiles | None = None
    tls: Path | None = None
    figures: dict = field(default_factory=dict)
    logs: dict = field(default_factory=dict)  # (node, vm) -> console offset
    size: int = 3  # nodes and VMs: 3 (the soak), 2 (`make test`)

    def __post_init__(self):
        self.nodes, self.vms = ring(self.size)

    # --- set up ------------------------------------------------------------------------
    def setup(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.files = guest.build()
        self.tls = self.root / "tls"
        subprocess.run([str(REPO / "tools" / "make-certs.sh"), str(self.tls),
                        *(ADDRS[n] for n in self.nodes)], check=True, capture_output=True)
        env = {"NBD_MC_OCF_LOG": str(self.root / "agents.log")}
        self.cluster = c = Cluster(self.root / "nodes", env=env, size=len(self.nodes))
        for vm, (first, replica, _, _) in self.vms.items():
            for node in (first, replica):
                (c.nodes[node].data / vm).mkdir(parents=True, exist_ok=True)
            guest.format_disk(c.nodes[first].data / vm / "vda.raw", DISK_SIZE)
            with open(c.nodes[replica].data / vm / "vda.raw", "wb") as f:
                f.truncate(DISK_SIZE)
        self.say(f"1. {len(self.nodes)} Pacemaker nodes (network + mount namespaces, corosync knet over a "
                 f"bridge: {', '.join(ADDRS[n] for n in self.nodes)})")
        t0 = time.monotonic()
        c.start()
        self.say(f"   all online after {time.monotonic() - t0:.1f} s")
        for vm, (first, *_rest) in self.vms.items():
            st = f"{DATA}/{vm}/state"
            c.nodes[first].sh(
                f"nbd-mc serve vda={DATA}/{vm}/vda.raw --state-dir {st} >/dev/null && "
                f"nbd-mc commit 1 --state-dir {st} >/dev/null && "
                f"nbd-mc failover --state-dir {st} >/dev/null && "
                f"nbd-mc stop --state-dir {st} >/dev/null")
        self.say("   each VM's image made the first primary on its first node: "
                 + ", ".join(f"{vm} on {first}" for vm, (first, *_r) in self.vms.items()))

    # --- looking -----------------------------------------------------------------------
    def replica(self, vm: str, node: str) -> dict | None:
        """query-status of vm's replica server on node, None if it does not answer."""
        n = self.cluster.nodes[node]
        if not n.alive():
            return None
        control = self.vms[vm][3]
        p = n.sh(["nbd-mc", "status", "--control", f"tcp://{ADDRS[node]}:{control}",
                  "--tls-certificates", str(self.tls), "--json"], check=False, timeout=20)
        return json.loads(p.stdout) if p.returncode == 0 else None

    def console(self, node: str, vm: str) -> guest.SerialLog:
        log = guest.SerialLog(self.cluster.nodes[node].data / vm / "console.log")
        log._offset = self.logs.get((node, vm), 0)
        return log

    def mark_console(self, node: str, vm: str) -> None:
        p = self.cluster.nodes[node].data / vm / "console.log"
        self.logs[(node, vm)] = p.stat().st_size if p.exists() else 0

    def qemu_pid(self, node: str, vm: str) -> int | None:
        """The pid of vm's QEMU on node (its command line names the VM's QMP socket)."""
        want = f"/run/nbd-mc/{vm}.qmp".encode()
        for pid in self.cluster.nodes[node].pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"qemu-system" in cmd.split(b"\0")[0] and want in cmd:
                return pid
        return None

    def placement(self, st) -> dict:
        """vm -> (node its QEMU runs on, node of protect, node of the promoted replica)."""
        return {vm: (st.where(vm), st.where(f"protect{vm[2:]}"),
                     st.where(f"replica{vm[2:]}-clone", "Promoted")) for vm in self.vms}

    def resync_record(self, node: str, vm: str) -> dict | None:
        p = self.cluster.nodes[node].sh(
            ["cat", f"{RSCTMP}/nbd-mc-protect-protect{vm[2:]}.resync.json"], check=False)
        return json.loads(p.stdout) if p.returncode == 0 else None

    def wait_protected(self, pairs: dict, t0: float, timeout: float = 150) -> dict:
        """Until every vm of ``pairs`` (vm -> (primary, secondary)) is protected: its
        replica reports ``protected`` as a secondary and has committed two epochs more
        than when first seen answering.  Returns vm -> seconds since t0."""
        first: dict = {}
        done: dict = {}

        def all_protected():
            for vm, (_, secondary) in pairs.items():
                if vm in done:
                    continue
                st = self.replica(vm, secondary)
                if not st or not st.get("protected") or st.get("role") != "secondary":
                    continue
                first.setdefault(vm, st["committed"])
                if st["committed"] >= first[vm] + 2:
                    done[vm] = round(time.monotonic() - t0, 2)
            return len(done) == len(pairs)
        wait_for(all_protected, f"protection of {sorted(set(pairs) - set(done))}", timeout,
                 self.cluster.describe)
        return done

    # --- the steps ---------------------------------------------------------------------
    def first_start(self) -> None:
        for vm, (first, *_r) in self.vms.items():
            self.mark_console(first, vm)
        self.say(f"2. crm configure load update (ha/cluster3.crm): {len(self.vms)} replica clones, "
                 "VMs and protects, placed as a ring; STONITH by a test fence agent")
        netns_map = self.cluster.install_fence_agent()
        t0 = time.monotonic()
        self.cluster.configure(render_config(self.tls, self.files, netns_map, self.size))
        want = {vm: ([first], [first], [first]) for vm, (first, *_r) in self.vms.items()}
        self.cluster.wait(lambda st: self.placement(st) == want,
                          "every VM, its protect and promoted replica on its first node", 120)
        self.say(f"   every VM running on its first node {time.monotonic() - t0:.1f} s later")
        times = self.wait_protected({vm: (f, r) for vm, (f, r, _, _) in self.vms.items()}, t0)
        self.figures["initial_protected_s"] = times
        self.figures["initial_sync"] = {}
        for vm, (first, replica, _, _) in self.vms.items():
            r = wait_for(lambda: self.resync_record(first, vm), f"{vm}'s resync record", 30)
            self.figures["initial_sync"][vm] = {"mode": r["mode"], "bytes": r["bytes"]}
        self.say("   all protected: " + ", ".join(
            f"{vm} into {self.vms[vm][1]} after {s:.1f} s" for vm, s in sorted(times.items())))

    def kill_node(self, victim: str) -> None:
        affected = [vm for vm, (first, *_r) in self.vms.items() if first == victim]
        others = [vm for vm in self.vms if vm not in affected]
        # the records a commit covers, for each VM that fails over
        covered = {}
        for vm in affected:
            log = self.console(victim, vm)
            log.wait_for(r"MC-WORK-START", 120)
            seq = log.wait_seq(log.last_seq + 5, 120)
            replica = self.vms[vm][1]
            base = wait_for(lambda: (self.replica(vm, replica) or {}).get("committed"),
                            f"the committed epoch of {vm} on {replica}", 30)
            wait_for(lambda: (self.replica(vm, replica) or {}).get("committed", 0) >= base + 2,
                     f"two commits of {vm} after MC-SEQ {seq}", 30)
            covered[vm] = seq
            self.mark_console(replica, vm)
        before = {vm: (self.vms[vm][0], self.qemu_pid(self.vms[vm][0], vm)) for vm in others}
        kept = {vm: self.vms[vm] for vm in others if self.vms[vm][1] != victim}  # stay protected
        kept_state = {vm: (self.resync_record(f, vm), self.replica(vm, r)["committed"])
                      for vm, (f, r, _, _) in kept.items()}
        seqs = {vm: self.console(self.vms[vm][0], vm) for vm in others}
        for log in seqs.values():
            log.poll()
        self.say(f"3. kill the whole of {victim} (corosync, pacemaker, QEMU: every process of "
                 f"its namespace); it ran {', '.join(affected)} (committed records up to "
                 f"{', '.join(f'{vm}: {s}' for vm, s in covered.items())})")
        t0 = time.monotonic()
        self.cluster.nodes[victim].kill()
        via = next(n for n in self.nodes if n != victim)
        pending = set(affected)
        times: dict = {}

        def moved(st):
            for vm in list(pending):
                if st.where(vm) == [self.vms[vm][1]]:
                    times[vm] = {"kill_to_vm_running_s": round(time.monotonic() - t0, 2)}
                    pending.discard(vm)
            return not pending
        self.cluster.wait(moved, f"{sorted(pending)} started on their replicas' nodes", 120,
                          via=via)
        for vm in affected:
            replica = self.vms[vm][1]
            log = self.console(replica, vm)
            log.wait_for(r"MC-CHECK-(OK|FAIL)", 120)
            result = guest.parse_check(log.text())
            if not result.ok:
                raise ClusterError(f"the guest's check of {vm} failed on {replica}: "
                                   f"{result.reason}\n{log.tail()}")
            if result.maxseq < covered[vm]:
                raise ClusterError(f"{vm}: record {covered[vm]} was committed but the check "
                                   f"found only {result.maxseq}")
            times[vm].update(kill_to_guest_check_ok_s=round(time.monotonic() - t0, 2),
                             records_checked=result.maxseq, committed_seq=covered[vm],
                             fsck=result.fsck)
            self.say(f"   {vm} running on {replica} {times[vm]['kill_to_vm_running_s']:.1f} s "
                     f"after the kill; its own check passed "
                     f"{times[vm]['kill_to_guest_check_ok_s']:.1f} s after it (fsck "
                     f"{result.fsck}, records 1..{result.maxseq} >= {covered[vm]})")
        self.figures["node_kill"] = {"victim": victim, "vms": times}
        fenced = [e for e in self.cluster.fence_history(via)
                  if e.get("target") == victim and e.get("status") == "success"]
        if not fenced:
            raise ClusterError(f"{victim} was not fenced: {self.cluster.fence_history(via)}")
        self.say(f"   {victim} was fenced first (by {fenced[-1].get('delegate')})")

        # Exactly the VMs of the victim moved: the others are the same processes.
        st = self.cluster.status(via)
        for vm, (node, pid) in before.items():
            now = self.qemu_pid(node, vm)
            if st.where(vm) != [node] or now != pid or pid is None:
                raise ClusterError(f"{vm} did not keep running on {node} (QEMU pid {pid} "
                                   f"before, {now} now):\n{st.text()}")
            log = seqs[vm]
            mark = log.last_seq
            log.wait_seq(mark + 3, 90)  # and its guest goes on writing
        # The VMs whose replica lived elsewhere stayed protected, without a new resync.
        for vm, (first, replica, _, _) in kept.items():
            record, committed = kept_state[vm]
            wait_for(lambda: (lambda s: s and s["protected"] and s["committed"] >= committed + 2)(
                self.replica(vm, replica)), f"{vm} still committing into {replica}", 30,
                self.cluster.describe)
            if self.resync_record(first, vm) != record:
                raise ClusterError(f"{vm} was resynced although its replica stayed up: "
                                   f"{self.resync_record(first, vm)} (was {record})")
        unprotected = [vm for vm in others if vm not in kept]
        self.figures["node_kill"].update(kept_running=sorted(others),
                                         kept_protected=sorted(kept),
                                         unprotected_until_return=sorted(unprotected + affected))
        self.say(f"   {', '.join(others)} kept running (same QEMU processes, guests writing on); "
                 f"{', '.join(kept) or 'none'} stayed protected without a resync; "
                 f"{', '.join(unprotected + affected)} unprotected until {victim} returns")

    def node_returns(self, name: str) -> None:
        self.say(f"4. {name} returns (corosync + pacemaker again, empty /run)")
        since = time.time()
        t0 = time.monotonic()
        self.cluster.restart(name)
        t_online = round(time.monotonic() - t0, 2)
        st = self.cluster.status()
        pairs = {}
        for vm, (first, replica, _, _) in self.vms.items():
            primary = st.where(vm)
            if len(primary) != 1:
                raise ClusterError(f"{vm} runs on {primary}:\n{st.text()}")
            secondary = replica if primary[0] == first else first
            pairs[vm] = (primary[0], secondary)
        # (the VMs whose replica stayed up were shown protected through the kill)
        times = self.wait_protected({vm: p for vm, p in pairs.items() if p[1] == name}, t0)
        total = round(time.monotonic() - t0, 2)
        for vm, (primary, secondary) in pairs.items():
            st = self.replica(vm, secondary)
            if not st or not st.get("protected") or st.get("role") != "secondary":
                raise ClusterError(f"{vm}'s replica on {secondary} is not protected: {st}")
        resyncs = {}
        for vm, (primary, secondary) in pairs.items():
            if secondary != name:
                continue
            r = wait_for(lambda: (lambda r: r if r and r.get("time", 0) >= since else None)(
                self.resync_record(primary, vm)), f"{primary}'s resync of {vm} into {name}", 30)
            resyncs[vm] = {"mode": r["mode"], "bytes": r["bytes"], "seconds": r.get("seconds"),
                           "disk_bytes": DISK_SIZE}
        self.figures["node_return"] = {"restart_to_online_s": t_online,
                                       "restart_to_protected_s": times,
                                       "restart_to_all_protected_s": total,
                                       "pairs": pairs, "resyncs": resyncs}
        self.say(f"   {name} online {t_online:.1f} s after its restart; protected again: "
                 + ", ".join(f"{vm} ({p} -> {s}) after {times[vm]:.1f} s"
                             for vm, (p, s) in sorted(pairs.items()) if vm in times)
                 + "; the others stayed protected")
        for vm, r in sorted(resyncs.items()):
            self.say(f"   resync of {vm} into {name}: {r['mode']}, {r['bytes'] / 2**20:.1f} MiB "
                     f"of the {DISK_SIZE >> 20} MiB disk")
        self.say(f"   the whole cluster protected {total:.1f} s after the restart")

    def run(self, victim: str = "node2") -> dict:
        self.setup()
        self.first_start()
        self.kill_node(victim)
        self.node_returns(victim)
        return self.figures

    def agents_log(self) -> str:
        p = self.root / "agents.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
