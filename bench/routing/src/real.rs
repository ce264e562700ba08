//! The same traces through a real Envoy and real `runner-example` processes on 127.0.0.1.
//!
//! For one point every policy gets its own stack (its own runners and its own Envoy, rendered
//! from the shipped `envoy/envoy.yaml` by the e2e harness) and all stacks are fed the same
//! trace at the same time, so that machine noise hits every policy alike. Requests are sent
//! open loop at their scheduled times; latency counts from the scheduled time.

mod config;
mod request;
mod runner;

pub use config::config_edits;
pub use request::{Drive, QUEUE_APP};
pub use runner::BenchRunner;

use crate::report::{Quantiles, Record};
use crate::sim::Policy;
use crate::workload::{model_name, Trace};
use anyhow::{anyhow, bail, Context, Result};
use hint_router_e2e::{Envoy, EnvoyOptions};
use request::{one_queue_request, one_request, queue_tokens, Sent};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Which of Envoy's doors a stack's requests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Door {
    /// `POST /` on the public listener: the answer is the inference's.
    #[default]
    Blocking,
    /// fal's queue on the queue listener: submit, poll the status until COMPLETED, fetch the
    /// result (docs/queue.md).
    Queue,
}

impl Door {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Door::Blocking => "blocking",
            Door::Queue => "queue",
        }
    }
}

/// One policy's stack: its runners and the Envoys in front of them (one, or several all
/// configured alike, as behind an L4 balancer).
pub struct Stack {
    /// Which policy.
    pub policy: Policy,
    /// Which door the trace goes through.
    pub door: Door,
    // Envoys first: dropped (killed) before the runners.
    envoys: Vec<Envoy>,
    runners: Vec<BenchRunner>,
}

/// Which of `envoys` Envoys request `i` of a trace goes to: they take turns, the way an L4
/// balancer alternates connections.
pub fn envoy_for(i: usize, envoys: usize) -> usize {
    i % envoys.max(1)
}

impl Stack {
    /// Starts `n` runners and `envoys` Envoys in front of all of them, each configured for
    /// `policy` alike (each with its own ports and base id); the trace will go through `door`.
    pub fn start(
        policy: Policy,
        door: Door,
        envoys: usize,
        n: usize,
        runner_args: &[String],
        envoy_concurrency: u32,
        hash_balance_factor: u32,
    ) -> Result<Stack> {
        if door == Door::Queue && !policy.is_hint() {
            bail!("the queue door needs the hint-router filter (policy {policy} has none there)");
        }
        if envoys == 0 {
            bail!("a stack needs at least one Envoy");
        }
        let runners = (0..n).map(|_| BenchRunner::start(runner_args)).collect::<Result<Vec<_>>>()?;
        let addrs: Vec<String> = runners.iter().map(|r| r.addr.clone()).collect();
        let opts = EnvoyOptions::default();
        let shipped_path = hint_router_e2e::repo_root().join(&opts.config_file);
        let shipped = std::fs::read_to_string(&shipped_path)
            .with_context(|| format!("reading {}", shipped_path.display()))?;
        let opts = EnvoyOptions {
            concurrency: envoy_concurrency,
            replace: config_edits(&shipped, policy, hash_balance_factor)?,
            ..opts
        };
        let expect = if policy.is_hint() { n as u64 } else { 0 };
        // Declared after the runners: on an error the Envoys already started go first.
        let mut started = Vec::with_capacity(envoys);
        for k in 0..envoys {
            // The harness panics (with Envoy's log) when Envoy does not come up; turn that
            // into an error so what is already started is dropped in order.
            let envoy = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                Envoy::start(&addrs, &opts, expect)
            }))
            .map_err(|_| {
                anyhow!("envoy {} of {envoys} for policy {policy} did not start (see its log above)", k + 1)
            })?;
            started.push(envoy);
        }
        Ok(Stack { policy, door, envoys: started, runners })
    }

    /// `policy`, ` (queue)` for the queue door, and ` xN Envoys` for several.
    pub fn label(&self) -> String {
        let mut s = self.policy.to_string();
        if self.door == Door::Queue {
            s.push_str(" (queue)");
        }
        if self.envoys.len() > 1 {
            s.push_str(&format!(" x{} Envoys", self.envoys.len()));
        }
        s
    }

    /// How many Envoys stand in front of the runners.
    pub fn envoys(&self) -> usize {
        self.envoys.len()
    }

    /// The runners' addresses, in config order.
    pub fn addrs(&self) -> Vec<String> {
        self.runners.iter().map(|r| r.addr.clone()).collect()
    }

    /// Loads started on all runners so far.
    pub fn loads(&self) -> u64 {
        self.runners.iter().map(BenchRunner::loads).sum()
    }

    /// Each Envoy's URL for the stack's door: the public listener (blocking), or the queue
    /// listener's base URL (plain HTTP in the bench, no trailing slash).
    pub fn door_urls(&self) -> Vec<String> {
        self.envoys
            .iter()
            .map(|e| match self.door {
                Door::Blocking => e.url(),
                Door::Queue => format!("http://127.0.0.1:{}", e.queue_port),
            })
            .collect()
    }

    /// Each Envoy's admin base URL, no trailing slash.
    pub fn admin_bases(&self) -> Vec<String> {
        self.envoys.iter().map(|e| format!("http://127.0.0.1:{}", e.admin)).collect()
    }

    /// Each Envoy's scratch directory (config and log).
    pub fn dirs(&self) -> Vec<&Path> {
        self.envoys.iter().map(|e| e.dir.as_path()).collect()
    }
}

