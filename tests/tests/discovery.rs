//! Fleets that change (issue 11): the runners are the hosts of Envoy's own `runners` cluster,
//! read with their health through the admin API, so EDS updates, STRICT_DNS names and health
//! checks reach the filter within a poll interval, on a live Envoy, with nothing restarted.
//! Each test prints what it measured (`cargo test -p hint-router-e2e --test discovery -- --nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hint_router_e2e::configs::EdsFile;
use hint_router_e2e::fake::{FakeRunner, HintsMode};
use hint_router_e2e::util::wait_until;
use hint_router_e2e::{infer, Envoy, EnvoyOptions, Runner, Stack};
use std::collections::HashSet;
use std::time::{Duration, Instant};

fn stat(e: &Envoy, name: &str) -> u64 {
    e.stat(&format!("wasmcustom.hint_router.{name}")).unwrap_or(0)
}

/// Waits until the filter sees `n` available runners; how long it took.
fn until_available(e: &Envoy, n: u64, what: &str) -> Duration {
    let took = wait_until(Duration::from_secs(15), || stat(e, "runners_available") == n);
    took.unwrap_or_else(|| {
        panic!(
            "{what}: runners_available stuck at {} (want {n}); log:\n{}",
            stat(e, "runners_available"),
            e.log_text()
        )
    })
}

/// The runners that served `n` unhinted requests.
fn served_by(e: &Envoy, n: usize) -> HashSet<String> {
    (0..n)
        .map(|i| {
            let a = infer(&e.url(), &format!("spread-{i}"), None, &[]);
            assert_eq!(a.status, 200, "{a:?}");
            a.upstream
        })
        .collect()
}

#[test]
fn eds_runners_join_leave_and_turn_unhealthy_on_a_live_envoy() {
    let runners: Vec<Runner> =
        (0..3).map(|_| Runner::start(&["--load-ms", "20", "--infer-ms", "2"])).collect();
    let (a, b, c) = (&runners[0].addr, &runners[1].addr, &runners[2].addr);
    let eds = EdsFile::new();
    eds.set(&[(a, "HEALTHY"), (b, "HEALTHY")]);
    let e = Envoy::start(&[], &eds.options(EnvoyOptions::default()), 2);
    assert_eq!(served_by(&e, 20), HashSet::from([a.clone(), b.clone()]));

    // A runner joins: traffic within a poll interval (500 ms), no restart.
    let t = Instant::now();
    eds.set(&[(a, "HEALTHY"), (b, "HEALTHY"), (c, "HEALTHY")]);
    until_available(&e, 3, "join");
    let joined = t.elapsed();
    let hinted = infer(&e.url(), "new-model", Some(b"new-model"), &[]);
    assert_eq!(hinted.status, 200);
    assert!(served_by(&e, 30).contains(c), "the new runner gets traffic");

    // One leaves: never picked again.
    let t = Instant::now();
    eds.set(&[(b, "HEALTHY"), (c, "HEALTHY")]);
    until_available(&e, 2, "leave");
    let left = t.elapsed();
    assert!(!served_by(&e, 30).contains(a), "a runner that left still gets traffic");

    // EDS marks one unhealthy: out of rotation, hinted or not.
    let t = Instant::now();
    eds.set(&[(b, "UNHEALTHY"), (c, "HEALTHY")]);
    until_available(&e, 1, "unhealthy");
    let unhealthy = t.elapsed();
    assert_eq!(served_by(&e, 20), HashSet::from([c.clone()]));
    for _ in 0..5 {
        let h = infer(&e.url(), "new-model", Some(b"new-model"), &[]);
        assert_eq!(h.upstream, *c, "{h:?}");
    }
    // Healthy again: back after its next poll.
    eds.set(&[(b, "HEALTHY"), (c, "HEALTHY")]);
    let back = until_available(&e, 2, "healthy again");
    eprintln!(
        "EDS: join seen in {:.0} ms, leave in {:.0} ms, unhealthy in {:.0} ms, healthy again in {:.0} ms; joined {} left {}",
        joined.as_secs_f64() * 1e3,
        left.as_secs_f64() * 1e3,
        unhealthy.as_secs_f64() * 1e3,
        back.as_secs_f64() * 1e3,
        stat(&e, "runners_joined"),
        stat(&e, "runners_left")
    );
    // One poll interval (500 ms) plus the time Envoy takes to apply the file.
    for (what, d) in [("join", joined), ("leave", left), ("unhealthy", unhealthy)] {
        assert!(d < Duration::from_millis(1500), "{what} took {d:?}");
    }
    assert_eq!((stat(&e, "runners_joined"), stat(&e, "runners_left")), (3, 1));
}

