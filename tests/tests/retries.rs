//! Retries, frozen and dying runners, overload refusals and what reaches clients, against a
//! real Envoy with the shipped configs (`envoy/demo.yaml` by default, `envoy/envoy.yaml` where
//! a test says production). Each scenario prints its figures:
//! `cargo test -p hint-router-e2e --test retries -- --nocapture`.
//!
//! Executions are counted on the runners themselves: every request asks for a model no runner
//! holds, so each runner the request reaches starts loading it, which a watcher sees in that
//! runner's `/hints` (`loading`, then `hints`). The watcher can also kill or freeze a runner the
//! moment the request reaches it.
//!
//! `E2E_ENVOY_CONFIG=FILE` renders another config (e.g. main's `envoy/envoy.yaml`) to check
//! that these tests fail against it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hint_router_e2e::fake::report_body;
use hint_router_e2e::{signal, Envoy, EnvoyOptions, Stack};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One answer with its headers.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    elapsed: Duration,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// `POST /` for `model`, hinted with the model name, plus `extra` request headers.
fn post(url: &str, model: &str, extra: &[(&str, &str)]) -> Reply {
    let mut req = hint_router_e2e::client()
        .post(url)
        .header("content-type", "application/json")
        .header("x-fal-runner-hint", model)
        .body(serde_json::json!({"model": model, "prompt": "hello"}).to_string());
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let t = Instant::now();
    match req.send() {
        Ok(r) => {
            let status = r.status().as_u16();
            let headers = r
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect();
            let _ = r.bytes();
            Reply { status, headers, elapsed: t.elapsed() }
        }
        // No answer within the client's 60 s.
        Err(_) => Reply { status: 0, headers: BTreeMap::new(), elapsed: t.elapsed() },
    }
}

/// What the watcher does to a runner the watched request reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnReach {
    /// Nothing: only count.
    Count,
    /// SIGKILL the first runner reached.
    KillFirst,
    /// SIGKILL every runner reached (a query of death).
    KillEach,
    /// SIGSTOP the first runner reached.
    FreezeFirst,
}

/// What the watcher saw: runner indexes in the order the request reached them, and when it
/// acted on the first one.
#[derive(Debug, Default)]
struct Reached {
    order: Vec<usize>,
    first_action_at: Option<Instant>,
    /// When the client had its answer (set by [`watched_request`]).
    answered_at: Option<Instant>,
}

