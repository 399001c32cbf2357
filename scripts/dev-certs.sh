#!/usr/bin/env bash
# Make a development CA and certificates for a TLS / mutual-TLS shardps cluster (not for production):
#   scripts/dev-certs.sh DIR [NAME ...]
# writes DIR/ca.pem, DIR/server.pem + server-key.pem (valid for localhost, 127.0.0.1 and every NAME:
# host names or IP addresses the roles are reached at, e.g. coordinator server-0 server-1) and
# DIR/client.pem + client-key.pem (for mutual TLS). Roles use them through SHARDPS_TLS_CERT,
# SHARDPS_TLS_KEY and SHARDPS_TLS_CA (see README). Needs openssl.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DIR [NAME ...]" >&2; exit 2; }
dir=$1; shift
command -v openssl >/dev/null || { echo "error: openssl is missing (apt-get install -y openssl)" >&2; exit 1; }
mkdir -p "$dir"
san="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ ]]; then san="$san,IP:$name"; else san="$san,DNS:$name"; fi
done
days=825
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" -days "$days" \
  -subj "/CN=shardps development CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
issue() {  # name, common name, extended key usage, subject alternative names
  openssl req -newkey rsa:2048 -nodes -keyout "$dir/$1-key.pem" -out "$dir/$1.csr" -subj "/CN=$2" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n%s' \
    "$3" "${4:+subjectAltName=$4}" > "$dir/$1.ext"
  openssl x509 -req -in "$dir/$1.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" -CAcreateserial \
    -out "$dir/$1.pem" -days "$days" -extfile "$dir/$1.ext" 2>/dev/null
  rm -f "$dir/$1.csr" "$dir/$1.ext"
}
# Roles also dial each other (servers -> coordinator and back), so the server certificate is a client one too.
issue server "shardps server" "serverAuth,clientAuth" "$san"
issue client "shardps client" "clientAuth" ""
chmod 600 "$dir"/*-key.pem
echo "wrote $dir/ca.pem, server.pem, server-key.pem, client.pem, client-key.pem (server valid for $san)"
