//! fal's own protocol, unchanged (issue 12): real `fal.App` runners (`tests/fal/app.py`, fal
//! 1.83.0: `provide_hints()` over fake models, a sleep for a load) behind the shipped Envoy
//! configs, mixed with `runner-example`, hostile fal runners, the runner kit
//! (`runner-kit/hint_runner.py`), and the real `fal_client` 1.0.3 through the HTTPS listener.
//! Each test prints what it measured (`cargo test -p hint-router-e2e --test fal -- --nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hint_router_e2e::python::{fal_client_calls, FalApp};
use hint_router_e2e::util::wait_until;
use hint_router_e2e::{client, Envoy, EnvoyOptions, Runner};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A fal app's fake models: 300 ms loads, 10 ms inferences, two models kept.
const APP: &[&str] = &["--load-ms", "300", "--infer-ms", "10", "--capacity", "2"];

/// One answer through Envoy's plain listener.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    /// `x-hint-router-upstream` (demo config only).
    upstream: String,
    /// `x-hint-router-decision` (demo config only).
    decision: String,
    /// The runner's JSON answer (`runner`, `cache`, ...).
    body: Value,
    elapsed: Duration,
}

impl Reply {
    fn runner(&self) -> &str {
        self.body["runner"].as_str().unwrap_or("")
    }
    fn hit(&self) -> bool {
        self.body["cache"] == "hit"
    }
}

fn post(e: &Envoy, model: &str, hint: Option<&str>, sleep_ms: u64, headers: &[(&str, &str)]) -> Reply {
    let mut req = client()
        .post(e.url())
        .header("content-type", "application/json")
        .body(json!({"model": model, "prompt": "hi", "sleep_ms": sleep_ms}).to_string());
    if let Some(h) = hint {
        req = req.header("x-fal-runner-hint", h);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let t = Instant::now();
    let r = req.send().expect("envoy answers");
    let h = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let (status, upstream, decision) =
        (r.status().as_u16(), h("x-hint-router-upstream"), h("x-hint-router-decision"));
    let text = r.text().unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply { status, upstream, decision, body, elapsed: t.elapsed() }
}

fn stat(e: &Envoy, name: &str) -> u64 {
    e.stat(&format!("wasmcustom.hint_router.{name}")).unwrap_or(0)
}

fn plugin(base: EnvoyOptions, members: &[(&str, &str)]) -> EnvoyOptions {
    EnvoyOptions { plugin: members.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), ..base }
}

fn addrs(apps: &[FalApp]) -> Vec<String> {
    apps.iter().map(|a| a.addr.clone()).collect()
}

