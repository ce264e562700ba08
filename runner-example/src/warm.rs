//! The warm tier (`--host-cache-mb N`): verified weights kept in host memory, so that loading
//! a model the device dropped costs a host-to-device copy instead of a disk read and checks.
//!
//! It lives inside a backend, below the runner's cache: the cache decides what is resident
//! (on the device), the tier only remembers host copies. Every model a backend reads from disk
//! is offered to the tier; a load asks the tier first. The tier is inclusive: resident models
//! keep their host copy too (so that evicting one costs nothing: no copy back from the device),
//! and the budget counts every copy it holds. Least recently used copies go first when a new
//! one does not fit; a model bigger than the whole budget is not kept.
//!
//! [`WarmTier::warm`] lists the copies of models that are not resident (the `warm` list of
//! `/hints`): a router can prefer a runner where a miss is cheap. Nothing here does I/O or
//! holds its lock during a copy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Host copies of verified weights, least recently used first out, within a byte budget.
/// `T` is the backend's host buffer (pageable memory for cpu, pinned memory for cuda).
#[derive(Debug)]
pub struct WarmTier<T> {
    budget: u64,
    inner: Mutex<Inner<T>>,
}

#[derive(Debug)]
struct Inner<T> {
    /// Most recently used last.
    entries: Vec<Entry<T>>,
    bytes: u64,
    /// Resident models (live `LoadedModel`s) by name, with how many are live.
    resident: HashMap<String, usize>,
}

#[derive(Debug)]
struct Entry<T> {
    model: String,
    bytes: u64,
    copy: Arc<T>,
}

impl<T> WarmTier<T> {
    /// An empty tier of `budget` bytes.
    pub fn new(budget: u64) -> Self {
        Self { budget, inner: Mutex::new(Inner { entries: Vec::new(), bytes: 0, resident: HashMap::new() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The budget, in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes of host copies held now.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// The host copy of `model`, if the tier holds one (it becomes the most recently used).
    pub fn get(&self, model: &str) -> Option<Arc<T>> {
        let mut inner = self.lock();
        let i = inner.entries.iter().position(|e| e.model == model)?;
        let entry = inner.entries.remove(i);
        let copy = Arc::clone(&entry.copy);
        inner.entries.push(entry);
        Some(copy)
    }

    /// Keeps `copy` (`bytes` long) of `model`, evicting the least recently used copies until
    /// it fits. A copy bigger than the whole budget is not kept. Returns whether it was kept.
    /// The copies evicted are dropped after the lock is released.
    pub fn insert(&self, model: &str, bytes: u64, copy: Arc<T>) -> bool {
        if bytes > self.budget {
            return false;
        }
        let mut evicted = Vec::new();
        {
            let mut inner = self.lock();
            if let Some(i) = inner.entries.iter().position(|e| e.model == model) {
                let old = inner.entries.remove(i);
                inner.bytes -= old.bytes;
                evicted.push(old);
            }
            while inner.bytes + bytes > self.budget && !inner.entries.is_empty() {
                let old = inner.entries.remove(0);
                inner.bytes -= old.bytes;
                log::debug!("warm tier: dropped the host copy of {} ({} bytes)", old.model, old.bytes);
                evicted.push(old);
            }
            inner.bytes += bytes;
            inner.entries.push(Entry { model: model.to_string(), bytes, copy });
        }
        drop(evicted);
        true
    }

    /// Models whose host copy the tier holds, most recently used first.
    pub fn held(&self) -> Vec<String> {
        self.lock().entries.iter().rev().map(|e| e.model.clone()).collect()
    }

    /// Models the tier holds that are not resident: a miss on them is a copy, not a read.
    /// Most recently used first.
    pub fn warm(&self) -> Vec<String> {
        let inner = self.lock();
        inner
            .entries
            .iter()
            .rev()
            .filter(|e| !inner.resident.contains_key(&e.model))
            .map(|e| e.model.clone())
            .collect()
    }

    /// Marks one more live copy of `model` on the device.
    pub fn resident(&self, model: &str) {
        *self.lock().resident.entry(model.to_string()).or_default() += 1;
    }

    /// Marks one live copy of `model` on the device gone.
    pub fn released(&self, model: &str) {
        let mut inner = self.lock();
        if let Some(n) = inner.resident.get_mut(model) {
            *n -= 1;
            if *n == 0 {
                inner.resident.remove(model);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_copies_within_the_budget_least_recently_used_out() {
        let tier = WarmTier::new(100);
        assert!(tier.insert("a", 40, Arc::new(1)));
        assert!(tier.insert("b", 40, Arc::new(2)));
        assert_eq!(tier.held(), ["b", "a"]);
        // "a" used: "b" is now the least recently used.
        assert_eq!(tier.get("a").as_deref(), Some(&1));
        assert!(tier.insert("c", 40, Arc::new(3)));
        assert_eq!(tier.held(), ["c", "a"]);
        assert_eq!(tier.bytes(), 80);
        assert!(tier.get("b").is_none());
        // Too big for the whole budget: not kept, nothing evicted.
        assert!(!tier.insert("huge", 101, Arc::new(4)));
        assert_eq!(tier.held(), ["c", "a"]);
        // Exactly the budget: everything else goes.
        assert!(tier.insert("full", 100, Arc::new(5)));
        assert_eq!(tier.held(), ["full"]);
        assert_eq!(tier.bytes(), 100);
        // Re-inserting a model replaces its copy.
        assert!(tier.insert("full", 10, Arc::new(6)));
        assert_eq!((tier.bytes(), tier.get("full").as_deref()), (10, Some(&6)));
    }

    #[test]
    fn warm_lists_only_models_not_resident() {
        let tier = WarmTier::new(100);
        tier.insert("a", 10, Arc::new(()));
        tier.insert("b", 10, Arc::new(()));
        tier.resident("a");
        tier.resident("a");
        assert_eq!(tier.warm(), ["b"]);
        tier.released("a");
        assert_eq!(tier.warm(), ["b"]);
        tier.released("a");
        assert_eq!(tier.warm(), ["b", "a"]);
        tier.released("never-resident");
        assert_eq!(tier.warm(), ["b", "a"]);
    }

    #[test]
    fn an_evicted_copy_in_use_stays_alive_for_its_user() {
        let tier = WarmTier::new(10);
        tier.insert("a", 10, Arc::new(String::from("weights")));
        let in_use = tier.get("a").unwrap();
        tier.insert("b", 10, Arc::new(String::new()));
        assert_eq!(tier.held(), ["b"]);
        assert_eq!(in_use.as_str(), "weights");
    }
}
