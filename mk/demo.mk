# make demo: the end-to-end story (demo/story.py) with the real test guest.
# The recipe is the top Makefile's `demo` target (python -m demo); this
# adds the guest build (mk/guest.mk) to what it needs.  DEMO_ARGS="--keep" keeps
# the files; "--seconds N" lets the guest work longer.
DEMO_ARGS ?=
demo: guest
demo: export NBD_MC_DEMO_ARGS = $(DEMO_ARGS)
