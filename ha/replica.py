"""ocf:nbd-mc:replica -- one node's copy of a VM's disks, as a promotable clone.

Modelled on DRBD's ocf:linbit:drbd: the clone runs on both nodes of a pair; the
VM runs where it is promoted.

* **Unpromoted, secondary**: the images are a replica served by `nbd-mc serve`
  (NBD + control channel); the primary's `nbd-mc protect` mirrors into them and
  commits an epoch at every checkpoint.
* **Unpromoted, holding the live disk**: the group's role is ``primary`` (this
  node's image was the live disk when the node stopped).  Nothing is served;
  the image is newer than any replica, so it gets the highest promotion score --
  unless another node is promoted already: then our image has diverged from the
  live one (writes after the last checkpoint, writes in flight at the crash) and
  start or the next monitor makes this node a replica again (failback): the
  group state moves to ``STATE_DIR.diverged``, a new group (epoch 0) is served
  on the SAME image, and the new primary's protect brings it in step by
  comparing contents (checksum resync: only the blocks that differ are copied).
  Until the first commit after that resync the replica has no promotion score
  and refuses promotion: an image half way through a resync is garbage.
* **Promoted**: this node's images are the live disks the VM runs on.  Promote =
  ``nbd-mc failover`` (fence the old primary's connections, return every disk to
  the last commit, promote) then ``nbd-mc stop``: nothing serves the exports any
  more, nobody but the local VM writes them.

Both sides claiming primary (split brain) is never resolved silently.  Promote
refuses while another node is promoted.  A promoted instance whose monitor or
demote finds another node promoted too records it in ``STATE_DIR.split-brain``
and logs an error; Pacemaker (promoted-max=1) demotes one of the two, and the
demoted node keeps its image untouched -- not served, no promotion score -- until
an operator decides (see docs/pacemaker.md, Fencing and split brain): its writes since the
split exist nowhere else.  The node that stays promoted clears its record.

Never promote garbage: a replica with no committed epoch (the initial sync or
the failback resync never finished), a fenced or broken group gets no
promotion score, and the reason is logged (DRBD does the same for Inconsistent
data).  A stale group (no commit for a while: its primary stopped checkpointing,
or died) holds a valid checkpoint and gets a low score, below a fresh replica.

Runtime state: ``$HA_RSCTMP/nbd-mc-replica-<instance>.state`` holds ``unpromoted``
or ``promoted`` while the instance is started (absent: stopped).  The group's
own state (committed epoch, role, fenced) lives in the state directory and is
read only through ``nbd-mc status/inspect --json``; beside it the agent keeps
``STATE_DIR.rolled-back/`` (what the last promotion rolled back),
``STATE_DIR.diverged/`` (the group state of the last live disk given up),
``STATE_DIR.generation`` (the live-disk generation, see ``newer_elsewhere``)
and ``STATE_DIR.split-brain`` (see above).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ocf  # noqa: E402
from ocf import Param  # noqa: E402
from nbd_mc.statedir import StateDir  # noqa: E402

PRIMARY_SCORE = 1000  # holds the live disk: newer than any replica
REPLICA_SCORE = 100  # a protected replica: the last checkpoint
#: A replica whose primary stopped committing a while ago (status ``stale``): still
#: the last checkpoint of the VM, and after its primary died the only copy left, so
#: promotable -- below a fresh replica, which Pacemaker prefers where both exist.
STALE_SCORE = 10

PARAMS = [
    Param("disks", "Disks of the group: NAME=PATH ...",
          "The consistency group's disks, space-separated NAME=PATH (or PATH) words, "
          "exactly as given to `nbd-mc serve`.  The same paths on every node.",
          required=True),
    Param("state_dir", "nbd-mc state directory",
          "Where the group's state and undo overlays live (`nbd-mc serve --state-dir`).",
          required=True, unique=True),
    Param("nbd_port", "NBD TCP port",
          "Serve NBD on this TCP port (for a peer on another host).  Empty: a unix "
          "socket STATE_DIR/nbd.sock (single host, tests).", default=""),
    Param("addresses", "NODE=ADDRESS ...",
          "The pair's nodes and the address each one's replica serves on, e.g. "
          "\"node1=10.0.0.1 node2=10.0.0.2\" (the same value as ocf:nbd-mc:protect's): this "
          "node's replica binds NBD and the control channel (tcp://ADDRESS:control_port, "
          "TLS) to its own address.  Empty: unix sockets in STATE_DIR (single host, tests).",
          default=""),
    Param("control_port", "control channel TCP port",
          "With addresses: the control channel's port.", default="10810"),
    Param("tls_certificates", "x509 directory",
          "Certificates for TLS (tools/make-certs.sh): with nbd_port the NBD exports "
          "require TLS, and a tcp:// control channel always uses it.", default=""),
    Param("durability", "process or power",
          "`nbd-mc serve --durability` (empty: keep the group's mode).", default=""),
]

ACTIONS = [("start", "60s", ""), ("stop", "60s", ""), ("promote", "90s", ""),
           ("demote", "60s", ""),
           ("monitor", "20s", 'interval="10s" depth="0" role="Promoted"'),
           ("monitor", "20s", 'interval="11s" depth="0" role="Unpromoted"'),
           ("notify", "20s", ""), ("validate-all", "20s", ""), ("meta-data", "5s", "")]

META = ocf.meta_data("replica", __doc__, "nbd-mc replica of a VM's disks (promotable clone)",
                     PARAMS, ACTIONS)


# --- configuration -------------------------------------------------------------------
class Config:
    def __init__(self):
        p = ocf.params(PARAMS)
        self.disks = shlex.split(p["disks"])
        self.state_dir = os.path.abspath(p["state_dir"]) if p["state_dir"] else ""
        self.nbd_port = p["nbd_port"]
        self.addresses = dict(w.split("=", 1) for w in shlex.split(p["addresses"]) if "=" in w)
        self.control_port = p["control_port"]
        self.nbd_bind = ""
        if self.addresses:
            self.nbd_bind = self.addresses.get(local_node(), "")
            self.control = f"tcp://{self.nbd_bind}:{self.control_port}"
        else:
            self.control = StateDir(self.state_dir).control if self.state_dir else ""
        self.tls = p["tls_certificates"]
        self.durability = p["durability"]
        self.marker = ocf.Marker("replica")

    def validate(self) -> None:
        """Raises AgentError with the OCF code for what is wrong."""
        if not self.disks:
            raise ocf.AgentError(ocf.ERR_CONFIGURED, "parameter disks is empty")
        if not self.state_dir:
            raise ocf.AgentError(ocf.ERR_CONFIGURED, "parameter state_dir is empty")
        for d in self.disks:
            path = d.split("=", 1)[1] if "=" in d else d
            if not path or (d.startswith("=")):
                raise ocf.AgentError(ocf.ERR_CONFIGURED, f"bad disk {d!r}: use NAME=PATH")
            if not os.path.isfile(path):
                raise ocf.AgentError(ocf.ERR_INSTALLED, f"disk image {path} does not exist here")
        if self.addresses and not self.nbd_bind:
            raise ocf.AgentError(ocf.ERR_CONFIGURED, f"this node ({local_node()}) has no "
                                                     f"address in addresses")
        if self.addresses and not (self.nbd_port.isdigit() and self.control_port.isdigit()):
            raise ocf.AgentError(ocf.ERR_CONFIGURED, "addresses needs nbd_port and control_port")
        if self.nbd_port and not self.nbd_port.isdigit():
            raise ocf.AgentError(ocf.ERR_CONFIGURED, f"nbd_port {self.nbd_port!r} is not a port")
        if self.control.startswith("tcp://") and not self.tls:
            raise ocf.AgentError(ocf.ERR_CONFIGURED, "a tcp:// control address needs "
                                                     "tls_certificates")
        if self.tls and not os.path.isfile(os.path.join(self.tls, "ca-cert.pem")):
            raise ocf.AgentError(ocf.ERR_INSTALLED, f"no ca-cert.pem in {self.tls}")
        if self.durability not in ("", "process", "power"):
            raise ocf.AgentError(ocf.ERR_CONFIGURED, "durability must be process or power")
        if not os.access(ocf.nbd_mc_binary(), os.X_OK):
            raise ocf.AgentError(ocf.ERR_INSTALLED, f"{ocf.nbd_mc_binary()} not found")

    # --- talking to nbd-mc -------------------------------------------------------
    def client_args(self) -> list[str]:
        """Where this node's own server answers."""
        args = ["--control", self.control]
        if self.tls:
            args += ["--tls-certificates", self.tls]
        return args

    def status(self) -> dict | None:
        """The running server's query-status, or None when it does not answer."""
        rc, data, _ = ocf.nbd_mc("status", *self.client_args(), timeout=ocf.budget(0.3))
        return data if rc == 0 and isinstance(data, dict) else None

    def offline(self) -> dict | None:
        """The state directory as `nbd-mc inspect` sees it; None if no group exists."""
        if not os.path.isfile(StateDir(self.state_dir).state_file):
            return None
        rc, data, err = ocf.nbd_mc("inspect", self.state_dir, timeout=ocf.budget(0.3))
        if not isinstance(data, dict) or "role" not in data:
            raise ocf.AgentError(ocf.ERR_GENERIC, f"cannot read {self.state_dir}: {err}")
        return data

    def serve(self) -> None:
        args = ["serve", *self.disks, "--state-dir", self.state_dir]
        if self.nbd_port:
            args += ["--port", self.nbd_port]
            if self.nbd_bind:
                args += ["--bind", self.nbd_bind]
            if self.tls:
                args += ["--tls", "require", "--tls-certificates", self.tls]
        elif self.tls:
            args += ["--tls-certificates", self.tls]
        if self.control:
            args += ["--control", self.control]
        if self.durability:
            args += ["--durability", self.durability]
        rc, data, err = ocf.nbd_mc(*args)
        if rc != 0:
            raise ocf.AgentError(ocf.ERR_GENERIC, f"nbd-mc serve failed: {err}")
        ocf.log("info", f"serving {', '.join(self.disks)} as a replica: committed epoch "
                        f"{data.get('committed') if data else '?'}")

    def stop_server(self) -> None:
        """Stop the local server: cleanly if it answers, else `nbd-mc stop --force`
        ends the nbdkit of the state directory (the next serve recovers it)."""
        wait = ocf.budget(margin=2)
        rc, data, err = ocf.nbd_mc("stop", "--force", "--timeout", f"{wait:.1f}s",
                                   "--state-dir", self.state_dir, *self.client_args(),
                                   timeout=wait + 1)
        if rc != 0:
            raise ocf.AgentError(ocf.ERR_GENERIC, f"nbd-mc stop failed: {err}")
        if data and data.get("forced"):
            ocf.log("warning", f"the server did not answer ({data.get('why')}): "
                               f"{data.get('how')}")

    def server_running(self) -> bool:
        """Whether a server holds the state directory (`nbd-mc inspect`)."""
        st = self.offline()
        return bool(st and st.get("server_running"))

    @property
    def diverged_dir(self) -> str:
        return StateDir(self.state_dir).diverged

    @property
    def split_brain_file(self) -> str:
        return StateDir(self.state_dir).split_brain

    @property
    def generation_file(self) -> str:
        return StateDir(self.state_dir).generation

    def generation(self) -> int:
        """The live-disk generation of this node's images (0: bootstrapped by hand)."""
        try:
            with open(self.generation_file) as f:
                return int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def set_generation(self, gen: int | None) -> None:
        if gen is None:
            try:
                os.unlink(self.generation_file)
            except FileNotFoundError:
                pass
            return
        tmp = self.generation_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{gen}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.generation_file)

    def rejoin(self, why: str) -> None:
        """Failback: make this node a replica of the promoted node, keeping its image.

        The image was the live disk until this node stopped; the promoted node's VM
        went on from the last commit.  The old group (role primary) moves to
        STATE_DIR.diverged and the caller serves a new group on the same image:
        epoch 0, so no promotion score until the new primary's first commit after
        its resync.  The image is not emptied: it differs from the live disk only
        where the failover rolled back, where writes were in flight at the crash and
        where the new primary wrote since, and protect's checksum resync finds and
        copies exactly those blocks.
        """
        ocf.log("warning", f"{why}: this node's images are no longer the live disks; "
                           f"keeping them as the replica images (group state moved to "
                           f"{self.diverged_dir}): the promoted node's protect compares "
                           f"them block by block and copies what differs; no promotion "
                           f"until its first commit after that resync")
        rc, _, err = ocf.nbd_mc("set-aside", "--state-dir", self.state_dir,
                                timeout=ocf.budget(0.3))
        if rc != 0:
            raise ocf.AgentError(ocf.ERR_GENERIC, f"nbd-mc set-aside failed: {err}")
        self.set_generation(None)  # no live disk here any more
        publish_generation(None)

    def split_brain(self) -> dict | None:
        """The split-brain record, if this node saw another node promoted while it
        held the live disks."""
        try:
            with open(self.split_brain_file) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"peer": "?", "seen_in": "an unreadable record"}

    def mark_split_brain(self, peer: str, seen_in: str) -> None:
        """Record (once) and log that both this node and ``peer`` claim primary."""
        if self.split_brain() is not None:
            return
        record = {"peer": peer, "seen_in": seen_in, "time": time.time(), "node": local_node()}
        tmp = self.split_brain_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.split_brain_file)
        ocf.log("error", f"SPLIT BRAIN: {peer} is promoted while this node holds the live "
                         f"disks ({seen_in}); recorded in {self.split_brain_file}.  Pacemaker "
                         f"demotes one of us; the demoted node keeps its images untouched "
                         f"and unserved until an operator decides")

    def clear_split_brain(self) -> None:
        sb = self.split_brain()
        if sb is None:
            return
        os.unlink(self.split_brain_file)
        ocf.log("warning", f"split brain with {sb.get('peer')} over: this node is the only "
                           f"promoted one; its images are the live disks")


