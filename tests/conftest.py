"""pytest's shared fixtures for every test module.

The fixtures live with the helpers they drive (tests/support/); importing them
here registers them for the whole suite, so a test module asks for ``servers``
or ``workdir`` by argument and imports nothing for it."""

from support.protect_proc import procs  # noqa: F401  (fixture)
from support.qemu_vm import qemu_vms  # noqa: F401  (fixture)
from support.servers import servers, workdir  # noqa: F401  (fixtures)
from support.libvirt import domains, libvirtd  # noqa: F401,E402  (fixtures)

# tests/system/test_deb.py builds the Debian packages, installs them into a Debian 12
# tree and boots it (several minutes): `make soak` and `make test-deb` name it on the
# command line (which collects it anyway); `make test`, collecting tests/, skips it.
collect_ignore = ["system/test_deb.py"]
