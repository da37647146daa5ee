"""The systemd units: installed by `make install-units`, checked by systemd itself.

`systemd-analyze verify` loads each unit as systemd would (instance names, every
directive, the ExecStart binary must exist and be executable) and must print
nothing.  This machine has no systemd as PID 1, so the service is then started the
way systemd would start it: the settings file read as an EnvironmentFile, ExecStart
expanded ($VAR split into words, ${VAR} one word) and run with $NOTIFY_SOCKET: the
server must send READY=1 only once it answers, and stop on SIGTERM.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess

from support.servers import REPO, VENV_BIN, describe, nbd_mc, run, subprocess_env

UNITS = ("nbd-mc-serve@.service", "nbd-mc-protect@.service")


def install(dest: str) -> str:
    """make install-units into dest, ExecStart pointing at the nbd-mc being tested."""
    r = run(["make", "-s", "-C", REPO, "install-units", f"DESTDIR={dest}",
             f"NBD_MC_BIN={os.path.join(VENV_BIN, 'nbd-mc')}"])
    assert r.returncode == 0, describe(r)
    unitdir = os.path.join(dest, "etc", "systemd", "system")
    assert sorted(os.listdir(unitdir)) == sorted(UNITS)
    return unitdir


def verify(unitdir: str, instance: str = "vm1") -> subprocess.CompletedProcess:
    paths = []
    for u in os.listdir(unitdir):
        if u.endswith("@.service"):
            link = os.path.join(unitdir, u.replace("@.", f"@{instance}."))
            if not os.path.lexists(link):
                os.symlink(u, link)
            paths.append(link)
    return run(["systemd-analyze", "verify", *sorted(paths)])


def test_units_verify(workdir):
    unitdir = install(os.path.join(workdir, "root"))
    r = verify(unitdir)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", describe(r)
    example = os.path.join(workdir, "root", "etc", "nbd-mc", "nbd-mc.conf.example")
    assert "NBD_MC_STATE_DIR=" in open(example).read()
    # the check is real: a unit whose ExecStart does not exist, or a bad directive, fails
    bad = os.path.join(workdir, "bad")
    r = run(["make", "-s", "-C", REPO, "install-units", f"DESTDIR={bad}",
             "NBD_MC_BIN=/nonexistent/nbd-mc"])
    assert r.returncode == 0, describe(r)
    r = verify(os.path.join(bad, "etc", "systemd", "system"))
    assert r.returncode != 0 and "/nonexistent/nbd-mc is not executable" in r.stderr, describe(r)
    unit = os.path.join(unitdir, "nbd-mc-protect@.service")
    with open(unit) as f:
        text = f.read()
    with open(unit, "w") as f:
        f.write(text.replace("Restart=on-failure", "Restart=sometimes"))
    r = verify(unitdir)
    assert "Failed to parse service restart specifier" in r.stderr, describe(r)


def environment_file(path: str) -> dict:
    """KEY=VALUE lines as systemd reads them (comments skipped, quotes removed)."""
    env = {}
    for line in open(path):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, _, value = line.partition("=")
        words = shlex.split(value)
        env[key.strip()] = " ".join(words) if len(words) != 1 else words[0]
    return env


def exec_start(unit: str, env: dict, instance: str) -> list[str]:
    """The unit's ExecStart as systemd runs it: %i, ${VAR} (one word), $VAR (words)."""
    line = next(l for l in open(unit) if l.startswith("ExecStart="))[len("ExecStart="):]
    argv = []
    for word in shlex.split(line.replace("%i", instance)):
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if m:
            argv += env.get(m.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                               lambda m: env.get(m.group(1), ""), word))
    return argv


def test_serve_unit_notifies_ready_and_stops(workdir):
    unitdir = install(os.path.join(workdir, "root"))
    state = os.path.join(workdir, "st")
    image = os.path.join(workdir, "vda.raw")
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    conf = os.path.join(workdir, "vm1.conf")
    with open(conf, "w") as f:
        f.write(f"# test instance\nNBD_MC_STATE_DIR={state}\n"
                f'NBD_MC_DISKS="vda={image}"\nNBD_MC_SERVE_ARGS="--durability process"\n')
    argv = exec_start(os.path.join(unitdir, "nbd-mc-serve@.service"), environment_file(conf),
                      "vm1")
    assert argv[1:] == ["serve", "--foreground", "--state-dir", state, f"vda={image}",
                        "--durability", "process"], argv
    sock_path = os.path.join(workdir, "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(sock_path)
        notify.settimeout(60)  # a safety net: READY=1 comes when the server answers
        proc = subprocess.Popen(argv, env=subprocess_env(NOTIFY_SOCKET=sock_path),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            message = notify.recv(4096).decode()
            assert message.startswith("READY=1\n") and f"MAINPID={proc.pid}" in message
            r = nbd_mc("status", "--state-dir", state, "--json")  # it answers once ready
            assert r.returncode == 0 and '"role": "secondary"' in r.stdout, describe(r)
            proc.send_signal(signal.SIGTERM)  # systemctl stop (KillMode=mixed)
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, (out, err)
            assert "serving vda" in out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    r = nbd_mc("status", "--state-dir", state)
    assert r.returncode == 1 and "cannot reach" in r.stderr, describe(r)
