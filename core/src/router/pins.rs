//! Pins: the models requests are using on each runner, which a miss must not evict there
//! (runner-example never evicts a model in use: a load asked to would wait for a slot).
//!
//! [`Router::route`] pins what it routes and [`Router::observe`] releases it, which covers
//! one worker's requests. The other workers' come from the shared in-flight value
//! ([`crate::inflight`]) through [`Router::sync_pins`].

use super::Router;
use crate::inflight::Pin;
use crate::placement::{Pins, MAX_PINS};

/// Whether `a` and `b` pin the same models (counts aside: only which models are in use moves
/// a runner's cost floor).
fn same_models(a: &Pins, b: &[(u32, u64, u32)]) -> bool {
    a.len() == b.len() && b.iter().all(|&(_, h, _)| a.iter().any(|&(x, _)| x == h))
}

impl Router {
    /// Counts a request for the hint with `hash` in flight on runner `idx`; false when not
    /// tracked (unknown runner, or too many distinct models there already).
    pub(super) fn pin(&mut self, idx: u32, hash: u64) -> bool {
        let Some(p) = self.pins.get_mut(idx as usize) else { return false };
        if let Some((_, c)) = p.iter_mut().find(|(h, _)| *h == hash) {
            *c = c.saturating_add(1);
            return true;
        }
        if p.len() >= MAX_PINS {
            return false;
        }
        p.push((hash, 1));
        if !self.pinned_since_sync.contains(&idx) {
            self.pinned_since_sync.push(idx);
        }
        self.refloor(idx);
        true
    }

    /// Releases one request's pin of `hash` on runner `idx`.
    pub(super) fn unpin(&mut self, idx: u32, hash: u64) {
        let Some(p) = self.pins.get_mut(idx as usize) else { return };
        let Some(k) = p.iter().position(|&(h, _)| h == hash) else { return };
        match p.get_mut(k) {
            Some((_, c)) if *c > 1 => *c -= 1,
            _ => {
                p.swap_remove(k);
                self.refloor(idx);
            }
        }
    }

    /// Forgets every pin (the runners changed: what was pinned where is unknown).
    pub(super) fn forget_pins(&mut self) {
        self.pins.clear();
        self.synced_pins.clear();
        self.pinned_since_sync.clear();
    }

    /// Replaces every pin with `shared`: the pins of all workers' requests in flight, as the
    /// shared in-flight value holds them, in (runner, hash) order (this worker's own
    /// included, since it writes its pins there too). Pins on unknown runners, and past
    /// [`MAX_PINS`] models on one runner, are left out. Only the runners whose entries differ
    /// from the last sync's, or that this worker pinned since, are rebuilt (a merge of the two
    /// sorted lists), and only those whose set of pinned models changed have their cost floor
    /// recomputed: under load the pins change on every request, usually on one runner.
    pub fn sync_pins(&mut self, shared: impl IntoIterator<Item = Pin>) {
        let n = self.pins.len();
        let mut next = std::mem::take(&mut self.pins_scratch);
        next.clear();
        next.extend(
            shared
                .into_iter()
                .filter(|p| (p.runner as usize) < n && p.count > 0)
                .map(|p| (p.runner, p.hash, p.count)),
        );
        if !next.windows(2).all(|w| matches!(w, [a, b] if (a.0, a.1) < (b.0, b.1))) {
            // Not from our writers (they keep the order): sort, one entry per pair.
            next.sort_unstable_by_key(|&(r, h, _)| (r, h));
            next.dedup_by(|b, a| {
                let same = a.0 == b.0 && a.1 == b.1;
                if same {
                    a.2 = a.2.saturating_add(b.2);
                }
                same
            });
        }
        let old = std::mem::take(&mut self.synced_pins);
        let mut dirty = std::mem::take(&mut self.pinned_since_sync);
        let (mut i, mut j) = (0, 0);
        loop {
            match (old.get(i), next.get(j)) {
                (Some(a), Some(b)) if a == b => (i, j) = (i + 1, j + 1),
                (Some(a), Some(b)) => {
                    let (ka, kb) = ((a.0, a.1), (b.0, b.1));
                    if ka <= kb {
                        dirty.push(a.0);
                        i += 1;
                    }
                    if kb <= ka {
                        dirty.push(b.0);
                        j += 1;
                    }
                }
                (Some(a), None) => {
                    dirty.push(a.0);
                    i += 1;
                }
                (None, Some(b)) => {
                    dirty.push(b.0);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        dirty.sort_unstable();
        dirty.dedup();
        for &r in &dirty {
            let lo = next.partition_point(|&(x, _, _)| x < r);
            let hi = next.partition_point(|&(x, _, _)| x <= r);
            let group = next.get(lo..hi).unwrap_or(&[]);
            let group = group.get(..MAX_PINS.min(group.len())).unwrap_or(group);
            let Some(p) = self.pins.get_mut(r as usize) else { continue };
            let same = same_models(p, group);
            p.clear();
            p.extend(group.iter().map(|&(_, h, c)| (h, c)));
            if !same {
                self.refloor(r);
            }
        }
        dirty.clear();
        self.pinned_since_sync = dirty;
        self.synced_pins = next;
        self.pins_scratch = old;
    }
}