#[test]
fn strict_dns_names_resolve_to_runners() {
    let runners: Vec<Runner> =
        (0..2).map(|_| Runner::start(&["--load-ms", "20", "--infer-ms", "2"])).collect();
    let addrs: Vec<String> = runners.iter().map(|r| r.addr.clone()).collect();
    // The shipped config with both runner clusters STRICT_DNS on `localhost:PORT`.
    let mut replace: Vec<(String, String)> = vec![(
        "    type: STATIC\n    connect_timeout: 1s\n".into(),
        "    type: STRICT_DNS\n    dns_lookup_family: V4_ONLY\n    connect_timeout: 1s\n".into(),
    )];
    replace.push((
        "  - name: hint_router_poll\n    type: STATIC\n".into(),
        "  - name: hint_router_poll\n    type: STRICT_DNS\n    dns_lookup_family: V4_ONLY\n".into(),
    ));
    for a in &addrs {
        let port = a.rsplit(':').next().unwrap();
        replace.push((
            format!("address: 127.0.0.1, port_value: {port}}}"),
            format!("address: localhost, port_value: {port}}}"),
        ));
    }
    let e = Envoy::start(&addrs, &EnvoyOptions { replace, ..EnvoyOptions::default() }, 2);
    let first = infer(&e.url(), "dns-model", Some(b"dns-model"), &[]);
    let again: Vec<String> =
        (0..5).map(|_| infer(&e.url(), "dns-model", Some(b"dns-model"), &[]).upstream).collect();
    eprintln!("STRICT_DNS localhost: first on {}, then {again:?}", first.upstream);
    assert!(addrs.contains(&first.upstream), "{first:?}");
    assert!(again.iter().all(|u| *u == first.upstream), "hinted requests stick: {again:?}");
}

