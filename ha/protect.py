"""ocf:nbd-mc:protect -- `nbd-mc protect` beside the VM, against the peer's replica.

Runs on the node of the VM (colocate it with the VM, order it after the VM
starts; the VM is colocated with the promoted ocf:nbd-mc:replica).  The
resource is a small supervisor, not protect itself: the VM must keep running
when the peer is away, and protection must come back by itself when the peer
returns (failback).  So start launches the supervisor and returns; it loops:

  1. find the peer (the node of ``addresses`` that is not this one);
  2. ask the peer's replica for its status (`nbd-mc status --json`); protect only
     a secondary that is not fenced;
  3. run `nbd-mc protect` (a resync -- full, from a dirty bitmap, or by checksum
     where the peer's image holds a near copy, as protect chooses -- then a
     checkpoint every ``interval``) until it ends -- the VM died, the peer went
     away or was promoted -- and try again ``retry`` seconds later.

Each resync is logged once it is done (its mode, the bytes it copied, how long
it took; read from protect's ``--metrics-file``) and the last one is kept in
``$HA_RSCTMP/nbd-mc-protect-<instance>.resync.json``: after a failback this says
whether the returning node's image was brought in step incrementally.

Monitor reports the supervisor, not the protection: an unprotected VM is a
degraded but running service (as DRBD's primary is when disconnected); the
current state is in ``$HA_RSCTMP/nbd-mc-protect-<instance>.status`` and the
node attribute ``nbd-mc-protected`` (1 while checkpoints are being committed).
Stop sends SIGTERM to protect, which finishes the checkpoint in progress,
removes the mirrors and leaves the VM running; then the supervisor exits.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ocf  # noqa: E402
from ocf import Param  # noqa: E402

PARAMS = [
    Param("qmp", "QMP socket of the VM",
          "The VM's QMP unix socket (as ocf:nbd-mc:qemu qmp).  Empty with domain.",
          default="", unique=True),
    Param("domain", "libvirt domain of the VM",
          "The VM as a libvirt domain (ocf:heartbeat:VirtualDomain): protect talks to it "
          "through libvirt (`nbd-mc protect --libvirt DOMAIN`), which owns its QMP "
          "monitor.  Give qmp or domain, not both.", default="", unique=True),
    Param("connect", "libvirt URI",
          "With domain: the libvirt connection (`nbd-mc protect --connect`), e.g. "
          "qemu:///system (VirtualDomain's hypervisor).  Empty: protect's default.",
          default=""),
    Param("drives", "ID[=EXPORT] ...",
          "The VM's drives to protect, space-separated ID[=EXPORT] words (`nbd-mc protect "
          "--drive`): every disk of the replica's group; with domain, IDs are the disks' "
          "targets (vda ...).", required=True),
    Param("addresses", "NODE=ADDRESS ...",
          "The pair's nodes and the address each one's replica serves on, e.g. "
          "\"node1=10.0.0.1 node2=10.0.0.2\"; the supervisor protects into the node that "
          "is not this one (the same value as ocf:nbd-mc:replica's).", required=True),
    Param("nbd_port", "NBD port of the replicas", "As ocf:nbd-mc:replica nbd_port.",
          default="10809"),
    Param("control_port", "control port of the replicas",
          "The replicas' control channel: tcp://ADDRESS:PORT (TLS).", default="10810"),
    Param("tls_certificates", "x509 directory",
          "Client certificates (ca-cert.pem, client-cert.pem, client-key.pem) for NBD "
          "over TLS and the control channel.", required=True),
    Param("interval", "checkpoint interval", "`nbd-mc protect --interval`.", default="100ms"),
    Param("retry", "seconds between attempts",
          "How long to wait before protecting again after protect ended or the peer was "
          "not ready.", default="2"),
    Param("options", "more protect options",
          "Further `nbd-mc protect` options, shell-quoted (e.g. --checkpoint-hook CMD).",
          default=""),
]
META = ocf.meta_data("protect", __doc__, "nbd-mc protect of the local VM into the peer's replica",
                     PARAMS, ocf.plain_actions(start_timeout="30s"))


class Config:
    def __init__(self):
        p = ocf.params(PARAMS)
        self.p = p
        self.qmp = p["qmp"]
        self.domain = p["domain"]
        self.drives = shlex.split(p["drives"])
        self.peers = dict(w.split("=", 1) for w in shlex.split(p["addresses"]) if "=" in w)
        self.tls = p["tls_certificates"]
        self.marker = ocf.Marker("protect")
        base = ocf.runtime_file("protect", "")
        self.status_file = base + ".status"
        self.log_file = base + ".log"
        self.resync_file = base + ".resync.json"
        # protect's metrics: the operator's --metrics-file if options has one
        opts = shlex.split(p["options"])
        given = [opts[i + 1] for i, o in enumerate(opts[:-1]) if o == "--metrics-file"]
        given += [o.split("=", 1)[1] for o in opts if o.startswith("--metrics-file=")]
        self.metrics_file = given[-1] if given else base + ".prom"
        self.own_metrics = not given

    def validate(self) -> None:
        self.libvirt = bool(self.domain) or "--libvirt" in shlex.split(self.p["options"])
        if not self.drives or not (self.qmp or self.libvirt):
            raise ocf.AgentError(ocf.ERR_CONFIGURED, "drives and qmp (or domain) are required")
        if self.qmp and self.libvirt:
            raise ocf.AgentError(ocf.ERR_CONFIGURED, "give qmp or domain, not both")
        if len(self.peers) < 2:
            raise ocf.AgentError(ocf.ERR_CONFIGURED, "addresses needs NODE=ADDRESS for both nodes")
        for k in ("nbd_port", "control_port"):
            if not self.p[k].isdigit():
                raise ocf.AgentError(ocf.ERR_CONFIGURED, f"{k} {self.p[k]!r} is not a port")
        if not self.tls or not os.path.isfile(os.path.join(self.tls, "client-cert.pem")):
            raise ocf.AgentError(ocf.ERR_INSTALLED, f"no client-cert.pem in {self.tls!r}")
        if not os.access(ocf.nbd_mc_binary(), os.X_OK):
            raise ocf.AgentError(ocf.ERR_INSTALLED, f"{ocf.nbd_mc_binary()} not found")

    def vm_args(self) -> list[str]:
        """How protect reaches the VM: its QMP socket or its libvirt domain."""
        if self.qmp:
            return ["--qmp", self.qmp]
        if self.domain:
            return ["--libvirt", self.domain, *(["--connect", self.p["connect"]]
                                                if self.p["connect"] else [])]
        return []  # options has --libvirt DOMAIN

    def peer(self) -> tuple[str, str] | None:
        me = local_node()
        others = [(n, a) for n, a in self.peers.items() if n != me]
        return others[0] if me in self.peers and len(others) == 1 else None

    def supervisor_pid(self) -> int | None:
        v = self.marker.get()
        if not v:
            return None
        try:
            pid = int(v)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError):
            return None
        return pid if b"supervise" in cmd and b"protect.py" in cmd else None


def local_node() -> str:
    node = os.environ.get("OCF_RESKEY_CRM_meta_on_node")
    if node:
        return node
    rc, out = ocf.crm("crm_node", "-n")
    return out.strip() if rc == 0 else os.uname().nodename


def set_protected(value: bool) -> None:
    # (also from the supervisor, which outlives the start action: a bound of its own)
    ocf.crm("attrd_updater", "-n", "nbd-mc-protected", "-U", "1" if value else "0",
            timeout=10)


# --- the supervisor -------------------------------------------------------------------
def supervise() -> int:
    """The loop described in the module docstring; ends on SIGTERM."""
    cfg = Config()
    stopping = threading.Event()
    child: list[subprocess.Popen] = []

    def on_term(signum, frame):
        stopping.set()
        for c in child:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    retry = float(cfg.p["retry"] or 2)

    def note(text: str) -> None:
        with open(cfg.status_file, "w") as f:
            f.write(text + "\n")

    last_wait = None
    while not stopping.is_set():
        peer = cfg.peer()
        if peer is None:
            why = f"this node ({local_node()}) is not one of addresses {sorted(cfg.peers)}"
        else:
            name, addr = peer
            control = f"tcp://{addr}:{cfg.p['control_port']}"
            rc, st, err = ocf.nbd_mc("status", "--control", control,
                                     "--tls-certificates", cfg.tls, timeout=10)
            if rc != 0 or not isinstance(st, dict):
                why = f"the replica on {name} does not answer ({err.splitlines()[-1] if err else rc})"
            elif st.get("role") != "secondary" or st.get("fenced"):
                why = f"the replica on {name} is {st.get('role')}{' and fenced' if st.get('fenced') else ''}"
            elif cfg.qmp and not os.path.exists(cfg.qmp):
                why = f"no QMP socket {cfg.qmp} (is the VM running?)"
            else:
                why = None
        if why is not None:
            if why != last_wait:
                ocf.log("info", f"not protecting: {why}")
                last_wait = why
            note(f"waiting: {why}")
            set_protected(False)
            stopping.wait(retry)
            continue
        last_wait = None
        cmd = [ocf.nbd_mc_binary(), "protect", *cfg.vm_args(),
               *[a for d in cfg.drives for a in ("--drive", d)],
               "--target", f"nbds://{addr}:{cfg.p['nbd_port']}/", "--control", control,
               "--tls-certificates", cfg.tls, "--interval", cfg.p["interval"] or "100ms",
               *(["--metrics-file", cfg.metrics_file] if cfg.own_metrics else []),
               *shlex.split(cfg.p["options"])]
        ocf.log("info", f"protecting into {name} ({addr}): {shlex.join(cmd[1:])}")
        note(f"protecting into {name} ({addr}) since {time.strftime('%H:%M:%S')}")
        with open(cfg.log_file, "a") as log:
            log.write(f"--- {time.strftime('%F %T')} {shlex.join(cmd)}\n")
            log.flush()
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT)
            child[:] = [p]
            if stopping.is_set():
                p.send_signal(signal.SIGTERM)
            watch_first_commit(p, cfg)
            rc = p.wait()
        set_protected(False)
        tail = _tail(cfg.log_file)
        ocf.log("info" if rc == 0 else "warning",
                f"nbd-mc protect into {name} ended ({rc}): {tail}")
        note(f"protect into {name} ended ({rc}): {tail}")
        stopping.wait(retry)
    return 0


def watch_first_commit(p: subprocess.Popen, cfg: Config) -> None:
    """While protect runs: set nbd-mc-protected=1 once the peer reports a commit, and
    report every resync protect finishes (``report_resync``)."""
    def run():
        name, addr = cfg.peer()
        control = f"tcp://{addr}:{cfg.p['control_port']}"
        first = None
        protected = False
        seen = last_resync(cfg.metrics_file)  # a leftover of an earlier run
        while p.poll() is None:
            seen = report_resync(cfg, name, seen)
            if not protected:
                rc, st, _ = ocf.nbd_mc("status", "--control", control, "--tls-certificates",
                                       cfg.tls, timeout=10)
                if rc == 0 and isinstance(st, dict) and st.get("protected"):
                    if first is None:
                        first = st.get("committed")
                    elif st.get("committed", 0) > first:
                        set_protected(True)
                        protected = True
            time.sleep(0.5)
        report_resync(cfg, name, seen)
    threading.Thread(target=run, daemon=True).start()


def last_resync(path: str) -> dict | None:
    """The last finished (re)sync in protect's metrics file: mode, bytes, seconds."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "nbd_mc_protect_last_resync_mode" and s.value == 1:
                    out["mode"] = s.labels.get("nbd_mc_protect_last_resync_mode")
                elif s.name == "nbd_mc_protect_last_resync_bytes":
                    out["bytes"] = int(s.value)
                elif s.name == "nbd_mc_protect_last_resync_duration_seconds":
                    out["seconds"] = round(s.value, 3)
    except ValueError:  # a half-written file cannot be (the library renames it in place)
        return None
    return out if "mode" in out else None


