//! The hint -> holders index of a [`super::View`], keyed by the hint's 64-bit model hash
//! ([`crate::popularity::hint_hash`], XXH3-64), which the router computes once per request
//! anyway: a hit then looks its holders up without hashing the hint string a second time.
//!
//! Clients can craft XXH3 collisions (a miss lists its hint on a runner), so a hash alone
//! never names a hint: each entry keeps its hint and a lookup compares it. A hint whose hash
//! an entry for another hint already has goes to `collided`, a map keyed by the string (empty,
//! and allocating nothing, unless such hints are listed): every hint keeps exactly its own
//! holders, whatever its hash. A hint is in one of the two maps at most.

use super::{FastMap, Holders};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Passes a u64 key through as its hash: XXH3's output is already well mixed, so hashing it
/// again would only cost time.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the keys are u64); anything else still hashes, FxHash-like.
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// One indexed hint. The hint is a `Box<str>`, not a `String`: with the u64 key, an entry is
/// no larger than the `(String, Holders)` of the string-keyed map it replaced on 64-bit
/// targets, and 8 bytes larger (40 against 32) on wasm32, where the key aligns the pair to 8.
#[derive(Debug, Clone)]
struct Entry {
    hint: Box<str>,
    holders: Holders,
}

/// Hint -> runners listing it (see the module documentation).
#[derive(Debug, Clone, Default)]
pub(super) struct HintIndex {
    by_hash: HashMap<u64, Entry, BuildHasherDefault<PassThrough>>,
    /// Hints whose hash an entry of `by_hash` for another hint had when they were added.
    collided: FastMap<String, Holders>,
}

impl HintIndex {
    /// An index with room for `n` hints.
    pub(super) fn with_capacity(n: usize) -> HintIndex {
        HintIndex { by_hash: HashMap::with_capacity_and_hasher(n, Default::default()), ..Default::default() }
    }

    /// Runners listing `hint`, whose [`crate::popularity::hint_hash`] is `hash`.
    #[inline]
    pub(super) fn get(&self, hint: &str, hash: u64) -> &[u32] {
        match self.by_hash.get(&hash) {
            Some(e) if *e.hint == *hint => &e.holders,
            // Not found, or another hint with the same hash: only `collided` may have it.
            _ if self.collided.is_empty() => &[],
            _ => self.collided.get(hint).map(|h| h.as_slice()).unwrap_or(&[]),
        }
    }

    /// Lists runner `idx` under `hint` (hash `hash`), after the runners already listed.
    pub(super) fn add(&mut self, hint: &str, hash: u64, idx: u32) {
        // Where the hint already is, if anywhere: `collided` first (its hash's entry in
        // `by_hash` may have gone since, and the hint must not get a second list).
        if let Some(list) = self.collided.get_mut(hint) {
            list.push(idx);
            return;
        }
        match self.by_hash.get_mut(&hash) {
            Some(e) if *e.hint == *hint => e.holders.push(idx),
            Some(_) => {
                self.collided.insert(hint.to_owned(), smallvec::smallvec![idx]);
            }
            None => {
                self.by_hash.insert(hash, Entry { hint: hint.into(), holders: smallvec::smallvec![idx] });
            }
        }
    }

    /// Unlists runner `idx` from `hint` (hash `hash`); a hint left with no runner is dropped.
    pub(super) fn remove(&mut self, hint: &str, hash: u64, idx: u32) {
        if let Some(e) = self.by_hash.get_mut(&hash).filter(|e| *e.hint == *hint) {
            e.holders.retain(|x| *x != idx);
            if e.holders.is_empty() {
                self.by_hash.remove(&hash);
            }
        } else if let Some(list) = self.collided.get_mut(hint) {
            list.retain(|x| *x != idx);
            if list.is_empty() {
                self.collided.remove(hint);
            }
        }
    }

    /// Number of distinct hints indexed.
    pub(super) fn len(&self) -> usize {
        self.by_hash.len() + self.collided.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::popularity::hint_hash;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn hints_with_the_same_hash_keep_their_own_holders() {
        // "a", "b" and "c" all given hash 7: a crafted collision.
        let mut x = HintIndex::default();
        x.add("a", 7, 0);
        x.add("b", 7, 1);
        x.add("c", 7, 2);
        x.add("b", 7, 3);
        x.add("a", 7, 4);
        assert_eq!((x.get("a", 7), x.get("b", 7), x.get("c", 7)), (&[0, 4][..], &[1, 3][..], &[2][..]));
        assert!(x.get("d", 7).is_empty(), "an unlisted hint with that hash has no holders");
        assert_eq!(x.len(), 3);
        // The hint that owns the hash's entry leaves: the others keep theirs, and a hint
        // listed again goes back to where it is, never to a second list.
        x.remove("a", 7, 0);
        x.remove("a", 7, 4);
        assert!(x.get("a", 7).is_empty());
        assert_eq!((x.get("b", 7), x.get("c", 7)), (&[1, 3][..], &[2][..]));
        x.add("b", 7, 5);
        x.add("a", 7, 6);
        assert_eq!((x.get("a", 7), x.get("b", 7), x.get("c", 7)), (&[6][..], &[1, 3, 5][..], &[2][..]));
        // Removing a runner a hint does not list, or a hint not indexed, changes nothing.
        x.remove("c", 7, 9);
        x.remove("d", 7, 2);
        assert_eq!(x.get("c", 7), &[2]);
        for (h, i) in [("b", 1), ("b", 3), ("b", 5), ("c", 2), ("a", 6)] {
            x.remove(h, 7, i);
        }
        assert_eq!(x.len(), 0);
        assert!(x.collided.is_empty());
    }

    #[test]
    fn a_hint_found_by_its_own_hash_only() {
        let mut x = HintIndex::default();
        for (i, h) in ["m1", "m2", "m3"].into_iter().enumerate() {
            x.add(h, hint_hash(h), i as u32);
        }
        assert_eq!(x.get("m2", hint_hash("m2")), &[1]);
        assert!(x.get("m2", hint_hash("m1")).is_empty(), "the entry under that hash is m1's");
        assert!(x.collided.is_empty());
    }

    #[test]
    fn an_entry_is_about_as_large_as_the_string_keyed_one() {
        use std::mem::size_of;
        // 64-bit: no larger. wasm32 (the filter's target): the u64 key aligns the pair to 8
        // bytes, so it is 8 bytes larger (40 against 32), per distinct hint held.
        let slack = if cfg!(target_pointer_width = "32") { 8 } else { 0 };
        let (new, old) = (size_of::<(u64, Entry)>(), size_of::<(String, Holders)>());
        assert!(new <= old + slack, "{new} > {old} + {slack}");
    }
}
