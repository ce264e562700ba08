//! The fleet scan behind a miss and an unhinted request ([`super::rank_by`]): every available
//! runner is a candidate, ordered by (tier, eviction cost, in flight, rotation), except that a
//! hinted miss orders runners that are not busy by (eviction cost, rotation): the rotation is
//! the hint's own order, so concurrent misses for one model from workers or Envoys that do not
//! know of each other agree on the runner (see [`super::rank_by`]).
//!
//! The in-flight counts come in with each request and change between requests, and every
//! runner's count is read (to tell busy from not, and to order unhinted requests and busy
//! runners by load): the scan stays linear, and is made cheap instead (it cost 4-5 ns
//! per runner over the `ViewRunner`s):
//!
//! * it reads compact per-runner lanes (the view's gates and slot costs, the caller's cost
//!   floors, the in-flight slices) in step, not the 80-byte runners;
//! * it visits runners in rotation order (from `spin % n`, wrapping) and keeps the first of
//!   equal keys, which is the rotation tie-break, so a key is (cost, load) packed in a `u64`;
//! * tiers are separate lists (idle runners, busy holders, busy others), and busy runners are
//!   skipped once the idle list is full: they could only come after it;
//! * a runner's exact eviction cost is asked for only when its floor could still make the list
//!   (the router's exact cost may look up the runner's hints; its floor is one array read).

use super::{Costs, Outcome};
use crate::table::View;
use smallvec::SmallVec;
use std::borrow::Cow;

/// Orders by cost, then load.
#[inline]
fn key(cost: u32, load: u32) -> u64 {
    (u64::from(cost) << 32) | u64::from(load)
}

/// The `k` lowest keys offered (k >= 1), in order; of equal keys the first offered wins.
struct Best {
    k: usize,
    /// `k` are kept: an offer must beat `bar`, the last one's key.
    full: bool,
    bar: u64,
    items: SmallVec<[(u64, u32); 4]>,
}

impl Best {
    fn new(k: usize) -> Best {
        Best { k, full: false, bar: u64::MAX, items: SmallVec::new() }
    }

    /// Whether an offer of `key` would be kept (a later equal key is not: it rotates later).
    #[inline]
    fn admits(&self, key: u64) -> bool {
        !self.full || key < self.bar
    }

    #[inline]
    fn offer(&mut self, key: u64, idx: u32) {
        if self.admits(key) {
            self.insert(key, idx);
        }
    }

    /// Out of line: a scan admits a handful of keys, and rejects every other one inline.
    #[inline(never)]
    fn insert(&mut self, key: u64, idx: u32) {
        let pos = self.items.partition_point(|&(k, _)| k <= key);
        self.items.insert(pos, (key, idx));
        if self.items.len() > self.k {
            self.items.pop();
        }
        if self.items.len() >= self.k {
            self.full = true;
            self.bar = self.items.last().map_or(u64::MAX, |&(k, _)| k);
        }
    }

    fn runners(&self) -> impl Iterator<Item = u32> + '_ {
        self.items.iter().map(|&(_, i)| i)
    }
}

/// `s` cut or padded with zeros to `n` entries: a short in-flight slice counts the runners it
/// misses as idle, as [`super::rank_by`]'s holder path does. Borrowed unless short.
fn lane(s: &[u32], n: usize) -> Cow<'_, [u32]> {
    match s.get(..n) {
        Some(s) => Cow::Borrowed(s),
        None => {
            let mut v = s.to_vec();
            v.resize(n, 0);
            Cow::Owned(v)
        }
    }
}

/// Runners `start..n`, then `0..start`: rotation order.
fn rotation(start: usize, n: usize) -> [(usize, usize); 2] {
    [(start.min(n), n), (0, start.min(n))]
}

/// `s` from `k` on.
fn tail(s: &[u32], k: usize) -> &[u32] {
    s.get(k..).unwrap_or(&[])
}

