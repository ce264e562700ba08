//! The model backend: what loads a model and runs inference with it.
//!
//! The runner's cache and HTTP layer only see the [`Backend`] and [`LoadedModel`] traits, so a
//! real backend (safetensors weights on CPU or CUDA) plugs in beside the simulated one,
//! [`SimBackend`], without touching them.
//!
//! Both traits hand back `'static` boxed futures, and take `self: Arc<Self>` and owned
//! arguments, so an implementation can move everything it needs into a
//! [`tokio::task::spawn_blocking`] closure; [`blocking`] does exactly that and maps a panic in
//! the closure to a [`BackendError`]. A real backend's load (disk reads, device copies) and
//! inference (kernel launches, synchronisation) are blocking work and should go through it.
//!
//! Dropping the last `Arc<dyn LoadedModel>` is how the cache evicts a model: a real backend
//! frees its host or device memory in `Drop`, synchronously (see
//! [`LoadedModel::release_blocks`]), so that the memory is free once the drop returned. The
//! runner holds a model's pin until every inference on it has really ended, even one whose
//! client went away, so the last `Arc` never goes while the model still computes.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A boxed, `Send` future, as the backend traits return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a backend could not load a model or run inference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// The backend does not know this model (no weights by that name). Answered with 404.
    NotFound(String),
    /// The request's input is unusable for this model (e.g. a prompt it cannot tokenize).
    /// Answered with 400.
    InvalidInput(String),
    /// Any other failure: an I/O error, a corrupt weights file, running out of memory, a
    /// crashed kernel... Answered with 503 for a load, 500 for an inference.
    Failed(String),
    /// The model can never fit: it is bigger than the cache's whole memory budget. Answered
    /// with 507.
    TooLarge(String),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::NotFound(msg) => write!(f, "not found: {msg}"),
            BackendError::InvalidInput(msg) => write!(f, "invalid input: {msg}"),
            BackendError::Failed(msg) => f.write_str(msg),
            BackendError::TooLarge(msg) => write!(f, "too large: {msg}"),
        }
    }
}

impl std::error::Error for BackendError {}

/// Loads models. One instance serves the whole runner, from many tasks at once.
pub trait Backend: Send + Sync + 'static {
    /// Loads `model` into memory, ready for inference.
    ///
    /// The cache calls this at most once at a time per model (single flight), in a task of its
    /// own: the returned future runs to completion even when every request that wanted the
    /// model has gone away. It should not be cancelled part-way by anything but process exit.
    fn load(self: Arc<Self>, model: String)
        -> BoxFuture<'static, Result<Arc<dyn LoadedModel>, BackendError>>;

    /// How many bytes `model` will take once loaded, when the backend can tell before loading
    /// it (from a manifest, a file size...); `None` when it cannot, or does not know the model.
    ///
    /// The cache asks before every load, to make room under its memory budget; a model of
    /// unknown size is admitted as if it took nothing, and counted at its
    /// [`LoadedModel::resident_bytes`] once loaded. Must be quick and must not block: no I/O.
    fn size_hint(&self, model: &str) -> Option<u64> {
        let _ = model;
        None
    }

    /// Whether `model` exists, and its size when known ([`Backend::size_hint`]), asked before a
    /// load is admitted: `Err` (normally [`BackendError::NotFound`]) means "never try loading
    /// it", so the cache answers at once and evicts nothing for it. Must be quick and must not
    /// block: no I/O (a manifest read at start is the way).
    ///
    /// The default, for a backend that cannot tell before loading, is `Ok(size_hint)`: every
    /// name is worth a load.
    fn lookup(&self, model: &str) -> Result<Option<u64>, BackendError> {
        Ok(self.size_hint(model))
    }

    /// Models not resident that the backend can load cheaply (from host memory, no disk read:
    /// the warm tier, `--host-cache-mb`), most recently used first; reported as `warm` in
    /// `/hints`. Must be quick and must not block.
    fn warm(&self) -> Vec<String> {
        Vec::new()
    }
}

impl fmt::Debug for dyn Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn Backend")
    }
}