# --- Pacemaker ------------------------------------------------------------------------
def local_node() -> str:
    node = os.environ.get("OCF_RESKEY_CRM_meta_on_node")
    if node:
        return node
    rc, out = ocf.crm("crm_node", "-n")
    return out.strip() if rc == 0 and out.strip() else os.uname().nodename


def primitive_id() -> str:
    return ocf.instance().split(":", 1)[0]


def promoted_elsewhere() -> str | None:
    """The node where another instance of this clone is promoted, if any.

    Asked whoever runs the action (Pacemaker, ocf-tester, a person on a node): the
    rule "never two primaries" must not depend on the caller.  Without a cluster
    crm_resource fails at once and the answer is None."""
    me = local_node()
    rc, out = ocf.crm("crm_resource", "--resource", primitive_id(), "--locate")
    if rc != 0:
        return None
    for line in out.splitlines():
        # "resource replica is running on: node2 Promoted" (older: "Master")
        words = line.replace(":", " ").split()
        if words and words[-1] in ("Promoted", "Master"):
            node = words[-2]
            if node != me:
                return node
    return None


def generation_attribute() -> str:
    return f"nbd-mc-{primitive_id()}-live-generation"


def generations() -> dict[str, int]:
    """Every node's published live-disk generation (permanent node attributes)."""
    rc, out = ocf.crm("crm_node", "--list")
    nodes = [w[1] for w in (line.split() for line in out.splitlines()) if len(w) >= 2] \
        if rc == 0 else []
    gens = {}
    for node in nodes:
        rc, v = ocf.crm("crm_attribute", "--node", node, "--name", generation_attribute(),
                        "--lifetime", "forever", "--query", "--quiet")
        if rc == 0 and v.strip().isdigit():
            gens[node] = int(v.strip())
    return gens