/// The first `k` where `hit(a[k], b[k], c[k], d[k])`. Tests eight at a time with no branch
/// in between, which the compiler turns into vector compares: past the first few runners a
/// scan admits only a handful, so this test is where its time goes.
#[inline]
fn first_hit(
    a: &[u32],
    b: &[u32],
    c: &[u32],
    d: &[u32],
    hit: impl Fn(u32, u32, u32, u32) -> bool,
) -> Option<usize> {
    const W: usize = 8;
    let n = a.len().min(b.len()).min(c.len()).min(d.len());
    let mut k = 0;
    while k + W <= n {
        let lanes = (a.get(k..k + W), b.get(k..k + W), c.get(k..k + W), d.get(k..k + W));
        let (Some(a8), Some(b8), Some(c8), Some(d8)) = lanes else { break };
        let any =
            a8.iter().zip(b8).zip(c8).zip(d8).fold(false, |any, (((&a, &b), &c), &d)| any | hit(a, b, c, d));
        if any {
            break;
        }
        k += W;
    }
    (k..n).find(|&j| match (a.get(j), b.get(j), c.get(j), d.get(j)) {
        (Some(&a), Some(&b), Some(&c), Some(&d)) => hit(a, b, c, d),
        _ => false,
    })
}

/// The lanes a miss scan reads, each `n` long.
struct Lanes<'a> {
    gates: &'a [u32],
    busy_load: &'a [u32],
    total: &'a [u32],
    floors: &'a [u32],
}

impl Lanes<'_> {
    /// Offers runners `from..to` (no holder among them): idle ones to `idle`, busy ones to
    /// `busy` while `idle` still has room, each keyed by (exact cost, total load).
    fn scan(
        &self,
        from: usize,
        to: usize,
        exact: &impl Fn(u32, u32) -> u32,
        idle: &mut Best,
        busy: &mut Best,
    ) {
        let r = from..to;
        let (Some(g), Some(b), Some(t), Some(f)) = (
            self.gates.get(r.clone()),
            self.busy_load.get(r.clone()),
            self.total.get(r.clone()),
            self.floors.get(r),
        ) else {
            return;
        };
        let mut k = 0;
        // Until `idle` is full, any available runner may make a list.
        while !idle.full {
            let (Some(&gate), Some(&b), Some(&t), Some(&floor)) = (g.get(k), b.get(k), t.get(k), f.get(k))
            else {
                return;
            };
            let i = (from + k) as u32;
            k += 1;
            if gate == 0 {
                continue; // unavailable
            }
            // Not busy: (cost, rotation), so no load in the key; busy: (cost, load).
            let (best, t) = if b < gate { (&mut *idle, 0) } else { (&mut *busy, t) };
            if best.admits(key(floor, t)) {
                best.offer(key(exact(i, floor), t), i);
            }
        }
        // Then only an idle runner whose floor beats the last idle one: key(floor, 0) < bar
        // (idle keys carry no load), in halves.
        loop {
            let hi = (idle.bar >> 32) as u32;
            let beats = |gate, b, _t, floor| (b < gate) & (floor < hi);
            let Some(j) = first_hit(tail(g, k), tail(b, k), tail(t, k), tail(f, k), beats) else { return };
            k += j;
            let Some(&floor) = f.get(k) else { return };
            let i = (from + k) as u32;
            idle.offer(key(exact(i, floor), 0), i);
            k += 1;
        }
    }

    /// Offers holder `i`: to `held` by load when busy, as every available holder is here (an
    /// idle one would take the holder path), else to `idle` as any other runner.
    fn holder(&self, i: u32, exact: &impl Fn(u32, u32) -> u32, idle: &mut Best, held: &mut Best) {
        let k = i as usize;
        let (Some(&gate), Some(&b), Some(&t)) = (self.gates.get(k), self.busy_load.get(k), self.total.get(k))
        else {
            return;
        };
        if gate == 0 {
            return;
        }
        if b < gate {
            let floor = self.floors.get(k).copied().unwrap_or(0);
            idle.offer(key(exact(i, floor), 0), i);
        } else {
            held.offer(u64::from(t), i);
        }
    }
}

