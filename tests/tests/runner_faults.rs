//! Runner-side faults behind a real Envoy (issue 9, items 4 to 6): a full runner refuses at
//! once, a client that gives up does not free the runner's slot while the work goes on, and
//! requests for models that do not exist evict nothing. Each test prints what it measured
//! (`cargo test -p hint-router-e2e --test runner_faults -- --nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hint_router_e2e::util::{make_models, wait_until};
use hint_router_e2e::{client, infer, EnvoyOptions, Runner, Stack};
use std::time::{Duration, Instant};

fn h(m: &str) -> Option<&[u8]> {
    Some(m.as_bytes())
}

/// The runner's `/hints` document, with the runner-only fields (`running`, `queued`,
/// `refused_total`).
fn hints_json(r: &Runner) -> serde_json::Value {
    let text = client().get(format!("http://{}/hints", r.addr)).send().unwrap().text().unwrap();
    serde_json::from_str(&text).unwrap()
}

fn field(v: &serde_json::Value, name: &str) -> u64 {
    v[name].as_u64().unwrap_or_else(|| panic!("no {name} in {v}"))
}

/// Posts straight to a runner (bypassing Envoy), on a thread; the answer's JSON body.
fn direct_in_background(r: &Runner, model: &str) -> std::thread::JoinHandle<(u16, String)> {
    let url = format!("http://{}/", r.addr);
    let body = serde_json::json!({"model": model}).to_string();
    std::thread::spawn(move || {
        let response = client().post(url).body(body).send().unwrap();
        (response.status().as_u16(), response.text().unwrap())
    })
}

// Item 6: every runner full: the client gets a clear refusal at once, not a hang.
#[test]
fn when_every_runner_is_full_the_client_is_refused_at_once() {
    const INFER_MS: u64 = 3000;
    let s = Stack::start(
        2,
        &[
            "--load-ms",
            "0",
            "--infer-ms",
            &INFER_MS.to_string(),
            "--max-concurrency",
            "1",
            "--max-queue",
            "0",
        ],
        &EnvoyOptions::default(),
    );
    let busy: Vec<_> = s.runners.iter().map(|r| direct_in_background(r, "busy")).collect();
    for r in &s.runners {
        assert!(
            wait_until(Duration::from_secs(20), || field(&hints_json(r), "running") == 1).is_some(),
            "runner {} never got busy",
            r.addr
        );
    }
    let answer = infer(&s.envoy.url(), "model-x", h("model-x"), &[]);
    // The refusal's headers as the client sees them.
    let refusal = client()
        .post(s.envoy.url())
        .header("x-fal-runner-hint", "model-x")
        .body(r#"{"model":"model-x"}"#)
        .send()
        .unwrap();
    let retry_after =
        refusal.headers().get("retry-after").map(|v| v.to_str().unwrap_or_default().to_string());
    eprintln!("the client sees status {} with retry-after {retry_after:?}", refusal.status());
    assert_eq!(retry_after.as_deref(), Some("1"), "no retry-after for the client");
    let refused: u64 = s.runners.iter().map(|r| field(&hints_json(r), "refused_total")).sum();
    let in_flight: Vec<u64> = s.runners.iter().map(|r| field(&hints_json(r), "in_flight")).collect();
    eprintln!(
        "every runner full: status {} in {:?} ({} ms of inference left), refusals counted {refused}, \
         in_flight {in_flight:?}, body {}",
        answer.status, answer.elapsed, INFER_MS, answer.body
    );
    assert!(answer.status == 429 || answer.status == 503, "status {}: {}", answer.status, answer.body);
    assert!(answer.elapsed < Duration::from_millis(INFER_MS / 2), "took {:?}", answer.elapsed);
    assert!(refused >= 2, "the runners counted {refused} refusals");
    assert_eq!(in_flight, [1, 1], "the refused request ran somewhere");
    for b in busy {
        assert_eq!(b.join().unwrap().0, 200);
    }
}

// Item 4: a client that gives up makes Envoy reset the upstream request; the runner keeps
// the slot until the inference really ends, and the next request queues behind it.
#[test]
fn a_client_that_gives_up_does_not_free_the_runner_slot_early() {
    const INFER_MS: u64 = 2500;
    let s = Stack::start(
        1,
        &["--load-ms", "0", "--infer-ms", &INFER_MS.to_string(), "--max-concurrency", "1"],
        &EnvoyOptions::default(),
    );
    let r = &s.runners[0];
    let impatient = reqwest::blocking::Client::builder().timeout(Duration::from_millis(700)).build().unwrap();
    let gave_up = impatient
        .post(s.envoy.url())
        .header("x-fal-runner-hint", "model-a")
        .body(r#"{"model":"model-a","prompt":"bye"}"#)
        .send();
    assert!(gave_up.is_err(), "answered within 700 ms: {gave_up:?}");
    let gave_up_at = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let after = hints_json(r);
    eprintln!("300 ms after the client gave up: {after}");
    assert_eq!(field(&after, "in_flight"), 1, "{after}");
    assert_eq!(field(&after, "running"), 1, "{after}");
    let next = infer(&s.envoy.url(), "model-a", h("model-a"), &[]);
    assert_eq!(next.status, 200, "{}", next.body);
    let body: serde_json::Value = serde_json::from_str(&next.body).unwrap();
    let queue_ms = body["queue_ms"].as_u64().unwrap();
    eprintln!(
        "the next request: queue_ms {queue_ms}, answered {:?} after the client gave up",
        gave_up_at.elapsed()
    );
    assert!(queue_ms >= 500, "queue_ms {queue_ms}: it ran beside the abandoned inference");
    assert!(wait_until(Duration::from_secs(20), || field(&hints_json(r), "in_flight") == 0).is_some());
}

// Item 5: requests for models that do not exist cannot flush a runner's cache.
#[test]
fn requests_for_unknown_models_leave_the_hot_models_resident() {
    let dir = make_models(3, 1);
    let s = Stack::start(
        1,
        &["--backend", "cpu", "--models-dir", dir.to_str().unwrap(), "--capacity", "2"],
        &EnvoyOptions::default(),
    );
    let url = s.envoy.url();
    for m in ["model-0", "model-1"] {
        assert_eq!(infer(&url, m, h(m), &[]).status, 200);
    }
    let before = s.runners[0].hints().unwrap();
    assert_eq!(before.hints, ["model-1", "model-0"]);
    let t = Instant::now();
    let statuses: Vec<u16> = (1..=40)
        .map(|i| {
            let m = format!("nope-{i}");
            infer(&url, &m, h(&m), &[]).status
        })
        .collect();
    let after = s.runners[0].hints().unwrap();
    eprintln!(
        "40 unknown models through Envoy in {:?}: statuses {:?}; hints before {:?}, after {:?}; \
         resident bytes before {:?}, after {:?}",
        t.elapsed(),
        statuses.iter().collect::<std::collections::BTreeSet<_>>(),
        before.hints,
        after.hints,
        before.resident_bytes,
        after.resident_bytes
    );
    assert!(statuses.iter().all(|&st| st == 404), "{statuses:?}");
    assert_eq!(after.hints, ["model-1", "model-0"]);
    assert_eq!(after.resident_bytes, before.resident_bytes);
    let hit = infer(&url, "model-0", h("model-0"), &[]);
    assert_eq!(hit.status, 200);
    let body: serde_json::Value = serde_json::from_str(&hit.body).unwrap();
    assert_eq!(body["cache"], "hit");
}
