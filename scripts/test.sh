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
step "unit + end-to-end tests" cargo test --locked --workspace
step "core unit tests inside wasm (wasm-bindgen-test on Node)" \
  cargo test --locked -p hint-router-core --target wasm32-unknown-unknown
printf '\nall checks passed\n'
