//! End-to-end: the shipped Envoy config with the hint-router filter, `--concurrency 2`, in
//! front of real `runner-example` processes on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hint_router_e2e::util::make_models;
use hint_router_e2e::{infer, Envoy, EnvoyOptions, Runner, Stack};
use std::collections::HashSet;
use std::time::{Duration, Instant};

fn hint(m: &str) -> Option<&[u8]> {
    Some(m.as_bytes())
}

/// Waits until the runner's own /hints reports `pred`.
fn wait_runner(
    stack: &Stack,
    idx: usize,
    limit: Duration,
    pred: impl Fn(&hint_router_core::wire::HintsReport) -> bool,
) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if stack.runners[idx].hints().as_ref().is_some_and(&pred) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("runner {idx} never reached the expected state");
}

#[test]
fn hinted_requests_stick_to_the_runner_holding_the_model() {
    let s = Stack::start(3, &["--load-ms", "200", "--infer-ms", "5"], &EnvoyOptions::default());
    let url = s.envoy.url();
    let first = infer(&url, "model-a", hint("model-a"), &[]);
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.cache, "miss");
    assert_eq!(first.decision, "miss");
    // Every later request, on new connections spread over both workers, lands on the holder.
    for i in 0..20 {
        let a = infer(&url, "model-a", hint("model-a"), &[]);
        assert_eq!(
            (a.status, a.cache.as_str(), a.decision.as_str()),
            (200, "hit", "hit"),
            "request {i}: {a:?}"
        );
        assert_eq!(a.upstream, first.upstream, "request {i}");
    }
    assert!(s.envoy.stat("wasmcustom.hint_router.hit").unwrap() >= 20);
    assert_eq!(s.envoy.vm_reloads(), 0);
}

#[test]
fn busy_holder_overflows_to_another_runner_without_waiting() {
    // One inference at a time per runner, each 2 s long.
    let s = Stack::start(
        3,
        &["--load-ms", "100", "--infer-ms", "2000", "--max-concurrency", "1"],
        &EnvoyOptions::default(),
    );
    let url = s.envoy.url();
    let warm = infer(&url, "model-a", hint("model-a"), &[]);
    assert_eq!(warm.status, 200);
    let holder = s.index_of(&warm.upstream).expect("holder");
    // Occupy the holder.
    let u = url.clone();
    let long = std::thread::spawn(move || infer(&u, "model-a", Some(b"model-a"), &[]));
    wait_runner(&s, holder, Duration::from_secs(10), |r| r.in_flight >= 1);
    // The next request for the same model must not queue behind it.
    let b = infer(&url, "model-a", hint("model-a"), &[]);
    assert_eq!(b.status, 200, "{b:?}");
    assert_eq!(b.decision, "busy_fallback", "{b:?}");
    assert_ne!(b.upstream, warm.upstream, "went to the busy holder: {b:?}");
    let body: serde_json::Value = serde_json::from_str(&b.body).unwrap();
    assert!(body["queue_ms"].as_u64().unwrap() < 1000, "it waited on the runner: {body}");
    let a = long.join().unwrap();
    assert_eq!((a.status, a.upstream.as_str(), a.cache.as_str()), (200, warm.upstream.as_str(), "hit"));
    assert!(s.envoy.stat("wasmcustom.hint_router.busy_fallback").unwrap() >= 1);
}

#[test]
fn unknown_hints_land_on_runners_with_free_slots() {
    // Capacity 1: each new model should go to a still-empty runner while one exists.
    let s =
        Stack::start(3, &["--load-ms", "50", "--infer-ms", "5", "--capacity", "1"], &EnvoyOptions::default());
    let url = s.envoy.url();
    let mut seen = HashSet::new();
    for m in ["model-x", "model-y", "model-z"] {
        let a = infer(&url, m, hint(m), &[]);
        assert_eq!((a.status, a.decision.as_str(), a.cache.as_str()), (200, "miss", "miss"), "{a:?}");
        assert!(seen.insert(a.upstream.clone()), "{m} went to an occupied runner {}", a.upstream);
        // The response header taught the filter; the next request for it is a hit there.
        let again = infer(&url, m, hint(m), &[]);
        assert_eq!((again.decision.as_str(), again.upstream.as_str()), ("hit", a.upstream.as_str()));
    }
}

#[test]
fn requests_without_a_hint_are_served() {
    let s = Stack::start(3, &["--load-ms", "20", "--infer-ms", "5"], &EnvoyOptions::default());
    let url = s.envoy.url();
    for i in 0..6 {
        let a = infer(&url, "model-q", None, &[]);
        assert_eq!((a.status, a.decision.as_str()), (200, "no_hint"), "request {i}: {a:?}");
    }
    assert!(s.envoy.stat("wasmcustom.hint_router.no_hint").unwrap() >= 6);
}