/// Polls every runner's `/hints` until `stop`, recording which ones started on `model`.
fn watch(s: &Stack, model: &str, on: OnReach, stop: Arc<AtomicBool>) -> JoinHandle<Reached> {
    let targets: Vec<(String, u32)> = s.runners.iter().map(|r| (r.addr.clone(), r.pid())).collect();
    let model = model.to_string();
    std::thread::spawn(move || {
        let http = reqwest::blocking::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let mut seen = Reached::default();
        while !stop.load(Ordering::Relaxed) {
            for (i, (addr, pid)) in targets.iter().enumerate() {
                if seen.order.contains(&i) {
                    continue;
                }
                let Some(report) = http
                    .get(format!("http://{addr}/hints"))
                    .send()
                    .ok()
                    .and_then(|r| r.bytes().ok())
                    .and_then(|b| serde_json::from_slice::<hint_router_core::wire::HintsReport>(&b).ok())
                else {
                    continue;
                };
                if !(report.loading.contains(&model) || report.hints.contains(&model)) {
                    continue;
                }
                let first = seen.order.is_empty();
                seen.order.push(i);
                let act = match on {
                    OnReach::Count => None,
                    OnReach::KillFirst if first => Some(libc::SIGKILL),
                    OnReach::KillEach => Some(libc::SIGKILL),
                    OnReach::FreezeFirst if first => Some(libc::SIGSTOP),
                    OnReach::KillFirst | OnReach::FreezeFirst => None,
                };
                if let Some(sig) = act {
                    signal(*pid, sig);
                    if first {
                        seen.first_action_at = Some(Instant::now());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        seen
    })
}

/// Sends one request for `model` while watching the runners; the reply and what was reached.
fn watched_request(s: &Stack, model: &str, on: OnReach) -> (Reply, Reached) {
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(s, model, on, stop.clone());
    let reply = post(&s.envoy.url(), model, &[]);
    let answered_at = Instant::now();
    // Room for an attempt that would still be under way (none should be).
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let mut reached = watcher.join().unwrap();
    reached.answered_at = Some(answered_at);
    (reply, reached)
}

fn addrs_of(s: &Stack, r: &Reached) -> Vec<String> {
    r.order.iter().map(|&i| s.runners[i].addr.clone()).collect()
}

// 1. A runner slower than the old per-try timeout (30 s) is never raced by a second one.
#[test]
fn a_slow_runner_is_never_raced_by_a_retry() {
    let s = Stack::start(3, &["--load-ms", "10", "--infer-ms", "32000"], &EnvoyOptions::default());
    let (reply, reached) = watched_request(&s, "slow-model", OnReach::Count);
    eprintln!(
        "slow runner (32 s inference): status {}, after {:.1} s, runners that ran it: {} {:?}",
        reply.status,
        reply.elapsed.as_secs_f64(),
        reached.order.len(),
        addrs_of(&s, &reached)
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reached.order.len(), 1, "the inference ran on {:?}", addrs_of(&s, &reached));
}

// 2. A runner killed while it holds the request: retried once, on another runner.
#[test]
fn a_request_on_a_runner_that_dies_is_retried_once_elsewhere() {
    let s = Stack::start(3, &["--load-ms", "1500", "--infer-ms", "10"], &EnvoyOptions::default());
    let (reply, reached) = watched_request(&s, "dying-model", OnReach::KillFirst);
    let upstream = reply.header("x-hint-router-upstream").unwrap_or("").to_string();
    eprintln!(
        "dying runner (SIGKILL when the request reached it): status {}, after {:.1} s, reached {:?}, answered by {upstream}",
        reply.status,
        reply.elapsed.as_secs_f64(),
        addrs_of(&s, &reached)
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reached.order.len(), 2, "reached {:?}", addrs_of(&s, &reached));
    assert_ne!(reached.order[0], reached.order[1]);
    assert_eq!(upstream, s.runners[reached.order[1]].addr, "answered by the wrong runner");
}

// 3. A request that kills every runner it reaches reaches at most two.
#[test]
fn a_query_of_death_reaches_at_most_two_runners() {
    let s = Stack::start(3, &["--load-ms", "1500", "--infer-ms", "10"], &EnvoyOptions::default());
    let (reply, reached) = watched_request(&s, "deadly-model", OnReach::KillEach);
    eprintln!(
        "query of death: status {}, after {:.1} s, runners killed: {} {:?}",
        reply.status,
        reply.elapsed.as_secs_f64(),
        reached.order.len(),
        addrs_of(&s, &reached)
    );
    assert!(reached.order.len() <= 2, "killed {} runners", reached.order.len());
    assert!(reply.status >= 500, "{reply:?}");
    assert!(reply.elapsed < Duration::from_secs(10), "{reply:?}");
}

// 4. A request on a frozen runner (SIGSTOP) is answered within seconds, not after 30 s.
// Not met: over HTTP/1, Envoy 1.40 has no signal that tells a frozen runner from a slow one
// (the health check marks it unhealthy but close_connections_on_host_health_failure only acts
// on tcp_proxy connections), and a per_try_timeout would race or cut slow runners. Measured:
// main's config answers after its 30 s per-try timeout; the shipped one holds the request
// until the route timeout (the client here gives up after 60 s). It passes with HTTP/2 to the
// runners and keepalive PINGs (`http2_protocol_options: {connection_keepalive: {interval: 1s,
// timeout: 1s}}` on the runners cluster, runner-example built with axum's `http2` feature):
// answered 2.9 s after the freeze by a second runner, and a 32 s inference still ran once.
#[test]
#[ignore = "known gap: Envoy cannot end an HTTP/1 request on a frozen runner without a per-try timeout"]
fn a_request_on_a_frozen_runner_is_answered_within_seconds() {
    let s = Stack::start(3, &["--load-ms", "800", "--infer-ms", "10"], &EnvoyOptions::default());
    let (reply, reached) = watched_request(&s, "frozen-model", OnReach::FreezeFirst);
    let frozen_at = reached.first_action_at.expect("the request reached no runner");
    let after_freeze = reached.answered_at.unwrap().duration_since(frozen_at);
    eprintln!(
        "frozen runner (SIGSTOP when the request reached it): status {}, answered {:.1} s after the freeze \
         (request took {:.1} s), reached {:?}",
        reply.status,
        after_freeze.as_secs_f64(),
        reply.elapsed.as_secs_f64(),
        addrs_of(&s, &reached)
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reached.order.len(), 2, "reached {:?}", addrs_of(&s, &reached));
    // The goal: a few seconds to notice the freeze, plus the retry's load elsewhere (0.8 s).
    assert!(after_freeze < Duration::from_secs(6), "the frozen runner held the request {after_freeze:?}");
}

/// A fake runner that answers `/hints` with `hints` and inference either like a runner whose
/// queue is full (429, `retry-after: 1`, `x-runner-overloaded: queue-full`: nothing ran) or
/// with a 200 carrying every runner header; it records the inference requests' headers.
struct Fake {
    addr: String,
    refuse: bool,
    inference: AtomicU64,
    seen_headers: Mutex<Vec<BTreeMap<String, String>>>,
    stop: AtomicBool,
}

impl Fake {
    fn start(refuse: bool, hints: &[&str]) -> Arc<Fake> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let fake = Arc::new(Fake {
            addr: listener.local_addr().unwrap().to_string(),
            refuse,
            inference: AtomicU64::new(0),
            seen_headers: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let hints: Vec<String> = hints.iter().map(|h| h.to_string()).collect();
        let f = fake.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if f.stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(c) = conn {
                    let (f, hints) = (f.clone(), hints.clone());
                    std::thread::spawn(move || f.serve(c, &hints));
                }
            }
        });
        fake
    }

    fn count(&self) -> u64 {
        self.inference.load(Ordering::Relaxed)
    }

    fn serve(&self, mut c: TcpStream, hints: &[String]) {
        let mut reader = BufReader::new(c.try_clone().unwrap());
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut headers = BTreeMap::new();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 {
                    return;
                }
                let Some((k, v)) = h.trim_end().split_once(':') else { break };
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
            let len = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            let mut body = vec![0; len];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let (status, extra, body) = match path.as_str() {
                "/hints" => (200, String::new(), report_body(&self.addr, hints)),
                "/healthz" | "/health" => (200, String::new(), b"ok".to_vec()),
                _ => {
                    self.inference.fetch_add(1, Ordering::Relaxed);
                    self.seen_headers.lock().unwrap().push(headers);
                    let common = format!(
                        "x-fal-runner-hints: {}\r\nx-runner-id: {}\r\nx-cache: hit\r\n",
                        hints.join(","),
                        self.addr
                    );
                    if self.refuse {
                        let extra = format!("{common}retry-after: 1\r\nx-runner-overloaded: queue-full\r\n");
                        (429, extra, b"{\"error\":\"queue full\"}".to_vec())
                    } else {
                        (200, common, b"{\"output\":\"fake\"}".to_vec())
                    }
                }
            };
            let head = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n",
                body.len()
            );
            if c.write_all(head.as_bytes()).is_err() || c.write_all(&body).is_err() {
                return;
            }
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr);
    }
}

