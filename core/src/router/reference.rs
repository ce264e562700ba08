//! [`Router::route`] as it ranked before the fleet scan's lanes and cost floors (test-only),
//! and tests that drive long random traces through it and through the router: every decision
//! and candidate list must be the same.

use super::*;
use crate::placement::{pinned_victim_cost, victim_cost};
use crate::rank::reference::{self, Rng};
use crate::rank::slot_cost;
use crate::table::ViewRunner;
use crate::table::{Table, TableRef};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

impl Router {
    /// [`Router::route`] with the reference ranking.
    #[allow(clippy::too_many_arguments)]
    fn route_reference(
        &mut self,
        hint: Option<&str>,
        in_flight: &[u32],
        now_us: u64,
        spin: u32,
        max: usize,
        max_hints: usize,
        out: &mut Vec<u32>,
    ) -> Decision {
        let hash = hint.map(hint_hash).unwrap_or(0);
        if let Some(h) = hint {
            let halved = self.popularity.record(hash);
            self.recount(h, hash, halved);
        }
        let spin = super::tie_break(hint, hash, spin);
        let (outcome, rent) = self.rank_reference(hint, hash, in_flight, now_us, spin, max, out);
        self.settle_rent(hash, rent);
        self.follow(hint, hash, outcome, in_flight, now_us, max_hints, out)
    }

    /// `rank_hashed` as it was: the reference scan, each runner priced by the cost closure.
    #[allow(clippy::too_many_arguments)]
    fn rank_reference(
        &self,
        hint: Option<&str>,
        hash: u64,
        in_flight: &[u32],
        now_us: u64,
        spin: u32,
        max: usize,
        out: &mut Vec<u32>,
    ) -> (Outcome, RentMove) {
        let (prices, victims) = (Prices { popularity: &self.popularity }, &self.victims);
        let (view, pins) = (&self.view, &self.pins);
        let cost = |i: u32, r: &ViewRunner| match pins.get(i as usize) {
            // As many models in use as slots (some perhaps no longer listed): a load waits.
            Some(p) if r.capacity > 0 && p.len() >= r.capacity as usize => ALL_PINNED_COST,
            Some(p) if !p.is_empty() && slot_cost(r) == 1 => pinned_victim_cost(view, prices, p, i),
            _ => victim_cost(prices, victims, i, r),
        };
        let outcome = reference::rank_by(view, hint, in_flight, in_flight, cost, spin, max, out);
        let hinted = hint.map(|h| Hinted { hint: h, holders: view.holders(h) });
        self.when_holders_busy(outcome, hinted, hash, in_flight, now_us, max, out)
    }

    /// Every cost floor is at most the exact cost, and the ones the scan takes for exact are.
    fn check_floors(&self) {
        assert_eq!(self.floors.len(), self.view.runners().len());
        for (i, r) in (0u32..).zip(self.view.runners()) {
            let exact = miss_cost(
                &self.view,
                Prices { popularity: &self.popularity },
                &self.victims,
                &self.pins,
                i,
                r,
            );
            let floor = self.floors[i as usize];
            assert!(floor <= exact, "runner {i}: floor {floor} > cost {exact}");
            if matches!(floor, 0 | ALL_PINNED_COST | UNKNOWN_CAPACITY_COST) {
                assert_eq!(floor, exact, "runner {i}");
            }
        }
    }
}

const MODELS: u64 = 16;

/// Two routers fed the same trace, one ranking with the reference scan.
struct Twins {
    new: Router,
    old: Router,
    table: Table,
    /// Requests routed and not ended: (first candidate, decision).
    open: Vec<(u32, Decision)>,
    /// Open requests per runner (the in-flight counts the filter would read).
    in_flight: Vec<u32>,
}

impl Twins {
    fn new(rng: &mut Rng, n: usize, mode: WhenHoldersBusy) -> Twins {
        let table = rng.table(n, MODELS);
        let new = Router::with_mode(View::from_table(&table), mode);
        Twins { old: new.clone(), new, table, open: Vec::new(), in_flight: vec![0; n] }
    }

