//! `bench-main-thread`: what polling a large fleet costs Envoy's main thread, where the
//! poller runs (issue 11: "500 ms polls at 1,000 runners keep Envoy's main thread below 10 %
//! of one core").
//!
//! Starts the shipped config (the production setting, one worker) in front of `--runners`
//! synthetic runners (the fast upstream of `bench-overhead`, 100 hints each), with
//! `poll_interval_ms` = `--poll-ms`, waits until every runner is available, then, with no
//! request traffic, reads the CPU time of Envoy's main thread, of its worker and of the whole
//! process over `--measure-s`, once with the fleet's hints unchanging and once with runner 0
//! changing a hint every 250 ms (every change is a table publication that the worker reloads).
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
    poll_ms: u64,
    measure_s: f64,
}

fn parse_args() -> Result<Args> {
    let mut a = Args { runners: 1000, poll_ms: 500, measure_s: 20.0 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--runners" => a.runners = value()?.parse().context("--runners")?,
            "--poll-ms" => a.poll_ms = value()?.parse().context("--poll-ms")?,
            "--measure-s" => a.measure_s = value()?.parse().context("--measure-s")?,
            _ => bail!("usage: bench-main-thread [--runners N] [--poll-ms MS] [--measure-s S]"),
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
        "bench-main-thread: {} runners x {HINTS_PER_RUNNER} hints, {} ms polls, {} s measured per case, no request traffic; loadavg {}",
        a.runners,
        a.poll_ms,
        a.measure_s,
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    let up = Upstream::start(a.runners, HINTS_PER_RUNNER, None)?;
    let setup = Setup {
        label: "m",
        name: "hint-router, polls only",
        variant: Variant::HintRouter,
        runners: a.runners,
        before: false,
        churn_ms: 0,
    };
    let plugin = vec![
        ("poll_interval_ms".to_string(), a.poll_ms.to_string()),
        ("poll_timeout_ms".to_string(), (a.poll_ms * 4 / 5).max(1).to_string()),
    ];
    let t0 = Instant::now();
    let run = envoy::start(&setup, up.addrs(), None, &plugin)?;
    println!("  every runner available {:.1} s after start", t0.elapsed().as_secs_f64());
    println!();
    println!(
        "| case | polls/s (expected) | poll errors | tables published | main thread, % of a core | worker, % | whole Envoy, % | VM memory MB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut worst = 0.0f64;
    for (case, churn_ms) in [("hints unchanging", 0u64), ("runner 0 changes a hint / 250 ms", 250)] {
        up.set_churn(churn_ms);
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
            "| {case} | {:.0} ({:.0}) | {errors} | {pubs} | {main:.1} | {:.1} | {:.1} | {:.1} |",
            polls as f64 / secs,
            a.runners as f64 * 1000.0 / a.poll_ms as f64,
            share(w1.saturating_sub(w0)),
            share(all1.saturating_sub(all0)),
            stat(&run, "vm_memory_bytes") as f64 / 1e6,
        );
        if stat(&run, "runners_available") != a.runners as u64 {
            println!("  ({} of {} runners available at the end)", stat(&run, "runners_available"), a.runners);
        }
    }
    up.set_churn(0);
    println!();
    println!(
        "target: main thread < {:.0} % of one core: {} (worst case {worst:.1} %)",
        TARGET_MAIN_SHARE * 100.0,
        if worst < TARGET_MAIN_SHARE * 100.0 { "met" } else { "MISSED" }
    );
    Ok(())
}
