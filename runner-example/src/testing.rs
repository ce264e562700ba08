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
            tokio::time::sleep(self.load).await;
            *self.completed.lock().unwrap().entry(model.clone()).or_default() += 1;
            #[allow(clippy::panic)]
            if self.panicking.lock().unwrap().contains(&model) {
                panic!("test backend panics loading {model}");
            }
            if self.failing.lock().unwrap().contains(&model) {
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
            });
            Ok(loaded)
        })
    }

    fn size_hint(&self, model: &str) -> Option<u64> {
        self.sizes.lock().unwrap().get(model).and_then(|&(hint, _)| hint)
    }
}

struct TestModel {
    name: String,
    infer: Duration,
    bytes: Option<u64>,
    live: Arc<Gauge>,
    infers: Arc<Gauge>,
}

impl Drop for TestModel {
    fn drop(&mut self) {
        self.live.down();
    }
}

impl LoadedModel for TestModel {
    fn infer(self: Arc<Self>, prompt: String) -> BoxFuture<'static, Result<String, BackendError>> {
        Box::pin(async move {
            self.infers.up();
            tokio::time::sleep(self.infer).await;
            self.infers.down();
            if prompt == "bad" {
                return Err(BackendError::InvalidInput("bad prompt".into()));
            }
            Ok(format!("{}:{prompt}", self.name))
        })
    }

    fn resident_bytes(&self) -> Option<u64> {
        self.bytes
    }
}
