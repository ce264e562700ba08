//! A bounded estimate of how often each hint is requested: a count-min sketch with
//! conservative update and periodic halving (the frequency part of TinyLFU).
//!
//! Memory is fixed ([`Popularity::bytes`], 4 KiB of counters), whatever the number of distinct
//! hints clients send: a one-off hint costs nothing but a few counter increments that age away.
//! Collisions can only make a hint look more popular than it is, never less.

/// Counters per row (a power of two).
const WIDTH: usize = 1024;
/// Rows (independent hash functions).
const ROWS: usize = 4;
/// Fewest increments between two halvings.
const MIN_WINDOW: u32 = 256;

/// The hash the sketch is indexed by (one per request; reused for every row), and the hint's
/// tie-break order among runners. The same on every platform (FxHash's is not: it works in
/// `usize`), so the filter (wasm32) and the simulator and tests (native) decide alike, and so
/// do Envoys on different machines: XXH3-64, whose output is frozen by its specification.
/// (It replaced FNV-1a, which took one multiply per byte, a serial chain that was a tenth of
/// a hit's decision.)
pub fn hint_hash(hint: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(hint.as_bytes())
}

/// Request frequencies of hints, decayed: every `window` increments all counters halve, so
/// the estimate follows shifts in popularity within a few windows.
#[derive(Debug, Clone)]
pub struct Popularity {
    counters: Vec<u8>,
    added: u32,
    window: u32,
}

impl Default for Popularity {
    fn default() -> Self {
        Popularity { counters: vec![0; WIDTH * ROWS], added: 0, window: MIN_WINDOW }
    }
}

#[inline]
fn slot(hash: u64, row: usize) -> usize {
    row * WIDTH + ((hash >> (16 * row)) as usize & (WIDTH - 1))
}

impl Popularity {
    /// Sets the number of increments between halvings (at least 256). The router sizes it
    /// from the fleet's cache slots, the way TinyLFU sizes its sample from the cache.
    pub fn set_window(&mut self, window: u32) {
        self.window = window.max(MIN_WINDOW);
    }

    /// Counts one request for the hint with hash `hash`. Returns whether every counter was
    /// halved (estimates only grow otherwise).
    #[inline]
    pub fn record(&mut self, hash: u64) -> bool {
        let min = self.estimate(hash);
        if min < u8::MAX {
            // Conservative update: only the counters at the minimum move.
            for row in 0..ROWS {
                if let Some(c) = self.counters.get_mut(slot(hash, row)) {
                    if *c == min {
                        *c = min + 1;
                    }
                }
            }
        }
        self.added += 1;
        if self.added >= self.window {
            self.added = 0;
            for c in &mut self.counters {
                *c >>= 1;
            }
            return true;
        }
        false
    }

    /// The decayed count of the hint with hash `hash` (an over-estimate at worst).
    #[inline]
    pub fn estimate(&self, hash: u64) -> u8 {
        let mut min = u8::MAX;
        for row in 0..ROWS {
            min = min.min(self.counters.get(slot(hash, row)).copied().unwrap_or(0));
        }
        min
    }

    /// Bytes this estimate occupies (fixed).
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.counters.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn hot_hints_outrank_one_offs_and_memory_stays_fixed() {
        let mut p = Popularity::default();
        p.set_window(100_000);
        let before = p.bytes();
        let hot = hint_hash("hot");
        for i in 0..100_000u32 {
            if i % 10 == 0 {
                p.record(hot);
            } else {
                p.record(hint_hash(&format!("one-off-{i}")));
            }
        }
        assert_eq!(p.bytes(), before, "no growth with 90,000 distinct hints");
        assert!(before <= 8 * 1024, "{before} bytes");
        let one_off = p.estimate(hint_hash("one-off-7"));
        assert!(p.estimate(hot) > 4 * one_off.max(1), "hot {} one-off {one_off}", p.estimate(hot));
        assert_eq!(Popularity::default().estimate(hint_hash("never-seen")), 0);
    }

    #[test]
    fn counts_decay_so_a_shift_is_followed() {
        let mut p = Popularity::default();
        p.set_window(0); // clamped to the minimum window
        let (old, new) = (hint_hash("old"), hint_hash("new"));
        for _ in 0..200 {
            p.record(old);
        }
        assert_eq!(p.estimate(old), 200);
        for _ in 0..(4 * MIN_WINDOW) {
            p.record(new);
        }
        assert!(p.estimate(new) > 10 * p.estimate(old).max(1), "{} {}", p.estimate(new), p.estimate(old));
        // Saturates instead of wrapping.
        for _ in 0..1000 {
            p.record(new);
        }
        assert!(p.estimate(new) >= 100);
    }
}