// 5. A runner refusing work it cannot queue: the next runner serves the request at once.
#[test]
fn a_refusing_runner_is_retried_on_the_next_runner_at_once() {
    let models = ["busy-0", "busy-1", "busy-2", "busy-3", "busy-4"];
    let fake = Fake::start(true, &models);
    let real: Vec<hint_router_e2e::Runner> =
        (0..2).map(|_| hint_router_e2e::Runner::start(&["--load-ms", "10", "--infer-ms", "5"])).collect();
    let mut addrs = vec![fake.addr.clone()];
    addrs.extend(real.iter().map(|r| r.addr.clone()));
    let envoy = Envoy::start(&addrs, &EnvoyOptions::default(), 3);
    for (i, m) in models.iter().enumerate() {
        let r = post(&envoy.url(), m, &[]);
        eprintln!(
            "refusal: {m} (held only by the refusing runner): status {}, {} ms, refusals so far {}, answered by {}",
            r.status,
            r.elapsed.as_millis(),
            fake.count(),
            r.header("x-hint-router-upstream").unwrap_or("?")
        );
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(fake.count(), i as u64 + 1, "the refusing runner was not tried first, or twice");
        assert!(r.elapsed < Duration::from_secs(2), "{r:?}");
    }
}

// 6. Every runner refuses: a clear 429 with retry-after at once, after at most 2 attempts,
// also when the client asks Envoy for more retries.
#[test]
fn when_every_runner_refuses_the_client_gets_a_429_with_retry_after_at_once() {
    let fakes: Vec<Arc<Fake>> = (0..3).map(|_| Fake::start(true, &["full"])).collect();
    let addrs: Vec<String> = fakes.iter().map(|f| f.addr.clone()).collect();
    let envoy = Envoy::start(&addrs, &EnvoyOptions::production(), 3);
    let attempts = || fakes.iter().map(|f| f.count()).sum::<u64>();
    let client_retry_headers = [
        ("x-envoy-retry-on", "retriable-status-codes,retriable-headers,5xx,reset"),
        ("x-envoy-retriable-status-codes", "429"),
        ("x-envoy-retriable-header-names", "x-runner-overloaded"),
        ("x-envoy-max-retries", "5"),
    ];
    for (name, extra) in [("plain", &[][..]), ("client asks for 5 retries", &client_retry_headers[..])] {
        let before = attempts();
        let r = post(&envoy.url(), "full", extra);
        let n = attempts() - before;
        eprintln!(
            "all refuse ({name}): status {}, retry-after {:?}, {} ms, attempts {n}, x-runner-overloaded leaked: {}",
            r.status,
            r.header("retry-after"),
            r.elapsed.as_millis(),
            r.header("x-runner-overloaded").is_some()
        );
        assert_eq!(r.status, 429, "{r:?}");
        assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
        assert!(r.elapsed < Duration::from_secs(2), "{r:?}");
        assert_eq!(n, 2, "{name}: one retry on another runner, no more");
        assert_eq!(r.header("x-runner-overloaded"), None);
    }
}

