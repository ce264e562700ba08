//! Faults, abuse and security (`make test-faults`): dying, frozen and lying runners, garbage
//! `/hints`, hostile headers and forged steering, against a real Envoy. Each test prints the
//! figures it measured (`cargo test -p hint-router-e2e --test faults -- --nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hint_router_e2e::fake::{report_body, FakeRunner, HintsMode};
use hint_router_e2e::util::{envoy_allocated, wait_until};
use hint_router_e2e::{client, infer, Answer, Envoy, EnvoyOptions, Runner, Stack};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn h(m: &str) -> Option<&[u8]> {
    Some(m.as_bytes())
}

/// The (demo) config with, optionally, more plugin members.
fn opts(extra_plugin: &[(&str, &str)]) -> EnvoyOptions {
    EnvoyOptions {
        plugin: extra_plugin.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..EnvoyOptions::default()
    }
}

/// Sends raw bytes as one HTTP/1.1 request and returns the status code (0 = no answer).
fn raw_status(port: u16, request: &[u8]) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn stat_names(e: &Envoy) -> std::collections::BTreeSet<String> {
    let text = client().get(format!("http://127.0.0.1:{}/stats", e.admin)).send().unwrap().text().unwrap();
    text.lines().filter_map(|l| l.split(':').next()).map(str::to_string).collect()
}

// 2. A frozen runner (SIGSTOP).
#[test]
fn frozen_runner_is_bypassed_then_returns() {
    let s = Stack::start(3, &["--load-ms", "100", "--infer-ms", "5"], &opts(&[]));
    let url = s.envoy.url();
    let warm = infer(&url, "model-f", h("model-f"), &[]);
    let v = s.index_of(&warm.upstream).unwrap();
    s.runners[v].signal(libc::SIGSTOP);
    let frozen_at = Instant::now();
    // No request is in flight on it. (One that is would wait for the route timeout: the
    // shipped config has no per_try_timeout, so that slow runners are never raced; see
    // tests/tests/retries.rs.) Its polls time out and it leaves the table.
    let out = wait_until(Duration::from_secs(3), || {
        s.envoy.stat("wasmcustom.hint_router.runners_available") == Some(2)
    });
    let mut answers: Vec<(Duration, Answer)> = Vec::new();
    let sent_from = frozen_at.elapsed();
    while frozen_at.elapsed() < sent_from + Duration::from_secs(3) {
        answers.push((frozen_at.elapsed(), infer(&url, "model-f", h("model-f"), &[])));
    }
    let worst = answers.iter().map(|(_, a)| a.elapsed).max().unwrap();
    let on_frozen = answers.iter().filter(|(_, a)| a.upstream == warm.upstream).count();
    eprintln!(
        "frozen: out of the table {out:?} after SIGSTOP; then {} requests, all 200: {}, slowest {worst:?}, sent to the frozen runner: {on_frozen}",
        answers.len(),
        answers.iter().all(|(_, a)| a.status == 200)
    );
    assert!(out.is_some_and(|t| t < Duration::from_millis(1500)), "still in the table: {out:?}");
    assert!(answers.iter().all(|(_, a)| a.status == 200), "{answers:?}");
    assert!(worst < Duration::from_millis(1500), "a request waited {worst:?}");
    assert_eq!(on_frozen, 0);
    s.runners[v].signal(libc::SIGCONT);
    let back = wait_until(Duration::from_secs(5), || {
        s.envoy.stat("wasmcustom.hint_router.runners_available") == Some(3)
    });
    eprintln!("frozen: back in the table {back:?} after SIGCONT");
    assert!(back.is_some());
    // It holds model-f again as far as the table knows: some requests go back to it.
    let back_on_it =
        (0..12).filter(|_| infer(&url, "model-f", h("model-f"), &[]).upstream == warm.upstream).count();
    assert!(back_on_it > 0, "thawed runner gets no traffic");
    assert_eq!(s.envoy.vm_reloads(), 0);
}

