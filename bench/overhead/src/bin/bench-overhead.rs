//! `bench-overhead`: what the hint-router filter costs Envoy (see `docs/bench-overhead.md`).
//!
//! Envoy with one worker (`--concurrency 1`) in front of a fast in-process upstream; `wrk`
//! saturates it, then an open-loop generator offers a fixed rate (half of the slowest setup's
//! saturated rate) for latency. Setups (a) no wasm filter, (b) no-op wasm filter,
//! (c) hint-router with 8 runners, (d) hint-router with 1,000 runners, run interleaved
//! `a,b,c,d,a,b,c,d...`; medians are reported. Writes `target/bench/overhead.json`.
//!
//! Usage: `bench-overhead [--quick] [--reps N] [--duration S] [--latency-duration S]
//! [--rate R] [--setups a,b,c,d] [--conns N] [--no-pin] [--out PATH]`

use anyhow::{bail, Context, Result};
use hint_router_bench_overhead::alloc::CountingAlloc;
use hint_router_bench_overhead::envoy::{self, Setup, Variant, SETUPS};
use hint_router_bench_overhead::fixture::{self, HINTS_PER_RUNNER};
use hint_router_bench_overhead::stats::Spread;
use hint_router_bench_overhead::upstream::Upstream;
use hint_router_bench_overhead::{loadgen, memory, proc};
use hint_router_e2e::{envoy_bin, repo_root, wasm_path};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// CPU Envoy's worker thread is pinned to; the load generators, the upstream and Envoy's other
/// threads (main thread: polls, health checks) get the other.
const ENVOY_CPU: usize = 0;
const LOAD_CPU: usize = 1;

