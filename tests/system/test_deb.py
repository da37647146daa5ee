"""The Debian package installed on a machine that never saw the source (make soak).

`make deb` builds the packages (tools/build-deb.sh) from this checkout; a minimal
Debian 12 tree made by debootstrap (tools/debian-tree.sh, cached in build/debian12)
gets a fresh overlay per run, and in it, with `systemd-nspawn`:

* ``apt-get install ./nbd-mc_*.deb ./python3-qemu.qmp_*.deb`` resolves the
  dependencies (nbdkit, its python plugin, python3-libnbd ... are not in the tree
  before), ``nbd-mc --version`` runs, the man pages, units and agents are where
  Debian puts them, and lintian found no error;
* ``ocf-tester`` passes on the installed ``ocf:nbd-mc:replica``
  (tests/support/debian/ocf-test.sh);
* the tree boots with systemd as PID 1 (``systemd-nspawn -b``) and
  tests/support/debian/units-test.sh checks start, readiness (Type=notify), restart
  on failure and stop of ``nbd-mc-serve@`` and ``nbd-mc-protect@`` with systemctl.

The figures (package sizes, lintian's tags, how long each step took) are printed
and written to build/deb/install-test.txt.  Downloaded packages are kept in
build/debian12/archives, so only the first run fetches them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from support.servers import REPO, describe, short_tmpdir

BUILD = os.path.join(REPO, "build")
DEBS = os.path.join(BUILD, "deb")
TREE = os.path.join(BUILD, "debian12")
HERE = os.path.join(REPO, "tests", "support", "debian")
# what the tests inside the tree need besides the package: ocf-tester and its
# xmllint, and a QEMU for protect
TOOLS = ("resource-agents", "libxml2-utils", "qemu-system-x86")


def sh(argv, timeout=1800, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin", LC_ALL="C")
    for k in ("PYTHONPATH", "VIRTUAL_ENV", "NBD_MC_CONTROL"):
        env.pop(k, None)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, **kw)


@pytest.fixture
def root():
    """A fresh overlay over the cached Debian 12 tree: the tree itself never changes."""
    r = sh([os.path.join(REPO, "tools", "debian-tree.sh"), TREE])
    assert r.returncode == 0, describe(r)
    d = short_tmpdir("nbdmc-deb-")
    merged = os.path.join(d, "root")
    for sub in ("upper", "work", "root"):
        os.makedirs(os.path.join(d, sub))
    r = sh(["mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={TREE}/root,upperdir={d}/upper,workdir={d}/work", merged])
    assert r.returncode == 0, describe(r)
    try:
        yield merged
    finally:
        sh(["umount", merged])
        shutil.rmtree(d, ignore_errors=True)


def nspawn(root: str, *args: str, boot: bool = False, apt: bool = False,
           timeout: float = 1800) -> subprocess.CompletedProcess:
    """systemd-nspawn on the tree.  No machined or systemd here: --register=no
    --keep-unit.  apt: the tree's apt-get, under the machine's apt lock, with the
    package cache kept in build/debian12/archives."""
    os.makedirs(os.path.join(TREE, "archives", "partial"), exist_ok=True)
    argv = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "-D", root]
    if apt:
        argv = ["flock", "/tmp/apt.lock"] + argv + [
            f"--bind={TREE}/archives:/var/cache/apt/archives",
            "--setenv=DEBIAN_FRONTEND=noninteractive"]
    argv += ["-b", "--console=pipe"] if boot else ["--pipe", *args]
    return sh(argv, timeout=timeout)


def test_the_package_installs_and_runs_in_debian_12(root):
    figures = []
    t = time.monotonic()
    r = sh([os.path.join(REPO, "tools", "build-deb.sh"), DEBS])
    assert r.returncode == 0, describe(r)
    figures.append(f"make deb: {time.monotonic() - t:.0f} s")
    debs = sorted(f for f in os.listdir(DEBS) if f.endswith("_all.deb"))
    assert len(debs) == 2 and debs[0].startswith("nbd-mc_"), debs
    for deb in debs:
        figures.append(f"{deb}: {os.path.getsize(os.path.join(DEBS, deb))} bytes")
    lintian = open(os.path.join(DEBS, "lintian.txt")).read()
    tags = sorted({line for line in lintian.splitlines() if line[:3] in ("E: ", "W: ", "I: ",
                                                                          "P: ", "X: ")})
    assert not [t for t in tags if t.startswith("E: ")], lintian
    figures.append("lintian: " + ("; ".join(tags) or "no tags"))

    # the tree has none of what the package depends on: apt must resolve it
    r = nspawn(root, "dpkg-query", "-W", "nbdkit", "python3-libnbd")
    assert r.returncode != 0, describe(r)
    os.makedirs(os.path.join(root, "root", "debs"))
    for deb in debs:
        shutil.copy(os.path.join(DEBS, deb), os.path.join(root, "root", "debs"))
    t = time.monotonic()
    r = nspawn(root, "apt-get", "update", "-qq", apt=True)
    assert r.returncode == 0, describe(r)
    r = nspawn(root, "apt-get", "install", "-y", "-q", *[f"/root/debs/{d}" for d in debs],
               apt=True)
    assert r.returncode == 0, describe(r)
    figures.append(f"apt-get install ./nbd-mc_*.deb: {time.monotonic() - t:.0f} s")
    r = nspawn(root, "dpkg-query", "-W", "-f", "${Package} ${Version}\n", "nbdkit",
               "nbdkit-plugin-python", "python3-libnbd", "python3-click", "python3-rich",
               "python3-prometheus-client", "python3-qemu.qmp", "nbd-mc")
    assert r.returncode == 0, describe(r)
    r = nspawn(root, "nbd-mc", "--version")
    assert r.returncode == 0 and "nbd-mc, version 0.1.0" in r.stdout, describe(r)
    for path in ("usr/share/man/man1/nbd-mc.1.gz", "usr/share/man/man1/nbd-mc-serve.1.gz",
                 "usr/share/man/man1/nbd-mc-protect.1.gz", "usr/share/doc/nbd-mc/README.md.gz",
                 "usr/lib/python3/dist-packages/nbd_mc/plugins/nbd_mc.py",
                 "usr/lib/ocf/resource.d/nbd-mc/replica", "usr/lib/ocf/resource.d/nbd-mc/protect",
                 "usr/lib/ocf/resource.d/nbd-mc/qemu", "etc/nbd-mc/nbd-mc.conf.example"):
        assert os.path.exists(os.path.join(root, path)), path
    unit = open(os.path.join(root, "lib/systemd/system/nbd-mc-serve@.service")).read()
    assert "ExecStart=/usr/bin/nbd-mc serve --foreground" in unit

    r = nspawn(root, "apt-get", "install", "-y", "-q", *TOOLS, apt=True)
    assert r.returncode == 0, describe(r)
    shutil.copy(os.path.join(HERE, "ocf-test.sh"), os.path.join(root, "root"))
    t = time.monotonic()
    r = nspawn(root, "/bin/sh", "/root/ocf-test.sh")
    assert r.returncode == 0 and "replica passed all tests" in r.stdout, describe(r)
    figures.append(f"ocf-tester on the installed replica agent: passed, "
                   f"{time.monotonic() - t:.0f} s")

    shutil.copy(os.path.join(HERE, "units-test.sh"), os.path.join(root, "root"))
    shutil.copy(os.path.join(HERE, "nbd-mc-units-test.service"),
                os.path.join(root, "etc/systemd/system"))
    wants = os.path.join(root, "etc/systemd/system/multi-user.target.wants")
    os.makedirs(wants, exist_ok=True)
    os.symlink("../nbd-mc-units-test.service", os.path.join(wants, "nbd-mc-units-test.service"))
    t = time.monotonic()
    r = nspawn(root, boot=True, timeout=900)
    log = open(os.path.join(root, "root", "units-test.log")).read() \
        if os.path.exists(os.path.join(root, "root", "units-test.log")) else "(no log)"
    assert r.returncode == 0 and log.rstrip().endswith("RESULT: pass"), describe(r) + log
    figures.append(f"boot + units under systemd: passed, {time.monotonic() - t:.0f} s")
    figures += [line for line in log.splitlines() if line.startswith("ok: ")]

    text = "\n".join(figures) + "\n"
    with open(os.path.join(DEBS, "install-test.txt"), "w") as f:
        f.write(text)
    print("\n" + text)
