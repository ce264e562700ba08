//! `simulate`: the deterministic simulator at any scale (virtual time, no processes).
//!
//! ```sh
//! cargo run --release -p hint-router-bench-routing --bin simulate -- --runners 1000 --models 10000
//! ```

use anyhow::{bail, Context, Result};
use clap::Parser;
use hint_router_bench_routing::bench::{
    bounds, heading, parse_points, parse_policies, sim_point, table, Cluster, PointResult, PolicyResult,
};
use hint_router_bench_routing::sim::{Policy, SimParams};
use hint_router_bench_routing::workload::{Trace, TraceSpec};
use std::path::PathBuf;
use std::time::Instant;

/// Simulates hint-router and Envoy's policies on runner-example-like runners, in virtual time.
#[derive(Debug, Parser)]
#[command(name = "simulate")]
struct Args {
    /// Runners.
    #[arg(long, default_value_t = 8)]
    runners: usize,
    /// Models each runner's cache holds.
    #[arg(long, default_value_t = 3)]
    capacity: usize,
    /// Inferences a runner runs at once.
    #[arg(long, default_value_t = 4)]
    max_concurrency: u32,
    /// Distinct models (hints).
    #[arg(long, default_value_t = 100)]
    models: usize,
    /// Model load time, ms.
    #[arg(long, default_value_t = 200.0)]
    load_ms: f64,
    /// Inference time, ms.
    #[arg(long, default_value_t = 10.0)]
    infer_ms: f64,
    /// Fixed time added to every request (proxy and network), ms.
    #[arg(long, default_value_t = 1.0)]
    overhead_ms: f64,
    /// The filter's poll interval, ms.
    #[arg(long, default_value_t = 500.0)]
    poll_ms: f64,
    /// Do not learn hints from response headers (polls only).
    #[arg(long)]
    no_response_hints: bool,
    /// What-if: the filter lists a hint on the chosen runner as soon as it routes a miss there.
    #[arg(long)]
    what_if_optimistic_hints: bool,
    /// What-if (oracle): requests waiting for a model load do not make a runner busy.
    #[arg(long)]
    what_if_loading_not_busy: bool,
    /// Route with plain `rank` as the filter did before its busy and miss-listing rules
    /// (`hint_router_core::router`); the what-ifs apply only with this.
    #[arg(long)]
    plain_rank: bool,
    /// Models each runner keeps in host memory (its warm tier, `runner-example
    /// --host-cache-mb` in models, resident ones included); 0: none. With a tier, each point
    /// also runs the hint policies with a router blind to `warm` lists, side by side.
    #[arg(long, default_value_t = 0)]
    host_cache: usize,
    /// Load time from the warm tier, ms.
    #[arg(long, default_value_t = 20.0)]
    warm_load_ms: f64,
    /// Also run each point's hint policies with this many Envoys in front of the same
    /// runners (each its own view, poll phases and in-flight counts; requests alternate
    /// between them), side by side with one Envoy carrying the same trace.
    #[arg(long, default_value_t = 1)]
    proxies: usize,
    /// What-if (oracle), with --proxies: every decision sees every runner's true in-flight
    /// count.
    #[arg(long)]
    what_if_exact_in_flight: bool,
    /// What-if, with --proxies: every response's hints reach every proxy.
    #[arg(long)]
    what_if_shared_responses: bool,
    /// What-if, with --proxies: a miss's guess reaches every proxy at once.
    #[arg(long)]
    what_if_shared_guesses: bool,
    /// What-if, with --proxies: pins are shared.
    #[arg(long)]
    what_if_shared_pins: bool,
    /// What-if: runners ignore `x-hint-router-evict` and evict their least recently used
    /// model (as before the router chose victims).
    #[arg(long)]
    what_if_runner_lru: bool,
    /// Models differ in size: their load times spread evenly (log scale) over
    /// [load-ms / F, load-ms x F], unrelated to popularity; 1: all load in --load-ms.
    #[arg(long, default_value_t = 1.0)]
    load_spread: f64,
    /// Points: `all`, `default`, or a list like `zipf1.0@60,uniform@30`.
    #[arg(long, default_value = "all")]
    points: String,
    /// Policies: `all` or a list like `hint,ring_hash_bounded`.
    #[arg(long, default_value = "all")]
    policies: String,
    /// Warm-up, seconds (not measured).
    #[arg(long, default_value_t = 10.0)]
    warmup_s: f64,
    /// Measured window, seconds.
    #[arg(long, default_value_t = 60.0)]
    measure_s: f64,
    /// Request timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout_s: f64,
    /// Requests in flight through the proxy beyond which new ones fail at once (Envoy's
    /// default circuit breakers allow 1024 connections + 1024 pending; raise it for large
    /// fleets, where a real deployment would configure larger limits).
    #[arg(long, default_value_t = 2048)]
    max_inflight: u32,
    /// Trace seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Offered loads are fractions of this many requests per second instead of each
    /// workload's capacity (see `Cluster::capacity_rps`).
    #[arg(long)]
    capacity_rps: Option<f64>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Simulates the hint policies among `policies` again with `params` (a variant of the point's),
/// printing their table under `label`.
fn hint_policies_again(
    params: &SimParams,
    trace: &Trace,
    policies: &[Policy],
    belady: f64,
    label: &str,
) -> Vec<PolicyResult> {
    let hint: Vec<Policy> = policies.iter().copied().filter(|p| p.is_hint()).collect();
    let results = sim_point(params, trace, &hint, belady);
    print!("{}", table(label, &results));
    results
}

fn us(ms: f64) -> u64 {
    (ms * 1000.0).round().max(0.0) as u64
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.runners == 0 || a.models == 0 || a.infer_ms <= 0.0 {
        bail!("--runners, --models and --infer-ms must be positive");
    }
    if !(a.load_spread >= 1.0 && a.load_spread.is_finite()) {
        bail!("--load-spread must be a finite number >= 1");
    }
    let points = parse_points(&a.points).map_err(anyhow::Error::msg)?;
    let policies = parse_policies(&a.policies).map_err(anyhow::Error::msg)?;
    let params = SimParams {
        runners: a.runners,
        capacity: a.capacity,
        max_concurrency: a.max_concurrency,
        load_us: us(a.load_ms),
        infer_us: us(a.infer_ms),
        poll_interval_us: us(a.poll_ms).max(1),
        learn_from_responses: !a.no_response_hints,
        overhead_us: us(a.overhead_ms),
        timeout_us: us(a.timeout_s * 1000.0),
        seed: a.seed,
        max_inflight: a.max_inflight,
        what_if_optimistic_hints: a.what_if_optimistic_hints,
        what_if_loading_not_busy: a.what_if_loading_not_busy,
        plain_rank: a.plain_rank,
        host_cache: a.host_cache,
        warm_load_us: us(a.warm_load_ms),
        what_if_runner_lru: a.what_if_runner_lru,
        load_spread: a.load_spread,
        ..SimParams::default()
    };
    let cluster = Cluster {
        runners: a.runners,
        capacity: a.capacity,
        max_concurrency: a.max_concurrency,
        load_ms: a.load_ms,
        infer_ms: a.infer_ms,
        models: a.models,
    };
    println!(
        "simulate: {} runners x {} slots (max_concurrency {}), {} models, load {} ms, infer {} ms; \
         inference capacity {:.0} req/s; warm-up {} s, measured {} s",
        a.runners,
        a.capacity,
        a.max_concurrency,
        a.models,
        a.load_ms,
        a.infer_ms,
        cluster.inference_rps(),
        a.warmup_s,
        a.measure_s
    );
    let mut results = Vec::new();
    for point in points {
        let t0 = Instant::now();
        let capacity_rps = match a.capacity_rps {
            Some(c) => c,
            None => cluster.capacity_rps(point.workload),
        };
        let trace = Trace::generate(TraceSpec {
            workload: point.workload,
            models: a.models,
            rate: point.load * capacity_rps,
            warmup_us: us(a.warmup_s * 1000.0),
            measure_us: us(a.measure_s * 1000.0),
            seed: a.seed,
        });
        let mut b = bounds(&trace, a.runners * a.capacity);
        b.ideal = cluster.ideal_hit(point.workload, trace.spec.rate);
        let sim = sim_point(&params, &trace, &policies, b.belady);
        let pr = PointResult {
            point,
            name: point.to_string(),
            offered_rps: point.load * capacity_rps,
            measured_requests: trace.measured().len() as u64,
            bounds: b,
            real: Vec::new(),
            sim,
            queue: Vec::new(),
            two_envoys: Vec::new(),
            two_envoys_sim: Vec::new(),
        };
        print!("\n{}", heading(&pr));
        print!("{}", table("sim", &pr.sim));
        for r in pr.sim.iter().filter(|r| !r.decisions.is_empty()) {
            println!("  {} decisions: {:?}", r.policy, r.decisions);
        }
        if params.host_cache > 0 {
            // The same trace with the router blind to warm lists: what reading them buys.
            let blind_params = SimParams { what_if_blind_to_warm: true, ..params.clone() };
            let blind = hint_policies_again(&blind_params, &trace, &policies, b.belady, "blind");
            for (seeing, blind) in pr.sim.iter().filter(|r| r.policy.is_hint()).zip(&blind) {
                let (s, b) = (&seeing.summary, &blind.summary);
                println!(
                    "  {}: reading warm vs blind: mean {:.1} / {:.1} ms ({:.2}x), p99 {:.1} / {:.1} ms ({:.2}x), hit {:.1} / {:.1} %",
                    seeing.policy,
                    s.mean_ms,
                    b.mean_ms,
                    s.mean_ms / b.mean_ms.max(f64::MIN_POSITIVE),
                    s.p99_ms,
                    b.p99_ms,
                    s.p99_ms / b.p99_ms.max(f64::MIN_POSITIVE),
                    s.hit_rate * 100.0,
                    b.hit_rate * 100.0
                );
            }
        }
        if a.proxies > 1 {
            let multi_params = SimParams {
                proxies: a.proxies,
                what_if_exact_in_flight: a.what_if_exact_in_flight,
                what_if_shared_responses: a.what_if_shared_responses,
                what_if_shared_guesses: a.what_if_shared_guesses,
                what_if_shared_pins: a.what_if_shared_pins,
                ..params.clone()
            };
            let multi =
                hint_policies_again(&multi_params, &trace, &policies, b.belady, &format!("x{}", a.proxies));
            for (one, multi) in pr.sim.iter().filter(|r| r.policy.is_hint()).zip(&multi) {
                let (s, m) = (&one.summary, &multi.summary);
                println!(
                    "  {}: 1 vs {} Envoys: hit {:.1} / {:.1} % ({:+.1} points), runner queue {:.2} / {:.2} ms (inference slot {:.2} / {:.2}), loads {:.1} / {:.1} /s, mean {:.1} / {:.1} ms, errors {} / {}",
                    one.policy,
                    a.proxies,
                    s.hit_rate * 100.0,
                    m.hit_rate * 100.0,
                    (m.hit_rate - s.hit_rate) * 100.0,
                    s.queue_ms,
                    m.queue_ms,
                    s.slot_ms,
                    m.slot_ms,
                    s.loads_per_s,
                    m.loads_per_s,
                    s.mean_ms,
                    m.mean_ms,
                    s.errors,
                    m.errors
                );
            }
        }
        println!("  ({:.1} s of CPU)", t0.elapsed().as_secs_f64());
        results.push(pr);
    }
    if let Some(path) = a.json {
        let doc = serde_json::json!({ "params": params, "cluster": cluster, "points": results });
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
