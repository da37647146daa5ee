"""nbd-mc installed like real software: a wheel in a fresh virtual environment.

The wheel is built from a copy of the sources (pyproject.toml, README.md, nbd_mc/),
installed with pip into a new ``--system-site-packages`` venv outside the checkout
(Debian's python3-libnbd comes from the system, the rest as pip resolves it), and
a short story runs from a directory that is not the checkout, with a PATH and
environment that never name it: serve, three commits, failover, stop; the image
must then hold exactly the last commit.  nbdkit must have loaded the plugin file
of the installed package (its command line names the venv), which is what failed
before the plugin moved into the package.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import zipfile

from support.servers import REPO, connect, describe, run, write_file

MiB = 1 << 20


def build_wheel(out: str) -> str:
    """pip wheel from a copy of what the sdist holds, so the build leaves nothing in
    the checkout (setuptools writes build/ and *.egg-info beside the sources)."""
    src = os.path.join(out, "src")
    os.makedirs(src)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src)
    shutil.copytree(os.path.join(REPO, "nbd_mc"), os.path.join(src, "nbd_mc"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    dist = os.path.join(out, "dist")
    r = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", "-w", dist, src], timeout=300)
    assert r.returncode == 0, describe(r)
    (wheel,) = os.listdir(dist)
    return os.path.join(dist, wheel)


def clean_env(venv: str, home: str) -> dict:
    """An environment that knows nothing of the checkout or the developer's venv."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "NBD_MC", "VIRTUAL_ENV", "PYTEST"))}
    env["PATH"] = f"{venv}/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env["HOME"] = home
    env["LC_ALL"] = "C"
    return env


def test_wheel_installed_in_a_fresh_venv_runs_the_story(workdir):
    wheel = build_wheel(os.path.join(workdir, "build"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "nbd_mc/plugins/nbd_mc.py" in names, names
    assert not [n for n in names if n.startswith(("plugins/", "tests/", "ha/"))], names

    venv = os.path.join(workdir, "venv")
    r = run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", venv])
    assert r.returncode == 0, describe(r)
    home = os.path.join(workdir, "home")
    os.makedirs(home)
    env = clean_env(venv, home)
    # pip's cache (HOME) is shared with the developer's: qemu.qmp comes from it or PyPI
    pip_env = dict(env, HOME=os.environ.get("HOME", home))
    r = run([f"{venv}/bin/pip", "install", "-q", "--disable-pip-version-check", wheel],
            env=pip_env, timeout=600)
    assert r.returncode == 0, describe(r)
    site = subprocess.run([f"{venv}/bin/python", "-c", "import nbd_mc; print(nbd_mc.__file__)"],
                          capture_output=True, text=True, env=env, cwd=home)
    assert site.stdout.startswith(f"{venv}/lib/"), describe(site)

    def cli(*args):
        return subprocess.run(["nbd-mc", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=home, timeout=120)

    r = cli("--version")
    assert r.returncode == 0 and "0.1.0" in r.stdout, describe(r)

    rng = random.Random(24)
    image = os.path.join(workdir, "vda.raw")
    state = os.path.join(workdir, "st")
    write_file(image, bytes(4 * MiB))
    model = bytearray(4 * MiB)
    r = cli("serve", f"vda={image}", "--state-dir", state)
    assert r.returncode == 0 and "serving vda" in r.stdout, describe(r)
    try:
        pid = int(open(os.path.join(state, "nbdkit.pid")).read())
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        assert f"{venv}/lib/python3.11/site-packages/nbd_mc/plugins/nbd_mc.py".encode() in argv, argv
        h = connect(os.path.join(state, "nbd.sock"), "vda")
        committed = bytes(model)
        for epoch in (1, 2, 3, 4):
            for _ in range(8):
                off = rng.randrange(0, 4 * MiB // 4096) * 4096
                data = rng.randbytes(rng.choice((512, 4096, 65536 + 512)))
                data = data[:4 * MiB - off]
                h.pwrite(data, off)
                model[off:off + len(data)] = data
            h.flush()
            if epoch < 4:  # epoch 4 stays open: failover must drop its writes
                r = cli("commit", epoch, "--state-dir", state)
                assert r.returncode == 0, describe(r)
                committed = bytes(model)
        assert bytes(model) != committed
        h.shutdown()
        r = cli("failover", "--state-dir", state)
        assert r.returncode == 0 and "committed epoch 3" in r.stdout, describe(r)
    finally:
        r = cli("stop", "--state-dir", state)
    assert r.returncode == 0, describe(r)
    expected = os.path.join(workdir, "expected.raw")
    write_file(expected, committed)
    r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", image, expected])
    assert r.returncode == 0, describe(r)
    r = cli("status", "--state-dir", state)
    assert r.returncode == 1 and "cannot reach" in r.stderr, describe(r)
