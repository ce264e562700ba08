//! The runner proper, free of HTTP: model cache, inference concurrency limit, in-flight
//! count, draining flag, and the `/hints` report.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hint_router_core::wire::HintsReport;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::backend::{Backend, BackendError};
use crate::cache::{CacheOutcome, LoadFailed, ModelCache};
use crate::queue::{JobQueue, QueueConfig};

/// The default of [`RunnerConfig::max_queue`] (`--max-queue`).
pub const DEFAULT_MAX_QUEUE: u32 = 64;

/// The default of [`RunnerConfig::max_connections`] (`--max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;

/// How a runner is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerConfig {
    /// The runner's identity (`x-runner-id`, `/hints` `runner`): the address it is reached at.
    pub advertise: String,
    /// How many models the cache holds at most (at least 1).
    pub capacity: u32,
    /// How many inferences run at once (at least 1); more requests wait, first come first
    /// served.
    pub max_concurrency: u32,
    /// How many requests may wait (for a model load or an inference slot) beside the
    /// `max_concurrency` running ones; a request beyond is refused at once
    /// ([`InferError::Overloaded`]).
    pub max_queue: u32,
    /// How many connections the server keeps open at once (at least 1; see
    /// [`serve`](crate::server::serve)).
    pub max_connections: u32,
    /// After a failed load, how long requests for that model fail at once before the next
    /// one retries the load.
    pub load_fail_backoff: Duration,
    /// The most bytes the cached models may take together (see [`ModelCache`]); `None`: no
    /// limit but `capacity`.
    pub memory_budget_bytes: Option<u64>,
    /// The fal queue (docs/queue.md): `Some` serves `/queue/...` and reports a `queue_token`
    /// in `/hints`; `None` (`--no-queue`) does neither.
    pub queue: Option<QueueConfig>,
}

impl RunnerConfig {
    /// A configuration with the CLI's defaults and the given identity.
    pub fn new(advertise: impl Into<String>) -> Self {
        Self {
            advertise: advertise.into(),
            capacity: 3,
            max_concurrency: 4,
            max_queue: DEFAULT_MAX_QUEUE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            load_fail_backoff: Duration::from_millis(1000),
            memory_budget_bytes: None,
            queue: Some(QueueConfig::default()),
        }
    }
}

/// A finished inference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inference {
    /// What the model answered.
    pub output: String,
    /// Whether the model was resident when the request came.
    pub cache: CacheOutcome,
    /// Time spent waiting for a cache slot and for an inference slot.
    pub queue: Duration,
    /// Of `queue`, the time spent waiting for an inference slot (the model ready).
    pub slot_wait: Duration,
    /// Time spent waiting for the model to load.
    pub load: Duration,
    /// Time the inference itself took.
    pub infer: Duration,
}

/// An inference about to start, as [`Runner::infer_admitted_with`] tells its `on_start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Starting {
    /// Whether the model was resident when the request came ([`Inference::cache`]).
    pub cache: CacheOutcome,
    /// Time spent waiting for a cache slot and for an inference slot ([`Inference::queue`]).
    pub queue: Duration,
    /// Time spent waiting for the model to load ([`Inference::load`]).
    pub load: Duration,
}

/// Why an inference request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InferError {
    /// The model could not be loaded (now, or recently: see [`LoadFailed::retry_after`]).
    Load(LoadFailed),
    /// The model is loaded but the inference failed.
    Infer(BackendError),
    /// The runner is shutting down and takes no more work.
    Closed,
    /// `max_concurrency + max_queue` requests are in progress already: refused before
    /// anything ran, so another runner may take it.
    Overloaded,
    /// The caller gave the request up as its inference was about to start (the `on_start`
    /// of [`Runner::infer_admitted_with`] said no): nothing ran.
    Cancelled,
}

