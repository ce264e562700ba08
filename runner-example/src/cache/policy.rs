//! The cache's policy: what it holds, what to admit, what to evict. Synchronous and free of
//! locks, tasks and clocks: the caller ([`super::Shared`]) holds the lock, passes the time in,
//! and carries out the [`Effects`] returned (start loads, drop evicted models) once the lock
//! is released.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{CacheSnapshot, LoadFailed};
use crate::backend::{BackendError, LoadedModel};

/// The cache's fixed limits.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Models held at most (at least 1).
    pub(super) capacity: usize,
    /// Bytes held at most, if limited.
    pub(super) budget: Option<u64>,
    /// How long a failed load is answered from memory before the next request retries it.
    pub(super) backoff: Duration,
}

/// Progress of one model's load, broadcast to the requests waiting for it (single flight).
#[derive(Clone)]
pub(super) enum Phase {
    /// Waiting in the queue for a cache slot.
    Queued,
    /// Admitted (given a slot); loading.
    Loading,
    /// Load finished, admitted at the instant given. A successful load's model is in its
    /// entry, not here, so that evicting the entry frees it whoever still holds a receiver.
    Done(Result<(), BackendError>, Instant),
}

/// Everything the cache knows, behind its lock.
#[derive(Default)]
pub(super) struct State {
    /// Resident and loading models: the cache's slots.
    entries: HashMap<String, Entry>,
    /// Absent models that requests wait for, oldest first; none of them is in `entries`.
    queue: VecDeque<Queued>,
    /// Recent load failures, for the backoff.
    failures: HashMap<String, Failure>,
    /// Logical clock for LRU order.
    clock: u64,
    /// Source of record ids; see [`super::PinGuard`].
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

/// A model waiting in the queue, and the requests waiting for it.
pub(super) struct Queued {
    id: u64,
    model: String,
    pins: usize,
    /// The size hint (0 when unknown).
    bytes: u64,
    /// The model the router asked to evict to make room for this one (`x-hint-router-evict`,
    /// from the request that queued it), tried before the least recently used.
    evict: Option<String>,
    tx: watch::Sender<Phase>,
}

struct Failure {
    until: Instant,
    error: BackendError,
}

/// A load to start: model, record id, the channel its waiters listen on, admission instant.
pub(super) type StartLoad = (String, u64, watch::Sender<Phase>, Instant);

/// Work to do once the state lock is released.
#[derive(Default)]
#[must_use]
pub(super) struct Effects {
    /// Loads admitted.
    pub(super) start: Vec<StartLoad>,
    /// Evicted models, to drop inline.
    pub(super) evicted: Vec<Arc<dyn LoadedModel>>,
    /// Evicted models to drop on the blocking pool, each with the bytes it held; report each
    /// drop's end with [`State::released`].
    pub(super) release_blocking: Vec<(String, Arc<dyn LoadedModel>, u64)>,
    /// A queue entry nobody waits for any more, dropped with its channel.
    pub(super) abandoned: Option<Queued>,
}

/// What a pin found: the model, or the channel to wait on for its load.
pub(super) enum Found {
    Resident(Arc<dyn LoadedModel>),
    Wait(watch::Receiver<Phase>),
}

impl State {
    /// Pins `model` for a request arriving at `now`; `lookup` is what the backend said about
    /// the model ([`crate::backend::Backend::lookup`]). Returns what it found and the id of
    /// the record pinned, or why the request fails at once.
    pub(super) fn pin(
        &mut self,
        limits: &Limits,
        model: &str,
        evict: Option<&str>,
        lookup: Result<Option<u64>, BackendError>,
        now: Instant,
        effects: &mut Effects,
    ) -> Result<(Found, u64), LoadFailed> {
        if let Some(failure) = self.failures.get(model) {
            if failure.until > now {
                return Err(LoadFailed {
                    model: model.to_string(),
                    error: failure.error.clone(),
                    retry_after: failure.until.saturating_duration_since(now),
                });
            }
            self.failures.remove(model);
        }
        self.clock += 1;
        let clock = self.clock;
        if let Some(entry) = self.entries.get_mut(model) {
            entry.pins += 1;
            entry.last_used = clock;
            let found = match &entry.status {
                Status::Ready(m) => Found::Resident(Arc::clone(m)),
                Status::Loading(rx) => Found::Wait(rx.clone()),
            };
            return Ok((found, entry.id));
        }
        if let Some(queued) = self.queue.iter_mut().find(|q| q.model == model) {
            queued.pins += 1;
            return Ok((Found::Wait(queued.tx.subscribe()), queued.id));
        }
        // A model the backend does not know: answered before anything is queued or evicted.
        let size = lookup.map_err(|error| LoadFailed {
            model: model.to_string(),
            error,
            retry_after: Duration::ZERO,
        })?;
        let bytes = size.unwrap_or(0);
        if let Some(budget) = limits.budget.filter(|&budget| bytes > budget) {
            return Err(LoadFailed {
                model: model.to_string(),
                error: BackendError::TooLarge(format!(
                    "model {model} takes {bytes} bytes, more than the whole memory budget of \
                     {budget} bytes"
                )),
                retry_after: Duration::ZERO,
            });
        }
        self.next_id += 1;
        let id = self.next_id;
        let (tx, rx) = watch::channel(Phase::Queued);
        let evict = evict.map(str::to_string);
        self.queue.push_back(Queued { id, model: model.to_string(), pins: 1, bytes, evict, tx });
        self.admit(limits, now, effects);
        Ok((Found::Wait(rx), id))
    }

