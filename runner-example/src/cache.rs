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
//! * On a miss with a full cache, the least-recently-used *unpinned resident* model is
//!   evicted. When every slot is pinned or loading, the request waits, without polling, in a
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
//! All state sits behind one [`std::sync::Mutex`] that is held for short, non-blocking
//! critical sections only, never across an `.await`. Evicted models are dropped, and loads
//! spawned, after the lock is released.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::backend::{Backend, BackendError, LoadedModel};

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
    /// Resident and loading models, most recently used first.
    pub hints: Vec<String>,
    /// The models of `hints` that are still loading, in the same order.
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
            .field("capacity", &self.shared.capacity)
            .field("memory_budget", &self.shared.budget)
            .field("backoff", &self.shared.backoff)
            .finish_non_exhaustive()
    }
}

struct Shared {
    backend: Arc<dyn Backend>,
    capacity: usize,
    budget: Option<u64>,
    backoff: Duration,
    state: Mutex<State>,
}

/// Progress of one model's load, broadcast to the requests waiting for it.
#[derive(Clone)]
enum Phase {
    /// Waiting in the queue for a cache slot.
    Queued,
    /// Admitted (given a slot); loading.
    Loading,
    /// Load finished, admitted at the instant given. A successful load's model is in its
    /// entry, not here, so that evicting the entry frees it whoever still holds a receiver.
    Done(Result<(), BackendError>, Instant),
}

#[derive(Default)]
struct State {
    /// Resident and loading models: the cache's slots.
    entries: HashMap<String, Entry>,
    /// Absent models that requests wait for, oldest first; none of them is in `entries`.
    queue: VecDeque<Queued>,
    /// Recent load failures, for the backoff.
    failures: HashMap<String, Failure>,
    /// Logical clock for LRU order.
    clock: u64,
    /// Source of record ids; see [`PinGuard`].
    next_id: u64,
    /// Evicted models whose memory is still being released.
    releasing: Releasing,
}

/// Evicted models being dropped on the blocking pool: they still hold a slot and their bytes.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
struct Releasing {
    models: usize,
    bytes: u64,
}

struct Entry {
    /// Id of the record: it keeps the id it had in the queue.
    id: u64,
    pins: usize,
    last_used: u64,
    /// Bytes counted against the budget: the size hint while loading, the resident bytes
    /// (or the hint, when the model reports none) once loaded.
    bytes: u64,
    status: Status,
}

enum Status {
    Loading(watch::Receiver<Phase>),
    Ready(Arc<dyn LoadedModel>),
}

struct Queued {
    id: u64,
    model: String,
    pins: usize,
    /// The size hint (0 when unknown).
    bytes: u64,
    tx: watch::Sender<Phase>,
}

struct Failure {
    until: Instant,
    error: BackendError,
}

/// A load to start: model, record id, the channel its waiters listen on, admission instant.
type StartLoad = (String, u64, watch::Sender<Phase>, Instant);

/// Work to do once the state lock is released.
#[derive(Default)]
#[must_use]
struct Effects {
    start: Vec<StartLoad>,
    /// Dropped inline, outside the lock.
    evicted: Vec<Arc<dyn LoadedModel>>,
    /// Dropped on the blocking pool; each with the bytes it held (see [`Releasing`]).
    release_blocking: Vec<(String, Arc<dyn LoadedModel>, u64)>,
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

/// What `acquire` found under the lock.
enum Found {
    Resident(Arc<dyn LoadedModel>),
    Wait(watch::Receiver<Phase>),
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
                capacity: capacity.max(1),
                budget,
                backoff,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The most bytes the models held take together, if limited.
    pub fn memory_budget(&self) -> Option<u64> {
        self.shared.budget
    }

