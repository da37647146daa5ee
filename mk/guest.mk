# The test guest: Debian cloud kernel + busybox initramfs (guest/build.sh).
# guest/build.sh is idempotent and does nothing when its outputs are up to date.
.PHONY: guest
guest: setup
	@guest/build.sh guest/build