def publish_generation(gen: int | None, current: dict | None = None) -> None:
    """Put this node's live-disk generation into the CIB (None: withdraw it).  Only
    when Pacemaker runs us, like the promotion score."""
    if not ocf.in_cluster():
        return
    me = local_node()
    have = (current if current is not None else generations()).get(me)
    if have == gen:
        return
    if gen is None:
        ocf.crm("crm_attribute", "--node", me, "--name", generation_attribute(), "--lifetime",
                "forever", "--delete", "--quiet")
    else:
        ocf.crm("crm_attribute", "--node", me, "--name", generation_attribute(), "--lifetime",
                "forever", "--update", str(gen), "--quiet")


def newer_elsewhere(cfg: Config) -> tuple[str, int, int] | None:
    """(node, its generation, ours) when another node holds newer live disks.

    Each promotion by failover takes a generation above every one in the CIB and
    keeps it beside the state directory (STATE_DIR.generation) and as a permanent
    node attribute; a node gives its generation up when it rejoins as a replica.
    So when two nodes both hold role primary -- a cold start after a failover whose
    old primary never rejoined -- the higher generation is the newer disk, and the
    older one must not be promoted (its rejoin then overwrites only what is older).
    """
    mine = cfg.generation()
    gens = generations()
    publish_generation(mine, gens)
    me = local_node()
    newer = [(g, n) for n, g in gens.items() if n != me and g > mine]
    if not newer:
        return None
    g, n = max(newer)
    return n, g, mine