// 3. /hints failing (500, timeout, refused), and a restarted runner with an empty cache.
#[test]
fn failing_hints_endpoint_costs_no_client_errors() {
    let fake = FakeRunner::start(HintsMode::Report(vec!["model-h".into()]));
    fake.set_header_hints("model-h");
    let real: Vec<Runner> = (0..2).map(|_| Runner::start(&["--load-ms", "20", "--infer-ms", "5"])).collect();
    let mut addrs = vec![fake.addr.clone()];
    addrs.extend(real.iter().map(|r| r.addr.clone()));
    let envoy = Envoy::start(&addrs, &opts(&[]), 3);
    let url = envoy.url();
    assert_eq!(infer(&url, "model-h", h("model-h"), &[]).upstream, fake.addr);
    for (name, mode) in
        [("500", HintsMode::Status(500)), ("timeout", HintsMode::Hang), ("closed", HintsMode::Close)]
    {
        fake.set_mode(mode);
        let t0 = Instant::now();
        let mut errors = 0;
        let mut n = 0;
        let mut last_on_fake = None;
        while t0.elapsed() < Duration::from_millis(2000) {
            let a = infer(&url, "model-h", h("model-h"), &[]);
            n += 1;
            if a.status != 200 {
                errors += 1;
            }
            if a.upstream == fake.addr {
                last_on_fake = Some(t0.elapsed());
            }
        }
        eprintln!(
            "/hints {name}: {n} requests, {errors} errors, last one routed to the runner at {last_on_fake:?}"
        );
        assert_eq!(errors, 0, "/hints {name}");
        // Out within one poll interval (500 ms) + the poll timeout (400 ms) + slack.
        assert!(
            last_on_fake.is_none_or(|t| t < Duration::from_millis(1300)),
            "/hints {name}: {last_on_fake:?}"
        );
        fake.set_mode(HintsMode::Report(vec!["model-h".into()]));
        assert!(wait_until(Duration::from_secs(3), || envoy
            .stat("wasmcustom.hint_router.runners_available")
            == Some(3))
        .is_some());
    }
    drop(fake); // connection refused from now on
    let errors = (0..20).filter(|_| infer(&url, "model-h", h("model-h"), &[]).status != 200).count();
    eprintln!("/hints refused (runner gone): 20 requests, {errors} errors");
    assert_eq!(errors, 0);
    assert_eq!(envoy.vm_reloads(), 0);
}

#[test]
fn restarted_runner_with_empty_cache_gets_no_stale_hits() {
    let mut s = Stack::start(3, &["--load-ms", "100", "--infer-ms", "5"], &opts(&[]));
    let url = s.envoy.url();
    let warm = infer(&url, "model-r", h("model-r"), &[]);
    let v = s.index_of(&warm.upstream).unwrap();
    s.runners[v].kill();
    s.envoy.wait_stat("wasmcustom.hint_router.runners_available", Duration::from_secs(3), |x| x == 2);
    s.runners[v] = Runner::start_at(&warm.upstream, &["--load-ms", "100", "--infer-ms", "5"]);
    let restarted = Instant::now();
    let mut stale = 0;
    let mut n = 0;
    while restarted.elapsed() < Duration::from_secs(2) {
        let a = infer(&url, "model-r", h("model-r"), &[]);
        n += 1;
        // A "hit" decision answered with a miss by the restarted runner = routed on stale hints.
        if a.upstream == warm.upstream && a.decision == "hit" && a.cache == "miss" {
            stale += 1;
        }
        assert_eq!(a.status, 200);
    }
    eprintln!("restart: {n} requests, {stale} routed to the restarted runner on stale hints");
    assert_eq!(stale, 0);
}

