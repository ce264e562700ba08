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
/// Returns each request's Envoy, runner and decision.
fn burst(urls: &[String], model: &str, n: usize) -> Vec<(usize, String, String)> {
    let start = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (url, model, start) = (urls[i % urls.len()].clone(), model.to_string(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let a = infer(&url, &model, Some(model.as_bytes()), &[]);
                assert_eq!(a.status, 200, "{a:?}");
                (i % 2, a.upstream, a.decision)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Waits until every runner was polled again by `e` since the last burst: another Envoy's
/// requests, which this one counts from the runners' reports, are gone from its counts only
/// at the next poll ("idle runners" means idle in every Envoy's view too).
fn settle(e: &Envoy, runners: usize) {
    let stat = || e.stat("wasmcustom.hint_router.poll_ok").unwrap_or(0);
    let p = stat();
    let want = p + 2 * runners as u64;
    assert!(
        hint_router_e2e::util::wait_until(std::time::Duration::from_secs(10), || stat() >= want).is_some()
    );
}

/// Teaches every worker of `e` load and inference times (the `fastest` mode needs both), on
/// two models, so that the runners keep free cache slots.
fn warm_up(e: &Envoy, tag: &str) {
    for i in 0..16 {
        let m = format!("warm-{tag}-{}", i % 2);
        assert_eq!(infer(&e.url(), &m, Some(m.as_bytes()), &[]).status, 200);
    }
}

// On runners with free cache slots, in `any_available` mode two Envoys start exactly as many
// loads as one (asserted). With full caches they may not: each Envoy weighs eviction victims
// by its own popularity estimate, so they can disagree on the cheapest victim. In
// `fastest` mode the count is printed, not asserted: the second Envoy learns the first one's
// requests queued at the holder from the runner's own count (rebased on polls) and may judge a
// second load faster than that queue (measured: one Envoy 1-2 loads, two Envoys 2-3).
#[test]
fn a_cold_burst_split_over_two_envoys_starts_no_more_loads_than_through_one_in_any_available_mode() {
    // Capacity 6: every burst finds free slots (no eviction to weigh; see below).
    let args = ["--load-ms", "800", "--infer-ms", "20", "--max-concurrency", "4", "--capacity", "6"];
    let mut report = Vec::new();
    for mode in ["any_available", "fastest"] {
        let runners: Vec<Runner> = (0..3).map(|_| Runner::start(&args)).collect();
        let addrs: Vec<String> = runners.iter().map(|r| r.addr.clone()).collect();
        let a = Envoy::start(&addrs, &plugin(mode), 3);
        let b = Envoy::start(&addrs, &plugin(mode), 3);
        warm_up(&a, "a");
        warm_up(&b, "b");
        // 4 requests (one runner's max_concurrency): one load if the Envoys agree on the
        // runner, two if each picked its own. 20: more than one runner can take at once.
        for n in [4, 20] {
            let one = format!("cold-one-{mode}-{n}");
            settle(&a, 3);
            settle(&b, 3);
            burst(&[a.url()], &one, n);
            settle(&a, 3);
            settle(&b, 3);
            let two = format!("cold-two-{mode}-{n}");
            let seen = burst(&[a.url(), b.url()], &two, n);
            let (l1, l2) = (loads(&runners, &one), loads(&runners, &two));
            eprintln!("{mode}, burst of {n}: one Envoy {l1} load(s), two Envoys {l2}");
            if l2 > l1 {
                eprintln!("  two Envoys: (envoy, runner, decision) {seen:?}");
            }
            report.push((mode, n, l1, l2));
        }
    }
    eprintln!("cold bursts on 3 idle runners (max_concurrency 4, 800 ms loads): {report:?}");
    for &(mode, n, l1, l2) in &report {
        if mode == "any_available" {
            assert!(l2 <= l1, "{mode}, burst of {n}: two Envoys started {l2} loads, one Envoy {l1}");
        }
    }
    assert_eq!((report[0].2, report[0].3), (1, 1), "a burst of 4: one load, through one Envoy or two");
}