_REASON_FILE_KIND = "replica-score"


def set_score(score: int | None, why: str, level: str = "info") -> None:
    """Publish (or withdraw) this node's promotion score; log when it changes."""
    note = ocf.Marker(_REASON_FILE_KIND)
    text = f"{score}: {why}"
    if note.get() != text:
        if score is None:
            ocf.log(level, f"no promotion score: {why}")
        else:
            ocf.log("info", f"promotion score {score}: {why}")
        note.set(text)
    if not ocf.in_cluster():
        return  # ocf-tester or a person: there is no CIB to write to
    if score is None:
        ocf.crm("crm_attribute", "--promotion", "--lifetime", "reboot", "--delete", "--quiet")
    else:
        ocf.crm("crm_attribute", "--promotion", "--lifetime", "reboot", "--update", str(score),
                "--quiet")


def score_for(cfg: Config, st: dict | None, serving: dict | None) -> tuple[int | None, str]:
    """The promotion score a group deserves, and why (never garbage)."""
    if st is None:
        return None, "no group state yet"
    if st.get("role") == "primary":
        other = promoted_elsewhere()
        if other:
            return None, f"our image diverged: {other} is promoted"
        return PRIMARY_SCORE, "this node holds the live disks (role primary)"
    if serving is None:
        return None, "the replica server does not answer"
    if not serving.get("committed"):
        if os.path.isdir(cfg.diverged_dir):
            return None, ("no epoch committed yet: the resync of this node's old live disk "
                          "(failback) has not finished; until then the image is garbage")
        return None, "no epoch committed yet: the initial sync has not finished"
    if serving.get("fenced"):
        return None, f"the group is fenced (generation {serving.get('generation')})"
    if serving.get("stale"):
        # Every replica goes stale once its primary dies: refusing it would make a
        # failover depend on being promoted within stale_after of the last commit.
        return STALE_SCORE, (f"replica at committed epoch {serving['committed']}, stale: no "
                             f"commit for {serving.get('last_commit_age')} s (its primary "
                             "stopped checkpointing or died)")
    if serving.get("broken"):
        return None, f"the group is broken: {serving.get('broken')}"
    if serving.get("handoff"):
        return None, "the disks were handed out by an instant failover"
    return REPLICA_SCORE, f"protected replica at committed epoch {serving['committed']}"