/// A model held in memory by a [`Backend`].
pub trait LoadedModel: Send + Sync + 'static {
    /// Runs one inference on `prompt` and returns the output text.
    ///
    /// The runner calls this at most `--max-concurrency` times at once across all models.
    fn infer(self: Arc<Self>, prompt: String) -> BoxFuture<'static, Result<String, BackendError>>;

    /// Bytes of memory (host or device) this model's weights take, when the backend knows;
    /// `None` leaves `resident_bytes` out of `/hints`.
    fn resident_bytes(&self) -> Option<u64> {
        None
    }

    /// Whether dropping this model blocks until its memory is really released (device memory
    /// that is freed stream-ordered and synchronised). When `true`, the cache drops an evicted
    /// model on tokio's blocking pool, and keeps counting its bytes (and its slot) as held
    /// until the drop returned, so that no load is admitted into memory that is not free yet.
    /// When `false` (the default), dropping is quick and the cache drops it inline.
    fn release_blocks(&self) -> bool {
        false
    }
}

/// Runs blocking work `f` on tokio's blocking thread pool, as a [`BoxFuture`] a backend can
/// return. A panic inside `f` becomes [`BackendError::Failed`].
pub fn blocking<T, F>(f: F) -> BoxFuture<'static, Result<T, BackendError>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, BackendError> + Send + 'static,
{
    Box::pin(async move {
        match tokio::task::spawn_blocking(f).await {
            Ok(result) => result,
            Err(e) => Err(BackendError::Failed(format!("backend task failed: {e}"))),
        }
    })
}

/// Runs a model load `f` on a thread of its own, as a [`BoxFuture`] a backend can return.
/// A panic inside `f` becomes [`BackendError::Failed`].
///
/// Not tokio's blocking pool: a load is long (seconds for big models) and the pool is where
/// inferences run, so loads there could, with many at once, hold threads that hits wait for
/// (the pool is bounded); a thread per load costs a few microseconds next to that.
pub fn loading<T, F>(f: F) -> BoxFuture<'static, Result<T, BackendError>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, BackendError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("model-load".into()).spawn(move || {
        lower_priority();
        let _ = tx.send(f());
    });
    Box::pin(async move {
        if let Err(e) = spawned {
            return Err(BackendError::Failed(format!("cannot start a load thread: {e}")));
        }
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(BackendError::Failed("the load thread panicked".to_string())),
        }
    })
}

/// Makes this thread yield the CPU to the runner's other threads (niceness about 9 on Linux):
/// where cores are short, inferences (hits) go first and loads take what is left. Best effort:
/// a platform that refuses leaves the priority as it was.
pub(crate) fn lower_priority() {
    use thread_priority::{set_current_thread_priority, ThreadPriority, ThreadPriorityValue};
    if let Ok(value) = ThreadPriorityValue::try_from(25u8) {
        if let Err(e) = set_current_thread_priority(ThreadPriority::Crossplatform(value)) {
            log::debug!("cannot lower the priority of a load thread: {e:?}");
        }
    }
}

/// Prefix of the model names [`SimBackend`] fails to load, to test faults.
pub const SIM_FAIL_PREFIX: &str = "fail-";

/// A simulated backend: loading sleeps `load`, inference sleeps `infer`, and nothing is
/// really held in memory.
///
/// Loading any model whose name starts with [`SIM_FAIL_PREFIX`] (`fail-`) fails, after the
/// same delay, with [`BackendError::Failed`]. Every other name loads.
///
/// By default its models report no size (`resident_bytes` stays out of `/hints`);
/// [`SimBackend::with_model_bytes`] makes every model claim a size, so that a memory budget
/// can be tried out with simulated models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimBackend {
    /// How long a load takes.
    pub load: Duration,
    /// How long an inference takes.
    pub infer: Duration,
    /// The size every model claims, if any.
    pub model_bytes: Option<u64>,
}

impl SimBackend {
    /// A simulated backend with the given load and inference times.
    pub fn new(load: Duration, infer: Duration) -> Self {
        Self { load, infer, model_bytes: None }
    }

    /// The same backend, with every model claiming `bytes` bytes (`None`: no size).
    pub fn with_model_bytes(self, bytes: Option<u64>) -> Self {
        Self { model_bytes: bytes, ..self }
    }
}

