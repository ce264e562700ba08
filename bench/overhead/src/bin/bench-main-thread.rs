//! `bench-main-thread`: what polling a large fleet costs Envoy's main thread, where the
//! poller runs (issue 11: "500 ms polls at 1,000 runners keep Envoy's main thread below 10 %
//! of one core").
//!
//! Starts the shipped config (the production setting, one worker) in front of `--runners`
//! synthetic runners (the fast upstream of `bench-overhead`, 100 hints each), with
//! `poll_interval_ms` = `--poll-ms`, waits until every runner is available, then, with no
//! request traffic, reads the CPU time of Envoy's main thread, of its worker and of the whole
//! process over `--measure-s`, once with the fleet's hints unchanging and once with runner 0
//! changing a hint at every poll (every change is a publication: a delta of that runner).
//!
//! ```sh
//! cargo build --release --target wasm32-wasip1 -p hint-router
//! cargo run --release -p hint-router-bench-overhead --bin bench-main-thread -- --runners 1000 --poll-ms 500
//! ```

use anyhow::{bail, Context, Result};
use hint_router_bench_overhead::envoy::{self, Setup, Variant};
use hint_router_bench_overhead::fixture::HINTS_PER_RUNNER;
use hint_router_bench_overhead::proc;
use hint_router_bench_overhead::upstream::Upstream;
use std::time::{Duration, Instant};

/// The issue's target: the main thread's share of one core.
const TARGET_MAIN_SHARE: f64 = 0.10;

struct Args {
    runners: usize,
    hints: usize,
    poll_ms: u64,
    measure_s: f64,
    /// List the runners in the plugin config instead of reading the cluster's hosts from the
    /// admin API every poll interval.
    listed: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args { runners: 1000, hints: HINTS_PER_RUNNER, poll_ms: 500, measure_s: 20.0, listed: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--runners" => a.runners = value()?.parse().context("--runners")?,
            "--poll-ms" => a.poll_ms = value()?.parse().context("--poll-ms")?,
            "--measure-s" => a.measure_s = value()?.parse().context("--measure-s")?,
            "--hints" => a.hints = value()?.parse().context("--hints")?,
            "--listed" => a.listed = true,
            _ => bail!("usage: bench-main-thread [--runners N] [--hints H] [--poll-ms MS] [--measure-s S] [--listed]"),
        }
    }
    if a.runners == 0 || a.poll_ms == 0 || a.measure_s <= 0.0 {
        bail!("--runners, --poll-ms and --measure-s must be positive");
    }
    Ok(a)
}

/// CPU nanoseconds of the main thread (its tid is the pid), the worker and the process.
fn cpu(run: &envoy::Running) -> Result<(u64, u64, u64)> {
    let main = proc::thread_cpu_ns(run.pid, run.pid)?;
    let worker = run.worker_tid.map(|t| proc::thread_cpu_ns(run.pid, t)).transpose()?.unwrap_or(0);
    let all: u64 =
        proc::threads(run.pid)?.iter().filter_map(|(t, _)| proc::thread_cpu_ns(run.pid, *t).ok()).sum();
    Ok((main, worker, all))
}

fn stat(run: &envoy::Running, name: &str) -> u64 {
    run.envoy.stat(&format!("wasmcustom.hint_router.{name}")).unwrap_or(0)
}

