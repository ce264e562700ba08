//! Pure logic of hint-router, free of any proxy-wasm call.
//!
//! Everything the filter decides is computed here, so that it is unit-tested natively and,
//! compiled for `wasm32-unknown-unknown`, inside a wasm runtime (`wasm-bindgen-test`):
//!
//! * [`addr`]: runner addresses in one canonical spelling.
//! * [`config`]: the plugin's JSON configuration, validated with errors that name the field.
//! * [`hint`]: classification of the client's hint header value and parsing of a runner's
//!   `x-fal-runner-hints` header.
//! * [`wire`]: the `/hints` JSON document served by runners (shared with `runner-example`).
//! * [`report`]: the poller's bounded, one-pass reading of a runner's `/hints` body.
//! * [`table`]: the runner table the poller publishes, and the indexed [`table::View`] each
//!   worker routes with.
//! * [`rank`]: the routing decision: an ordered candidate list.
//! * [`router`]: one decision as a worker makes it (rank, busy rule, eviction-aware miss
//!   placement, optimistic miss listing, the `when_holders_busy` modes).
//! * [`popularity`]: a fixed-size sketch of how often each hint is requested (with the
//!   private `placement` and `learned` modules: eviction victims, learned times).
//! * [`members`]: the runners cluster's hosts and health, from Envoy's admin API.
//! * [`poller`]: the per-runner poll state machine run by the singleton service.
//! * [`queue`]: fal's queue: runner tokens, request ids, and queue listener paths.
//! * [`inflight`]: the cross-worker in-flight counters' byte encoding.
//!
//! No function here panics on any input; clippy denies `unwrap`, `expect`, `panic` and
//! slice indexing outside tests.
#![deny(clippy::indexing_slicing)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod addr;
pub mod config;
#[cfg(test)]
mod convergence;
pub mod hint;
pub mod inflight;
mod learned;
pub mod members;
mod placement;
pub mod poller;
pub mod popularity;
pub mod queue;
pub mod rank;
mod rent;
pub mod report;
pub mod router;
pub mod table;
pub mod wire;
