//! The HTTP API, served on 127.0.0.1:0 in-process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hint_router_core::wire::HintsReport;
use runner_example::backend::{sim_output, Backend, BackendError, BoxFuture, LoadedModel, SimBackend};
use runner_example::http::{ErrorBody, InferResponse, MAX_BODY_BYTES};
use runner_example::runner::{Runner, RunnerConfig};
use runner_example::server::{serve, Drained};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

/// Generous bound for anything that should happen "soon", for slow, loaded CI machines.
const PATIENCE: Duration = Duration::from_secs(30);

/// The sim backend, plus: counts loads, answers `missing-*` with NotFound, and holds loads
/// of `gated-*` until the test adds permits to `gate`.
struct TestBackend {
    sim: Arc<SimBackend>,
    loads: AtomicUsize,
    gate: Arc<Semaphore>,
}

impl Backend for TestBackend {
    fn load(
        self: Arc<Self>,
        model: String,
    ) -> BoxFuture<'static, Result<Arc<dyn LoadedModel>, BackendError>> {
        Box::pin(async move {
            self.loads.fetch_add(1, Ordering::SeqCst);
            if model.starts_with("missing-") {
                return Err(BackendError::NotFound(format!("no weights for {model}")));
            }
            if model.starts_with("gated-") {
                let permit = self.gate.acquire().await;
                drop(permit);
            }
            Arc::clone(&self.sim).load(model).await
        })
    }
}

struct Harness {
    addr: SocketAddr,
    url: String,
    runner: Runner,
    backend: Arc<TestBackend>,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<Drained>>,
}

impl Harness {
    async fn start(capacity: u32, max_concurrency: u32, drain_timeout: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = Arc::new(TestBackend {
            sim: Arc::new(SimBackend::new(Duration::from_millis(20), Duration::from_millis(1))),
            loads: AtomicUsize::new(0),
            gate: Arc::new(Semaphore::new(0)),
        });
        let runner = Runner::new(
            RunnerConfig {
                capacity,
                max_concurrency,
                load_fail_backoff: Duration::from_secs(600),
                ..RunnerConfig::new(addr.to_string())
            },
            backend.clone(),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            runner.clone(),
            async {
                let _ = stopped.await;
            },
            drain_timeout,
        ));
        let client = reqwest::Client::builder().no_proxy().timeout(PATIENCE).build().unwrap();
        Self { addr, url: format!("http://{addr}"), runner, backend, client, stop: Some(stop), server }
    }

    async fn post(&self, body: &str) -> reqwest::Response {
        self.client
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(format!("{}{path}", self.url)).send().await.unwrap()
    }

    async fn hints(&self) -> (HintsReport, serde_json::Value) {
        let response = self.get("/hints").await;
        assert_eq!(response.status(), 200);
        self.check_runner_headers(&response);
        let body = response.bytes().await.unwrap();
        (serde_json::from_slice(&body).unwrap(), serde_json::from_slice(&body).unwrap())
    }

    /// Asserts the headers every response has, and returns the hints header's value.
    fn check_runner_headers(&self, response: &reqwest::Response) -> String {
        let headers = response.headers();
        assert_eq!(headers["x-runner-id"], self.addr.to_string().as_str());
        headers["x-fal-runner-hints"].to_str().unwrap().to_string()
    }

    async fn stop(mut self) -> Drained {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(PATIENCE, self.server).await.unwrap().unwrap().unwrap()
    }
}

/// Polls `cond` until it holds; fails the test after [`PATIENCE`].
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn error_of(response: reqwest::Response) -> String {
    assert_eq!(response.headers()["content-type"], "application/json", "error bodies are JSON");
    let body: ErrorBody = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert!(!body.error.is_empty());
    body.error
}

