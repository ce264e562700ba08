//! The routing decision: an ordered list of candidate runners for one request.
//!
//! The rules (fal's, plus tie-breaks):
//! 1. With a hint, runners holding it that are not busy, fewest in flight first.
//! 2. Otherwise (no holder, or every holder busy) any available runner that is not busy:
//!    first those that report the model `warm` (a load from host memory), then the others;
//!    within each, cheapest eviction first (a free cache slot costs nothing; see [`rank_by`]),
//!    then in the hint's own order (so that independent workers and Envoys agree).
//! 3. Without a hint, any available runner that is not busy, fewest in flight.
//!
//! Among holders, a runner whose capacity is unknown (0) comes after every runner with a known
//! capacity that holds the hint honestly, and a runner that claims more hints than its
//! capacity (see [`crate::table::ViewRunner::overclaims`]) after both, so a runner that
//! advertises everything cannot take traffic away from runners that really hold the model.
//! For a miss, a runner of unknown capacity is never taken for one with a free slot: it comes
//! after every runner whose capacity is known.
//!
//! Nothing ever waits: when every runner is busy the request still gets a list (holders
//! first, then the least loaded), and when no runner is available the list is empty and
//! Envoy's fallback policy picks. Ties rotate by `spin`: the router derives it from the hint
//! (every proxy orders a model's candidates alike, and different models start at different
//! runners) and, without a hint, from a per-request counter.

use crate::table::{View, ViewRunner};
use smallvec::SmallVec;

#[cfg(test)]
pub(crate) mod reference;
mod scan;

/// Eviction cost of a runner whose capacity is unknown: after every known one.
pub const UNKNOWN_CAPACITY_COST: u32 = u32::MAX;

/// The eviction cost [`rank`] uses: 0 for a free slot, 1 for a full cache,
/// [`UNKNOWN_CAPACITY_COST`] when the capacity is unknown.
#[inline]
pub fn slot_cost(r: &ViewRunner) -> u32 {
    if r.capacity == 0 {
        UNKNOWN_CAPACITY_COST
    } else if (r.hints.len() as u64) < u64::from(r.capacity) {
        0
    } else {
        1
    }
}

/// Order of holders: honest with a known capacity, unknown capacity, over-claiming.
#[inline]
fn holder_class(r: &ViewRunner) -> u8 {
    if r.overclaims() {
        2
    } else {
        u8::from(r.capacity == 0)
    }
}

/// How the first candidate was chosen (counted in Envoy stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A runner holding the hint, not busy.
    Hit,
    /// No available runner holds the hint.
    Miss,
    /// Holders exist but all are busy; sent to another runner.
    BusyFallback,
    /// Every available runner is busy (or, after the router's `when_holders_busy` turn, each
    /// one that is not would make a load wait for a cache slot); sent to the least loaded (a
    /// holder when possible).
    Saturated,
    /// The request had no (valid) hint.
    NoHint,
    /// No runner is available; the list is empty and Envoy's fallback policy decides.
    NoCandidates,
}

impl Outcome {
    /// Stable lower-case name (for stats and debug headers).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::BusyFallback => "busy_fallback",
            Outcome::Saturated => "saturated",
            Outcome::NoHint => "no_hint",
            Outcome::NoCandidates => "no_candidates",
        }
    }
}

/// In-flight count of runner `idx` (0 when unknown).
#[inline]
fn load(inflight: &[u32], idx: u32) -> u32 {
    inflight.get(idx as usize).copied().unwrap_or(0)
}

/// Sort key of a candidate: (tier, eviction cost, load, rotation).
type Key = (u8, u32, u32, u32);

/// [`Key`] as one integer with the same order (each field in its own bits, the tier highest):
/// comparing it is one compare, and storing it does not read back a tuple just written field
/// by field (a 16-byte load over four narrower stores stalls store-to-load forwarding; that
/// stall was a fifth of a hit's decision).
#[inline]
fn packed((tier, cost, load, rot): Key) -> u128 {
    (u128::from(tier) << 96) | (u128::from(cost) << 64) | (u128::from(load) << 32) | u128::from(rot)
}

/// Keeps the `k` smallest `(key, idx)` pairs, sorted. Inline up to 4 (the usual `k` is 3), so
/// the hit path allocates nothing.
struct TopK {
    k: usize,
    items: SmallVec<[(u128, u32); 4]>,
}

