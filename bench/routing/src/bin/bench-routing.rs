//! `bench-routing`: the routing-quality benchmark on a real Envoy (see docs/bench-routing.md).
//!
//! ```sh
//! cargo build --release -p runner-example && cargo build --release --target wasm32-wasip1 -p hint-router
//! cargo run --release -p hint-router-bench-routing --bin bench-routing            # default run
//! cargo run --release -p hint-router-bench-routing --bin bench-routing -- --quick # smoke check
//! cargo run --release -p hint-router-bench-routing --bin bench-routing -- --quick --queue-mode
//! cargo run --release -p hint-router-bench-routing --bin bench-routing -- --quick --two-envoys
//! ```

use anyhow::{bail, Context, Result};
use clap::Parser;
use hint_router_bench_routing::bench::{
    bounds, envoys_table, envoys_target_lines, fill_gap_closed, fill_gap_closed_beside, heading,
    parse_points, parse_policies, queue_comparisons, queue_table, sim_policy, table, verdict, Cluster,
    PointResult, PolicyResult, QUEUE_HIT_TARGET_POINTS,
};
use hint_router_bench_routing::plot::plot;
use hint_router_bench_routing::real::{run_trace, Door, Drive, Stack};
use hint_router_bench_routing::report::summarize;
use hint_router_bench_routing::sim::{Policy, SimParams};
use hint_router_bench_routing::workload::{Trace, TraceSpec};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Puts the same open-loop workload through a real Envoy 1.40 and real runner processes under
/// the hint-router filter and Envoy's own policies, simulates the same traces, and computes
/// the optimal bounds.
#[derive(Debug, Parser)]
#[command(name = "bench-routing")]
struct Args {
    /// Points: `default`, `all`, or a list like `zipf1.0@60,uniform@30` (WORKLOAD@PERCENT;
    /// workloads zipf0.8, zipf1.0, zipf1.2, uniform, shift1.0).
    #[arg(long, default_value = "default")]
    points: String,
    /// Policies: `all` or a list of hint, round_robin, least_request, ring_hash, ring_hash_bounded.
    #[arg(long, default_value = "all")]
    policies: String,
    /// Smoke check: zipf1.0@60 only, 3 s warm-up, 10 s measured.
    #[arg(long)]
    quick: bool,
    /// Warm-up per point, seconds (not measured).
    #[arg(long, default_value_t = 10.0)]
    warmup_s: f64,
    /// Measured window per point, seconds.
    #[arg(long, default_value_t = 50.0)]
    measure_s: f64,
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
    #[arg(long, default_value_t = 200)]
    load_ms: u64,
    /// Inference time, ms.
    #[arg(long, default_value_t = 10)]
    infer_ms: u64,
    /// Request timeout from the scheduled send time, seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout_s: f64,
    /// Also run every hint policy through fal's queue door (submit, poll the status, fetch the
    /// result; docs/queue.md), on a stack of its own fed the same trace at the same time, and
    /// compare its hit rate with the blocking door's.
    #[arg(long)]
    queue_mode: bool,
    /// Also run every hint policy behind two Envoys in front of the same runners (request `i`
    /// of the trace to Envoy `i % 2`), on a stack of its own fed the same trace at the same
    /// time, and compare its hit rate and runner-side queue time with one Envoy's.
    #[arg(long)]
    two_envoys: bool,
    /// Queue door: milliseconds between status polls (also before the first).
    #[arg(long, default_value_t = 20)]
    queue_poll_ms: u64,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 2)]
    envoy_concurrency: u32,
    /// Trace seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Simulator only (no Envoy, no processes).
    #[arg(long)]
    sim_only: bool,
    /// Output directory for routing.json and routing.svg.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Also copy the plot here (e.g. docs/bench-routing.svg).
    #[arg(long)]
    publish_svg: Option<PathBuf>,
    /// Redraw the plot from this routing.json (written by an earlier run) and exit.
    #[arg(long)]
    replot: Option<PathBuf>,
}

/// The simulator's fixed per-request overhead (proxy, loopback, timer granularity), ms.
const SIM_OVERHEAD_MS: f64 = 1.5;