fn main() -> Result<()> {
    let a = parse_args()?;
    println!(
        "bench-main-thread: {} runners x {} hints, {} ms polls, {} s measured per case, no request traffic, runners {}; loadavg {}",
        a.runners,
        a.hints,
        a.poll_ms,
        a.measure_s,
        if a.listed { "listed in the plugin config" } else { "read from the cluster (admin API)" },
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    let up = Upstream::start(a.runners, a.hints, None)?;
    let setup = Setup {
        label: "m",
        name: "hint-router, polls only",
        variant: Variant::HintRouter,
        runners: a.runners,
        before: false,
        churn_ms: 0,
    };
    let mut plugin = vec![
        ("poll_interval_ms".to_string(), a.poll_ms.to_string()),
        ("poll_timeout_ms".to_string(), (a.poll_ms * 4 / 5).max(1).to_string()),
    ];
    if a.listed {
        plugin.push(("runners".to_string(), serde_json::to_string(up.addrs())?));
    }
    let t0 = Instant::now();
    let run = envoy::start(&setup, up.addrs(), None, &plugin)?;
    println!("  every runner available {:.1} s after start", t0.elapsed().as_secs_f64());
    println!();
    println!(
        "| case | polls/s (expected) | poll errors | tables published | main thread, % of a core | main thread us per poll | worker, % | whole Envoy, % |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut worst = 0.0f64;
    for (case, churn_ms) in [("hints unchanging", 0u64), ("runner 0 changes a hint at every poll", 250)] {
        up.set_churn_on_polls(churn_ms);
        // One poll round for the change to take effect before measuring.
        std::thread::sleep(Duration::from_millis(a.poll_ms));
        let (polls0, errors0, pubs0) =
            (stat(&run, "poll_ok"), stat(&run, "poll_error"), stat(&run, "table_publishes"));
        let (m0, w0, all0) = cpu(&run)?;
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(a.measure_s));
        let secs = started.elapsed().as_secs_f64();
        let (m1, w1, all1) = cpu(&run)?;
        let (polls, errors, pubs) = (
            stat(&run, "poll_ok").saturating_sub(polls0),
            stat(&run, "poll_error").saturating_sub(errors0),
            stat(&run, "table_publishes").saturating_sub(pubs0),
        );
        let share = |ns: u64| ns as f64 / 1e9 / secs * 100.0;
        let main = share(m1.saturating_sub(m0));
        worst = worst.max(main);
        println!(
            "| {case} | {:.0} ({:.0}) | {errors} | {pubs} | {main:.1} | {:.0} | {:.1} | {:.1} |",
            polls as f64 / secs,
            a.runners as f64 * 1000.0 / a.poll_ms as f64,
            m1.saturating_sub(m0) as f64 / 1e3 / (polls + errors).max(1) as f64,
            share(w1.saturating_sub(w0)),
            share(all1.saturating_sub(all0)),
        );
        if stat(&run, "runners_available") != a.runners as u64 {
            println!("  ({} of {} runners available at the end)", stat(&run, "runners_available"), a.runners);
        }
    }
    up.set_churn(0);
    let health_checks = run.envoy.stat("cluster.runners.health_check.attempt").unwrap_or(0);
    drop(run);
    // The same Envoy without the filter and its poller: what its own active health checks of
    // the runners (the shipped config's, every 2 s) cost the main thread.
    let plain = Setup { label: "a", name: "no wasm filter", variant: Variant::NoFilter, ..setup };
    let run = envoy::start(&plain, up.addrs(), None, &[])?;
    // Envoy::start does not wait for a fleet without the filter: one health-check round.
    std::thread::sleep(Duration::from_secs(3));
    let checks0 = run.envoy.stat("cluster.runners.health_check.attempt").unwrap_or(0);
    let (m0, _, all0) = cpu(&run)?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(a.measure_s));
    let secs = started.elapsed().as_secs_f64();
    let (m1, _, all1) = cpu(&run)?;
    let checks = run.envoy.stat("cluster.runners.health_check.attempt").unwrap_or(0).saturating_sub(checks0);
    let main_ns = m1.saturating_sub(m0);
    println!(
        "| no filter: Envoy's own health checks only | {:.0} checks/s | | | {:.1} | {:.0} per check | | {:.1} |",
        checks as f64 / secs,
        main_ns as f64 / 1e9 / secs * 100.0,
        main_ns as f64 / 1e3 / checks.max(1) as f64,
        all1.saturating_sub(all0) as f64 / 1e9 / secs * 100.0,
    );
    println!();
    println!(
        "(the hint-router rows include the same health checks: {health_checks} attempts by the end of its run)"
    );
    println!(
        "target: main thread < {:.0} % of one core: {} (worst case {worst:.1} %)",
        TARGET_MAIN_SHARE * 100.0,
        if worst < TARGET_MAIN_SHARE * 100.0 { "met" } else { "MISSED" }
    );
    Ok(())
}
