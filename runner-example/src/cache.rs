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
mod tests;
