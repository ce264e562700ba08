//! Pins: the models requests are using on each runner, which a miss must not evict there
//! (runner-example never evicts a model in use: a load asked to would wait for a slot).
//!
//! [`Router::route`] pins what it routes and [`Router::observe`] releases it, which covers
//! one worker's requests. The other workers' come from the shared in-flight value
//! ([`crate::inflight`]) through [`Router::sync_pins`].

use super::Router;
use crate::inflight::{partition_pins, pin_at, PIN_BYTES};
use crate::placement::{Pins, MAX_PINS};

/// Whether `a` and `b` pin the same models (counts aside: only which models are in use moves
/// a runner's cost floor).
fn same_models(a: &Pins, b: &Pins) -> bool {
    a.len() == b.len() && b.iter().all(|&(h, _)| a.iter().any(|&(x, _)| x == h))
}

/// Entries compared at once while looking for where two pin lists differ (a 1 KiB `memcmp`).
const STRIDE: usize = 64;

/// How many of the chunks `a` and `b` yield are equal, pairwise, before the first that is not.
fn matching<'a>(a: impl Iterator<Item = &'a [u8]>, b: impl Iterator<Item = &'a [u8]>) -> usize {
    a.zip(b).take_while(|(x, y)| x == y).count()
}

/// How many whole entries `a` and `b` share from the start: strides first, then entries.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let big = STRIDE * PIN_BYTES;
    let k = matching(a.chunks_exact(big), b.chunks_exact(big)) * STRIDE;
    let (a, b) = (a.get(k * PIN_BYTES..).unwrap_or(&[]), b.get(k * PIN_BYTES..).unwrap_or(&[]));
    k + matching(a.chunks_exact(PIN_BYTES), b.chunks_exact(PIN_BYTES))
}

/// How many whole entries `a` and `b` share at the end (both whole entries long).
fn common_suffix<'a>(a: &'a [u8], b: &'a [u8]) -> usize {
    let big = STRIDE * PIN_BYTES;
    let k = matching(a.rchunks_exact(big), b.rchunks_exact(big)) * STRIDE;
    let head = |x: &'a [u8]| x.get(..x.len().saturating_sub(k * PIN_BYTES)).unwrap_or(&[]);
    k + matching(head(a).rchunks_exact(PIN_BYTES), head(b).rchunks_exact(PIN_BYTES))
}

impl Router {
    /// Counts a request for the hint with `hash` in flight on runner `idx`; false when not
    /// tracked (unknown runner, or too many distinct models there already).
    pub(super) fn pin(&mut self, idx: u32, hash: u64) -> bool {
        let Some(p) = self.pins.get_mut(idx as usize) else { return false };
        if let Some((_, c)) = p.iter_mut().find(|(h, _)| *h == hash) {
            *c = c.saturating_add(1);
            self.touch(idx);
            return true;
        }
        if p.len() >= MAX_PINS {
            return false;
        }
        p.push((hash, 1));
        self.touch(idx);
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
        self.touch(idx);
    }

    /// Notes that this worker changed runner `idx`'s pins since the last sync.
    fn touch(&mut self, idx: u32) {
        if !self.touched_since_sync.contains(&idx) {
            self.touched_since_sync.push(idx);
        }
    }

    /// Forgets every pin (the runners changed: what was pinned where is unknown).
    pub(super) fn forget_pins(&mut self) {
        self.pins.clear();
        self.synced_pins.clear();
        self.touched_since_sync.clear();
    }

    /// Replaces every pin with `shared`: the pin entries of the shared in-flight value
    /// ([`crate::inflight::pin_bytes`]), every worker's requests in flight in (runner, hash)
    /// order, this worker's own included (it writes its pins there too). Pins on unknown
    /// runners, and past [`MAX_PINS`] models on one runner, are left out.
    ///
    /// Under load the pins change on every request, usually one entry, and at 1,000 runners
    /// the value may hold thousands: so only the runners whose entries differ from the last
    /// sync's (the part between the longest common prefix and suffix of the two) or whose pins
    /// this worker changed since are rebuilt, each from its own run of entries, and only those
    /// whose set of pinned models changed have their cost floor recomputed. (Entries out of
    /// order, which no writer of ours makes, only make some pins go unseen.)
    pub fn sync_pins(&mut self, shared: &[u8]) {
        let old = std::mem::take(&mut self.synced_pins);
        let mut dirty = std::mem::take(&mut self.touched_since_sync);
        if old.as_slice() != shared {
            let prefix = common_prefix(&old, shared);
            let from = prefix * PIN_BYTES;
            let suffix = common_suffix(old.get(from..).unwrap_or(&[]), shared.get(from..).unwrap_or(&[]));
            for b in [&old[..], shared] {
                let end = (b.len() / PIN_BYTES).saturating_sub(suffix);
                dirty.extend((prefix..end).filter_map(|i| pin_at(b, i * PIN_BYTES)).map(|p| p.runner));
            }
        }
        dirty.sort_unstable();
        dirty.dedup();
        for &r in &dirty {
            // The run of runner `r`'s entries.
            let lo = partition_pins(shared, |p| p.runner < r);
            let hi = partition_pins(shared, |p| p.runner <= r);
            let Some(p) = self.pins.get_mut(r as usize) else { continue };
            let before: Pins = std::mem::take(p);
            let run = (lo..hi).filter_map(|i| pin_at(shared, i * PIN_BYTES)).filter(|x| x.count > 0);
            p.extend(run.take(MAX_PINS).map(|x| (x.hash, x.count)));
            if !same_models(&before, p) {
                self.refloor(r);
            }
        }
        dirty.clear();
        self.touched_since_sync = dirty;
        let mut kept = old;
        kept.clear();
        kept.extend_from_slice(shared);
        self.synced_pins = kept;
    }
}