    fn route(&mut self, rng: &mut Rng, step: u64) {
        let n = self.table.runners.len();
        let hint = match rng.below(20) {
            0 | 1 => None,
            2 => Some(format!("fresh{step}")), // a model nobody holds
            _ => Some(rng.model(MODELS)),
        };
        let hint = hint.as_deref();
        // The open requests' counts (what the filter sees), or any other vector.
        let loads = if rng.chance(60) { self.in_flight.clone() } else { rng.loads(n) };
        let (spin, max, max_hints) =
            (rng.next() as u32, 1 + rng.below(4) as usize, 1 + rng.below(6) as usize);
        let now = step * 1_000;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let got = self.new.route(hint, &loads, now, spin, max, max_hints, &mut a);
        let want = self.old.route_reference(hint, &loads, now, spin, max, max_hints, &mut b);
        assert_eq!((got, &a), (want, &b), "step {step}: {hint:?} loads {loads:?} spin {spin} max {max}");
        if let Some(&first) = a.first() {
            self.open.push((first, got));
            if let Some(c) = self.in_flight.get_mut(first as usize) {
                *c += 1;
            }
        }
    }

    fn end_one(&mut self, rng: &mut Rng) {
        if self.open.is_empty() {
            return;
        }
        let (idx, d) = self.open.swap_remove(rng.below(self.open.len() as u64) as usize);
        let elapsed = rng.chance(85).then(|| 1_000 + rng.below(400_000));
        self.new.observe(idx, &d, elapsed);
        self.old.observe(idx, &d, elapsed);
        if let Some(c) = self.in_flight.get_mut(idx as usize) {
            *c = c.saturating_sub(1);
        }
    }

    /// A runner's own report (a response header): maybe more hints than its capacity.
    fn learn(&mut self, rng: &mut Rng) {
        let idx = rng.below(self.table.runners.len() as u64 + 1) as u32;
        let listed = rng.below(7);
        let hints = rng.hints(listed, MODELS);
        let list = HintList { hints, invalid: 0, truncated: 0 };
        assert_eq!(self.new.learn(idx, &list), self.old.learn(idx, &list));
    }

    fn confirm(&mut self, rng: &mut Rng) {
        let idx = rng.below(self.table.runners.len() as u64 + 1) as u32;
        assert_eq!(self.new.confirm(idx), self.old.confirm(idx));
    }

    /// A newly published table: a few runners changed in place, or (rarely) another fleet.
    fn publish(&mut self, rng: &mut Rng) {
        self.table.generation += 1;
        if rng.chance(10) {
            let n = 1 + rng.below(20) as usize;
            self.table = Table { generation: self.table.generation, ..rng.table(n, MODELS) };
            self.open.clear(); // their pins went with the old fleet
            self.in_flight = vec![0; n];
        } else {
            for _ in 0..=rng.below(3) {
                let i = rng.below(self.table.runners.len() as u64) as usize;
                let fresh = rng.runner(i, MODELS);
                let Some(r) = self.table.runners.get_mut(i) else { continue };
                match rng.below(4) {
                    0 => r.available = fresh.available,
                    1 => r.capacity = fresh.capacity,
                    2 => r.max_concurrency = fresh.max_concurrency,
                    _ => r.hints = fresh.hints,
                }
            }
        }
        let bytes = self.table.encode();
        for router in [&mut self.new, &mut self.old] {
            router.refresh(|v| v.refresh_from_ref(TableRef::parse(&bytes).unwrap()));
        }
    }
}

#[test]
fn random_traces_route_as_the_reference_scan() {
    // Busy and idle runners, hits, misses (some on full caches with models in use), busy
    // holders, saturation, unavailable and unknown-capacity runners, reports that change
    // hints, new tables, and (small fleets: a short popularity window) counter halvings.
    let mut routed = 0;
    for seed in 1..=8u64 {
        for mode in [WhenHoldersBusy::Fastest, WhenHoldersBusy::AnyAvailable] {
            let mut rng = Rng(seed * 0x9e37_79b9);
            let n = 1 + rng.below(24) as usize;
            let mut t = Twins::new(&mut rng, n, mode);
            for step in 0..4_000 {
                let n = t.table.runners.len();
                match rng.below(100) {
                    _ if t.open.len() > 3 * n => t.end_one(&mut rng),
                    0..=54 => {
                        t.route(&mut rng, step);
                        routed += 1;
                    }
                    55..=84 => t.end_one(&mut rng),
                    85..=91 => t.learn(&mut rng),
                    92..=95 => t.confirm(&mut rng),
                    _ => t.publish(&mut rng),
                }
                t.new.check_floors();
            }
            assert_eq!(t.new.view().runners(), t.old.view().runners(), "seed {seed} {mode:?}");
        }
    }
    assert!(routed > 20_000, "{routed}");
}
