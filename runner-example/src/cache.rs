//! The bounded model cache: which models are in memory, and who is using them.
//!
//! # Semantics
//!
//! * The cache holds at most `capacity` models, counting both resident models and models
//!   being loaded. It never holds more, not even for a moment.
//! * With a **memory budget**, the models it holds also take at most `budget` bytes together.
//!   A model's size is known before it loads ([`Backend::size_hint`]); it is admitted only
//!   when its size fits beside the resident and loading models (a loading model counts at
//!   its hinted size, a resident one at its [`LoadedModel::resident_bytes`]). To make room,
//!   least-recently-used unpinned resident models are evicted, exactly as for a full cache;
//!   when pinned or loading models are in the way, the request waits the same way. A model
//!   bigger than the whole budget fails at once with [`BackendError::TooLarge`] (never
//!   loaded, never advertised). A model of unknown size counts as 0 bytes until it has
//!   loaded; if it then turns out not to fit, LRU unpinned models are evicted until the cache
//!   is back under budget.
//! * **Nothing is evicted for a model that does not exist.** Before a new model is queued the
//!   backend is asked whether it exists ([`Backend::lookup`]); a model it does not know fails
//!   at once (no queue entry, no eviction, no load, not advertised). Victims are only chosen
//!   when the head of the queue is admitted, i.e. for a load that really starts.
//! * **Evicted memory is free before it is reused.** A model whose drop blocks until its
//!   memory is released ([`LoadedModel::release_blocks`], device memory) is dropped on the
//!   blocking pool, and its slot and bytes count as held until that drop returned: a load
//!   that needs them waits for it.
//! * A request **pins** its model from the moment it asks for it ([`ModelCache::acquire`])
//!   until it drops the returned [`ModelLease`] (the end of its inference). A pinned model is
//!   never evicted.
//! * On a miss with a full cache, the *unpinned resident* model the request asked to evict
//!   ([`ModelCache::acquire_evicting`]: hint-router's `x-hint-router-evict`) is evicted, or,
//!   without one (or when it is pinned, loading or absent), the least-recently-used one. When every slot is pinned or loading, the request waits, without polling, in a
//!   FIFO queue of absent models; the queue's head is admitted as soon as a slot can be made.
//!   Requests for a model already in the queue join its place instead of queueing again.
//! * **Single flight**: all concurrent requests for one absent model share exactly one
//!   [`Backend::load`]. The load runs in a task of its own, so requests that go away (a
//!   client disconnecting drops its request future) do not cancel it; a load that nobody
//!   waits for any more still completes, and the model stays cached (unpinned).
//! * A failed load is removed from the cache (so it is no longer advertised) and every waiter
//!   gets the error. For the next `backoff` after the failure, requests for that model fail
//!   at once with the same error, without a new load; after it, the next request retries.
//! * "Recently used" means asked for or released: both [`ModelCache::acquire`] and dropping a
//!   lease mark a model as used. [`CacheSnapshot::hints`] lists models most recently used
//!   first.
//!
//! The policy (what to admit, evict, answer) is synchronous code without locks or clocks, in
//! `cache/policy.rs`; this file holds it behind one [`std::sync::Mutex`], held for short,
//! non-blocking critical sections only, never across an `.await`, and carries out what the
//! policy returns after the lock is released: evicted models are dropped, and loads spawned,
//! outside it. Single-flight waiting is a [`tokio::sync::watch`] channel per load.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::backend::{Backend, BackendError, LoadedModel};

mod policy;

use policy::{Effects, Found, Limits, Phase, State};

/// Whether a request found its model resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// The model was resident when the request asked for it.
    Hit,
    /// The model was absent or still loading: the request waited for a load.
    Miss,
}

impl CacheOutcome {
    /// `"hit"` or `"miss"`, as in the `x-cache` header and the response body.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
        }
    }
}

/// A model that could not be loaded, now or within the backoff window of an earlier failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadFailed {
    /// The model asked for.
    pub model: String,
    /// What the backend said.
    pub error: BackendError,
    /// How long until a request for this model makes the cache try loading it again.
    pub retry_after: Duration,
}

impl std::fmt::Display for LoadFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "loading model {} failed: {}", self.model, self.error)
    }
}

impl std::error::Error for LoadFailed {}

/// What the cache holds, as advertised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheSnapshot {
    /// Bytes of evicted models whose memory is still being released (counted in
    /// `reserved_bytes`).
    pub releasing_bytes: u64,
    /// Models queued for a cache slot (the next to load first, at most `capacity` of them), then the
    /// loading and resident ones, most recently used first.
    pub hints: Vec<String>,
    /// The models of `hints` that are queued or still loading, in the same order.
    pub loading: Vec<String>,
    /// Sum of [`LoadedModel::resident_bytes`] over resident models, when any model reports it.
    pub resident_bytes: Option<u64>,
    /// Bytes counted against the memory budget: resident models, plus loading ones at their
    /// hinted size.
    pub reserved_bytes: u64,
}