fn main() -> Result<()> {
    let mut a = Args::parse();
    if a.quick {
        a.points = "zipf1.0@60".into();
        a.warmup_s = 3.0;
        a.measure_s = 10.0;
    }
    if a.runners == 0
        || a.models == 0
        || a.infer_ms == 0
        || a.capacity == 0
        || a.max_concurrency == 0
        || a.queue_poll_ms == 0
    {
        bail!("--runners, --models, --capacity, --max-concurrency, --infer-ms and --queue-poll-ms must be positive");
    }
    let points = parse_points(&a.points).map_err(anyhow::Error::msg)?;
    let mut policies = parse_policies(&a.policies).map_err(anyhow::Error::msg)?;
    // Gap closed is measured against round robin: always run it.
    if !policies.contains(&Policy::RoundRobin) {
        policies.push(Policy::RoundRobin);
    }
    let root = hint_router_e2e::repo_root();
    let out = if a.out.is_absolute() { a.out.clone() } else { root.join(&a.out) };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    if let Some(path) = &a.replot {
        let doc: serde_json::Value = serde_json::from_slice(
            &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        let results: Vec<PointResult> = serde_json::from_value(doc["points"].clone())?;
        return write_plot(&a, &root, &out, &results);
    }
    let cluster = Cluster {
        runners: a.runners,
        capacity: a.capacity,
        max_concurrency: a.max_concurrency,
        load_ms: a.load_ms as f64,
        infer_ms: a.infer_ms as f64,
        models: a.models,
    };
    let runner_args: Vec<String> = [
        "--capacity",
        &a.capacity.to_string(),
        "--max-concurrency",
        &a.max_concurrency.to_string(),
        "--load-ms",
        &a.load_ms.to_string(),
        "--infer-ms",
        &a.infer_ms.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let timeout = Duration::from_secs_f64(a.timeout_s);
    let drive = Drive { timeout, poll: Duration::from_millis(a.queue_poll_ms) };
    // The stacks of one point (policy, door, Envoys): every policy through the blocking door
    // behind one Envoy, with --queue-mode every hint policy again through the queue door, and
    // with --two-envoys every hint policy again behind two Envoys.
    let mut doors: Vec<(Policy, Door, usize)> = policies.iter().map(|&p| (p, Door::Blocking, 1)).collect();
    let hints = || policies.iter().filter(|p| p.is_hint()).copied();
    if a.queue_mode {
        doors.extend(hints().map(|p| (p, Door::Queue, 1)));
    }
    if a.two_envoys {
        doors.extend(hints().map(|p| (p, Door::Blocking, 2)));
    }
    let base_params = SimParams {
        runners: a.runners,
        capacity: a.capacity,
        max_concurrency: a.max_concurrency,
        load_us: a.load_ms * 1000,
        infer_us: a.infer_ms * 1000,
        overhead_us: (SIM_OVERHEAD_MS * 1000.0) as u64,
        timeout_us: timeout.as_micros() as u64,
        seed: a.seed,
        ..SimParams::default()
    };
    println!(
        "bench-routing: {} runners x {} slots, max_concurrency {}, {} models, load {} ms, infer {} ms; \
         warm-up {} s + measured {} s per point; {} point(s) x {} policies{}{}{}",
        a.runners,
        a.capacity,
        a.max_concurrency,
        a.models,
        a.load_ms,
        a.infer_ms,
        a.warmup_s,
        a.measure_s,
        points.len(),
        policies.len(),
        if a.sim_only { " (simulator only)" } else { "" },
        if a.queue_mode && !a.sim_only {
            format!(
                "; queue door for {} hint polic(ies), status polled every {} ms",
                hints().count(),
                a.queue_poll_ms
            )
        } else {
            String::new()
        },
        if a.two_envoys && !a.sim_only {
            format!("; {} hint polic(ies) also behind 2 Envoys, requests alternating", hints().count())
        } else {
            String::new()
        }
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let began = Instant::now();
    let mut results = Vec::new();
    for point in &points {
        let capacity_rps = cluster.capacity_rps(point.workload);
        let trace = Trace::generate(TraceSpec {
            workload: point.workload,
            models: a.models,
            rate: point.load * capacity_rps,
            warmup_us: (a.warmup_s * 1e6) as u64,
            measure_us: (a.measure_s * 1e6) as u64,
            seed: a.seed,
        });
        let mut b = bounds(&trace, a.runners * a.capacity);
        b.ideal = cluster.ideal_hit(point.workload, trace.spec.rate);
        let mut pr = PointResult {
            point: *point,
            name: point.to_string(),
            offered_rps: point.load * capacity_rps,
            measured_requests: trace.measured().len() as u64,
            bounds: b,
            real: Vec::new(),
            sim: Vec::new(),
            queue: Vec::new(),
            two_envoys: Vec::new(),
            two_envoys_sim: Vec::new(),
        };
        // Runner addresses per policy (the ring depends on them); synthetic when not run.
        let mut addrs: Vec<Vec<String>> = vec![Vec::new(); policies.len()];
        if !a.sim_only {
            let mut stacks = Vec::new();
            for &(p, door, envoys) in &doors {
                stacks.push(Stack::start(
                    p,
                    door,
                    envoys,
                    a.runners,
                    &runner_args,
                    a.envoy_concurrency,
                    base_params.hash_balance_factor,
                )?);
            }
            addrs = stacks
                .iter()
                .filter(|s| s.door == Door::Blocking && s.envoys() == 1)
                .map(Stack::addrs)
                .collect();
            let runs = rt.block_on(async {
                tokio::select! {
                    r = run_trace(&stacks, &trace, drive) => r,
                    _ = tokio::signal::ctrl_c() => bail!("interrupted"),
                }
            })?;
            for (stack, run) in stacks.iter().zip(runs) {
                let result = PolicyResult {
                    policy: stack.policy,
                    summary: summarize(&trace, &run.records, run.loads_in_window, a.runners),
                    achieved_rps: Some(run.achieved_rps),
                    send_lag_p99_ms: Some(run.send_lag_p99_ms),
                    decisions: run.filter_counters,
                    polls_per_request: run.polls_per_request,
                };
                match (stack.door, stack.envoys()) {
                    (Door::Blocking, 1) => pr.real.push(result),
                    (Door::Blocking, _) => pr.two_envoys.push(result),
                    (Door::Queue, _) => pr.queue.push(result),
                }
            }
            let dirs: Vec<PathBuf> =
                stacks.iter().flat_map(|s| s.dirs()).map(std::path::Path::to_path_buf).collect();
            drop(stacks);
            for d in dirs {
                let _ = std::fs::remove_dir_all(d);
            }
            fill_gap_closed(&mut pr.real, b.belady);
            fill_gap_closed_beside(&mut pr.queue, &pr.real, b.belady);
            fill_gap_closed_beside(&mut pr.two_envoys, &pr.real, b.belady);
        }
        for (&policy, addrs) in policies.iter().zip(addrs) {
            let params = SimParams { addrs, ..base_params.clone() };
            pr.sim.push(sim_policy(&params, &trace, policy));
            // --two-envoys: the simulator's hint policies behind two proxies, same trace.
            if a.two_envoys && policy.is_hint() {
                pr.two_envoys_sim.push(sim_policy(&SimParams { proxies: 2, ..params }, &trace, policy));
            }
        }
        fill_gap_closed(&mut pr.sim, b.belady);
        fill_gap_closed_beside(&mut pr.two_envoys_sim, &pr.sim, b.belady);
        print!("\n{}", heading(&pr));
        if !pr.real.is_empty() {
            print!("{}", table("real", &pr.real));
        }
        print!("{}", queue_table(&pr));
        print!("{}", table("sim", &pr.sim));
        // Last: it compares the real and the sim rows.
        print!("{}", envoys_table(&pr));
        results.push(pr);
    }
    println!("\nfinished in {:.0} s", began.elapsed().as_secs_f64());
    print_targets(&results);

    let doc = serde_json::json!({
        "cluster": cluster,
        "capacity_definition": "highest rate an ideal router could sustain: max over R of (K*C - R) / ((load + infer) * (1 - mass of the R most popular models)), capped by K*M/infer",
        "warmup_s": a.warmup_s,
        "measure_s": a.measure_s,
        "timeout_s": a.timeout_s,
        "envoy_concurrency": a.envoy_concurrency,
        "seed": a.seed,
        "sim_overhead_ms": SIM_OVERHEAD_MS,
        "queue_poll_ms": a.queue_mode.then_some(a.queue_poll_ms),
        "two_envoys": a.two_envoys,
        "points": results,
    });
    let json = out.join("routing.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!("wrote {}", json.display());
    write_plot(&a, &root, &out, &results)
}

/// Plots the Zipf 1.0 load sweep (or the first workload run) into `out/routing.svg`.
fn write_plot(
    a: &Args,
    root: &std::path::Path,
    out: &std::path::Path,
    results: &[PointResult],
) -> Result<()> {
    let sweep = results.iter().filter(|r| r.point.workload.to_string() == "zipf1.0").count().max(1);
    let workload = if sweep > 1 || results.is_empty() {
        "zipf1.0".to_string()
    } else {
        results.first().map(|r| r.point.workload.to_string()).unwrap_or_default()
    };
    let svg = out.join("routing.svg");
    plot(
        &svg,
        results,
        &workload,
        &format!(
            "{workload}: {} runners x {} slots, {} models, load {} ms, infer {} ms (solid: real Envoy, dashed: simulator)",
            a.runners, a.capacity, a.models, a.load_ms, a.infer_ms
        ),
    )?;
    println!("wrote {}", svg.display());
    if let Some(p) = &a.publish_svg {
        let dest = if p.is_absolute() { p.clone() } else { root.join(p) };
        std::fs::copy(&svg, &dest).with_context(|| format!("copying the plot to {}", dest.display()))?;
        println!("copied the plot to {}", dest.display());
    }
    Ok(())
}

/// Prints the issue's targets at zipf1.0@60 (and the same checks at every point).
fn print_targets(results: &[PointResult]) {
    println!("\ntargets (hint p99 <= 0.5 x best Envoy p99, zero errors, hit >= every Envoy policy, gap closed >= 0.85):");
    for pr in results {
        for (label, list) in [("real", &pr.real), ("sim", &pr.sim)] {
            let others: Vec<&PolicyResult> = list.iter().filter(|r| !r.policy.is_hint()).collect();
            for h in list.iter().filter(|r| r.policy.is_hint()) {
                let Some(best) = others.iter().min_by(|x, y| x.summary.p99_ms.total_cmp(&y.summary.p99_ms))
                else {
                    continue;
                };
                let mode = h.policy.name();
                let best_hit = others.iter().map(|r| r.summary.hit_rate).fold(0.0, f64::max);
                let gap = h.summary.gap_closed.unwrap_or(f64::NAN);
                println!(
                "  {:<12} {label:<4} {mode:<12} p99 {:.0} ms vs best Envoy {:.0} ms ({}) [{}]; errors {} [{}]; hit {:.1}% vs best Envoy {:.1}% [{}]; gap closed {:.2} [{}]",
                pr.name,
                h.summary.p99_ms,
                best.summary.p99_ms,
                best.policy,
                verdict(h.summary.p99_ms <= 0.5 * best.summary.p99_ms),
                h.summary.errors,
                verdict(h.summary.errors == 0),
                h.summary.hit_rate * 100.0,
                best_hit * 100.0,
                verdict(h.summary.hit_rate >= best_hit),
                gap,
                verdict(gap >= 0.85),
            );
            }
        }
        for c in queue_comparisons(pr) {
            println!(
                "  {:<12} real {:<12} queue hit {:.2}% vs blocking {:.2}%: {:+.2} points (target: within {QUEUE_HIT_TARGET_POINTS:.0} below) [{}]",
                pr.name,
                c.policy.name(),
                c.queue_hit,
                c.blocking_hit,
                c.diff_points(),
                verdict(c.met()),
            );
        }
        for line in envoys_target_lines(pr) {
            println!("{line}");
        }
    }
}
