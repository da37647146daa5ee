#!/bin/sh
# Make a root libvirtd usable without systemd: what the Debian packaging scripts
# would have created (users, groups, directories) and a qemu.conf that runs QEMU
# as root with no security driver.  Idempotent and silent when all is in place.
# The daemons themselves are started by tests/support/libvirt.py when needed
# (`virtlogd -d`, `libvirtd -d`), not here.
set -e
[ "$(id -u)" = 0 ] || { echo "setup-libvirt: needs root (skipped)" >&2; exit 0; }
command -v libvirtd >/dev/null 2>&1 || { echo "setup-libvirt: libvirtd is not installed" >&2; exit 1; }

getent group libvirt >/dev/null || groupadd --system libvirt
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null || \
    useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
        --shell /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt/qemu /run/libvirt /var/lib/libvirt/qemu /var/cache/libvirt/qemu \
    /etc/libvirt

conf=/etc/libvirt/qemu.conf
[ -f "$conf" ] || printf '# Written by nbd-mc tools/setup-libvirt.sh\n' > "$conf"
# key = "value": replace an existing (or commented-out) line, else append.
set_key() {
    if grep -Eq "^[[:space:]]*$1[[:space:]]*=[[:space:]]*\"$2\"[[:space:]]*$" "$conf"; then
        return
    fi
    if grep -Eq "^[[:space:]]*#?[[:space:]]*$1[[:space:]]*=" "$conf"; then
        sed -i -E "0,/^[[:space:]]*#?[[:space:]]*$1[[:space:]]*=.*/s//$1 = \"$2\"/" "$conf"
    else
        printf '%s = "%s"\n' "$1" "$2" >> "$conf"
    fi
}
set_key user root
set_key group root
set_key security_driver none
