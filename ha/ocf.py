"""What every nbd-mc resource agent shares: OCF return codes, parameters, logging,
the runtime marker that says "this instance is started", and calls of the
`nbd-mc` command line.

The agents are Python because they parse `nbd-mc ... --json` and talk to QMP;
resource-agents' ocf-shellfuncs are for shell agents.  We follow the same
conventions by hand (they are small): exit codes of the OCF standard, parameters
from ``OCF_RESKEY_<name>`` with defaults from the meta-data, a per-instance
state file under ``$HA_RSCTMP`` (a tmpfs: a rebooted node starts with nothing
running), log lines on stderr, which pacemaker-execd puts into the cluster log.

The agents use only nbd-mc's public command line (``--json`` output) -- and
nbd_mc.statedir for the names of the files beside a state directory -- never its
Python internals, so they keep working whatever the package looks like inside.

As resource-agents' agents do, every failure says why in one
``ocf-exit-reason:`` line on stderr (``crm_mon`` shows it beside the failed
action), and every wait inside an action is bounded by what is left of the
action's own timeout (``OCF_RESKEY_CRM_meta_timeout``), never by a constant of
its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# OCF return codes (resource-agents' ocf-returncodes).
SUCCESS = 0
ERR_GENERIC = 1
ERR_ARGS = 2
ERR_UNIMPLEMENTED = 3
ERR_PERM = 4
ERR_INSTALLED = 5
ERR_CONFIGURED = 6
NOT_RUNNING = 7
RUNNING_PROMOTED = 8
FAILED_PROMOTED = 9

#: When this action started: the base of every deadline inside it.
_STARTED = time.monotonic()
#: An action's timeout when Pacemaker gives none (ocf-tester, a person): the
#: meta-data's smallest default.
DEFAULT_TIMEOUT = 20.0

# The venv the agent runs from (the wrapper installed by tools/setup-ha.sh execs
# its python): `nbd-mc` is next to the interpreter.
VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))


class AgentError(Exception):
    """An action failed: ``rc`` is the OCF code to exit with, the text is logged."""

    def __init__(self, rc: int, message: str):
        super().__init__(message)
        self.rc = rc


@dataclass
class Param:
    name: str
    shortdesc: str
    longdesc: str
    default: str | None = None
    required: bool = False
    unique: bool = False
    type: str = "string"


def action_timeout() -> float:
    """This action's timeout in seconds (``OCF_RESKEY_CRM_meta_timeout``, in ms)."""
    try:
        return int(os.environ["OCF_RESKEY_CRM_meta_timeout"]) / 1000
    except (KeyError, ValueError):
        return DEFAULT_TIMEOUT


def budget(share: float = 1.0, margin: float = 1.0) -> float:
    """``share`` of what is left of this action's timeout, ``margin`` seconds kept
    back for the agent's own exit; at least one second."""
    left = _STARTED + action_timeout() - margin - time.monotonic()
    return max(1.0, left * share)


def exit_reason(message: str) -> None:
    """The one line Pacemaker keeps as the failed action's reason (crm_mon shows it)."""
    print(f"ocf-exit-reason:{' '.join(message.split())}", file=sys.stderr, flush=True)


def fail(rc: int, message: str) -> int:
    """Log a failure, say it as the exit reason, return ``rc`` (for an action that
    ends with a failure code rather than an AgentError)."""
    log("error", message)
    exit_reason(message)
    return rc


def monitor_process(running: bool, started: bool, gone: str, rc_gone: int = NOT_RUNNING) -> int:
    """The monitor of an agent that is one process: SUCCESS while it runs; else
    NOT_RUNNING -- or, when it was ``started`` and this is no probe, ``rc_gone``
    with ``gone`` as the reason."""
    if running:
        return SUCCESS
    if started and not is_probe():
        return fail(rc_gone, gone)
    return NOT_RUNNING


