# make bench         -- quick benchmark against the anchors (a few minutes)
# make bench FULL=1  -- longer runs, bigger images, 3 repetitions
# BENCH_ARGS="--only 1,5" passes options to `python -m bench`.
# Results: bench/results/results.md (also printed), results.json, *.png.
BENCH_ARGS ?=
BENCH_FULL := $(if $(filter 1 yes true on,$(FULL)),--full)

bench: setup
	PATH=$(CURDIR)/$(VENV)/bin:/usr/bin:$$PATH $(PY) -m bench $(BENCH_FULL) $(BENCH_ARGS)
