//! A published [`Delta`](crate::table::delta::Delta) applied to a router: the changed runners
//! only, each in work proportional to it.

use super::Router;
use crate::learned::Times;
use crate::placement::Pins;
use crate::table::delta::DeltaRef;

impl Router {
    /// Brings the view up to `delta`'s generation, runner by runner. A runner at an index
    /// whose address changed took a freed slot: what this router knew of the slot's former
    /// runner (guesses, pins, learned times) is dropped. Guesses the runner no longer lists
    /// are dropped, as [`Router::refresh`] does.
    ///
    /// Returns false, changing nothing, when the delta names an index past the view (it is
    /// for another runner list): the caller then reloads the whole table.
    pub fn apply_delta(&mut self, delta: DeltaRef<'_>) -> bool {
        let n = self.view.runners().len();
        if delta.runners.iter().any(|(idx, _)| *idx as usize >= n) {
            return false;
        }
        for (idx, t) in delta.runners {
            let i = idx as usize;
            let Some(old) = self.view.runner(idx) else { continue };
            let old_slots = u64::from(old.capacity.max(1));
            // Other runners holding one of these may now (no longer) share it.
            let mut touched = old.hints.clone();
            if old.addr == t.addr {
                self.view.apply_runner(idx, t);
            } else {
                self.view.replace_runner(idx, t);
                if let Some(p) = self.pins.get_mut(i) {
                    *p = Pins::new();
                }
                if let Some(times) = self.times.get_mut(i) {
                    *times = Times::default();
                }
                if let Some(g) = self.guessed.get_mut(i) {
                    g.clear();
                }
            }
            let Some(r) = self.view.runner(idx) else { continue };
            if let Some(g) = self.guessed.get_mut(i) {
                g.retain(|(h, _)| r.hints.iter().any(|x| x == h));
            }
            touched.extend(r.hints.iter().cloned());
            let new_slots = u64::from(r.capacity.max(1));
            if new_slots != old_slots {
                self.slots = self.slots.saturating_sub(old_slots).saturating_add(new_slots);
                self.size_window();
            }
            self.reindex(idx);
            self.reindex_sharers(idx, &touched);
        }
        self.view.set_generation(delta.generation);
        true
    }

    /// Recomputes the victim of every runner but `idx` that holds one of `hints`: how many
    /// copies of it the fleet has may have changed with `idx`, and with it which of that
    /// runner's models is cheapest to evict (work proportional to those holders).
    pub(super) fn reindex_sharers(&mut self, idx: u32, hints: &[String]) {
        let mut sharers: Vec<u32> = Vec::new();
        for h in hints {
            sharers.extend(self.view.holders(h).iter().copied().filter(|&j| j != idx));
        }
        sharers.sort_unstable();
        sharers.dedup();
        for j in sharers {
            self.reindex(j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rank::reference::Rng;
    use crate::table::delta::Delta;
    use crate::table::{Table, TableRunner, View};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn runner(rng: &mut Rng, addr: String) -> TableRunner {
        let n = rng.below(4);
        TableRunner {
            addr,
            available: rng.below(5) != 0,
            hints: rng.hints(n, 12),
            capacity: rng.below(4) as u32,
            max_concurrency: 1 + rng.below(3) as u32,
            queue_token: rng.below(3),
            unreachable: rng.below(7) == 0,
            warm: if rng.below(3) == 0 { vec![format!("m{}", rng.below(12))] } else { Vec::new() },
        }
    }

    fn apply(router: &mut Router, delta: &Delta) -> bool {
        let bytes = delta.encode();
        router.apply_delta(DeltaRef::parse(&bytes).unwrap())
    }

    #[test]
    fn deltas_leave_the_router_where_the_whole_table_would() {
        let mut rng = Rng(7);
        let n = 9u32;
        let mut table = Table {
            generation: 1,
            runners: (0..n).map(|i| runner(&mut rng, format!("10.0.0.{i}:80"))).collect(),
        };
        let mut by_delta = Router::new(View::from_table(&table));
        let mut next_port = 100;
        for step in 0..400u64 {
            // A few runners change; now and then one leaves and another takes its slot.
            let mut changed = Vec::new();
            for _ in 0..1 + rng.below(3) {
                let i = rng.below(u64::from(n)) as u32;
                let addr = if rng.below(6) == 0 {
                    next_port += 1;
                    format!("10.0.1.{}:{next_port}", i)
                } else {
                    table.runners[i as usize].addr.clone()
                };
                table.runners[i as usize] = runner(&mut rng, addr);
                changed.retain(|&c| c != i);
                changed.push(i);
            }
            table.generation += 1;
            let delta = Delta {
                generation: table.generation,
                runners: changed.iter().map(|&i| (i, table.runners[i as usize].clone())).collect(),
            };
            assert!(apply(&mut by_delta, &delta));
            let whole = Router::new(View::from_table(&table));
            let (a, b) = (by_delta.view(), whole.view());
            assert_eq!(a.generation(), b.generation());
            assert_eq!(a.runners(), b.runners(), "step {step}");
            for r in table.runners.iter() {
                assert_eq!(a.index_of(&r.addr), b.index_of(&r.addr), "step {step}");
            }
            for m in 0..12 {
                let h = format!("m{m}");
                let sorted = |v: &View, warm: bool| {
                    let mut x = if warm { v.warm_holders(&h).to_vec() } else { v.holders(&h).to_vec() };
                    x.sort_unstable();
                    x
                };
                assert_eq!(sorted(a, false), sorted(b, false), "step {step} {h}");
                assert_eq!(sorted(a, true), sorted(b, true), "step {step} {h}");
                // The same candidates for every hint and load.
                let loads: Vec<u32> = (0..n).map(|_| rng.below(3) as u32).collect();
                let (mut x, mut y) = (Vec::new(), Vec::new());
                let ox = by_delta.rank(Some(&h), &loads, 0, 0, 4, &mut x);
                let oy = whole.rank(Some(&h), &loads, 0, 0, 4, &mut y);
                assert_eq!((ox, &x), (oy, &y), "step {step} {h} loads {loads:?}");
            }
        }
    }

    #[test]
    fn a_delta_for_another_runner_list_changes_nothing() {
        let table = Table { generation: 3, runners: vec![TableRunner::unpolled("10.0.0.1:80".into())] };
        let mut router = Router::new(View::from_table(&table));
        let delta = Delta { generation: 4, runners: vec![(1, TableRunner::unpolled("10.0.0.2:80".into()))] };
        assert!(!apply(&mut router, &delta));
        assert_eq!(router.view().generation(), 3);
        assert_eq!(router.view().runners().len(), 1);
    }
}
