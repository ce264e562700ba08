//! Busy holders. Under `fastest` ([`super::WhenHoldersBusy::Fastest`]): a holder's queue
//! against a load elsewhere, per request and, for loads into a free slot, over the waits the
//! model's requests paid since its queue last cleared ([`crate::rent`]). Under both modes: a
//! load that would itself wait for a cache slot is no way to serve a request at once.

use super::{Router, WhenHoldersBusy};
use crate::placement::{miss_cost, Prices, ALL_PINNED_COST};
use crate::rank::{slot_cost, Hinted, Outcome, UNKNOWN_CAPACITY_COST};
use crate::table::ViewRunner;

/// What a decision does to its model's [`crate::rent::Rent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RentMove {
    Keep,
    /// It waits about this long (microseconds) at a busy holder.
    Pay(u64),
    /// A holder was free, or the model loads elsewhere.
    Clear,
}

/// The busy holder [`Router::faster_holder`] found.
struct Rental {
    holder: u32,
    /// Expected wait there before the request's inference starts, microseconds.
    wait_us: u64,
    /// Whether it finishes the request no later than a load on the fallback would.
    sooner: bool,
    /// What loading the model on the fallback costs once, when that evicts nothing (a free
    /// slot there): its load time. `None` when it evicts: the victim's later misses are priced
    /// per request only, by the penalty in `sooner`.
    price_us: Option<u64>,
}

impl Router {
    pub(super) fn settle_rent(&mut self, hash: u64, rent: RentMove) {
        match rent {
            RentMove::Keep => {}
            RentMove::Pay(us) => self.rent.pay(hash, us),
            RentMove::Clear => self.rent.clear(hash),
        }
    }