impl TopK {
    fn new(k: usize) -> TopK {
        TopK { k, items: SmallVec::new() }
    }

    // Always inlined: a hit offers each holder, and out of line the call was a tenth of it.
    #[inline(always)]
    fn offer(&mut self, key: Key, idx: u32) {
        let key = packed(key);
        if self.items.len() >= self.k {
            match self.items.last() {
                Some(&(worst, _)) if key < worst => {
                    self.items.pop();
                }
                _ => return,
            }
        }
        // Sinks into place from the end, after its equals (a few entries: no `memmove`).
        self.items.push((key, idx));
        let items = self.items.as_mut_slice();
        let mut j = items.len().saturating_sub(1);
        while j > 0 && items.get(j - 1).is_some_and(|&(k, _)| k > key) {
            items.swap(j - 1, j);
            j -= 1;
        }
    }

    fn first_tier(&self) -> Option<u8> {
        self.items.first().map(|&(k, _)| (k >> 96) as u8)
    }

    // By reference: taken by value, the whole `TopK` (176 bytes) was copied first, a
    // `memmove` that was a twelfth of a hit.
    fn drain_into(&self, out: &mut Vec<u32>) {
        for &(_, i) in &self.items {
            out.push(i);
        }
    }
}

/// Ranks candidates for a request with `hint`, writing at most `max` runner indexes to `out`
/// (cleared first), best first. `inflight[i]` is the number of requests in flight to runner
/// `i` across all workers.
pub fn rank(
    view: &View,
    hint: Option<&str>,
    inflight: &[u32],
    spin: u32,
    max: usize,
    out: &mut Vec<u32>,
) -> Outcome {
    rank_loads(view, hint, inflight, inflight, spin, max, out)
}

/// [`rank`] with two load measures: `busy[i]`, compared with the runner's
/// `max_concurrency` and ordering holders (requests that will need an inference slot), and
/// `total[i]`, ordering where a miss or an unhinted request goes.
pub fn rank_loads(
    view: &View,
    hint: Option<&str>,
    busy_load: &[u32],
    total: &[u32],
    spin: u32,
    max: usize,
    out: &mut Vec<u32>,
) -> Outcome {
    let costs = Costs { floor: view.slot_costs(), exact: |_, floor| floor };
    rank_by(view, hint, busy_load, total, costs, spin, max, out)
}

/// The eviction cost of a miss on each runner, as [`rank_by`] orders misses by it (0 for a free
/// slot; lower is better; ties go to the fewest in flight). A miss reads every runner's floor,
/// and asks for the exact cost only of runners whose floor could still make the list: the
/// router's floors are one array read, its exact costs may look up a runner's hints.
pub struct Costs<'a, F: Fn(u32, u32) -> u32> {
    /// `floor[i]` is at most runner `i`'s cost (runners past its end count as 0).
    pub floor: &'a [u32],
    /// `exact(i, floor[i])`: runner `i`'s cost.
    pub exact: F,
}

/// [`rank_loads`] with the eviction cost of a miss on each runner given by `costs`: the router
/// passes the popularity of each runner's eviction victim.
#[allow(clippy::too_many_arguments)]
pub fn rank_by<F: Fn(u32, u32) -> u32>(
    view: &View,
    hint: Option<&str>,
    busy_load: &[u32],
    total: &[u32],
    costs: Costs<'_, F>,
    spin: u32,
    max: usize,
    out: &mut Vec<u32>,
) -> Outcome {
    let hinted = hint.map(|h| Hinted { hint: h, holders: view.holders(h) });
    rank_hinted(view, hinted, busy_load, total, costs, spin, max, out)
}

/// A request's hint with its holders as [`View::holders`] lists them (looked up once by a
/// caller that needs them too).
#[derive(Debug, Clone, Copy)]
pub struct Hinted<'a> {
    /// The hint.
    pub hint: &'a str,
    /// `view.holders(hint)`.
    pub holders: &'a [u32],
}

