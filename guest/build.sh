#!/bin/sh
# Build the nbd-mc test guest: OUTDIR/vmlinuz and OUTDIR/initrd.cpio.gz.
#
# Everything comes from Debian packages: the kernel from linux-image-cloud-amd64
# (downloaded and unpacked with dpkg-deb -x, never installed), the userland from
# busybox-static, e2fsck/mke2fs/dumpe2fs from the installed e2fsprogs with the
# shared libraries ldd names.  Idempotent: when both outputs are newer than every
# input nothing is done.  Concurrent runs on one OUTDIR serialise on a lock.
set -eu

usage() { echo "usage: $0 OUTDIR" >&2; exit 2; }
[ $# -eq 1 ] || usage
OUT=$1
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# The virtio modules, in load order (each one's depends= is checked below).
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk"
# Ext4 and what it needs must be built into the kernel: checked below.
BUILTIN_NEEDED="kernel/fs/ext4/ext4.ko kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko"
BINARIES="/sbin/e2fsck /sbin/mke2fs /sbin/dumpe2fs"
BUSYBOX=/bin/busybox

exec 9>"$OUT/.lock"
flock 9

DEBS=$OUT/debs
mkdir -p "$DEBS"

APT_OPTS=-q
# As root, apt warns that its _apt sandbox user cannot write to $DEBS: stay root.
[ "$(id -u)" != 0 ] || APT_OPTS="$APT_OPTS -o APT::Sandbox::User=root"
fetch() {  # apt-get download into $DEBS, refreshing the package lists once on failure
    ( cd "$DEBS" && apt-get download $APT_OPTS "$@" ) ||
        { apt-get update -qq && ( cd "$DEBS" && apt-get download $APT_OPTS "$@" ); }
}

meta=$(ls "$DEBS"/linux-image-cloud-amd64_*.deb 2>/dev/null | tail -n1 || true)
if [ -z "$meta" ]; then
    echo "guest: downloading linux-image-cloud-amd64"
    fetch linux-image-cloud-amd64
    meta=$(ls "$DEBS"/linux-image-cloud-amd64_*.deb | tail -n1)
fi
# Depends: linux-image-6.1.0-NN-cloud-amd64 (= VERSION)
dep=$(dpkg-deb -f "$meta" Depends)
kpkg=$(echo "$dep" | sed -n 's/^\(linux-image-[^ ,]*-cloud-amd64\).*/\1/p')
kver=$(echo "$dep" | sed -n 's/.*(= \([^)]*\)).*/\1/p')
[ -n "$kpkg" ] || { echo "guest: cannot parse Depends of $meta: $dep" >&2; exit 1; }
kdeb=$(ls "$DEBS"/"${kpkg}"_*.deb 2>/dev/null | tail -n1 || true)
if [ -z "$kdeb" ]; then
    echo "guest: downloading $kpkg${kver:+ $kver}"
    fetch "$kpkg${kver:+=$kver}"
    kdeb=$(ls "$DEBS"/"${kpkg}"_*.deb | tail -n1)
fi

VMLINUZ=$OUT/vmlinuz
INITRD=$OUT/initrd.cpio.gz
up_to_date() {
    [ -s "$VMLINUZ" ] && [ -s "$INITRD" ] || return 1
    for f in "$0" "$HERE/init" "$kdeb" "$BUSYBOX" $BINARIES /etc/mke2fs.conf; do
        [ "$VMLINUZ" -nt "$f" ] && [ "$INITRD" -nt "$f" ] || return 1
    done
}
if up_to_date; then
    exit 0
fi

echo "guest: building $VMLINUZ and $INITRD from $(basename "$kdeb")"
KX=$OUT/kernel-x
rm -rf "$KX"
mkdir -p "$KX"
dpkg-deb -x "$kdeb" "$KX"
kimg=$(ls "$KX"/boot/vmlinuz-* | head -n1)
krel=${kimg##*/vmlinuz-}
MODDIR=$KX/lib/modules/$krel

for b in $BUILTIN_NEEDED; do
    grep -qx "$b" "$MODDIR/modules.builtin" ||
        { echo "guest: $b is not built into $krel; the initrd would need it as a module" >&2; exit 1; }
done

# Stage the initramfs tree.
ROOT=$OUT/initrd-root
rm -rf "$ROOT"
mkdir -p "$ROOT/bin" "$ROOT/sbin" "$ROOT/lib/modules" "$ROOT/proc" "$ROOT/sys" "$ROOT/dev" \
         "$ROOT/mnt" "$ROOT/run" "$ROOT/tmp" "$ROOT/etc"
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$ROOT/bin/$applet"
done
ln -s /proc/mounts "$ROOT/etc/mtab"
[ ! -f /etc/mke2fs.conf ] || cp /etc/mke2fs.conf "$ROOT/etc/"

loaded=""
for m in $MODULES; do
    ko=$(find "$MODDIR/kernel" -name "$m.ko" | head -n1)
    [ -n "$ko" ] || { echo "guest: module $m.ko not found in $krel" >&2; exit 1; }
    deps=$("$BUSYBOX" strings "$ko" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' ')
    for d in $deps; do
        case " $loaded " in *" $d "*) ;; *)
            echo "guest: $m depends on $d, which is not loaded before it" >&2; exit 1;; esac
    done
    cp "$ko" "$ROOT/lib/modules/$m.ko"
    loaded="$loaded $m"
done
echo "$MODULES" > "$ROOT/lib/modules/order"

for b in $BINARIES; do
    cp -L "$b" "$ROOT/sbin/"
    rm -f "$ROOT/bin/${b##*/}"  # busybox has a mke2fs applet: /init calls /sbin/mke2fs
    for lib in $(ldd "$b" | sed -n 's/.*=> \(\/[^ ]*\).*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p'); do
        mkdir -p "$ROOT$(dirname "$lib")"
        [ -e "$ROOT$lib" ] || cp -L "$lib" "$ROOT$lib"
    done
done

cp "$HERE/init" "$ROOT/init"
chmod 755 "$ROOT/init"
echo "$krel" > "$ROOT/etc/kernel-release"

( cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet ) | gzip -n -6 > "$INITRD.tmp"
cp "$kimg" "$VMLINUZ.tmp"
mv "$INITRD.tmp" "$INITRD"
mv "$VMLINUZ.tmp" "$VMLINUZ"
rm -rf "$KX" "$ROOT"
echo "guest: kernel $krel, initrd $(du -k "$INITRD" | cut -f1) KiB"
