"""The plugin loads only the standard library, the shared modules and nbd_mc.secondary.

nbdkit embeds Debian's /usr/bin/python3: whatever the plugin imports must be there
without the venv, and the secondary must not drag the primary's code (QMP, rich,
libnbd) into every nbdkit.  A stand-in ``nbdkit`` module lets the plugin file load
outside nbdkit, in a fresh interpreter run with ``-I`` (no site-packages).
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import sys, types, runpy
sys.modules["nbdkit"] = types.ModuleType("nbdkit")
before = set(sys.modules)
runpy.run_path(sys.argv[1])
shared = ("nbd_mc", "nbd_mc.errors", "nbd_mc.units", "nbd_mc.address", "nbd_mc.tls",
          "nbd_mc.fileio", "nbd_mc.crashpoints", "nbd_mc.sockfile", "nbd_mc.rangeargs",
          "nbd_mc.checksum", "nbd_mc.verify", "nbd_mc.statedir", "nbd_mc.nbduri",
          "nbd_mc.blocksize")
bad = []
for name in sorted(set(sys.modules) - before):
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or top.startswith("_") or name == "nbdkit":
        continue
    if name in shared or name.startswith(("nbd_mc.secondary", "nbd_mc.qcow2", "nbd_mc.control")):
        continue
    bad.append(name)
print("\n".join(bad))
"""


def test_the_plugin_needs_only_the_standard_library_and_the_secondary():
    r = subprocess.run(["/usr/bin/python3", "-I", "-c", PROBE, str(ROOT / "plugins" / "nbd_mc.py")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"the plugin loaded modules outside its promise:\n{r.stdout}"