/// A pinned, loaded model. Dropping it unpins the model (and counts as a use for LRU).
pub struct ModelLease {
    // Declared before `_pin`: the lease's reference to the model goes first, so when the
    // unpin evicts this model its memory is released right there.
    model: Arc<dyn LoadedModel>,
    outcome: CacheOutcome,
    queued: Duration,
    loading: Duration,
    _pin: PinGuard,
}

impl ModelLease {
    /// The loaded model, to run inference with.
    pub fn model(&self) -> &Arc<dyn LoadedModel> {
        &self.model
    }

    /// Whether the model was resident when asked for.
    pub fn outcome(&self) -> CacheOutcome {
        self.outcome
    }

    /// Time spent waiting for a cache slot (the cache was full of pinned or loading models).
    pub fn queued(&self) -> Duration {
        self.queued
    }

    /// Time spent waiting for the model's load (zero on a hit).
    pub fn loading(&self) -> Duration {
        self.loading
    }
}

impl std::fmt::Debug for ModelLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelLease")
            .field("model", &self._pin.model)
            .field("outcome", &self.outcome)
            .field("queued", &self.queued)
            .field("loading", &self.loading)
            .finish()
    }
}

/// The bounded, single-flight, LRU model cache. Cheap to clone: clones share one cache.
#[derive(Clone)]
pub struct ModelCache {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ModelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelCache")
            .field("capacity", &self.shared.limits.capacity)
            .field("memory_budget", &self.shared.limits.budget)
            .field("backoff", &self.shared.limits.backoff)
            .finish_non_exhaustive()
    }
}

struct Shared {
    backend: Arc<dyn Backend>,
    limits: Limits,
    state: Mutex<State>,
}

/// One pin on a model record. Dropping it unpins.
///
/// A pin names its record by id, not just by model name: when a load fails its entry is
/// removed, and a later request may create a new entry for the same model, which the old
/// pins must not touch.
struct PinGuard {
    shared: Arc<Shared>,
    model: String,
    id: u64,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.shared.unpin(&self.model, self.id);
    }
}

impl ModelCache {
    /// A cache of at most `capacity` models (at least 1) loaded by `backend`, which waits
    /// `backoff` after a failed load before loading that model again.
    pub fn new(backend: Arc<dyn Backend>, capacity: usize, backoff: Duration) -> Self {
        Self::with_memory_budget(backend, capacity, None, backoff)
    }