#[test]
fn malformed_hints_are_served_and_the_vm_survives() {
    let s = Stack::start(3, &["--load-ms", "20", "--infer-ms", "5"], &EnvoyOptions::default());
    let url = s.envoy.url();
    let big60 = vec![b'a'; 60 * 1024];
    let big59 = vec![b'b'; 59 * 1024];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("non-utf8", vec![0xff, 0xfe, b'x', 0x80], "no_hint"),
        ("latin-1", "caf\u{e9}".bytes().collect(), "no_hint"),
        ("60 KiB", big60, "no_hint"),
        ("59 KiB", big59, "no_hint"),
        ("comma list", b"a,b".to_vec(), "no_hint"),
        ("inner space", b"a b".to_vec(), "no_hint"),
        ("empty", Vec::new(), "no_hint"),
        // Valid once trimmed: model-p is resident by now (loaded by the requests above).
        ("padded", b"  model-p  ".to_vec(), "hit"),
    ];
    for (name, value, want) in &cases {
        let a = infer(&url, "model-p", Some(value), &[]);
        assert_eq!(a.status, 200, "{name}: {a:?}");
        assert_eq!(a.decision, *want, "{name}");
    }
    assert_eq!(s.envoy.stat("wasmcustom.hint_router.invalid_hint"), Some(6));
    assert_eq!(s.envoy.vm_reloads(), 0);
    // Still routing by hint afterwards.
    assert_eq!(infer(&url, "model-p", hint("model-p"), &[]).decision, "hit");
}

#[test]
fn a_client_sent_steering_header_changes_nothing() {
    let s = Stack::start(3, &["--load-ms", "20", "--infer-ms", "5"], &EnvoyOptions::default());
    let url = s.envoy.url();
    let warm = infer(&url, "model-s", hint("model-s"), &[]);
    let others: Vec<String> =
        s.runners.iter().map(|r| r.addr.clone()).filter(|a| *a != warm.upstream).collect();
    let forged = others.join(",");
    for _ in 0..10 {
        let a = infer(&url, "model-s", hint("model-s"), &[("x-hint-router-pick", &forged)]);
        assert_eq!(
            (a.status, a.upstream.as_str()),
            (200, warm.upstream.as_str()),
            "forged pick honoured: {a:?}"
        );
    }
    // Without a hint the filter still decides: the forged runner does not get everything.
    let target = &others[0];
    let hits = (0..9)
        .map(|_| infer(&url, "model-s", None, &[("x-hint-router-pick", target)]))
        .filter(|a| a.upstream == *target)
        .count();
    assert!(hits < 9, "all 9 unhinted requests went to the forged runner");
}

#[test]
fn killing_a_runner_fails_at_most_its_in_flight_requests() {
    let mut s = Stack::start(
        3,
        &["--load-ms", "50", "--infer-ms", "100", "--max-concurrency", "2"],
        &EnvoyOptions::default(),
    );
    let url = s.envoy.url();
    // Give every runner a model, then find which runner holds model-0.
    for m in 0..6 {
        let name = format!("model-{m}");
        assert_eq!(infer(&url, &name, hint(&name), &[]).status, 200);
    }
    let victim_addr = infer(&url, "model-0", hint("model-0"), &[]).upstream;
    let victim = s.index_of(&victim_addr).unwrap();
    let clients = 4;
    let load = hint_router_e2e::SteadyLoad::start(&url, clients, 6);
    std::thread::sleep(Duration::from_millis(800));
    let killed_at = Instant::now();
    s.runners[victim].kill();
    std::thread::sleep(Duration::from_millis(2500));
    let results = load.stop();
    let failed: Vec<_> = results.iter().filter(|(_, a)| a.status != 200).collect();
    let on_victim_after = results.iter().filter(|(t, a)| *t > killed_at && a.upstream == victim_addr).count();
    eprintln!(
        "kill: {} requests ({} after the kill), {} failed {:?}; answered by the dead runner after the kill: {on_victim_after}",
        results.len(),
        results.iter().filter(|(t, _)| *t > killed_at).count(),
        failed.len(),
        failed.iter().map(|(_, a)| (a.status, a.elapsed)).collect::<Vec<_>>()
    );
    // At most one request per client can have been in flight on the victim when it died.
    assert!(failed.len() <= clients, "{} failures: {:?}", failed.len(), failed);
    for (_, a) in &failed {
        assert!(a.status >= 500 && a.elapsed < Duration::from_secs(5), "unclear or slow failure: {a:?}");
    }
    // Requests sent more than one poll interval (500 ms) + 1 s after the kill never go there.
    let late: Vec<_> = results
        .iter()
        .filter(|(t, a)| {
            *t > killed_at + Duration::from_millis(1500) && (a.upstream == victim_addr || a.status != 200)
        })
        .collect();
    assert!(late.is_empty(), "late requests hit the dead runner: {late:?}");
    assert!(results.iter().filter(|(t, _)| *t > killed_at).count() > 10, "too little load after the kill");
    s.envoy.wait_stat("wasmcustom.hint_router.runners_available", Duration::from_secs(5), |v| v == 2);
}

