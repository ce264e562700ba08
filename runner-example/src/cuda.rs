//! The `cuda` backend (cargo feature `cuda`): the `cpu` backend's models, with their weights
//! copied into GPU memory on load and inference run on the GPU with cuBLAS.
//!
//! Built on [`cudarc`] with dynamic loading: building needs no CUDA toolkit, and at run time
//! the backend needs the NVIDIA driver (`libcuda.so.1`) and cuBLAS 12 (`libcublas.so.12`, from
//! a CUDA toolkit, the `nvidia-cublas-cu12` wheel, ...) where the dynamic loader finds them
//! (`LD_LIBRARY_PATH`). [`CudaBackend::open`] checks both, and the device, up front: a machine
//! without them fails at start with a message, not at the first request.
//!
//! A load reads and checks the file as the `cpu` backend does ([`crate::weights`]: straight
//! into a host buffer, chunk by chunk), and copies each chunk to the device (`cuMemcpyHtoDAsync`
//! into one `CudaSlice` per tensor) on a stream of the model's own as soon as it is checked,
//! while the next chunk is read. Without a warm tier the host buffer is pageable memory with
//! huge pages, dropped after the load (the driver stages pageable copies, so these copies do
//! not overlap the reads); with one (`--host-cache-mb`) it is pinned memory that the
//! [`WarmTier`] keeps, so the copies overlap the reads, and a later load of the same model
//! is one pinned host-to-device copy, no disk read. Inference runs the same network as
//! [`MlpWeights::forward`](crate::models::MlpWeights::forward): the matrix-vector products
//! on the device with `cublasSgemv`, the bias added on the device, and the element-wise
//! `tanh` between layers on the host (one vector of `W` floats each way per layer), so that
//! no kernel compiler (NVRTC) is needed. The inferences of one model run one at a time (a
//! cuBLAS handle must not be used by two threads at once); different models run in parallel.
//!
//! Evicting a model drops its `CudaSlice`s, which frees the device memory, and synchronises
//! its stream so that the memory goes back to the driver at once (the allocator returns freed
//! memory at synchronisation points); this runs on a blocking thread.
#![allow(unsafe_code)]

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemv, GemvConfig};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

use std::ops::Range;

use cudarc::driver::PinnedHostSlice;

use crate::backend::{blocking, loading, Backend, BackendError, BoxFuture, LoadedModel};
use crate::cpu::BackendStats;
use crate::models::{expected_tensors, format_output, prompt_features, ModelDir, ModelEntry, OUTPUTS, VOCAB};
use crate::warm::WarmTier;
use crate::weights::HostBuf;

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
    tier: Option<Arc<WarmTier<PinnedWeights>>>,
}

/// A model's verified weights in pinned host memory: the warm tier's copies.
#[derive(Debug)]
pub struct PinnedWeights {
    floats: PinnedHostSlice<f32>,
    ranges: Vec<Range<usize>>,
}

/// Page-locked host memory for `floats` f32s: not write-combined (the loader reads what it
/// writes there, to hash it), so ordinary cached memory the GPU can DMA from.
pub fn alloc_pinned(ctx: &Arc<CudaContext>, floats: usize) -> Result<PinnedHostSlice<f32>, String> {
    // SAFETY: the memory is uninitialised; f32 has no invalid bit patterns, and every caller
    // fills it before reading it.
    cu("allocating pinned host memory", unsafe { ctx.alloc_pinned_with_flags::<f32>(floats, 0) })
}

impl CudaBackend {
    /// Opens the models directory `dir` (reads its manifest) and GPU `device`. Blocking.
    pub fn open(dir: impl AsRef<Path>, device: usize) -> Result<Self, String> {
        let dir = ModelDir::open(dir)?;
        let ctx = open_device(device)?;
        Ok(Self { dir, ctx, stats: Arc::default(), tier: None })
    }

    /// The same backend with a warm tier of `budget` bytes of pinned host memory (`None` or
    /// 0: none); see the module docs.
    pub fn with_host_cache(self, budget: Option<u64>) -> Self {
        let tier = budget.filter(|&b| b > 0).map(|b| Arc::new(WarmTier::new(b)));
        Self { tier, ..self }
    }

