#!/usr/bin/env bash
# Writes a self-signed DEVELOPMENT certificate for Envoy's HTTPS listener (127.0.0.1:10443,
# fal_client's door) to target/dev-tls/{cert,key}.pem, valid for 127.0.0.1 and localhost,
# unless both files already exist. Clients trust it with SSL_CERT_FILE=target/dev-tls/cert.pem.
# Never use it beyond loopback: for a real certificate, point the listener's
# `certificate_chain` and `private_key` filenames in envoy/envoy.yaml at your own files.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/dev-tls
if [[ -s $dir/cert.pem && -s $dir/key.pem ]]; then
  exit 0
fi
mkdir -p "$dir"
tmp=$(mktemp -d "$dir/.new.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
openssl req -x509 -newkey rsa:2048 -nodes -days 825 -sha256 \
  -subj "/CN=hint-router development certificate" \
  -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
  -keyout "$tmp/key.pem" -out "$tmp/cert.pem" 2>/dev/null
chmod 600 "$tmp/key.pem"
# Renamed into place, so a concurrent reader never sees half a file.
mv "$tmp/key.pem" "$dir/key.pem"
mv "$tmp/cert.pem" "$dir/cert.pem"
printf 'setup: wrote a self-signed development certificate to %s/cert.pem (127.0.0.1, localhost)\n' "$dir"
