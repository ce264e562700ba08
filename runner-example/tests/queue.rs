//! fal's queue on the runner (docs/queue.md), served on 127.0.0.1:0 in-process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hint_router_core::queue::{parse_token, request_id_token};
use runner_example::backend::{sim_output, Backend, BackendError, BoxFuture, LoadedModel, SimBackend};
use runner_example::runner::{Runner, RunnerConfig};
use runner_example::server::{serve, Drained};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

/// Generous bound for anything that should happen "soon", for slow, loaded CI machines.
const PATIENCE: Duration = Duration::from_secs(30);

/// The sim backend, plus: holds loads of `gated-*` until the test adds permits to
/// `load_gate`, holds each inference of `slow-*` until it adds one to `infer_gate`, and
/// counts loads and inferences started.
struct GatedBackend {
    sim: Arc<SimBackend>,
    load_gate: Arc<Semaphore>,
    infer_gate: Arc<Semaphore>,
    loads: AtomicUsize,
    infers: Arc<AtomicUsize>,
}

struct GatedModel {
    inner: Arc<dyn LoadedModel>,
    gate: Option<Arc<Semaphore>>,
    infers: Arc<AtomicUsize>,
}

impl Backend for GatedBackend {
    fn load(
        self: Arc<Self>,
        model: String,
    ) -> BoxFuture<'static, Result<Arc<dyn LoadedModel>, BackendError>> {
        Box::pin(async move {
            self.loads.fetch_add(1, Ordering::SeqCst);
            if model.starts_with("gated-") {
                drop(self.load_gate.acquire().await);
            }
            let gate = model.starts_with("slow-").then(|| Arc::clone(&self.infer_gate));
            let inner = Arc::clone(&self.sim).load(model).await?;
            let loaded: Arc<dyn LoadedModel> =
                Arc::new(GatedModel { inner, gate, infers: self.infers.clone() });
            Ok(loaded)
        })
    }
}

impl LoadedModel for GatedModel {
    fn infer(self: Arc<Self>, prompt: String) -> BoxFuture<'static, Result<String, BackendError>> {
        Box::pin(async move {
            self.infers.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                gate.acquire().await.map_err(|e| BackendError::Failed(e.to_string()))?.forget();
            }
            Arc::clone(&self.inner).infer(prompt).await
        })
    }
}

struct Harness {
    url: String,
    runner: Runner,
    backend: Arc<GatedBackend>,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<Drained>>,
}