// 4. Bad /hints bodies.
#[test]
fn garbage_hints_bodies_never_trap_the_vm() {
    let fake = FakeRunner::start(HintsMode::Report(vec!["model-g".into()]));
    let real: Vec<Runner> = (0..2).map(|_| Runner::start(&["--load-ms", "20", "--infer-ms", "5"])).collect();
    let mut addrs = vec![fake.addr.clone()];
    addrs.extend(real.iter().map(|r| r.addr.clone()));
    let envoy = Envoy::start(&addrs, &opts(&[]), 3);
    let url = envoy.url();
    // A model on a real runner, to watch request latency while the poller chews garbage.
    assert_eq!(infer(&url, "model-k", h("model-k"), &[]).status, 200);
    let baseline = (0..10).map(|_| infer(&url, "model-k", h("model-k"), &[]).elapsed).max().unwrap();
    let mem0 = envoy_allocated(&envoy);
    let full = String::from_utf8(report_body(&fake.addr, &["model-g".into()])).unwrap();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, HintsMode)> = vec![
        ("12 MB", HintsMode::Body(vec![b' '; 12 << 20])),
        ("truncated", HintsMode::Body(full.as_bytes()[..full.len() / 2].to_vec())),
        ("wrong types", HintsMode::Body(br#"{"runner":7,"hints":"model-g","capacity":-1}"#.to_vec())),
        ("deeply nested", HintsMode::Body(deep.into_bytes())),
        ("not json", HintsMode::Body(vec![0xff, 0x00, 0xfe])),
        ("slow", HintsMode::Hang),
    ];
    for (name, mode) in cases {
        fake.set_mode(mode);
        let polls = fake.poll_count();
        wait_until(Duration::from_secs(5), || fake.poll_count() >= polls + 2);
        envoy.wait_stat("wasmcustom.hint_router.runners_available", Duration::from_secs(3), |x| x == 2);
        let worst = (0..10)
            .map(|_| {
                let a = infer(&url, "model-k", h("model-k"), &[]);
                assert_eq!(a.status, 200, "{name}");
                a.elapsed
            })
            .max()
            .unwrap();
        eprintln!("/hints {name}: runner left out, VM reloads {}, slowest request {worst:?} (baseline {baseline:?})", envoy.vm_reloads());
        assert_eq!(envoy.vm_reloads(), 0, "{name}");
        assert!(worst < baseline + Duration::from_millis(500), "{name}: requests slowed to {worst:?}");
        fake.set_mode(HintsMode::Report(vec!["model-g".into()]));
        envoy.wait_stat("wasmcustom.hint_router.runners_available", Duration::from_secs(3), |x| x == 3);
    }
    // Its last good hints came back with it.
    assert_eq!(infer(&url, "model-g", h("model-g"), &[]).upstream, fake.addr);
    let mem1 = envoy_allocated(&envoy);
    eprintln!("envoy heap: {} MiB before, {} MiB after the garbage", mem0 >> 20, mem1 >> 20);
    assert!(mem1 < mem0 + (32 << 20), "Envoy grew by {} MiB", (mem1 - mem0) >> 20);
}

// 5. A runner that advertises 100,000 hints.
#[test]
fn runner_advertising_100k_hints_is_capped() {
    // It claims the honest runner's model first, then 100,000 more.
    let many: Vec<String> =
        std::iter::once("model-a".to_string()).chain((0..100_000).map(|i| format!("junk-{i}"))).collect();
    let liar = FakeRunner::start(HintsMode::Report(many));
    let real: Vec<Runner> = (0..2).map(|_| Runner::start(&["--load-ms", "20", "--infer-ms", "5"])).collect();
    let mut addrs = vec![liar.addr.clone()];
    addrs.extend(real.iter().map(|r| r.addr.clone()));
    let envoy = Envoy::start(&addrs, &opts(&[]), 3);
    let truncated =
        envoy.wait_stat("wasmcustom.hint_router.hints_truncated", Duration::from_secs(5), |x| x > 0);
    eprintln!("100k hints: hints_truncated={truncated} after the first polls (cap 64 per runner)");
    assert_eq!(truncated % (100_001 - 64), 0, "each poll drops exactly 99,937 hints");
    let url = envoy.url();
    // Warm model-a on an honest runner: send it without a hint (a hinted request would go to
    // the liar, the only holder so far, whose canned answer teaches the filter nothing new).
    let warm = infer(&url, "model-a", None, &[]);
    assert_ne!(warm.upstream, liar.addr);
    wait_until(Duration::from_secs(3), || {
        real.iter().any(|r| r.hints().is_some_and(|h| h.hints.contains(&"model-a".to_string())))
    });
    // Let a poll carry the honest runner's hints (and the liar's) into the table.
    std::thread::sleep(Duration::from_millis(600));
    let honest: usize =
        (0..20).filter(|_| infer(&url, "model-a", h("model-a"), &[]).upstream == warm.upstream).count();
    eprintln!(
        "100k hints: honest holder kept {honest}/20 of its model's requests; the liar served {}",
        liar.inference_count()
    );
    assert_eq!(honest, 20);
    assert_eq!(envoy.vm_reloads(), 0);
}

// 6. 10,000 distinct client hints.
#[test]
fn ten_thousand_distinct_hints_leave_no_trace() {
    let s = Stack::start(3, &["--load-ms", "0", "--infer-ms", "0", "--capacity", "3"], &opts(&[]));
    let url = s.envoy.url();
    let names0 = stat_names(&s.envoy);
    let mem0 = envoy_allocated(&s.envoy);
    let t = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|w| {
            let u = url.clone();
            std::thread::spawn(move || {
                let c = reqwest::blocking::Client::new(); // keep-alive: fast
                let mut bad = 0;
                for i in 0..2500 {
                    let m = format!("hint-{w}-{i}");
                    let r = c
                        .post(&u)
                        .header("x-fal-runner-hint", &m)
                        .body(format!("{{\"model\":\"{m}\"}}"))
                        .send()
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    if r != 200 {
                        bad += 1;
                    }
                }
                bad
            })
        })
        .collect();
    let bad: u32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let names1 = stat_names(&s.envoy);
    let new_names: Vec<&String> = names1.difference(&names0).collect();
    let mem1 = envoy_allocated(&s.envoy);
    eprintln!(
        "10k hints in {:?}: {bad} non-200; stats {} -> {} (new: {new_names:?}); envoy heap {} KiB -> {} KiB",
        t.elapsed(),
        names0.len(),
        names1.len(),
        mem0 >> 10,
        mem1 >> 10
    );
    assert_eq!(bad, 0);
    // Envoy adds a few stats on first use (e.g. the first 2xx of a cluster); none per hint.
    assert!(new_names.len() <= 16, "stats grew with client hints: {new_names:?}");
    assert!(new_names.iter().all(|n| !n.contains("hint-")), "a stat is named after a hint: {new_names:?}");
    assert!(mem1 < mem0 + (8 << 20), "Envoy heap grew by {} KiB", (mem1 - mem0) >> 10);
}