def hold_live_disks(cfg: Config) -> str | None:
    """An unpromoted instance whose group has role primary: keep the images as the
    live disks (None: nothing to serve; the score is set), or give them up for a
    failback (the reason: the caller -- start, never monitor -- calls ``rejoin``
    and serves a new group on the images).

    * no other node promoted and none with a newer generation (``newer_elsewhere``):
      ours are the newest disks, score 1000; a newer one elsewhere: no score;
    * another node promoted, no split-brain record: the normal failback -- this node
      stopped being the live disk before the other was promoted, so its image is
      behind by at most the writes after the last checkpoint: rejoin;
    * a split-brain record: this node ran the VM while the other was promoted too.
      Its writes since then exist nowhere else; nothing automatic may overwrite them
      (DRBD's split-brain default, disconnect): no score, not served, an error.
    """
    sb = cfg.split_brain()
    if sb is not None:
        set_score(None, f"SPLIT BRAIN with {sb.get('peer')} ({sb.get('seen_in')}): this "
                        f"node's images hold writes the other side has not; they stay "
                        f"untouched and unserved until an operator removes "
                        f"{cfg.split_brain_file} (docs/pacemaker.md: Fencing and split brain)",
                  level="error")
        return None
    other = promoted_elsewhere()
    if other is not None:
        set_score(None, f"our image diverged: {other} is promoted")
        return f"{other} is promoted"
    newer = newer_elsewhere(cfg)
    if newer is not None:
        set_score(None, f"{newer[0]} holds newer live disks (generation {newer[1]}, ours "
                        f"{newer[2]}): once it is promoted this node rejoins as its replica",
                  level="warning")
        return None
    set_score(PRIMARY_SCORE, "this node holds the live disks (role primary)")
    return None


