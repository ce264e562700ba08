//! The `cuda` backend (cargo feature `cuda`): the `cpu` backend's models, with their weights
//! copied into GPU memory on load and inference run on the GPU with cuBLAS.
//!
//! Built on [`cudarc`] with dynamic loading: building needs no CUDA toolkit, and at run time
//! the backend needs the NVIDIA driver (`libcuda.so.1`) and cuBLAS 12 (`libcublas.so.12`, from
//! a CUDA toolkit, the `nvidia-cublas-cu12` wheel, ...) where the dynamic loader finds them
//! (`LD_LIBRARY_PATH`). [`CudaBackend::open`] checks both, and the device, up front: a machine
//! without them fails at start with a message, not at the first request.
//!
//! A load reads and checks the file exactly as the `cpu` backend does (on the host), then
//! copies every tensor to the device (`cuMemcpyHtoD` into a `CudaSlice` each) on a stream of
//! the model's own, and keeps nothing on the host. Inference runs the same network as
//! [`MlpWeights::forward`](crate::models::MlpWeights::forward): the matrix-vector products
//! on the device with `cublasSgemv`, the bias added on the device, and the element-wise
//! `tanh` between layers on the host (one vector of `W` floats each way per layer), so that
//! no kernel compiler (NVRTC) is needed. The weights are read-only once uploaded; each
//! inference takes a workspace (stream, cuBLAS handle, scratch vectors) from a pool the models
//! share, so inferences run in parallel, on one model as on several, up to the runner's
//! `--max-concurrency`.
//!
//! Evicting a model drops its `CudaSlice`s, which frees the device memory, and synchronises
//! its stream so that the memory goes back to the driver (the allocator returns freed memory
//! at synchronisation points) before the drop returns. The model says so
//! ([`LoadedModel::release_blocks`]): the cache drops it on a blocking thread and counts its
//! bytes as held until then, so the next upload never races the release.
#![allow(unsafe_code)]

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemv, GemvConfig};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

use crate::backend::{blocking, Backend, BackendError, BoxFuture, LoadedModel};
use crate::cpu::BackendStats;
use crate::models::{format_output, prompt_features, MlpWeights, ModelDir, OUTPUTS, VOCAB};

/// Where the libraries the backend loads at run time come from, for error messages.
const LIBRARY_HELP: &str = "the cuda backend needs the NVIDIA driver (libcuda.so.1) and cuBLAS 12 \
     (libcublas.so.12, e.g. from a CUDA 12 toolkit's lib64 or the nvidia-cublas-cu12 wheel) \
     where the dynamic loader finds them (LD_LIBRARY_PATH)";

fn cu<T, E: std::fmt::Display>(what: &str, result: Result<T, E>) -> Result<T, String> {
    result.map_err(|e| format!("{what}: {e}"))
}

/// Checks that the CUDA driver and cuBLAS can be loaded and that GPU `device` exists, and
/// opens it.
pub fn open_device(device: usize) -> Result<Arc<CudaContext>, String> {
    // SAFETY: only tries to dlopen the library (and closes it again).
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(format!("cannot load the CUDA driver library: {LIBRARY_HELP}"));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(format!("cannot load the cuBLAS library: {LIBRARY_HELP}"));
    }
    let count = cu("cannot initialise CUDA", CudaContext::device_count())?;
    let count = usize::try_from(count).unwrap_or(0);
    if count == 0 {
        return Err("no CUDA device found".to_string());
    }
    if device >= count {
        return Err(format!(
            "there is no CUDA device {device}: this machine has {count} (--device 0 to {})",
            count - 1
        ));
    }
    let ctx = cu(&format!("cannot open CUDA device {device}"), CudaContext::new(device))?;
    // Fail now, not at the first load, when cuBLAS cannot start.
    drop(cu("cannot initialise cuBLAS", CudaBlas::new(ctx.default_stream()))?);
    Ok(ctx)
}

/// The `cuda` backend.
#[derive(Debug)]
pub struct CudaBackend {
    dir: ModelDir,
    ctx: Arc<CudaContext>,
    stats: Arc<BackendStats>,
    /// Idle inference workspaces, shared by all models.
    workspaces: Arc<Mutex<Vec<Workspace>>>,
}

impl CudaBackend {
    /// Opens the models directory `dir` (reads its manifest) and GPU `device`. Blocking.
    pub fn open(dir: impl AsRef<Path>, device: usize) -> Result<Self, String> {
        let dir = ModelDir::open(dir)?;
        let ctx = open_device(device)?;
        Ok(Self { dir, ctx, stats: Arc::default(), workspaces: Arc::default() })
    }