impl Harness {
    async fn start(configure: impl FnOnce(RunnerConfig) -> RunnerConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = Arc::new(GatedBackend {
            sim: Arc::new(SimBackend::new(Duration::from_millis(20), Duration::from_millis(1))),
            load_gate: Arc::new(Semaphore::new(0)),
            infer_gate: Arc::new(Semaphore::new(0)),
            loads: AtomicUsize::new(0),
            infers: Arc::new(AtomicUsize::new(0)),
        });
        let config = configure(RunnerConfig {
            capacity: 3,
            max_concurrency: 2,
            ..RunnerConfig::new(addr.to_string())
        });
        let runner = Runner::new(config, backend.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let server = tokio::spawn(serve(listener, runner.clone(), shutdown, PATIENCE));
        let client = reqwest::Client::builder().no_proxy().timeout(PATIENCE).build().unwrap();
        Self { url: format!("http://{addr}"), runner, backend, client, stop: Some(stop), server }
    }

    async fn post(&self, path: &str, body: &str) -> reqwest::Response {
        let request =
            self.client.post(format!("{}{path}", self.url)).header("content-type", "application/json");
        request.body(body.to_string()).send().await.unwrap()
    }

    /// Submits `body` and returns the submit answer.
    async fn submit(&self, body: &str) -> Value {
        let response = self.post("/queue/submit", body).await;
        assert_eq!(response.status(), 200);
        json_of(response).await
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(format!("{}{path}", self.url)).send().await.unwrap()
    }

    async fn status(&self, id: &str) -> Value {
        let response = self.get(&format!("/queue/requests/{id}/status")).await;
        assert_eq!(response.status(), 200);
        json_of(response).await
    }

    async fn cancel(&self, id: &str) -> (u16, Value) {
        let url = format!("{}/queue/requests/{id}/cancel", self.url);
        let response = self.client.put(url).send().await.unwrap();
        (response.status().as_u16(), json_of(response).await)
    }

    /// Polls the job's status until it says `status`; returns that status answer.
    async fn until(&self, id: &str, status: &str) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let answer = self.status(id).await;
            if answer["status"] == status {
                return answer;
            }
            assert!(tokio::time::Instant::now() < deadline, "never {status}: {answer}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn token(&self) -> String {
        let hints = json_of(self.get("/hints").await).await;
        hints["queue_token"].as_str().unwrap().to_string()
    }

    fn jobs(&self) -> usize {
        self.runner.queue().unwrap().len()
    }

    async fn stop(mut self) -> Drained {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.backend.load_gate.add_permits(1000);
        self.backend.infer_gate.add_permits(1000);
        tokio::time::timeout(PATIENCE, self.server).await.unwrap().unwrap().unwrap()
    }
}

async fn json_of(response: reqwest::Response) -> Value {
    assert_eq!(response.headers()["content-type"], "application/json");
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

/// Polls `cond` until it holds; fails the test after [`PATIENCE`].
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn id_of(submitted: &Value) -> String {
    submitted["request_id"].as_str().unwrap().to_string()
}

/// An answer's body without its timings, which differ from request to request.
fn untimed(mut body: Value) -> Value {
    for key in ["queue_ms", "slot_ms", "load_ms", "infer_ms"] {
        assert!(body[key].is_u64(), "{body}");
        body.as_object_mut().unwrap().remove(key);
    }
    body
}

#[tokio::test]
async fn a_job_runs_like_a_blocking_request_and_reports_its_way() {
    let h = Harness::start(|c| c).await;
    let body = r#"{"model":"a","prompt":"hello"}"#;
    h.post("/", body).await; // a miss: now the model is resident for both below
    let blocking = h.post("/", body).await;
    assert_eq!(blocking.headers()["x-cache"], "hit");
    let blocking = json_of(blocking).await;

    let token = h.token().await;
    let submitted = h.submit(body).await;
    let id = id_of(&submitted);
    assert!(id.starts_with(&format!("{token}-")), "{id}");
    assert_eq!(request_id_token(id.as_bytes()), parse_token(token.as_bytes()));
    let base = format!("{}/queue/requests/{id}", h.url);
    assert_eq!(
        submitted,
        json!({
            "request_id": id,
            "response_url": base,
            "status_url": format!("{base}/status"),
            "cancel_url": format!("{base}/cancel"),
            "status": "IN_QUEUE",
            "queue_position": 0,
        })
    );
    let done = h.until(&id, "COMPLETED").await;
    assert_eq!(done["response_url"], base.as_str());
    assert_eq!(done["logs"], Value::Null);
    assert!(done["metrics"]["inference_time"].as_f64().unwrap() >= 0.0, "{done}");
    assert!(done.get("error").is_none() && done.get("error_type").is_none(), "{done}");

    let result = h.get(&format!("/queue/requests/{id}")).await;
    assert_eq!(result.status(), 200);
    assert_eq!(result.headers()["x-cache"], "hit");
    assert!(result.headers().contains_key("x-runner-id"));
    let result = json_of(result).await;
    assert_eq!(result["output"], sim_output("a", "hello").as_str());
    assert_eq!(untimed(result), untimed(blocking));
    // Fetching it again gives it again, until it expires.
    assert_eq!(h.get(&format!("/queue/requests/{id}/")).await.status(), 200);
    assert_eq!(h.runner.in_flight(), 0);
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn logs_and_in_progress_of_a_job_that_loads() {
    let h = Harness::start(|c| c).await;
    let id = id_of(&h.submit(r#"{"model":"slow-a"}"#).await);
    let running = h.until(&id, "IN_PROGRESS").await;
    assert_eq!(running["logs"], Value::Null);
    assert!(running.get("queue_position").is_none(), "{running}");
    let result = h.get(&format!("/queue/requests/{id}")).await;
    assert_eq!(result.status(), 400);
    assert_eq!(json_of(result).await, json!({"detail": "Request is still in progress"}));
    h.backend.infer_gate.add_permits(1);
    h.until(&id, "COMPLETED").await;
    for query in ["?logs=1", "?logs=true"] {
        let done = json_of(h.get(&format!("/queue/requests/{id}/status{query}")).await).await;
        let logs = done["logs"].as_array().unwrap();
        let messages: Vec<&str> = logs.iter().map(|l| l["message"].as_str().unwrap()).collect();
        assert_eq!(messages.len(), 4, "{messages:?}");
        assert!(messages[0].starts_with("accepted"), "{messages:?}");
        assert!(messages[1].starts_with("model loaded"), "{messages:?}");
        assert_eq!(messages[2..], ["running", "completed"]);
        for line in logs {
            assert_eq!((&line["level"], &line["source"]), (&json!("INFO"), &json!("runner")), "{line}");
            let stamp = line["timestamp"].as_str().unwrap();
            assert!(stamp.len() == 24 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T', "{stamp}");
        }
    }
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn queue_positions_count_the_jobs_ahead_not_started() {
    let h = Harness::start(|c| RunnerConfig { max_concurrency: 1, ..c }).await;
    let first = id_of(&h.submit(r#"{"model":"slow-a","prompt":"0"}"#).await);
    h.until(&first, "IN_PROGRESS").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let submitted = h.submit(&format!(r#"{{"model":"slow-a","prompt":"{}"}}"#, i + 1)).await;
        assert_eq!(submitted["queue_position"], i);
        ids.push(id_of(&submitted));
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(h.status(id).await["queue_position"], i, "{id}");
    }
    assert_eq!(h.runner.in_flight(), 4);
    h.backend.infer_gate.add_permits(1);
    h.until(&first, "COMPLETED").await;
    h.until(&ids[0], "IN_PROGRESS").await;
    assert_eq!(h.status(&ids[1]).await["queue_position"], 0);
    assert_eq!(h.status(&ids[2]).await["queue_position"], 1);
    h.backend.infer_gate.add_permits(3);
    for (i, id) in ids.iter().enumerate() {
        h.until(id, "COMPLETED").await;
        let result = json_of(h.get(&format!("/queue/requests/{id}")).await).await;
        assert_eq!(result["output"], sim_output("slow-a", &(i + 1).to_string()).as_str());
    }
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn cancelling_a_queued_job_frees_its_place_and_runs_nothing() {
    let h = Harness::start(|c| RunnerConfig { max_concurrency: 1, ..c }).await;
    let running = id_of(&h.submit(r#"{"model":"slow-a"}"#).await);
    h.until(&running, "IN_PROGRESS").await;
    let queued = id_of(&h.submit(r#"{"model":"slow-a"}"#).await);
    assert_eq!(h.runner.in_flight(), 2);
    assert_eq!(h.cancel(&queued).await, (200, json!({"status": "OK"})));
    let runner = h.runner.clone();
    eventually("the cancelled job's admission goes", || runner.in_flight() == 1).await;
    let status = h.status(&queued).await;
    assert_eq!(status["status"], "COMPLETED");
    assert_eq!(status["error_type"], "Cancelled");
    let result = h.get(&format!("/queue/requests/{queued}")).await;
    assert_eq!(result.status(), 400);
    assert_eq!(json_of(result).await, json!({"detail": "Request was cancelled"}));
    assert_eq!(h.cancel(&queued).await, (400, json!({"status": "ALREADY_COMPLETED"})));

    h.backend.infer_gate.add_permits(1);
    h.until(&running, "COMPLETED").await;
    assert_eq!(h.get(&format!("/queue/requests/{running}")).await.status(), 200);
    assert_eq!(h.cancel(&running).await, (400, json!({"status": "ALREADY_COMPLETED"})));
    assert_eq!(h.backend.infers.load(Ordering::SeqCst), 1, "the cancelled job never ran");
    eventually("nothing in flight", || runner.in_flight() == 0).await;
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn cancelling_a_job_waiting_for_a_load_leaves_the_load_to_others() {
    let h = Harness::start(|c| c).await;
    let blocking = {
        let request = h.client.post(&h.url).body(r#"{"model":"gated-m"}"#);
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    let runner = h.runner.clone();
    eventually("the blocking request waits for the load", || runner.in_flight() == 1).await;
    let job = id_of(&h.submit(r#"{"model":"gated-m"}"#).await);
    assert_eq!(h.status(&job).await["status"], "IN_QUEUE");
    assert_eq!(h.cancel(&job).await.0, 200);
    eventually("the cancelled job's admission goes", || runner.in_flight() == 1).await;
    h.backend.load_gate.add_permits(1);
    let blocking = blocking.await.unwrap();
    assert_eq!(blocking.status(), 200);
    assert_eq!(h.backend.loads.load(Ordering::SeqCst), 1);
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn a_running_job_asked_to_cancel_finishes_and_keeps_its_result() {
    let h = Harness::start(|c| c).await;
    let id = id_of(&h.submit(r#"{"model":"slow-a","prompt":"p"}"#).await);
    h.until(&id, "IN_PROGRESS").await;
    assert_eq!(h.cancel(&id).await, (202, json!({"status": "CANCELLATION_REQUESTED"})));
    assert_eq!(h.cancel(&id).await.0, 202);
    assert_eq!(h.status(&id).await["status"], "IN_PROGRESS");
    h.backend.infer_gate.add_permits(1);
    let done = h.until(&id, "COMPLETED").await;
    assert!(done.get("error_type").is_none(), "{done}");
    let result = h.get(&format!("/queue/requests/{id}")).await;
    assert_eq!(result.status(), 200);
    assert_eq!(json_of(result).await["output"], sim_output("slow-a", "p").as_str());
    let logs = json_of(h.get(&format!("/queue/requests/{id}/status?logs=1")).await).await;
    let asked = logs["logs"].as_array().unwrap().iter().filter(|l| l["level"] == "WARNING").count();
    assert_eq!(asked, 1, "{logs}");
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn failed_jobs_complete_with_their_error_answer() {
    let h = Harness::start(|c| c).await;
    let id = id_of(&h.submit(r#"{"model":"fail-x"}"#).await);
    let done = h.until(&id, "COMPLETED").await;
    assert_eq!(done["error_type"], "LoadFailed");
    assert!(done["error"].as_str().unwrap().starts_with("loading model fail-x failed"), "{done}");
    assert_eq!(done["metrics"], json!({}), "no inference ran");
    let result = h.get(&format!("/queue/requests/{id}")).await;
    assert_eq!(result.status(), 503);
    assert!(result.headers().contains_key("retry-after"));
    let blocking = h.post("/", r#"{"model":"fail-x"}"#).await;
    assert_eq!(json_of(result).await, json_of(blocking).await);
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn unknown_and_malformed_ids_are_not_found() {
    let h = Harness::start(|c| c).await;
    let token = h.token().await;
    let other = if token.starts_with('0') { "1" } else { "0" }.to_string() + &token[1..];
    for id in [
        format!("{token}-{}", "0".repeat(32)),
        format!("{other}-{}", "0".repeat(32)),
        format!("{token}-{}", "A".repeat(32)),
        "abc".to_string(),
        "%ff".to_string(),
    ] {
        for path in [format!("/queue/requests/{id}/status"), format!("/queue/requests/{id}")] {
            let response = h.get(&path).await;
            assert_eq!(response.status(), 404, "{path}");
            assert_eq!(json_of(response).await, json!({"detail": "Request not found"}), "{path}");
        }
        let (code, body) = h.cancel(&id).await;
        assert_eq!((code, &body["status"]), (404, &json!("NOT_FOUND")), "{id}");
    }
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn bad_submissions_queue_nothing() {
    let h = Harness::start(|c| c).await;
    for body in ["", "not json", r#"{"prompt":"p"}"#, r#"{"model":""}"#, r#"{"model":"a,b"}"#] {
        let response = h.post("/queue/submit", body).await;
        assert_eq!(response.status(), 400, "{body}");
        assert!(json_of(response).await["error"].is_string());
    }
    let response = h.post("/queue/submit/generate", r#"{"model":"a"}"#).await;
    assert_eq!(response.status(), 404, "runner-example has one endpoint");
    let response = h.get("/queue/submit").await;
    assert_eq!(response.status(), 405);
    assert_eq!((h.jobs(), h.runner.in_flight()), (0, 0));
    assert_eq!(h.post("/queue/submit/", r#"{"model":"a"}"#).await.status(), 200);
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn a_full_runner_refuses_submissions_like_requests() {
    let h = Harness::start(|c| RunnerConfig { max_concurrency: 1, max_queue: 1, ..c }).await;
    let first = id_of(&h.submit(r#"{"model":"slow-a"}"#).await);
    let second = id_of(&h.submit(r#"{"model":"slow-a"}"#).await);
    for path in ["/queue/submit", "/"] {
        let response = h.post(path, r#"{"model":"slow-a"}"#).await;
        assert_eq!(response.status(), 429, "{path}");
        assert_eq!(response.headers()["x-runner-overloaded"], "queue-full");
        assert_eq!(response.headers()["retry-after"], "1");
    }
    assert_eq!((h.jobs(), h.runner.in_flight(), h.runner.refused_total()), (2, 2, 2));
    h.backend.infer_gate.add_permits(2);
    h.until(&first, "COMPLETED").await;
    h.until(&second, "COMPLETED").await;
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn urls_follow_the_forwarded_headers() {
    let h = Harness::start(|c| c).await;
    let forwarded = |request: reqwest::RequestBuilder| {
        request
            .header("host", "queue.example.com")
            .header("x-forwarded-proto", "https")
            .header("x-envoy-original-path", "/myuser/myapp/generate?x=1")
    };
    let submit = forwarded(h.client.post(format!("{}/queue/submit", h.url))).body(r#"{"model":"a"}"#);
    let submitted = json_of(submit.send().await.unwrap()).await;
    let id = id_of(&submitted);
    let base = format!("https://queue.example.com/myuser/myapp/requests/{id}");
    assert_eq!(submitted["response_url"], base.as_str());
    assert_eq!(submitted["status_url"], format!("{base}/status").as_str());
    assert_eq!(submitted["cancel_url"], format!("{base}/cancel").as_str());
    let status = forwarded(h.client.get(format!("{}/queue/requests/{id}/status", h.url)));
    assert_eq!(json_of(status.send().await.unwrap()).await["response_url"], base.as_str());

    for (name, value) in [("host", "evil.example/x?"), ("x-envoy-original-path", "/only-one")] {
        let submit = h.client.post(format!("{}/queue/submit", h.url)).header(name, value);
        let response = submit.body(r#"{"model":"a"}"#).send().await.unwrap();
        assert_eq!(response.status(), 400, "{name}: {value}");
    }
    assert_eq!(h.jobs(), 1);
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn without_the_queue_there_is_no_token_and_no_routes() {
    let h = Harness::start(|c| RunnerConfig { queue: None, ..c }).await;
    let hints = json_of(h.get("/hints").await).await;
    assert!(hints.get("queue_token").is_none(), "{hints}");
    assert_eq!(h.post("/queue/submit", r#"{"model":"a"}"#).await.status(), 404);
    let id = format!("{}-{}", "1".repeat(16), "0".repeat(32));
    assert_eq!(h.get(&format!("/queue/requests/{id}/status")).await.status(), 404);
    assert_eq!(h.post("/", r#"{"model":"a"}"#).await.status(), 200);
    assert_eq!(h.stop().await, Drained::Complete);
}

#[tokio::test]
async fn a_draining_runner_refuses_jobs_and_finishes_those_it_took() {
    let mut h = Harness::start(|c| c).await;
    let id = id_of(&h.submit(r#"{"model":"slow-a"}"#).await);
    h.until(&id, "IN_PROGRESS").await;
    h.runner.start_draining();
    let refused = h.post("/queue/submit", r#"{"model":"a"}"#).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["x-runner-overloaded"], "draining");
    assert_eq!(h.jobs(), 1);
    // Still reported: the job's calls must still find this runner.
    assert!(json_of(h.get("/hints").await).await["queue_token"].is_string());
    let _ = h.stop.take().unwrap().send(());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!h.server.is_finished(), "the accepted job holds the drain");
    h.backend.infer_gate.add_permits(1);
    let drained = tokio::time::timeout(PATIENCE, h.server).await.unwrap().unwrap().unwrap();
    assert_eq!(drained, Drained::Complete);
}
