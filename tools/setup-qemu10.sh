#!/bin/sh
# QEMU 10.0 beside the system's QEMU (7.2 on Debian 12), in a private prefix.
#
#   tools/setup-qemu10.sh DIR      (make setup: DIR = .deps/qemu-10.0)
#
# Debian 12's bookworm-backports suite carries qemu-system-x86 and qemu-utils
# 1:10.0.x (the QEMU of Debian 13).  This adds that suite as an apt source pinned at
# priority 1 (apt never installs or upgrades anything from it by itself), fetches the
# packages with `apt-get download` (nothing is installed into the system: its QEMU
# stays) and unpacks them with `dpkg-deb -x` into DIR/root.  They run with the
# libraries Debian 12 already has (checked below with ldd).  DIR/bin holds wrappers:
# qemu-system-x86_64 (finds its firmware: the backports' seabios, which 10.0 needs
# at >= 1.16.3, in front of the data directory), qemu-img, qemu-io, qemu-nbd.
# Idempotent: nothing happens when DIR/bin/qemu-system-x86_64 already answers.
set -e
DIR=${1:?usage: $0 DIR}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
STAMP="$DIR/.installed"
[ -f "$STAMP" ] && "$DIR/bin/qemu-system-x86_64" --version >/dev/null 2>&1 && exit 0

SUITE=bookworm-backports
PKGS="qemu-system-x86 qemu-system-common qemu-system-data qemu-utils seabios"
SRC=/etc/apt/sources.list.d/nbd-mc-bookworm-backports.sources
PIN=/etc/apt/preferences.d/nbd-mc-bookworm-backports
if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
LOCK="flock /tmp/apt.lock"

echo "setup: QEMU 10.0 from Debian's $SUITE into $DIR"
if [ ! -f "$SRC" ]; then
    printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: $SUITE" \
        "Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" \
        | $SUDO tee "$SRC" >/dev/null
fi
if [ ! -f "$PIN" ]; then
    # priority 1: never chosen for an install or upgrade unless asked for by name
    printf '%s\n' "Package: *" "Pin: release n=$SUITE" "Pin-Priority: 1" | $SUDO tee "$PIN" >/dev/null
fi
if ! apt-cache madison qemu-system-x86 2>/dev/null | grep -q "$SUITE"; then
    # only the new source's lists: the others stay as they are
    $SUDO $LOCK apt-get update -qq -o Dir::Etc::sourcelist="$SRC" -o Dir::Etc::sourceparts=- \
        -o APT::Get::List-Cleanup=0
fi
DEBS="$DIR/debs"
rm -rf "$DEBS" "$DIR/root" "$DIR/bin"
mkdir -p "$DEBS" "$DIR/root" "$DIR/bin"
# as root, apt would hand the download to user _apt, who cannot write here
SANDBOX=; [ "$(id -u)" = 0 ] && SANDBOX="-o APT::Sandbox::User=root"
(cd "$DEBS" && for p in $PKGS; do
    $LOCK apt-get download -qq $SANDBOX "$p/$SUITE" >/dev/null
done)
for deb in "$DEBS"/*.deb; do
    dpkg-deb -x "$deb" "$DIR/root"
done

# The binaries must find every library on this system (Debian 12): say which not.
for b in "$DIR/root/usr/bin/qemu-system-x86_64" "$DIR/root/usr/bin/qemu-img"; do
    missing=$(ldd "$b" | grep "not found" || true)
    if [ -n "$missing" ]; then
        echo "setup: $b needs libraries this system lacks:" >&2
        echo "$missing" >&2
        exit 1
    fi
done

# Wrappers.  QEMU looks for firmware in the data directory relative to its binary
# (root/usr/share/qemu, whose links point at /usr/share/seabios, the system's older
# seabios); -L puts the backports' seabios first.  Modules (none needed) likewise.
cat >"$DIR/bin/qemu-system-x86_64" <<EOF
#!/bin/sh
# QEMU 10.0 from Debian's $SUITE (tools/setup-qemu10.sh); firmware from this prefix
exec "$DIR/root/usr/bin/qemu-system-x86_64" -L "$DIR/root/usr/share/seabios" -L "$DIR/root/usr/share/qemu" "\$@"
EOF
for tool in qemu-img qemu-io qemu-nbd; do
    printf '#!/bin/sh\n# QEMU 10.0 from Debian'"'"'s %s (tools/setup-qemu10.sh)\nexec "%s" "$@"\n' \
        "$SUITE" "$DIR/root/usr/bin/$tool" >"$DIR/bin/$tool"
done
chmod +x "$DIR/bin/"*
"$DIR/bin/qemu-system-x86_64" --version | head -1
"$DIR/bin/qemu-img" --version | head -1 >/dev/null
touch "$STAMP"
