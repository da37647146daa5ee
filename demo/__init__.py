"""The end-to-end demo (`make demo`) and the real test guest it boots.

Not part of the runtime package: nothing under nbd_mc/ imports this.  It drives
the installed `nbd-mc` command, QEMU and the guest built by guest/build.sh, and
is imported by the tests that tell the same story (tests/system/)."""