#[tokio::test]
async fn inference_miss_then_hit_and_headers() {
    let h = Harness::start(2, 2, PATIENCE).await;

    let response = h.post(r#"{"model":"a","prompt":"hello"}"#).await;
    assert_eq!(response.status(), 200);
    assert_eq!(h.check_runner_headers(&response), "a");
    assert_eq!(response.headers()["x-cache"], "miss");
    let body: InferResponse = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body.model, "a");
    assert_eq!(body.output, sim_output("a", "hello"));
    assert_eq!(body.cache, "miss");
    assert!(body.load_ms >= 20, "{body:?}");

    let response = h.post(r#"{"model":"a","prompt":"hello"}"#).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-cache"], "hit");
    let raw: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(raw["cache"], "hit");
    assert_eq!(raw["load_ms"], 0);
    assert_eq!(raw["output"], sim_output("a", "hello").as_str());
    for key in ["queue_ms", "slot_ms", "infer_ms"] {
        assert!(raw[key].is_u64(), "{raw}");
    }
    assert!(!raw.to_string().contains(&h.addr.to_string()), "{raw}");

    // The prompt is optional; unknown fields are ignored.
    let response = h.post(r#"{"model":"b","extra":1}"#).await;
    assert_eq!(response.status(), 200);
    assert_eq!(h.check_runner_headers(&response), "b,a");
    let body: InferResponse = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body.output, sim_output("b", ""));

    let (report, raw) = h.hints().await;
    assert_eq!(
        report,
        HintsReport {
            runner: h.addr.to_string(),
            hints: vec!["b".into(), "a".into()],
            loading: vec![],
            capacity: 2,
            in_flight: 0,
            max_concurrency: 2,
            draining: false,
            resident_bytes: None,
            memory_budget_bytes: None,
            warm: Vec::new(),
            // Random per runner (tests/queue.rs checks it).
            queue_token: report.queue_token.clone(),
        }
    );
    assert_eq!(report.queue_token.as_ref().map(String::len), Some(16));
    assert!(raw.get("resident_bytes").is_none(), "{raw}");
    assert!(raw.get("memory_budget_bytes").is_none(), "{raw}");

    // A third model evicts the least recently used one.
    let response = h.post(r#"{"model":"c"}"#).await;
    assert_eq!(h.check_runner_headers(&response), "c,b");

    let response = h.get("/healthz").await;
    assert_eq!(response.status(), 200);
    assert_eq!(h.check_runner_headers(&response), "c,b");
    assert_eq!(response.text().await.unwrap(), "ok");

    assert_eq!(h.backend.loads.load(Ordering::SeqCst), 3);
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn bad_requests_get_json_errors_and_runner_headers() {
    let h = Harness::start(2, 2, PATIENCE).await;
    h.post(r#"{"model":"a"}"#).await;

    let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(257));
    for body in [
        "",
        "not json",
        r#"{"prompt":"p"}"#,
        r#"{"model":5}"#,
        r#"{"model":""}"#,
        r#"{"model":"a b"}"#,
        r#"{"model":"a,b"}"#,
        r#"{"model":"\u00e9"}"#,
        long.as_str(),
    ] {
        let response = h.post(body).await;
        assert_eq!(response.status(), 400, "{body}");
        assert_eq!(h.check_runner_headers(&response), "a", "{body}");
        error_of(response).await;
    }

    // Unknown path.
    let response = h.get("/nope").await;
    assert_eq!(response.status(), 404);
    assert_eq!(h.check_runner_headers(&response), "a");
    assert_eq!(error_of(response).await, "not found");

    // A model the backend does not know.
    let response = h.post(r#"{"model":"missing-m"}"#).await;
    assert_eq!(response.status(), 404);
    assert_eq!(h.check_runner_headers(&response), "a");
    let message = error_of(response).await;
    assert!(message.starts_with("loading model missing-m failed:"), "{message}");

    // Wrong methods.
    let response = h.get("/").await;
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    assert_eq!(h.check_runner_headers(&response), "a");
    error_of(response).await;
    let response = h.client.post(format!("{}/hints", h.url)).send().await.unwrap();
    assert_eq!(response.status(), 405);
    h.check_runner_headers(&response);
    let response = h.client.delete(format!("{}/healthz", h.url)).send().await.unwrap();
    assert_eq!(response.status(), 405);

    // A body just within the limit is parsed (and is bad JSON); one byte more is too large.
    let body = " ".repeat(MAX_BODY_BYTES);
    let response = h.post(&body).await;
    assert_eq!(response.status(), 400);
    let head = raw_post(h.addr, MAX_BODY_BYTES + 1).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains(&format!("x-runner-id: {}\r\n", h.addr)), "{head}");
    assert!(head.contains("x-fal-runner-hints: a\r\n"), "{head}");
    assert!(head.contains("\"error\""), "{head}");

    assert_eq!(h.stop().await, Drained::Complete);
}

/// Posts `len` bytes over a raw connection and returns what the server answered.
async fn raw_post(addr: SocketAddr, len: usize) -> String {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let head = format!(
        "POST / HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {len}\r\nconnection: close\r\n\r\n"
    );
    // The server may answer before reading the body, and close: ignore write errors.
    let writer = tokio::spawn(async move {
        if write.write_all(head.as_bytes()).await.is_ok() {
            let _ = write.write_all(&vec![b' '; len]).await;
        }
        write
    });
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, read.read_to_end(&mut answer)).await.unwrap().unwrap();
    drop(writer.await.unwrap());
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn failed_loads_answer_503_and_back_off() {
    let h = Harness::start(2, 2, PATIENCE).await;
    let response = h.post(r#"{"model":"fail-x"}"#).await;
    assert_eq!(response.status(), 503);
    assert_eq!(h.check_runner_headers(&response), "");
    assert_eq!(response.headers()["retry-after"], "600");
    let message = error_of(response).await;
    assert!(message.starts_with("loading model fail-x failed: "), "{message}");
    assert_eq!(h.backend.loads.load(Ordering::SeqCst), 1);

    // Within the backoff: answered at once, no new load.
    let response = h.post(r#"{"model":"fail-x"}"#).await;
    assert_eq!(response.status(), 503);
    let message = error_of(response).await;
    assert!(message.starts_with("loading model fail-x failed: "), "{message}");
    assert_eq!(h.backend.loads.load(Ordering::SeqCst), 1);

    let (report, _) = h.hints().await;
    assert!(report.hints.is_empty());
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn loading_models_and_waiting_requests_are_reported() {
    let h = Harness::start(2, 2, PATIENCE).await;
    let requests: Vec<_> = (0..3)
        .map(|_| {
            let client = h.client.clone();
            let url = h.url.clone();
            tokio::spawn(async move { client.post(url).body(r#"{"model":"gated-m"}"#).send().await.unwrap() })
        })
        .collect();
    let runner = h.runner.clone();
    eventually("3 requests in flight", || runner.in_flight() == 3).await;
    let (report, _) = h.hints().await;
    assert_eq!(report.hints, ["gated-m"]);
    assert_eq!(report.loading, ["gated-m"]);
    assert_eq!(report.in_flight, 3);
    let response = h.get("/healthz").await;
    assert_eq!(h.check_runner_headers(&response), "gated-m");

    h.backend.gate.add_permits(1);
    for request in requests {
        let response = request.await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-cache"], "miss");
        assert_eq!(h.check_runner_headers(&response), "gated-m");
    }
    assert_eq!(h.backend.loads.load(Ordering::SeqCst), 1);
    let (report, _) = h.hints().await;
    assert!(report.loading.is_empty());
    assert_eq!(report.in_flight, 0);
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn draining_runner_advertises_nothing_and_fails_healthz() {
    let h = Harness::start(2, 2, PATIENCE).await;
    h.post(r#"{"model":"a"}"#).await;
    h.runner.start_draining();
    let response = h.get("/healthz").await;
    assert_eq!(response.status(), 503);
    assert_eq!(h.check_runner_headers(&response), "");
    assert_eq!(response.text().await.unwrap(), "draining");
    let (report, _) = h.hints().await;
    assert!(report.draining);
    assert!(report.hints.is_empty());
    assert!(report.loading.is_empty());
    // Requests that still arrive are served.
    let response = h.post(r#"{"model":"a"}"#).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-cache"], "hit");
    assert_eq!(h.check_runner_headers(&response), "");
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn shutdown_finishes_requests_in_progress() {
    let mut h = Harness::start(2, 2, PATIENCE).await;
    let request = {
        let client = h.client.clone();
        let url = h.url.clone();
        tokio::spawn(async move { client.post(url).body(r#"{"model":"gated-m"}"#).send().await.unwrap() })
    };
    let runner = h.runner.clone();
    eventually("request in flight", || runner.in_flight() == 1).await;
    let _ = h.stop.take().unwrap().send(());
    eventually("draining", || runner.is_draining()).await;
    assert!(!h.server.is_finished());

    h.backend.gate.add_permits(1);
    let response = request.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(h.check_runner_headers(&response), "");
    assert!(response.text().await.unwrap().contains("gated-m"));
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn drain_gives_up_after_its_timeout() {
    let mut h = Harness::start(2, 2, Duration::from_millis(100)).await;
    let request = {
        let client = h.client.clone();
        let url = h.url.clone();
        tokio::spawn(async move { client.post(url).body(r#"{"model":"gated-m"}"#).send().await })
    };
    let runner = h.runner.clone();
    eventually("request in flight", || runner.in_flight() == 1).await;
    let _ = h.stop.take().unwrap().send(());
    assert_eq!(h.stop().await, Drained::TimedOut);
    request.abort();
}

#[tokio::test]
async fn the_evict_header_picks_the_victim_and_a_bad_one_falls_back_to_lru() {
    let h = Harness::start(3, 2, PATIENCE).await;
    let post_evicting = |model: &'static str, evict: reqwest::header::HeaderValue| {
        let request = h
            .client
            .post(&h.url)
            .header("content-type", "application/json")
            .header("x-hint-router-evict", evict)
            .body(format!(r#"{{"model":"{model}"}}"#));
        async move { request.send().await.unwrap() }
    };
    for model in ["a", "b", "c"] {
        assert_eq!(h.post(&format!(r#"{{"model":"{model}"}}"#)).await.status(), 200);
    }
    // Asked for b (not the LRU a): b goes.
    let response = post_evicting("d", reqwest::header::HeaderValue::from_static("b")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(h.check_runner_headers(&response), "d,c,a");
    // Values that name no resident model, or no valid model at all, change nothing but the
    // choice: the request is served and the LRU model goes, as with no header.
    let bad = [
        reqwest::header::HeaderValue::from_static("no-such-model"),
        reqwest::header::HeaderValue::from_static("d,c"), // a list is not a model name
        reqwest::header::HeaderValue::from_bytes(b"\xffd").unwrap(), // not UTF-8
        reqwest::header::HeaderValue::from_str(&"x".repeat(10_000)).unwrap(), // too long
    ];
    let expected = ["e,d,c", "f,e,d", "g,f,e", "h,g,f"];
    for ((evict, model), want) in bad.into_iter().zip(["e", "f", "g", "h"]).zip(expected) {
        let response = post_evicting(model, evict).await;
        assert_eq!(response.status(), 200, "a bad evict header fails nothing");
        assert_eq!(h.check_runner_headers(&response), want);
    }
    assert_eq!(h.backend.loads.load(Ordering::SeqCst), 8, "one load per model, none repeated");
    assert_eq!(h.stop().await, Drained::Complete);
}