# --- actions --------------------------------------------------------------------------
def action_monitor() -> int:
    cfg = Config()
    try:
        cfg.validate()
    except ocf.AgentError:
        if ocf.is_probe() or cfg.marker.get() is None:
            return ocf.NOT_RUNNING
        raise
    role = cfg.marker.get()
    if role is None:
        return ocf.NOT_RUNNING
    st = cfg.offline()
    if role == "promoted":
        if st is None or st.get("role") != "primary":
            return ocf.fail(ocf.FAILED_PROMOTED, "promoted, but the group is not primary "
                                                 "any more")
        if st.get("server_running"):
            return ocf.fail(ocf.FAILED_PROMOTED, "promoted, but an nbd-mc server serves "
                                                 "the live disks")
        other = promoted_elsewhere()
        if other is not None:
            # Both claim primary.  Pacemaker (promoted-max=1) demotes one of us; which
            # one is its choice, not ours: failing here would stop both VMs.
            cfg.mark_split_brain(other, "seen by the monitor of the promoted instance")
        else:
            cfg.clear_split_brain()
        publish_generation(cfg.generation())
        set_score(PRIMARY_SCORE, "promoted: the VM's live disks are here")
        return ocf.RUNNING_PROMOTED
    if st is not None and st.get("role") == "primary":
        # Monitor observes and scores; the failback itself is start's work, so a
        # recurring monitor that finds it due asks Pacemaker for a restart.
        why = hold_live_disks(cfg)
        if why is None:
            return ocf.SUCCESS
        return ocf.fail(ocf.NOT_RUNNING, f"failback due: {why} and this node holds an "
                                         "older live disk; a restart (start) makes it a "
                                         "replica of the promoted node")
    serving = cfg.status()
    if serving is None:
        set_score(None, "the replica server does not answer")
        return ocf.fail(ocf.ERR_GENERIC, f"the nbd-mc server of {cfg.state_dir} does not "
                                         "answer")
    set_score(*score_for(cfg, st, serving))
    return ocf.SUCCESS


def action_start() -> int:
    cfg = Config()
    cfg.validate()
    role = cfg.marker.get()
    if role == "promoted":
        cfg.marker.set("unpromoted")  # a start never promotes; stale marker of a crash
    st = cfg.offline()
    if st is not None and st.get("handoff"):
        raise ocf.AgentError(ocf.ERR_CONFIGURED, f"{cfg.state_dir} was handed out by an "
                                                 "instant failover: the overlays are the live "
                                                 "disks; resolve by hand")
    if st is not None and st.get("role") == "primary":
        why = hold_live_disks(cfg)
        if why is None:
            cfg.marker.set("unpromoted")
            ocf.log("info", "holding the live disks (role primary): not serving")
            return ocf.SUCCESS
        cfg.rejoin(why)
    if cfg.status() is None:
        cfg.serve()
    cfg.marker.set("unpromoted")
    return action_monitor()


