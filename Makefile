# nbd-mc: two commands do everything on a fresh Debian 12 machine:
#   make demo   -- set up and run the end-to-end story
#   make test   -- set up and run the test suite
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nbd-mc-installed
PYTEST_ARGS ?=

.PHONY: setup debs demo test bench soak clean
setup: debs $(STAMP)

debs:
	@tools/setup-debs.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]' 2>&1 \
		| { grep -v "^WARNING: Location .* is ignored" || true; }
	@touch $(STAMP)

# the system's QEMU first, then the QEMU-facing tests on QEMU 10.0 (mk/qemu.mk)
test: setup
	PATH=$(CURDIR)/$(VENV)/bin:/usr/bin:$$PATH $(PY) -m pytest -n 2 $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test-qemu10

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:/usr/bin:$$PATH $(PY) -m demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

-include mk/*.mk