impl Backend for SimBackend {
    fn load(
        self: Arc<Self>,
        model: String,
    ) -> BoxFuture<'static, Result<Arc<dyn LoadedModel>, BackendError>> {
        Box::pin(async move {
            tokio::time::sleep(self.load).await;
            if model.starts_with(SIM_FAIL_PREFIX) {
                return Err(BackendError::Failed(format!(
                    "simulated load failure (names starting with `{SIM_FAIL_PREFIX}` always fail)"
                )));
            }
            let loaded: Arc<dyn LoadedModel> =
                Arc::new(SimModel { name: model, infer: self.infer, bytes: self.model_bytes });
            Ok(loaded)
        })
    }

    fn size_hint(&self, _model: &str) -> Option<u64> {
        self.model_bytes
    }
}

/// A model "loaded" by [`SimBackend`].
#[derive(Debug)]
struct SimModel {
    name: String,
    infer: Duration,
    bytes: Option<u64>,
}

impl LoadedModel for SimModel {
    fn infer(self: Arc<Self>, prompt: String) -> BoxFuture<'static, Result<String, BackendError>> {
        Box::pin(async move {
            tokio::time::sleep(self.infer).await;
            Ok(sim_output(&self.name, &prompt))
        })
    }

    fn resident_bytes(&self) -> Option<u64> {
        self.bytes
    }
}

/// The simulated output for `prompt` on `model`: a short, stable hash of the two, so clients
/// can check that equal inputs give equal outputs.
pub fn sim_output(model: &str, prompt: &str) -> String {
    // 64-bit FNV-1a over model, a separator byte no model name contains, and prompt.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in model.as_bytes().iter().chain(b"\0").chain(prompt.as_bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("sim-{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sim_loads_and_infers_after_the_configured_delays() {
        let backend = Arc::new(SimBackend::new(Duration::from_millis(2000), Duration::from_millis(50)));
        let start = tokio::time::Instant::now();
        let model = backend.load("m".into()).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(2000));
        assert_eq!(model.resident_bytes(), None);
        let out = model.clone().infer("hi".into()).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(2050));
        assert_eq!(out, sim_output("m", "hi"));
        assert_eq!(out, model.infer("hi".into()).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn sim_models_can_claim_a_size() {
        let backend = Arc::new(SimBackend::new(Duration::ZERO, Duration::ZERO));
        assert_eq!(backend.size_hint("m"), None);
        let backend = Arc::new(backend.with_model_bytes(Some(5)));
        assert_eq!(backend.size_hint("m"), Some(5));
        let model = backend.load("m".into()).await.unwrap();
        assert_eq!(model.resident_bytes(), Some(5));
    }

    #[tokio::test(start_paused = true)]
    async fn sim_fails_models_named_fail() {
        let backend = Arc::new(SimBackend::new(Duration::ZERO, Duration::ZERO));
        let err = backend.load("fail-x".into()).await.err().unwrap();
        assert!(matches!(err, BackendError::Failed(_)), "{err:?}");
    }

    #[test]
    fn sim_output_depends_on_model_and_prompt() {
        assert_ne!(sim_output("a", "b"), sim_output("a", "c"));
        assert_ne!(sim_output("a", "b"), sim_output("b", "b"));
        assert_ne!(sim_output("ab", ""), sim_output("a", "b"));
        assert_eq!(sim_output("a", "b").len(), "sim-".len() + 16);
    }

    #[tokio::test]
    async fn loading_runs_off_the_runtime_and_maps_panics_to_failed() {
        let name = loading(|| Ok(std::thread::current().name().map(str::to_string))).await;
        assert_eq!(name, Ok(Some("model-load".to_string())));
        #[allow(clippy::panic)]
        let err = loading::<(), _>(|| panic!("boom")).await;
        assert!(matches!(err, Err(BackendError::Failed(_))), "{err:?}");
    }

    #[tokio::test]
    async fn blocking_maps_panics_to_failed() {
        let ok = blocking(|| Ok(7)).await;
        assert_eq!(ok, Ok(7));
        #[allow(clippy::panic)]
        let err = blocking::<(), _>(|| panic!("boom")).await;
        assert!(matches!(err, Err(BackendError::Failed(_))), "{err:?}");
    }
}
