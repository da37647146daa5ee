# make soak [SOAK_SECONDS=600] -- the long reliability runs, with figures:
#   * load: 8 connections of mixed I/O, a commit every 50 ms, quiesced commit and
#     rollback cycles checked byte for byte; SOAK_SECONDS in each durability mode;
#   * crash matrix: every crash point at hit counts 1..6 (two seeds, both modes,
#     both recovery paths), restarts killed inside recovery, and "*:N" for
#     N = 1, 2, ... until the workload runs to its end;
#   * the fault, corrupt-file, hostile-input (fuzz x10), TLS and fencing tests.
# The table of fault classes, cases and failures: build/soak/report.md (also printed).
SOAK_SECONDS ?= 600
SOAK_DIR := build/soak
SOAK_TESTS := tests/test_load.py tests/test_crash_matrix.py tests/test_faults.py \
	tests/test_corrupt.py tests/test_hostile.py tests/test_tls.py tests/test_fencing.py \
	tests/test_resync.py

soak: setup
	@mkdir -p $(SOAK_DIR) && rm -f $(SOAK_DIR)/report.jsonl
	@PATH=$(CURDIR)/$(VENV)/bin:/usr/bin:$$PATH NBD_MC_SOAK_SECONDS=$(SOAK_SECONDS) \
	  NBD_MC_CRASH_SWEEP=1 NBD_MC_FUZZ_EXAMPLES=3000 NBD_MC_OUTAGES=30 \
	  NBD_MC_REPORT=$(CURDIR)/$(SOAK_DIR)/report.jsonl \
	  $(PY) -m pytest -q -s -p no:cacheprovider --timeout=0 $(SOAK_TESTS); status=$$?; \
	  $(PY) tests/support/reliability.py $(SOAK_DIR)/report.jsonl | tee $(SOAK_DIR)/report.md; \
	  exit $$status
