//! The `cpu` backend: real weights, read from safetensors files into host memory, and a real
//! f32 forward pass on the CPU.
//!
//! Models come from a directory made by `make-models` (see [`crate::models`]): the manifest
//! is read once, when the backend is opened; a miss reads the model's file straight into the
//! buffer its weights will live in, checked against the manifest on the way (see
//! [`crate::weights`]), and keeps the weights in memory until the cache evicts the model (the
//! last `Arc` goes, and the weights with it). Inference runs on tokio's blocking pool through
//! [`backend::blocking`](crate::backend::blocking); loads run on a thread of their own (see
//! [`crate::backend::loading`]), so that a long load never holds a thread inferences wait for.
//!
//! With a warm tier ([`CpuBackend::with_host_cache`]) the backend plays a GPU backend, for
//! tests and benchmarks: the verified weights read from disk are the *host* copy, kept in the
//! [`WarmTier`], and the model that serves inferences works on a *device* copy, a separate
//! allocation ([`BackendStats::device_copies`] counts them, [`BackendStats::live_bytes`] is the
//! "device memory" in use). A load of a model the tier holds is that copy alone: no disk read.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::backend::{blocking, loading, Backend, BackendError, BoxFuture, LoadedModel};
use crate::models::{format_output, ModelDir};
use crate::warm::WarmTier;
use crate::weights::{BufferPool, Checked, HostWeights};

/// What a real backend has done, for tests, benchmarks and logs.
#[derive(Debug, Default)]
pub struct BackendStats {
    disk_reads: AtomicUsize,
    full_checks: AtomicUsize,
    warm_loads: AtomicUsize,
    device_copies: AtomicUsize,
    live_models: AtomicUsize,
    live_bytes: AtomicU64,
}

impl BackendStats {
    /// Weights files read so far (one per load attempt of a known model that the warm tier
    /// did not hold).
    pub fn disk_reads(&self) -> usize {
        self.disk_reads.load(Ordering::SeqCst)
    }

    /// Reads that checked the file's digest and values (the others were of a file unchanged
    /// since it last passed: see [`crate::weights::VerifiedRecords`]).
    pub fn full_checks(&self) -> usize {
        self.full_checks.load(Ordering::SeqCst)
    }

    /// Loads served from the warm tier (a host-to-device copy, no disk read).
    pub fn warm_loads(&self) -> usize {
        self.warm_loads.load(Ordering::SeqCst)
    }