#[test]
fn bad_plugin_config_is_rejected_naming_the_field() {
    let runners = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".into(), "127.0.0.1:3".into()];
    let opts =
        EnvoyOptions { plugin: vec![("max_candidates".into(), "0".into())], ..EnvoyOptions::default() };
    let text = hint_router_e2e::render_config(&runners, 1, 2, &opts);
    let (accepted, log) = hint_router_e2e::util::validate_config("badcfg", &text);
    assert!(!accepted, "envoy accepted a bad config:\n{log}");
    assert!(log.contains("field `max_candidates`"), "error does not name the field:\n{log}");
}

/// A miss goes to the runner that has the model in its warm tier (`/hints` `warm`, host
/// memory: a copy instead of a disk read and checks), even where the eviction it causes looks
/// dearer than on a runner that has the model nowhere.
#[test]
fn a_miss_goes_to_the_runner_holding_the_model_warm() {
    let dir = make_models(6, 1);
    let args = [
        "--backend",
        "cpu",
        "--models-dir",
        dir.to_str().unwrap(),
        "--capacity",
        "1",
        "--host-cache-mb",
        "64",
    ];
    let runners = [Runner::start(&args), Runner::start(&args)];
    // Straight to the runners, before Envoy: runner 0 loads model-0..3 in turn (one slot, so
    // it ends holding model-3 with the other three warm), runner 1 loads model-5.
    let direct = |r: &Runner, m: &str| {
        let a = infer(&format!("http://{}", r.addr), m, None, &[]);
        assert_eq!(a.status, 200, "{a:?}");
    };
    for m in ["model-0", "model-1", "model-2", "model-3"] {
        direct(&runners[0], m);
    }
    direct(&runners[1], "model-5");
    let report = runners[0].hints().unwrap();
    assert_eq!(report.hints, ["model-3"]);
    assert_eq!(report.warm, ["model-2", "model-1", "model-0"]);
    assert!(runners[1].hints().unwrap().warm.is_empty());
    let addrs: Vec<String> = runners.iter().map(|r| r.addr.clone()).collect();
    let envoy = Envoy::start(&addrs, &EnvoyOptions::default(), 2);
    let url = envoy.url();
    // Each of model-0..2 is a miss (held nowhere), and goes to runner 0. From the second
    // on, runner 0's eviction victim is the model just requested, runner 1's one never asked
    // for: by eviction cost alone these would go to runner 1.
    for m in ["model-0", "model-1", "model-2"] {
        let a = infer(&url, m, hint(m), &[]);
        assert_eq!(
            (a.status, a.decision.as_str(), a.upstream.as_str()),
            (200, "miss", addrs[0].as_str()),
            "{m}: {a:?}"
        );
    }
    assert_eq!(envoy.stat("wasmcustom.hint_router.warm_miss"), Some(3));
    // A model warm nowhere is an ordinary miss: not counted as warm.
    let a = infer(&url, "model-4", hint("model-4"), &[]);
    assert_eq!((a.status, a.decision.as_str()), (200, "miss"), "{a:?}");
    assert_eq!(envoy.stat("wasmcustom.hint_router.warm_miss"), Some(3));
}

#[test]
fn a_miss_asks_the_runner_to_evict_the_coldest_model_and_clients_cannot() {
    // One runner, two slots. a is hot, b was asked for once, after a: the runner's least
    // recently used model is a. A miss for c must evict b (the filter's x-hint-router-evict),
    // not a, as the runner alone would.
    let s =
        Stack::start(1, &["--load-ms", "20", "--infer-ms", "1", "--capacity", "2"], &EnvoyOptions::default());
    let url = s.envoy.url();
    for i in 0..20 {
        let a = infer(&url, "model-a", hint("model-a"), &[]);
        assert_eq!(a.status, 200, "request {i}: {a:?}");
    }
    let b = infer(&url, "model-b", hint("model-b"), &[]);
    assert_eq!(b.status, 200, "{b:?}");
    wait_runner(&s, 0, Duration::from_secs(5), |r| r.hints == ["model-b", "model-a"]);
    let c = infer(&url, "model-c", hint("model-c"), &[]);
    assert_eq!((c.status, c.cache.as_str()), (200, "miss"), "{c:?}");
    wait_runner(&s, 0, Duration::from_secs(5), |r| r.hints == ["model-c", "model-a"]);
    // A client naming a victim itself is not heard: with no hint the filter asks for no
    // eviction, and Envoy strips the client's header, so the runner evicts its least
    // recently used model (c), not the one the client named (a).
    let a = infer(&url, "model-a", hint("model-a"), &[]);
    assert_eq!((a.status, a.cache.as_str()), (200, "hit"), "{a:?}");
    let e = infer(&url, "model-e", None, &[("x-hint-router-evict", "model-a")]);
    assert_eq!((e.status, e.cache.as_str()), (200, "miss"), "{e:?}");
    wait_runner(&s, 0, Duration::from_secs(5), |r| r.hints == ["model-e", "model-a"]);
}
