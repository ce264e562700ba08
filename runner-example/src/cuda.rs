//! The `cuda` backend (cargo feature `cuda`): the `cpu` backend's models, with their weights
//! copied into GPU memory on load and inference run on the GPU with cuBLAS.
//!
//! Built on [`cudarc`] with dynamic loading: building needs no CUDA toolkit, and at run time
//! the backend needs the NVIDIA driver (`libcuda.so.1`) and cuBLAS 12 (`libcublas.so.12`, from
//! a CUDA toolkit, the `nvidia-cublas-cu12` wheel, ...) where the dynamic loader finds them
//! (`LD_LIBRARY_PATH`). [`CudaBackend::open`] checks both, and the device, up front: a machine
//! without them fails at start with a message, not at the first request.
//!
//! A load runs on a thread of its own at a lower priority ([`crate::backend::loading`]). It
//! allocates the model's tensors on the device (one `CudaSlice` each), reads and checks the
//! file as the `cpu` backend does ([`crate::weights`]: straight into a host buffer, chunk by
//! chunk), and copies each chunk to the device (`cuMemcpyHtoDAsync`) on a stream of the
//! model's own as soon as it is checked, while the next chunk is read. Without a warm tier the
//! host buffer is pageable memory with huge pages, dropped after the load (the driver stages
//! pageable copies, so these copies do not overlap the reads); with one (`--host-cache-mb`) it
//! is pinned memory that the [`WarmTier`] keeps, so the copies overlap the reads, and a later
//! load of the same model is one pinned host-to-device copy, no disk read. The host memory a
//! load copies from lives until its stream is synchronised, whether the load succeeds or
//! fails, and even when the tier drops its copy meanwhile; a failed load frees what it
//! allocated on the device and synchronises before it returns.
//!
//! Inference runs the same network as
//! [`MlpWeights::forward`](crate::models::MlpWeights::forward): the matrix-vector products
//! on the device with `cublasSgemv`, the bias added on the device, and the element-wise
//! `tanh` between layers on the host (one vector of `W` floats each way per layer), so that
//! no kernel compiler (NVRTC) is needed. The weights are read-only once loaded (the load
//! waits for its copies before the model is handed out); each inference takes a workspace
//! (stream, cuBLAS handle, scratch vectors) from a pool the models share, so inferences run in
//! parallel, on one model as on several, up to the runner's `--max-concurrency`.
//!
//! Evicting a model drops its `CudaSlice`s, which frees the device memory, and synchronises
//! its stream so that the memory goes back to the driver (the allocator returns freed memory
//! at synchronisation points) before the drop returns. The model says so
//! ([`LoadedModel::release_blocks`]): the cache drops it on a blocking thread and counts its
//! bytes as held until then, so the next upload never races the release. The warm tier keeps
//! its host copy (if it has one): the model is then listed as `warm`.
#![allow(unsafe_code)]

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemv, GemvConfig};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, PinnedHostSlice};

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
    /// Idle inference workspaces, shared by all models.
    workspaces: Arc<Mutex<Vec<Workspace>>>,
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

/// The host memory a load's asynchronous copies read from. They read it until the model's
/// stream is synchronised, so it is dropped only after that (or after the whole context is
/// idle, when synchronising the stream failed).
#[derive(Default)]
struct Source {
    /// The warm tier's copy being copied from (the tier may drop its own `Arc` meanwhile).
    warm: Option<Arc<PinnedWeights>>,
    /// With a warm tier, the pinned buffer a read from disk fills (the tier's copy once the
    /// load succeeded).
    pinned: Option<PinnedHostSlice<f32>>,
    /// Where each tensor is in `pinned`, once read.
    ranges: Vec<Range<usize>>,
}

impl CudaBackend {
    /// Opens the models directory `dir` (reads its manifest) and GPU `device`. Blocking.
    pub fn open(dir: impl AsRef<Path>, device: usize) -> Result<Self, String> {
        let dir = ModelDir::open(dir)?;
        let ctx = open_device(device)?;
        Ok(Self { dir, ctx, stats: Arc::default(), workspaces: Arc::default(), tier: None })
    }