    /// Device allocations made for weights (cpu with a warm tier: the stand-in device copies).
    pub fn device_copies(&self) -> usize {
        self.device_copies.load(Ordering::SeqCst)
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

    pub(crate) fn checked(&self, checked: Checked) {
        if checked == Checked::Full {
            self.full_checks.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub(crate) fn warm_load(&self) {
        self.warm_loads.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn device_copy(&self) {
        self.device_copies.fetch_add(1, Ordering::SeqCst);
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
    tier: Option<Arc<WarmTier<HostWeights>>>,
    pool: Arc<BufferPool>,
}

impl CpuBackend {
    /// Opens the models directory `dir`: reads and checks its `manifest.json`. Blocking.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, String> {
        Ok(Self { dir: ModelDir::open(dir)?, stats: Arc::default(), tier: None, pool: Arc::default() })
    }

    /// The same backend with a warm tier of `budget` bytes (`None` or 0: none), modelling a
    /// device behind it: see the module docs.
    pub fn with_host_cache(self, budget: Option<u64>) -> Self {
        let tier = budget.filter(|&b| b > 0).map(|b| Arc::new(WarmTier::new(b)));
        Self { tier, ..self }
    }

    /// The same backend with `threads` threads hashing and checking each full load
    /// (`--load-threads`; 1: the load thread alone; by default as many as the CPUs): see
    /// [`crate::weights::CheckPool`].
    pub fn with_load_threads(self, threads: usize) -> Self {
        Self { dir: self.dir.with_load_threads(threads), ..self }
    }

    /// The models directory and its manifest.
    pub fn models(&self) -> &ModelDir {
        &self.dir
    }

    /// What the backend has done.
    pub fn stats(&self) -> &Arc<BackendStats> {
        &self.stats
    }

    /// The warm tier, when there is one.
    pub fn host_cache(&self) -> Option<&WarmTier<HostWeights>> {
        self.tier.as_deref()
    }

    /// Loads `model` now, on this thread (what [`Backend::load`] runs on a load thread).
    pub fn load_blocking(&self, model: &str) -> Result<CpuModel, BackendError> {
        self.dir.known(model)?;
        let Some(tier) = &self.tier else {
            self.stats.read();
            let (weights, checked) = self.dir.read_host(model, Some(&self.pool))?;
            self.stats.checked(checked);
            return Ok(CpuModel::new(model, weights, self, None));
        };
        let host = match tier.get(model) {
            Some(host) => {
                self.stats.warm_load();
                host
            }
            None => {
                self.stats.read();
                // Not from the pool: host copies stay (the pool recycles device copies).
                let (weights, checked) = self.dir.read_host(model, None)?;
                self.stats.checked(checked);
                let host = Arc::new(weights);
                tier.insert(model, host.bytes(), Arc::clone(&host));
                host
            }
        };
        // The stand-in for the copy to the device: a separate allocation.
        let device = host.duplicate(Some(&self.pool)).map_err(|e| {
            BackendError::Failed(format!(
                "model {model}: cannot allocate {} bytes of device memory: {e}",
                host.bytes()
            ))
        })?;
        self.stats.device_copy();
        Ok(CpuModel::new(model, device, self, Some(Arc::clone(tier))))
    }
}

impl Backend for CpuBackend {
    fn load(
        self: Arc<Self>,
        model: String,
    ) -> BoxFuture<'static, Result<Arc<dyn LoadedModel>, BackendError>> {
        loading(move || {
            let loaded: Arc<dyn LoadedModel> = Arc::new(self.load_blocking(&model)?);
            Ok(loaded)
        })
    }

    fn size_hint(&self, model: &str) -> Option<u64> {
        self.dir.entry(model).map(|e| e.weight_bytes)
    }

    fn lookup(&self, model: &str) -> Result<Option<u64>, BackendError> {
        // The manifest lists every model: one it lacks is never loaded, nothing is evicted.
        self.dir.known(model).map(|e| Some(e.weight_bytes))
    }

    fn warm(&self) -> Vec<String> {
        self.tier.as_ref().map(|t| t.warm()).unwrap_or_default()
    }
}

/// A model whose weights are in host memory (or, with a warm tier, in the stand-in device
/// memory).
pub struct CpuModel {
    name: String,
    /// `None` only once dropped (its buffer goes back to the pool).
    weights: Option<HostWeights>,
    bytes: u64,
    stats: Arc<BackendStats>,
    tier: Option<Arc<WarmTier<HostWeights>>>,
    pool: Arc<BufferPool>,
}

impl CpuModel {
    fn new(
        name: &str,
        weights: HostWeights,
        backend: &CpuBackend,
        tier: Option<Arc<WarmTier<HostWeights>>>,
    ) -> Self {
        let bytes = weights.bytes();
        backend.stats.alive(bytes);
        if let Some(tier) = &tier {
            tier.resident(name);
        }
        log::debug!("model {name}: {bytes} bytes of weights in memory");
        Self {
            name: name.to_string(),
            weights: Some(weights),
            bytes,
            stats: Arc::clone(&backend.stats),
            tier,
            pool: Arc::clone(&backend.pool),
        }
    }

    /// One inference, on this thread.
    pub fn infer_blocking(&self, prompt: &str) -> String {
        let logits = self.weights.as_ref().map(|w| w.view().forward(prompt)).unwrap_or_default();
        format_output(&logits)
    }
}

impl Drop for CpuModel {
    fn drop(&mut self) {
        if let Some(weights) = self.weights.take() {
            // For the next load to fill: see BufferPool.
            self.pool.give(weights.buf);
        }
        self.stats.dead(self.bytes);
        if let Some(tier) = &self.tier {
            tier.released(&self.name);
        }
    }
}

impl LoadedModel for CpuModel {
    fn infer(self: Arc<Self>, prompt: String) -> BoxFuture<'static, Result<String, BackendError>> {
        blocking(move || Ok(self.infer_blocking(&prompt)))
    }

    fn resident_bytes(&self) -> Option<u64> {
        Some(self.bytes)
    }
}