#[derive(Debug, Clone)]
struct Args {
    reps: usize,
    duration: f64,
    latency_duration: f64,
    warmup: f64,
    rate: Option<f64>,
    setups: Vec<Setup>,
    conns: usize,
    latency_conns: usize,
    pin: bool,
    out: PathBuf,
    /// Debugging: start this setup, print its URLs and wait for a line on stdin.
    serve: Option<Setup>,
    /// Extra plugin config members for the hint-router setups (`--plugin key=json`).
    plugin: Vec<(String, String)>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        reps: 5,
        duration: 3.0,
        latency_duration: 3.0,
        warmup: 1.0,
        rate: None,
        setups: SETUPS.iter().take(envoy::DEFAULT_SETUPS).copied().collect(),
        conns: 16,
        latency_conns: 32,
        pin: true,
        out: repo_root().join("target/bench/overhead.json"),
        serve: None,
        plugin: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, name: &str| -> Result<f64> {
        v.with_context(|| format!("{name} needs a value"))?
            .parse::<f64>()
            .with_context(|| format!("bad {name}"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => {
                a.reps = 1;
                a.duration = 2.0;
                a.latency_duration = 2.0;
                a.warmup = 1.0;
            }
            "--reps" => a.reps = num(it.next(), "--reps")? as usize,
            "--duration" => a.duration = num(it.next(), "--duration")?,
            "--latency-duration" => a.latency_duration = num(it.next(), "--latency-duration")?,
            "--warmup" => a.warmup = num(it.next(), "--warmup")?,
            "--rate" => a.rate = Some(num(it.next(), "--rate")?),
            "--conns" => a.conns = num(it.next(), "--conns")? as usize,
            "--latency-conns" => a.latency_conns = num(it.next(), "--latency-conns")? as usize,
            "--no-pin" => a.pin = false,
            "--plugin" => {
                let kv = it.next().context("--plugin needs key=json")?;
                let (k, v) = kv.split_once('=').context("--plugin needs key=json")?;
                a.plugin.push((k.to_string(), v.to_string()));
            }
            "--serve" => {
                let l = it.next().context("--serve needs a setup label")?;
                a.serve =
                    Some(SETUPS.iter().find(|s| s.label == l).copied().context(format!("no setup {l}"))?);
            }
            "--out" => a.out = PathBuf::from(it.next().context("--out needs a path")?),
            "--setups" => {
                let v = it.next().context("--setups needs a list, e.g. a,b,c")?;
                a.setups = v
                    .split(',')
                    .map(|l| {
                        SETUPS.iter().find(|s| s.label == l.trim()).copied().context(format!("no setup {l}"))
                    })
                    .collect::<Result<_>>()?;
            }
            "-h" | "--help" => {
                println!(
                    "bench-overhead [--quick] [--reps N] [--duration S] [--latency-duration S] [--warmup S] \
                     [--rate R] [--setups a,b,c,d,e] [--conns N] [--latency-conns N] [--no-pin] [--plugin key=json] [--out PATH]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if a.reps == 0 || a.setups.is_empty() {
        bail!("nothing to run");
    }
    Ok(a)
}

/// Installs `wrk` with apt-get when it is missing.
fn ensure_wrk() -> Result<()> {
    let present = |c: &str| {
        Command::new("sh").args(["-c", &format!("command -v {c}")]).output().is_ok_and(|o| o.status.success())
    };
    if present("wrk") {
        return Ok(());
    }
    eprintln!("wrk missing: apt-get install -y wrk");
    let install =
        || Command::new("apt-get").args(["install", "-y", "wrk"]).status().is_ok_and(|s| s.success());
    if !install() {
        let _ = Command::new("apt-get").arg("update").status();
        if !install() {
            bail!("cannot install wrk (apt-get install -y wrk)");
        }
    }
    Ok(())
}

/// What one wrk run reported.
#[derive(Debug, Clone, Serialize)]
struct Wrk {
    requests: u64,
    rps: f64,
    non_2xx: u64,
    socket_errors: u64,
    p50_us: f64,
    p99_us: f64,
}

fn wrk_duration_us(v: &str) -> Option<f64> {
    let v = v.trim();
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().ok().map(|x| x * mult)
}

fn parse_wrk(out: &str) -> Result<Wrk> {
    let mut w = Wrk { requests: 0, rps: 0.0, non_2xx: 0, socket_errors: 0, p50_us: 0.0, p99_us: 0.0 };
    for line in out.lines() {
        let t = line.trim();
        if let Some(r) = t.strip_prefix("Requests/sec:") {
            w.rps = r.trim().parse().context("wrk Requests/sec")?;
        } else if t.contains(" requests in ") {
            w.requests = t.split_whitespace().next().and_then(|n| n.parse().ok()).context("wrk requests")?;
        } else if let Some(r) = t.strip_prefix("Non-2xx or 3xx responses:") {
            w.non_2xx = r.trim().parse().unwrap_or(0);
        } else if let Some(r) = t.strip_prefix("Socket errors:") {
            w.socket_errors = r
                .split(',')
                .filter_map(|p| p.split_whitespace().last().and_then(|n| n.parse::<u64>().ok()))
                .sum();
        } else if let Some(r) = t.strip_prefix("50%") {
            w.p50_us = wrk_duration_us(r).unwrap_or(0.0);
        } else if let Some(r) = t.strip_prefix("99%") {
            w.p99_us = wrk_duration_us(r).unwrap_or(0.0);
        }
    }
    if w.requests == 0 {
        bail!("wrk completed no request:\n{out}");
    }
    Ok(w)
}

fn run_wrk(url: &str, hint: &str, conns: usize, secs: f64, pin: bool) -> Result<Wrk> {
    let mut cmd = if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", &LOAD_CPU.to_string(), "wrk"]);
        c
    } else {
        Command::new("wrk")
    };
    // wrk takes whole seconds.
    let secs = secs.ceil().max(1.0) as u64;
    cmd.args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s"), "--latency"])
        .args(["-H", &format!("x-fal-runner-hint: {hint}")])
        .arg(url);
    let out = cmd.output().context("run wrk")?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

/// One run of one setup.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    setup: &'static str,
    rep: usize,
    start_s: f64,
    idle_cpu_pct: f64,
    sat: Wrk,
    sat_cpu_us_per_req: f64,
    sat_worker_cpu_us_per_req: Option<f64>,
    lat: Option<loadgen::OpenLoop>,
    lat_cpu_us_per_req: Option<f64>,
    rss_bytes: u64,
    filter_stats: BTreeMap<String, u64>,
    /// Mean cost (us) of the worker's table loads before the saturation run (the first load).
    first_load_us_each: Option<f64>,
    /// Table reloads by the worker during the saturation run, and their mean cost (us).
    sat_reloads: Option<u64>,
    sat_reload_us_each: Option<f64>,
}

/// `(table_reloads, table_reload_us)` of the filter, when it exports them.
fn reload_stats(run: &envoy::Running) -> Option<(u64, u64)> {
    Some((
        run.envoy.stat("wasmcustom.hint_router.table_reloads")?,
        run.envoy.stat("wasmcustom.hint_router.table_reload_us")?,
    ))
}

fn worker_ns(run: &envoy::Running) -> Option<u64> {
    // The thread that serves requests: its own CPU time, without the main thread's polls and
    // health checks.
    run.worker_tid.and_then(|t| proc::thread_cpu_ns(run.pid, t).ok())
}

fn run_setup(args: &Args, setup: &Setup, up: &Upstream, rate: Option<f64>, rep: usize) -> Result<Sample> {
    let runners: Vec<String> = up.addrs().iter().take(setup.runners).cloned().collect();
    let t0 = Instant::now();
    let run = envoy::start(setup, &runners, args.pin.then_some((ENVOY_CPU, LOAD_CPU)), &args.plugin)?;
    let start_s = t0.elapsed().as_secs_f64();
    up.set_churn(setup.churn_ms);
    let result = measure(args, setup, &run, rate, rep, start_s);
    up.set_churn(0);
    result
}

fn measure(
    args: &Args,
    setup: &Setup,
    run: &envoy::Running,
    rate: Option<f64>,
    rep: usize,
    start_s: f64,
) -> Result<Sample> {
    let url = run.envoy.url();
    let hint = fixture::hit_hint();
    // Warm up: connections, V8 tiers, the filter's first table load.
    run_wrk(&url, &hint, args.conns, args.warmup, args.pin)?;
    // Background CPU (health checks, polls) while idle.
    let idle_t = Instant::now();
    let idle0 = proc::process_cpu_us(run.pid)?;
    std::thread::sleep(Duration::from_millis(500));
    let idle_cpu_pct = proc::process_cpu_us(run.pid)?.saturating_sub(idle0) as f64
        / idle_t.elapsed().as_micros().max(1) as f64
        * 100.0;

    let reloads0 = reload_stats(run);
    let (c0, w0) = (proc::process_cpu_us(run.pid)?, worker_ns(run));
    let sat = run_wrk(&url, &hint, args.conns, args.duration, args.pin)?;
    let (c1, w1) = (proc::process_cpu_us(run.pid)?, worker_ns(run));
    let reloads1 = reload_stats(run);
    let sat_cpu_us_per_req = c1.saturating_sub(c0) as f64 / sat.requests as f64;
    let sat_worker_cpu_us_per_req =
        w0.zip(w1).map(|(a, b)| b.saturating_sub(a) as f64 / 1000.0 / sat.requests as f64);

    let (mut lat, mut lat_cpu_us_per_req) = (None, None);
    if let Some(rate) = rate {
        let addr: SocketAddr = format!("127.0.0.1:{}", run.envoy.port).parse()?;
        let req = format!("GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nx-fal-runner-hint: {hint}\r\n\r\n");
        let c0 = proc::process_cpu_us(run.pid)?;
        let l = loadgen::run(
            addr,
            req.as_bytes(),
            rate,
            Duration::from_secs_f64(args.latency_duration),
            args.latency_conns,
            args.pin.then_some(LOAD_CPU),
        )?;
        let c1 = proc::process_cpu_us(run.pid)?;
        lat_cpu_us_per_req = Some(c1.saturating_sub(c0) as f64 / l.ok.max(1) as f64);
        lat = Some(l);
    }
    let mut filter_stats = BTreeMap::new();
    if setup.variant == Variant::HintRouter {
        for s in [
            "hit",
            "miss",
            "busy_fallback",
            "saturated",
            "no_hint",
            "requests",
            "table_reloads",
            "table_reload_us",
            "vm_memory_bytes",
            "inflight_errors",
        ] {
            if let Some(v) = run.envoy.stat(&format!("wasmcustom.hint_router.{s}")) {
                filter_stats.insert(s.to_string(), v);
            }
        }
        for s in ["wasm.hint_router.vm_reload", "wasm.envoy.wasm.runtime.v8.active"] {
            if let Some(v) = run.envoy.stat(s) {
                filter_stats.insert(s.to_string(), v);
            }
        }
    }
    let rss_bytes = proc::rss_bytes(run.pid).unwrap_or(0);
    let (sat_reloads, sat_reload_us_each) = match (reloads0, reloads1) {
        (Some((n0, us0)), Some((n1, us1))) if n1 > n0 => {
            (Some(n1 - n0), Some((us1.saturating_sub(us0)) as f64 / (n1 - n0) as f64))
        }
        (Some(_), Some(_)) => (Some(0), None),
        _ => (None, None),
    };
    // Reloads before the saturation run: the first load of the table (and any during warmup).
    let first_load_us_each = reloads0.filter(|(n, _)| *n > 0).map(|(n, us)| us as f64 / n as f64);
    Ok(Sample {
        first_load_us_each,
        sat_reloads,
        sat_reload_us_each,
        setup: setup.label,
        rep,
        start_s,
        idle_cpu_pct,
        sat,
        sat_cpu_us_per_req,
        sat_worker_cpu_us_per_req,
        lat,
        lat_cpu_us_per_req,
        rss_bytes,
        filter_stats,
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string()
}

/// Medians and spreads of one setup.
#[derive(Debug, Clone, Serialize)]
struct Summary {
    setup: &'static str,
    name: &'static str,
    runners: usize,
    sat_rps: Spread,
    cpu_us_per_req: Spread,
    worker_cpu_us_per_req: Spread,
    lat_cpu_us_per_req: Spread,
    p50_us: Spread,
    p99_us: Spread,
    idle_cpu_pct: Spread,
    rss_mb: Spread,
    start_s: Spread,
    reloads_during_saturation: Spread,
    reload_us_each: Spread,
    first_load_us: Spread,
    vm_memory_mb: Spread,
}

fn summarise(setup: &Setup, samples: &[Sample]) -> Summary {
    let mine: Vec<&Sample> = samples.iter().filter(|s| s.setup == setup.label).collect();
    let of = |f: &dyn Fn(&Sample) -> Option<f64>| {
        Spread::of(&mine.iter().filter_map(|s| f(s)).collect::<Vec<_>>())
    };
    Summary {
        setup: setup.label,
        name: setup.name,
        runners: setup.runners,
        sat_rps: of(&|s| Some(s.sat.rps)),
        cpu_us_per_req: of(&|s| Some(s.sat_cpu_us_per_req)),
        worker_cpu_us_per_req: of(&|s| s.sat_worker_cpu_us_per_req),
        lat_cpu_us_per_req: of(&|s| s.lat_cpu_us_per_req),
        p50_us: of(&|s| s.lat.as_ref().map(|l| l.p50_us)),
        p99_us: of(&|s| s.lat.as_ref().map(|l| l.p99_us)),
        idle_cpu_pct: of(&|s| Some(s.idle_cpu_pct)),
        rss_mb: of(&|s| Some(s.rss_bytes as f64 / 1048576.0)),
        start_s: of(&|s| Some(s.start_s)),
        reloads_during_saturation: of(&|s| s.sat_reloads.map(|v| v as f64)),
        reload_us_each: of(&|s| s.sat_reload_us_each),
        first_load_us: of(&|s| s.first_load_us_each),
        vm_memory_mb: of(&|s| s.filter_stats.get("vm_memory_bytes").map(|&v| v as f64 / 1048576.0)),
    }
}

fn fmt_spread(s: &Spread, prec: usize) -> String {
    if s.n == 0 {
        return "-".into();
    }
    if s.n == 1 {
        return format!("{:.prec$}", s.median);
    }
    format!("{:.prec$} [{:.prec$}..{:.prec$}]", s.median, s.min, s.max)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    for (what, p) in [("envoy", envoy_bin()), ("hint_router.wasm", wasm_path())] {
        if !p.exists() {
            bail!(
                "{what} missing at {}: build with `cargo build --release --target wasm32-wasip1 -p hint-router -p noop-filter` (and scripts/setup.sh for Envoy)",
                p.display()
            );
        }
    }
    ensure_wrk()?;
    let pin = args.pin && proc::cpu_count() >= 2;
    let args = Args { pin, ..args };
    let started = Instant::now();
    let load_before = loadavg();
    eprintln!(
        "bench-overhead: {} reps of [{}], saturation {} s, latency {} s, {} CPUs, pinning {}, loadavg {load_before}",
        args.reps,
        args.setups.iter().map(|s| s.label).collect::<Vec<_>>().join(","),
        args.duration,
        args.latency_duration,
        proc::cpu_count(),
        if args.pin { "envoy worker->cpu0; wrk, generator, upstream, envoy main->cpu1" } else { "off" }
    );

    if let Some(setup) = args.serve {
        let up = Upstream::start(setup.runners, HINTS_PER_RUNNER, None)?;
        let run = envoy::start(&setup, up.addrs(), None, &args.plugin)?;
        println!(
            "({}) {} at {} (admin 127.0.0.1:{}, pid {}, dir {}); press enter to stop",
            setup.label,
            setup.name,
            run.envoy.url(),
            run.envoy.admin,
            run.pid,
            run.envoy.dir.display()
        );
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        return Ok(());
    }

    let mem: Vec<_> =
        [8usize, 100, 1000].iter().filter_map(|&n| memory::estimate(n, HINTS_PER_RUNNER)).collect();

    let max_runners = args.setups.iter().map(|s| s.runners).max().unwrap_or(8);
    let up = Upstream::start(max_runners, HINTS_PER_RUNNER, args.pin.then_some(LOAD_CPU))?;

    // The latency rate: half of the slowest setup's saturated rate.
    let rate = match args.rate {
        Some(r) => r,
        None => {
            let mut slowest = f64::MAX;
            for s in &args.setups {
                let cal = Args { duration: args.warmup.max(1.0), ..args.clone() };
                let smp = run_setup(&cal, s, &up, None, 0)?;
                eprintln!("calibration: ({}) {:.0} req/s", s.label, smp.sat.rps);
                slowest = slowest.min(smp.sat.rps);
            }
            (slowest * 0.5).max(100.0).round()
        }
    };
    eprintln!("latency runs at {rate} req/s (open loop, {} connections)", args.latency_conns);

    let mut samples = Vec::new();
    for rep in 0..args.reps {
        for s in &args.setups {
            let smp = run_setup(&args, s, &up, Some(rate), rep)?;
            eprintln!(
                "rep {rep} ({}): {:.0} req/s, {:.1} us CPU/req (worker {:.1}), p50 {:.0} us p99 {:.0} us, idle CPU {:.1}%{}",
                s.label,
                smp.sat.rps,
                smp.sat_cpu_us_per_req,
                smp.sat_worker_cpu_us_per_req.unwrap_or(f64::NAN),
                smp.lat.as_ref().map(|l| l.p50_us).unwrap_or(f64::NAN),
                smp.lat.as_ref().map(|l| l.p99_us).unwrap_or(f64::NAN),
                smp.idle_cpu_pct,
                if smp.sat.non_2xx + smp.sat.socket_errors + smp.lat.as_ref().map(|l| l.errors).unwrap_or(0) > 0 {
                    format!(
                        " ERRORS: wrk non-2xx {} socket {}, open-loop {}",
                        smp.sat.non_2xx,
                        smp.sat.socket_errors,
                        smp.lat.as_ref().map(|l| l.errors).unwrap_or(0)
                    )
                } else {
                    String::new()
                }
            );
            samples.push(smp);
        }
    }
    drop(up);
    let load_after = loadavg();

    let summaries: Vec<Summary> = args.setups.iter().map(|s| summarise(s, &samples)).collect();
    let get = |l: &str| summaries.iter().find(|s| s.setup == l);

    println!();
    println!(
        "Envoy --concurrency 1, {} reps interleaved; median [min..max]; loadavg before {load_before}, after {load_after}",
        args.reps
    );
    println!(
        "{:<28} {:>24} {:>22} {:>22} {:>22} {:>22}",
        "setup", "saturated req/s", "Envoy CPU us/req", "worker CPU us/req", "p50 us @ rate", "p99 us @ rate"
    );
    for s in &summaries {
        println!(
            "{:<28} {:>24} {:>22} {:>22} {:>22} {:>22}",
            format!("({}) {}", s.setup, s.name),
            fmt_spread(&s.sat_rps, 0),
            fmt_spread(&s.cpu_us_per_req, 1),
            fmt_spread(&s.worker_cpu_us_per_req, 1),
            fmt_spread(&s.p50_us, 0),
            fmt_spread(&s.p99_us, 0)
        );
    }
    println!("latency rate: {rate} req/s; idle background CPU, RSS, start time:");
    for s in &summaries {
        println!(
            "  ({}) idle CPU {}%, RSS {} MB, start {} s, CPU us/req at the latency rate {}",
            s.setup,
            fmt_spread(&s.idle_cpu_pct, 1),
            fmt_spread(&s.rss_mb, 0),
            fmt_spread(&s.start_s, 1),
            fmt_spread(&s.lat_cpu_us_per_req, 1)
        );
        if s.vm_memory_mb.n > 0 {
            println!(
                "      filter VM linear memory {} MB; first table load {} us; reloads during saturation {}, {} us each",
                fmt_spread(&s.vm_memory_mb, 1),
                fmt_spread(&s.first_load_us, 0),
                fmt_spread(&s.reloads_during_saturation, 0),
                fmt_spread(&s.reload_us_each, 0)
            );
        }
    }

    // Targets and added costs (from medians).
    let mut targets = Vec::new();
    if let (Some(a), Some(b)) = (get("a"), get("b")) {
        let floor = b.cpu_us_per_req.median - a.cpu_us_per_req.median;
        println!("\nadded over (a), medians: (b) {floor:.1} us CPU/req");
        let pick = get("p").map(|p| p.cpu_us_per_req.median - a.cpu_us_per_req.median);
        if let Some(p) = pick {
            println!(
                "  (p) {p:.1} us CPU/req: the no-op filter plus Envoy's native steering by a fixed pick"
            );
        }
        for setup in args.setups.iter().filter(|s| s.variant == Variant::HintRouter) {
            let l = setup.label;
            if let Some(c) = get(l) {
                let added = c.cpu_us_per_req.median - a.cpu_us_per_req.median;
                let added_w = c.worker_cpu_us_per_req.median - a.worker_cpu_us_per_req.median;
                let floor_w = b.worker_cpu_us_per_req.median - a.worker_cpu_us_per_req.median;
                let limit = 1.2 * floor + 3.0;
                let limit_w = 1.2 * floor_w + 3.0;
                let met = added <= limit;
                println!(
                    "  ({l}) {added:.1} us CPU/req (worker thread {added_w:.1}); target <= 1.2 x {floor:.1} + 3 = {limit:.1}: {}; \
                     p50 +{:.0} us, p99 +{:.0} us{}",
                    if met { "MET" } else { "MISSED" },
                    c.p50_us.median - a.p50_us.median,
                    c.p99_us.median - a.p99_us.median,
                    pick.map(|p| format!("; {:.1} over (p)", added - p)).unwrap_or_default()
                );
                targets.push(json!({
                    "target": format!("({l}) - (a) <= 1.2 x ((b) - (a)) + 3 us Envoy CPU/request"),
                    "added_us": added, "limit_us": limit, "met": met,
                    "worker_thread_added_us": added_w, "worker_thread_limit_us": limit_w,
                    "added_p50_us": c.p50_us.median - a.p50_us.median,
                    "added_p99_us": c.p99_us.median - a.p99_us.median,
                    "over_p_us": pick.map(|p| added - p),
                }));
            }
        }
        println!(
            "  (b) p50 +{:.0} us, p99 +{:.0} us",
            b.p50_us.median - a.p50_us.median,
            b.p99_us.median - a.p99_us.median
        );
    }
    println!();
    memory::print_table("native heap estimate of a filter VM (x86_64 sizes; counting allocator):", &mem);
    let doc = json!({
        "settings": {
            "reps": args.reps, "saturation_s": args.duration, "latency_s": args.latency_duration,
            "warmup_s": args.warmup, "latency_rate": rate, "wrk_connections": args.conns,
            "latency_connections": args.latency_conns, "pinned": args.pin, "cpus": proc::cpu_count(),
            "hints_per_runner": HINTS_PER_RUNNER, "hint": fixture::hit_hint(),
            "loadavg_before": load_before, "loadavg_after": load_after,
            "elapsed_s": started.elapsed().as_secs_f64(),
        },
        "summary": summaries,
        "targets": targets,
        "memory_native": mem,
        "samples": samples,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_vec_pretty(&doc)?)?;
    println!("\nwrote {} ({:.0} s)", args.out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 2s test @ http://127.0.0.1:1/\n  1 threads and 16 connections\n  Latency Distribution\n     50%  512.00us\n     75%  1.02ms\n     90%    1.50ms\n     99%    2.10ms\n  41234 requests in 2.00s, 5.00MB read\n  Non-2xx or 3xx responses: 3\n  Socket errors: connect 0, read 1, write 0, timeout 2\nRequests/sec:  20617.00\nTransfer/sec:      2.50MB\n";
        let w = parse_wrk(out).unwrap();
        assert_eq!((w.requests, w.non_2xx, w.socket_errors), (41234, 3, 3));
        assert_eq!(w.rps, 20617.0);
        assert_eq!((w.p50_us, w.p99_us), (512.0, 2100.0));
        assert!(parse_wrk("nothing").is_err());
    }
}