/// [`rank_by`] for a hint whose holders the caller already looked up.
#[allow(clippy::too_many_arguments)]
pub fn rank_hinted<F: Fn(u32, u32) -> u32>(
    view: &View,
    hinted: Option<Hinted<'_>>,
    busy_load: &[u32],
    total: &[u32],
    costs: Costs<'_, F>,
    spin: u32,
    max: usize,
    out: &mut Vec<u32>,
) -> Outcome {
    let inflight = busy_load;
    out.clear();
    let runners = view.runners();
    let n = runners.len() as u32;
    if n == 0 || max == 0 {
        return Outcome::NoCandidates;
    }
    let start = spin % n;
    // Rotation rank: 0 for the runner at `start`, then onwards, wrapping.
    let rot = |i: u32| if i >= start { i - start } else { i + (n - start) };
    let busy = |i: u32| view.runner(i).map(|r| load(inflight, i) >= r.max_concurrency).unwrap_or(true);

    if let Some(Hinted { hint: h, holders }) = hinted {
        // Fast path: free holders only (a holder list is short; no scan of the fleet).
        let mut free = TopK::new(max);
        let mut any_holder = false;
        for &i in holders {
            let Some(r) = view.runner(i).filter(|r| r.available) else {
                continue;
            };
            any_holder = true;
            if !busy(i) {
                free.offer((holder_class(r), 0, load(inflight, i), rot(i)), i);
            }
        }
        if free.first_tier().is_some() {
            free.drain_into(out);
            // Retry targets after the holders: other available runners that are not busy, in
            // rotation order. A bounded probe keeps the hit path O(holders + max), not O(fleet);
            // past the list, Envoy's fallback policy (which respects health) takes retries.
            let mut probes = 0;
            let mut i = start;
            while out.len() < max && probes < n.min(4 * max as u32 + 8) {
                if view.runner(i).is_some_and(|r| r.available) && !busy(i) && !out.contains(&i) {
                    out.push(i);
                }
                i = if i + 1 >= n { 0 } else { i + 1 };
                probes += 1;
            }
            return Outcome::Hit;
        }
        // A miss, then. Runners that hold the model warm (in host memory: the load is one
        // copy, not a disk read and checks) and are not busy come first, cheapest eviction
        // first, then in the hint's order. First whatever their eviction costs: in the
        // simulator (`simulate --host-cache`) that gave the lowest mean latency on every
        // shape tried, where letting eviction cost outweigh warmth (by up to 0, 8 or 32
        // popularity counts) was slower on some; it does cost hit rate (more, cheaper loads).
        let mut warm = TopK::new(max);
        for &i in view.warm_holders(h) {
            if view.runner(i).is_some_and(|r| r.available) && !busy(i) {
                let floor = costs.floor.get(i as usize).copied().unwrap_or(0);
                warm.offer((0, (costs.exact)(i, floor), 0, rot(i)), i);
            }
        }
        // Scan the fleet: tiers 1 not busy (cheapest eviction first), 3 busy holder, 4 busy
        // other (cheapest eviction first: a load there still evicts).
        let outcome = scan::miss(view, holders, any_holder, busy_load, total, &costs, start, max, out);
        if !warm.items.is_empty() {
            // A warm runner is not busy, so the scan listed idle runners too: the outcome
            // stands, and the warm runners move to the front.
            let first: SmallVec<[u32; 4]> = warm.items.iter().map(|&(_, i)| i).collect();
            out.retain(|i| !first.contains(i));
            out.splice(0..0, first);
            out.truncate(max);
        }
        return outcome;
    }
    scan::unhinted(view, busy_load, total, start, max, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::tests::table;
    use crate::table::View;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn run(v: &View, hint: Option<&str>, inflight: &[u32], spin: u32, max: usize) -> (Outcome, Vec<u32>) {
        let mut out = Vec::new();
        let o = rank(v, hint, inflight, spin, max, &mut out);
        (o, out)
    }

    #[test]
    fn hit_prefers_least_loaded_free_holder() {
        let v = View::from_table(&table(&[&["a"], &["a"], &["b"]]));
        // Holders first, then a non-holder as the retry target.
        assert_eq!(run(&v, Some("a"), &[1, 0, 0], 0, 3), (Outcome::Hit, vec![1, 0, 2]));
        assert_eq!(run(&v, Some("a"), &[0, 0, 0], 0, 3), (Outcome::Hit, vec![0, 1, 2]));
        // Equal load: the spin rotates which holder comes first.
        assert_eq!(run(&v, Some("a"), &[0, 0, 0], 1, 3), (Outcome::Hit, vec![1, 0, 2]));
        // A busy runner is no retry target.
        assert_eq!(run(&v, Some("a"), &[0, 0, 2], 0, 3), (Outcome::Hit, vec![0, 1]));
        assert_eq!(run(&v, Some("a"), &[0, 0, 0], 0, 1), (Outcome::Hit, vec![0]));
    }

    #[test]
    fn honest_holders_come_before_overclaiming_ones() {
        // Runner 1 lists 5 hints with capacity 3: it cannot hold them all.
        let v = View::from_table(&table(&[&["a"], &["a", "b", "c", "d", "e"]]));
        assert!(v.runner(1).unwrap().overclaims() && !v.runner(0).unwrap().overclaims());
        assert_eq!(run(&v, Some("a"), &[1, 0], 0, 2), (Outcome::Hit, vec![0, 1]));
        // The overclaiming holder still serves when the honest one is busy.
        assert_eq!(run(&v, Some("a"), &[2, 0], 0, 2), (Outcome::Hit, vec![1]));
    }

    #[test]
    fn unknown_capacity_ranks_after_known_capacity() {
        // Runner 1 reports capacity 0 (unknown) and lists a and b: it may hold them, or lie.
        let mut t = table(&[&["a"], &["a", "b"], &["x", "y", "z"], &[]]);
        t.runners[1].capacity = 0;
        let v = View::from_table(&t);
        // As a holder: after the honest holder of known capacity, even a more loaded one.
        assert_eq!(run(&v, Some("a"), &[1, 0, 0, 0], 0, 2), (Outcome::Hit, vec![0, 1]));
        // It still serves when it is the only free holder.
        assert_eq!(run(&v, Some("a"), &[2, 0, 0, 0], 0, 1), (Outcome::Hit, vec![1]));
        // A miss never takes it for a free slot: after full runners of known capacity too.
        assert_eq!(run(&v, Some("new"), &[0, 0, 0, 0], 0, 4), (Outcome::Miss, vec![0, 3, 2, 1]));
    }

    #[test]
    fn misses_follow_the_hints_order_among_runners_that_are_not_busy() {
        // Runner 0 holds a with 3 requests in flight, all waiting for loads (busy load 0);
        // runner 1 is idle. A hit still goes to 0. A miss goes where the hint's order (the
        // rotation the router derives from the hint) starts, whatever the total load, as long
        // as the runner is not busy: every worker and Envoy picks the same runner for it.
        let v = View::from_table(&table(&[&["a"], &[]]));
        let mut out = Vec::new();
        assert_eq!(rank_loads(&v, Some("a"), &[0, 0], &[3, 0], 0, 1, &mut out), Outcome::Hit);
        assert_eq!(out, vec![0]);
        assert_eq!(rank_loads(&v, Some("b"), &[0, 0], &[3, 0], 0, 2, &mut out), Outcome::Miss);
        assert_eq!(out, vec![0, 1]);
        assert_eq!(rank_loads(&v, Some("b"), &[0, 0], &[3, 0], 1, 2, &mut out), Outcome::Miss);
        assert_eq!(out, vec![1, 0]);
        // Without a hint, the least loaded first.
        assert_eq!(rank_loads(&v, None, &[0, 0], &[3, 0], 0, 1, &mut out), Outcome::NoHint);
        assert_eq!(out, vec![1]);
    }

    #[test]
    fn busy_holders_fall_back_without_waiting_preferring_free_slots() {
        // Runner 0 holds a and is busy (2 >= max_concurrency 2); runner 1 is full; 2 has room.
        let v = View::from_table(&table(&[&["a"], &["x", "y", "z"], &["q"]]));
        assert_eq!(run(&v, Some("a"), &[2, 0, 1], 0, 3), (Outcome::BusyFallback, vec![2, 1, 0]));
    }

    #[test]
    fn miss_goes_to_free_slot_then_fewest_in_flight_and_rotates() {
        let v = View::from_table(&table(&[&["x", "y", "z"], &[], &[]]));
        assert_eq!(run(&v, Some("new"), &[0, 1, 1], 0, 1), (Outcome::Miss, vec![1]));
        assert_eq!(run(&v, Some("new"), &[0, 0, 0], 0, 3), (Outcome::Miss, vec![1, 2, 0]));
        assert_eq!(run(&v, Some("new"), &[0, 0, 0], 2, 3), (Outcome::Miss, vec![2, 1, 0]));
    }

    #[test]
    fn a_miss_goes_first_to_runners_holding_the_model_warm() {
        // Runner 0 is full but has "a" warm; 1 has a free slot; 3 also has "a" warm, with room.
        let mut t = table(&[&["x", "y", "z"], &[], &["q"], &["p"]]);
        t.runners[0].warm = vec!["a".into()];
        t.runners[3].warm = vec!["b".into(), "a".into()];
        let v = View::from_table(&t);
        assert_eq!(v.warm_holders("a"), &[0, 3]);
        // Warm first (the one with room before the full one), then the cold runners by cost.
        assert_eq!(run(&v, Some("a"), &[0, 0, 0, 0], 0, 4), (Outcome::Miss, vec![3, 0, 1, 2]));
        assert_eq!(run(&v, Some("a"), &[0, 0, 0, 0], 0, 1), (Outcome::Miss, vec![3]));
        // A busy warm runner is not preferred: it ranks as any busy runner.
        assert_eq!(run(&v, Some("a"), &[0, 0, 0, 2], 0, 3), (Outcome::Miss, vec![0, 1, 2]));
        // Nor is an unavailable one.
        t.runners[3].available = false;
        let v = View::from_table(&t);
        assert_eq!(run(&v, Some("a"), &[0, 0, 0, 0], 0, 2), (Outcome::Miss, vec![0, 1]));
        // Other models are unaffected.
        assert_eq!(run(&v, Some("n"), &[0, 0, 0, 0], 0, 2), (Outcome::Miss, vec![1, 2]));
    }

    #[test]
    fn busy_holders_fall_back_to_a_warm_runner_first() {
        // Runner 0 holds a and is busy; 2 has a free slot; 1 is full with a warm.
        let mut t = table(&[&["a"], &["x", "y", "z"], &[]]);
        t.runners[1].warm = vec!["a".into()];
        let v = View::from_table(&t);
        assert_eq!(run(&v, Some("a"), &[2, 0, 0], 0, 3), (Outcome::BusyFallback, vec![1, 2, 0]));
        // A holder that also lists the model warm is a holder: a free one is a hit.
        t.runners[0].warm = vec!["a".into()];
        let v = View::from_table(&t);
        assert_eq!(run(&v, Some("a"), &[0, 0, 0], 0, 1), (Outcome::Hit, vec![0]));
        assert_eq!(run(&v, Some("a"), &[2, 0, 0], 0, 3), (Outcome::BusyFallback, vec![1, 2, 0]));
    }

    #[test]
    fn saturated_prefers_holder_then_least_loaded() {
        let v = View::from_table(&table(&[&["b"], &["a"], &[]]));
        assert_eq!(run(&v, Some("a"), &[2, 3, 2], 0, 3), (Outcome::Saturated, vec![1, 0, 2]));
        assert_eq!(run(&v, Some("zz"), &[5, 3, 2], 0, 2), (Outcome::Saturated, vec![2, 1]));
    }

    #[test]
    fn no_hint_uses_fewest_in_flight() {
        let v = View::from_table(&table(&[&["a"], &[], &[]]));
        assert_eq!(run(&v, None, &[1, 1, 0], 0, 2), (Outcome::NoHint, vec![2, 0]));
        assert_eq!(run(&v, None, &[], 1, 3), (Outcome::NoHint, vec![1, 2, 0]));
    }

    #[test]
    fn unavailable_runners_are_never_candidates() {
        let mut t = table(&[&["a"], &["a"], &[]]);
        t.runners[0].available = false;
        let v = View::from_table(&t);
        assert_eq!(run(&v, Some("a"), &[0, 0, 0], 0, 3), (Outcome::Hit, vec![1, 2]));
        for r in &mut t.runners {
            r.available = false;
        }
        let v = View::from_table(&t);
        assert_eq!(run(&v, Some("a"), &[], 0, 3), (Outcome::NoCandidates, vec![]));
        assert_eq!(run(&v, None, &[], 0, 3), (Outcome::NoCandidates, vec![]));
        assert_eq!(run(&View::default(), None, &[], 7, 3), (Outcome::NoCandidates, vec![]));
    }

    #[test]
    fn short_inflight_slice_and_huge_spin_are_safe() {
        let v = View::from_table(&table(&[&["a"], &["a"]]));
        assert_eq!(run(&v, Some("a"), &[9], u32::MAX, 2).0, Outcome::Hit);
        assert_eq!(run(&v, Some("a"), &[9], u32::MAX, 0), (Outcome::NoCandidates, vec![]));
    }
}