#[test]
fn a_runner_failing_envoys_health_check_leaves_the_candidates() {
    let good = Runner::start(&["--load-ms", "20", "--infer-ms", "2"]);
    let fake = FakeRunner::start(HintsMode::Report(vec!["m".into()]));
    fake.set_header_hints("m");
    let e = Envoy::start(&[good.addr.clone(), fake.addr.clone()], &EnvoyOptions::default(), 2);
    let before = infer(&e.url(), "m", Some(b"m"), &[]);
    assert_eq!(before.upstream, fake.addr, "the fake holds m");
    // Its /hints stays fine; only Envoy's active health check (GET /health, 2 s interval,
    // unhealthy after 2 failures) says it is down.
    let t = Instant::now();
    fake.set_health_status(503);
    let took = until_available(&e, 1, "health check failure");
    let after: Vec<String> = (0..5).map(|_| infer(&e.url(), "m", Some(b"m"), &[]).upstream).collect();
    eprintln!(
        "active health check: left out {:.1} s after /health turned 503; then m went to {after:?}",
        took.as_secs_f64()
    );
    assert!(after.iter().all(|u| *u == good.addr), "{after:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
    fake.set_health_status(200);
    until_available(&e, 2, "health check passing again");
}

// Pods get new addresses on every rollout: slots are reused, so the table does not grow.
#[test]
fn two_hundred_rollouts_reuse_slots_and_memory_stays_flat() {
    let eds = EdsFile::new();
    let fleet =
        |gen: u16| -> Vec<String> { (0..4).map(|k| format!("127.0.0.1:{}", 40_000 + gen + k)).collect() };
    let set = |gen: u16| {
        let f = fleet(gen);
        let hosts: Vec<(&str, &str)> = f.iter().map(|a| (a.as_str(), "HEALTHY")).collect();
        eds.set(&hosts);
    };
    set(0);
    let opts = EnvoyOptions {
        plugin: vec![("poll_interval_ms".into(), "50".into()), ("poll_timeout_ms".into(), "40".into())],
        ..eds.options(EnvoyOptions::default())
    };
    let e = Envoy::start(&[], &opts, 0);
    assert!(wait_until(Duration::from_secs(10), || stat(&e, "runners") == 4).is_some());
    let heap0 = hint_router_e2e::util::envoy_allocated(&e);
    for gen in 1..=200u16 {
        set(gen); // one runner replaced by a new address
        let want = 4 + u64::from(gen);
        assert!(
            wait_until(Duration::from_secs(10), || stat(&e, "runners_joined") >= want).is_some(),
            "rollout {gen} not seen"
        );
    }
    let heap1 = hint_router_e2e::util::envoy_allocated(&e);
    eprintln!(
        "200 rollouts: joined {}, left {}, runners {}; Envoy heap {:.1} -> {:.1} MiB",
        stat(&e, "runners_joined"),
        stat(&e, "runners_left"),
        stat(&e, "runners"),
        heap0 as f64 / 1048576.0,
        heap1 as f64 / 1048576.0
    );
    assert_eq!(stat(&e, "runners"), 4);
    assert_eq!(stat(&e, "runners_left"), 200);
    assert!(heap1 < heap0 + 4 * 1048576, "heap grew from {heap0} to {heap1}");
}

// A change of one runner reaches the workers as a delta of that runner, not as a reload of the
// whole table (`table_deltas` against `table_reloads`). Each of six runners loads a model
// straight (not through Envoy), so only its own poll tells the filter; afterwards every
// request for that model, on either worker, goes to that runner as a hit. A worker that missed
// a delta would route the model as a miss elsewhere.
#[test]
fn a_change_of_one_runner_reaches_every_worker_as_a_delta() {
    let stack = Stack::start(8, &["--load-ms", "1", "--infer-ms", "1"], &EnvoyOptions::default());
    let e = &stack.envoy;
    let url = e.url();
    let (reloads0, deltas0) = (stat(e, "table_reloads"), stat(e, "table_deltas"));
    for (k, r) in stack.runners.iter().enumerate().take(6) {
        let m = format!("only-on-{k}");
        let a = infer(&format!("http://{}", r.addr), &m, None, &[]);
        assert_eq!(a.status, 200, "{a:?}");
        // Two polls of every runner later, the poller has published it.
        let polls = stat(e, "poll_ok");
        e.wait_stat("wasmcustom.hint_router.poll_ok", Duration::from_secs(10), |v| v >= polls + 16);
        for _ in 0..6 {
            let a = infer(&url, &m, Some(m.as_bytes()), &[]);
            assert_eq!(
                (a.status, a.cache.as_str(), a.upstream.as_str()),
                (200, "hit", r.addr.as_str()),
                "{m} (runner {k}): {a:?}\n{}",
                e.log_text()
            );
        }
    }
    let (reloads, deltas) = (stat(e, "table_reloads") - reloads0, stat(e, "table_deltas") - deltas0);
    eprintln!(
        "six single-runner changes: {deltas} deltas applied, {reloads} whole-table loads (workers' first)"
    );
    assert!(deltas >= 6, "{deltas} deltas, {reloads} whole-table loads");
    // At most each worker's first load of the table.
    assert!(reloads <= 2, "{reloads} whole-table loads, {deltas} deltas");
}
