"""A real libvirtd for the tests, and libvirt domains that are cleaned up.

``libvirtd`` fixture (session scope): makes sure ``virtlogd`` and ``libvirtd`` run
as root (this machine has no systemd: ``virtlogd -d``, ``libvirtd -d`` after
tools/setup-libvirt.sh created users, directories and qemu.conf), and yields the
connection URI.  Daemons this fixture started are stopped when the last test
session that uses them ends: pytest-xdist workers each run the fixture, so every
user registers a file under :data:`STATE` and the last one out stops them.
Daemons someone else started are left alone.

``domains`` fixture: ``domains.create(xml)`` starts a transient domain; at the
end every domain it made is destroyed (its QEMU killed) so nothing outlives the test.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time

import libvirt
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
URI = "qemu:///system"
STATE = "/run/nbd-mc-tests/libvirt"
DAEMONS = (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid"))
DEADLINE = 60.0

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised anyway


def _pid(pidfile: str) -> int | None:
    try:
        pid = int(open(pidfile).read().strip())
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return None if state in ("Z", "X") else pid  # a zombie has exited
    except (OSError, ValueError, IndexError):
        return None


def _answers() -> bool:
    try:
        libvirt.open(URI).close()
        return True
    except libvirt.libvirtError:
        return False


@contextlib.contextmanager
def _locked():
    os.makedirs(STATE, exist_ok=True)
    with open(os.path.join(STATE, "lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def start_daemons() -> None:
    """Set up (idempotent) and start virtlogd and libvirtd unless they already run;
    record that we started them.  Call under _locked()."""
    r = subprocess.run(["sh", os.path.join(REPO, "tools", "setup-libvirt.sh")],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"tools/setup-libvirt.sh: {r.stdout}{r.stderr}"
    if _answers():
        return
    for name, pidfile in DAEMONS:
        if _pid(pidfile) is None:
            r = subprocess.run([name, "-d"], capture_output=True, text=True)
            assert r.returncode == 0, f"{name} -d: {r.stdout}{r.stderr}"
            open(os.path.join(STATE, f"started-{name}"), "w").close()
    deadline = time.monotonic() + DEADLINE
    while not _answers():  # polling the daemon's socket with a deadline
        assert time.monotonic() < deadline, "libvirtd did not answer within 60 s"
        time.sleep(0.05)


def stop_daemons() -> None:
    """Stop the daemons start_daemons() started (libvirtd first).  Call under _locked()."""
    for name, pidfile in reversed(DAEMONS):
        mark = os.path.join(STATE, f"started-{name}")
        if not os.path.exists(mark):
            continue
        pid = _pid(pidfile)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + DEADLINE
            while _pid(pidfile) == pid and time.monotonic() < deadline:
                time.sleep(0.05)
        os.unlink(mark)


def _users() -> list[int]:
    alive = []
    for name in os.listdir(STATE):
        if name.startswith("user-"):
            pid = int(name[5:])
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except OSError:
                os.unlink(os.path.join(STATE, name))  # a test run that died
    return alive


@pytest.fixture(scope="session")
def libvirtd():
    """The URI of a running libvirtd (started if needed, stopped by the last user)."""
    with _locked():
        start_daemons()
        open(os.path.join(STATE, f"user-{os.getpid()}"), "w").close()
    yield URI
    with _locked():
        os.unlink(os.path.join(STATE, f"user-{os.getpid()}"))
        if not _users():
            stop_daemons()


class Domains:
    """Transient libvirt domains made by one test; all destroyed at its end."""

    def __init__(self, uri: str):
        self.conn = libvirt.open(uri)
        self.made: list[str] = []

    def create(self, xml: str) -> libvirt.virDomain:
        dom = self.conn.createXML(xml, 0)
        self.made.append(dom.name())
        return dom

    def define(self, xml: str) -> libvirt.virDomain:
        """A defined (persistent), shut-off domain; undefined at the end."""
        dom = self.conn.defineXML(xml)
        self.made.append(dom.name())
        return dom

    def qemu_pid(self, name: str) -> int:
        return int(open(f"/run/libvirt/qemu/{name}.pid").read().strip())

    def close(self) -> None:
        for name in self.made:
            try:
                dom = self.conn.lookupByName(name)
            except libvirt.libvirtError:
                continue  # a transient domain whose QEMU died is gone already
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isPersistent():
                    dom.undefine()
        self.conn.close()


@pytest.fixture
def domains(libvirtd):
    d = Domains(libvirtd)
    yield d
    d.close()


def domain_xml(name: str, disks: dict[str, str], *, kernel: str | None = None,
               initrd: str | None = None, cmdline: str = "", serial: str | None = None,
               memory_mib: int = 256, formats: dict[str, str] | None = None) -> str:
    """A ``<domain type='qemu'>`` (TCG, no KVM) with virtio disks by target
    (``{"vda": PATH}``), raw unless ``formats`` says otherwise (``{"vda": "qcow2"}``);
    direct kernel boot when ``kernel`` is given, else an idle machine whose firmware
    finds nothing to boot and waits (no reboot)."""
    if kernel:
        boot = (f"<kernel>{kernel}</kernel><initrd>{initrd}</initrd>"
                f"<cmdline>{cmdline}</cmdline>")
    else:
        boot = "<bios rebootTimeout='-1'/>"
    disk_xml = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' "
        f"type='{(formats or {}).get(target, 'raw')}' cache='writeback'/>"
        f"<source file='{path}'/><target dev='{target}' bus='virtio'/></disk>"
        for target, path in disks.items())
    serial_xml = (f"<serial type='file'><source path='{serial}'/><target port='0'/></serial>"
                  if serial else "")
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>{boot}</os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {disk_xml}{serial_xml}
    <memballoon model='none'/>
  </devices>
</domain>"""