// 7. Hostile hint headers.
#[test]
fn hostile_hint_headers_never_get_a_5xx() {
    let s = Stack::start(3, &["--load-ms", "10", "--infer-ms", "1"], &opts(&[]));
    let url = s.envoy.url();
    let body = br#"{"model":"m"}"#;
    let values: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("128 B", vec![b'x'; 128]),
        ("8 KiB", vec![b'x'; 8 << 10]),
        ("59 KiB", vec![b'x'; 59 << 10]),
        ("comma list", b"a,b,c".to_vec()),
        ("utf-8", "mod\u{e8}le-\u{1F680}".as_bytes().to_vec()),
        ("non-utf-8", vec![0xc3, 0x28, 0xff]),
    ];
    for (name, v) in &values {
        let a = infer(&url, "m", Some(v), &[]);
        eprintln!("hint {name}: status {} decision {}", a.status, a.decision);
        assert_eq!(a.status, 200, "{name}");
    }
    // Duplicated header.
    let r = client()
        .post(&url)
        .header("x-fal-runner-hint", "m")
        .header("x-fal-runner-hint", "other")
        .body(&body[..])
        .send()
        .unwrap();
    eprintln!("hint duplicated: status {}", r.status());
    assert_eq!(r.status().as_u16(), 200);
    // Control bytes can only be sent raw; Envoy's codec answers them itself (4xx).
    for (name, ctl) in [("NUL", 0u8), ("SOH", 1), ("ESC", 0x1b), ("DEL", 0x7f)] {
        let mut req = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 13\r\nx-fal-runner-hint: a".to_vec();
        req.push(ctl);
        req.extend_from_slice(b"b\r\n\r\n");
        req.extend_from_slice(body);
        let st = raw_status(s.envoy.port, &req);
        eprintln!("hint with {name}: status {st}");
        assert!(st != 0 && st < 500, "{name}: {st}");
    }
    assert_eq!(s.envoy.vm_reloads(), 0);
    assert!(s.envoy.stat("wasmcustom.hint_router.invalid_hint").unwrap() >= 4);
}