// 7. Production config: no runner header reaches clients, and the filter still learns hints
// from the responses.
#[test]
fn the_production_config_leaks_no_runner_header_and_still_learns_hints() {
    let s = Stack::start(3, &["--load-ms", "10", "--infer-ms", "5"], &EnvoyOptions::production());
    let learned = || s.envoy.stat("wasmcustom.hint_router.response_hints_learned").unwrap_or(0);
    let before = learned();
    let leaky =
        ["x-fal-runner-hints", "x-cache", "x-runner-id", "x-hint-router-upstream", "x-hint-router-decision"];
    let mut leaked = Vec::new();
    for i in 0..6 {
        let r = post(&s.envoy.url(), &format!("leak-{i}"), &[]);
        assert_eq!(r.status, 200, "{r:?}");
        leaked.extend(leaky.iter().filter(|h| r.header(h).is_some()).map(|h| h.to_string()));
    }
    let after = learned();
    eprintln!(
        "production: 6 requests, runner headers seen by the client: {leaked:?}; response_hints_learned {before} -> {after}"
    );
    assert!(leaked.is_empty(), "leaked to the client: {leaked:?}");
    assert!(after > before, "the filter learned nothing from responses");
}

// 8. Client-sent x-forwarded-for and x-envoy-* retry controls never reach a runner.
#[test]
fn client_forwarding_and_retry_headers_never_reach_runners() {
    let fake = Fake::start(false, &["fwd"]);
    let envoy = Envoy::start(std::slice::from_ref(&fake.addr), &EnvoyOptions::production(), 1);
    let sent = [
        ("x-forwarded-for", "203.0.113.7"),
        ("x-envoy-retry-on", "5xx"),
        ("x-envoy-max-retries", "9"),
        ("x-envoy-upstream-rq-per-try-timeout-ms", "1"),
        ("x-envoy-upstream-rq-timeout-ms", "1"),
    ];
    let r = post(&envoy.url(), "fwd", &sent);
    let seen = fake.seen_headers.lock().unwrap().last().cloned().unwrap_or_default();
    let reached: Vec<&str> = sent.iter().map(|(k, _)| *k).filter(|k| seen.contains_key(*k)).collect();
    eprintln!("client headers: status {}, reached the runner: {reached:?}", r.status);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(reached.is_empty(), "reached the runner: {reached:?}");
}