    /// As [`ModelCache::new`], and with the models held taking at most `budget` bytes
    /// together, when given (see the [module docs](self)).
    pub fn with_memory_budget(
        backend: Arc<dyn Backend>,
        capacity: usize,
        budget: Option<u64>,
        backoff: Duration,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                backend,
                limits: Limits { capacity: capacity.max(1), budget, backoff },
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The most bytes the models held take together, if limited.
    pub fn memory_budget(&self) -> Option<u64> {
        self.shared.limits.budget
    }

    /// The most models the cache holds.
    pub fn capacity(&self) -> usize {
        self.shared.limits.capacity
    }

    /// Pins `model` and returns it loaded: at once on a hit, after its (shared) load on a
    /// miss, after a slot frees up when the cache is full of pinned or loading models.
    ///
    /// Cancel-safe: dropping the future unpins the model and leaves any load running.
    pub async fn acquire(&self, model: &str) -> Result<ModelLease, LoadFailed> {
        self.acquire_evicting(model, None).await
    }

    /// [`ModelCache::acquire`], evicting `evict` (if it is resident and unpinned) rather than
    /// the least recently used model when room must be made for `model`.
    pub async fn acquire_evicting(&self, model: &str, evict: Option<&str>) -> Result<ModelLease, LoadFailed> {
        let start = Instant::now();
        let (found, pin) = self.shared.pin(model, evict, start)?;
        let mut rx = match found {
            Found::Resident(loaded) => {
                return Ok(ModelLease {
                    model: loaded,
                    outcome: CacheOutcome::Hit,
                    queued: Duration::ZERO,
                    loading: Duration::ZERO,
                    _pin: pin,
                })
            }
            Found::Wait(rx) => rx,
        };
        let (result, admitted) = loop {
            let phase = rx.borrow_and_update().clone();
            if let Phase::Done(result, admitted) = phase {
                break (result, admitted);
            }
            if rx.changed().await.is_err() {
                // The load's sender went away without a result; the load task cannot do
                // that, but answer rather than wait forever.
                break (Err(BackendError::Failed("load abandoned".to_string())), Instant::now());
            }
        };
        let now = Instant::now();
        let began = admitted.max(start);
        // Pinned, so a successful load is still resident.
        let result = result.and_then(|()| {
            self.shared
                .resident(model, pin.id)
                .ok_or_else(|| BackendError::Failed("loaded model vanished from the cache".to_string()))
        });
        match result {
            Ok(loaded) => Ok(ModelLease {
                model: loaded,
                outcome: CacheOutcome::Miss,
                queued: began.saturating_duration_since(start),
                loading: now.saturating_duration_since(began),
                _pin: pin,
            }),
            Err(error) => {
                Err(LoadFailed { model: model.to_string(), error, retry_after: self.shared.limits.backoff })
            }
        }
    }

    /// The queued, loading and resident models, as advertised.
    pub fn snapshot(&self) -> CacheSnapshot {
        self.shared.lock().snapshot(&self.shared.limits)
    }

    /// How many requests wait for each model, in queue order (models waiting for a slot).
    #[cfg(test)]
    fn queued(&self) -> Vec<(String, usize)> {
        self.shared.lock().queued()
    }

    /// Checks the invariants of the cache state; `Err` names the first one broken.
    #[cfg(test)]
    pub(crate) fn validate(&self) -> Result<(), String> {
        self.shared.lock().validate(&self.shared.limits)
    }

    /// Pins held on a resident or loading model.
    #[cfg(test)]
    fn pins(&self, model: &str) -> Option<usize> {
        self.shared.lock().pins(model)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock, but a poisoned state is still consistent
        // (every critical section leaves it so before any call that could unwind).
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on the state under the lock, then carries out the effects it left.
    fn with_state<T>(self: &Arc<Self>, f: impl FnOnce(&mut State, &Limits, &mut Effects) -> T) -> T {
        let mut effects = Effects::default();
        let result = {
            let mut state = self.lock();
            f(&mut state, &self.limits, &mut effects)
        };
        self.apply(effects);
        result
    }

    /// Pins `model` (see [`ModelCache::acquire`]), starting a load if it must.
    fn pin(
        self: &Arc<Self>,
        model: &str,
        evict: Option<&str>,
        now: Instant,
    ) -> Result<(Found, PinGuard), LoadFailed> {
        // Asked before taking the lock; only used when the model has to be queued.
        let lookup = self.backend.lookup(model);
        let (found, id) =
            self.with_state(|state, limits, effects| state.pin(limits, model, evict, lookup, now, effects))?;
        Ok((found, PinGuard { shared: Arc::clone(self), model: model.to_string(), id }))
    }

    /// Drops one pin of record `id` of `model`.
    fn unpin(self: &Arc<Self>, model: &str, id: u64) {
        let now = Instant::now();
        self.with_state(|state, limits, effects| state.unpin(limits, model, id, now, effects));
    }

    /// The resident model of record `id` of `model`.
    fn resident(&self, model: &str, id: u64) -> Option<Arc<dyn LoadedModel>> {
        self.lock().resident(model, id)
    }

    /// Drops evicted models and starts admitted loads, outside the lock.
    fn apply(self: &Arc<Self>, effects: Effects) {
        let Effects { start, evicted, release_blocking, abandoned } = effects;
        drop(evicted);
        drop(abandoned);
        for (model, loaded, bytes) in release_blocking {
            let shared = Arc::clone(self);
            let release = move || {
                drop(loaded);
                log::debug!("model {model}: {bytes} bytes released");
                let now = Instant::now();
                shared.with_state(|state, limits, effects| state.released(limits, bytes, now, effects));
            };
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => drop(handle.spawn_blocking(release)),
                // Only reachable when a lease is dropped outside any runtime.
                Err(_) => release(),
            }
        }
        for (model, id, tx, admitted) in start {
            log::info!("loading model {model}");
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    let shared = Arc::clone(self);
                    handle.spawn(async move { shared.run_load(model, id, tx, admitted).await });
                }
                Err(e) => {
                    // Only reachable when a lease is dropped outside any runtime.
                    let error = BackendError::Failed(format!("no async runtime: {e}"));
                    self.finish_load(&model, id, Err(error), &tx, admitted);
                }
            }
        }
    }

    /// Records the result of load `id` of `model` and tells its waiters.
    fn finish_load(
        self: &Arc<Self>,
        model: &str,
        id: u64,
        result: Result<Arc<dyn LoadedModel>, BackendError>,
        tx: &watch::Sender<Phase>,
        admitted: Instant,
    ) {
        let now = Instant::now();
        let mut effects = Effects::default();
        let outcome = {
            let mut state = self.lock();
            state.finish_load(&self.limits, model, id, result, now, &mut effects)
        };
        // Waiters hear the outcome before anything it admitted starts.
        tx.send_replace(Phase::Done(outcome, admitted));
        self.apply(effects);
    }

    /// The load task of one model.
    async fn run_load(self: Arc<Self>, model: String, id: u64, tx: watch::Sender<Phase>, admitted: Instant) {
        let load = Arc::clone(&self.backend).load(model.clone());
        // A task of its own, so that a panicking backend is reported as a failed load.
        let result = match tokio::spawn(load).await {
            Ok(result) => result,
            Err(e) => Err(BackendError::Failed(format!("load task failed: {e}"))),
        };
        self.finish_load(&model, id, result, &tx, admitted);
    }
}

#[cfg(test)]
mod tests;
