#!/bin/sh
# setup-ha.sh VENV_PYTHON REPO
# Install nbd-mc's OCF resource agents as /usr/lib/ocf/resource.d/nbd-mc/{replica,protect,qemu}:
# tiny wrappers that exec this checkout's agents (ha/*.py) with the project's venv
# interpreter (the agents call the venv's nbd-mc).  Idempotent: a wrapper is only
# rewritten when its contents change.
set -eu
py=$1
repo=$2
dir=${OCF_ROOT:-/usr/lib/ocf}/resource.d/nbd-mc
if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
$SUDO mkdir -p "$dir"
for agent in replica protect qemu; do
    want="#!/bin/sh
# ocf:nbd-mc:$agent, installed by make setup (tools/setup-ha.sh) from $repo
exec $py $repo/ha/$agent.py \"\$@\""
    if [ ! -f "$dir/$agent" ] || [ "$(cat "$dir/$agent")" != "$want" ]; then
        printf '%s\n' "$want" | $SUDO tee "$dir/$agent.tmp" >/dev/null
        $SUDO chmod 755 "$dir/$agent.tmp"
        $SUDO mv "$dir/$agent.tmp" "$dir/$agent"
        echo "setup: installed ocf:nbd-mc:$agent ($dir/$agent)"
    fi
done
