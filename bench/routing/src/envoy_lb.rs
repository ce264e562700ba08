//! Envoy's own load-balancing policies, ported for the simulator from Envoy's source
//! (`round_robin`, `least_request` with two choices, `ring_hash` and its bounded-load variant
//! `hash_balance_factor`). Ring entries and header hashes use xxHash64 exactly as Envoy does, so
//! given the same runner addresses the simulator maps each hint to the same runner as Envoy.

use crate::rng::Rng;
use rand_mt::Mt;
use xxhash_rust::xxh64::xxh64;

/// Envoy's ring (`RingHashLoadBalancer::Ring`) with default sizes (min 1024, max 8M entries).
#[derive(Debug, Clone)]
pub struct Ring {
    entries: Vec<(u64, u32)>,
}

impl Ring {
    /// Builds the ring for equally weighted hosts named `addrs` (`ip:port`).
    pub fn new(addrs: &[String]) -> Ring {
        Ring::with_min_size(addrs, 1024)
    }

    /// As [`Ring::new`] with another `minimum_ring_size`.
    pub fn with_min_size(addrs: &[String], min_ring_size: u64) -> Ring {
        let n = addrs.len();
        let mut entries = Vec::new();
        if n == 0 {
            return Ring { entries };
        }
        let weight = 1.0 / n as f64;
        let scale = ((weight * min_ring_size as f64).ceil() / weight).min(8_388_608.0);
        let mut current = 0.0f64;
        let mut target = 0.0f64;
        for (idx, addr) in addrs.iter().enumerate() {
            target += scale * weight;
            let mut i = 0u64;
            while current < target {
                let key = format!("{addr}_{i}");
                entries.push((xxh64(key.as_bytes(), 0), idx as u32));
                i += 1;
                current += 1.0;
            }
        }
        entries.sort_by_key(|e| e.0);
        Ring { entries }
    }

    /// The host for hash `h` (Envoy's ketama-style search, quirks included).
    pub fn pick(&self, h: u64) -> Option<u32> {
        let size = self.entries.len() as i64;
        if size == 0 {
            return None;
        }
        let (mut lowp, mut highp) = (0i64, size);
        let mut midp;
        loop {
            midp = (lowp + highp) / 2;
            if midp == size {
                midp = 0;
                break;
            }
            let midval = self.entries.get(midp as usize).map(|e| e.0).unwrap_or(0);
            let midval1 =
                if midp == 0 { 0 } else { self.entries.get(midp as usize - 1).map(|e| e.0).unwrap_or(0) };
            if h <= midval && h > midval1 {
                break;
            }
            if midval < h {
                lowp = midp + 1;
            } else {
                highp = midp - 1;
            }
            if lowp > highp {
                midp = 0;
                break;
            }
        }
        self.entries.get(midp as usize).map(|e| e.1)
    }
}

/// The hash Envoy's route `hash_policy` computes for a single header value.
pub fn header_hash(value: &str) -> u64 {
    xxh64(value.as_bytes(), 0)
}

/// Envoy's bounded-load choice (`BoundedLoadHashingLoadBalancer`): the ring's host unless it
/// has more than `factor/100 x (total active + 1)` (rounded up, at least 1) requests active;
/// then other hosts in a random order seeded by the hash, the first within bound, else the
/// least overloaded.
pub fn bounded_pick(ring: &Ring, hash: u64, factor: u32, active: &[u32]) -> Option<u32> {
    let host = ring.pick(hash)?;
    let n = active.len() as u32;
    if n == 0 {
        return Some(host);
    }
    let total: u64 = active.iter().map(|&a| u64::from(a)).sum();
    let total_slots = ((total + 1) * u64::from(factor)).div_ceil(100);
    let slots = ((total_slots as f64 * (1.0 / f64::from(n))).ceil() as u64).max(1);
    let overload = |h: u32| active.get(h as usize).copied().unwrap_or(0) as f64 / slots as f64;
    let mut least = (overload(host), host);
    if least.0 <= 1.0 {
        return Some(host);
    }
    let mut index: Vec<u32> = (0..n).collect();
    // std::mt19937 seeded with the hash (Envoy's seed is its 32 low bits).
    let mut random = Mt::new(hash as u32);
    let uniform = |random: &mut Mt, k: u32| -> u32 {
        let bucket = (1u64 << 32) / u64::from(k);
        loop {
            let x = (u64::from(random.next_u32()) / bucket) as u32;
            if x < k {
                return x;
            }
        }
    };
    for i in 0..n {
        let j = uniform(&mut random, n - i);
        index.swap(i as usize, (i + j) as usize);
        let alt = index.get(i as usize).copied().unwrap_or(host);
        if alt == host {
            continue;
        }
        let f = overload(alt);
        if f <= 1.0 {
            return Some(alt);
        }
        if least.0 > f {
            least = (f, alt);
        }
    }
    Some(least.1)
}

