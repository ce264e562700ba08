//! The simulated system's parameters.

use serde::{Deserialize, Serialize};

/// The simulated system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimParams {
    /// Number of runners.
    pub runners: usize,
    /// Models each runner's cache holds.
    pub capacity: usize,
    /// Inferences a runner runs at once.
    pub max_concurrency: u32,
    /// Load time of a model, microseconds.
    pub load_us: u64,
    /// Inference time, microseconds.
    pub infer_us: u64,
    /// The filter's poll interval, microseconds.
    pub poll_interval_us: u64,
    /// The filter learns hints from response headers.
    pub learn_from_responses: bool,
    /// Fixed time added to every request (proxy, network, timer granularity), microseconds.
    pub overhead_us: u64,
    /// Requests not answered within this are cancelled and count as errors, microseconds.
    pub timeout_us: u64,
    /// Requests in flight through the proxy beyond which new ones fail at once (Envoy's
    /// default circuit breakers: 1024 connections + 1024 pending).
    pub max_inflight: u32,
    /// `hash_balance_factor` of the bounded ring hash.
    pub hash_balance_factor: u32,
    /// Runner addresses (for the ring); empty: `127.0.0.1:18081...`.
    pub addrs: Vec<String>,
    /// Seed for the policies' own randomness.
    pub seed: u64,
    /// What-if (not what the filter does): right after routing a request whose hint the
    /// chosen runner does not list, list it there (as the runner soon will).
    #[serde(default)]
    pub what_if_optimistic_hints: bool,
    /// What-if (an oracle the filter does not have): requests waiting for a model load do not
    /// count towards a runner being busy.
    #[serde(default)]
    pub what_if_loading_not_busy: bool,
    /// Route with the filter's rules before `hint_router_core::router` (plain `rank` on all
    /// in-flight requests, no optimistic listing), for comparison. The what-ifs apply only
    /// with this set.
    #[serde(default)]
    pub plain_rank: bool,
    /// Models each runner keeps in host memory (`runner-example --host-cache-mb`, counted in
    /// models): every model loaded from disk is kept, resident ones included, least recently
    /// loaded out first; 0: no warm tier.
    #[serde(default)]
    pub host_cache: usize,
    /// Load time of a model from the warm tier, microseconds.
    #[serde(default)]
    pub warm_load_us: u64,
    /// What-if (the router before it read `warm`): polls report no warm lists.
    #[serde(default)]
    pub what_if_blind_to_warm: bool,
    /// Envoys in front of the runners, each with its own view, poll phases and in-flight
    /// counts; request `i` goes through proxy `i % proxies`. 0 counts as 1.
    #[serde(default = "one")]
    pub proxies: usize,
    /// What-if (an oracle no proxy has): with several proxies, each decision sees every
    /// runner's true in-flight count (all proxies' requests), not its own count rebased at
    /// its last poll.
    #[serde(default)]
    pub what_if_exact_in_flight: bool,
    /// What-if: with several proxies, every response's hints reach every proxy, not only
    /// the one that sent the request.
    #[serde(default)]
    pub what_if_shared_responses: bool,
    /// What-if: with several proxies, a miss's guess reaches every proxy at once.
    #[serde(default)]
    pub what_if_shared_guesses: bool,
    /// What-if: with several proxies, every proxy knows the models in use by the others'.
    #[serde(default)]
    pub what_if_shared_pins: bool,
    /// What-if (the runners before `x-hint-router-evict`): runners evict their least
    /// recently used model whatever the router asks.
    #[serde(default)]
    pub what_if_runner_lru: bool,
    /// Models differ in size: model `m` loads in `load_us x load_spread^x` with `x` spread
    /// evenly over [-1, 1] across the models (unrelated to popularity); 1: every model
    /// loads in `load_us`.
    #[serde(default = "one_f64")]
    pub load_spread: f64,
}

fn one_f64() -> f64 {
    1.0
}

fn one() -> usize {
    1
}

impl Default for SimParams {
    fn default() -> Self {
        SimParams {
            runners: 8,
            capacity: 3,
            max_concurrency: 4,
            load_us: 200_000,
            infer_us: 10_000,
            poll_interval_us: 500_000,
            learn_from_responses: true,
            overhead_us: 1_000,
            timeout_us: 10_000_000,
            max_inflight: 2048,
            hash_balance_factor: 150,
            addrs: Vec::new(),
            seed: 1,
            what_if_optimistic_hints: false,
            what_if_loading_not_busy: false,
            plain_rank: false,
            host_cache: 0,
            warm_load_us: 20_000,
            what_if_blind_to_warm: false,
            proxies: 1,
            what_if_exact_in_flight: false,
            what_if_shared_responses: false,
            what_if_shared_guesses: false,
            what_if_shared_pins: false,
            what_if_runner_lru: false,
            load_spread: 1.0,
        }
    }
}

impl SimParams {
    /// How long model `model` takes to load from disk ([`SimParams::load_spread`]).
    pub fn load_us_of(&self, model: u32) -> u64 {
        if self.load_spread <= 1.0 || !self.load_spread.is_finite() {
            return self.load_us;
        }
        // Golden-ratio steps spread the models evenly, whatever their popularity order.
        let x = 2.0 * (f64::from(model) * 0.618_033_988_749_895).fract() - 1.0;
        (self.load_us as f64 * self.load_spread.powf(x)).round() as u64
    }

    /// The runner addresses used (given, or synthetic).
    pub fn runner_addrs(&self) -> Vec<String> {
        if self.addrs.len() == self.runners {
            self.addrs.clone()
        } else {
            (0..self.runners).map(|i| format!("127.0.0.{}:{}", 1 + i / 50_000, 18081 + i % 50_000)).collect()
        }
    }
}
