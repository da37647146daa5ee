"""The QEMU the tests run (NBD_MC_QEMU, support/qemu_version.py) and what protect
asks it (primary/features.py).  `make test` runs this file on the system's QEMU and
again on QEMU 10.0 (mk/qemu.mk)."""

import re
import subprocess

import pytest

from nbd_mc.primary.features import QemuFeatures
from support.qemu_version import wanted

pytestmark = pytest.mark.qemu


def test_the_chosen_qemu_runs(workdir, qemu_vms):
    """NBD_MC_QEMU picks the QEMU every test starts: QEMU itself says its version."""
    vm = qemu_vms(workdir, {})
    version = vm.qmp.cmd("query-version")["qemu"]
    line = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True,
                          check=True).stdout
    if wanted() == "10.0":
        assert (version["major"], version["minor"]) == (10, 0), version
        assert re.search(r"version 10\.0\.", line), line  # qemu-img comes along
    else:
        assert version["major"] >= 7, version


def test_protect_finds_what_it_needs_in_the_schema(workdir, qemu_vms):
    vm = qemu_vms(workdir, {})
    f = QemuFeatures.ask(vm.qmp)
    assert f.missing() == []
    assert {"server", "export"} <= f.blockdev_options("nbd")
    # the copy-before-write filter's error policy (for resync rounds) is there in 7.2
    assert "on-cbw-error" in f.blockdev_options("copy-before-write")
