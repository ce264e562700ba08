//! Hit-rate bounds on a trace: Belady's optimal eviction (MIN) and LRU, each on ONE cache of
//! `slots` models (runners x capacity). No router over separate runner caches can hit more often
//! than MIN on the pooled cache: any placement across runners is also a state of the pooled
//! cache, and replicas only waste room.

use std::collections::{BTreeMap, BinaryHeap, HashMap};

/// Hits and lookups counted from request `from` on (earlier requests only warm the cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// Requests that found their model cached.
    pub hits: u64,
    /// Requests counted.
    pub lookups: u64,
}

impl Count {
    /// `hits / lookups` (0 when nothing was counted).
    pub fn rate(&self) -> f64 {
        if self.lookups == 0 {
            0.0
        } else {
            self.hits as f64 / self.lookups as f64
        }
    }
}

/// Belady's MIN on a cache of `slots` models: on a miss the model (among the cached ones and the
/// new one) used farthest in the future is left out.
pub fn belady(models: &[u32], slots: usize, from: usize) -> Count {
    let n = models.len();
    let mut next = vec![usize::MAX; n];
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for i in (0..n).rev() {
        if let Some(m) = models.get(i) {
            if let (Some(&j), Some(slot)) = (seen.get(m), next.get_mut(i)) {
                *slot = j;
            }
            seen.insert(*m, i);
        }
    }
    // Cached models with their next use; the heap holds (next use, model), stale entries are
    // skipped when popped.
    let mut cached: HashMap<u32, usize> = HashMap::new();
    let mut heap: BinaryHeap<(usize, u32)> = BinaryHeap::new();
    let mut count = Count { hits: 0, lookups: 0 };
    for (i, (&m, &nx)) in models.iter().zip(next.iter()).enumerate() {
        let hit = cached.contains_key(&m);
        if i >= from {
            count.lookups += 1;
            count.hits += u64::from(hit);
        }
        cached.insert(m, nx);
        heap.push((nx, m));
        while cached.len() > slots {
            let Some((when, victim)) = heap.pop() else { break };
            if cached.get(&victim) == Some(&when) {
                cached.remove(&victim);
            }
        }
        // Keep the heap from growing without bound with stale entries.
        if heap.len() > 4 * slots + 64 {
            heap = cached.iter().map(|(&m, &w)| (w, m)).collect();
        }
    }
    count
}

/// LRU on a cache of `slots` models.
pub fn lru(models: &[u32], slots: usize, from: usize) -> Count {
    let mut last: HashMap<u32, usize> = HashMap::new();
    let mut order: BTreeMap<usize, u32> = BTreeMap::new();
    let mut count = Count { hits: 0, lookups: 0 };
    for (i, &m) in models.iter().enumerate() {
        let hit = if let Some(t) = last.get(&m) {
            order.remove(t);
            true
        } else {
            false
        };
        if i >= from {
            count.lookups += 1;
            count.hits += u64::from(hit);
        }
        last.insert(m, i);
        order.insert(i, m);
        if order.len() > slots {
            if let Some((_, victim)) = order.pop_first() {
                last.remove(&victim);
            }
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn belady_on_textbook_traces() {
        // The classic reference string with 3 frames: demand-paging OPT has 9 faults out of 20;
        // MIN with bypass (the new page may be the one left out) saves one more: at the first
        // 4 (never used again) it keeps 0, 2, 3.
        let s = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1];
        assert_eq!(belady(&s, 3, 0), Count { hits: 12, lookups: 20 });
        // LRU on the same string: 12 faults.
        assert_eq!(lru(&s, 3, 0), Count { hits: 8, lookups: 20 });
        // Cyclic a b c a b c ... with 2 slots: LRU never hits, MIN hits every other time
        // after the first pass (with bypass: keeps one of the two).
        let cyc: Vec<u32> = (0..12).map(|i| i % 3).collect();
        assert_eq!(lru(&cyc, 2, 0).hits, 0);
        assert_eq!(belady(&cyc, 2, 0).hits, 6);
        // Warm-up not counted.
        assert_eq!(belady(&[1, 1, 1], 1, 1), Count { hits: 2, lookups: 2 });
        assert_eq!(lru(&[1, 2, 1], 1, 2), Count { hits: 0, lookups: 1 });
        assert_eq!(belady(&[], 3, 0).rate(), 0.0);
    }

    #[test]
    fn belady_dominates_lru_on_random_traces() {
        let mut rng = crate::rng::Rng::new(9);
        for slots in [1, 2, 5] {
            let s: Vec<u32> = (0..2000).map(|_| rng.below(12) as u32).collect();
            let (b, l) = (belady(&s, slots, 0), lru(&s, slots, 0));
            assert!(b.hits >= l.hits, "slots {slots}: {b:?} {l:?}");
        }
    }
}