/// Envoy's `least_request` with the default two choices: two hosts drawn at random (possibly
/// the same), the one with fewer active requests (the first on a tie).
pub fn least_request_pick(rng: &mut Rng, active: &[u32]) -> Option<u32> {
    let n = active.len() as u64;
    if n == 0 {
        return None;
    }
    let a = rng.below(n) as u32;
    let b = rng.below(n) as u32;
    let load = |h: u32| active.get(h as usize).copied().unwrap_or(0);
    Some(if load(b) < load(a) { b } else { a })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_and_the_generator_are_envoys() {
        // xxHash64 (Envoy's HashUtil::xxHash64, seed 0) reference vectors.
        assert_eq!(xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
        assert_eq!(xxh64(b"Nobody inspects the spammish repetition", 0), 0xFBCE_A83C_8A37_8BF1);
        // The C++ standard requires the 10000th output of a default-seeded mt19937 to be this.
        let mut m = Mt::new(5489);
        assert_eq!(m.next_u32(), 3_499_211_612);
        let last = (1..10_000).map(|_| m.next_u32()).last();
        assert_eq!(last, Some(4_123_659_995));
    }

    fn addrs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("127.0.0.1:{}", 18081 + i)).collect()
    }

    #[test]
    fn ring_has_envoys_size_and_spreads_keys() {
        let r = Ring::new(&addrs(8));
        assert_eq!(r.entries.len(), 1024);
        let r3 = Ring::new(&addrs(3));
        assert_eq!(r3.entries.len(), 1026); // ceil(1024/3) per host
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[r.pick(header_hash(&format!("k{i}"))).unwrap() as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (700..1300).contains(&c)), "{counts:?}");
        // The same key always maps to the same host.
        assert_eq!(r.pick(header_hash("m00001")), r.pick(header_hash("m00001")));
        assert_eq!(Ring::new(&[]).pick(1), None);
    }

    #[test]
    fn bounded_load_spills_only_when_over_the_bound() {
        let r = Ring::new(&addrs(4));
        let h = header_hash("m00000");
        let home = r.pick(h).unwrap();
        let mut active = vec![0u32; 4];
        assert_eq!(bounded_pick(&r, h, 150, &active), Some(home));
        // total 1 -> slots ceil(ceil(2*1.5)/4) = 1: one active on home is still within bound.
        active[home as usize] = 1;
        assert_eq!(bounded_pick(&r, h, 150, &active), Some(home));
        active[home as usize] = 6;
        let alt = bounded_pick(&r, h, 150, &active).unwrap();
        assert_ne!(alt, home);
        // Deterministic for a hash.
        assert_eq!(bounded_pick(&r, h, 150, &active), Some(alt));
    }

    #[test]
    fn least_request_prefers_the_idle_host() {
        let mut rng = Rng::new(1);
        let active = [5, 0, 5, 5];
        let picks: Vec<u32> = (0..1000).filter_map(|_| least_request_pick(&mut rng, &active)).collect();
        let idle = picks.iter().filter(|&&p| p == 1).count();
        // P(at least one of two draws is host 1) = 1 - (3/4)^2 = 0.4375.
        assert!((380..500).contains(&idle), "{idle}");
    }
}
