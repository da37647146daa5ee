# QEMU 10.0 beside the system's QEMU (7.2 on Debian 12); see docs/qemu-versions.md.
#   make setup   also unpacks QEMU 10.0 from Debian 12's bookworm-backports into
#                .deps/qemu-10.0 (tools/setup-qemu10.sh; the system's QEMU stays)
#   make test    runs the whole suite on the system's QEMU, then the tests that start
#                QEMU themselves (marker `qemu`, below) again with NBD_MC_QEMU=10.0
# NBD_MC_QEMU=system|10.0 chooses the QEMU of any pytest run (tests/support/qemu_version.py).
# The libvirt and Pacemaker tests start the system's QEMU through libvirt/the agents,
# so they run once.
.PHONY: qemu10 test-qemu10
QEMU10 := .deps/qemu-10.0
QEMU10_TESTS := $(addprefix tests/system/,test_qemu_versions.py test_primary.py test_resync.py test_failback.py \
	test_writer.py test_guest.py test_demo.py test_chaos.py test_verify.py test_async.py \
	test_history_guest.py test_stalled_copy.py)
setup: qemu10
qemu10: debs
	@tools/setup-qemu10.sh $(QEMU10)

# The second pass of `make test` (also alone: make test-qemu10).  With PYTEST_ARGS it
# runs those of the selected tests that carry the `qemu` marker (exit 5: none did).
test-qemu10: setup
	@set +e; NBD_MC_QEMU=10.0 PATH=$(CURDIR)/$(VENV)/bin:/usr/bin:$$PATH \
	  $(PY) -m pytest -n 2 -m qemu $(or $(PYTEST_ARGS),$(QEMU10_TESTS)); \
	  rc=$$?; [ $$rc = 5 ] && rc=0; exit $$rc
