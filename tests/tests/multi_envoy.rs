//! Several Envoys in front of the same runners (issue 11): they agree where a cold model goes
//! without talking to each other (ties broken by the hint), and learn each other's requests
//! from the runners' own counts. `cargo test -p hint-router-e2e --test multi_envoy -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hint_router_e2e::{infer, Envoy, EnvoyOptions, Runner};
use std::sync::{Arc, Barrier};

fn plugin(mode: &str) -> EnvoyOptions {
    EnvoyOptions {
        plugin: vec![("when_holders_busy".into(), format!("\"{mode}\""))],
        ..EnvoyOptions::default()
    }
}

/// Loads of `model` the runners started (their `loading model` log lines).
fn loads(runners: &[Runner], model: &str) -> usize {
    let line = format!("loading model {model}\n");
    runners.iter().map(|r| r.log_text().matches(&line).count()).sum()
}

/// `n` concurrent requests for `model`, request `i` through `urls[i % urls.len()]`; all 200.
fn burst(urls: &[String], model: &str, n: usize) {
    let start = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (url, model, start) = (urls[i % urls.len()].clone(), model.to_string(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                infer(&url, &model, Some(model.as_bytes()), &[]).status
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
}

/// Teaches every worker of `e` load and inference times (the `fastest` mode needs both).
fn warm_up(e: &Envoy, tag: &str) {
    for i in 0..24 {
        let m = format!("warm-{tag}-{}", i % 6);
        assert_eq!(infer(&e.url(), &m, Some(m.as_bytes()), &[]).status, 200);
    }
}

// In `any_available` mode two Envoys start exactly as many loads as one (asserted). In
// `fastest` mode the count is printed, not asserted: the second Envoy learns the first one's
// requests queued at the holder from the runner's own count (rebased on polls) and may judge a
// second load faster than that queue (measured: one Envoy 1-2 loads, two Envoys 2-3).
#[test]
fn a_cold_burst_split_over_two_envoys_starts_no_more_loads_than_through_one_in_any_available_mode() {
    let args = ["--load-ms", "800", "--infer-ms", "20", "--max-concurrency", "4", "--capacity", "3"];
    let mut report = Vec::new();
    for mode in ["any_available", "fastest"] {
        let runners: Vec<Runner> = (0..3).map(|_| Runner::start(&args)).collect();
        let addrs: Vec<String> = runners.iter().map(|r| r.addr.clone()).collect();
        let a = Envoy::start(&addrs, &plugin(mode), 3);
        let b = Envoy::start(&addrs, &plugin(mode), 3);
        warm_up(&a, "a");
        warm_up(&b, "b");
        let one = format!("cold-one-{mode}");
        burst(&[a.url()], &one, 20);
        let two = format!("cold-two-{mode}");
        burst(&[a.url(), b.url()], &two, 20);
        let (l1, l2) = (loads(&runners, &one), loads(&runners, &two));
        report.push((mode, l1, l2));
        eprintln!("{mode}: one Envoy {l1} load(s), two Envoys {l2}");
    }
    eprintln!("cold burst of 20 on 3 idle runners (max_concurrency 4, 800 ms loads): {report:?}");
    let (mode, l1, l2) = report[0];
    assert_eq!(mode, "any_available");
    assert!(l2 <= l1, "{mode}: two Envoys started {l2} loads, one Envoy {l1}");
}
