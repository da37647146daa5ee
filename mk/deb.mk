# make deb   -- the Debian packages (tools/build-deb.sh): build/deb/nbd-mc_*_all.deb
#               and python3-qemu.qmp_*_all.deb (Debian 12 lacks qemu.qmp), lintian's
#               output in build/deb/lintian.txt
# make wheel -- build/dist/nbd_mc-*.whl (pip install it into a --system-site-packages venv)
.PHONY: deb wheel
deb: setup
	@tools/build-deb.sh build/deb

wheel: setup
	@rm -rf build/dist && $(PY) -m pip wheel -q --no-deps --no-build-isolation \
	  --disable-pip-version-check -w build/dist . 2>&1 | { grep -v "^WARNING: Location" || true; }
	@ls build/dist/*.whl

# make test-deb -- only the Debian package test of make soak (tests/system/test_deb.py):
# the packages installed into a debootstrap'ed Debian 12 tree, ocf-tester on the
# installed agent, the units under systemd-nspawn -b.  Figures: build/deb/install-test.txt
.PHONY: test-deb
test-deb: setup
	PATH=$(CURDIR)/$(VENV)/bin:/usr/bin:$$PATH $(PY) -m pytest -s -p no:cacheprovider \
	  --timeout=0 tests/system/test_deb.py
