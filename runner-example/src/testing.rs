//! A counting backend for unit tests.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::{Backend, BackendError, BoxFuture, LoadedModel};

/// A backend that sleeps like [`crate::backend::SimBackend`] and counts what it does.
#[derive(Default)]
pub(crate) struct TestBackend {
    load: Duration,
    infer: Duration,
    started: Mutex<HashMap<String, usize>>,
    completed: Mutex<HashMap<String, usize>>,
    failing: Mutex<HashSet<String>>,
    panicking: Mutex<HashSet<String>>,
    bytes: AtomicU64,
    sizes: Mutex<HashMap<String, Sizes>>,
    live: Arc<Gauge>,
    infers: Arc<Gauge>,
    device: Option<Arc<FakeDevice>>,
}

/// A fake device memory, for models whose release blocks (like GPU memory): dropping a model
/// takes `release` (a real sleep, on the thread that drops it) before its bytes are free, and
/// every load checks, as it starts, that its bytes fit beside the bytes still live.
#[derive(Default)]
pub(crate) struct FakeDevice {
    budget: u64,
    release: Duration,
    live: AtomicU64,
    max_live: AtomicU64,
    /// Loads that started while the live bytes plus their own were over the budget.
    overcommits: AtomicUsize,
}

impl FakeDevice {
    /// Most bytes live at once.
    pub(crate) fn max_live(&self) -> u64 {
        self.max_live.load(Ordering::SeqCst)
    }

    /// Bytes live now.
    pub(crate) fn live(&self) -> u64 {
        self.live.load(Ordering::SeqCst)
    }

    /// Loads that started without room on the device.
    pub(crate) fn overcommits(&self) -> usize {
        self.overcommits.load(Ordering::SeqCst)
    }

