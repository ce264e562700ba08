//! fal's queue, routed by hint (issue 13, docs/queue.md): the real `fal_client` 1.0.3
//! (`submit`, `result`, `subscribe`, `status`, `cancel`, sync and async) through the shipped
//! config's queue listener, in front of real `runner-example` processes that own their jobs.
//! Each test prints what it measured (`cargo test -p hint-router-e2e --test queue -- --nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hint_router_e2e::fake::{queue_report_body, FakeRunner, HintsMode};
use hint_router_e2e::python::fal_queue_steps;
use hint_router_e2e::{Envoy, EnvoyOptions, Runner, Stack};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const APP: &str = "myuser/myapp";

fn plugin(base: EnvoyOptions, members: &[(&str, &str)]) -> EnvoyOptions {
    EnvoyOptions { plugin: members.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), ..base }
}

/// Each runner's queue token, from its own `/hints`.
fn tokens(runners: &[Runner]) -> HashMap<String, usize> {
    runners
        .iter()
        .enumerate()
        .map(|(i, r)| (r.hints().expect("hints").queue_token.expect("runner serves the queue"), i))
        .collect()
}

/// The runner (index) that issued `id`.
fn issuer(tokens: &HashMap<String, usize>, id: &str) -> usize {
    assert_eq!(id.len(), 49, "request id shape: {id}");
    *tokens.get(&id[..16]).unwrap_or_else(|| panic!("id {id} names no runner"))
}

fn ok(step: &Value) -> &Value {
    assert_eq!(step["ok"], true, "step failed: {step}");
    step
}

fn failed(step: &Value, needle: &str) -> String {
    assert_eq!(step["ok"], false, "step should have failed: {step}");
    let e = step["error"].as_str().unwrap_or("").to_string();
    assert!(e.contains(needle), "error {e:?} lacks {needle:?}");
    e
}

