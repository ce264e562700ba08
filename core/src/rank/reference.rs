//! The fleet scan as it was before the per-runner lanes (test-only): [`rank_by`] over the
//! `ViewRunner`s with a cost closure, a (tier, cost, load, rotation) key per runner. The
//! equivalence tests route the same traces through it and through [`super::rank_by`].

use super::{holder_class, load, Outcome, TopK};
use crate::table::{View, ViewRunner};

/// [`super::rank_loads`] with the eviction cost of a miss on each runner given by `cost(idx, runner)`
/// (0 for a free slot; lower is better; ties go to the fewest in flight): the router passes
/// the popularity of each runner's eviction victim.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rank_by(
    view: &View,
    hint: Option<&str>,
    busy_load: &[u32],
    total: &[u32],
    cost: impl Fn(u32, &ViewRunner) -> u32,
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

    if let Some(h) = hint {
        // Fast path: free holders only (a holder list is short; no scan of the fleet).
        let mut free = TopK::new(max);
        let mut any_holder = false;
        for &i in view.holders(h) {
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
        // Scan the fleet: tiers 1 not busy (cheapest eviction first), 3 busy holder, 4 busy
        // other (cheapest eviction first: a load there still evicts).
        let holders = view.holders(h);
        let mut top = TopK::new(max);
        for (i, r) in (0u32..).zip(runners.iter()) {
            if !r.available {
                continue;
            }
            let holder = any_holder && holders.contains(&i);
            let key = match (busy(i), holder) {
                (false, _) => (1, cost(i, r), rot(i), load(total, i)),
                (true, true) => (3, 0, load(total, i), rot(i)),
                (true, false) => (4, cost(i, r), load(total, i), rot(i)),
            };
            top.offer(key, i);
        }
        let outcome = match top.first_tier() {
            None => Outcome::NoCandidates,
            Some(1) if any_holder => Outcome::BusyFallback,
            Some(1) => Outcome::Miss,
            Some(_) => Outcome::Saturated,
        };
        top.drain_into(out);
        return outcome;
    }

    let mut top = TopK::new(max);
    for (i, r) in (0u32..).zip(runners.iter()) {
        if r.available {
            top.offer((u8::from(busy(i)), 0, load(total, i), rot(i)), i);
        }
    }
    let outcome = if top.first_tier().is_some() { Outcome::NoHint } else { Outcome::NoCandidates };
    top.drain_into(out);
    outcome
}

/// xorshift64*: a seeded, dependency-free generator for the random traces.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A model name among `models`, the low ones more often (as requests are skewed).
    pub(crate) fn model(&mut self, models: u64) -> String {
        let (a, b) = (self.below(models), self.below(models));
        format!("m{}", a.min(b))
    }

    /// Up to `n` distinct models.
    pub(crate) fn hints(&mut self, n: u64, models: u64) -> Vec<String> {
        let mut hs: Vec<String> = Vec::new();
        for _ in 0..n {
            let h = self.model(models);
            if !hs.contains(&h) {
                hs.push(h);
            }
        }
        hs
    }

    /// Runner `i` of a random table: capacity 0 (unknown) to 4, up to two hints more than its
    /// capacity (some overclaim), max_concurrency 0 (read as 1) to 3, one in ten unavailable.
    pub(crate) fn runner(&mut self, i: usize, models: u64) -> crate::table::TableRunner {
        let capacity = self.below(5) as u32;
        let listed = self.below(u64::from(capacity) + 3);
        crate::table::TableRunner {
            addr: format!("10.0.0.1:{}", 1000 + i),
            available: !self.chance(10),
            hints: self.hints(listed, models),
            capacity,
            max_concurrency: self.below(4) as u32,
            queue_token: 0,
            unreachable: false,
            warm: Vec::new(),
        }
    }

    pub(crate) fn table(&mut self, n: usize, models: u64) -> crate::table::Table {
        crate::table::Table { generation: 1, runners: (0..n).map(|i| self.runner(i, models)).collect() }
    }

    /// In-flight counts for `n` runners: mostly around the busy thresholds, sometimes extreme,
    /// sometimes a slice too short or too long.
    pub(crate) fn loads(&mut self, n: usize) -> Vec<u32> {
        let len = match self.below(10) {
            0 => self.below(n as u64 + 1) as usize,
            1 => n + 2,
            _ => n,
        };
        let extreme = self.chance(5);
        (0..len)
            .map(|_| {
                if extreme && self.chance(50) {
                    u32::MAX - self.below(2) as u32
                } else {
                    self.below(5) as u32
                }
            })
            .collect()
    }
}