    fn upload(&self, bytes: u64) {
        let live = self.live.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.max_live.fetch_max(live, Ordering::SeqCst);
        if live > self.budget {
            self.overcommits.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn free(&self, bytes: u64) {
        std::thread::sleep(self.release);
        self.live.fetch_sub(bytes, Ordering::SeqCst);
    }
}

/// A model's (size hint, resident bytes once loaded).
type Sizes = (Option<u64>, Option<u64>);

/// A level that remembers its maximum.
#[derive(Default)]
pub(crate) struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Gauge {
    fn up(&self) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
    }
    fn down(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

fn count(map: &Mutex<HashMap<String, usize>>, model: &str) -> usize {
    map.lock().unwrap().get(model).copied().unwrap_or(0)
}

impl TestBackend {
    pub(crate) fn new(load: Duration, infer: Duration) -> Arc<Self> {
        Arc::new(Self { load, infer, ..Self::default() })
    }

    /// A backend whose models live on a [`FakeDevice`] of `budget` bytes, released in
    /// `release` each; the models' sizes come from [`TestBackend::set_size`].
    pub(crate) fn on_device(load: Duration, infer: Duration, budget: u64, release: Duration) -> Arc<Self> {
        let device = Arc::new(FakeDevice { budget, release, ..FakeDevice::default() });
        Arc::new(Self { load, infer, device: Some(device), ..Self::default() })
    }

    /// The fake device, for a backend made by [`TestBackend::on_device`].
    pub(crate) fn device(&self) -> Option<&FakeDevice> {
        self.device.as_deref()
    }

    /// Inferences running now.
    pub(crate) fn infers(&self) -> usize {
        self.infers.now.load(Ordering::SeqCst)
    }

    /// Loads of `model` started.
    pub(crate) fn loads(&self, model: &str) -> usize {
        count(&self.started, model)
    }

    /// Loads of `model` that ran to their end.
    pub(crate) fn completed(&self, model: &str) -> usize {
        count(&self.completed, model)
    }

    /// Makes loads of `model` fail (or succeed again).
    pub(crate) fn set_failing(&self, model: &str, failing: bool) {
        let mut set = self.failing.lock().unwrap();
        if failing {
            set.insert(model.to_string());
        } else {
            set.remove(model);
        }
    }

    /// Makes loads of `model` panic.
    pub(crate) fn set_panicking(&self, model: &str) {
        self.panicking.lock().unwrap().insert(model.to_string());
    }

    /// Makes loaded models report this many resident bytes.
    pub(crate) fn set_bytes(&self, bytes: u64) {
        self.bytes.store(bytes, Ordering::SeqCst);
    }

    /// Makes `model` hint `hint` bytes before loading and report `resident` bytes once
    /// loaded (overriding [`TestBackend::set_bytes`]).
    pub(crate) fn set_size(&self, model: &str, hint: Option<u64>, resident: Option<u64>) {
        self.sizes.lock().unwrap().insert(model.to_string(), (hint, resident));
    }

    /// Loaded models alive now (not yet dropped by the cache).
    pub(crate) fn live(&self) -> usize {
        self.live.now.load(Ordering::SeqCst)
    }

    /// Most loaded models alive at once.
    pub(crate) fn max_live(&self) -> usize {
        self.live.max.load(Ordering::SeqCst)
    }

    /// Most inferences running at once.
    pub(crate) fn max_infers(&self) -> usize {
        self.infers.max.load(Ordering::SeqCst)
    }
}

impl Backend for TestBackend {
    fn load(
        self: Arc<Self>,
        model: String,
    ) -> BoxFuture<'static, Result<Arc<dyn LoadedModel>, BackendError>> {
        Box::pin(async move {
            *self.started.lock().unwrap().entry(model.clone()).or_default() += 1;
            let on_device = self.device.clone().zip(self.size_hint(&model));
            if let Some((device, bytes)) = &on_device {
                device.upload(*bytes);
            }
            tokio::time::sleep(self.load).await;
            *self.completed.lock().unwrap().entry(model.clone()).or_default() += 1;
            #[allow(clippy::panic)]
            if self.panicking.lock().unwrap().contains(&model) {
                panic!("test backend panics loading {model}");
            }
            if self.failing.lock().unwrap().contains(&model) {
                if let Some((device, bytes)) = on_device {
                    device.free(bytes);
                }
                return Err(BackendError::Failed("test failure".into()));
            }
            self.live.up();
            let bytes = self.bytes.load(Ordering::SeqCst);
            let bytes = match self.sizes.lock().unwrap().get(&model) {
                Some(&(_, resident)) => resident,
                None => (bytes > 0).then_some(bytes),
            };
            let loaded: Arc<dyn LoadedModel> = Arc::new(TestModel {
                name: model,
                infer: self.infer,
                bytes,
                live: self.live.clone(),
                infers: self.infers.clone(),
                device: on_device,
            });
            Ok(loaded)
        })
    }

    fn size_hint(&self, model: &str) -> Option<u64> {
        self.sizes.lock().unwrap().get(model).and_then(|&(hint, _)| hint)
    }

    /// Models named `nope-*` do not exist.
    fn lookup(&self, model: &str) -> Result<Option<u64>, BackendError> {
        if model.starts_with("nope-") {
            return Err(BackendError::NotFound(format!("no model {model}")));
        }
        Ok(self.size_hint(model))
    }
}

struct TestModel {
    name: String,
    infer: Duration,
    bytes: Option<u64>,
    live: Arc<Gauge>,
    infers: Arc<Gauge>,
    device: Option<(Arc<FakeDevice>, u64)>,
}

impl Drop for TestModel {
    fn drop(&mut self) {
        if let Some((device, bytes)) = &self.device {
            device.free(*bytes);
        }
        self.live.down();
    }
}

impl LoadedModel for TestModel {
    /// Like work on [`crate::backend::blocking`], the inference goes on when the future is
    /// dropped.
    fn infer(self: Arc<Self>, prompt: String) -> BoxFuture<'static, Result<String, BackendError>> {
        let work = tokio::spawn(async move {
            self.infers.up();
            tokio::time::sleep(self.infer).await;
            self.infers.down();
            if prompt == "bad" {
                return Err(BackendError::InvalidInput("bad prompt".into()));
            }
            Ok(format!("{}:{prompt}", self.name))
        });
        Box::pin(async move { work.await.unwrap_or_else(|e| Err(BackendError::Failed(e.to_string()))) })
    }

    fn resident_bytes(&self) -> Option<u64> {
        self.bytes
    }

    fn release_blocks(&self) -> bool {
        self.device.is_some()
    }
}
