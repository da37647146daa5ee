"""nbd-mc benchmarks against the anchors (nbdkit file plugin, qemu-storage-daemon
copy-before-write): `make bench`, `make bench FULL=1`, or `python -m bench --help`."""
