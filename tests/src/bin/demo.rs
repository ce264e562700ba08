//! `make demo`: starts three runners (127.0.0.1:18081-18083) and Envoy with the demo config
//! `envoy/demo.yaml` (127.0.0.1:10000; its debug headers say where requests went), sends a
//! short hinted workload, prints which runner served each request and whether its model was
//! already loaded, then stops everything.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use hint_router_e2e::{infer, Answer, Envoy, EnvoyOptions, Runner};
use std::collections::BTreeMap;
use std::time::Duration;

const LOAD_MS: &str = "800";

fn main() {
    let args = ["--capacity", "2", "--max-concurrency", "2", "--load-ms", LOAD_MS, "--infer-ms", "30"];
    println!("starting 3 runners (cache of 2 models each, loading a model takes {LOAD_MS} ms) and Envoy...");
    let runners: Vec<Runner> = ["127.0.0.1:18081", "127.0.0.1:18082", "127.0.0.1:18083"]
        .iter()
        .map(|a| Runner::start_at(a, &args))
        .collect();
    let addrs: Vec<String> = runners.iter().map(|r| r.addr.clone()).collect();
    // The demo config (the default): its debug headers say where each request went.
    let opts = EnvoyOptions { shipped_ports: true, ..EnvoyOptions::default() };
    let envoy = Envoy::start(&addrs, &opts, 3);
    let url = envoy.url();
    println!("Envoy on {url}, admin on http://127.0.0.1:9901\n");

    // A skewed workload over 6 models: 3 runners x 2 slots hold them all once placed.
    let models = ["llama", "llama", "sdxl", "llama", "whisper", "sdxl", "flux", "llama", "qwen", "mistral"];
    let mut log: Vec<(String, Answer)> = Vec::new();
    println!("{:>3}  {:<10} {:<17} {:<15} {:<6} {:>8}", "#", "hint", "runner", "decision", "cache", "ms");
    let mut n = 0;
    for round in 0..3 {
        for m in models.iter().skip(round % 2) {
            n += 1;
            let a = infer(&url, m, Some(m.as_bytes()), &[]);
            println!(
                "{n:>3}  {m:<10} {:<17} {:<15} {:<6} {:>8}",
                a.upstream,
                a.decision,
                a.cache,
                a.elapsed.as_millis()
            );
            log.push((m.to_string(), a));
        }
    }

    println!("\na burst of 6 concurrent requests for `llama` (each runner runs 2 at once):");
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let u = url.clone();
            std::thread::spawn(move || infer(&u, "llama", Some(b"llama"), &[]))
        })
        .collect();
    for h in handles {
        let a = h.join().unwrap();
        println!(
            "     llama      {:<17} {:<15} {:<6} {:>8}",
            a.upstream,
            a.decision,
            a.cache,
            a.elapsed.as_millis()
        );
        log.push(("llama".into(), a));
    }

    let ok = log.iter().filter(|(_, a)| a.status == 200).count();
    let hits = log.iter().filter(|(_, a)| a.cache == "hit").count();
    let mut per_runner: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, a) in &log {
        *per_runner.entry(a.upstream.as_str()).or_default() += 1;
    }
    let mean = |f: &dyn Fn(&Answer) -> bool| {
        let v: Vec<u128> = log.iter().filter(|(_, a)| f(a)).map(|(_, a)| a.elapsed.as_millis()).collect();
        if v.is_empty() {
            0
        } else {
            v.iter().sum::<u128>() / v.len() as u128
        }
    };
    println!(
        "\nsummary: {} requests, {ok} answered 200, cache hits {hits} ({:.0}%)",
        log.len(),
        100.0 * hits as f64 / log.len() as f64
    );
    println!(
        "mean latency: hit {} ms, miss {} ms",
        mean(&|a| a.cache == "hit"),
        mean(&|a| a.cache == "miss")
    );
    println!("requests per runner: {per_runner:?}");
    for stat in
        ["hit", "miss", "busy_fallback", "saturated", "no_hint", "invalid_hint", "poll_ok", "poll_error"]
    {
        if let Some(v) = envoy.stat(&format!("wasmcustom.hint_router.{stat}")) {
            print!("{stat}={v} ");
        }
    }
    println!("\n(Envoy stats, wasmcustom.hint_router.*)");
    std::thread::sleep(Duration::from_millis(10));
    drop(envoy);
    drop(runners);
    if ok != log.len() {
        eprintln!("demo: {} requests failed", log.len() - ok);
        std::process::exit(1);
    }
    println!("stopped Envoy and the runners.");
}
