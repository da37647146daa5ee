#!/bin/sh
# ocf-tester on the installed ocf:nbd-mc:replica (tests/system/test_deb.py runs this
# in the Debian 12 tree with the nbd-mc package installed): a replica that has
# committed an epoch, then every action ocf-tester tries, promote included.
set -eu
rm -rf /srv/ocf && mkdir -p /srv/ocf && truncate -s 8M /srv/ocf/vda.raw
nbd-mc serve vda=/srv/ocf/vda.raw --state-dir /srv/ocf/st
nbd-mc commit 1 --state-dir /srv/ocf/st
nbd-mc stop --state-dir /srv/ocf/st
ocf-tester -n nbdmc-replica -o disks=vda=/srv/ocf/vda.raw -o state_dir=/srv/ocf/st \
    /usr/lib/ocf/resource.d/nbd-mc/replica
# ocf-tester promoted it (failover to epoch 1) and stopped it
nbd-mc inspect /srv/ocf/st --json | python3 -c '
import json, sys
i = json.load(sys.stdin)
assert i["role"] == "primary" and i["committed"] == 1 and i["valid"] and not i["server_running"], i
print("inspect after ocf-tester: role primary, committed 1, valid, not running")'