// Before this issue a fal app (no /hints) was never available: every request was
// `no_candidates` and 3 of 10 warm requests hit. Now it is probed on /health and routed by
// its header.
#[test]
fn three_fal_apps_behind_the_shipped_config_stick_spill_a_busy_holder_and_drop_a_killed_one() {
    let mut apps = FalApp::start_all(&[("a", APP), ("b", APP), ("c", APP)]);
    // fal's own rule for busy holders ("go to any available runner without waiting"), which
    // this test checks. The shipped default, "fastest", may instead queue behind a holder it
    // expects to be quicker than a load, from the times it learned (docs/config.md).
    let opts = plugin(EnvoyOptions::production(), &[("when_holders_busy", "\"any_available\"")]);
    let e = Envoy::start(&addrs(&apps), &opts, 3);

    // Warm-up: each model once (a miss), then warm traffic for the same models.
    let models = ["m0", "m1", "m2"];
    let mut holder: HashMap<&str, String> = HashMap::new();
    for m in models {
        let r = post(&e, m, Some(m), 0, &[]);
        assert_eq!(r.status, 200, "{r:?}");
        holder.insert(m, r.runner().to_string());
    }
    let (mut n, mut hits, mut ms) = (0, 0, Vec::new());
    for i in 0..30 {
        let m = models[i % models.len()];
        let r = post(&e, m, Some(m), 0, &[]);
        assert_eq!(r.status, 200, "{r:?}");
        n += 1;
        if r.hit() && r.runner() == holder[m] {
            hits += 1;
        }
        ms.push(r.elapsed.as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    let rate = hits as f64 / n as f64;
    eprintln!(
        "three fal apps: holders {holder:?}; warm hit rate {hits}/{n} = {rate:.2}; warm p50 {:.0} ms; filter hit {} miss {} no_candidates {}",
        ms[ms.len() / 2],
        stat(&e, "hit"),
        stat(&e, "miss"),
        stat(&e, "no_candidates")
    );
    assert!(rate >= 0.9, "warm hit rate {rate:.2} < 0.9");
    assert_eq!(stat(&e, "no_candidates"), 0);

    // A busy holder (max_multiplexing 1 = default_max_concurrency 1): the next request for its
    // model goes to another runner at once instead of queueing behind the slow one.
    let m = "m0";
    let busy_fallback = stat(&e, "busy_fallback");
    let requests = stat(&e, "requests");
    let url_env = e.url();
    let slow = std::thread::spawn(move || {
        let mut req =
            client().post(url_env).header("content-type", "application/json").header("x-fal-runner-hint", m);
        req = req.body(json!({"model": m, "sleep_ms": 3000}).to_string());
        let t = Instant::now();
        let body: Value = serde_json::from_str(&req.send().unwrap().text().unwrap()).unwrap();
        (body, t.elapsed())
    });
    e.wait_stat("wasmcustom.hint_router.requests", Duration::from_secs(10), |v| v > requests);
    let next = post(&e, m, Some(m), 0, &[]);
    let (slow_body, slow_elapsed) = slow.join().unwrap();
    eprintln!(
        "busy holder {}: the slow request took {:.0} ms on {}; the next one was answered in {:.0} ms by {} ({}); busy_fallback +{}",
        holder[m],
        slow_elapsed.as_secs_f64() * 1000.0,
        slow_body["runner"],
        next.elapsed.as_secs_f64() * 1000.0,
        next.runner(),
        next.body["cache"],
        stat(&e, "busy_fallback") - busy_fallback
    );
    assert_eq!(slow_body["runner"], holder[m].as_str());
    assert_eq!(next.status, 200);
    assert_ne!(next.runner(), holder[m], "the busy holder got the next request");
    assert!(next.elapsed < Duration::from_millis(2500), "the next request waited: {next:?}");
    assert_eq!(stat(&e, "busy_fallback"), busy_fallback + 1);

    // A killed fal runner drops out of the table; its models are served elsewhere.
    let victim = apps.iter().position(|a| a.name == holder["m1"]).unwrap();
    let victim_name = apps[victim].name.clone();
    apps[victim].kill();
    let t = Instant::now();
    e.wait_stat("wasmcustom.hint_router.runners_available", Duration::from_secs(10), |v| v == 2);
    let dropped = t.elapsed();
    let after: Vec<Reply> = (0..9).map(|i| post(&e, models[i % 3], Some(models[i % 3]), 0, &[])).collect();
    eprintln!(
        "killed {victim_name}: out of the table after {:.0} ms; the next 9 requests: {:?}",
        dropped.as_secs_f64() * 1000.0,
        after.iter().map(|r| format!("{}:{}", r.status, r.runner())).collect::<Vec<_>>()
    );
    assert!(after.iter().all(|r| r.status == 200 && r.runner() != victim_name), "{after:?}");
}

#[test]
fn a_mixed_pool_of_runner_example_and_fal_apps_routes_by_hint_in_both() {
    let kit_args: Vec<&str> = APP.iter().copied().chain(["--kit"]).collect();
    let apps = FalApp::start_all(&[("fal", APP), ("fal-kit", &kit_args)]);
    let re = Runner::start(&["--load-ms", "300", "--infer-ms", "10", "--capacity", "2"]);
    let mut pool = addrs(&apps);
    pool.push(re.addr.clone());
    let kind = |addr: &str| {
        apps.iter()
            .find(|a| a.addr == addr)
            .map(|a| a.name.clone())
            .unwrap_or_else(|| "runner-example".into())
    };
    // Tell the router the header-only app's cache size (the kit and runner-example report theirs).
    let e = Envoy::start(&pool, &plugin(EnvoyOptions::default(), &[("default_capacity", "2")]), 3);

    let models: Vec<String> = (0..6).map(|i| format!("model-{i}")).collect();
    let mut holder: HashMap<String, String> = HashMap::new();
    for m in &models {
        let r = post(&e, m, Some(m), 0, &[]);
        assert_eq!((r.status, r.decision.as_str()), (200, "miss"), "{r:?}");
        holder.insert(m.clone(), r.upstream.clone());
    }
    let mut per_kind: HashMap<String, (u32, u32)> = HashMap::new();
    for i in 0..24 {
        let m = &models[i % models.len()];
        let r = post(&e, m, Some(m), 0, &[]);
        assert_eq!(r.status, 200, "{r:?}");
        let c = per_kind.entry(kind(&r.upstream)).or_default();
        c.0 += 1;
        if r.decision == "hit" && r.hit() && r.upstream == holder[m] {
            c.1 += 1;
        }
    }
    let (n, hits) = per_kind.values().fold((0, 0), |(n, h), c| (n + c.0, h + c.1));
    eprintln!(
        "mixed pool: warm hits {hits}/{n} = {:.2}; per runner (requests, hits): {per_kind:?}",
        hits as f64 / n as f64
    );
    for k in ["runner-example", "fal", "fal-kit"] {
        let (kn, kh) = per_kind.get(k).copied().unwrap_or_default();
        assert!(kn > 0 && kh as f64 >= 0.9 * kn as f64, "{k}: {kh} hits of {kn}");
    }

    // Envoy's active health check (`GET /health`, what the fallback policy trusts) passes on
    // both kinds: with `/healthz`, every fal app stayed `failed_active_hc`.
    let flags = |addr: &str| {
        let text =
            client().get(format!("http://127.0.0.1:{}/clusters", e.admin)).send().unwrap().text().unwrap();
        let key = format!("runners::{addr}::health_flags::");
        text.lines().find_map(|l| l.strip_prefix(&key).map(str::to_string)).unwrap_or_default()
    };
    let end = Instant::now() + Duration::from_secs(15);
    while pool.iter().any(|a| flags(a) != "healthy") && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen: Vec<(String, String)> = pool.iter().map(|a| (kind(a), flags(a))).collect();
    let hc: Vec<String> = ["attempt", "success", "failure", "network_failure"]
        .iter()
        .map(|s| format!("{s} {}", e.stat(&format!("cluster.runners.health_check.{s}")).unwrap_or(0)))
        .collect();
    eprintln!("mixed pool health flags: {seen:?}; health checks: {hc:?}");
    assert!(seen.iter().all(|(_, f)| f == "healthy"), "{seen:?}");
}

#[test]
fn fal_client_run_and_run_async_through_the_tls_listener_stick_count_the_hint_and_keep_the_key() {
    let apps = FalApp::start_all(&[("a", APP), ("b", APP)]);
    let e = Envoy::start(&addrs(&apps), &EnvoyOptions::production(), 2);
    let call = |c: &str, m: &str, hint: Option<&str>, path: &str| json!({"call": c, "model": m, "hint": hint, "path": path});
    let calls = json!([
        call("run", "llama", Some("llama"), ""),
        call("run", "sdxl", Some("sdxl"), ""),
        call("run", "llama", Some("llama"), ""),
        call("run_async", "llama", Some("llama"), ""),
        call("run_async", "sdxl", Some("sdxl"), ""),
        call("run", "sdxl", Some("sdxl"), ""),
        call("run_async", "llama", Some("llama"), ""),
        call("run", "sdxl", Some("sdxl"), ""),
        // `/<owner>/<alias>/other` reaches the app's `/other` endpoint; no hint sent.
        call("run", "any", None, "other"),
    ]);
    let t = Instant::now();
    let out = fal_client_calls(&e, "local/hintapp", &calls);
    let took = t.elapsed();
    assert_eq!(out.len(), 9, "{out:?}");
    let mut first: HashMap<String, String> = HashMap::new();
    let mut sticky = 0;
    for (c, o) in calls.as_array().unwrap().iter().zip(&out).take(8) {
        assert_eq!(o["ok"], true, "{c} -> {o}");
        let r = &o["result"];
        assert_eq!(r["saw_authorization"], false, "Authorization reached the runner: {o}");
        assert_eq!(r["saw_hint"], c["hint"], "{o}");
        let m = c["model"].as_str().unwrap().to_string();
        let runner = r["runner"].as_str().unwrap().to_string();
        match first.get(&m) {
            None => {
                first.insert(m, runner);
            }
            Some(h) => {
                assert_eq!(h, &runner, "{m} left its holder: {o}");
                assert_eq!(r["cache"], "hit", "{o}");
                sticky += 1;
            }
        }
    }
    assert_eq!(out[8]["ok"], true, "{:?}", out[8]);
    assert_eq!(out[8]["result"]["endpoint"], "other");
    let (hit, miss, no_hint) = (stat(&e, "hit"), stat(&e, "miss"), stat(&e, "no_hint"));
    let ms: Vec<String> = out.iter().map(|o| format!("{:.0}", o["ms"].as_f64().unwrap_or(0.0))).collect();
    eprintln!(
        "fal_client through TLS: {sticky}/6 warm calls stuck to their holders {first:?}; filter hit {hit} miss {miss} no_hint {no_hint}; call ms {ms:?}; driver {:.1} s",
        took.as_secs_f64()
    );
    assert_eq!(sticky, 6);
    assert_eq!((hit, miss, no_hint), (6, 2, 1));

    // The plain listener does not forward a client's Authorization either.
    let r = post(&e, "llama", Some("llama"), 0, &[("authorization", "Key secret")]);
    assert_eq!((r.status, &r.body["saw_authorization"]), (200, &json!(false)), "{r:?}");
}

// Bad input from fal runners: a 10,000-hint header (~59 KB, under Envoy's 60 KiB response
// header limit), a hint that is latin-1 but not ASCII ("caf\u{e9}", which fal sends; fal itself
// drops hints that are not latin-1), and no header at all (`provide_hints()` not overridden).
#[test]
fn hostile_fal_runners_get_capped_ignored_or_no_hints_and_crash_nothing() {
    let huge: Vec<&str> = APP.iter().copied().chain(["--hints", "huge"]).collect();
    let nonlatin: Vec<&str> = APP.iter().copied().chain(["--hints", "nonlatin"]).collect();
    let none: Vec<&str> = APP.iter().copied().chain(["--hints", "none"]).collect();
    let apps = FalApp::start_all(&[("huge", &huge), ("nonlatin", &nonlatin), ("none", &none)]);
    // The apps keep 2 models. Told so (`default_capacity`), the router does not have to infer
    // it from the most hints each has listed: early on that undercounts (1), and the router
    // then drops its own listing of a model the app still holds (seen: a `miss` decision for
    // a model the app answered as a hit). This test is about hostile hint lists, not that.
    let e = Envoy::start(&addrs(&apps), &plugin(EnvoyOptions::default(), &[("default_capacity", "2")]), 3);
    let by_name = |n: &str| apps.iter().find(|a| a.name == n).unwrap().addr.clone();

    // The huge runner's probe header already listed its hints: the first 64 are kept
    // (`max_hints_per_runner`), the rest dropped and counted.
    let r = post(&e, "h5", Some("h5"), 0, &[]);
    assert_eq!(
        (r.status, r.decision.as_str(), r.upstream.as_str()),
        (200, "hit", by_name("huge").as_str()),
        "{r:?}"
    );
    let r = post(&e, "h9999", Some("h9999"), 0, &[]);
    assert_eq!((r.status, r.decision.as_str()), (200, "miss"), "a hint past the cap was kept: {r:?}");
    assert!(stat(&e, "hints_truncated") > 0);

    // Misses spread over the three; each answer is a 200.
    let mut served: HashMap<String, String> = HashMap::new();
    for i in 0..9 {
        let m = format!("x{i}");
        let r = post(&e, &m, Some(&m), 0, &[]);
        assert_eq!(r.status, 200, "{r:?}");
        served.insert(m, r.runner().to_string());
    }
    // The latin-1 runner's header carries "caf\u{e9}" next to valid hints: that one entry is
    // dropped (hints_invalid), the others still route.
    // The last model it served: an earlier one may have been evicted since (capacity 2).
    let m = (0..9)
        .map(|i| format!("x{i}"))
        .rfind(|m| served.get(m).is_some_and(|r| r == "nonlatin"))
        .expect("nonlatin served a miss");
    let m = m.as_str();
    // Every worker's view, not only the one that served the miss: after a few more probes
    // (whose responses carry the header) the table has it.
    let polls = stat(&e, "poll_ok");
    assert!(wait_until(Duration::from_secs(10), || stat(&e, "poll_ok") >= polls + 6).is_some());
    let again = post(&e, m, Some(m), 0, &[]);
    assert_eq!((again.decision.as_str(), again.runner()), ("hit", "nonlatin"), "{again:?}");
    assert!(stat(&e, "hints_invalid") > 0);
    // The runner without a header is available (its /health probe answers 2xx) and serves;
    // it says nothing about its cache, so the router keeps its own listing of what it sent.
    let none_reqs = served.values().filter(|r| r.as_str() == "none").count();
    eprintln!(
        "hostile fal runners: misses served {served:?}; hints_truncated {}, hints_invalid {}, available {}, VM reloads {}",
        stat(&e, "hints_truncated"),
        stat(&e, "hints_invalid"),
        stat(&e, "runners_available"),
        e.vm_reloads()
    );
    assert!(none_reqs > 0, "the header-less runner got no request: {served:?}");
    assert_eq!(stat(&e, "runners_available"), 3);
    assert_eq!(e.vm_reloads(), 0, "a VM failed; log:\n{}", e.log_text());
}

// A plain fal app loads a model once per concurrent request; the kit makes it one load, and
// serves `/hints` with its real capacity, concurrency and in-flight count.
#[test]
fn the_runner_kit_adds_single_flight_loads_and_a_truthful_hints_report() {
    // Loads of 1 s, so three concurrent first requests overlap even on a loaded machine.
    let plain: &[&str] = &["--load-ms", "1000", "--infer-ms", "10", "--capacity", "2"];
    let kit_args: Vec<&str> = plain.iter().copied().chain(["--kit"]).collect();
    let apps = FalApp::start_all(&[("plain", plain), ("kit", &kit_args)]);
    let mut loads = HashMap::new();
    for app in &apps {
        let answers: Vec<Value> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3).map(|_| s.spawn(|| app.infer("same", 0))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let after = app.infer("same", 0)["loads"].as_u64().unwrap();
        loads.insert(app.name.clone(), after);
        assert!(answers.iter().all(|a| a["model"] == "same"), "{answers:?}");
    }
    eprintln!("three concurrent first requests for one model: loads {loads:?}");
    assert_eq!(loads["plain"], 3, "the plain fal app is expected to load once per request");
    assert_eq!(loads["kit"], 1, "the kit did not single-flight the load");

    let kit = &apps[1];
    let (report, hdr) = std::thread::scope(|s| {
        let slow = s.spawn(|| kit.infer("same", 1500));
        let end = Instant::now() + Duration::from_secs(5);
        let mut last = (Value::Null, String::new());
        while Instant::now() < end {
            let r = client().get(format!("http://{}/hints", kit.addr)).send().unwrap();
            let h =
                r.headers().get("x-fal-runner-hints").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            last = (serde_json::from_str(&r.text().unwrap()).unwrap(), h);
            if last.0["in_flight"] == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        slow.join().unwrap();
        last
    });
    eprintln!("kit /hints during a request: {report} (header {hdr:?})");
    assert_eq!(report["in_flight"], 1);
    assert_eq!((report["capacity"].clone(), report["max_concurrency"].clone()), (json!(2), json!(1)));
    assert_eq!(report["hints"], json!(["same"]));
    assert_eq!(hdr, "same");
    let idle: Value = serde_json::from_str(
        &client().get(format!("http://{}/hints", kit.addr)).send().unwrap().text().unwrap(),
    )
    .unwrap();
    assert_eq!(idle["in_flight"], 0, "{idle}");
}