    /// The same backend with a warm tier of `budget` bytes of pinned host memory (`None` or
    /// 0: none); see the module docs.
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

    /// The CUDA context (for benchmarks).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Loads `model` now, on this thread: from the warm tier when it holds the model, else
    /// from disk, each checked chunk copied to the device as it arrives.
    pub fn load_blocking(&self, model: &str) -> Result<CudaModel, BackendError> {
        let entry = self.dir.known(model)?;
        let bytes = entry.weight_bytes;
        let mut weights = Weights::alloc(&self.ctx, entry).map_err(|e| self.copy_failed(model, bytes, e))?;
        let mut source = Source::default();
        let filled = self.fill(model, bytes, &mut weights, &mut source);
        // The host memory may go (or be reused) only once the copies from it are done, and
        // the workspaces' streams read the weights from now on.
        let done = filled.and_then(|()| {
            cu("synchronising the stream", weights.stream.synchronize())
                .map_err(|e| self.copy_failed(model, bytes, e))
        });
        if let Err(e) = done {
            self.abandon(model, weights);
            drop(source);
            return Err(e);
        }
        if let (Some(tier), Some(floats)) = (&self.tier, source.pinned.take()) {
            let ranges = std::mem::take(&mut source.ranges);
            tier.insert(model, bytes, Arc::new(PinnedWeights { floats, ranges }));
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
            weights: Some(weights),
            workspaces: Arc::clone(&self.workspaces),
            ctx: Arc::clone(&self.ctx),
            stats: Arc::clone(&self.stats),
            tier: self.tier.clone(),
        })
    }

    fn copy_failed(&self, model: &str, bytes: u64, e: String) -> BackendError {
        BackendError::Failed(format!(
            "model {model}: copying {bytes} bytes of weights to GPU {} failed: {e}",
            self.ctx.ordinal()
        ))
    }

    /// Starts the copies of `model`'s weights into `weights`: from the warm tier's copy when
    /// it holds one, else read from disk into a new host buffer (kept in `source` when it is
    /// to become the tier's copy). Every host buffer the copies read is in `source` or already
    /// staged by the driver (pageable memory) when this returns, even when it fails.
    fn fill(
        &self,
        model: &str,
        bytes: u64,
        weights: &mut Weights,
        source: &mut Source,
    ) -> Result<(), BackendError> {
        let failed = |e: String| self.copy_failed(model, bytes, e);
        if let Some(host) = self.tier.as_ref().and_then(|t| t.get(model)) {
            self.stats.warm_load();
            let host = source.warm.insert(host);
            let floats = cu("reading pinned memory", host.floats.as_slice()).map_err(failed)?;
            return weights.copy_floats(&host.ranges, 0..floats.len(), floats).map_err(failed);
        }
        self.stats.read();
        let floats = usize::try_from(bytes / 4).unwrap_or(usize::MAX);
        let loaded = if self.tier.is_some() {
            let pinned = source.pinned.insert(alloc_pinned(&self.ctx, floats).map_err(failed)?);
            let dst = cu("writing pinned memory", pinned.as_mut_slice()).map_err(failed)?;
            self.read_and_copy(model, bytemuck::cast_slice_mut(dst), weights)?
        } else {
            // Pageable: each copy returns once the driver has staged it, so the buffer may go
            // when the read is done.
            let mut buf = HostBuf::zeroed(floats * 4).map_err(|e| failed(e.to_string()))?;
            self.read_and_copy(model, buf.bytes_mut(), weights)?
        };
        self.stats.checked(loaded.checked);
        source.ranges = loaded.ranges;
        Ok(())
    }

    /// Reads `model` into `dst`, copying each checked chunk to `weights` as it arrives.
    fn read_and_copy(
        &self,
        model: &str,
        dst: &mut [u8],
        weights: &mut Weights,
    ) -> Result<crate::weights::Loaded, BackendError> {
        let mut started = false;
        self.dir.read_into(model, dst, &mut |ranges, chunk, bytes| {
            if chunk.start == 0 && started {
                // Read again (the file changed while being read): let the copies of the first
                // pass finish before their source is overwritten.
                cu("synchronising the stream", weights.stream.synchronize())?;
            }
            started = true;
            let floats: &[f32] =
                bytemuck::try_cast_slice(bytes).map_err(|e| format!("unaligned chunk: {e}"))?;
            weights.copy_floats(ranges, chunk.start / 4..chunk.end / 4, floats)
        })
    }

    /// Frees the weights of a failed load and waits until the device is done with them and
    /// with the host memory their copies read (which the caller drops afterwards).
    fn abandon(&self, model: &str, weights: Weights) {
        if let Err(e) = weights.free() {
            // The copies may still be running: wait for the whole context.
            log::warn!("model {model}: after a failed load, {e}");
            if let Err(e) = self.ctx.synchronize() {
                log::warn!("model {model}: after a failed load, synchronising the context failed: {e}");
            }
        }
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

    fn lookup(&self, model: &str) -> Result<Option<u64>, BackendError> {
        // The manifest lists every model: one it lacks is never loaded, nothing is evicted.
        self.dir.known(model).map(|e| Some(e.weight_bytes))
    }

    fn warm(&self) -> Vec<String> {
        self.tier.as_ref().map(|t| t.warm()).unwrap_or_default()
    }
}

