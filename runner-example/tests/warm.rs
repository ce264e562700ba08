//! The warm tier (`--host-cache-mb`) of the `cpu` backend, which models a device: models the
//! runner evicted stay in host memory, and loading them again is a copy, not a disk read.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hint_router_core::wire::HintsReport;
use runner_example::backend::Backend;
use runner_example::cache::CacheOutcome;
use runner_example::cpu::CpuBackend;
use runner_example::models::{format_output, generate_weights, make_models, Manifest};
use runner_example::runner::{Runner, RunnerConfig};
use runner_example::server::serve;

const SEED: u64 = 11;

fn models(count: usize, size: u64) -> (tempfile::TempDir, Manifest) {
    let dir = tempfile::tempdir().unwrap();
    let manifest = make_models(dir.path(), count, size, SEED).unwrap();
    (dir, manifest)
}

fn backend(dir: &Path, host_cache: Option<u64>) -> Arc<CpuBackend> {
    Arc::new(CpuBackend::open(dir).unwrap().with_host_cache(host_cache))
}

fn runner(backend: &Arc<CpuBackend>, capacity: u32) -> Runner {
    let config = RunnerConfig { capacity, max_concurrency: 2, ..RunnerConfig::new("127.0.0.1:1") };
    Runner::new(config, backend.clone())
}

fn expected(manifest: &Manifest, index: usize, prompt: &str) -> String {
    format_output(&generate_weights(SEED, index, manifest.models[0].width).forward(prompt))
}

#[tokio::test]
async fn an_evicted_model_comes_back_from_the_warm_tier_without_a_disk_read() {
    let (dir, manifest) = models(2, 256 << 10);
    let bytes = manifest.models[0].weight_bytes;
    let backend = backend(dir.path(), Some(4 * bytes));
    let runner = runner(&backend, 1);

    let first = runner.infer("model-0", "hi".into()).await.unwrap();
    assert_eq!(first.cache, CacheOutcome::Miss);
    assert_eq!(first.output, expected(&manifest, 0, "hi"));
    // Resident models are not warm: they are hints.
    assert_eq!(runner.report().hints, ["model-0"]);
    assert!(runner.report().warm.is_empty());

    // model-1 evicts model-0 from the device (capacity 1); its host copy stays.
    runner.infer("model-1", "hi".into()).await.unwrap();
    let report = runner.report();
    assert_eq!(report.hints, ["model-1"]);
    assert_eq!(report.warm, ["model-0"]);
    assert_eq!(backend.stats().disk_reads(), 2);
    assert_eq!(backend.stats().live_models(), 1);
    assert_eq!(backend.stats().live_bytes(), bytes, "one device copy");
    assert_eq!(backend.host_cache().unwrap().bytes(), 2 * bytes, "both host copies");

    // Back: a miss for the runner, a copy for the backend, the same answers.
    let again = runner.infer("model-0", "hi".into()).await.unwrap();
    assert_eq!(again.cache, CacheOutcome::Miss);
    assert_eq!(again.output, first.output);
    assert_eq!(backend.stats().disk_reads(), 2, "read from the warm tier, not the disk");
    assert_eq!(backend.stats().warm_loads(), 1);
    assert_eq!(backend.stats().device_copies(), 3);
    let report = runner.report();
    assert_eq!(
        (report.hints.as_slice(), report.warm.as_slice()),
        (&["model-0".to_string()][..], &["model-1".to_string()][..])
    );
}

#[test]
fn a_warm_reload_is_faster_than_a_read_and_check() {
    let (dir, manifest) = models(1, 4 << 20);
    let backend = backend(dir.path(), Some(8 << 20));
    let start = Instant::now();
    drop(backend.load_blocking("model-0").unwrap());
    let cold = start.elapsed();
    let start = Instant::now();
    let warm_model = backend.load_blocking("model-0").unwrap();
    let warm = start.elapsed();
    assert_eq!(backend.stats().disk_reads(), 1);
    assert_eq!(backend.stats().warm_loads(), 1);
    println!("4 MiB model: read and checked in {cold:?}, from the warm tier in {warm:?}");
    assert!(warm < cold, "warm {warm:?} not faster than cold {cold:?}");
    assert_eq!(warm_model.infer_blocking("p"), expected(&manifest, 0, "p"));
}