    /// The CUDA context (for benchmarks).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Loads `model` now, on this thread: from the warm tier when it holds the model, else
    /// from disk, each checked chunk copied to the device as it arrives.
    pub fn load_blocking(&self, model: &str) -> Result<CudaModel, BackendError> {
        let entry = self.dir.known(model)?;
        let bytes = entry.weight_bytes;
        let failed = |e: String| {
            BackendError::Failed(format!(
                "model {model}: copying {bytes} bytes of weights to GPU {} failed: {e}",
                self.ctx.ordinal()
            ))
        };
        let mut gpu = Gpu::alloc(&self.ctx, entry).map_err(failed)?;
        // The pinned copy being copied from: asynchronous copies read it until the stream is
        // synchronised, so it must outlive that even if the tier drops it meanwhile.
        let mut source: Option<Arc<PinnedWeights>> = None;
        let warm = self.tier.as_ref().and_then(|t| t.get(model));
        if let Some(host) = warm {
            self.stats.warm_load();
            let floats = cu("reading pinned memory", host.floats.as_slice()).map_err(failed)?;
            gpu.copy_floats(&host.ranges, 0..floats.len(), floats).map_err(failed)?;
            source = Some(host);
        } else {
            self.stats.read();
            let floats = usize::try_from(bytes / 4).unwrap_or(usize::MAX);
            let checked = match &self.tier {
                Some(tier) => {
                    let mut pinned = alloc_pinned(&self.ctx, floats).map_err(failed)?;
                    let dst = cu("writing pinned memory", pinned.as_mut_slice()).map_err(failed)?;
                    let loaded = match self.read_and_copy(model, bytemuck::cast_slice_mut(dst), &mut gpu) {
                        Ok(loaded) => loaded,
                        Err(e) => {
                            // Copies of the chunks before the failure may still read `pinned`.
                            let _ = gpu.stream.synchronize();
                            return Err(e);
                        }
                    };
                    let host = Arc::new(PinnedWeights { floats: pinned, ranges: loaded.ranges });
                    tier.insert(model, bytes, Arc::clone(&host));
                    source = Some(host);
                    loaded.checked
                }
                None => {
                    // Pageable: each copy returns once the driver has staged it, so the buffer
                    // may go when the read is done.
                    let mut buf = HostBuf::zeroed(floats * 4).map_err(|e| failed(e.to_string()))?;
                    self.read_and_copy(model, buf.bytes_mut(), &mut gpu)?.checked
                }
            };
            self.stats.checked(checked);
        }
        // The host buffer may go (or be reused) only once the copies from it are done.
        if let Err(e) = gpu.stream.synchronize() {
            // The copies may still be running: let the source go only after the device memory
            // and the whole context are done with.
            drop(gpu);
            let _ = self.ctx.synchronize();
            drop(source);
            return Err(failed(format!("synchronising the stream: {e}")));
        }
        drop(source);
        self.stats.alive(bytes);
        if let Some(tier) = &self.tier {
            tier.resident(model);
        }
        log::info!("model {model}: {bytes} bytes of weights in GPU {} memory", self.ctx.ordinal());
        Ok(CudaModel {
            name: model.to_string(),
            bytes,
            gpu: Mutex::new(Some(gpu)),
            ctx: Arc::clone(&self.ctx),
            stats: Arc::clone(&self.stats),
            tier: self.tier.clone(),
        })
    }

    /// Reads `model` into `dst`, copying each checked chunk to `gpu` as it arrives.
    fn read_and_copy(
        &self,
        model: &str,
        dst: &mut [u8],
        gpu: &mut Gpu,
    ) -> Result<crate::weights::Loaded, BackendError> {
        let mut started = false;
        self.dir.read_into(model, dst, &mut |ranges, chunk, bytes| {
            if chunk.start == 0 && started {
                // Read again (the file changed while being read): let the copies of the first
                // pass finish before their source is overwritten.
                cu("synchronising the stream", gpu.stream.synchronize())?;
            }
            started = true;
            let floats: &[f32] =
                bytemuck::try_cast_slice(bytes).map_err(|e| format!("unaligned chunk: {e}"))?;
            gpu.copy_floats(ranges, chunk.start / 4..chunk.end / 4, floats)
        })
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
        loading(move || {
            let loaded: Arc<dyn LoadedModel> = Arc::new(self.load_blocking(&model)?);
            Ok(loaded)
        })
    }