#[test]
fn fal_client_queue_calls_work_unchanged_and_every_call_for_an_id_reaches_its_runner() {
    let s = Stack::start(3, &["--load-ms", "300", "--infer-ms", "20"], &EnvoyOptions::production());
    let tokens = tokens(&s.runners);
    assert_eq!(tokens.len(), 3, "tokens are distinct");
    let out = fal_queue_steps(
        &s.envoy,
        APP,
        &json!([
            // fal's seed example: submit with a hint, then result(app, request_id).
            {"call": "submit_result", "model": "m0", "hint": "m0"},
            {"call": "submit_result", "model": "m0", "hint": "m0", "async": true},
            {"call": "subscribe", "model": "m1", "hint": "m1", "with_logs": true},
            {"call": "subscribe", "model": "m1", "hint": "m1", "async": true},
            {"call": "submit", "model": "m0", "hint": "m0", "name": "a"},
            {"call": "wait", "name": "a"},
            {"call": "status", "name": "a", "with_logs": true},
            {"call": "status", "name": "a", "with_logs": true, "async": true},
            {"call": "result", "name": "a"},
            {"call": "result", "name": "a", "async": true},
        ]),
    );
    for (i, step) in out.iter().enumerate() {
        eprintln!("step {i}: {step}");
        ok(step);
    }
    let first = &out[0];
    assert_eq!(first["result"]["model"], "m0");
    assert_eq!(first["result"]["cache"], "miss", "a cold model loads");
    assert_eq!(out[1]["result"]["cache"], "hit", "the second job for m0 went to its holder");
    let holder = issuer(&tokens, first["request_id"].as_str().unwrap());
    assert_eq!(issuer(&tokens, out[1]["request_id"].as_str().unwrap()), holder);
    assert!(s.runners[holder].hints().unwrap().hints.contains(&"m0".to_string()));

    // subscribe: updates end in Completed; the second run of m1 is a hit on m1's holder.
    for step in &out[2..4] {
        let kinds: Vec<&str> =
            step["updates"].as_array().unwrap().iter().map(|u| u["status"].as_str().unwrap()).collect();
        assert_eq!(kinds.last(), Some(&"Completed"), "{step}");
        assert_eq!(step["result"]["model"], "m1");
    }
    assert_eq!(out[3]["result"]["cache"], "hit");

    // status: the life of a job, with logs on request; the result is the blocking answer.
    assert_eq!(out[5]["status"], "Completed");
    let seen: Vec<&str> = out[5]["seen"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(seen.last(), Some(&"Completed"), "{seen:?}");
    for step in &out[6..8] {
        assert_eq!(step["status"], "Completed");
        let logs = step["logs"].as_array().expect("logs were asked for");
        assert!(!logs.is_empty(), "{step}");
        assert!(step["metrics"]["inference_time"].as_f64().is_some(), "{step}");
    }
    for step in &out[8..10] {
        assert_eq!(step["result"]["model"], "m0");
        assert_eq!(step["result"]["cache"], "hit");
    }
    let submitted = s.envoy.stat("wasmcustom.hint_router.queue.submits").unwrap_or(0);
    let job_calls = s.envoy.stat("wasmcustom.hint_router.queue.job_calls").unwrap_or(0);
    eprintln!("queue: submits {submitted}, job calls {job_calls}, holder of m0: runner {holder}");
    assert_eq!(submitted, 5);
    assert!(job_calls >= 10, "{job_calls}");
}

#[test]
fn forged_malformed_and_lost_ids_get_clear_errors_and_a_frozen_runner_is_reported_within_a_poll() {
    let s = Stack::start(1, &["--load-ms", "20", "--infer-ms", "10"], &EnvoyOptions::production());
    let token = s.runners[0].hints().unwrap().queue_token.unwrap();
    let unknown_secret = format!("{token}-{}", "0".repeat(32));
    let out = fal_queue_steps(
        &s.envoy,
        APP,
        &json!([
            {"call": "result", "id": "abc"},
            {"call": "status", "id": format!("{token}-{}", "A".repeat(32))},
            {"call": "cancel", "id": format!("00000000000000ff-{}", "0".repeat(32))},
            {"call": "result", "id": unknown_secret},
            {"call": "submit", "model": "m0", "hint": "m0", "name": "x"},
            {"call": "wait", "name": "x"},
        ]),
    );
    failed(&out[0], "400");
    failed(&out[1], "400");
    failed(&out[2], "404");
    failed(&out[3], "404");
    let id = ok(&out[4])["request_id"].as_str().unwrap().to_string();
    ok(&out[5]);
    assert_eq!(s.envoy.stat("wasmcustom.hint_router.queue.malformed_ids"), Some(2));
    assert_eq!(s.envoy.stat("wasmcustom.hint_router.queue.unknown_ids"), Some(1));

    // Frozen runner: status for its job turns into an error as soon as a poll fails
    // (interval 500 ms, timeout 400 ms), instead of hanging or answering IN_QUEUE forever.
    let lost = s.envoy.stat("wasmcustom.hint_router.runner_lost").unwrap_or(0);
    let stopped = std::time::Instant::now();
    s.runners[0].signal(libc::SIGSTOP);
    s.envoy.wait_stat("wasmcustom.hint_router.runner_lost", Duration::from_secs(10), |v| v > lost);
    let detected = stopped.elapsed();
    let frozen =
        fal_queue_steps(&s.envoy, APP, &json!([{"call": "status_until_error", "id": id, "limit_s": 15}]));
    s.runners[0].signal(libc::SIGCONT);
    let raised = ok(&frozen[0])["raised"].as_str().unwrap().to_string();
    eprintln!(
        "frozen runner: left out {:.0} ms after SIGSTOP; status then failed at its first call ({} poll(s)): {raised}",
        detected.as_secs_f64() * 1000.0,
        frozen[0]["polls"]
    );
    assert!(raised.contains("503") && raised.contains("not answering"), "{raised}");
    assert_eq!(frozen[0]["polls"], 1, "the first status call after the failed poll errs");
    assert!(detected < Duration::from_millis(2000), "a frozen runner was noticed only after {detected:?}");
    // Thawed: the job is there again (nothing was lost, the runner was only unreachable).
    s.envoy.wait_stat("wasmcustom.hint_router.runners_available", Duration::from_secs(10), |v| v == 1);
    let back = fal_queue_steps(&s.envoy, APP, &json!([{"call": "result", "id": id}]));
    assert_eq!(ok(&back[0])["result"]["model"], "m0");
}

#[test]
fn cancel_removes_a_queued_job_and_a_running_one_finishes() {
    let s = Stack::start(
        1,
        &["--load-ms", "50", "--infer-ms", "1500", "--max-concurrency", "1"],
        &EnvoyOptions::production(),
    );
    let out = fal_queue_steps(
        &s.envoy,
        APP,
        &json!([
            {"call": "submit", "model": "m0", "hint": "m0", "name": "running"},
            {"call": "submit", "model": "m0", "hint": "m0", "name": "queued"},
            {"call": "status", "name": "queued"},
            {"call": "cancel", "name": "queued"},
            {"call": "status", "name": "queued"},
            {"call": "result", "name": "queued"},
            // A job stays IN_QUEUE while its model loads: wait until it really runs.
            {"call": "wait", "name": "running", "until": "InProgress"},
            {"call": "cancel", "name": "running", "async": true},
            {"call": "result", "name": "running"},
            {"call": "cancel", "name": "running"},
        ]),
    );
    for (i, step) in out.iter().enumerate() {
        eprintln!("step {i}: {step}");
    }
    ok(&out[0]);
    ok(&out[1]);
    assert_eq!(ok(&out[2])["status"], "Queued", "behind the running job (max_concurrency 1)");
    ok(&out[3]);
    assert_eq!(ok(&out[4])["status"], "Completed");
    assert_eq!(out[4]["error_type"], "Cancelled");
    failed(&out[5], "400");
    assert_eq!(ok(&out[6])["status"], "InProgress");
    ok(&out[7]); // 202 CANCELLATION_REQUESTED: a running inference cannot be stopped
    assert_eq!(ok(&out[8])["result"]["model"], "m0", "the running job finished");
    failed(&out[9], "400"); // ALREADY_COMPLETED
    let report = s.runners[0].hints().unwrap();
    assert_eq!(report.in_flight, 0, "the cancelled job left no request slot behind");
}

// The submits are answered at once, so without counting a queued job as busy every submit
// for a hot model lands on its holder and queues there while other runners idle.
#[test]
fn queued_jobs_count_as_busy_so_a_burst_of_submits_spreads_instead_of_piling_on_the_holder() {
    let opts = plugin(EnvoyOptions::production(), &[("when_holders_busy", "\"any_available\"")]);
    let s = Stack::start(3, &["--load-ms", "100", "--infer-ms", "1500", "--max-concurrency", "1"], &opts);
    let tokens = tokens(&s.runners);
    let out = fal_queue_steps(
        &s.envoy,
        APP,
        &json!([
            {"call": "submit", "model": "m0", "hint": "m0", "name": "a"},
            {"call": "submit", "model": "m0", "hint": "m0", "name": "b"},
            {"call": "submit", "model": "m0", "hint": "m0", "name": "c"},
            {"call": "wait", "name": "a"}, {"call": "wait", "name": "b"}, {"call": "wait", "name": "c"},
        ]),
    );
    let runners: Vec<usize> =
        out[..3].iter().map(|st| issuer(&tokens, ok(st)["request_id"].as_str().unwrap())).collect();
    let submit_ms: Vec<f64> = out[..3].iter().map(|st| st["ms"].as_f64().unwrap()).collect();
    eprintln!("burst of 3 submits (answered in {submit_ms:.0?} ms) went to runners {runners:?}");
    assert_eq!(runners.iter().collect::<HashSet<_>>().len(), 3, "{runners:?}");
    for st in &out[3..] {
        assert_eq!(ok(st)["status"], "Completed");
        assert!(st["error"].is_null(), "{st}");
    }
}

// A submit that reached a runner may be queued there: it is never retried elsewhere after a
// reset (the blocking route retries resets once; the queue route must not).
#[test]
fn a_submit_whose_runner_resets_is_not_retried_on_another_runner() {
    let fake = FakeRunner::start(HintsMode::Report(vec![]));
    fake.set_mode(HintsMode::Body(queue_report_body(&fake.addr, &["m0".into()], "00000000000000fa")));
    fake.set_header_hints("m0");
    fake.reset_inference(true);
    let real = Runner::start(&["--load-ms", "20", "--infer-ms", "5"]);
    let e = Envoy::start(&[fake.addr.clone(), real.addr.clone()], &EnvoyOptions::production(), 2);
    let out =
        fal_queue_steps(&e, APP, &json!([{"call": "submit", "model": "m0", "hint": "m0", "name": "x"}]));
    let err = failed(&out[0], "503");
    let report = real.hints().unwrap();
    eprintln!(
        "submit to a resetting runner: {err}; fake saw {} submit(s); the other runner holds {:?}",
        fake.inference_count(),
        report.hints
    );
    assert_eq!(fake.inference_count(), 1, "exactly one attempt");
    assert!(report.hints.is_empty(), "the other runner ran nothing");
    assert_eq!(report.in_flight, 0);
}

// The runner kit (runner-kit/hint_queue.py) gives a real fal.App the same queue: the job runs
// through the app's own endpoint, with fal's x-fal-request-id.
#[test]
fn a_fal_app_wrapped_by_the_runner_kit_serves_the_queue_to_fal_client() {
    use hint_router_e2e::python::FalApp;
    let kit = &["--kit", "--load-ms", "200", "--infer-ms", "10", "--capacity", "2"];
    let apps = FalApp::start_all(&[("k0", kit), ("k1", kit)]);
    let addrs: Vec<String> = apps.iter().map(|a| a.addr.clone()).collect();
    let e = Envoy::start(&addrs, &EnvoyOptions::production(), 2);
    let out = fal_queue_steps(
        &e,
        APP,
        &json!([
            {"call": "submit_result", "model": "m0", "hint": "m0"},
            {"call": "subscribe", "model": "m0", "hint": "m0", "async": true, "with_logs": true},
            // Both apps busy (max_multiplexing 1), so the next job waits wherever it goes.
            {"call": "submit", "model": "m0", "hint": "m0", "sleep_ms": 2000, "name": "run"},
            {"call": "submit", "model": "m1", "hint": "m1", "sleep_ms": 2000, "name": "run1"},
            {"call": "submit", "model": "m0", "hint": "m0", "name": "queued"},
            {"call": "status", "name": "queued"},
            {"call": "cancel", "name": "queued"},
            {"call": "status", "name": "queued"},
            {"call": "result", "name": "run"},
            {"call": "result", "name": "run1"},
        ]),
    );
    for (i, step) in out.iter().enumerate() {
        eprintln!("step {i}: {step}");
    }
    let first = &ok(&out[0])["result"];
    assert_eq!(first["model"], "m0");
    let holder = first["runner"].as_str().unwrap().to_string();
    assert_eq!(first["saw_request_id"], out[0]["request_id"], "the app saw fal's request id");
    assert_eq!(ok(&out[1])["result"]["cache"], "hit");
    assert_eq!(out[1]["result"]["runner"], holder.as_str(), "the hint kept the job on its holder");
    for st in &out[2..5] {
        ok(st);
    }
    assert_eq!(ok(&out[5])["status"], "Queued", "{}", out[5]);
    ok(&out[6]);
    assert_eq!(ok(&out[7])["error_type"], "Cancelled");
    assert_eq!(ok(&out[8])["result"]["model"], "m0");
    assert_eq!(ok(&out[9])["result"]["model"], "m1");
    let runners: HashSet<&str> =
        [&out[8], &out[9]].iter().map(|s| s["result"]["runner"].as_str().unwrap()).collect();
    assert_eq!(runners.len(), 2, "the two long jobs ran side by side on the two apps");
}

// A job's count is kept after its submit is answered, and given back once the runner says it
// is done (x-runner-in-flight on status calls), not only at the next poll: back-to-back jobs
// for a hot model stay on its holder. Polls are 5 s apart here, so only that correction can
// free the holder in time.
#[test]
fn a_finished_job_frees_its_runner_before_the_next_poll() {
    let opts = plugin(
        EnvoyOptions::production(),
        &[
            ("when_holders_busy", "\"any_available\""),
            ("poll_interval_ms", "5000"),
            ("poll_timeout_ms", "4000"),
        ],
    );
    let s = Stack::start(3, &["--load-ms", "200", "--infer-ms", "10", "--max-concurrency", "1"], &opts);
    let tokens = tokens(&s.runners);
    let steps: Vec<Value> =
        (0..4).map(|_| json!({"call": "submit_result", "model": "m0", "hint": "m0"})).collect();
    let out = fal_queue_steps(&s.envoy, APP, &Value::Array(steps));
    let runners: Vec<usize> =
        out.iter().map(|st| issuer(&tokens, ok(st)["request_id"].as_str().unwrap())).collect();
    let caches: Vec<&str> = out.iter().map(|st| st["result"]["cache"].as_str().unwrap()).collect();
    let corrected = s.envoy.stat("wasmcustom.hint_router.queue.inflight_corrected").unwrap_or(0);
    eprintln!(
        "4 jobs one after another: runners {runners:?}, {caches:?}; counts corrected {corrected} times"
    );
    assert_eq!(caches, ["miss", "hit", "hit", "hit"]);
    assert!(runners.iter().all(|&r| r == runners[0]), "{runners:?}");
    assert!(corrected >= 3, "{corrected}");
}
