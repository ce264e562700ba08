//! The `cpu` backend: real weights, read from safetensors files into host memory, and a real
//! f32 forward pass on the CPU.
//!
//! Models come from a directory made by `make-models` (see [`crate::models`]): the manifest
//! is read once, when the backend is opened; a miss reads the model's file, checks it against
//! the manifest and keeps the weights in memory until the cache evicts the model (the last
//! `Arc` goes, and the weights with it). Reads, checks and inference run on tokio's blocking
//! pool through [`backend::blocking`](crate::backend::blocking).

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::backend::{blocking, Backend, BackendError, BoxFuture, LoadedModel};
use crate::models::{format_output, MlpWeights, ModelDir};

/// What a real backend has done, for tests, benchmarks and logs.
#[derive(Debug, Default)]
pub struct BackendStats {
    disk_reads: AtomicUsize,
    live_models: AtomicUsize,
    live_bytes: AtomicU64,
}

impl BackendStats {
    /// Weights files read so far (one per load attempt of a known model).
    pub fn disk_reads(&self) -> usize {
        self.disk_reads.load(Ordering::SeqCst)
    }

    /// Models whose weights are in memory now: loaded and not yet dropped.
    pub fn live_models(&self) -> usize {
        self.live_models.load(Ordering::SeqCst)
    }

    /// Bytes of weights in memory now, over [`BackendStats::live_models`].
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes.load(Ordering::SeqCst)
    }

    pub(crate) fn read(&self) {
        self.disk_reads.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn alive(&self, bytes: u64) {
        self.live_models.fetch_add(1, Ordering::SeqCst);
        self.live_bytes.fetch_add(bytes, Ordering::SeqCst);
    }

    pub(crate) fn dead(&self, bytes: u64) {
        self.live_models.fetch_sub(1, Ordering::SeqCst);
        self.live_bytes.fetch_sub(bytes, Ordering::SeqCst);
    }
}

/// The `cpu` backend.
#[derive(Debug)]
pub struct CpuBackend {
    dir: ModelDir,
    stats: Arc<BackendStats>,
}

impl CpuBackend {
    /// Opens the models directory `dir`: reads and checks its `manifest.json`. Blocking.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, String> {
        Ok(Self { dir: ModelDir::open(dir)?, stats: Arc::default() })
    }

    /// The models directory and its manifest.
    pub fn models(&self) -> &ModelDir {
        &self.dir
    }

    /// What the backend has done.
    pub fn stats(&self) -> &Arc<BackendStats> {
        &self.stats
    }
}

impl Backend for CpuBackend {
    fn load(
        self: Arc<Self>,
        model: String,
    ) -> BoxFuture<'static, Result<Arc<dyn LoadedModel>, BackendError>> {
        blocking(move || {
            if self.dir.entry(&model).is_some() {
                self.stats.read();
            }
            let weights = self.dir.read(&model)?;
            let loaded: Arc<dyn LoadedModel> =
                Arc::new(CpuModel::new(model, weights, Arc::clone(&self.stats)));
            Ok(loaded)
        })
    }

    fn size_hint(&self, model: &str) -> Option<u64> {
        self.dir.entry(model).map(|e| e.weight_bytes)
    }

    fn lookup(&self, model: &str) -> Result<Option<u64>, BackendError> {
        // The manifest lists every model: one it lacks is never loaded, nothing is evicted.
        self.dir.entry(model).map(|e| Some(e.weight_bytes)).ok_or_else(|| {
            BackendError::NotFound(format!(
                "no model {model} in {}",
                self.dir.dir().join(crate::models::MANIFEST_FILE).display()
            ))
        })
    }
}

/// A model whose weights are in host memory.
struct CpuModel {
    weights: MlpWeights,
    bytes: u64,
    stats: Arc<BackendStats>,
}

impl CpuModel {
    fn new(name: String, weights: MlpWeights, stats: Arc<BackendStats>) -> Self {
        let bytes = weights.bytes();
        stats.alive(bytes);
        log::debug!("model {name}: {bytes} bytes of weights in host memory");
        Self { weights, bytes, stats }
    }
}

impl Drop for CpuModel {
    fn drop(&mut self) {
        self.stats.dead(self.bytes);
    }
}

impl LoadedModel for CpuModel {
    fn infer(self: Arc<Self>, prompt: String) -> BoxFuture<'static, Result<String, BackendError>> {
        blocking(move || Ok(format_output(&self.weights.forward(&prompt))))
    }

    fn resident_bytes(&self) -> Option<u64> {
        Some(self.bytes)
    }
}