    /// The GPU's name and its `(free, total)` memory in bytes.
    pub fn device_info(&self) -> Result<(String, usize, usize), String> {
        let name = cu("cannot read the device name", self.ctx.name())?;
        let (free, total) = cu("cannot read the device memory", self.ctx.mem_get_info())?;
        Ok((name, free, total))
    }

    /// The models directory and its manifest.
    pub fn models(&self) -> &ModelDir {
        &self.dir
    }

    /// What the backend has done (`live_bytes`: weights in GPU memory).
    pub fn stats(&self) -> &Arc<BackendStats> {
        &self.stats
    }
}

impl Backend for CudaBackend {
    fn load(
        self: Arc<Self>,
        model: String,
    ) -> BoxFuture<'static, Result<Arc<dyn LoadedModel>, BackendError>> {
        blocking(move || {
            if self.dir.entry(&model).is_some() {
                self.stats.read();
            }
            let weights = self.dir.read(&model)?;
            let bytes = weights.bytes();
            let gpu = Weights::upload(&self.ctx, &weights).map_err(|e| {
                BackendError::Failed(format!(
                    "model {model}: copying {bytes} bytes of weights to GPU {} failed: {e}",
                    self.ctx.ordinal()
                ))
            })?;
            drop(weights);
            self.stats.alive(bytes);
            log::info!("model {model}: {bytes} bytes of weights in GPU {} memory", self.ctx.ordinal());
            let loaded: Arc<dyn LoadedModel> = Arc::new(CudaModel {
                name: model,
                bytes,
                weights: Some(gpu),
                workspaces: Arc::clone(&self.workspaces),
                ctx: Arc::clone(&self.ctx),
                stats: Arc::clone(&self.stats),
            });
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

/// A model's weights in device memory: read-only once uploaded, so any number of inferences
/// read them at once, each from its own [`Workspace`].
struct Weights {
    /// The stream they were uploaded (and are freed) on.
    stream: Arc<CudaStream>,
    width: usize,
    /// Row-major `[256, W]`.
    embed: CudaSlice<f32>,
    /// `(weight [W, W] row-major, bias [W])` per layer.
    layers: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
    /// `(weight [OUTPUTS, W] row-major, bias [OUTPUTS])`.
    head: (CudaSlice<f32>, CudaSlice<f32>),
}

/// What one inference needs besides the weights: a stream and a cuBLAS handle of its own (a
/// handle must not be used by two threads at once) and scratch vectors. Idle workspaces wait
/// in the backend's pool for the next inference, of any model; there are as many as
/// inferences ever ran at once, which the runner keeps at most `--max-concurrency`.
struct Workspace {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// Prompt features, `[256]`.
    c: CudaSlice<f32>,
    /// Activations, `[width]` each.
    x: CudaSlice<f32>,
    y: CudaSlice<f32>,
    /// Logits, `[OUTPUTS]`.
    out: CudaSlice<f32>,
    width: usize,
}

/// `y = op(A)·x + beta·y` for a column-major `m×n` matrix `A` (`lda = m`), checking every
/// length first. A row-major `[rows, cols]` matrix is the column-major `cols×rows` matrix
/// `Aᵀ`, so `W·x` for a row-major `W` is `op = T`, `m = cols`, `n = rows`.
fn gemv(
    blas: &CudaBlas,
    trans: cublasOperation_t,
    (m, n): (usize, usize),
    beta: f32,
    a: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<(), String> {
    let (x_len, y_len) = match trans {
        cublasOperation_t::CUBLAS_OP_N => (n, m),
        _ => (m, n),
    };
    if a.len() != m * n || x.len() < x_len || y.len() < y_len {
        return Err(format!(
            "sgemv shapes do not match: A {m}x{n} has {} floats, x {} (needs {x_len}), y {} (needs {y_len})",
            a.len(),
            x.len(),
            y.len()
        ));
    }
    let dim = |v: usize| i32::try_from(v).map_err(|_| format!("dimension {v} is too large for cuBLAS"));
    let cfg = GemvConfig { trans, m: dim(m)?, n: dim(n)?, alpha: 1.0, lda: dim(m)?, incx: 1, beta, incy: 1 };
    // SAFETY: the lengths checked above cover every element cuBLAS reads and writes for these
    // dimensions and unit strides, and all three buffers live on this handle's device.
    cu("cublasSgemv", unsafe { blas.gemv(cfg, a, x, y) })
}

impl Weights {
    /// Copies `w` to the device, on a new stream of its own, and waits for the copies.
    fn upload(ctx: &Arc<CudaContext>, w: &MlpWeights) -> Result<Self, String> {
        cu("binding the CUDA context", ctx.bind_to_thread())?;
        let stream = cu("creating a stream", ctx.new_stream())?;
        let htod = |v: &[f32]| cu("copying to the device", stream.clone_htod(v));
        let embed = htod(&w.embed)?;
        let mut layers = Vec::with_capacity(w.layers.len());
        for layer in &w.layers {
            layers.push((htod(&layer.weight)?, htod(&layer.bias)?));
        }
        let head = (htod(&w.head.weight)?, htod(&w.head.bias)?);
        // Other streams read them from now on: the copies must be over.
        cu("synchronising the stream", stream.synchronize())?;
        Ok(Self { stream, width: w.width, embed, layers, head })
    }
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace").field("width", &self.width).finish_non_exhaustive()
    }
}

impl Workspace {
    /// A workspace for models of width `width`, on a new stream of its own.
    fn new(ctx: &Arc<CudaContext>, width: usize) -> Result<Self, String> {
        let stream = cu("creating a stream", ctx.new_stream())?;
        let blas = cu("creating a cuBLAS handle", CudaBlas::new(Arc::clone(&stream)))?;
        let zeros = |n: usize| cu("allocating device memory", stream.alloc_zeros::<f32>(n));
        let (c, x, y, out) = (zeros(VOCAB)?, zeros(width)?, zeros(width)?, zeros(OUTPUTS)?);
        Ok(Self { stream, blas, c, x, y, out, width })
    }

    /// The logits of `w` for prompt features `c`; see the module docs.
    fn forward(&mut self, w: &Weights, c: &[f32]) -> Result<Vec<f32>, String> {
        use cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let width = w.width;
        if self.width != width {
            let zeros = |n: usize| cu("allocating device memory", self.stream.alloc_zeros::<f32>(n));
            (self.x, self.y) = (zeros(width)?, zeros(width)?);
            self.width = width;
        }
        let stream = &self.stream;
        cu("copying the prompt to the device", stream.memcpy_htod(c, &mut self.c))?;
        // x = embedᵀ·c: row-major [256, W] is column-major W×256.
        gemv(&self.blas, CUBLAS_OP_N, (width, VOCAB), 0.0, &w.embed, &self.c, &mut self.x)?;
        for (weight, bias) in &w.layers {
            cu("copying the bias", stream.memcpy_dtod(bias, &mut self.y))?;
            gemv(&self.blas, CUBLAS_OP_T, (width, width), 1.0, weight, &self.x, &mut self.y)?;
            let mut h = cu("copying activations to the host", stream.clone_dtoh(&self.y))?;
            for v in &mut h {
                *v = v.tanh();
            }
            cu("copying activations to the device", stream.memcpy_htod(&h, &mut self.x))?;
        }
        cu("copying the bias", stream.memcpy_dtod(&w.head.1, &mut self.out))?;
        gemv(&self.blas, CUBLAS_OP_T, (width, OUTPUTS), 1.0, &w.head.0, &self.x, &mut self.out)?;
        let logits = cu("copying the logits to the host", stream.clone_dtoh(&self.out))?;
        // Nothing of this inference is left on the device once it returns.
        cu("synchronising the stream", stream.synchronize())?;
        Ok(logits)
    }
}

/// A model whose weights are in GPU memory.
struct CudaModel {
    name: String,
    bytes: u64,
    /// `None` once released (in `Drop`).
    weights: Option<Weights>,
    /// The backend's idle workspaces.
    workspaces: Arc<Mutex<Vec<Workspace>>>,
    ctx: Arc<CudaContext>,
    stats: Arc<BackendStats>,
}

impl LoadedModel for CudaModel {
    fn infer(self: Arc<Self>, prompt: String) -> BoxFuture<'static, Result<String, BackendError>> {
        blocking(move || {
            let failed = |e: String| {
                BackendError::Failed(format!("model {}: inference on the GPU failed: {e}", self.name))
            };
            let c = prompt_features(&prompt);
            let weights = self
                .weights
                .as_ref()
                .ok_or_else(|| BackendError::Failed(format!("model {} was released", self.name)))?;
            cu("binding the CUDA context", self.ctx.bind_to_thread()).map_err(failed)?;
            let idle = self.workspaces.lock().unwrap_or_else(PoisonError::into_inner).pop();
            let mut workspace = match idle {
                Some(workspace) => workspace,
                None => Workspace::new(&self.ctx, weights.width).map_err(failed)?,
            };
            let logits = workspace.forward(weights, &c).map_err(failed)?;
            // Only a workspace whose inference succeeded goes back (a failed one is dropped).
            self.workspaces.lock().unwrap_or_else(PoisonError::into_inner).push(workspace);
            Ok(format_output(&logits))
        })
    }

    fn resident_bytes(&self) -> Option<u64> {
        Some(self.bytes)
    }

    /// Dropping frees the weights and waits for the memory to go back to the driver.
    fn release_blocks(&self) -> bool {
        true
    }
}

impl Drop for CudaModel {
    /// Frees the weights and synchronises their stream, so that the memory is back with the
    /// driver when this returns: the cache calls it on a blocking thread and admits the
    /// next load into these bytes only afterwards. No inference runs any more (the runner
    /// holds the pin until they have all ended).
    fn drop(&mut self) {
        if let Err(e) = self.ctx.bind_to_thread() {
            log::warn!("model {}: binding the CUDA context to free its memory failed: {e}", self.name);
        }
        if let Some(weights) = self.weights.take() {
            let stream = Arc::clone(&weights.stream);
            drop(weights); // frees the weights (stream-ordered)
            if let Err(e) = stream.synchronize() {
                log::warn!("model {}: synchronising after freeing its GPU memory failed: {e}", self.name);
            }
        }
        self.stats.dead(self.bytes);
        let (name, bytes, ctx) = (&self.name, self.bytes, &self.ctx);
        match ctx.mem_get_info() {
            Ok((free, total)) => log::info!(
                "model {name}: freed {bytes} bytes of GPU memory; GPU {} has {} MiB of {} MiB in use",
                ctx.ordinal(),
                total.saturating_sub(free) >> 20,
                total >> 20
            ),
            Err(e) => log::info!("model {name}: freed {bytes} bytes of GPU memory ({e})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{generate_weights, make_models};

    #[test]
    fn opening_fails_with_a_message_never_a_panic() {
        if let Err(e) = open_device(0) {
            assert!(!e.is_empty());
        }
        assert!(open_device(1 << 20).is_err());
    }

    /// Runs only where a GPU, its driver and cuBLAS are present (`cargo test --features cuda`
    /// on a GPU machine); elsewhere it says why it skipped.
    #[tokio::test]
    async fn matches_the_cpu_forward_pass_and_frees_gpu_memory() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = make_models(dir.path(), 2, 1 << 20, 5).unwrap();
        let backend = match CudaBackend::open(dir.path(), 0) {
            Ok(backend) => Arc::new(backend),
            Err(e) => {
                eprintln!("skipped, no usable GPU: {e}");
                return;
            }
        };
        let width = manifest.models[0].width;
        let model = Arc::clone(&backend).load("model-1".into()).await.unwrap();
        assert_eq!(model.resident_bytes(), Some(manifest.models[1].weight_bytes));
        assert_eq!(backend.stats().live_models(), 1);
        let cpu = generate_weights(5, 1, width);
        for prompt in ["", "hello", "a longer prompt, with punctuation!"] {
            let gpu_out = Arc::clone(&model).infer(prompt.to_string()).await.unwrap();
            let cpu_logits = cpu.forward(prompt);
            let gpu_logits: Vec<f32> = gpu_out
                .split_once("logits=[")
                .map(|(_, rest)| rest.trim_end_matches(']').split(',').map(|v| v.parse().unwrap()).collect())
                .unwrap();
            for (g, c) in gpu_logits.iter().zip(&cpu_logits) {
                assert!((g - c).abs() < 2e-3, "{prompt:?}: gpu {gpu_out}, cpu {cpu_logits:?}");
            }
        }
        let err = Arc::clone(&backend).load("model-9".into()).await.err().unwrap();
        assert!(matches!(err, BackendError::NotFound(_)), "{err:?}");
        assert!(model.release_blocks());
        // The release is done when the drop returns.
        drop(model);
        assert_eq!(backend.stats().live_models(), 0);
        assert_eq!(backend.stats().live_bytes(), 0);
    }
}
