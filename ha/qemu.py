"""ocf:nbd-mc:qemu -- a QEMU virtual machine run directly, with a QMP socket.

A small, honest VM resource for hosts without libvirt (and for the tests): start
runs ``qemu-system-x86_64 -daemonize -pidfile P -qmp unix:Q,server=on,wait=off
ARGS``, monitor checks that the process of the pid file is alive, stop sends
SIGTERM (QEMU exits at once, like pulling the power: the guest is not shut down
cleanly) and SIGKILL after the timeout.  ``nbd-mc protect`` attaches to the QMP
socket (ocf:nbd-mc:protect).

With libvirt, use ocf:heartbeat:VirtualDomain instead -- that is the VM resource
operators know; this agent does nothing libvirt would not do better.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ocf  # noqa: E402
from ocf import Param  # noqa: E402

PARAMS = [
    Param("args", "QEMU arguments",
          "The VM's QEMU arguments (shell-quoted), without -qmp, -daemonize and "
          "-pidfile, which the agent adds.  The console must not be stdio "
          "(e.g. -serial file:PATH or a chardev).", required=True),
    Param("qmp", "QMP socket path",
          "Unix socket for QMP (-qmp unix:PATH,server=on,wait=off); ocf:nbd-mc:protect "
          "uses the same path.", required=True, unique=True),
    Param("binary", "QEMU binary", "The emulator to run.", default="qemu-system-x86_64"),
    Param("pidfile", "pid file", "Where QEMU writes its pid (default: under $HA_RSCTMP).",
          default=""),
]
META = ocf.meta_data("qemu", __doc__, "a QEMU VM run directly (no libvirt)", PARAMS,
                     ocf.plain_actions(start_timeout="60s"))


class Config:
    def __init__(self):
        p = ocf.params(PARAMS)
        self.args = shlex.split(p["args"])
        self.qmp = p["qmp"]
        self.binary = p["binary"]
        self.pidfile = p["pidfile"] or ocf.runtime_file("qemu", ".pid")

    def validate(self) -> None:
        if not self.args:
            raise ocf.AgentError(ocf.ERR_CONFIGURED, "parameter args is empty")
        if not self.qmp:
            raise ocf.AgentError(ocf.ERR_CONFIGURED, "parameter qmp is empty")
        if not _which(self.binary):
            raise ocf.AgentError(ocf.ERR_INSTALLED, f"{self.binary} not found")

    def pid(self) -> int | None:
        """The pid of our QEMU, if it runs (the pid file names a live QEMU process)."""
        try:
            with open(self.pidfile) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if os.fsencode(self.pidfile) in cmdline else None


def _which(binary: str) -> str | None:
    import shutil
    return shutil.which(binary, path="/usr/bin:/usr/sbin:/bin:/sbin:" + os.environ.get("PATH", ""))


def action_monitor() -> int:
    # (no marker: Pacemaker knows whether it started QEMU; a recurring monitor is
    # only asked of a started one)
    cfg = Config()
    return ocf.monitor_process(cfg.pid() is not None, True,
                               f"QEMU is not running (pid file {cfg.pidfile})")


def action_start() -> int:
    cfg = Config()
    cfg.validate()
    if cfg.pid() is not None:
        return ocf.SUCCESS
    for stale in (cfg.qmp, cfg.pidfile):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    os.makedirs(os.path.dirname(os.path.abspath(cfg.qmp)), exist_ok=True)
    cmd = [_which(cfg.binary), "-daemonize", "-pidfile", cfg.pidfile,
           "-qmp", f"unix:{cfg.qmp},server=on,wait=off", *cfg.args]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=ocf.budget(margin=5))
    if p.returncode != 0 or cfg.pid() is None:
        raise ocf.AgentError(ocf.ERR_GENERIC, f"QEMU did not start ({p.returncode}): "
                                              f"{(p.stderr or p.stdout).strip()[-1500:]}")
    ocf.log("info", f"QEMU started, pid {cfg.pid()}, QMP {cfg.qmp}")
    return ocf.SUCCESS


def action_stop() -> int:
    cfg = Config()
    pid = cfg.pid()
    if pid is not None:
        ocf.terminate(pid, lambda: cfg.pid() is not None, f"QEMU {pid}")
        if cfg.pid() is not None:
            raise ocf.AgentError(ocf.ERR_GENERIC, f"QEMU {pid} did not stop")
        ocf.log("info", f"QEMU {pid} stopped")
    for stale in (cfg.qmp, cfg.pidfile):
        try:
            os.unlink(stale)
        except (FileNotFoundError, TypeError):
            pass
    return ocf.SUCCESS


def main() -> int:
    return ocf.main({"start": action_start, "stop": action_stop, "monitor": action_monitor}, META,
                    lambda: Config().validate())


if __name__ == "__main__":
    sys.exit(main())