    fn size_hint(&self, model: &str) -> Option<u64> {
        self.dir.entry(model).map(|e| e.weight_bytes)
    }

    fn warm(&self) -> Vec<String> {
        self.tier.as_ref().map(|t| t.warm()).unwrap_or_default()
    }
}

/// A model's weights and scratch vectors in device memory, with its stream and cuBLAS handle.
struct Gpu {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    width: usize,
    /// Row-major `[256, W]`.
    embed: CudaSlice<f32>,
    /// `(weight [W, W] row-major, bias [W])` per layer.
    layers: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
    /// `(weight [OUTPUTS, W] row-major, bias [OUTPUTS])`.
    head: (CudaSlice<f32>, CudaSlice<f32>),
    /// Prompt features, `[256]`.
    c: CudaSlice<f32>,
    /// Activations, `[W]` each.
    x: CudaSlice<f32>,
    y: CudaSlice<f32>,
    /// Logits, `[OUTPUTS]`.
    out: CudaSlice<f32>,
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

impl Gpu {
    /// Device memory for `entry`'s tensors (zeroed) and scratch vectors, on a new stream of
    /// its own.
    fn alloc(ctx: &Arc<CudaContext>, entry: &ModelEntry) -> Result<Self, String> {
        cu("binding the CUDA context", ctx.bind_to_thread())?;
        let stream = cu("creating a stream", ctx.new_stream())?;
        let blas = cu("creating a cuBLAS handle", CudaBlas::new(Arc::clone(&stream)))?;
        let zeros = |n: usize| cu("allocating device memory", stream.alloc_zeros::<f32>(n));
        let mut tensors = Vec::new();
        for t in expected_tensors(entry.width) {
            tensors.push(zeros(t.shape.iter().product())?);
        }
        let mut tensors = tensors.into_iter();
        let mut next = || tensors.next().ok_or_else(|| "fewer tensors than a model has".to_string());
        let embed = next()?;
        let mut layers = Vec::with_capacity(crate::models::LAYERS);
        for _ in 0..crate::models::LAYERS {
            layers.push((next()?, next()?));
        }
        let head = (next()?, next()?);
        let w = entry.width;
        let (c, x, y, out) = (zeros(VOCAB)?, zeros(w)?, zeros(w)?, zeros(OUTPUTS)?);
        Ok(Self { stream, blas, width: w, embed, layers, head, c, x, y, out })
    }

    /// Tensor `i` (manifest order).
    fn tensor_mut(&mut self, i: usize) -> Option<&mut CudaSlice<f32>> {
        match i {
            0 => Some(&mut self.embed),
            i if i == 2 * self.layers.len() + 1 => Some(&mut self.head.0),
            i if i == 2 * self.layers.len() + 2 => Some(&mut self.head.1),
            i => self.layers.get_mut((i - 1) / 2).map(|(w, b)| if i % 2 == 1 { w } else { b }),
        }
    }

    /// Starts copying `floats`, the f32s `at` of the model's flat weights (`ranges`: where
    /// each tensor is in them), into the tensors they belong to. Asynchronous on this model's
    /// stream: `floats` must stay untouched until the stream is synchronised.
    fn copy_floats(
        &mut self,
        ranges: &[Range<usize>],
        at: Range<usize>,
        floats: &[f32],
    ) -> Result<(), String> {
        for (i, r) in ranges.iter().enumerate() {
            let (start, end) = (r.start.max(at.start), r.end.min(at.end));
            if start >= end {
                continue;
            }
            let src = floats.get(start - at.start..end - at.start).ok_or("chunk out of range")?;
            let stream = Arc::clone(&self.stream);
            let tensor = self.tensor_mut(i).ok_or("more tensors than a model has")?;
            let mut dst =
                tensor.try_slice_mut(start - r.start..end - r.start).ok_or("tensor out of range")?;
            cu("copying to the device", stream.memcpy_htod(src, &mut dst))?;
        }
        Ok(())
    }

