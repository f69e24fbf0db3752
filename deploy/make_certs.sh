#!/usr/bin/env bash
# Make a private CA and a SuperLink TLS certificate for one host name or IP address.
# Usage: deploy/make_certs.sh HOST [OUT_DIR]
#   HOST     the name or IP address the SuperNodes and `flwr` use to reach the SuperLink (e.g. 10.0.0.5, link.lan)
#   OUT_DIR  where to write ca.crt (give it to every SuperNode and to flwr), server.pem and server.key (SuperLink
#            only; keep server.key and ca.key private). Default: certificates/
set -euo pipefail
host=${1:?usage: deploy/make_certs.sh HOST [OUT_DIR]}
out=${2:-certificates}
mkdir -p "$out"
if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san="IP:$host"; else san="DNS:$host"; fi
[[ $host == 127.0.0.1 || $host == localhost ]] && san="IP:127.0.0.1,DNS:localhost"
openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
openssl req -x509 -new -key "$out/ca.key" -sha256 -days 825 -subj "/CN=Federated YOLO CA" -out "$out/ca.crt"
openssl genrsa -out "$out/server.key" 4096 2>/dev/null
openssl req -new -key "$out/server.key" -subj "/CN=$host" -out "$out/server.csr"
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" \
  "$san" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days 825 -sha256 \
  -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 600 "$out/ca.key" "$out/server.key"
echo "wrote $out/ca.crt, $out/server.pem, $out/server.key (for $san)"
