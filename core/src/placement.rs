//! Where a miss goes: the eviction each runner would make, priced by the popularity of its
//! victim (see [`crate::router`] for the rules).

use crate::popularity::{hint_hash, Popularity};
use crate::rank::slot_cost;
use crate::table::{View, ViewRunner};
use smallvec::SmallVec;

/// Models with requests of this router in flight on one runner: (hint hash, requests).
/// A runner never evicts a model in use, so these are not eviction victims.
pub(crate) type Pins = SmallVec<[(u64, u32); 4]>;

/// Whether `pins` holds model `hash` in use (a runner never evicts it).
pub(crate) fn pinned(pins: &Pins, hash: u64) -> bool {
    pins.iter().any(|&(p, _)| p == hash)
}

/// Most distinct models pinned per runner that are tracked (a runner has few slots).
pub(crate) const MAX_PINS: usize = 64;

/// Cost of a miss on a runner whose every listed model is in use: the load waits for a slot.
pub(crate) const ALL_PINNED_COST: u32 = 1 << 16;

/// A runner's eviction victim as the router last computed it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Victim {
    /// [`hint_hash`] of the model.
    pub(crate) hash: u64,
    /// Available runners listing that model, this one included (at least 1 once computed).
    pub(crate) copies: u32,
}

impl Victim {
    /// Another available runner lists the model too.
    pub(crate) fn dup(&self) -> bool {
        self.copies > 1
    }
}

/// How evictions are priced: by the popularity estimate, the copies of a model sharing its
/// demand, so that a copy of a hot model is worth keeping and a copy of a cold one is not.
///
/// A duplicate is not free to lose, in either mode. Under `any_available` every request that
/// finds all its model's holders busy becomes a load elsewhere, so the copies of a hot model
/// are what carries it (pricing duplicates at 1 dropped the simulator's 120-runner fleet from
/// 75 % to 37 % hits). Under `fastest`, pricing them at 1 won a point with one router but
/// lost up to 6 with two, as Envoy runs them (one per worker, `simulate --proxies 2
/// --what-if-exact-in-flight`) and as the real benchmark showed (`fastest` 55.5 % against
/// `any_available`'s 62.8 % at Zipf 1.0 / 60 %): two routers that each see a second copy
/// evict both at once, and the model is loaded again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prices<'a> {
    pub(crate) popularity: &'a Popularity,
}

impl Prices<'_> {
    /// What evicting the model with hash `hash` held by `copies` available runners costs:
    /// 1 + its share of the demand for a duplicate, else 2 + its popularity estimate.
    #[inline]
    pub(crate) fn eviction(&self, hash: u64, copies: u32) -> u32 {
        let estimate = u32::from(self.popularity.estimate(hash));
        if copies > 1 {
            1 + estimate / copies
        } else {
            2 + estimate
        }
    }
}

/// The eviction a miss on runner `i` causes: 0 for a free slot, else its victim's
/// [`Prices::eviction`]; [`crate::rank::UNKNOWN_CAPACITY_COST`] when the capacity is unknown.
#[inline]
pub(crate) fn victim_cost(prices: Prices<'_>, victims: &[Victim], i: u32, r: &ViewRunner) -> u32 {
    let c = slot_cost(r);
    if c != 1 {
        return c;
    }
    match victims.get(i as usize) {
        Some(v) => prices.eviction(v.hash, v.copies),
        None => 2,
    }
}

/// The cost of a miss on runner `i` as the router prices it (with `pins`, the models in use
/// on each runner): what [`crate::rank::rank_by`] orders the runners for a miss by.
pub(crate) fn miss_cost(
    view: &View,
    prices: Prices<'_>,
    victims: &[Victim],
    pins: &[Pins],
    i: u32,
    r: &ViewRunner,
) -> u32 {
    match pins.get(i as usize) {
        // As many models in use as slots (some perhaps no longer listed): a load waits.
        Some(p) if r.capacity > 0 && p.len() >= r.capacity as usize => ALL_PINNED_COST,
        Some(p) if !p.is_empty() && slot_cost(r) == 1 => pinned_victim_cost(view, prices, p, i),
        _ => victim_cost(prices, victims, i, r),
    }
}

/// A floor of [`miss_cost`] read without looking up any hint, which the fleet scan reads for
/// every runner: 1 for a full runner with models in use (its victim is found by a walk of its
/// hints; it costs at least 1), otherwise exact when computed. It stays a floor while the
/// runner, its victim and its pins do not change (the router recomputes it when they do) and
/// the popularity counters do not halve (they only grow in between, so no model of the
/// runner becomes cheaper to evict than the victim was; the router recomputes every victim
/// and floor when they halve). Floors of 0, [`ALL_PINNED_COST`] and
/// [`crate::rank::UNKNOWN_CAPACITY_COST`] are always exact: they depend on the runner and its
/// pins alone.
pub(crate) fn miss_cost_floor(
    prices: Prices<'_>,
    victims: &[Victim],
    pins: &[Pins],
    i: u32,
    r: &ViewRunner,
) -> u32 {
    match pins.get(i as usize) {
        Some(p) if r.capacity > 0 && p.len() >= r.capacity as usize => ALL_PINNED_COST,
        Some(p) if !p.is_empty() && slot_cost(r) == 1 => 1,
        _ => victim_cost(prices, victims, i, r),
    }
}

/// [`victim_cost`] for a full runner with models in use (`pins`): its victim is the cheapest
/// listed model not in use ([`best_victim`]); [`ALL_PINNED_COST`] if none.
pub(crate) fn pinned_victim_cost(view: &View, prices: Prices<'_>, pins: &Pins, idx: u32) -> u32 {
    match best_victim(view, prices, idx, |hash| pinned(pins, hash)) {
        Some((v, _)) => prices.eviction(v.hash, v.copies),
        None => ALL_PINNED_COST,
    }
}

/// The listed model of runner `idx` whose eviction costs least ([`Prices::eviction`]),
/// skipping those `skip` says are in use; among equals the least recently used (runners
/// list most recently used first). With its position in the runner's list. The router asks
/// the runner to evict it (the `x-hint-router-evict` request header), so this, not the
/// runner's LRU model, is what a miss there costs.
pub(crate) fn best_victim(
    view: &View,
    prices: Prices<'_>,
    idx: u32,
    skip: impl Fn(u64) -> bool,
) -> Option<(Victim, usize)> {
    let r = view.runner(idx)?;
    let mut best: Option<(u32, Victim, usize)> = None;
    for (k, h) in r.hints.iter().enumerate().rev() {
        let hash = hint_hash(h);
        if skip(hash) {
            continue;
        }
        let others = view
            .holders_hashed(h, hash)
            .iter()
            .filter(|&&j| j != idx && view.runner(j).is_some_and(|r| r.available));
        let copies = 1 + others.count() as u32;
        let cost = prices.eviction(hash, copies);
        if best.map_or(true, |(c, _, _)| cost < c) {
            best = Some((cost, Victim { hash, copies }, k));
            if cost == 1 {
                break; // nothing is cheaper to evict than a cold duplicate
            }
        }
    }
    best.map(|(_, v, k)| (v, k))
}

/// Runner `idx`'s eviction victim in `view`: [`best_victim`] with nothing in use.
pub(crate) fn victim_of(view: &View, prices: Prices<'_>, idx: u32) -> Victim {
    best_victim(view, prices, idx, |_| false).map(|(v, _)| v).unwrap_or_default()
}
