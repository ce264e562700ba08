//! Real runner processes (the `runner-example` binary) on 127.0.0.1, driven over HTTP and raw
//! TCP the way Envoy and hostile clients would: issue 9, items 4 to 6.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use runner_example::http::{ErrorBody, InferResponse};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous bound for anything that should happen "soon", for slow, loaded CI machines.
const PATIENCE: Duration = Duration::from_secs(30);

/// A runner process, killed on drop.
struct RunnerProcess {
    child: Child,
    addr: SocketAddr,
    url: String,
    client: reqwest::Client,
}

impl RunnerProcess {
    /// Starts `runner-example --listen 127.0.0.1:0 ARGS` and waits for `listening on ADDR`.
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_runner-example"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // The first line, read on a thread so that a runner that never prints fails the test
        // after PATIENCE instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(PATIENCE) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                panic!("runner did not start: {e}");
            }
        };
        let addr: SocketAddr = line.trim().strip_prefix("listening on ").unwrap().parse().unwrap();
        let client = reqwest::Client::builder().no_proxy().timeout(PATIENCE).build().unwrap();
        Self { child, addr, url: format!("http://{addr}"), client }
    }

    async fn post(&self, body: &str) -> reqwest::Response {
        self.client.post(&self.url).body(body.to_string()).send().await.unwrap()
    }

    async fn hints(&self) -> Value {
        let response = self.client.get(format!("{}/hints", self.url)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        json(response).await
    }

    /// Polls `/hints` until `cond` holds on it; fails the test after [`PATIENCE`].
    async fn wait_for(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let hints = self.hints().await;
            if cond(&hints) {
                return hints;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {hints}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends a request on a raw connection and returns it, unanswered.
    async fn send_raw(&self, body: &str) -> TcpStream {
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        let head = format!(
            "POST / HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream
    }
}

impl Drop for RunnerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn json<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> T {
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

fn field(hints: &Value, name: &str) -> u64 {
    hints[name].as_u64().unwrap_or_else(|| panic!("no {name} in {hints}"))
}

fn hint_list(hints: &Value) -> Vec<String> {
    hints["hints"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().to_string()).collect()
}

/// Item 4: a client that goes away mid-inference (as when Envoy resets the stream) does not
/// free the inference slot while the work goes on: the next request waits for it.
#[tokio::test]
async fn a_disconnected_client_keeps_its_inference_slot_until_the_work_ends() {
    const INFER_MS: u64 = 1500;
    let runner = RunnerProcess::start(&[
        "--backend",
        "sim",
        "--load-ms",
        "0",
        "--infer-ms",
        &INFER_MS.to_string(),
        "--max-concurrency",
        "1",
        "--capacity",
        "1",
    ]);
    let orphan = runner.send_raw(r#"{"model":"a","prompt":"orphan"}"#).await;
    // Loaded (in no time) and so inferring; then some way into the inference.
    runner
        .wait_for("the first inference", |h| {
            field(h, "in_flight") == 1 && h["loading"] == serde_json::json!([])
        })
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let dropped_at = Instant::now();
    drop(orphan); // the client goes away mid-inference
                  // The runner notices the closed connection; the work, and its count, go on.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let hints = runner.hints().await;
    println!("after the disconnect: {hints}");
    assert_eq!(field(&hints, "in_flight"), 1, "{hints}");
    assert_eq!(field(&hints, "running"), 1, "{hints}");

    let response = runner.post(r#"{"model":"a","prompt":"next"}"#).await;
    let waited = dropped_at.elapsed();
    assert_eq!(response.status(), 200);
    let body: InferResponse = json(response).await;
    println!(
        "the next request: queue_ms {} infer_ms {}, answered {waited:?} after the disconnect",
        body.queue_ms, body.infer_ms
    );
    // It queued behind the orphaned inference (most of INFER_MS was left of it).
    assert!(body.queue_ms >= INFER_MS / 2, "queue_ms {}: ran beside the orphaned inference", body.queue_ms);
    let hints = runner.wait_for("nothing in flight", |h| field(h, "in_flight") == 0).await;
    assert_eq!(field(&hints, "running"), 0);
}

/// Item 5: requests for models that do not exist are answered 404 at once and evict nothing.
#[tokio::test]
async fn requests_for_unknown_models_leave_the_hot_models_resident() {
    let dir = tempfile::tempdir().unwrap();
    let made = Command::new(env!("CARGO_BIN_EXE_make-models"))
        .args(["--dir", dir.path().to_str().unwrap(), "--count", "3", "--size-mb", "1"])
        .status()
        .unwrap();
    assert!(made.success());
    let runner = RunnerProcess::start(&[
        "--backend",
        "cpu",
        "--models-dir",
        dir.path().to_str().unwrap(),
        "--capacity",
        "2",
    ]);
    for model in ["model-0", "model-1"] {
        let response = runner.post(&format!(r#"{{"model":"{model}"}}"#)).await;
        assert_eq!(response.status(), 200);
    }
    let before = runner.hints().await;
    assert_eq!(hint_list(&before), ["model-1", "model-0"]);
    let started = Instant::now();
    for i in 1..=50 {
        let response = runner.post(&format!(r#"{{"model":"nope-{i}"}}"#)).await;
        assert_eq!(response.status(), 404);
        let body: ErrorBody = json(response).await;
        assert!(body.error.contains(&format!("no model nope-{i}")), "{}", body.error);
    }
    println!("50 unknown models answered in {:?}", started.elapsed());
    let after = runner.hints().await;
    assert_eq!(hint_list(&after), ["model-1", "model-0"], "{after}");
    assert_eq!(after["resident_bytes"], before["resident_bytes"]);
    let response = runner.post(r#"{"model":"model-0"}"#).await;
    assert_eq!(response.headers()["x-cache"], "hit");
}

/// Item 6: a runner with `max_concurrency + max_queue` requests in progress refuses the next
/// at once with 429, `retry-after: 1` and `x-runner-overloaded: queue-full`, runs nothing of
/// it, and counts it.
#[tokio::test]
async fn a_full_runner_answers_429_at_once_and_runs_nothing() {
    let runner = RunnerProcess::start(&[
        "--load-ms",
        "0",
        "--infer-ms",
        "3000",
        "--max-concurrency",
        "1",
        "--max-queue",
        "1",
    ]);
    let busy = [runner.send_raw(r#"{"model":"a"}"#).await, runner.send_raw(r#"{"model":"a"}"#).await];
    let hints = runner
        .wait_for("one request running, one queued", |h| {
            field(h, "in_flight") == 2 && field(h, "running") == 1
        })
        .await;
    assert_eq!((field(&hints, "running"), field(&hints, "queued")), (1, 1), "{hints}");
    assert_eq!(field(&hints, "max_queue"), 1);

    let started = Instant::now();
    let response = runner.post(r#"{"model":"other","prompt":"x"}"#).await;
    let took = started.elapsed();
    println!("refused in {took:?}");
    assert_eq!(response.status(), 429);
    assert!(took < Duration::from_secs(2), "{took:?}: not at once");
    let headers = response.headers();
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["x-runner-overloaded"], "queue-full");
    assert_eq!(headers["content-type"], "application/json");
    let body: ErrorBody = json(response).await;
    assert!(body.error.contains("queue is full"), "{}", body.error);

    let hints = runner.hints().await;
    assert_eq!(field(&hints, "refused_total"), 1, "{hints}");
    assert_eq!(field(&hints, "in_flight"), 2, "{hints}");
    assert_eq!(hint_list(&hints), ["a"], "the refused request's model was not loaded");
    drop(busy);
}

/// Item 6: connections beyond `--max-connections` are closed at once, unread; closing one
/// makes room again.
#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let runner = RunnerProcess::start(&["--max-connections", "2", "--load-ms", "0", "--infer-ms", "0"]);
    let first = TcpStream::connect(runner.addr).await.unwrap();
    let second = TcpStream::connect(runner.addr).await.unwrap();
    let mut third = TcpStream::connect(runner.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let started = Instant::now();
    // Closed by the runner: end of stream (or a reset), without an answer.
    let read = tokio::time::timeout(PATIENCE, third.read(&mut buf)).await.unwrap();
    println!("the third connection closed after {:?}: {read:?}", started.elapsed());
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    drop((first, second));
    // Room again (the runner sees the two close; poll until a request gets through).
    let deadline = Instant::now() + PATIENCE;
    loop {
        match runner.client.get(format!("{}/healthz", runner.url)).send().await {
            Ok(response) if response.status() == 200 => break,
            other => assert!(Instant::now() < deadline, "no room again: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hints = runner.hints().await;
    assert!(field(&hints, "connections_refused_total") >= 1, "{hints}");
}
