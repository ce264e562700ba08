//! Routing-quality benchmark of hint-router against Envoy's own load-balancing policies and
//! the optimum (see `docs/bench-routing.md`).
//!
//! * [`workload`]: open-loop Poisson traces with Zipf or uniform model popularity.
//! * [`bounds`]: Belady's optimal and LRU hit rates on one pooled cache.
//! * [`sim`]: a deterministic discrete-event simulator of runners and policies, routing with
//!   the filter's own [`hint_router_core::rank::rank`].
//! * [`envoy_lb`]: Envoy's policies, ported for the simulator.
//! * [`real`]: the same traces through a real Envoy and real runner processes.
//! * [`report`], [`plot`]: summaries, tables, JSON and SVG.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod bench;
pub mod bounds;
pub mod envoy_lb;
pub mod plot;
pub mod real;
pub mod report;
pub mod rng;
pub mod sim;
pub mod workload;