// 8. Forged steering and Envoy-internal headers.
#[test]
fn clients_cannot_steer_to_a_host_they_name() {
    // Three fake runners count what reaches them; a fourth (not a cluster member) must get
    // nothing; the filter's decisions must not be overridden.
    let fakes: Vec<FakeRunner> = (0..3).map(|_| FakeRunner::start(HintsMode::Report(vec![]))).collect();
    let outsider = FakeRunner::start(HintsMode::Report(vec![]));
    let addrs: Vec<String> = fakes.iter().map(|f| f.addr.clone()).collect();
    // FAIL_OPEN so that after the VM dies the filter is skipped: the native strip must hold.
    let mut o = opts(&[("failure_test_hint", "\"crash-now\"")]);
    o.replace.push((
        "                failure_policy: FAIL_RELOAD\n                reload_config".into(),
        "                failure_policy: FAIL_OPEN\n                reload_config".into(),
    ));
    let envoy = Envoy::start(&addrs, &o, 3);
    let url = envoy.url();
    let target = &fakes[0].addr;
    let forged = [
        ("x-hint-router-pick", target.as_str()),
        ("x-hint-router-poll-target", target.as_str()),
        ("x-envoy-original-dst-host", outsider.addr.as_str()),
        ("x-forwarded-for", "10.9.9.9"),
        ("x-envoy-upstream-alt-stat-name", "evil"),
    ];
    let run = |label: &str| {
        let before: Vec<u64> = fakes.iter().map(FakeRunner::inference_count).collect();
        for _ in 0..30 {
            let a = infer(&url, "m", None, &forged);
            assert!(a.status == 200, "{label}: {a:?}");
        }
        let got: Vec<u64> = fakes.iter().zip(&before).map(|(f, b)| f.inference_count() - b).collect();
        eprintln!(
            "forged headers ({label}): 30 requests spread {got:?} (named runner first); outsider got {}",
            outsider.inference_count()
        );
        assert!(got[0] < 30, "{label}: every request went to the runner the client named");
        assert_eq!(outsider.inference_count(), 0, "{label}: a non-member was reached");
    };
    run("filter up");
    // Kill the VM on both workers.
    for _ in 0..4 {
        let _ = infer(&url, "m", h("crash-now"), &[]);
    }
    envoy.wait_stat("wasmcustom.hint_router.requests", Duration::from_secs(1), |_| true);
    run("after VM failure, FAIL_OPEN");
}

// 9. A request that makes the filter fail, with the shipped FAIL_RELOAD.
#[test]
fn filter_failure_recovers_with_fail_reload() {
    let s = Stack::start(
        3,
        &["--load-ms", "10", "--infer-ms", "1"],
        &opts(&[("failure_test_hint", "\"crash-now\"")]),
    );
    let url = s.envoy.url();
    let crash = infer(&url, "m", h("crash-now"), &[]);
    let t0 = Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    let mut recovered = None;
    while t0.elapsed() < Duration::from_secs(10) {
        let a = infer(&url, "model-z", h("model-z"), &[]);
        *statuses.entry(a.status).or_insert(0) += 1;
        if a.status == 200
            && !a.decision.is_empty()
            && s.envoy.stat("wasm.hint_router.vm_reload_success").unwrap_or(0) >= 1
        {
            recovered = Some(t0.elapsed());
            break;
        }
    }
    eprintln!(
        "filter abort: the crashing request got {}; then statuses {statuses:?}; routing again after {recovered:?}; vm_reload={:?} vm_reload_success={:?}",
        crash.status,
        s.envoy.stat("wasm.hint_router.vm_reload"),
        s.envoy.stat("wasm.hint_router.vm_reload_success")
    );
    assert!(recovered.is_some(), "the filter never came back");
}

// 11. Control endpoints and runner addresses stay private.
#[test]
fn control_endpoints_and_runner_addresses_stay_private() {
    let s = Stack::start(3, &["--load-ms", "10", "--infer-ms", "1"], &opts(&[("debug_headers", "false")]));
    let url = s.envoy.url();
    for path in ["hints", "healthz", "stats", "clusters", "config_dump", "quitquitquit"] {
        let r = client().get(format!("{url}{path}")).send().unwrap();
        let st = r.status().as_u16();
        let text = r.text().unwrap();
        eprintln!("GET /{path} on the public listener: {st}");
        assert!((400..500).contains(&st), "/{path}: {st} {text}");
        assert!(!text.contains("hint_router") && !text.contains("\"runner\""), "/{path} leaked: {text}");
    }
    let addrs: Vec<&str> = s.runners.iter().map(|r| r.addr.as_str()).collect();
    for (model, want) in [("model-a", 200), ("fail-x", 503), ("bad model", 400)] {
        let r = client()
            .post(&url)
            .header("x-fal-runner-hint", "model-a")
            .body(format!("{{\"model\":\"{model}\"}}"))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{model}");
        let headers = format!("{:?}", r.headers());
        let body = r.text().unwrap();
        for a in &addrs {
            let port = a.rsplit(':').next().unwrap();
            assert!(
                !headers.contains(port) && !body.contains(port),
                "{model}: runner address leaked: {headers} {body}"
            );
        }
    }
}