    /// The modes' turn after the ranking, with every holder busy and `out` starting with a
    /// load elsewhere. `fastest`: a holder instead, if it finishes the request sooner and the
    /// model's waits have not yet paid for a load ([`crate::rent`]). `any_available`: the
    /// least loaded holder, only if that load would wait for a cache slot; then no runner
    /// could start the request now, which is the rule's `saturated` case.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn when_holders_busy(
        &self,
        outcome: Outcome,
        hinted: Option<Hinted<'_>>,
        hash: u64,
        in_flight: &[u32],
        now_us: u64,
        max: usize,
        out: &mut Vec<u32>,
    ) -> (Outcome, RentMove) {
        match (outcome, self.mode, hinted) {
            (Outcome::BusyFallback, WhenHoldersBusy::Fastest, Some(h)) => {
                let Some(r) = self.faster_holder(h, hash, in_flight, now_us, out.first().copied()) else {
                    return (outcome, RentMove::Keep); // times unknown: as `any_available`
                };
                let paid_for =
                    r.price_us.is_some_and(|p| self.rent.paid(hash).saturating_add(r.wait_us) >= p);
                if r.sooner && !paid_for {
                    put_first(out, r.holder, max);
                    return (Outcome::Hit, RentMove::Pay(r.wait_us));
                }
                (outcome, RentMove::Clear)
            }
            (Outcome::BusyFallback, WhenHoldersBusy::AnyAvailable, Some(h)) => {
                let Some(f) = out.first().copied() else { return (outcome, RentMove::Keep) };
                match self.load_starting_now(f, in_flight) {
                    Some(i) if i == f => return (outcome, RentMove::Keep),
                    Some(i) => {
                        put_first(out, i, max);
                        return (outcome, RentMove::Keep);
                    }
                    None => {}
                }
                // Fewest rounds of inference ahead, then the lowest index (deterministic).
                let least = h
                    .holders
                    .iter()
                    .filter_map(|&i| {
                        self.view
                            .runner(i)
                            .filter(|r| r.available)
                            .map(|r| (rounds_ahead(in_flight, i, r), i))
                    })
                    .min();
                let Some((_, holder)) = least else { return (outcome, RentMove::Keep) };
                put_first(out, holder, max);
                (Outcome::Saturated, RentMove::Keep)
            }
            (Outcome::Hit, WhenHoldersBusy::Fastest, Some(_)) => (outcome, RentMove::Clear),
            _ => (outcome, RentMove::Keep),
        }
    }

    /// Whether a load on runner `f` would wait for a cache slot: every model it holds is in
    /// use (a runner never evicts one), the exact [`crate::placement::miss_cost`].
    fn load_waits_for_slot(&self, f: u32) -> bool {
        let Some(r) = self.view.runner(f) else { return false };
        let prices = Prices { popularity: &self.popularity };
        miss_cost(&self.view, prices, &self.victims, &self.pins, f, r) == ALL_PINNED_COST
    }

    /// A runner, not busy, that could start a load now, `first` being the one the ranking put
    /// first, the cheapest load: `first` unless even it waits for a slot. If it does, so does
    /// every runner of known capacity that is not busy (their loads cost [`ALL_PINNED_COST`]
    /// or more, and more is only [`UNKNOWN_CAPACITY_COST`]), and only one whose capacity is
    /// unknown might: the least loaded (a scan of two lanes, on this path alone). The ranking
    /// puts those after every runner of known capacity.
    fn load_starting_now(&self, first: u32, in_flight: &[u32]) -> Option<u32> {
        if !self.load_waits_for_slot(first) {
            return Some(first);
        }
        let (gates, costs) = (self.view.gates(), self.view.slot_costs());
        let load = |i: usize| in_flight.get(i).copied().unwrap_or(0);
        let lanes = gates.iter().zip(costs).enumerate();
        let idle_unknown =
            lanes.filter(|&(i, (&gate, &cost))| cost == UNKNOWN_CAPACITY_COST && load(i) < gate);
        idle_unknown.map(|(i, _)| (load(i), i as u32)).min().map(|(_, i)| i)
    }

    /// With every holder of `hint` busy and `fallback` the best other runner, the holder whose
    /// queue is expected to finish the request first, and how that compares with a load on
    /// `fallback` (`None` while load or inference times are unknown, or no holder is).
    fn faster_holder(
        &self,
        Hinted { hint, holders }: Hinted<'_>,
        hash: u64,
        in_flight: &[u32],
        now_us: u64,
        fallback: Option<u32>,
    ) -> Option<Rental> {
        let f = fallback?;
        let fr = self.view.runner(f)?;
        let (load_f, infer_f) = self.learned_times(f);
        let (load_f, infer_f) = (load_f?, infer_f?);
        // Its own round included.
        let rounds = |i: u32, r: &ViewRunner| u64::from(rounds_ahead(in_flight, i, r)) + 1;
        // The eviction a load causes: the victim's popularity relative to the requested
        // model's, in loads (a victim as popular as the request costs one load later).
        let penalty = match (slot_cost(fr), self.victims.get(f as usize)) {
            (1, Some(v)) if !v.dup() => {
                let (pv, ph) = (
                    u64::from(self.popularity.estimate(v.hash)),
                    u64::from(self.popularity.estimate(hash)).max(1),
                );
                load_f * pv.min(ph) / ph
            }
            _ => 0,
        };
        let by_load = load_f + rounds(f, fr) * infer_f + penalty;
        // (expected finish, holder, its inference time)
        let mut best: Option<(u64, u32, u64)> = None;
        for &i in holders {
            let Some(r) = self.view.runner(i).filter(|r| r.available) else { continue };
            let (load_i, infer_i) = self.learned_times(i);
            let Some(infer_i) = infer_i else { continue };
            // A load of ours still under way there: what is left of it.
            let loading = self
                .guessed
                .get(i as usize)
                .and_then(|g| g.iter().find(|(x, _)| x == hint))
                .map(|&(_, at)| load_i.unwrap_or(0).saturating_sub(now_us.saturating_sub(at)))
                .unwrap_or(0);
            let t = loading + rounds(i, r) * infer_i;
            if best.map_or(true, |(b, _, _)| t < b) {
                best = Some((t, i, infer_i));
            }
        }
        let (t, holder, infer) = best?;
        // Every model the fallback holds is in use: its load would wait for a slot, for as
        // long as those models keep being requested, and then take `load_f`.
        let waits_for_slot = self.load_waits_for_slot(f);
        Some(Rental {
            holder,
            wait_us: t.saturating_sub(infer),
            sooner: waits_for_slot || t <= by_load,
            price_us: (slot_cost(fr) == 0 && !waits_for_slot).then_some(load_f),
        })
    }
}

/// Rounds of inference ahead of a new request on runner `i` (`r`): those in flight there over
/// its `max_concurrency`.
fn rounds_ahead(in_flight: &[u32], i: u32, r: &ViewRunner) -> u32 {
    in_flight.get(i as usize).copied().unwrap_or(0) / r.max_concurrency.max(1)
}

/// Moves runner `i` to the front of the candidates `out`, keeping at most `max`.
fn put_first(out: &mut Vec<u32>, i: u32, max: usize) {
    out.retain(|&x| x != i);
    out.insert(0, i);
    out.truncate(max);
}