/// A request for a hint with no free holder: tier 1, idle runners by (cost, rotation); tier 3,
/// busy `holders` by load; tier 4, busy others by (cost, load). `any_holder`: some holder is
/// available.
#[allow(clippy::too_many_arguments)]
pub(super) fn miss<F: Fn(u32, u32) -> u32>(
    view: &View,
    holders: &[u32],
    any_holder: bool,
    busy_load: &[u32],
    total: &[u32],
    costs: &Costs<'_, F>,
    start: u32,
    max: usize,
    out: &mut Vec<u32>,
) -> Outcome {
    let n = view.runners().len();
    let (gates, busy_load, total) = (lane(view.gates(), n), lane(busy_load, n), lane(total, n));
    let floors = lane(costs.floor, n);
    let lanes = Lanes { gates: &gates, busy_load: &busy_load, total: &total, floors: &floors };
    // Holders rank in a tier of their own: the scan runs between them.
    let mut skip: SmallVec<[u32; 8]> = holders.iter().copied().filter(|&i| (i as usize) < n).collect();
    skip.sort_unstable();
    skip.dedup();
    let (mut idle, mut held, mut other) = (Best::new(max), Best::new(max), Best::new(max));
    for (lo, hi) in rotation(start as usize, n) {
        let mut from = lo;
        for &h in skip.iter().filter(|&&h| (lo..hi).contains(&(h as usize))) {
            lanes.scan(from, h as usize, &costs.exact, &mut idle, &mut other);
            lanes.holder(h, &costs.exact, &mut idle, &mut held);
            from = h as usize + 1;
        }
        lanes.scan(from, hi, &costs.exact, &mut idle, &mut other);
    }
    let outcome = match (idle.items.is_empty(), held.items.is_empty() && other.items.is_empty()) {
        (false, _) if any_holder => Outcome::BusyFallback,
        (false, _) => Outcome::Miss,
        (true, false) => Outcome::Saturated,
        (true, true) => Outcome::NoCandidates,
    };
    out.extend(idle.runners().chain(held.runners()).chain(other.runners()).take(max));
    outcome
}

/// A request without a hint: idle runners, then busy ones, each by load.
pub(super) fn unhinted(
    view: &View,
    busy_load: &[u32],
    total: &[u32],
    start: u32,
    max: usize,
    out: &mut Vec<u32>,
) -> Outcome {
    let n = view.runners().len();
    let (gates, busy_load, total) = (lane(view.gates(), n), lane(busy_load, n), lane(total, n));
    let (mut idle, mut busy) = (Best::new(max), Best::new(max));
    for (from, to) in rotation(start as usize, n) {
        let r = from..to;
        let (Some(g), Some(b), Some(t)) = (gates.get(r.clone()), busy_load.get(r.clone()), total.get(r))
        else {
            continue;
        };
        let mut k = 0;
        // As in `Lanes::scan`: any available runner until `idle` is full, then idle ones.
        while !idle.full {
            let (Some(&gate), Some(&b), Some(&t)) = (g.get(k), b.get(k), t.get(k)) else { break };
            let i = (from + k) as u32;
            k += 1;
            if gate == 0 {
                continue;
            }
            if b < gate {
                idle.offer(u64::from(t), i);
            } else {
                busy.offer(u64::from(t), i);
            }
        }
        while idle.full {
            // u64::from(t) < bar, in halves (the last lane is a stand-in: no cost here).
            let (hi, lo) = ((idle.bar >> 32) as u32, idle.bar as u32);
            let beats = |gate, b, t, _| (b < gate) & ((hi > 0) | (t < lo));
            let Some(j) = first_hit(tail(g, k), tail(b, k), tail(t, k), tail(t, k), beats) else { break };
            k += j;
            let Some(&t) = t.get(k) else { break };
            idle.offer(u64::from(t), (from + k) as u32);
            k += 1;
        }
    }
    let outcome =
        if idle.items.is_empty() && busy.items.is_empty() { Outcome::NoCandidates } else { Outcome::NoHint };
    out.extend(idle.runners().chain(busy.runners()).take(max));
    outcome
}