def report_resync(cfg: Config, peer: str, seen: dict | None) -> dict | None:
    """Log a resync protect finished since ``seen`` and keep it in the .resync.json
    file; returns the resync now seen."""
    r = last_resync(cfg.metrics_file)
    if r is None or r == seen:
        return seen
    what = {"full": "a full sync", "bitmap": "an incremental resync from a dirty bitmap",
            "checksum": "a checksum resync (only the blocks whose contents differed)"}
    n = r["bytes"]
    size = f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n // 1024} KiB"
    ocf.log("info", f"{peer}'s replica is in step after {what.get(r['mode'], r['mode'])}: "
                    f"{size} copied in {r.get('seconds', 0):.1f} s")
    record = {"peer": peer, "time": time.time(), **r}
    tmp = cfg.resync_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, cfg.resync_file)
    return r


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.readlines()[-3:] if line.strip()]
    except OSError:
        return ""
    return " | ".join(lines)[-400:]


# --- actions ---------------------------------------------------------------------------
def action_monitor() -> int:
    cfg = Config()
    return ocf.monitor_process(cfg.supervisor_pid() is not None, cfg.marker.get() is not None,
                               "the protect supervisor died", ocf.ERR_GENERIC)


def action_start() -> int:
    cfg = Config()
    cfg.validate()
    if cfg.supervisor_pid() is not None:
        return ocf.SUCCESS
    if cfg.peer() is None:
        raise ocf.AgentError(ocf.ERR_CONFIGURED, f"this node ({local_node()}) is not one of "
                                                 f"addresses {sorted(cfg.peers)}")
    with open(cfg.log_file, "a") as log:
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "supervise"],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, env=dict(os.environ))
    cfg.marker.set(str(p.pid))
    ocf.log("info", f"protect supervisor started (pid {p.pid})")
    return ocf.SUCCESS


def action_stop() -> int:
    cfg = Config()
    # SIGTERM: protect finishes its checkpoint, removes the mirrors, the VM runs on
    ocf.terminate(cfg.supervisor_pid(), lambda: cfg.supervisor_pid() is not None,
                  "the protect supervisor", kill_group=True)
    cfg.marker.clear()
    set_protected(False)
    return ocf.SUCCESS


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "supervise":
        return supervise()
    return ocf.main({"start": action_start, "stop": action_stop, "monitor": action_monitor}, META,
                    lambda: Config().validate())


if __name__ == "__main__":
    sys.exit(main())