    /// The most models the cache holds.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Pins `model` and returns it loaded: at once on a hit, after its (shared) load on a
    /// miss, after a slot frees up when the cache is full of pinned or loading models.
    ///
    /// Cancel-safe: dropping the future unpins the model and leaves any load running.
    pub async fn acquire(&self, model: &str) -> Result<ModelLease, LoadFailed> {
        let start = Instant::now();
        let (found, pin) = self.shared.pin(model, start)?;
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
                Err(LoadFailed { model: model.to_string(), error, retry_after: self.shared.backoff })
            }
        }
    }

    /// The resident and loading models, as advertised.
    pub fn snapshot(&self) -> CacheSnapshot {
        let state = self.shared.lock();
        let mut entries: Vec<(&String, &Entry)> = state.entries.iter().collect();
        entries.sort_by_key(|(_, e)| std::cmp::Reverse(e.last_used));
        let mut snap = CacheSnapshot {
            releasing_bytes: state.releasing.bytes,
            reserved_bytes: state.releasing.bytes,
            ..CacheSnapshot::default()
        };
        for (name, entry) in entries {
            snap.hints.push(name.clone());
            snap.reserved_bytes = snap.reserved_bytes.saturating_add(entry.bytes);
            match &entry.status {
                Status::Loading(_) => snap.loading.push(name.clone()),
                Status::Ready(m) => {
                    if let Some(bytes) = m.resident_bytes() {
                        let sum = snap.resident_bytes.unwrap_or(0);
                        snap.resident_bytes = Some(sum.saturating_add(bytes));
                    }
                }
            }
        }
        snap
    }

    /// How many requests wait for each model, in queue order (models waiting for a slot).
    #[cfg(test)]
    fn queued(&self) -> Vec<(String, usize)> {
        let state = self.shared.lock();
        state.queue.iter().map(|q| (q.model.clone(), q.pins)).collect()
    }

    /// Checks the invariants of the cache state; `Err` names the first one broken.
    #[cfg(test)]
    pub(crate) fn validate(&self) -> Result<(), String> {
        let state = self.shared.lock();
        let slots = state.entries.len() + state.releasing.models;
        if slots > self.shared.capacity {
            return Err(format!("{slots} slots held, capacity {}", self.shared.capacity));
        }
        let mut queued = std::collections::HashSet::new();
        for q in &state.queue {
            if state.entries.contains_key(&q.model) {
                return Err(format!("model {} is both queued and held", q.model));
            }
            if !queued.insert(q.model.as_str()) {
                return Err(format!("model {} is queued twice", q.model));
            }
            if q.pins == 0 {
                return Err(format!("queued model {} has no pin", q.model));
            }
        }
        if let Some(budget) = self.shared.budget {
            // Loading models count at their hint; every test model tells the truth, and then the
            // cache holds at most its budget.
            let held =
                state.entries.values().fold(state.releasing.bytes, |sum, e| sum.saturating_add(e.bytes));
            if held > budget {
                return Err(format!("{held} bytes held, budget {budget}"));
            }
        }
        if let Some(head) = state.queue.front() {
            let evictable =
                state.entries.values().any(|e| e.pins == 0 && matches!(e.status, Status::Ready(_)));
            let fits = self.shared.fits(&state, Some(head.bytes));
            let soon = self.shared.fits_once_released(&state, Some(head.bytes));
            if fits || (evictable && !soon) {
                return Err(format!("the queue's head {} could be admitted but waits", head.model));
            }
        }
        Ok(())
    }

    /// Pins held on a resident or loading model.
    #[cfg(test)]
    fn pins(&self, model: &str) -> Option<usize> {
        self.shared.lock().entries.get(model).map(|e| e.pins)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock, but a poisoned state is still consistent
        // (every critical section leaves it so before any call that could unwind).
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Pins `model` (see [`ModelCache::acquire`]), starting a load if it must.
    fn pin(self: &Arc<Self>, model: &str, now: Instant) -> Result<(Found, PinGuard), LoadFailed> {
        let mut effects = Effects::default();
        // Asked before taking the lock; only used when the model has to be queued.
        let lookup = self.backend.lookup(model);
        let result = {
            let mut state = self.lock();
            self.pin_locked(&mut state, model, lookup, now, &mut effects)
        };
        self.apply(effects);
        result
    }

    fn pin_locked(
        self: &Arc<Self>,
        state: &mut State,
        model: &str,
        lookup: Result<Option<u64>, BackendError>,
        now: Instant,
        effects: &mut Effects,
    ) -> Result<(Found, PinGuard), LoadFailed> {
        if let Some(failure) = state.failures.get(model) {
            if failure.until > now {
                return Err(LoadFailed {
                    model: model.to_string(),
                    error: failure.error.clone(),
                    retry_after: failure.until.saturating_duration_since(now),
                });
            }
            state.failures.remove(model);
        }
        state.clock += 1;
        let clock = state.clock;
        let guard = |id| PinGuard { shared: Arc::clone(self), model: model.to_string(), id };
        if let Some(entry) = state.entries.get_mut(model) {
            entry.pins += 1;
            entry.last_used = clock;
            let found = match &entry.status {
                Status::Ready(m) => Found::Resident(Arc::clone(m)),
                Status::Loading(rx) => Found::Wait(rx.clone()),
            };
            return Ok((found, guard(entry.id)));
        }
        if let Some(queued) = state.queue.iter_mut().find(|q| q.model == model) {
            queued.pins += 1;
            return Ok((Found::Wait(queued.tx.subscribe()), guard(queued.id)));
        }
        // A model the backend does not know: answered before anything is queued or evicted.
        let size = lookup.map_err(|error| LoadFailed {
            model: model.to_string(),
            error,
            retry_after: Duration::ZERO,
        })?;
        let bytes = size.unwrap_or(0);
        if let Some(budget) = self.budget.filter(|&budget| bytes > budget) {
            return Err(LoadFailed {
                model: model.to_string(),
                error: BackendError::TooLarge(format!(
                    "model {model} takes {bytes} bytes, more than the whole memory budget of \
                     {budget} bytes"
                )),
                retry_after: Duration::ZERO,
            });
        }
        state.next_id += 1;
        let id = state.next_id;
        let (tx, rx) = watch::channel(Phase::Queued);
        state.queue.push_back(Queued { id, model: model.to_string(), pins: 1, bytes, tx });
        self.admit_locked(state, effects);
        Ok((Found::Wait(rx), guard(id)))
    }

    /// Whether the cache can take a model of `incoming` bytes (`None`: no model; only check
    /// that it is within its budget) beside what it holds.
    fn fits(&self, state: &State, incoming: Option<u64>) -> bool {
        self.fits_beside(state, state.releasing, incoming)
    }

    /// [`Shared::fits`], as it will be once the releases under way are over.
    fn fits_once_released(&self, state: &State, incoming: Option<u64>) -> bool {
        self.fits_beside(state, Releasing::default(), incoming)
    }

    fn fits_beside(&self, state: &State, releasing: Releasing, incoming: Option<u64>) -> bool {
        let slots = state.entries.len() + releasing.models + usize::from(incoming.is_some());
        if slots > self.capacity {
            return false;
        }
        let Some(budget) = self.budget else {
            return true;
        };
        let held = state.entries.values().fold(releasing.bytes, |sum, e| sum.saturating_add(e.bytes));
        held.saturating_add(incoming.unwrap_or(0)) <= budget
    }

    /// Admits queued models while room (a slot, and bytes under the budget) can be made,
    /// evicting LRU unpinned resident models; also evicts while over the budget.
    fn admit_locked(&self, state: &mut State, effects: &mut Effects) {
        loop {
            let head = state.queue.front().map(|q| q.bytes);
            if !self.fits(state, head) {
                if self.fits_once_released(state, head) {
                    // Room is on its way: evict nothing more, wait for the releases.
                    return;
                }
                let victim = state
                    .entries
                    .iter()
                    .filter(|(_, e)| e.pins == 0 && matches!(e.status, Status::Ready(_)))
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(name, _)| name.clone());
                let Some(victim) = victim else {
                    // Every slot is pinned, loading or releasing: wait for an unpin, a load's
                    // end or a release's end.
                    return;
                };
                if let Some(Entry { status: Status::Ready(m), bytes, .. }) = state.entries.remove(&victim) {
                    log::info!("evicting model {victim} ({bytes} bytes)");
                    if m.release_blocks() {
                        state.releasing.models += 1;
                        state.releasing.bytes = state.releasing.bytes.saturating_add(bytes);
                        effects.release_blocking.push((victim, m, bytes));
                    } else {
                        effects.evicted.push(m);
                    }
                }
                continue;
            }
            let Some(queued) = state.queue.pop_front() else {
                return;
            };
            state.clock += 1;
            let admitted = Instant::now();
            queued.tx.send_replace(Phase::Loading);
            state.entries.insert(
                queued.model.clone(),
                Entry {
                    id: queued.id,
                    pins: queued.pins,
                    last_used: state.clock,
                    bytes: queued.bytes,
                    status: Status::Loading(queued.tx.subscribe()),
                },
            );
            effects.start.push((queued.model, queued.id, queued.tx, admitted));
        }
    }

    /// Drops one pin of record `id` of `model`.
    fn unpin(self: &Arc<Self>, model: &str, id: u64) {
        let mut effects = Effects::default();
        let mut dropped_queue_entry = None;
        {
            let mut state = self.lock();
            state.clock += 1;
            let clock = state.clock;
            if let Some(entry) = state.entries.get_mut(model).filter(|e| e.id == id) {
                entry.pins = entry.pins.saturating_sub(1);
                entry.last_used = clock;
                if entry.pins == 0 && matches!(entry.status, Status::Ready(_)) {
                    self.admit_locked(&mut state, &mut effects);
                }
            } else if let Some(pos) = state.queue.iter().position(|q| q.id == id) {
                let nobody_left = state.queue.get_mut(pos).is_some_and(|q| {
                    q.pins = q.pins.saturating_sub(1);
                    q.pins == 0
                });
                if nobody_left {
                    // Nobody waits for it any more: never load it. The next in line may fit
                    // where it did not.
                    dropped_queue_entry = state.queue.remove(pos);
                    self.admit_locked(&mut state, &mut effects);
                }
            }
            // Else the record is gone (its load failed): nothing to unpin.
        }
        drop(dropped_queue_entry);
        self.apply(effects);
    }

    /// The resident model of record `id` of `model`.
    fn resident(&self, model: &str, id: u64) -> Option<Arc<dyn LoadedModel>> {
        let state = self.lock();
        match state.entries.get(model) {
            Some(Entry { id: entry_id, status: Status::Ready(m), .. }) if *entry_id == id => {
                Some(Arc::clone(m))
            }
            _ => None,
        }
    }

    /// Records the result of load `id` of `model`; returns what to tell its waiters.
    fn finish_load(
        &self,
        model: &str,
        id: u64,
        result: Result<Arc<dyn LoadedModel>, BackendError>,
    ) -> (Effects, Result<(), BackendError>) {
        let mut effects = Effects::default();
        let mut state = self.lock();
        let Some(entry) = state.entries.get_mut(model).filter(|e| e.id == id) else {
            // Cannot happen: a loading entry is never evicted.
            let outcome = result.map(drop);
            return (effects, outcome);
        };
        match result {
            Ok(loaded) => {
                if let Some(bytes) = loaded.resident_bytes() {
                    entry.bytes = bytes;
                }
                log::info!("loaded model {model} ({} bytes)", entry.bytes);
                entry.status = Status::Ready(loaded);
                // An unpinned model can make room for queued ones, and a model bigger than its
                // size hint can put the cache over its budget.
                self.admit_locked(&mut state, &mut effects);
                (effects, Ok(()))
            }
            Err(error) => {
                log::warn!("loading model {model} failed: {error}");
                state.entries.remove(model);
                let now = Instant::now();
                state.failures.retain(|_, f| f.until > now);
                if !self.backoff.is_zero() {
                    state.failures.insert(
                        model.to_string(),
                        Failure { until: now + self.backoff, error: error.clone() },
                    );
                }
                self.admit_locked(&mut state, &mut effects);
                (effects, Err(error))
            }
        }
    }

    /// Drops evicted models and starts admitted loads, outside the lock.
    fn apply(self: &Arc<Self>, effects: Effects) {
        let Effects { start, evicted, release_blocking } = effects;
        drop(evicted);
        for (model, loaded, bytes) in release_blocking {
            let shared = Arc::clone(self);
            let release = move || {
                drop(loaded);
                shared.released(&model, bytes);
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
                    let (more, outcome) = self.finish_load(&model, id, Err(error));
                    tx.send_replace(Phase::Done(outcome, admitted));
                    self.apply(more);
                }
            }
        }
    }

    /// An evicted model's memory is released: its slot and bytes are free for queued models.
    fn released(self: &Arc<Self>, model: &str, bytes: u64) {
        let mut effects = Effects::default();
        {
            let mut state = self.lock();
            state.releasing.models = state.releasing.models.saturating_sub(1);
            state.releasing.bytes = state.releasing.bytes.saturating_sub(bytes);
            log::debug!("model {model}: {bytes} bytes released");
            self.admit_locked(&mut state, &mut effects);
        }
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
        let (effects, outcome) = self.finish_load(&model, id, result);
        tx.send_replace(Phase::Done(outcome, admitted));
        self.apply(effects);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestBackend;
    use std::time::Duration;
    use tokio::time::{advance, sleep};

    const LOAD: Duration = Duration::from_millis(100);

    fn cache(backend: &Arc<TestBackend>, capacity: usize) -> ModelCache {
        ModelCache::new(backend.clone(), capacity, Duration::from_millis(1000))
    }

    fn hints(cache: &ModelCache) -> Vec<String> {
        cache.snapshot().hints
    }

    /// Lets every task that can run, run (paused clock: time does not move).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn miss_then_hit() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        let cache = cache(&backend, 2);
        let start = Instant::now();
        let lease = cache.acquire("a").await.unwrap();
        assert_eq!(lease.outcome(), CacheOutcome::Miss);
        assert_eq!(lease.loading(), LOAD);
        assert_eq!(lease.queued(), Duration::ZERO);
        assert_eq!(start.elapsed(), LOAD);
        assert_eq!(cache.pins("a"), Some(1));
        drop(lease);
        assert_eq!(cache.pins("a"), Some(0));

        let start = Instant::now();
        let lease = cache.acquire("a").await.unwrap();
        assert_eq!(lease.outcome(), CacheOutcome::Hit);
        assert_eq!(lease.loading(), Duration::ZERO);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(backend.loads("a"), 1);
        assert_eq!(hints(&cache), ["a"]);
        let out = lease.model().clone().infer("p".into()).await.unwrap();
        assert_eq!(out, "a:p");
    }

    #[tokio::test(start_paused = true)]
    async fn evicts_least_recently_used_first() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        let cache = cache(&backend, 2);
        drop(cache.acquire("a").await.unwrap());
        drop(cache.acquire("b").await.unwrap());
        assert_eq!(hints(&cache), ["b", "a"]);
        // Using a makes b the least recently used.
        drop(cache.acquire("a").await.unwrap());
        assert_eq!(hints(&cache), ["a", "b"]);
        drop(cache.acquire("c").await.unwrap());
        assert_eq!(hints(&cache), ["c", "a"]);
        assert_eq!(backend.live(), 2);
        drop(cache.acquire("b").await.unwrap());
        assert_eq!(hints(&cache), ["b", "c"]);
        assert_eq!(backend.loads("b"), 2);
        assert_eq!(backend.max_live(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn pinned_models_are_never_evicted_the_miss_waits() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        let cache = cache(&backend, 2);
        let a = cache.acquire("a").await.unwrap();
        let b = cache.acquire("b").await.unwrap();
        // a is the least recently used, but pinned; so is b.
        let c = tokio::spawn({
            let cache = cache.clone();
            async move { cache.acquire("c").await }
        });
        settle().await;
        advance(LOAD * 10).await;
        settle().await;
        assert!(!c.is_finished());
        assert_eq!(backend.loads("c"), 0);
        assert_eq!(hints(&cache), ["b", "a"]);
        assert_eq!(cache.queued(), [("c".to_string(), 1)]);

        drop(b); // b unpinned: it is evicted (a is still pinned), c loads in its place
        settle().await;
        assert_eq!(cache.snapshot().loading, ["c"]);
        assert_eq!(hints(&cache), ["c", "a"]);
        let c = c.await.unwrap().unwrap();
        assert_eq!(c.outcome(), CacheOutcome::Miss);
        assert_eq!(c.queued(), LOAD * 10);
        assert_eq!(c.loading(), LOAD);
        assert_eq!(backend.loads("c"), 1);
        assert_eq!(backend.max_live(), 2);
        drop(a);
    }

    #[tokio::test(start_paused = true)]
    async fn loading_models_are_not_evicted_either() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        let cache = cache(&backend, 1);
        // A load nobody waits for any more still holds its slot until it completes.
        let a = tokio::spawn({
            let cache = cache.clone();
            async move { cache.acquire("a").await }
        });
        settle().await;
        a.abort();
        let b = tokio::spawn({
            let cache = cache.clone();
            async move { cache.acquire("b").await }
        });
        settle().await;
        assert_eq!(cache.snapshot().loading, ["a"]);
        assert_eq!(cache.queued(), [("b".to_string(), 1)]);
        let b = b.await.unwrap().unwrap();
        assert_eq!(b.queued(), LOAD);
        assert_eq!(backend.loads("a"), 1);
        assert_eq!(backend.completed("a"), 1);
        assert_eq!(hints(&cache), ["b"]);
        assert_eq!(backend.max_live(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn slot_waiters_are_served_in_order() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        let cache = cache(&backend, 1);
        let a = cache.acquire("a").await.unwrap();
        let mut waiters = Vec::new();
        for model in ["b", "c", "b", "d"] {
            let cache = cache.clone();
            waiters.push(tokio::spawn(async move { cache.acquire(model).await }));
            settle().await;
        }
        // The second request for b joined b's place in the queue.
        assert_eq!(cache.queued(), [("b".to_string(), 2), ("c".to_string(), 1), ("d".to_string(), 1)]);
        drop(a);
        settle().await;
        assert_eq!(cache.snapshot().loading, ["b"]);
        let mut waiters = waiters.into_iter();
        let b1 = waiters.next().unwrap();
        let c = waiters.next().unwrap();
        let b2 = waiters.next().unwrap();
        let d = waiters.next().unwrap();
        let b1 = b1.await.unwrap().unwrap();
        let b2 = b2.await.unwrap().unwrap();
        assert_eq!(cache.pins("b"), Some(2));
        drop(b1);
        settle().await;
        assert!(!c.is_finished());
        assert_eq!(hints(&cache), ["b"]);
        drop(b2);
        let c = c.await.unwrap().unwrap();
        assert_eq!(hints(&cache), ["c"]);
        drop(c);
        let d = d.await.unwrap().unwrap();
        assert_eq!(hints(&cache), ["d"]);
        drop(d);
        assert_eq!(backend.loads("b"), 1);
        assert_eq!(backend.max_live(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_model_nobody_waits_for_is_never_loaded() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        let cache = cache(&backend, 1);
        let a = cache.acquire("a").await.unwrap();
        let b = tokio::spawn({
            let cache = cache.clone();
            async move { cache.acquire("b").await }
        });
        settle().await;
        assert_eq!(cache.queued().len(), 1);
        b.abort();
        settle().await;
        assert!(cache.queued().is_empty());
        drop(a);
        advance(LOAD * 2).await;
        settle().await;
        assert_eq!(backend.loads("b"), 0);
        assert_eq!(hints(&cache), ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn hundred_concurrent_requests_share_one_load() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        let cache = cache(&backend, 2);
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.acquire("m").await })
            })
            .collect();
        settle().await;
        assert_eq!(cache.snapshot().loading, ["m"]);
        assert_eq!(cache.pins("m"), Some(100));
        let mut leases = Vec::new();
        for task in tasks {
            let lease = task.await.unwrap().unwrap();
            assert_eq!(lease.outcome(), CacheOutcome::Miss);
            leases.push(lease);
        }
        assert_eq!(backend.loads("m"), 1);
        assert_eq!(cache.pins("m"), Some(100));
        drop(leases);
        assert_eq!(cache.pins("m"), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_does_not_cancel_the_load() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        let cache = cache(&backend, 2);
        let first = tokio::spawn({
            let cache = cache.clone();
            async move { cache.acquire("m").await }
        });
        let second = tokio::spawn({
            let cache = cache.clone();
            async move { cache.acquire("m").await }
        });
        sleep(LOAD / 2).await;
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        assert_eq!(cache.pins("m"), Some(1));
        let lease = second.await.unwrap().unwrap();
        assert_eq!(lease.outcome(), CacheOutcome::Miss);
        drop(lease);

        // Now with nobody left waiting at all.
        let lonely = tokio::spawn({
            let cache = cache.clone();
            async move { cache.acquire("n").await }
        });
        sleep(LOAD / 2).await;
        lonely.abort();
        settle().await;
        assert_eq!(cache.pins("n"), Some(0));
        assert_eq!(cache.snapshot().loading, ["n"]);
        sleep(LOAD).await;
        assert_eq!(backend.completed("n"), 1);
        assert!(cache.snapshot().loading.is_empty());
        assert_eq!(hints(&cache), ["n", "m"]);
        let lease = cache.acquire("n").await.unwrap();
        assert_eq!(lease.outcome(), CacheOutcome::Hit);
        assert_eq!(backend.loads("m"), 1);
        assert_eq!(backend.loads("n"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_load_is_not_advertised_and_backs_off_before_retrying() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        backend.set_failing("x", true);
        let cache = cache(&backend, 2);
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.acquire("x").await })
            })
            .collect();
        settle().await;
        assert_eq!(hints(&cache), ["x"]); // advertised while loading
        for task in tasks {
            let err = task.await.unwrap().unwrap_err();
            assert_eq!(err.model, "x");
            assert!(matches!(err.error, BackendError::Failed(_)));
            assert_eq!(err.retry_after, Duration::from_millis(1000));
            assert!(err.to_string().starts_with("loading model x failed: "));
        }
        assert_eq!(backend.loads("x"), 1);
        assert!(hints(&cache).is_empty());
        assert_eq!(cache.pins("x"), None);

        // Within the backoff: fails at once, no new load.
        backend.set_failing("x", false);
        sleep(Duration::from_millis(400)).await;
        let start = Instant::now();
        let err = cache.acquire("x").await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(err.retry_after, Duration::from_millis(600));
        assert_eq!(backend.loads("x"), 1);
        assert!(hints(&cache).is_empty());

        // After it: the next request loads again (and now succeeds).
        sleep(Duration::from_millis(600)).await;
        let lease = cache.acquire("x").await.unwrap();
        assert_eq!(lease.outcome(), CacheOutcome::Miss);
        assert_eq!(backend.loads("x"), 2);
        assert_eq!(hints(&cache), ["x"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_load_frees_its_slot_for_queued_models() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        backend.set_failing("x", true);
        let cache = cache(&backend, 1);
        let x = tokio::spawn({
            let cache = cache.clone();
            async move { cache.acquire("x").await }
        });
        settle().await;
        let y = cache.acquire("y").await.unwrap();
        assert_eq!(y.queued(), LOAD);
        assert!(x.await.unwrap().is_err());
        assert_eq!(hints(&cache), ["y"]);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_backoff_retries_at_once() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        backend.set_failing("x", true);
        let cache = ModelCache::new(backend.clone(), 1, Duration::ZERO);
        assert!(cache.acquire("x").await.is_err());
        assert!(cache.acquire("x").await.is_err());
        assert_eq!(backend.loads("x"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_load_is_a_failed_load() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        backend.set_panicking("p");
        let cache = cache(&backend, 1);
        let err = cache.acquire("p").await.unwrap_err();
        assert!(matches!(err.error, BackendError::Failed(_)), "{err:?}");
        assert!(hints(&cache).is_empty());
        drop(cache.acquire("q").await.unwrap());
        assert_eq!(hints(&cache), ["q"]);
    }

    #[tokio::test(start_paused = true)]
    async fn snapshot_lists_loading_models_and_sums_bytes() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        backend.set_bytes(10);
        let cache = cache(&backend, 3);
        drop(cache.acquire("a").await.unwrap());
        drop(cache.acquire("b").await.unwrap());
        let c = tokio::spawn({
            let cache = cache.clone();
            async move { cache.acquire("c").await }
        });
        settle().await;
        let snap = cache.snapshot();
        assert_eq!(snap.hints, ["c", "b", "a"]);
        assert_eq!(snap.loading, ["c"]);
        assert_eq!(snap.resident_bytes, Some(20));
        drop(c.await.unwrap().unwrap());
        assert_eq!(cache.snapshot().resident_bytes, Some(30));
    }

    #[tokio::test(start_paused = true)]
    async fn without_byte_counts_resident_bytes_is_none() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        let cache = cache(&backend, 3);
        drop(cache.acquire("a").await.unwrap());
        assert_eq!(cache.snapshot().resident_bytes, None);
    }

    fn budget_cache(backend: &Arc<TestBackend>, capacity: usize, budget: u64) -> ModelCache {
        ModelCache::with_memory_budget(backend.clone(), capacity, Some(budget), Duration::from_millis(1000))
    }

    /// Gives `model` a size of `bytes`, hinted and resident.
    fn sized(backend: &TestBackend, model: &str, bytes: u64) {
        backend.set_size(model, Some(bytes), Some(bytes));
    }

    #[tokio::test(start_paused = true)]
    async fn budget_evicts_least_recently_used_models_until_the_new_one_fits() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        for (model, bytes) in [("a", 40), ("b", 40), ("c", 40), ("d", 90), ("e", 100)] {
            sized(&backend, model, bytes);
        }
        let cache = budget_cache(&backend, 10, 100);
        assert_eq!(cache.memory_budget(), Some(100));
        drop(cache.acquire("a").await.unwrap());
        drop(cache.acquire("b").await.unwrap());
        assert_eq!(cache.snapshot().resident_bytes, Some(80));
        // 80 + 40 > 100: the least recently used, a, goes.
        drop(cache.acquire("c").await.unwrap());
        assert_eq!(hints(&cache), ["c", "b"]);
        assert_eq!(backend.live(), 2);
        assert_eq!(cache.snapshot().resident_bytes, Some(80));
        // 90 needs both b and c gone, b first.
        drop(cache.acquire("d").await.unwrap());
        assert_eq!(hints(&cache), ["d"]);
        assert_eq!(backend.live(), 1);
        let snap = cache.snapshot();
        assert_eq!((snap.resident_bytes, snap.reserved_bytes), (Some(90), 90));
        // Exactly the budget fits.
        drop(cache.acquire("e").await.unwrap());
        assert_eq!(hints(&cache), ["e"]);
        assert_eq!(backend.max_live(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_model_bigger_than_the_budget_fails_at_once_and_is_never_loaded() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        sized(&backend, "a", 40);
        sized(&backend, "huge", 101);
        let limited = budget_cache(&backend, 10, 100);
        drop(limited.acquire("a").await.unwrap());
        let start = Instant::now();
        let err = limited.acquire("huge").await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(matches!(err.error, BackendError::TooLarge(_)), "{err:?}");
        assert!(err.to_string().contains("101 bytes"), "{err}");
        assert!(err.to_string().contains("100 bytes"), "{err}");
        assert_eq!(err.retry_after, Duration::ZERO);
        assert_eq!(backend.loads("huge"), 0);
        // Nothing was evicted for it, and it is not advertised.
        assert_eq!(hints(&limited), ["a"]);
        // Without a budget, sizes do not matter.
        let unlimited = cache(&backend, 1);
        drop(unlimited.acquire("huge").await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn pinned_models_hold_their_bytes_the_miss_waits() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        sized(&backend, "a", 60);
        sized(&backend, "b", 60);
        let cache = budget_cache(&backend, 10, 100);
        let a = cache.acquire("a").await.unwrap();
        let b = tokio::spawn({
            let cache = cache.clone();
            async move { cache.acquire("b").await }
        });
        settle().await;
        advance(LOAD * 10).await;
        settle().await;
        assert!(!b.is_finished());
        assert_eq!(backend.loads("b"), 0);
        assert_eq!(cache.queued(), [("b".to_string(), 1)]);
        drop(a); // a unpinned: evicted to make room, and b loads
        settle().await;
        assert_eq!(cache.snapshot().loading, ["b"]);
        let b = b.await.unwrap().unwrap();
        assert_eq!(b.queued(), LOAD * 10);
        assert_eq!(hints(&cache), ["b"]);
        assert_eq!(backend.max_live(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn loading_models_count_at_their_size_hint() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        sized(&backend, "a", 60);
        sized(&backend, "b", 60);
        sized(&backend, "small", 30);
        let cache = budget_cache(&backend, 10, 100);
        let a = tokio::spawn({
            let cache = cache.clone();
            async move { cache.acquire("a").await }
        });
        settle().await;
        a.abort(); // nobody waits for a any more; its load still holds 60 bytes
        let b = tokio::spawn({
            let cache = cache.clone();
            async move { cache.acquire("b").await }
        });
        settle().await;
        let snap = cache.snapshot();
        assert_eq!(
            (snap.loading, snap.reserved_bytes, snap.resident_bytes),
            (vec!["a".to_string()], 60, None)
        );
        assert_eq!(cache.queued(), [("b".to_string(), 1)]);
        let b = b.await.unwrap().unwrap();
        assert_eq!(b.queued(), LOAD);
        assert_eq!(backend.completed("a"), 1);
        assert_eq!(hints(&cache), ["b"]);
        // A model that fits beside the pinned b loads at once.
        let small = cache.acquire("small").await.unwrap();
        assert_eq!(small.queued(), Duration::ZERO);
        assert_eq!(cache.snapshot().resident_bytes, Some(90));
    }

    #[tokio::test(start_paused = true)]
    async fn a_model_bigger_than_its_hint_brings_the_cache_back_under_budget() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        sized(&backend, "a", 50);
        backend.set_size("liar", Some(10), Some(80));
        backend.set_size("unknown", None, Some(70));
        let cache = budget_cache(&backend, 10, 100);
        drop(cache.acquire("a").await.unwrap());
        // 50 + 10 fits; once loaded, 50 + 80 does not: a goes.
        drop(cache.acquire("liar").await.unwrap());
        assert_eq!(hints(&cache), ["liar"]);
        assert_eq!(cache.snapshot().resident_bytes, Some(80));
        // A model of unknown size counts as 0 until loaded, then at its real size.
        drop(cache.acquire("unknown").await.unwrap());
        assert_eq!(hints(&cache), ["unknown"]);
        assert_eq!(backend.live(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_count_still_limits_a_cache_with_a_budget() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        for model in ["a", "b", "c"] {
            sized(&backend, model, 1);
        }
        let cache = budget_cache(&backend, 2, 100);
        for model in ["a", "b", "c"] {
            drop(cache.acquire(model).await.unwrap());
        }
        assert_eq!(hints(&cache), ["c", "b"]);
    }

    /// Issue 9, item 5: a model the backend does not know fails at once and evicts nothing,
    /// so requests for made-up names cannot flush the cache.
    #[tokio::test(start_paused = true)]
    async fn unknown_models_fail_at_once_and_evict_nothing() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        sized(&backend, "a", 50);
        sized(&backend, "b", 50);
        let cache = budget_cache(&backend, 2, 100);
        drop(cache.acquire("a").await.unwrap());
        drop(cache.acquire("b").await.unwrap());
        for i in 0..50 {
            let start = Instant::now();
            let err = cache.acquire(&format!("nope-{i}")).await.unwrap_err();
            assert_eq!(start.elapsed(), Duration::ZERO);
            assert!(matches!(err.error, BackendError::NotFound(_)), "{err:?}");
            assert_eq!(err.retry_after, Duration::ZERO);
            cache.validate().unwrap();
        }
        assert_eq!(hints(&cache), ["b", "a"]);
        assert_eq!(backend.live(), 2);
        assert_eq!(backend.loads("a") + backend.loads("b"), 2);
        assert!(cache.queued().is_empty());
        // And they are hits still.
        assert_eq!(cache.acquire("a").await.unwrap().outcome(), CacheOutcome::Hit);
    }

    /// A queued model whose waiters all went away leaves the queue, and the next one in line
    /// is admitted at once when it fits where the first did not.
    #[tokio::test(start_paused = true)]
    async fn an_abandoned_queue_head_lets_the_next_in_line_in() {
        let backend = TestBackend::new(LOAD, Duration::ZERO);
        sized(&backend, "a", 60);
        sized(&backend, "big", 60);
        sized(&backend, "small", 30);
        let cache = budget_cache(&backend, 10, 100);
        let a = cache.acquire("a").await.unwrap();
        let big = tokio::spawn({
            let cache = cache.clone();
            async move { cache.acquire("big").await }
        });
        settle().await;
        let small = tokio::spawn({
            let cache = cache.clone();
            async move { cache.acquire("small").await }
        });
        settle().await;
        assert_eq!(cache.queued().len(), 2);
        big.abort();
        settle().await;
        cache.validate().unwrap();
        assert_eq!(cache.snapshot().loading, ["small"]);
        assert_eq!(small.await.unwrap().unwrap().queued(), Duration::ZERO);
        drop(a);
    }

    /// Issue 9, item 14: models whose memory is released slowly (device memory) are dropped
    /// off the async threads, and their bytes count as held until released: no load starts
    /// while the device has no room for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn no_load_starts_before_the_evicted_memory_is_released() {
        const BUDGET: u64 = 100;
        let backend = TestBackend::on_device(
            Duration::from_millis(2),
            Duration::ZERO,
            BUDGET,
            Duration::from_millis(20),
        );
        for i in 0..6u64 {
            sized(&backend, &format!("m{i}"), 30 + i * 10);
        }
        let cache = budget_cache(&backend, 6, BUDGET);
        // One after the other: each miss needs the memory of the model evicted before it.
        for i in [0, 5, 1, 4, 2, 3, 5, 0] {
            let started = std::time::Instant::now();
            drop(cache.acquire(&format!("m{i}")).await.unwrap());
            let took = started.elapsed();
            cache.validate().unwrap();
            let device = backend.device().unwrap();
            assert!(device.live() <= BUDGET, "{} bytes live", device.live());
            println!("m{i}: {took:?}, {} bytes live", device.live());
        }
        let tasks: Vec<_> = (0..120)
            .map(|i| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    let lease = cache.acquire(&format!("m{}", (i * 7) % 6)).await.unwrap();
                    tokio::task::yield_now().await;
                    drop(lease);
                    cache.validate().unwrap();
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let device = backend.device().unwrap();
        println!("device: at most {} of {BUDGET} bytes live", device.max_live());
        assert_eq!(device.overcommits(), 0, "loads started without room on the device");
        assert!(device.max_live() <= BUDGET);
        let snap = cache.snapshot();
        assert_eq!(snap.releasing_bytes, 0);
        cache.validate().unwrap();
    }

    /// Issue 9, item 14: a slow release runs off the async threads (a one-thread runtime keeps
    /// serving hits meanwhile), and the load that needs its memory waits for it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_release_blocks_no_async_thread_and_the_load_waits_for_it() {
        const RELEASE: Duration = Duration::from_millis(300);
        let backend = TestBackend::on_device(Duration::from_millis(1), Duration::ZERO, 100, RELEASE);
        for model in ["a", "b", "c"] {
            sized(&backend, model, 50);
        }
        let cache = budget_cache(&backend, 10, 100);
        drop(cache.acquire("a").await.unwrap());
        drop(cache.acquire("b").await.unwrap());
        let started = std::time::Instant::now();
        let c = tokio::spawn({
            let cache = cache.clone();
            async move { cache.acquire("c").await }
        });
        tokio::task::yield_now().await; // c evicts a, whose release begins
        assert_eq!(cache.snapshot().releasing_bytes, 50);
        let hit = cache.acquire("b").await.unwrap();
        let hit_after = started.elapsed();
        println!("a hit during the release: after {hit_after:?}");
        assert_eq!(hit.outcome(), CacheOutcome::Hit);
        assert!(hit_after < RELEASE / 2, "the hit waited {hit_after:?} for the release");
        let c = c.await.unwrap().unwrap();
        println!("c waited {:?} for a's memory", c.queued());
        assert!(c.queued() >= RELEASE - Duration::from_millis(50), "c was admitted after {:?}", c.queued());
        assert_eq!(backend.device().unwrap().overcommits(), 0);
        assert_eq!(hints(&cache), ["c", "b"]);
        cache.validate().unwrap();
    }

    /// Many requests over more models than slots, from several threads: the cache never
    /// holds more than its capacity, and every request gets its model.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn never_exceeds_capacity_under_contention() {
        let backend = TestBackend::new(Duration::from_millis(1), Duration::ZERO);
        let cache = cache(&backend, 3);
        let watcher = tokio::spawn({
            let cache = cache.clone();
            async move {
                for _ in 0..200 {
                    assert!(cache.snapshot().hints.len() <= 3);
                    tokio::task::yield_now().await;
                }
            }
        });
        let tasks: Vec<_> = (0..400)
            .map(|i| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    let model = format!("m{}", (i * 7) % 8);
                    let lease = cache.acquire(&model).await.unwrap();
                    cache.validate().unwrap();
                    tokio::task::yield_now().await;
                    drop(lease);
                    cache.validate().unwrap();
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        watcher.await.unwrap();
        assert!(backend.max_live() <= 3, "max live {}", backend.max_live());
        assert!(cache.queued().is_empty());
        assert_eq!(hints(&cache).len(), 3);
    }

    /// The same with a memory budget and models of different sizes: the models held never
    /// take more than the budget.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn never_exceeds_the_budget_under_contention() {
        let backend = TestBackend::new(Duration::from_millis(1), Duration::ZERO);
        for i in 0..8u64 {
            sized(&backend, &format!("m{i}"), 10 + i * 10);
        }
        let cache = budget_cache(&backend, 8, 150);
        let watcher = tokio::spawn({
            let cache = cache.clone();
            async move {
                for _ in 0..200 {
                    let snap = cache.snapshot();
                    assert!(snap.reserved_bytes <= 150, "{snap:?}");
                    assert!(snap.resident_bytes.unwrap_or(0) <= 150, "{snap:?}");
                    tokio::task::yield_now().await;
                }
            }
        });
        let tasks: Vec<_> = (0..400)
            .map(|i| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    let model = format!("m{}", (i * 7) % 8);
                    let lease = cache.acquire(&model).await.unwrap();
                    cache.validate().unwrap();
                    tokio::task::yield_now().await;
                    drop(lease);
                    cache.validate().unwrap();
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        watcher.await.unwrap();
        assert!(cache.queued().is_empty());
        assert!(cache.snapshot().reserved_bytes <= 150);
    }
}
