# hint-router: `make demo` runs the demo stack, `make test` runs every test.
.PHONY: setup build demo up test test-e2e test-faults bench-routing bench-overhead bench-decision clean

CARGO ?= cargo

setup:
	scripts/setup.sh

## build: the filter (.wasm, release) and the runner, plus the demo/bench tools
build: setup
	$(CARGO) build --locked --release --target wasm32-wasip1 -p hint-router -p noop-filter
	$(CARGO) build --locked --release -p runner-example -p hint-router-e2e --bins

## demo: start 3 runners + Envoy, send a hinted workload, print where each request went, stop
demo: build
	RUST_LOG=warn ./target/release/demo

## up: start the stack and keep it running for manual curl (Ctrl-C stops it)
up: build
	scripts/up.sh

## test: fmt + clippy gates, unit tests, core tests inside wasm, end-to-end tests on a real Envoy
test:
	scripts/test.sh

## test-e2e: only the end-to-end tests (routing, then faults/abuse/security)
test-e2e: build
	$(CARGO) test --locked -p hint-router-e2e

## test-faults: the fault, abuse and security suites, printing what each scenario measured
test-faults: build
	$(CARGO) test --locked -p hint-router-e2e --test faults --test hostile --test runner_faults --test retries -- --nocapture

## bench-routing: hint-router vs Envoy's policies on a real Envoy, plus simulator and bounds
## (about 8 minutes; BENCH_ARGS=--quick for a smoke run; docs/bench-routing.md)
bench-routing: build
	$(CARGO) run --locked --release -p hint-router-bench-routing --bin bench-routing -- $(BENCH_ARGS)

## bench-overhead: Envoy CPU per request with no filter / a no-op wasm filter / hint-router
## (about 5 minutes; BENCH_ARGS=--quick for one rep; docs/bench-overhead.md)
bench-overhead: build
	$(CARGO) run --locked --release -p hint-router-bench-overhead --bin bench-overhead -- $(BENCH_ARGS)

## bench-decision: native micro-benchmarks of the decision and table refresh (criterion)
bench-decision:
	$(CARGO) bench --locked -p hint-router-bench-overhead

clean:
	$(CARGO) clean
	rm -rf .run
