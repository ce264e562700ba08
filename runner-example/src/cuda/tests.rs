//! Tests of the cuda backend. Those that need a GPU, its driver and cuBLAS (`cargo test
//! --features cuda` on a GPU machine) say why they skipped elsewhere.

use super::*;
use crate::models::{generate_weights, make_models, MlpWeights};

#[test]
fn opening_fails_with_a_message_never_a_panic() {
    if let Err(e) = open_device(0) {
        assert!(!e.is_empty());
    }
    assert!(open_device(1 << 20).is_err());
}

fn open(dir: &Path, host_cache: Option<u64>) -> Option<Arc<CudaBackend>> {
    match CudaBackend::open(dir, 0) {
        Ok(backend) => Some(Arc::new(backend.with_host_cache(host_cache))),
        Err(e) => {
            eprintln!("skipped, no usable GPU: {e}");
            None
        }
    }
}

/// The logits in an answer.
fn logits(answer: &str) -> Vec<f32> {
    answer
        .split_once("logits=[")
        .map(|(_, rest)| rest.trim_end_matches(']').split(',').map(|v| v.parse().unwrap()).collect())
        .unwrap()
}

/// Checks `answer` to `prompt` against the cpu forward pass `cpu`.
fn assert_close(answer: &str, prompt: &str, cpu: &MlpWeights) {
    let (gpu_logits, cpu_logits) = (logits(answer), cpu.forward(prompt));
    assert_eq!(gpu_logits.len(), cpu_logits.len(), "{answer}");
    for (g, c) in gpu_logits.iter().zip(&cpu_logits) {
        assert!((g - c).abs() < 2e-3, "{prompt:?}: gpu {answer}, cpu {cpu_logits:?}");
    }
}

/// Checks `model`'s answers against the cpu forward pass of model `index` (seed 5).
async fn assert_matches_cpu(model: &Arc<dyn LoadedModel>, index: usize, width: usize) {
    let cpu = generate_weights(5, index, width);
    for prompt in ["", "hello", "a longer prompt, with punctuation!"] {
        let answer = Arc::clone(model).infer(prompt.to_string()).await.unwrap();
        assert_close(&answer, prompt, &cpu);
    }
}

#[tokio::test]
async fn matches_the_cpu_forward_pass_and_frees_gpu_memory() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = make_models(dir.path(), 2, 1 << 20, 5).unwrap();
    let Some(backend) = open(dir.path(), None) else { return };
    let width = manifest.models[0].width;
    let model = Arc::clone(&backend).load("model-1".into()).await.unwrap();
    assert_eq!(model.resident_bytes(), Some(manifest.models[1].weight_bytes));
    assert_eq!(backend.stats().live_models(), 1);
    assert_matches_cpu(&model, 1, width).await;
    // Inferences on one model at once, each on a workspace of its own.
    let cpu = generate_weights(5, 1, width);
    let prompts: Vec<String> = (0..8).map(|i| format!("prompt {i}")).collect();
    let answers: Vec<_> = prompts.iter().map(|p| tokio::spawn(Arc::clone(&model).infer(p.clone()))).collect();
    for (prompt, answer) in prompts.iter().zip(answers) {
        assert_close(&answer.await.unwrap().unwrap(), prompt, &cpu);
    }
    let err = Arc::clone(&backend).load("model-9".into()).await.err().unwrap();
    assert!(matches!(err, BackendError::NotFound(_)), "{err:?}");
    assert!(backend.lookup("model-9").is_err());
    assert!(model.release_blocks());
    // The release is done when the drop returns.
    drop(model);
    assert_eq!(backend.stats().live_models(), 0);
    assert_eq!(backend.stats().live_bytes(), 0);
}

#[tokio::test]
async fn a_warm_load_is_a_copy_from_pinned_memory_with_the_same_answers() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = make_models(dir.path(), 1, 1 << 20, 5).unwrap();
    let Some(backend) = open(dir.path(), Some(16 << 20)) else { return };
    let width = manifest.models[0].width;
    let model = Arc::clone(&backend).load("model-0".into()).await.unwrap();
    assert_eq!((backend.stats().disk_reads(), backend.stats().warm_loads()), (1, 0));
    // Resident: held by the tier, but not warm.
    assert!(backend.warm().is_empty());
    drop(model);
    assert_eq!(backend.warm(), ["model-0"]);
    let model = Arc::clone(&backend).load("model-0".into()).await.unwrap();
    assert_eq!((backend.stats().disk_reads(), backend.stats().warm_loads()), (1, 1));
    assert!(backend.warm().is_empty());
    assert_matches_cpu(&model, 0, width).await;
    drop(model);
    assert_eq!(backend.stats().live_bytes(), 0);
}