/// What one stack did with the trace.
#[derive(Debug, Clone)]
pub struct RealRun {
    /// One record per request of the trace.
    pub records: Vec<Record>,
    /// Loads started during the measured window.
    pub loads_in_window: u64,
    /// Requests sent per second over the measured window.
    pub achieved_rps: f64,
    /// 99th percentile of the send lag (actual - scheduled), ms.
    pub send_lag_p99_ms: f64,
    /// The filter's counters (`wasmcustom.hint_router.*`, the prefix dropped) over the
    /// measured window; empty without the filter.
    pub filter_counters: BTreeMap<String, u64>,
    /// Queue door: status polls per measured request (mean).
    pub polls_per_request: Option<f64>,
}

/// The filter's counters of one Envoy (`wasmcustom.hint_router.*`, the prefix dropped).
async fn filter_counters(client: &reqwest::Client, admin: &str) -> BTreeMap<String, u64> {
    let prefix = "wasmcustom.hint_router.";
    let url = format!("{admin}/stats?filter=^wasmcustom\\.hint_router\\.");
    let Ok(resp) = client.get(url).send().await else { return BTreeMap::new() };
    let Ok(text) = resp.text().await else { return BTreeMap::new() };
    text.lines()
        .filter_map(|l| {
            let (name, v) = l.split_once(": ")?;
            Some((name.strip_prefix(prefix)?.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Every stack's filter counters.
type Counters = Vec<BTreeMap<String, u64>>;

/// Counters of several Envoys added up, name by name (gauges too: e.g. `runners_available`
/// becomes the sum of every Envoy's view).
fn sum_counters(maps: impl IntoIterator<Item = BTreeMap<String, u64>>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for m in maps {
        for (name, v) in m {
            let total: &mut u64 = out.entry(name).or_default();
            *total = total.saturating_add(v);
        }
    }
    out
}

/// Every stack's filter counters, summed over its Envoys (`admins`: each stack's Envoys'
/// admin URLs, empty without the filter).
async fn all_counters(client: reqwest::Client, admins: Vec<Vec<String>>) -> Counters {
    let mut out = Vec::with_capacity(admins.len());
    for stack in &admins {
        let mut each = Vec::with_capacity(stack.len());
        for a in stack {
            each.push(filter_counters(&client, a).await);
        }
        out.push(sum_counters(each));
    }
    out
}

/// Sends `trace` to every stack at once (each request at its scheduled time to all of them,
/// through each stack's door; request `i` to Envoy [`envoy_for`]`(i, N)` of a stack of `N`)
/// and waits for all answers (each bounded by `drive.timeout`).
pub async fn run_trace(stacks: &[Stack], trace: &Trace, drive: Drive) -> Result<Vec<RealRun>> {
    let client = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let names: Vec<String> = (0..trace.spec.models as u32).map(model_name).collect();
    let mut targets = Vec::with_capacity(stacks.len());
    for s in stacks {
        let addrs = s.addrs();
        let tokens = match s.door {
            Door::Queue => queue_tokens(&client, &addrs).await,
            Door::Blocking => Vec::new(),
        };
        targets.push((s.door, s.door_urls(), Arc::new(addrs), Arc::new(tokens)));
    }
    let n = trace.reqs.len();
    let mut handles: Vec<Vec<tokio::task::JoinHandle<Sent>>> =
        targets.iter().map(|_| Vec::with_capacity(n)).collect();
    let start = Instant::now() + Duration::from_millis(50);
    let w0 = start + Duration::from_micros(trace.spec.warmup_us);
    let w1 = w0 + Duration::from_micros(trace.spec.measure_us);
    let admins: Vec<Vec<String>> =
        stacks.iter().map(|s| if s.policy.is_hint() { s.admin_bases() } else { Vec::new() }).collect();
    // Read in a task of its own, not to delay the sends.
    let mut at_w0: Option<(Vec<u64>, tokio::task::JoinHandle<Counters>)> = None;
    for (i, req) in trace.reqs.iter().enumerate() {
        let sched = start + Duration::from_micros(req.at_us);
        if at_w0.is_none() && sched >= w0 {
            tokio::time::sleep_until(w0).await;
            let loads = stacks.iter().map(Stack::loads).collect();
            at_w0 = Some((loads, tokio::spawn(all_counters(client.clone(), admins.clone()))));
        }
        tokio::time::sleep_until(sched).await;
        let model = names.get(req.model as usize).cloned().unwrap_or_default();
        for ((door, urls, addrs, tokens), hs) in targets.iter().zip(handles.iter_mut()) {
            let url = urls.get(envoy_for(i, urls.len())).cloned().unwrap_or_default();
            let (client, model, addrs) = (client.clone(), model.clone(), Arc::clone(addrs));
            hs.push(match door {
                Door::Blocking => tokio::spawn(one_request(client, url, model, sched, drive.timeout, addrs)),
                Door::Queue => tokio::spawn(one_queue_request(
                    client,
                    url,
                    model,
                    sched,
                    drive,
                    addrs,
                    Arc::clone(tokens),
                )),
            });
        }
    }
    tokio::time::sleep_until(w1).await;
    let l1: Vec<u64> = stacks.iter().map(Stack::loads).collect();
    let c1 = tokio::spawn(all_counters(client.clone(), admins));
    let (l0, c0) = match at_w0 {
        Some((loads, counters)) => (loads, counters.await.context("reading the filter counters")?),
        None => (vec![0; stacks.len()], vec![BTreeMap::new(); stacks.len()]),
    };
    let c1 = c1.await.context("reading the filter counters")?;
    let secs = trace.spec.measure_us as f64 / 1e6;
    let mut runs = Vec::with_capacity(stacks.len());
    for (k, (hs, (door, ..))) in handles.into_iter().zip(&targets).enumerate() {
        let mut records = Vec::with_capacity(n);
        let mut lags = Vec::with_capacity(n);
        let (mut sent_in_window, mut polls) = (0u64, 0u64);
        for (i, h) in hs.into_iter().enumerate() {
            let sent = h.await.context("request task failed")?;
            if i >= trace.first_measured {
                lags.push(sent.lag_us);
                sent_in_window += 1;
                polls += sent.polls;
            }
            records.push(sent.rec);
        }
        let before = c0.get(k).cloned().unwrap_or_default();
        let filter_counters = c1
            .get(k)
            .map(|m| {
                m.iter()
                    .map(|(name, v)| (name.clone(), v.saturating_sub(before.get(name).copied().unwrap_or(0))))
                    .collect()
            })
            .unwrap_or_default();
        runs.push(RealRun {
            records,
            loads_in_window: l1.get(k).copied().unwrap_or(0).saturating_sub(l0.get(k).copied().unwrap_or(0)),
            achieved_rps: sent_in_window as f64 / secs,
            send_lag_p99_ms: Quantiles::of(lags.iter().copied()).get(0.99) as f64 / 1000.0,
            filter_counters,
            polls_per_request: (*door == Door::Queue).then(|| polls as f64 / sent_in_window.max(1) as f64),
        });
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_take_turns_over_the_envoys() {
        let two: Vec<usize> = (0..6).map(|i| envoy_for(i, 2)).collect();
        assert_eq!(two, [0, 1, 0, 1, 0, 1]);
        let three: Vec<usize> = (0..5).map(|i| envoy_for(i, 3)).collect();
        assert_eq!(three, [0, 1, 2, 0, 1]);
        assert!((0..5).all(|i| envoy_for(i, 1) == 0));
        // No Envoy: never out of range of a one-element list either.
        assert_eq!(envoy_for(7, 0), 0);
    }

    #[test]
    fn counters_add_up_over_envoys() {
        let m = |pairs: &[(&str, u64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let sum = sum_counters([m(&[("hit", 3), ("miss", 1)]), m(&[("hit", 4), ("busy_fallback", 2)])]);
        assert_eq!(sum, m(&[("hit", 7), ("miss", 1), ("busy_fallback", 2)]));
        assert!(sum_counters(Vec::new()).is_empty());
        assert_eq!(sum_counters([m(&[("hit", u64::MAX)]), m(&[("hit", 1)])]), m(&[("hit", u64::MAX)]));
    }
}
