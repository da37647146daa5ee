"""Which QEMU the tests start: one setting, ``NBD_MC_QEMU``.

* unset, empty or ``system``: whatever ``qemu-system-x86_64`` is on PATH (the
  system's: 7.2 on Debian 12);
* ``10.0``: .deps/qemu-10.0/bin (tools/setup-qemu10.sh, run by `make setup`) goes
  first on PATH, for this process and everything it starts (QEMU, qemu-img,
  protect), so every test that starts QEMU meets 10.0.

Tests that drive QEMU through libvirt or Pacemaker get the system's QEMU whatever
this says (libvirt's domain XML names /usr/bin/qemu-system-x86_64); `make test`
runs only the directly started ones a second time (mk/qemu.mk)."""

from __future__ import annotations

import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIXES = {"10.0": os.path.join(ROOT, ".deps", "qemu-10.0", "bin")}


def wanted() -> str:
    return os.environ.get("NBD_MC_QEMU", "").strip() or "system"


def choose_qemu() -> None:
    """Put the chosen QEMU first on PATH (idempotent); a missing one is an error."""
    which = wanted()
    if which == "system":
        return
    if which not in PREFIXES:
        raise SystemExit(f"NBD_MC_QEMU={which}: known are system, {', '.join(PREFIXES)}")
    bindir = PREFIXES[which]
    if not os.access(os.path.join(bindir, "qemu-system-x86_64"), os.X_OK):
        raise SystemExit(f"NBD_MC_QEMU={which}: {bindir}/qemu-system-x86_64 is missing "
                         "(run `make setup`)")
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[:1] != [bindir]:
        os.environ["PATH"] = os.pathsep.join([bindir] + [p for p in path if p != bindir])


def version_line() -> str:
    exe = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64 (not found)"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True,
                             timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        out = "(does not run)"
    return f"{exe}: {out}"


def describe_qemu() -> str:
    return f"QEMU (NBD_MC_QEMU={wanted()}): {version_line()}"
