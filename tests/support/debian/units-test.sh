#!/bin/sh
# The systemd units under a real systemd as PID 1 (tests/system/test_deb.py boots a
# Debian 12 tree with the nbd-mc package installed, `systemd-nspawn -b`, and this
# runs as nbd-mc-units-test.service).  It checks, with systemctl, start, readiness
# (Type=notify: `systemctl start` returns once the server answers), restart on
# failure (kill -9 of the main process) and stop of nbd-mc-serve@vm1 and
# nbd-mc-protect@vm1 (protecting a QEMU -machine none on the same node), writes
# "ok:"/"FAIL:" lines and a last "RESULT: pass|fail" to /root/units-test.log and
# powers the container off.
exec > /root/units-test.log 2>&1
set -u
fail() {
    echo "FAIL: $*"
    for u in nbd-mc-serve@vm1 nbd-mc-protect@vm1; do
        systemctl status --no-pager -l "$u"; journalctl --no-pager -u "$u" | tail -40
    done
    echo "RESULT: fail"; systemctl poweroff --no-block; exit 1
}
ok() { echo "ok: $*"; }
prop() { systemctl show -P "$2" "$1"; }
# wait_for WHAT COMMAND...: poll a condition; 600 s is a safety net, never a timing
wait_for() {
    what=$1; shift; n=0
    until "$@" >/dev/null 2>&1; do
        n=$((n + 1)); [ $n -gt 6000 ] && fail "no $what after 600 s"; sleep 0.1
    done
}
committed() { nbd-mc status --state-dir /srv/vm1/st --json 2>/dev/null \
              | python3 -c 'import json,sys; print(json.load(sys.stdin)["committed"])'; }
committed_above() { c=$(committed) && [ "$c" -gt "$1" ]; }
restarted() { [ "$(prop "$1" NRestarts)" = "$2" ] && [ "$(prop "$1" ActiveState)" = active ]; }

mkdir -p /srv/vm1 /etc/nbd-mc
truncate -s 16M /srv/vm1/vda.raw
dd if=/dev/urandom of=/srv/vm1/primary.raw bs=1M count=16 status=none
cat > /etc/nbd-mc/vm1.conf <<'CONF'
NBD_MC_STATE_DIR=/srv/vm1/st
NBD_MC_DISKS="vda=/srv/vm1/vda.raw"
NBD_MC_SERVE_ARGS="--durability process"
NBD_MC_VM="--qmp /run/vm1.qmp"
NBD_MC_DRIVES="--drive vda"
NBD_MC_TARGET=nbd+unix:///?socket=/srv/vm1/st/nbd.sock
NBD_MC_CONTROL=/srv/vm1/st/control.sock
NBD_MC_PROTECT_ARGS="--interval 200ms"
CONF

# --- nbd-mc-serve@vm1: start, readiness --------------------------------------------
systemctl start nbd-mc-serve@vm1 || fail "systemctl start nbd-mc-serve@vm1"
# Type=notify: start returned after READY=1, so the server answers now, no waiting
nbd-mc status --state-dir /srv/vm1/st --json | grep -q '"role": "secondary"' \
    || fail "serve does not answer once systemctl start returned"
[ "$(prop nbd-mc-serve@vm1 Type)" = notify ] || fail "serve unit is not Type=notify"
[ "$(prop nbd-mc-serve@vm1 ActiveState)" = active ] || fail "serve not active"
ok "serve: started, ready (answers when systemctl start returns), Type=notify"

# --- restart on failure -------------------------------------------------------------
pid=$(prop nbd-mc-serve@vm1 MainPID)
kill -9 "$pid"
wait_for "restart of nbd-mc-serve@vm1" restarted nbd-mc-serve@vm1 1
[ "$(prop nbd-mc-serve@vm1 MainPID)" != "$pid" ] || fail "serve: same MainPID after restart"
nbd-mc status --state-dir /srv/vm1/st >/dev/null || fail "serve does not answer after its restart"
ok "serve: kill -9 of MainPID $pid -> restarted (NRestarts=1), answers again"

# --- nbd-mc-protect@vm1 -------------------------------------------------------------
qemu-system-x86_64 -machine none -nodefaults -display none \
    -drive if=none,id=vda,file=/srv/vm1/primary.raw,format=raw \
    -qmp unix:/run/vm1.qmp,server=on,wait=off -pidfile /run/vm1-qemu.pid -daemonize \
    || fail "QEMU did not start"
systemctl start nbd-mc-protect@vm1 || fail "systemctl start nbd-mc-protect@vm1"
wait_for "commit by protect" committed_above 0
ok "protect: started, protects (committed epoch $(committed))"
pid=$(prop nbd-mc-protect@vm1 MainPID)
kill -9 "$pid"
wait_for "restart of nbd-mc-protect@vm1" restarted nbd-mc-protect@vm1 1
c=$(committed)
wait_for "commit after protect's restart" committed_above "$c"
ok "protect: kill -9 of MainPID $pid -> restarted (NRestarts=1), commits again (epoch $(committed))"

# --- stop ---------------------------------------------------------------------------
systemctl stop nbd-mc-protect@vm1 || fail "systemctl stop nbd-mc-protect@vm1"
[ "$(prop nbd-mc-protect@vm1 ActiveState)" = inactive ] && [ "$(prop nbd-mc-protect@vm1 Result)" = success ] \
    || fail "protect stop: $(prop nbd-mc-protect@vm1 ActiveState) $(prop nbd-mc-protect@vm1 Result)"
kill -0 "$(cat /run/vm1-qemu.pid)" || fail "stopping protect stopped the VM"
ok "protect: stopped cleanly (Result=success), the VM still runs"
systemctl stop nbd-mc-serve@vm1 || fail "systemctl stop nbd-mc-serve@vm1"
[ "$(prop nbd-mc-serve@vm1 ActiveState)" = inactive ] && [ "$(prop nbd-mc-serve@vm1 Result)" = success ] \
    || fail "serve stop: $(prop nbd-mc-serve@vm1 ActiveState) $(prop nbd-mc-serve@vm1 Result)"
nbd-mc status --state-dir /srv/vm1/st >/dev/null 2>&1 && fail "serve still answers after stop"
ok "serve: stopped cleanly (Result=success), nothing answers"
cmp /srv/vm1/primary.raw /srv/vm1/vda.raw || fail "the replica differs from the primary's disk"
ok "the replica holds the primary's disk byte for byte"
kill "$(cat /run/vm1-qemu.pid)"
echo "RESULT: pass"
systemctl poweroff --no-block