// 10. Runner side: single-flight loads, disconnects, pinning, failing loads, draining.

fn loads_of(r: &Runner, model: &str) -> usize {
    r.log_text().lines().filter(|l| l.ends_with(&format!("loading model {model}"))).count()
}

fn direct(r: &Runner, model: &str, timeout: Duration) -> Result<(u16, serde_json::Value), String> {
    let c = reqwest::blocking::Client::builder().timeout(timeout).build().unwrap();
    let resp = c.post(format!("http://{}/", r.addr)).body(format!("{{\"model\":\"{model}\"}}")).send();
    match resp {
        Ok(resp) => {
            let st = resp.status().as_u16();
            Ok((st, serde_json::from_str(&resp.text().unwrap_or_default()).unwrap_or_default()))
        }
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn hundred_concurrent_requests_for_an_absent_model_load_it_once() {
    // --max-queue: all 100 wait on this one runner (the default, 64, would refuse some).
    let r = Runner::start(&[
        "--load-ms",
        "500",
        "--infer-ms",
        "1",
        "--max-concurrency",
        "8",
        "--max-queue",
        "100",
    ]);
    let r = std::sync::Arc::new(r);
    let handles: Vec<_> = (0..100)
        .map(|_| {
            let r = r.clone();
            std::thread::spawn(move || direct(&r, "model-one", Duration::from_secs(30)).map(|(s, _)| s))
        })
        .collect();
    let ok = handles.into_iter().map(|h| h.join().unwrap()).filter(|s| *s == Ok(200)).count();
    let loads = loads_of(&r, "model-one");
    eprintln!("100 concurrent requests: {ok} answered 200, {loads} load(s)");
    assert_eq!((ok, loads), (100, 1));
}

#[test]
fn a_disconnecting_client_does_not_cancel_a_load_others_wait_for() {
    let r = std::sync::Arc::new(Runner::start(&["--load-ms", "1500", "--infer-ms", "1"]));
    let t0 = Instant::now();
    let r2 = r.clone();
    let quitter = std::thread::spawn(move || direct(&r2, "model-d", Duration::from_millis(200)));
    std::thread::sleep(Duration::from_millis(500));
    let (st, body) = direct(&r, "model-d", Duration::from_secs(10)).unwrap();
    let done = t0.elapsed();
    eprintln!(
        "disconnect: quitter {:?}; the next request finished {done:?} after the load began: {body}",
        quitter.join().unwrap().err()
    );
    assert_eq!(st, 200);
    assert!(done < Duration::from_millis(2500), "the load restarted: {done:?}");
    assert_eq!(loads_of(&r, "model-d"), 1);
}

#[test]
fn a_model_in_use_is_never_evicted() {
    let r = std::sync::Arc::new(Runner::start(&[
        "--capacity",
        "1",
        "--max-concurrency",
        "2",
        "--load-ms",
        "50",
        "--infer-ms",
        "1500",
    ]));
    let r2 = r.clone();
    let t0 = Instant::now();
    let first = std::thread::spawn(move || (direct(&r2, "model-1", Duration::from_secs(10)), Instant::now()));
    // Wait until model-1 is resident and in use, then ask for another model.
    wait_until(Duration::from_secs(5), || {
        r.hints().is_some_and(|h| h.in_flight == 1 && h.loading.is_empty() && !h.hints.is_empty())
    });
    let (st2, _) = direct(&r, "model-2", Duration::from_secs(10)).unwrap();
    let second_done = Instant::now();
    let (res1, first_done) = first.join().unwrap();
    let (st1, _) = res1.unwrap();
    eprintln!(
        "pinning: model-1 finished at {:?}, model-2 (needing its slot) at {:?}",
        first_done - t0,
        second_done - t0
    );
    assert_eq!((st1, st2), (200, 200));
    assert!(second_done >= first_done, "model-1 was evicted while in use");
    let log = r.log_text();
    let evict = log.find("evicting model model-1").expect("eviction logged");
    assert!(log[..evict].contains("loaded model model-1"));
}

#[test]
fn a_failing_load_is_a_clear_error_not_advertised_and_retried_after_backoff() {
    let r = Runner::start(&["--load-ms", "300", "--infer-ms", "1", "--load-fail-backoff-ms", "800"]);
    let t = Instant::now();
    let (st, body) = direct(&r, "fail-x", Duration::from_secs(10)).unwrap();
    let first = t.elapsed();
    assert_eq!(st, 503, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("fail-x"), "{body}");
    assert!(!r.hints().unwrap().hints.iter().any(|h| h == "fail-x"), "failed model advertised");
    let t = Instant::now();
    let (st, _) = direct(&r, "fail-x", Duration::from_secs(10)).unwrap();
    let during_backoff = t.elapsed();
    assert_eq!(st, 503);
    assert!(during_backoff < Duration::from_millis(200), "retried during backoff: {during_backoff:?}");
    assert_eq!(loads_of(&r, "fail-x"), 1);
    std::thread::sleep(Duration::from_millis(900));
    let (st, _) = direct(&r, "fail-x", Duration::from_secs(10)).unwrap();
    assert_eq!(st, 503);
    eprintln!(
        "failing load: first answer after {first:?}, in backoff after {during_backoff:?}, loads attempted {}",
        loads_of(&r, "fail-x")
    );
    assert_eq!(loads_of(&r, "fail-x"), 2, "not retried after the backoff");
}

#[test]
fn sigterm_drains_a_runner_with_zero_errors() {
    let mut s =
        Stack::start(3, &["--load-ms", "50", "--infer-ms", "150", "--max-concurrency", "2"], &opts(&[]));
    let url = s.envoy.url();
    for m in 0..6 {
        let name = format!("model-{m}");
        assert_eq!(infer(&url, &name, h(&name), &[]).status, 200);
    }
    let load = hint_router_e2e::SteadyLoad::start(&url, 4, 6);
    std::thread::sleep(Duration::from_millis(700));
    s.runners[0].signal(libc::SIGTERM);
    // It reports `draining` while still serving (--drain-grace-ms 1000): out of the table
    // before it closes its listener.
    let out = wait_until(Duration::from_secs(3), || {
        s.envoy.stat("wasmcustom.hint_router.runners_available") == Some(2)
    });
    let code = s.runners[0].wait_exit(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1000));
    let all: Vec<Answer> = load.stop().into_iter().map(|(_, a)| a).collect();
    let errors: Vec<&Answer> = all.iter().filter(|a| a.status != 200).collect();
    eprintln!(
        "SIGTERM drain: left the table {out:?} after the signal; exit code {code:?}; {} requests, {} errors",
        all.len(),
        errors.len()
    );
    assert!(
        out.is_some_and(|t| t < Duration::from_millis(1000)),
        "not out of the table within the grace: {out:?}"
    );
    assert_eq!(code, Some(0));
    assert!(errors.is_empty(), "{errors:?}");
}

// 9b. In-flight counts a dead VM leaves behind are repaired from the runners' own counts.
#[test]
fn leaked_in_flight_counts_are_repaired_after_a_vm_failure() {
    let s = Stack::start(
        3,
        &["--load-ms", "10", "--infer-ms", "2500", "--max-concurrency", "8"],
        &opts(&[("failure_test_hint", "\"crash-now\"")]),
    );
    let url = s.envoy.url();
    let long: Vec<_> = (0..6)
        .map(|i| {
            let u = url.clone();
            std::thread::spawn(move || {
                infer(&u, &format!("model-{i}"), Some(format!("model-{i}").as_bytes()), &[])
            })
        })
        .collect();
    let total = || s.runners.iter().filter_map(|r| r.hints()).map(|h| h.in_flight).sum::<u32>();
    assert!(wait_until(Duration::from_secs(5), || total() == 6).is_some());
    // Kill the VM on both workers while they have requests in flight.
    for _ in 0..6 {
        let _ = infer(&url, "m", h("crash-now"), &[]);
    }
    let statuses: Vec<u16> = long.into_iter().map(|t| t.join().unwrap().status).collect();
    let repaired = wait_until(Duration::from_secs(6), || {
        s.envoy.stat("wasmcustom.hint_router.inflight_repaired").unwrap_or(0) > 0
    });
    eprintln!(
        "leak repair: long requests ended {statuses:?}; reloads {}; repaired {:?} after they ended, inflight_repaired={:?}",
        s.envoy.vm_reloads(),
        repaired,
        s.envoy.stat("wasmcustom.hint_router.inflight_repaired")
    );
    assert!(s.envoy.vm_reloads() > 0, "the VMs did not fail");
    assert!(repaired.is_some(), "leaked in-flight counts were never repaired");
}
