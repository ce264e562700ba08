//! Clients that go away mid-inference (Envoy resetting streams), against a runner served on
//! 127.0.0.1:0 in-process whose backend does blocking work and counts it: issue 9, item 4.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runner_example::backend::{blocking, Backend, BackendError, BoxFuture, LoadedModel};
use runner_example::runner::{Runner, RunnerConfig};
use runner_example::server::{serve, Drained};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const INFER: Duration = Duration::from_millis(300);
const PATIENCE: Duration = Duration::from_secs(30);

/// Inference is blocking work (a sleep on the blocking pool, like the cpu and cuda
/// backends), which goes on when the request is dropped. Counts the inferences running, and
/// the evictions of a model in use: with one cache slot, a load that starts while an
/// inference on another model runs, or an inference that ends with its model gone.
#[derive(Default)]
struct CountingBackend {
    runner: Mutex<Option<Runner>>,
    running_on: Mutex<HashMap<String, usize>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    finished: AtomicUsize,
    evicted_in_use: AtomicUsize,
}

struct CountingModel {
    name: String,
    backend: Arc<CountingBackend>,
}

impl Backend for CountingBackend {
    fn load(
        self: Arc<Self>,
        model: String,
    ) -> BoxFuture<'static, Result<Arc<dyn LoadedModel>, BackendError>> {
        Box::pin(async move {
            let in_use = self.running_on.lock().unwrap().iter().any(|(m, &n)| *m != model && n > 0);
            if in_use {
                self.evicted_in_use.fetch_add(1, Ordering::SeqCst);
            }
            let loaded: Arc<dyn LoadedModel> = Arc::new(CountingModel { name: model, backend: self });
            Ok(loaded)
        })
    }
}

impl LoadedModel for CountingModel {
    fn infer(self: Arc<Self>, _prompt: String) -> BoxFuture<'static, Result<String, BackendError>> {
        blocking(move || {
            let b = &self.backend;
            *b.running_on.lock().unwrap().entry(self.name.clone()).or_default() += 1;
            let now = b.running.fetch_add(1, Ordering::SeqCst) + 1;
            b.max_running.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(INFER);
            let runner = b.runner.lock().unwrap().clone().unwrap();
            if !runner.hints().contains(&self.name) {
                b.evicted_in_use.fetch_add(1, Ordering::SeqCst);
            }
            b.running.fetch_sub(1, Ordering::SeqCst);
            *b.running_on.lock().unwrap().entry(self.name.clone()).or_default() -= 1;
            b.finished.fetch_add(1, Ordering::SeqCst);
            Ok(format!("{} done", self.name))
        })
    }
}

/// Sends a request for `model`. With `close`, it asks the runner to close the connection
/// once it has answered (and then hyper stops watching it for the client going away).
async fn send_raw(addr: SocketAddr, model: &str, close: bool) -> TcpStream {
    let connection = if close { "close" } else { "keep-alive" };
    let body = format!(r#"{{"model":"{model}"}}"#);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nhost: {addr}\r\nconnection: {connection}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends a request and waits for its answer's status line.
async fn answered(addr: SocketAddr, model: &'static str) -> String {
    let mut stream = send_raw(addr, model, true).await;
    let mut answer = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer);
    tokio::time::timeout(PATIENCE, read).await.unwrap().unwrap();
    String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_go_away_never_let_more_than_max_concurrency_run_or_evict_a_model_in_use() {
    const MAX_CONCURRENCY: usize = 2;
    let backend = Arc::new(CountingBackend::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let runner = Runner::new(
        RunnerConfig {
            capacity: 1,
            max_concurrency: MAX_CONCURRENCY as u32,
            ..RunnerConfig::new(addr.to_string())
        },
        backend.clone(),
    );
    *backend.runner.lock().unwrap() = Some(runner.clone());
    let server = tokio::spawn(serve(listener, runner.clone(), std::future::pending(), PATIENCE));
    let running = || backend.running.load(Ordering::SeqCst);

    // Two inferences on a, whose clients hang up mid-inference.
    let orphans = [send_raw(addr, "a", false).await, send_raw(addr, "a", false).await];
    eventually("two inferences running", || running() == 2).await;
    drop(orphans);
    eventually("the runner noticed", || runner.hints() == ["a"] && runner.in_flight() <= 2).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Now b (which needs a's only cache slot) and two more on a.
    let started = Instant::now();
    let next = [
        tokio::spawn(answered(addr, "b")),
        tokio::spawn(answered(addr, "a")),
        tokio::spawn(answered(addr, "a")),
    ];
    for request in next {
        assert_eq!(request.await.unwrap(), "HTTP/1.1 200 OK");
    }
    println!(
        "after two orphans: 3 requests answered in {:?}, at most {} inferences at once, {} evictions of a model in use",
        started.elapsed(),
        backend.max_running.load(Ordering::SeqCst),
        backend.evicted_in_use.load(Ordering::SeqCst)
    );

    // Then 24 clients over both models; every other one hangs up 10 to 1500 ms after
    // sending, the others wait for their answer.
    let started = Instant::now();
    let clients: Vec<_> = (0..24u64)
        .map(|i| {
            tokio::spawn(async move {
                let model = if i % 4 < 2 { "a" } else { "b" };
                if i % 2 == 0 {
                    let stream = send_raw(addr, model, false).await;
                    tokio::time::sleep(Duration::from_millis(10 + (i * 137) % 1500)).await;
                    drop(stream);
                } else {
                    assert_eq!(answered(addr, model).await, "HTTP/1.1 200 OK");
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    // Every inference admitted, orphaned or not, runs to its end.
    eventually("nothing in flight", || runner.in_flight() == 0).await;
    let (max, finished, evicted) = (
        backend.max_running.load(Ordering::SeqCst),
        backend.finished.load(Ordering::SeqCst),
        backend.evicted_in_use.load(Ordering::SeqCst),
    );
    println!(
        "in all: {finished} inferences ran, at most {max} at once (max_concurrency {MAX_CONCURRENCY}), \
         {evicted} evictions of a model in use; the burst took {:?}",
        started.elapsed()
    );
    assert!(max <= MAX_CONCURRENCY, "{max} inferences ran at once");
    assert_eq!(evicted, 0, "models were evicted while an inference ran on them");
    assert!(finished >= 17, "only {finished} inferences ran");
    assert_eq!(running(), 0);
    server.abort();
}

/// The drain waits for an inference whose client went away, as for any request in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_waits_for_an_inference_whose_client_went_away() {
    let backend = Arc::new(CountingBackend::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let runner = Runner::new(RunnerConfig::new(addr.to_string()), backend.clone());
    *backend.runner.lock().unwrap() = Some(runner.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        runner.clone(),
        async {
            let _ = stopped.await;
        },
        PATIENCE,
    ));
    let orphan = send_raw(addr, "a", false).await;
    eventually("the inference running", || backend.running.load(Ordering::SeqCst) == 1).await;
    drop(orphan);
    eventually("the runner noticed", || runner.hints() == ["a"] && runner.in_flight() == 1).await;
    let stopping = Instant::now();
    stop.send(()).unwrap();
    let drained = tokio::time::timeout(PATIENCE, server).await.unwrap().unwrap().unwrap();
    println!("drained after {:?}", stopping.elapsed());
    assert_eq!(drained, Drained::Complete);
    assert_eq!(backend.finished.load(Ordering::SeqCst), 1, "the drain ended before the inference");
    assert_eq!(runner.in_flight(), 0);
}
