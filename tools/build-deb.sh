#!/bin/sh
# build-deb.sh OUT -- the Debian packages of nbd-mc (`make deb`), with Debian's own
# tools (dpkg-buildpackage, dh, pybuild), then lintian on them.
#   OUT/nbd-mc_<version>_all.deb            from a copy of this checkout (debian/)
#   OUT/python3-qemu.qmp_<version>_all.deb  qemu.qmp, which Debian 12 lacks, built from
#       its PyPI source release with packaging/python3-qemu.qmp/debian (once; cached)
#   OUT/lintian.txt                         lintian's output for both
# The checkout is never written: each build runs in a copy under OUT.
set -eu
out=$(mkdir -p "$1" && cd "$1" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
QMP_VERSION=0.0.6
py=$repo/.venv/bin/python
# Debian's tools with Debian's python3 only (pybuild runs "python3.11 -m build"):
# nothing from a venv or another python installation on PATH
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH VIRTUAL_ENV

# --- python3-qemu.qmp (cached: its inputs never change) --------------------------
if ! ls "$out"/python3-qemu.qmp_${QMP_VERSION}-*_all.deb >/dev/null 2>&1; then
    rm -rf "$out/qmp" && mkdir -p "$out/qmp"
    "$py" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
        -d "$out/qmp" "qemu.qmp==$QMP_VERSION" 2>&1 | { grep -v "^WARNING: Location" || true; }
    tar -C "$out/qmp" -xzf "$out/qmp/qemu_qmp-$QMP_VERSION.tar.gz"
    cp -r "$repo/packaging/python3-qemu.qmp/debian" "$out/qmp/qemu_qmp-$QMP_VERSION/"
    (cd "$out/qmp/qemu_qmp-$QMP_VERSION" && dpkg-buildpackage -b -us -uc) > "$out/qmp/build.log" 2>&1 \
        || { tail -30 "$out/qmp/build.log" >&2; exit 1; }
    mv "$out"/qmp/python3-qemu.qmp_*_all.deb "$out/"
fi

# --- nbd-mc -------------------------------------------------------------------------
version=$(dpkg-parsechangelog -l "$repo/debian/changelog" -S Version)
src=$out/nbd-mc-$version
rm -rf "$src" "$out"/nbd-mc_*
mkdir -p "$src"
# what git tracks or would track (not .venv, build/, caches), symlinks kept
(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - --no-recursion) \
    | tar -C "$src" -xf -
(cd "$src" && dpkg-buildpackage -b -us -uc) > "$out/build.log" 2>&1 \
    || { tail -30 "$out/build.log" >&2; exit 1; }

# --- lintian ------------------------------------------------------------------------
lintian --display-info --display-experimental --pedantic --tag-display-limit 0 \
    "$out/nbd-mc_${version}_all.deb" "$out"/python3-qemu.qmp_*_all.deb > "$out/lintian.txt" 2>&1 || true
echo "built: $(cd "$out" && ls -1 ./*.deb | tr '\n' ' ')"
echo "lintian ($out/lintian.txt):"
tags=$(grep -E "^[EWIPX]: " "$out/lintian.txt" | sort | uniq -c | sort -rn || true)
echo "${tags:-(no tags)}" | sed 's/^/  /'
grep -q "^E: " "$out/lintian.txt" && { echo "lintian found errors" >&2; exit 1; } || true
