#!/usr/bin/env bash
# The whole test suite (`make test`, called by .ci/run): style and lint gates, unit tests,
# the core's unit tests inside a wasm runtime, and end-to-end tests against a real Envoy 1.40
# with real runner processes.
set -euo pipefail
cd "$(dirname "$0")/.."

step() {
  local name=$1; shift
  printf '\n==> %s: %s\n' "$name" "$*"
  local t0=$SECONDS
  "$@"
  printf '<== %s ok (%ss)\n' "$name" $((SECONDS - t0))
}

scripts/setup.sh --test
step "format" cargo fmt --all --check
step "clippy native" cargo clippy --locked --workspace --all-targets -- -D warnings
step "clippy wasm32-wasip1" cargo clippy --locked --target wasm32-wasip1 -p hint-router -p hint-router-core -p noop-filter -- -D warnings
step "build the runner's CUDA backend (no GPU or toolkit needed to compile)" \
  cargo build --locked -p runner-example --features cuda --bins
step "clippy runner --features cuda" cargo clippy --locked -p runner-example --all-targets --features cuda -- -D warnings
step "build (release: filter .wasm, runner, demo)" make --no-print-directory build
log=$(mktemp)
trap 'rm -f "$log"' EXIT
step "unit + end-to-end tests" bash -o pipefail -c 'cargo test --locked --workspace 2>&1 | tee -a "$0"' "$log"
step "runner kit (Python) unit tests" .venv/bin/python -m unittest tests/fal/test_kit_queue.py
step "core unit tests inside wasm (wasm-bindgen-test on Node)" \
  bash -o pipefail -c 'cargo test --locked -p hint-router-core --lib --target wasm32-unknown-unknown 2>&1 | tee -a "$0"' "$log"
printf '\nall checks passed\n'
# One closing line for the whole suite, summed over every test binary above.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "hint-router: %d passed, %d failed\n", p, f }' "$log"