def action_stop() -> int:
    cfg = Config()
    try:
        cfg.validate()
    except ocf.AgentError as e:
        if e.rc in (ocf.ERR_INSTALLED, ocf.ERR_CONFIGURED):
            cfg.marker.clear()
            return ocf.SUCCESS  # nothing of ours can be running
        raise
    if os.path.isdir(cfg.state_dir) and (cfg.status() is not None or cfg.server_running()):
        cfg.stop_server()
    set_score(None, "stopped")
    cfg.marker.clear()
    return ocf.SUCCESS


def action_promote() -> int:
    cfg = Config()
    cfg.validate()
    role = cfg.marker.get()
    if role is None:
        raise ocf.AgentError(ocf.ERR_GENERIC, "promote of a stopped instance")
    other = promoted_elsewhere()
    if other is not None:  # before anything changes: no fence, no rollback
        raise ocf.AgentError(ocf.ERR_GENERIC, f"refusing to promote: {other} is promoted; "
                                              "two promoted nodes would both claim primary "
                                              "(split brain)")
    sb = cfg.split_brain()
    if sb is not None:
        raise ocf.AgentError(ocf.ERR_GENERIC, f"refusing to promote: split brain with "
                                              f"{sb.get('peer')} recorded in "
                                              f"{cfg.split_brain_file}; resolve it first")
    serving = cfg.status()  # answers on a replica; the live disks are never served
    st = serving if serving is not None else cfg.offline()
    if st is None:
        raise ocf.AgentError(ocf.ERR_GENERIC, "refusing to promote: no group state")
    if st.get("role") == "primary":
        newer = newer_elsewhere(cfg)
        if newer is not None:
            raise ocf.AgentError(ocf.ERR_GENERIC, f"refusing to promote older live disks: "
                                                  f"{newer[0]} holds generation {newer[1]}, "
                                                  f"this node {newer[2]}")
    else:
        info = st
        if not info.get("committed"):
            raise ocf.AgentError(ocf.ERR_GENERIC, "refusing to promote garbage: no epoch was "
                                                  "ever committed (initial sync unfinished)")
        if info.get("stale"):
            # Pacemaker promotes here only with no other node promoted (checked above):
            # the primary is gone, and this last commit is the newest copy there is.
            # (Refusing it made the failover fail whenever fencing, a loaded machine or
            # the monitor interval took longer than stale_after, 10 s by default.)
            ocf.log("warning", f"promoting a stale group: its last commit is "
                               f"{info.get('last_commit_age')} s old")
        t0 = time.monotonic()
        if serving is not None:
            record_rollback(cfg, serving)
        # The new live-disk generation is on disk before the images become live disks:
        # a crash in between leaves a replica with a generation (harmless: only role
        # primary groups are compared), never live disks with an old one.
        gens = generations()
        gen = max([cfg.generation(), *gens.values()]) + 1
        cfg.set_generation(gen)
        args = ["failover", "--state-dir", cfg.state_dir]
        if serving is not None:
            args += cfg.client_args()
        rc, data, err = ocf.nbd_mc(*args, timeout=ocf.budget(0.7))
        if rc != 0:
            raise ocf.AgentError(ocf.ERR_GENERIC, f"nbd-mc failover failed: {err}")
        ocf.log("info", f"failover: the disks hold committed epoch {data.get('committed')} "
                        f"(fenced the old primary, rolled back in "
                        f"{data.get('seconds', 0) * 1000:.1f} ms)")
        if serving is not None or cfg.server_running():
            cfg.stop_server()  # nobody but the local VM may write the live disks
        publish_generation(gen, gens)
        ocf.log("info", f"live-disk generation {gen}")
        ocf.log("info", f"promoted in {time.monotonic() - t0:.2f} s: the images are the live "
                        "disks")
    cfg.marker.set("promoted")
    set_score(PRIMARY_SCORE, "promoted: the VM's live disks are here")
    return ocf.SUCCESS