impl std::fmt::Display for InferError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InferError::Load(e) => e.fmt(f),
            InferError::Infer(e) => write!(f, "inference failed: {e}"),
            InferError::Closed => f.write_str("the runner is shutting down"),
            InferError::Overloaded => f.write_str("the runner's queue is full; nothing was run"),
            InferError::Cancelled => f.write_str("the request was cancelled before it ran"),
        }
    }
}

impl std::error::Error for InferError {}

/// The runner. Cheap to clone: clones share one runner.
#[derive(Clone, Debug)]
pub struct Runner {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: RunnerConfig,
    cache: ModelCache,
    /// For its `warm` list (the cache holds it for loads).
    backend: Arc<dyn Backend>,
    /// Inference slots: `max_concurrency`.
    permits: Arc<Semaphore>,
    /// Request slots: `max_concurrency + max_queue`, one per [`Admission`].
    admissions: Arc<Semaphore>,
    in_flight: Arc<AtomicU32>,
    refused: AtomicU64,
    connections_refused: AtomicU64,
    draining: AtomicBool,
    /// The fal queue's jobs and token; `None` without [`RunnerConfig::queue`].
    queue: Option<Arc<JobQueue>>,
}

/// A request let in: holds one of the runner's `max_concurrency + max_queue` request slots
/// and counts in `in_flight`, until dropped. It lives as long as the request's work, not
/// the client's patience: an inference whose client went away keeps it until it has ended.
#[derive(Debug)]
pub struct Admission {
    _slot: OwnedSemaphorePermit,
    in_flight: Arc<AtomicU32>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn to_usize(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl Runner {
    /// A runner serving models of `backend`.
    pub fn new(config: RunnerConfig, backend: Arc<dyn Backend>) -> Self {
        let capacity = config.capacity.max(1);
        let max_concurrency = config.max_concurrency.max(1);
        let max_connections = config.max_connections.max(1);
        let config = RunnerConfig { capacity, max_concurrency, max_connections, ..config };
        let cache = ModelCache::with_memory_budget(
            Arc::clone(&backend),
            to_usize(capacity),
            config.memory_budget_bytes,
            config.load_fail_backoff,
        );
        let permits = Semaphore::new(to_usize(max_concurrency).min(Semaphore::MAX_PERMITS));
        let requests = max_concurrency.saturating_add(config.max_queue);
        let admissions = Semaphore::new(to_usize(requests).min(Semaphore::MAX_PERMITS));
        let queue = config.queue.as_ref().and_then(JobQueue::open);
        Self {
            inner: Arc::new(Inner {
                config,
                cache,
                backend,
                permits: Arc::new(permits),
                admissions: Arc::new(admissions),
                in_flight: Arc::new(AtomicU32::new(0)),
                refused: AtomicU64::new(0),
                connections_refused: AtomicU64::new(0),
                draining: AtomicBool::new(false),
                queue,
            }),
        }
    }

    /// The configuration in force (capacity and concurrency at least 1).
    pub fn config(&self) -> &RunnerConfig {
        &self.inner.config
    }

    /// The runner's identity.
    pub fn advertise(&self) -> &str {
        &self.inner.config.advertise
    }

    /// The model cache.
    pub fn cache(&self) -> &ModelCache {
        &self.inner.cache
    }

    /// The fal queue, unless disabled ([`RunnerConfig::queue`]).
    pub fn queue(&self) -> Option<&Arc<JobQueue>> {
        self.inner.queue.as_ref()
    }

    /// Lets a request in, when fewer than `max_concurrency + max_queue` are in progress;
    /// else counts a refusal and returns [`InferError::Overloaded`]. Never waits.
    pub fn admit(&self) -> Result<Admission, InferError> {
        let inner = &*self.inner;
        match Arc::clone(&inner.admissions).try_acquire_owned() {
            Ok(slot) => {
                inner.in_flight.fetch_add(1, Ordering::SeqCst);
                Ok(Admission { _slot: slot, in_flight: Arc::clone(&inner.in_flight) })
            }
            Err(_) => {
                inner.refused.fetch_add(1, Ordering::SeqCst);
                Err(InferError::Overloaded)
            }
        }
    }

    /// [`Runner::admit`], then [`Runner::infer_admitted`].
    pub async fn infer(&self, model: &str, prompt: String) -> Result<Inference, InferError> {
        let admission = self.admit()?;
        self.infer_admitted(admission, model, None, prompt).await
    }

    /// Runs `prompt` on `model` for a request let in by [`Runner::admit`]: pins the model
    /// (loading it on a miss), waits for an inference slot, runs the inference. The request
    /// counts in `in_flight` throughout.
    ///
    /// Loads do not hold an inference slot. Dropping the future while the request waits
    /// cancels it (but not a load it started). Once the inference has started it runs in a
    /// task of its own that holds the inference slot, the model's pin and the admission
    /// until the backend's work has really ended: dropping the future (a client that went
    /// away) only stops waiting for the answer. So no more than `max_concurrency` inferences
    /// ever run, and no model is evicted while one runs on it.
    pub async fn infer_admitted(
        &self,
        admission: Admission,
        model: &str,
        evict: Option<&str>,
        prompt: String,
    ) -> Result<Inference, InferError> {
        self.infer_admitted_with(admission, model, evict, prompt, |_| true).await
    }

    /// [`Runner::infer_admitted`], calling `on_start` at the moment the inference starts (the
    /// model pinned and loaded, an inference slot held), before the backend is asked: a queued
    /// job turns IN_PROGRESS exactly then. When it answers `false` nothing runs, the slot, the
    /// pin and the admission go, and the call fails with [`InferError::Cancelled`]: a job
    /// cancelled just before cannot slip into an inference.
    pub async fn infer_admitted_with(
        &self,
        admission: Admission,
        model: &str,
        evict: Option<&str>,
        prompt: String,
        on_start: impl FnOnce(&Starting) -> bool + Send,
    ) -> Result<Inference, InferError> {
        let inner = &*self.inner;
        let lease = inner.cache.acquire_evicting(model, evict).await.map_err(InferError::Load)?;
        let waited_from = Instant::now();
        let permit = Arc::clone(&inner.permits).acquire_owned().await.map_err(|_| InferError::Closed)?;
        let started = Instant::now();
        let (cache, load) = (lease.outcome(), lease.loading());
        let slot_wait = started.saturating_duration_since(waited_from);
        let queue = lease.queued() + slot_wait;
        if !on_start(&Starting { cache, queue, load }) {
            return Err(InferError::Cancelled);
        }
        let loaded = Arc::clone(lease.model());
        let work = tokio::spawn(async move {
            let output = loaded.infer(prompt).await;
            let infer = started.elapsed();
            // The slot first (the next request may start), then the pin, then the admission:
            // in_flight counts the request until all of it is over.
            drop(permit);
            drop(lease);
            drop(admission);
            (output, infer)
        });
        let (output, infer) = match work.await {
            Ok(done) => done,
            Err(e) => (Err(BackendError::Failed(format!("inference task failed: {e}"))), started.elapsed()),
        };
        Ok(Inference { output: output.map_err(InferError::Infer)?, cache, queue, slot_wait, load, infer })
    }

    /// Requests refused by [`Runner::admit`] so far.
    pub fn refused_total(&self) -> u64 {
        self.inner.refused.load(Ordering::SeqCst)
    }

    /// Counts a connection closed unread because `max_connections` were open.
    pub fn count_refused_connection(&self) {
        self.inner.connections_refused.fetch_add(1, Ordering::SeqCst);
    }

    /// Connections closed unread so far because `max_connections` were open.
    pub fn connections_refused_total(&self) -> u64 {
        self.inner.connections_refused.load(Ordering::SeqCst)
    }

    /// Inferences running now (holding an inference slot).
    pub fn running(&self) -> u32 {
        let free = self.inner.permits.available_permits();
        let all = to_usize(self.inner.config.max_concurrency).min(Semaphore::MAX_PERMITS);
        u32::try_from(all.saturating_sub(free)).unwrap_or(u32::MAX)
    }

    /// Requests inside [`Runner::infer`] now, queued or running.
    pub fn in_flight(&self) -> u32 {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Marks the runner as draining: it advertises no hints from now on and `/healthz`
    /// fails, so routers send it nothing new. Requests still arriving are served.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// Whether [`Runner::start_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// The advertised hints: models queued for a cache slot, then loading and resident ones,
    /// most recently used first ([`crate::cache::CacheSnapshot::hints`]); none while draining.
    pub fn hints(&self) -> Vec<String> {
        if self.is_draining() {
            Vec::new()
        } else {
            self.inner.cache.snapshot().hints
        }
    }

    /// The `GET /hints` document.
    pub fn report(&self) -> HintsReport {
        let draining = self.is_draining();
        let snap = if draining { Default::default() } else { self.inner.cache.snapshot() };
        HintsReport {
            runner: self.inner.config.advertise.clone(),
            hints: snap.hints,
            loading: snap.loading,
            capacity: self.inner.config.capacity,
            in_flight: self.in_flight(),
            max_concurrency: self.inner.config.max_concurrency,
            draining,
            resident_bytes: snap.resident_bytes,
            memory_budget_bytes: self.inner.cache.memory_budget(),
            warm: if draining { Vec::new() } else { self.inner.backend.warm() },
            // Reported while draining too: the jobs accepted before must still reach us.
            queue_token: self.queue().map(|queue| hint_router_core::queue::format_token(queue.token())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestBackend;

    const LOAD: Duration = Duration::from_millis(100);
    const INFER: Duration = Duration::from_millis(10);

    fn runner(backend: &Arc<TestBackend>, capacity: u32, max_concurrency: u32) -> Runner {
        Runner::new(
            RunnerConfig { capacity, max_concurrency, ..RunnerConfig::new("127.0.0.1:1") },
            backend.clone(),
        )
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reports_timings_and_outcome() {
        let backend = TestBackend::new(LOAD, INFER);
        let runner = runner(&backend, 2, 1);
        let first = runner.infer("a", "p".into()).await.unwrap();
        assert_eq!(
            first,
            Inference {
                output: "a:p".into(),
                cache: CacheOutcome::Miss,
                queue: Duration::ZERO,
                slot_wait: Duration::ZERO,
                load: LOAD,
                infer: INFER,
            }
        );
        let second = runner.infer("a", "q".into()).await.unwrap();
        assert_eq!(second.cache, CacheOutcome::Hit);
        assert_eq!(second.load, Duration::ZERO);
        assert_eq!(second.output, "a:q");
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_concurrency_inferences_run_and_the_rest_queue() {
        let backend = TestBackend::new(LOAD, INFER);
        let runner = runner(&backend, 3, 2);
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let runner = runner.clone();
                let model = ["a", "b", "c"][i % 3];
                tokio::spawn(async move { runner.infer(model, String::new()).await })
            })
            .collect();
        settle().await;
        assert_eq!(runner.in_flight(), 12);
        assert_eq!(runner.report().in_flight, 12);
        let (mut queues, mut slot_waits) = (Vec::new(), Vec::new());
        for task in tasks {
            let done = task.await.unwrap().unwrap();
            queues.push(done.queue);
            slot_waits.push(done.slot_wait);
        }
        slot_waits.sort();
        assert_eq!(backend.max_infers(), 2);
        assert_eq!(runner.in_flight(), 0);
        // All models loaded together, then inferences ran two at a time: 6 rounds.
        queues.sort();
        assert_eq!(queues.first(), Some(&Duration::ZERO));
        assert_eq!(queues.last(), Some(&(INFER * 5)));
        // Every model was resident or loading for all of them: the queue was all slot wait.
        assert_eq!(slot_waits, queues);
    }

    #[tokio::test(start_paused = true)]
    async fn loads_do_not_hold_inference_slots() {
        let backend = TestBackend::new(LOAD, LOAD * 10);
        let runner = runner(&backend, 2, 1);
        runner.infer("a", String::new()).await.unwrap();
        let long = tokio::spawn({
            let runner = runner.clone();
            async move { runner.infer("a", String::new()).await }
        });
        settle().await;
        // a's inference holds the only slot; b still loads meanwhile.
        let start = Instant::now();
        let b = tokio::spawn({
            let runner = runner.clone();
            async move { runner.infer("b", String::new()).await }
        });
        settle().await;
        assert_eq!(runner.report().loading, ["b"]);
        tokio::time::sleep(LOAD).await;
        settle().await;
        assert_eq!(backend.completed("b"), 1);
        assert!(runner.report().loading.is_empty());
        let b = b.await.unwrap().unwrap();
        assert_eq!(b.load, LOAD);
        assert_eq!(b.queue, LOAD * 9);
        assert_eq!(b.slot_wait, LOAD * 9, "it waited for the slot, not for a cache slot");
        assert_eq!(start.elapsed(), LOAD * 20);
        long.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_counts_requests_waiting_for_a_load() {
        let backend = TestBackend::new(LOAD, INFER);
        let runner = runner(&backend, 1, 1);
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let runner = runner.clone();
                tokio::spawn(async move { runner.infer("a", String::new()).await })
            })
            .collect();
        settle().await;
        let report = runner.report();
        assert_eq!(report.in_flight, 3);
        assert_eq!(report.hints, ["a"]);
        assert_eq!(report.loading, ["a"]);
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(runner.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_requests_leave_in_flight() {
        let backend = TestBackend::new(LOAD, INFER);
        let runner = runner(&backend, 1, 1);
        let task = tokio::spawn({
            let runner = runner.clone();
            async move { runner.infer("a", String::new()).await }
        });
        settle().await;
        assert_eq!(runner.in_flight(), 1);
        task.abort();
        settle().await;
        assert_eq!(runner.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_told_apart() {
        let backend = TestBackend::new(LOAD, INFER);
        backend.set_failing("x", true);
        let runner = runner(&backend, 1, 1);
        let err = runner.infer("x", String::new()).await.unwrap_err();
        assert!(matches!(&err, InferError::Load(f) if f.model == "x"), "{err:?}");
        assert!(err.to_string().starts_with("loading model x failed:"));
        let err = runner.infer("a", "bad".into()).await.unwrap_err();
        assert!(matches!(err, InferError::Infer(BackendError::InvalidInput(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn draining_hides_hints() {
        let backend = TestBackend::new(LOAD, INFER);
        let runner = runner(&backend, 2, 1);
        runner.infer("a", String::new()).await.unwrap();
        let report = runner.report();
        assert_eq!(report.hints, ["a"]);
        assert!(!report.draining);
        assert_eq!(report.capacity, 2);
        assert_eq!(report.max_concurrency, 1);
        assert_eq!(report.runner, "127.0.0.1:1");
        runner.start_draining();
        let report = runner.report();
        assert!(report.draining);
        assert!(report.hints.is_empty());
        assert!(runner.hints().is_empty());
        // Still serves what reaches it.
        runner.infer("a", String::new()).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn reports_the_memory_budget_and_resident_bytes() {
        let backend = TestBackend::new(LOAD, INFER);
        backend.set_size("a", Some(40), Some(40));
        backend.set_size("b", Some(40), Some(40));
        let runner = Runner::new(
            RunnerConfig { capacity: 5, memory_budget_bytes: Some(60), ..RunnerConfig::new("127.0.0.1:1") },
            backend.clone(),
        );
        let report = runner.report();
        assert_eq!((report.resident_bytes, report.memory_budget_bytes), (None, Some(60)));
        runner.infer("a", String::new()).await.unwrap();
        runner.infer("b", String::new()).await.unwrap();
        let report = runner.report();
        assert_eq!(report.hints, ["b"]);
        assert_eq!((report.resident_bytes, report.memory_budget_bytes), (Some(40), Some(60)));
    }

    /// Issue 9, item 4: a request that goes away mid-inference (Envoy reset the stream) keeps
    /// its inference slot and its model's pin until the backend's work has really ended.
    #[tokio::test(start_paused = true)]
    async fn a_request_dropped_mid_inference_keeps_its_slot_and_its_pin_until_the_work_ends() {
        let backend = TestBackend::new(LOAD, INFER * 10);
        let runner = runner(&backend, 1, 1);
        let first = tokio::spawn({
            let runner = runner.clone();
            async move { runner.infer("a", String::new()).await }
        });
        tokio::time::sleep(LOAD + INFER).await;
        assert_eq!(backend.infers(), 1);
        first.abort(); // the client went away; the inference goes on
        settle().await;
        assert_eq!(backend.infers(), 1);
        assert_eq!(runner.in_flight(), 1, "the work still counts");
        assert_eq!(runner.running(), 1);
        let second = tokio::spawn({
            let runner = runner.clone();
            async move { runner.infer("a", String::new()).await }
        });
        let other = tokio::spawn({
            let runner = runner.clone();
            async move { runner.infer("b", String::new()).await }
        });
        tokio::time::sleep(INFER * 4).await;
        assert_eq!(backend.max_infers(), 1, "more than max_concurrency inferences ran");
        assert_eq!(backend.loads("b"), 0, "the model in use was evicted");
        assert_eq!(runner.hints(), ["b", "a"], "b waits for a's slot, advertised");
        let second = second.await.unwrap().unwrap();
        // It waited for the orphaned inference: 9 INFER of it were left when it came.
        assert_eq!(second.queue, INFER * 9);
        other.await.unwrap().unwrap();
        assert_eq!(backend.max_infers(), 1);
        assert_eq!(runner.in_flight(), 0);
    }

    /// Issue 9, item 6: beyond `max_concurrency + max_queue` requests in progress, a request
    /// is refused at once, and counted.
    #[tokio::test(start_paused = true)]
    async fn a_full_runner_refuses_at_once_and_counts_it() {
        let backend = TestBackend::new(LOAD, INFER);
        let runner = Runner::new(
            RunnerConfig {
                capacity: 2,
                max_concurrency: 2,
                max_queue: 3,
                ..RunnerConfig::new("127.0.0.1:1")
            },
            backend.clone(),
        );
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let runner = runner.clone();
                tokio::spawn(async move { runner.infer("a", String::new()).await })
            })
            .collect();
        settle().await;
        assert_eq!(runner.in_flight(), 5);
        let start = Instant::now();
        assert_eq!(runner.infer("a", String::new()).await.unwrap_err(), InferError::Overloaded);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(runner.refused_total(), 1);
        assert_eq!(runner.in_flight(), 5);
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        // Room again.
        runner.infer("a", String::new()).await.unwrap();
        assert_eq!(runner.refused_total(), 1);
        // No queue at all: only max_concurrency requests at once.
        let strict = Runner::new(
            RunnerConfig { max_concurrency: 1, max_queue: 0, ..RunnerConfig::new("127.0.0.1:1") },
            backend.clone(),
        );
        let admitted = strict.admit().unwrap();
        assert_eq!(strict.admit().unwrap_err(), InferError::Overloaded);
        drop(admitted);
        assert!(strict.admit().is_ok());
    }

    #[test]
    fn zero_capacity_and_concurrency_become_one() {
        let backend = TestBackend::new(LOAD, INFER);
        let runner = runner(&backend, 0, 0);
        assert_eq!(runner.config().capacity, 1);
        assert_eq!(runner.config().max_concurrency, 1);
    }
}
