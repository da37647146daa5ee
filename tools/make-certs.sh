#!/bin/sh
# make-certs.sh [--force] DIR [NAME...]
#
# Create an x509 directory that nbdkit (--tls-certificates DIR), QEMU
# (tls-creds-x509,dir=DIR) and nbd-mc's control channel (TlsFiles(DIR)) all
# accept: ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
# client-key.pem, plus ca-key.pem so more certificates can be signed later.
#
# The server certificate names localhost, 127.0.0.1, ::1, this host's name and
# every NAME given (an IP address or a DNS name), because the client checks the
# name it dialled against it. Files that already exist are kept, so running it
# twice changes nothing (--force starts over with a new CA). This is for test
# and lab setups: in production the CA key belongs on neither host.
set -eu

force=no
if [ "${1:-}" = "--force" ]; then force=yes; shift; fi
if [ $# -lt 1 ] || [ -z "$1" ]; then
    echo "usage: $0 [--force] DIR [NAME...]" >&2
    exit 2
fi
dir=$1; shift
command -v certtool >/dev/null || { echo "$0: certtool not found (apt-get install gnutls-bin)" >&2; exit 1; }

umask 077
mkdir -p "$dir"
if [ "$force" = yes ]; then
    rm -f "$dir"/ca-key.pem "$dir"/ca-cert.pem "$dir"/server-key.pem \
          "$dir"/server-cert.pem "$dir"/client-key.pem "$dir"/client-cert.pem
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

is_ip() {
    case $1 in
        *:*) return 0 ;;                               # IPv6
        *[!0-9.]*) return 1 ;;
        *.*.*.*) return 0 ;;
        *) return 1 ;;
    esac
}

key() {  # key FILE: a private key, only if missing (a new key invalidates its cert)
    [ -s "$1" ] && return 0
    certtool --generate-privkey --key-type=rsa --bits=2048 --outfile "$1" 2>/dev/null
    chmod 600 "$1"
}

# A certificate is rebuilt when it or its key is missing, or when its CA was
# rebuilt: "renew" tracks that.
renew=no

if [ ! -s "$dir/ca-key.pem" ] || [ ! -s "$dir/ca-cert.pem" ]; then
    rm -f "$dir/ca-key.pem"
    key "$dir/ca-key.pem"
    cat > "$tmp/ca.info" <<INFO
cn = nbd-mc test CA $(date +%s)-$$
ca
cert_signing_key
expiration_days = 3650
INFO
    certtool --generate-self-signed --load-privkey "$dir/ca-key.pem" \
        --template "$tmp/ca.info" --outfile "$dir/ca-cert.pem" 2>/dev/null
    renew=yes
fi

# leaf ROLE PURPOSE EXTRA-TEMPLATE-LINES
leaf() {
    role=$1 purpose=$2 extra=$3
    if [ "$renew" = no ] && [ -s "$dir/$role-key.pem" ] && [ -s "$dir/$role-cert.pem" ]; then
        return 0
    fi
    rm -f "$dir/$role-key.pem"
    key "$dir/$role-key.pem"
    {
        echo "cn = nbd-mc $role"
        echo "$purpose"
        echo "signing_key"
        echo "encryption_key"
        echo "expiration_days = 3650"
        printf '%s' "$extra"
    } > "$tmp/$role.info"
    certtool --generate-certificate --load-privkey "$dir/$role-key.pem" \
        --load-ca-certificate "$dir/ca-cert.pem" --load-ca-privkey "$dir/ca-key.pem" \
        --template "$tmp/$role.info" --outfile "$dir/$role-cert.pem" 2>/dev/null
}

names=""
for n in localhost 127.0.0.1 ::1 "$(hostname 2>/dev/null || true)" "$@"; do
    [ -n "$n" ] || continue
    if is_ip "$n"; then names="${names}ip_address = $n
"
    else names="${names}dns_name = $n
"
    fi
done

leaf server tls_www_server "$names"
leaf client tls_www_client ""
chmod 644 "$dir/ca-cert.pem" "$dir/server-cert.pem" "$dir/client-cert.pem"