def terminate(pid: int | None, alive, what: str, kill_group: bool = False) -> None:
    """SIGTERM to ``pid`` (None: nothing runs); once this action's time is nearly up
    and ``alive()`` still says it runs, SIGKILL (to its process group with
    ``kill_group``); returns when it is gone or the action's time is up."""
    if pid is None:
        return
    deadline = time.monotonic() + budget(margin=5)
    try:
        os.kill(pid, signal.SIGTERM)
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)  # polling for the process to go, bounded by the deadline
        if alive():
            log("warning", f"{what} did not stop on SIGTERM: SIGKILL"
                           + (" to its process group" if kill_group else ""))
            (os.killpg if kill_group else os.kill)(pid, signal.SIGKILL)
            while alive() and time.monotonic() < deadline + 4:
                time.sleep(0.05)
    except ProcessLookupError:
        pass


def instance() -> str:
    return os.environ.get("OCF_RESOURCE_INSTANCE", "default")


def log(level: str, message: str) -> None:
    """One line on stderr; pacemaker-execd copies it into the cluster log."""
    print(f"{level.upper()}: {instance()}: {message}", file=sys.stderr, flush=True)
    logfile = os.environ.get("NBD_MC_OCF_LOG")  # tests collect every agent's log here
    if logfile:
        try:
            with open(logfile, "a") as f:
                now = time.time()
                f.write(f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now % 1 * 1000):03d}"
                        f" {os.environ.get('OCF_RESKEY_CRM_meta_on_node', '')}"
                        f" {instance()} {level}: {message}\n")
        except OSError:
            pass


def params(spec: list[Param]) -> dict[str, str]:
    """The instance parameters: OCF_RESKEY_<name>, else the meta-data default."""
    out = {}
    for p in spec:
        v = os.environ.get(f"OCF_RESKEY_{p.name}")
        out[p.name] = v if v not in (None, "") else (p.default or "")
    return out


def plain_actions(start_timeout: str) -> list[tuple[str, str, str]]:
    """The actions of an agent that is not promotable: start, stop, a 10 s monitor,
    validate-all and meta-data, as (name, default timeout, more attributes)."""
    return [("start", start_timeout, ""), ("stop", "60s", ""),
            ("monitor", "20s", 'interval="10s" depth="0"'),
            ("validate-all", "20s", ""), ("meta-data", "5s", "")]


def meta_data(name: str, doc: str, shortdesc: str, spec: list[Param],
              actions: list[tuple[str, str, str]], version: str = "1.0") -> str:
    """OCF 1.0 meta-data (valid against ra-api-1.dtd).  ``doc``: the agent's module
    docstring, whose paragraphs after the first are the long description;
    actions: (name, timeout, extra)."""
    from xml.sax.saxutils import escape, quoteattr
    longdesc = doc.split("\n\n", 1)[1]
    lines = ['<?xml version="1.0"?>',
             '<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">',
             f'<resource-agent name="{name}" version="{version}">',
             "<version>1.0</version>",
             f'<longdesc lang="en">{escape(longdesc.strip())}</longdesc>',
             f'<shortdesc lang="en">{escape(shortdesc)}</shortdesc>',
             "<parameters>"]
    for p in spec:
        lines.append(f'<parameter name="{p.name}" unique="{int(p.unique)}" '
                     f'required="{int(p.required)}">')
        lines.append(f'<longdesc lang="en">{escape(p.longdesc.strip())}</longdesc>')
        lines.append(f'<shortdesc lang="en">{escape(p.shortdesc)}</shortdesc>')
        default = f" default={quoteattr(p.default)}" if p.default is not None else ""
        lines.append(f'<content type="{p.type}"{default}/>')
        lines.append("</parameter>")
    lines.append("</parameters>")
    lines.append("<actions>")
    for action, timeout, extra in actions:
        lines.append(f'<action name="{action}" timeout="{timeout}"{(" " + extra) if extra else ""}/>')
    lines.append("</actions>")
    lines.append("</resource-agent>")
    return "\n".join(lines) + "\n"


def rsctmp() -> str:
    """Runtime directory of the agents (a tmpfs: empty after a reboot)."""
    d = os.environ.get("HA_RSCTMP") or "/run/resource-agents"
    os.makedirs(d, exist_ok=True)
    return d