    /// Whether the cache can take a model of `incoming` bytes (`None`: no model; only check
    /// that it is within its budget) beside what it holds.
    fn fits(&self, limits: &Limits, incoming: Option<u64>) -> bool {
        self.fits_beside(limits, self.releasing, incoming)
    }

    /// [`State::fits`], as it will be once the releases under way are over.
    fn fits_once_released(&self, limits: &Limits, incoming: Option<u64>) -> bool {
        self.fits_beside(limits, Releasing::default(), incoming)
    }

    fn fits_beside(&self, limits: &Limits, releasing: Releasing, incoming: Option<u64>) -> bool {
        let slots = self.entries.len() + releasing.models + usize::from(incoming.is_some());
        if slots > limits.capacity {
            return false;
        }
        let Some(budget) = limits.budget else {
            return true;
        };
        held_bytes(self.entries.values(), releasing).saturating_add(incoming.unwrap_or(0)) <= budget
    }

    /// Admits queued models while room (a slot, and bytes under the budget) can be made,
    /// evicting unpinned resident models (first the one the head's request asked for, then
    /// the least recently used); also evicts while over the budget. Evicts
    /// nothing while the releases under way would make the room.
    fn admit(&mut self, limits: &Limits, now: Instant, effects: &mut Effects) {
        loop {
            let head = self.queue.front().map(|q| q.bytes);
            if !self.fits(limits, head) {
                if self.fits_once_released(limits, head) {
                    // Room is on its way: evict nothing more, wait for the releases.
                    return;
                }
                let evictable = |e: &Entry| e.pins == 0 && matches!(e.status, Status::Ready(_));
                // The model the router asked for, if it can go (it knows what the rest of the
                // fleet holds and how popular each model is); else the least recently used.
                let asked = self.queue.front().and_then(|q| q.evict.as_deref());
                let victim = asked
                    .filter(|name| self.entries.get(*name).is_some_and(evictable))
                    .map(str::to_string)
                    .or_else(|| {
                        let lru = self.entries.iter().filter(|(_, e)| evictable(e));
                        lru.min_by_key(|(_, e)| e.last_used).map(|(name, _)| name.clone())
                    });
                let Some(victim) = victim else {
                    // Every slot is pinned, loading or releasing: wait for an unpin, a load's
                    // end or a release's end.
                    return;
                };
                if let Some(Entry { status: Status::Ready(m), bytes, .. }) = self.entries.remove(&victim) {
                    log::info!("evicting model {victim} ({bytes} bytes)");
                    if m.release_blocks() {
                        self.releasing.models += 1;
                        self.releasing.bytes = self.releasing.bytes.saturating_add(bytes);
                        effects.release_blocking.push((victim, m, bytes));
                    } else {
                        effects.evicted.push(m);
                    }
                }
                continue;
            }
            let Some(queued) = self.queue.pop_front() else {
                return;
            };
            self.clock += 1;
            queued.tx.send_replace(Phase::Loading);
            self.entries.insert(
                queued.model.clone(),
                Entry {
                    id: queued.id,
                    pins: queued.pins,
                    last_used: self.clock,
                    bytes: queued.bytes,
                    status: Status::Loading(queued.tx.subscribe()),
                },
            );
            effects.start.push((queued.model, queued.id, queued.tx, now));
        }
    }

    /// Drops one pin of record `id` of `model`.
    pub(super) fn unpin(
        &mut self,
        limits: &Limits,
        model: &str,
        id: u64,
        now: Instant,
        effects: &mut Effects,
    ) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(entry) = self.entries.get_mut(model).filter(|e| e.id == id) {
            entry.pins = entry.pins.saturating_sub(1);
            entry.last_used = clock;
            if entry.pins == 0 && matches!(entry.status, Status::Ready(_)) {
                self.admit(limits, now, effects);
            }
        } else if let Some(pos) = self.queue.iter().position(|q| q.id == id) {
            let nobody_left = self.queue.get_mut(pos).is_some_and(|q| {
                q.pins = q.pins.saturating_sub(1);
                q.pins == 0
            });
            if nobody_left {
                // Nobody waits for it any more: never load it. The next in line may fit
                // where it did not.
                effects.abandoned = self.queue.remove(pos);
                self.admit(limits, now, effects);
            }
        }
        // Else the record is gone (its load failed): nothing to unpin.
    }