def record_rollback(cfg: Config, serving: dict) -> None:
    """Keep what the failover is about to roll back, for a later incremental resync.

    After a fence nobody can add undo data; each disk's undo overlay then holds
    exactly the clusters the rollback will restore (their allocated clusters) and
    the old primary's data for them.  Copies go to STATE_DIR.rolled-back/ with a
    summary (its counts are from the status read just before the fence: the
    copies are the exact record); a failure here is logged and never stops the
    promotion.
    """
    out = StateDir(cfg.state_dir).rolled_back
    try:
        rc, _, err = ocf.nbd_mc("fence", *cfg.client_args(), timeout=ocf.budget(0.2))
        if rc != 0:
            raise OSError(err)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        summary = {"committed": serving.get("committed"), "time": time.time(), "disks": []}
        for d in serving.get("disks", []):
            shutil.copyfile(d["overlay"], os.path.join(out, os.path.basename(d["overlay"])))
            summary["disks"].append({k: d.get(k) for k in ("name", "image", "cluster_size",
                                                           "preserved_clusters", "undo_bytes")})
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        ocf.log("info", "rolling back " + ", ".join(
            f"{d['name']}: {d['preserved_clusters']} clusters" for d in summary["disks"])
            + f" (recorded in {out})")
    except OSError as e:
        ocf.log("warning", f"could not record the clusters to roll back: {e}")


def action_demote() -> int:
    cfg = Config()
    cfg.validate()
    if cfg.marker.get() is None:
        raise ocf.AgentError(ocf.ERR_GENERIC, "demote of a stopped instance")
    # The VM is stopped (it is ordered after the promotion).  The images stay the
    # newest copy until another node is promoted; then monitor/start make this
    # node a replica again (failback).  Nothing slow here: a demotion is on the
    # failover's critical path (the peer's promotion waits for it).  Pacemaker
    # demotes before it promotes elsewhere, so a node promoted already means both
    # sides claimed primary: this demotion is Pacemaker ending a split brain.
    cfg.marker.set("unpromoted")
    other = promoted_elsewhere()
    if other is not None:
        cfg.mark_split_brain(other, "demoted while it was promoted")
        hold_live_disks(cfg)  # the record keeps the images as they are, without a score
    else:
        st = cfg.offline()
        if st is not None and st.get("role") == "primary":
            set_score(PRIMARY_SCORE, "this node holds the live disks (role primary)")
        else:  # the demotion after a promote that failed before the failover
            set_score(*score_for(cfg, st, cfg.status()))
    return ocf.SUCCESS


def action_notify() -> int:
    """Log promotions of other nodes; nothing slow here.

    Pacemaker runs the VM's start only after every post-promote notification has
    returned, so the work a promotion elsewhere causes on this node -- giving up a
    diverged live disk and serving as a fresh secondary -- is left to start: the
    next monitor sees the promoted peer through crm_resource and reports the
    instance not running (with the reason), and Pacemaker's restart does it.
    """
    env = os.environ
    kind = env.get("OCF_RESKEY_CRM_meta_notify_type", "")
    op = env.get("OCF_RESKEY_CRM_meta_notify_operation", "")
    if (kind, op) == ("post", "promote"):
        me = env.get("OCF_RESKEY_CRM_meta_on_node", "")
        others = [n for n in env.get("OCF_RESKEY_CRM_meta_notify_promote_uname", "").split()
                  if n != me]
        if others and Config().marker.get() == "unpromoted":
            ocf.log("info", f"{others[0]} was promoted")
    return ocf.SUCCESS


def main() -> int:
    return ocf.main({"start": action_start, "stop": action_stop, "monitor": action_monitor,
                     "promote": action_promote, "demote": action_demote,
                     "notify": action_notify}, META,
                    lambda: Config().validate())


if __name__ == "__main__":
    sys.exit(main())
