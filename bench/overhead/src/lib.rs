//! What hint-router costs Envoy.
//!
//! * `bench-overhead` (binary, `src/bin/bench-overhead.rs`): Envoy with one worker in front of a
//!   fast in-process upstream, driven by `wrk` (saturation) and by the open-loop generator in
//!   [`loadgen`] (latency at a fixed rate), for (a) no wasm filter, (b) the no-op wasm filter,
//!   (c) hint-router with 8 runners and (d) hint-router with 1,000 runners.
//! * `cargo bench -p hint-router-bench-overhead` (`benches/decision.rs`): criterion
//!   micro-benchmarks of the decision path and of a table refresh, plus the native memory
//!   estimate of [`memory`].
//!
//! See `docs/bench-overhead.md`.

pub mod alloc;
pub mod envoy;
pub mod fixture;
pub mod loadgen;
pub mod memory;
pub mod proc;
pub mod stats;
pub mod upstream;
