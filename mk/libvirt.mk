# libvirt for `nbd-mc protect --libvirt` and its tests: users, directories and
# qemu.conf for a root libvirtd without systemd (tools/setup-libvirt.sh).  The
# daemons are started by the tests that need them (tests/support/libvirt.py).
.PHONY: setup-libvirt
setup: setup-libvirt
setup-libvirt: debs
	@tools/setup-libvirt.sh