#[test]
fn the_warm_budget_keeps_the_most_recently_loaded_models() {
    let (dir, manifest) = models(4, 256 << 10);
    let bytes = manifest.models[0].weight_bytes;
    // Room for two and a half host copies.
    let backend = backend(dir.path(), Some(bytes * 5 / 2));
    let tier = backend.host_cache().unwrap();
    for model in ["model-0", "model-1", "model-2"] {
        drop(backend.load_blocking(model).unwrap());
        assert!(tier.bytes() <= bytes * 5 / 2);
    }
    assert_eq!(tier.held(), ["model-2", "model-1"]);
    assert_eq!(backend.stats().disk_reads(), 3);
    // model-1 again: warm, and now the most recently used.
    drop(backend.load_blocking("model-1").unwrap());
    assert_eq!(backend.stats().disk_reads(), 3);
    assert_eq!(tier.held(), ["model-1", "model-2"]);
    // model-0 was dropped from the tier: read again, and model-2 (least recent) goes.
    drop(backend.load_blocking("model-0").unwrap());
    assert_eq!(backend.stats().disk_reads(), 4);
    assert_eq!(tier.held(), ["model-0", "model-1"]);
    assert_eq!(backend.warm(), ["model-0", "model-1"]);

    // A budget smaller than one model keeps nothing, and every load reads the disk.
    let small = self::backend(dir.path(), Some(bytes - 1));
    drop(small.load_blocking("model-0").unwrap());
    drop(small.load_blocking("model-0").unwrap());
    assert_eq!(small.stats().disk_reads(), 2);
    assert!(small.host_cache().unwrap().held().is_empty());
    // No tier: no warm list, no device copies.
    let none = self::backend(dir.path(), None);
    drop(none.load_blocking("model-0").unwrap());
    assert!(none.host_cache().is_none());
    assert_eq!(none.stats().device_copies(), 0);
}

#[test]
fn a_corrupt_file_never_enters_the_warm_tier() {
    let (dir, manifest) = models(1, 256 << 10);
    let path = dir.path().join("model-0.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let backend = backend(dir.path(), Some(4 * manifest.models[0].weight_bytes));
    assert!(backend.load_blocking("model-0").is_err());
    assert!(backend.host_cache().unwrap().held().is_empty());
    assert_eq!(backend.stats().live_models(), 0);
}

/// `/hints` carries `warm` beside `hints` (only when there is something warm), and the
/// response header lists only resident models.
#[tokio::test]
async fn hints_over_http_list_warm_models_apart() {
    let (dir, manifest) = models(2, 256 << 10);
    let backend = backend(dir.path(), Some(4 * manifest.models[0].weight_bytes));
    let runner = runner(&backend, 1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        runner.clone(),
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(30),
    ));
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap();
    let post = |model: &str| {
        client.post(format!("http://{addr}/")).body(format!(r#"{{"model":"{model}","prompt":"hi"}}"#)).send()
    };
    let hints = || async {
        let raw: serde_json::Value = serde_json::from_slice(
            &client.get(format!("http://{addr}/hints")).send().await.unwrap().bytes().await.unwrap(),
        )
        .unwrap();
        let report: HintsReport = serde_json::from_value(raw.clone()).unwrap();
        (report, raw)
    };

    let first = post("model-0").await.unwrap();
    assert_eq!(first.headers()["x-fal-runner-hints"], "model-0");
    let (report, raw) = hints().await;
    assert!(raw.get("warm").is_none(), "{raw}");
    assert_eq!(report.hints, ["model-0"]);

    let second = post("model-1").await.unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["x-fal-runner-hints"], "model-1");
    let (report, raw) = hints().await;
    assert_eq!(report.hints, ["model-1"]);
    assert_eq!(report.warm, ["model-0"]);
    assert_eq!(raw["warm"], serde_json::json!(["model-0"]));

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), server).await.unwrap().unwrap().unwrap();
}