    /// The logits for prompt features `c`; see the module docs.
    fn forward(&mut self, ctx: &CudaContext, c: &[f32]) -> Result<Vec<f32>, String> {
        use cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        cu("binding the CUDA context", ctx.bind_to_thread())?;
        let w = self.width;
        let stream = &self.stream;
        cu("copying the prompt to the device", stream.memcpy_htod(c, &mut self.c))?;
        // x = embedᵀ·c: row-major [256, W] is column-major W×256.
        gemv(&self.blas, CUBLAS_OP_N, (w, VOCAB), 0.0, &self.embed, &self.c, &mut self.x)?;
        for (weight, bias) in &self.layers {
            cu("copying the bias", stream.memcpy_dtod(bias, &mut self.y))?;
            gemv(&self.blas, CUBLAS_OP_T, (w, w), 1.0, weight, &self.x, &mut self.y)?;
            let mut h = cu("copying activations to the host", stream.clone_dtoh(&self.y))?;
            for v in &mut h {
                *v = v.tanh();
            }
            cu("copying activations to the device", stream.memcpy_htod(&h, &mut self.x))?;
        }
        cu("copying the bias", stream.memcpy_dtod(&self.head.1, &mut self.out))?;
        gemv(&self.blas, CUBLAS_OP_T, (w, OUTPUTS), 1.0, &self.head.0, &self.x, &mut self.out)?;
        let logits = cu("copying the logits to the host", stream.clone_dtoh(&self.out))?;
        cu("synchronising the stream", stream.synchronize())?;
        Ok(logits)
    }
}

/// A model whose weights are in GPU memory.
pub struct CudaModel {
    name: String,
    bytes: u64,
    /// `None` once released (in `Drop`).
    gpu: Mutex<Option<Gpu>>,
    ctx: Arc<CudaContext>,
    stats: Arc<BackendStats>,
    tier: Option<Arc<WarmTier<PinnedWeights>>>,
}

impl LoadedModel for CudaModel {
    fn infer(self: Arc<Self>, prompt: String) -> BoxFuture<'static, Result<String, BackendError>> {
        blocking(move || {
            let c = prompt_features(&prompt);
            let mut gpu = self.gpu.lock().unwrap_or_else(PoisonError::into_inner);
            let gpu = gpu
                .as_mut()
                .ok_or_else(|| BackendError::Failed(format!("model {} was released", self.name)))?;
            let logits = gpu.forward(&self.ctx, &c).map_err(|e| {
                BackendError::Failed(format!("model {}: inference on the GPU failed: {e}", self.name))
            })?;
            Ok(format_output(&logits))
        })
    }

    fn resident_bytes(&self) -> Option<u64> {
        Some(self.bytes)
    }
}

impl Drop for CudaModel {
    fn drop(&mut self) {
        let gpu = self.gpu.get_mut().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(tier) = &self.tier {
            tier.released(&self.name);
        }
        let (name, bytes) = (std::mem::take(&mut self.name), self.bytes);
        let (ctx, stats) = (Arc::clone(&self.ctx), Arc::clone(&self.stats));
        let release = move || {
            if let Err(e) = ctx.bind_to_thread() {
                log::warn!("model {name}: binding the CUDA context to free its memory failed: {e}");
            }
            if let Some(gpu) = gpu {
                let stream = Arc::clone(&gpu.stream);
                drop(gpu); // frees the weights (stream-ordered)
                if let Err(e) = stream.synchronize() {
                    log::warn!("model {name}: synchronising after freeing its GPU memory failed: {e}");
                }
            }
            stats.dead(bytes);
            match ctx.mem_get_info() {
                Ok((free, total)) => log::info!(
                    "model {name}: freed {bytes} bytes of GPU memory; GPU {} has {} MiB of {} MiB in use",
                    ctx.ordinal(),
                    total.saturating_sub(free) >> 20,
                    total >> 20
                ),
                Err(e) => log::info!("model {name}: freed {bytes} bytes of GPU memory ({e})"),
            }
        };
        // Off the async threads: freeing synchronises with the GPU.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(release)),
            Err(_) => release(),
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
        drop(model);
        // The release runs on a blocking thread.
        for _ in 0..500 {
            if backend.stats().live_models() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(backend.stats().live_bytes(), 0);
    }
}
