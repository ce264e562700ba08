//! `runner-example`: the companion model runner of hint-router.
//!
//! A runner serves inference for many models from a bounded cache, and tells routers which
//! models it holds, so hint-router can send each request (`x-fal-runner-hint: MODEL`) to a
//! runner that already has its model in memory.
//!
//! * [`backend`]: the [`Backend`](backend::Backend) / [`LoadedModel`](backend::LoadedModel)
//!   traits a model backend implements, and the simulated [`SimBackend`](backend::SimBackend).
//! * [`models`]: the model files (safetensors weights of a small MLP, and their manifest),
//!   and making them (`make-models`); [`mlp`]: the network and its reference forward pass;
//!   [`weights`]: reading a model file into memory, checked, near page-cache speed;
//!   [`warm`]: the host-memory tier of verified weights behind a device (`--host-cache-mb`).
//! * [`cpu`]: the `cpu` backend, weights in host memory; `cuda` (cargo feature `cuda`): the
//!   `cuda` backend, weights in GPU memory, inference with cuBLAS.
//! * [`bench`](mod@bench): the `backend-bench` measurements.
//! * [`cache`]: the bounded, pinning, single-flight LRU [`ModelCache`](cache::ModelCache).
//! * [`runner`]: the [`Runner`](runner::Runner): cache, inference concurrency limit,
//!   in-flight count, draining, and the `/hints` report.
//! * [`http`]: the HTTP API as an axum [`Router`](axum::Router).
//! * [`queue`]: fal's queue, runner-owned: the jobs submitted here, their status and results.
//! * [`server`]: serving on a socket with graceful draining, and the program's [`run`](server::run).
//! * [`cli`]: the command-line options.
//!
//! Serving a runner in-process (as the tests do):
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::{sync::Arc, time::Duration};
//! use runner_example::{backend::SimBackend, runner::{Runner, RunnerConfig}, server::serve};
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let backend = Arc::new(SimBackend::new(Duration::from_millis(2000), Duration::from_millis(50)));
//! let runner = Runner::new(RunnerConfig::new(addr.to_string()), backend);
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(serve(listener, runner, async { let _ = stopped.await; }, Duration::from_secs(30)));
//! // ... send requests to `addr` ...
//! let _ = stop.send(());
//! let _drained = server.await;
//! # Ok(())
//! # }
//! ```
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]
// The CUDA backend calls cuBLAS, which cannot be done without `unsafe`; everything else is
// safe code.
#![cfg_attr(not(feature = "cuda"), forbid(unsafe_code))]
#![cfg_attr(feature = "cuda", deny(unsafe_code))]
#![warn(missing_docs)]

pub mod backend;
pub mod bench;
pub mod cache;
pub mod cli;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod http;
pub mod mlp;
pub mod models;
pub mod queue;
pub mod runner;
pub mod server;
pub mod warm;
pub mod weights;

#[cfg(test)]
mod testing;
