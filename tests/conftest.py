"""pytest's shared fixtures for every test module, and the QEMU the tests run.

The fixtures live with the helpers they drive (tests/support/); importing them
here registers them for the whole suite, so a test module asks for ``servers``
or ``workdir`` by argument and imports nothing for it.

``NBD_MC_QEMU`` chooses the QEMU that the tests start (support/qemu_version.py):
unset or ``system``, the system's (7.2 on Debian 12); ``10.0``, the one `make
setup` unpacks into .deps/qemu-10.0 (tools/setup-qemu10.sh), put first on PATH
here, so QEMU, qemu-img and everything protect starts come from there."""

from support.qemu_version import choose_qemu, describe_qemu

choose_qemu()

from support.protect_proc import procs  # noqa: F401,E402  (fixture)
from support.qemu_vm import qemu_vms  # noqa: F401,E402  (fixture)
from support.servers import servers, workdir  # noqa: F401,E402  (fixtures)
from support.libvirt import domains, libvirtd  # noqa: F401,E402  (fixtures)

# tests/system/test_deb.py builds the Debian packages, installs them into a Debian 12
# tree and boots it (several minutes): `make soak` and `make test-deb` name it on the
# command line (which collects it anyway); `make test`, collecting tests/, skips it.
collect_ignore = ["system/test_deb.py"]

def pytest_report_header(config):
    return describe_qemu()
