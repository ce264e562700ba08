//! The `cpu` backend with real model files (small models made into a temporary directory),
//! through the runner and over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hint_router_core::wire::HintsReport;
use runner_example::cache::CacheOutcome;
use runner_example::cpu::CpuBackend;
use runner_example::http::ErrorBody;
use runner_example::models::{format_output, generate_weights, make_models, Manifest};
use runner_example::runner::{InferError, Runner, RunnerConfig};
use runner_example::server::serve;
use tokio::sync::oneshot;

const SEED: u64 = 42;
/// Weights per model: 256 KiB keeps the tests quick in debug builds.
const SIZE: u64 = 256 << 10;
const PATIENCE: Duration = Duration::from_secs(30);

struct Models {
    dir: tempfile::TempDir,
    manifest: Manifest,
}

impl Models {
    /// `count` models of [`SIZE`] bytes.
    fn make(count: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let manifest = make_models(dir.path(), count, SIZE, SEED).unwrap();
        Self { dir, manifest }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes of weights of one model (all have the same size).
    fn bytes(&self) -> u64 {
        self.manifest.models[0].weight_bytes
    }

    fn file(&self, model: &str) -> std::path::PathBuf {
        self.path().join(format!("{model}.safetensors"))
    }

    /// The output the weights of `model-index` give for `prompt`.
    fn expected(&self, index: usize, prompt: &str) -> String {
        let weights = generate_weights(SEED, index, self.manifest.models[0].width);
        format_output(&weights.forward(prompt))
    }
}

fn cpu_runner(models: &Models, capacity: u32, budget: Option<u64>) -> (Runner, Arc<CpuBackend>) {
    let backend = Arc::new(CpuBackend::open(models.path()).unwrap());
    let config = RunnerConfig {
        capacity,
        max_concurrency: 4,
        load_fail_backoff: Duration::from_millis(50),
        memory_budget_bytes: budget,
        ..RunnerConfig::new("127.0.0.1:1")
    };
    (Runner::new(config, backend.clone()), backend)
}

#[test]
fn make_models_writes_what_the_manifest_says() {
    let models = Models::make(3);
    let m = &models.manifest;
    assert_eq!(
        m.models.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["model-0", "model-1", "model-2"]
    );
    let on_disk: Manifest =
        serde_json::from_slice(&std::fs::read(models.path().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(&on_disk, m);
    for entry in &m.models {
        let file = std::fs::read(models.path().join(&entry.file)).unwrap();
        assert_eq!(file.len() as u64, entry.file_bytes);
        assert_eq!(runner_example::models::sha256_hex(&file), entry.sha256);
        assert!(entry.weight_bytes <= SIZE && entry.weight_bytes > SIZE * 98 / 100, "{entry:?}");
    }
    // Deterministic: the same seed makes the same files; another seed other ones.
    let again = tempfile::tempdir().unwrap();
    assert_eq!(&make_models(again.path(), 3, SIZE, SEED).unwrap(), m);
    let other = make_models(again.path(), 1, SIZE, SEED + 1).unwrap();
    assert_ne!(other.models[0].sha256, m.models[0].sha256);
}

#[tokio::test]
async fn miss_then_hit_runs_the_real_weights() {
    let models = Models::make(2);
    let (runner, backend) = cpu_runner(&models, 2, None);
    let first = runner.infer("model-0", "hello".into()).await.unwrap();
    assert_eq!(first.cache, CacheOutcome::Miss);
    assert_eq!(first.output, models.expected(0, "hello"));
    assert!(first.output.starts_with("argmax="), "{}", first.output);
    let second = runner.infer("model-0", "hello".into()).await.unwrap();
    assert_eq!(second.cache, CacheOutcome::Hit);
    assert_eq!(second.output, first.output);
    let other_prompt = runner.infer("model-0", "goodbye".into()).await.unwrap();
    assert_eq!(other_prompt.output, models.expected(0, "goodbye"));
    assert_ne!(other_prompt.output, first.output);
    let other_model = runner.infer("model-1", "hello".into()).await.unwrap();
    assert_eq!(other_model.output, models.expected(1, "hello"));
    assert_ne!(other_model.output, first.output);

    assert_eq!(backend.stats().disk_reads(), 2);
    let report = runner.report();
    assert_eq!(report.hints, ["model-1", "model-0"]);
    assert_eq!(report.resident_bytes, Some(2 * models.bytes()));
    assert_eq!(report.memory_budget_bytes, None);
    assert_eq!(backend.stats().live_bytes(), 2 * models.bytes());
}

#[tokio::test]
async fn eviction_frees_the_weights() {
    let models = Models::make(3);
    let (runner, backend) = cpu_runner(&models, 2, None);
    let lease = runner.cache().acquire("model-0").await.unwrap();
    let weak = Arc::downgrade(lease.model());
    drop(lease);
    runner.infer("model-1", String::new()).await.unwrap();
    assert_eq!(backend.stats().live_models(), 2);
    assert_eq!(runner.report().resident_bytes, Some(2 * models.bytes()));
    assert!(weak.upgrade().is_some());

    // A third model evicts the least recently used, model-0: its weights are dropped.
    runner.infer("model-2", String::new()).await.unwrap();
    assert!(weak.upgrade().is_none(), "the evicted model is still alive");
    assert_eq!(runner.report().hints, ["model-2", "model-1"]);
    assert_eq!(backend.stats().live_models(), 2);
    assert_eq!(backend.stats().live_bytes(), 2 * models.bytes());
    assert_eq!(runner.report().resident_bytes, Some(2 * models.bytes()));

    // Loading it again reads the file again.
    runner.infer("model-0", String::new()).await.unwrap();
    assert_eq!(backend.stats().disk_reads(), 4);
}

#[tokio::test]
async fn concurrent_requests_for_one_model_read_its_file_once() {
    let models = Models::make(1);
    let (runner, backend) = cpu_runner(&models, 2, None);
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let runner = runner.clone();
            tokio::spawn(async move { runner.infer("model-0", format!("prompt {i}")).await })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let done = task.await.unwrap().unwrap();
        assert_eq!(done.output, models.expected(0, &format!("prompt {i}")));
    }
    assert_eq!(backend.stats().disk_reads(), 1);
    assert_eq!(backend.stats().live_models(), 1);
}

#[tokio::test]
async fn missing_and_corrupt_files_fail_cleanly() {
    let models = Models::make(5);
    let good = std::fs::read(models.file("model-1")).unwrap();
    std::fs::remove_file(models.file("model-0")).unwrap();
    std::fs::write(models.file("model-1"), &good[..good.len() / 2]).unwrap(); // truncated
    let mut garbled = good.clone();
    garbled[..8].copy_from_slice(&u64::MAX.to_le_bytes()); // header length
    std::fs::write(models.file("model-2"), &garbled).unwrap();
    let mut flipped = std::fs::read(models.file("model-3")).unwrap();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40; // one weight, same size: only the checksum tells
    std::fs::write(models.file("model-3"), &flipped).unwrap();
    let (runner, backend) = cpu_runner(&models, 2, None);

    let load_error = |e: InferError| match e {
        InferError::Load(failed) => failed.error,
        other => panic!("not a load error: {other:?}"),
    };
    use runner_example::backend::BackendError::{Failed, NotFound};

    let err = load_error(runner.infer("unknown", String::new()).await.unwrap_err());
    assert!(matches!(&err, NotFound(m) if m.contains("no model unknown in")), "{err:?}");
    let err = load_error(runner.infer("model-0", String::new()).await.unwrap_err());
    assert!(matches!(&err, NotFound(m) if m.contains("model-0.safetensors does not exist")), "{err:?}");
    for (model, why) in [
        ("model-1", "not a valid safetensors file"),
        ("model-2", "not a valid safetensors file"),
        ("model-3", "does not match the manifest's"),
    ] {
        let err = load_error(runner.infer(model, String::new()).await.unwrap_err());
        assert!(
            matches!(&err, Failed(m) if m.contains("corrupt weights file") && m.contains(why)),
            "{model}: {err:?}"
        );
    }
    // Nothing broken is advertised or held, and the good model still serves.
    assert!(runner.report().hints.is_empty());
    assert_eq!(backend.stats().live_models(), 0);
    let ok = runner.infer("model-4", "x".into()).await.unwrap();
    assert_eq!(ok.output, models.expected(4, "x"));
    assert_eq!(runner.report().hints, ["model-4"]);

    // Repaired, the model loads once the failure backoff is over.
    std::fs::write(models.file("model-1"), &good).unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let ok = runner.infer("model-1", "x".into()).await.unwrap();
    assert_eq!(ok.output, models.expected(1, "x"));
}

#[tokio::test]
async fn the_memory_budget_evicts_by_size() {
    let models = Models::make(4);
    let bytes = models.bytes();
    // Room for two and a half models, and slots for ten.
    let budget = bytes * 5 / 2;
    let (runner, backend) = cpu_runner(&models, 10, Some(budget));
    for model in ["model-0", "model-1", "model-2", "model-3"] {
        runner.infer(model, String::new()).await.unwrap();
        let report = runner.report();
        assert!(report.resident_bytes.unwrap() <= budget, "{report:?}");
        assert!(backend.stats().live_bytes() <= budget);
    }
    let report = runner.report();
    assert_eq!(report.hints, ["model-3", "model-2"]);
    assert_eq!(report.resident_bytes, Some(2 * bytes));
    assert_eq!(report.memory_budget_bytes, Some(budget));
    assert_eq!(backend.stats().live_models(), 2);
}

#[tokio::test]
async fn a_model_bigger_than_the_budget_is_refused_without_reading_it() {
    let models = Models::make(1);
    let (runner, backend) = cpu_runner(&models, 2, Some(models.bytes() - 1));
    let err = runner.infer("model-0", String::new()).await.unwrap_err();
    assert!(
        matches!(&err, InferError::Load(f) if matches!(f.error, runner_example::backend::BackendError::TooLarge(_))),
        "{err:?}"
    );
    assert_eq!(backend.stats().disk_reads(), 0);
    assert!(runner.report().hints.is_empty());
}

/// The status codes over HTTP: 200, 404 (unknown model, missing file), 503 (corrupt file),
/// 507 (bigger than the budget), and the sizes in `/hints`.
#[tokio::test]
async fn http_status_codes_and_hints() {
    let big = Models::make(3);
    std::fs::remove_file(big.file("model-1")).unwrap();
    std::fs::write(big.file("model-2"), b"not a safetensors file").unwrap();
    let bytes = big.bytes();
    let (runner, _backend) = cpu_runner(&big, 3, Some(3 * bytes + bytes / 2));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        runner.clone(),
        async {
            let _ = stopped.await;
        },
        PATIENCE,
    ));
    let client = reqwest::Client::builder().no_proxy().timeout(PATIENCE).build().unwrap();
    let post = |model: &str| {
        client.post(format!("http://{addr}/")).body(format!(r#"{{"model":"{model}","prompt":"hi"}}"#)).send()
    };
    let error = |body: &[u8]| serde_json::from_slice::<ErrorBody>(body).unwrap().error;

    let ok = post("model-0").await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-cache"], "miss");
    let body: serde_json::Value = serde_json::from_slice(&ok.bytes().await.unwrap()).unwrap();
    assert_eq!(body["output"], big.expected(0, "hi").as_str());

    let missing = post("model-1").await.unwrap();
    assert_eq!(missing.status(), 404);
    assert!(error(&missing.bytes().await.unwrap()).contains("does not exist"));
    let unknown = post("model-9").await.unwrap();
    assert_eq!(unknown.status(), 404);
    let corrupt = post("model-2").await.unwrap();
    assert_eq!(corrupt.status(), 503);
    assert!(corrupt.headers().contains_key("retry-after"));
    assert!(error(&corrupt.bytes().await.unwrap()).contains("corrupt weights file"));

    let hints = client.get(format!("http://{addr}/hints")).send().await.unwrap();
    let report: HintsReport = serde_json::from_slice(&hints.bytes().await.unwrap()).unwrap();
    assert_eq!(report.hints, ["model-0"]);
    assert_eq!(report.resident_bytes, Some(bytes));
    assert_eq!(report.memory_budget_bytes, Some(3 * bytes + bytes / 2));

    // A directory whose models are all bigger than a smaller budget: 507.
    let too_large = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let small_addr = listener.local_addr().unwrap();
        let (small_runner, _) = cpu_runner(&big, 3, Some(bytes / 2));
        let small = tokio::spawn(serve(listener, small_runner, std::future::pending(), PATIENCE));
        let response =
            client.post(format!("http://{small_addr}/")).body(r#"{"model":"model-0"}"#).send().await.unwrap();
        small.abort();
        response
    };
    assert_eq!(too_large.status(), 507);
    assert!(error(&too_large.bytes().await.unwrap()).contains("more than the whole memory budget"));

    let _ = stop.send(());
    tokio::time::timeout(PATIENCE, server).await.unwrap().unwrap().unwrap();
}
