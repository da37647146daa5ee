#!/bin/sh
# debian-tree.sh DIR -- a minimal Debian 12 tree in DIR/root for the install tests
# (tests/system/test_deb.py): debootstrap's minbase plus systemd as PID 1, so that
# `systemd-nspawn -b` can boot it.  Built once and cached (DIR/root.done); the tests
# never change it: each run mounts an overlay over it.  The mirror is the one apt
# is configured with on this machine (the first .../debian URI of its sources).
set -eu
dir=$1
[ -f "$dir/root.done" ] && exit 0
mirror=$(grep -rhoE '(URIs:|deb)[[:space:]]+https?://[^[:space:]]*/debian/?([[:space:]]|$)' \
         /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
         | awk '{print $2}' | head -1)
mirror=${mirror:-http://deb.debian.org/debian}
rm -rf "$dir/root"
mkdir -p "$dir"
echo "debian-tree: debootstrap bookworm from $mirror into $dir/root (a few minutes, once)"
# flock: debootstrap runs apt-get/dpkg inside the tree, not the host's; the lock
# only keeps it from competing with the host's apt-get for the network
flock /tmp/apt.lock debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus \
    bookworm "$dir/root" "$mirror" > "$dir/debootstrap.log" 2>&1 \
    || { tail -20 "$dir/debootstrap.log" >&2; exit 1; }
# apt inside the tree uses the same mirror; no recommends, like our setup
printf 'APT::Install-Recommends "false";\n' > "$dir/root/etc/apt/apt.conf.d/90nbd-mc-tests"
rm -f "$dir/root/etc/machine-id" && : > "$dir/root/etc/machine-id"
touch "$dir/root.done"