/// A model's weights in device memory: written only while it loads, read-only from then on,
/// so any number of inferences read them at once, each from its own [`Workspace`].
struct Weights {
    /// The stream they are copied to the device (and freed) on.
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
    /// Device memory for `entry`'s tensors (zeroed), on a new stream of its own. A failure
    /// frees what was allocated and synchronises, like [`Weights::free`].
    fn alloc(ctx: &Arc<CudaContext>, entry: &ModelEntry) -> Result<Self, String> {
        cu("binding the CUDA context", ctx.bind_to_thread())?;
        let stream = cu("creating a stream", ctx.new_stream())?;
        let allocated = Self::alloc_on(&stream, entry.width);
        if allocated.is_err() {
            // The tensors allocated so far are freed (stream-ordered): back to the driver now.
            let _ = stream.synchronize();
        }
        allocated
    }

    fn alloc_on(stream: &Arc<CudaStream>, width: usize) -> Result<Self, String> {
        let zeros = |n: usize| cu("allocating device memory", stream.alloc_zeros::<f32>(n));
        let mut tensors = Vec::new();
        for t in expected_tensors(width) {
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
        Ok(Self { stream: Arc::clone(stream), width, embed, layers, head })
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
    /// each tensor is in them), into the tensors they belong to. Asynchronous on the weights'
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

    /// Frees the tensors and synchronises their stream, so that the memory is back with the
    /// driver when this returns.
    fn free(self) -> Result<(), String> {
        let stream = Arc::clone(&self.stream);
        drop(self); // frees the tensors (stream-ordered)
        cu("synchronising after freeing GPU memory", stream.synchronize())
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
pub struct CudaModel {
    name: String,
    bytes: u64,
    /// `None` once released (in `Drop`).
    weights: Option<Weights>,
    /// The backend's idle workspaces.
    workspaces: Arc<Mutex<Vec<Workspace>>>,
    ctx: Arc<CudaContext>,
    stats: Arc<BackendStats>,
    tier: Option<Arc<WarmTier<PinnedWeights>>>,
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
        if let Some(tier) = &self.tier {
            tier.released(&self.name);
        }
        if let Err(e) = self.ctx.bind_to_thread() {
            log::warn!("model {}: binding the CUDA context to free its memory failed: {e}", self.name);
        }
        if let Some(weights) = self.weights.take() {
            if let Err(e) = weights.free() {
                log::warn!("model {}: {e}", self.name);
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
mod tests;