def runtime_file(kind: str, suffix: str) -> str:
    """``$HA_RSCTMP/nbd-mc-KIND-INSTANCE`` + suffix: this instance's runtime files."""
    return os.path.join(rsctmp(), f"nbd-mc-{kind}-{instance().replace('/', '_')}{suffix}")


class Marker:
    """The per-instance runtime file: absent = stopped, else the role it was given.

    Guarded by nothing but Pacemaker: it runs one action of an instance at a time.
    """

    def __init__(self, kind: str):
        self.path = runtime_file(kind, ".state")

    def get(self) -> str | None:
        try:
            with open(self.path) as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    def set(self, value: str) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(value + "\n")
        os.replace(tmp, self.path)

    def clear(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def nbd_mc_binary() -> str:
    found = os.path.join(VENV_BIN, "nbd-mc")
    if os.access(found, os.X_OK):
        return found
    return shutil.which("nbd-mc") or found


def nbd_mc(*args: str, timeout: float | None = None) -> tuple[int, dict | None, str]:
    """Run `nbd-mc ARGS --json`: (exit status, parsed JSON or None, stderr).
    ``timeout``: by default what is left of the action's."""
    if timeout is None:
        timeout = budget()
    cmd = [nbd_mc_binary(), *args, "--json"]
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:/usr/bin:/usr/sbin:/bin:/sbin:" + env.get("PATH", "")
    # Files, not pipes: `serve` leaves nbdkit running in the background, and a
    # daemon that inherited a pipe would hold it open (run() would wait forever).
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                               timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return 124, None, f"{' '.join(cmd)}: no answer within {timeout:.0f} s"
        except OSError as e:
            return 127, None, f"{cmd[0]}: {e}"
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    data = None
    if stdout.strip():
        try:
            data = json.loads(stdout)
        except ValueError:
            data = None
    return p.returncode, data, stderr.strip()


def crm(*args: str, timeout: float | None = None) -> tuple[int, str]:
    """Run a Pacemaker command line tool; (exit status, stdout).  Never raises.
    ``timeout``: by default what is left of the action's."""
    if timeout is None:
        timeout = budget()
    try:
        p = subprocess.run(list(args), stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, str(e)
    return p.returncode, p.stdout


def in_cluster() -> bool:
    """True when Pacemaker runs this action (not ocf-tester or a person by hand)."""
    return bool(os.environ.get("OCF_RESKEY_CRM_meta_on_node")
                or os.environ.get("OCF_RESKEY_CRM_meta_on_node_uuid"))


def is_probe() -> bool:
    return (os.environ.get("__OCF_ACTION") == "monitor"
            and os.environ.get("OCF_RESKEY_CRM_meta_interval", "0") == "0")


def main(actions: dict, meta: str, validate, argv: list[str] | None = None) -> int:
    """Dispatch argv[1] to actions[name]() -> OCF code; meta-data, usage and
    validate-all (``validate()`` raises AgentError on a bad configuration) built in."""
    argv = sys.argv if argv is None else argv

    def validate_all() -> int:
        validate()
        return SUCCESS
    actions = {**actions, "validate-all": validate_all}
    action = argv[1] if len(argv) > 1 else ""
    if action == "meta-data":
        sys.stdout.write(meta)
        return SUCCESS
    if action in ("usage", "help"):
        print(f"usage: {os.path.basename(argv[0])} {{{'|'.join(['meta-data', *actions])}}}")
        return SUCCESS
    fn = actions.get(action)
    if fn is None:
        print(f"usage: {os.path.basename(argv[0])} {{{'|'.join(['meta-data', *actions])}}}",
              file=sys.stderr)
        exit_reason(f"unknown action {action!r}")
        return ERR_UNIMPLEMENTED
    try:
        return fn()
    except AgentError as e:
        return fail(e.rc, f"{action}: {e}")
    except Exception as e:  # a bug: the traceback for the log, one line for crm_mon
        import traceback
        traceback.print_exc()
        return fail(ERR_GENERIC, f"{action}: unexpected {type(e).__name__}: {e}")
