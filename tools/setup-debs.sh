#!/bin/sh
# Install the Debian packages nbd-mc stands on, only those that are missing.
# Idempotent and silent when everything is there.
set -e
PKGS="nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd qemu-utils qemu-system-x86 \
fio python3-venv busybox-static cpio e2fsprogs gnutls-bin openssl \
pacemaker corosync resource-agents crmsh pacemaker-cli-utils \
libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients python3-libvirt \
fuse3 python3-pyfuse3 libxml2-utils systemd \
python3-click python3-rich python3-prometheus-client \
debhelper dh-python python3-all pybuild-plugin-pyproject python3-setuptools python3-setuptools-scm python3-click-man \
dpkg-dev lintian debootstrap systemd-container"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "setup: installing Debian packages:$missing"
if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO flock /tmp/apt.lock apt-get update -qq
$SUDO flock /tmp/apt.lock apt-get install -y -qq --no-install-recommends $missing >/dev/null
