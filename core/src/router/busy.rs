//! Busy holders under `fastest` ([`super::WhenHoldersBusy::Fastest`]): a holder's queue
//! against a load elsewhere, per request and, for loads into a free slot, over the waits the
//! model's requests paid since its queue last cleared ([`crate::rent`]).

use super::{Router, WhenHoldersBusy};
use crate::placement::ALL_PINNED_COST;
use crate::rank::{slot_cost, Hinted, Outcome};
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

    /// `fastest`'s turn after the ranking: with every holder busy, a holder instead of the
    /// load `out` starts with, if it finishes the request sooner and the model's waits have
    /// not yet paid for a load ([`crate::rent`]).
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
                    out.retain(|&x| x != r.holder);
                    out.insert(0, r.holder);
                    out.truncate(max);
                    return (Outcome::Hit, RentMove::Pay(r.wait_us));
                }
                (outcome, RentMove::Clear)
            }
            (Outcome::Hit, WhenHoldersBusy::Fastest, Some(_)) => (outcome, RentMove::Clear),
            _ => (outcome, RentMove::Keep),
        }
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
        let rounds = |i: u32, r: &ViewRunner| {
            u64::from(in_flight.get(i as usize).copied().unwrap_or(0) / r.max_concurrency.max(1)) + 1
        };
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
        let waits_for_slot = self.floors.get(f as usize) == Some(&ALL_PINNED_COST);
        Some(Rental {
            holder,
            wait_us: t.saturating_sub(infer),
            sooner: waits_for_slot || t <= by_load,
            price_us: (slot_cost(fr) == 0 && !waits_for_slot).then_some(load_f),
        })
    }
}