    /// The resident model of record `id` of `model`.
    pub(super) fn resident(&self, model: &str, id: u64) -> Option<Arc<dyn LoadedModel>> {
        match self.entries.get(model) {
            Some(Entry { id: entry_id, status: Status::Ready(m), .. }) if *entry_id == id => {
                Some(Arc::clone(m))
            }
            _ => None,
        }
    }

    /// Records the result, at `now`, of load `id` of `model`; returns what to tell its
    /// waiters.
    pub(super) fn finish_load(
        &mut self,
        limits: &Limits,
        model: &str,
        id: u64,
        result: Result<Arc<dyn LoadedModel>, BackendError>,
        now: Instant,
        effects: &mut Effects,
    ) -> Result<(), BackendError> {
        let Some(entry) = self.entries.get_mut(model).filter(|e| e.id == id) else {
            // Cannot happen: a loading entry is never evicted.
            return result.map(drop);
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
                self.admit(limits, now, effects);
                Ok(())
            }
            Err(error) => {
                log::warn!("loading model {model} failed: {error}");
                self.entries.remove(model);
                self.failures.retain(|_, f| f.until > now);
                if !limits.backoff.is_zero() {
                    self.failures.insert(
                        model.to_string(),
                        Failure { until: now + limits.backoff, error: error.clone() },
                    );
                }
                self.admit(limits, now, effects);
                Err(error)
            }
        }
    }

    /// An evicted model's memory (`bytes`) is released: its slot and bytes are free for
    /// queued models.
    pub(super) fn released(&mut self, limits: &Limits, bytes: u64, now: Instant, effects: &mut Effects) {
        self.releasing.models = self.releasing.models.saturating_sub(1);
        self.releasing.bytes = self.releasing.bytes.saturating_sub(bytes);
        self.admit(limits, now, effects);
    }

    /// The queued (at most `capacity`), loading and resident models, as advertised.
    pub(super) fn snapshot(&self, limits: &Limits) -> CacheSnapshot {
        let mut entries: Vec<(&String, &Entry)> = self.entries.iter().collect();
        entries.sort_by_key(|(_, e)| std::cmp::Reverse(e.last_used));
        let mut snap = CacheSnapshot {
            releasing_bytes: self.releasing.bytes,
            reserved_bytes: self.releasing.bytes,
            ..CacheSnapshot::default()
        };
        // Models queued for a slot first, the next to load first: a request for one joins its load
        // here. Unlisted, the router would take the runner's next answer (which lists only
        // its slots) to mean the load it sent is gone, send the model's next requests to
        // another runner, and put the victim it chose back in rotation here, so the victim
        // stays pinned and the queued load waits on (`docs/bench-routing.md`, "Loads that
        // wait for a slot"). At most `capacity` of them, so the list stays bounded.
        for queued in self.queue.iter().take(limits.capacity) {
            snap.hints.push(queued.model.clone());
            snap.loading.push(queued.model.clone());
        }
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

    /// How many requests wait for each model, in queue order.
    #[cfg(test)]
    pub(super) fn queued(&self) -> Vec<(String, usize)> {
        self.queue.iter().map(|q| (q.model.clone(), q.pins)).collect()
    }

    /// Pins held on a resident or loading model.
    #[cfg(test)]
    pub(super) fn pins(&self, model: &str) -> Option<usize> {
        self.entries.get(model).map(|e| e.pins)
    }

    /// Checks the invariants; `Err` names the first one broken. The byte check assumes
    /// every model's size hint told the truth.
    #[cfg(test)]
    pub(super) fn validate(&self, limits: &Limits) -> Result<(), String> {
        let slots = self.entries.len() + self.releasing.models;
        if slots > limits.capacity {
            return Err(format!("{slots} slots held, capacity {}", limits.capacity));
        }
        let mut queued = std::collections::HashSet::new();
        for q in &self.queue {
            if self.entries.contains_key(&q.model) {
                return Err(format!("model {} is both queued and held", q.model));
            }
            if !queued.insert(q.model.as_str()) {
                return Err(format!("model {} is queued twice", q.model));
            }
            if q.pins == 0 {
                return Err(format!("queued model {} has no pin", q.model));
            }
        }
        if let Some(budget) = limits.budget {
            let held = held_bytes(self.entries.values(), self.releasing);
            if held > budget {
                return Err(format!("{held} bytes held, budget {budget}"));
            }
        }
        if let Some(head) = self.queue.front() {
            let evictable =
                self.entries.values().any(|e| e.pins == 0 && matches!(e.status, Status::Ready(_)));
            let fits = self.fits(limits, Some(head.bytes));
            let soon = self.fits_once_released(limits, Some(head.bytes));
            if fits || (evictable && !soon) {
                return Err(format!("the queue's head {} could be admitted but waits", head.model));
            }
        }
        Ok(())
    }
}

/// Bytes counted against the budget: `entries` plus the releases under way.
fn held_bytes<'a>(entries: impl Iterator<Item = &'a Entry>, releasing: Releasing) -> u64 {
    entries.fold(releasing.bytes, |sum, e| sum.saturating_add(e.bytes))
}