mod tests {
    use super::*;
    use crate::rank::{rank_loads, slot_cost, Costs, UNKNOWN_CAPACITY_COST};
    use crate::table::TableRef;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const MODELS: u64 = 12;

    /// A random cost per runner, extremes included, and a floor of it (some exact, some 0,
    /// some lower; the floor slice is sometimes short: missing floors count as 0).
    fn costs(rng: &mut Rng, n: usize) -> (Vec<u32>, Vec<u32>) {
        let exact: Vec<u32> = (0..n)
            .map(|_| match rng.below(6) {
                0 => 0,
                1 => 1,
                2 => 2 + rng.below(256) as u32,
                3 => 1 << 16,
                4 => UNKNOWN_CAPACITY_COST - rng.below(2) as u32,
                _ => rng.below(4) as u32,
            })
            .collect();
        let floor_len = if rng.chance(10) { rng.below(n as u64 + 1) as usize } else { n };
        let floors = exact
            .iter()
            .take(floor_len)
            .map(|&c| match rng.below(3) {
                0 => c,
                1 => 0,
                _ => c - (rng.below(u64::from(c) + 1) as u32),
            })
            .collect();
        (exact, floors)
    }

    #[test]
    fn random_views_and_loads_rank_as_the_reference_scan() {
        let mut rng = Rng(0x5eed);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..300 {
            let n = rng.below(40) as usize;
            let mut table = rng.table(n, MODELS);
            let mut view = View::from_table(&table);
            if n > 0 && rng.chance(50) {
                // Lanes kept through an in-place refresh and a runner's own report.
                for _ in 0..3 {
                    let i = rng.below(n as u64) as usize;
                    table.runners[i] = crate::table::TableRunner {
                        addr: table.runners[i].addr.clone(),
                        ..rng.runner(i, MODELS)
                    };
                }
                view.refresh_from_ref(TableRef::parse(&table.encode()).unwrap());
                let listed = rng.below(6);
                let hints = rng.hints(listed, MODELS);
                let list = crate::hint::HintList { hints, invalid: 0, truncated: 0 };
                view.set_runner_hints(rng.below(n as u64) as u32, &list);
            }
            for _ in 0..60 {
                let hint = match rng.below(10) {
                    0 => None,
                    1 => Some("nobody".to_string()),
                    _ => Some(rng.model(MODELS)),
                };
                let hint = hint.as_deref();
                let (busy, total) = (rng.loads(n), if rng.chance(50) { rng.loads(n) } else { Vec::new() });
                let total = if total.is_empty() { busy.clone() } else { total };
                let (spin, max) = (rng.next() as u32, rng.below(n as u64 + 3) as usize);
                let (exact, floors) = costs(&mut rng, n);
                let cost = |i: u32| exact.get(i as usize).copied().unwrap_or(0);
                let costs = Costs { floor: &floors, exact: |i, _| cost(i) };
                let got = crate::rank::rank_by(&view, hint, &busy, &total, costs, spin, max, &mut a);
                let want = rank_by(&view, hint, &busy, &total, |i, _| cost(i), spin, max, &mut b);
                assert_eq!(
                    (got, &a),
                    (want, &b),
                    "{hint:?} busy {busy:?} total {total:?} spin {spin} max {max}"
                );
                let got = rank_loads(&view, hint, &busy, &total, spin, max, &mut a);
                let want = rank_by(&view, hint, &busy, &total, |_, r| slot_cost(r), spin, max, &mut b);
                assert_eq!(
                    (got, &a),
                    (want, &b),
                    "{hint:?} busy {busy:?} total {total:?} spin {spin} max {max}"
                );
            }
        }
    }
}
