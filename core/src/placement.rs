//! Where a miss goes: the eviction each runner would make, priced by the popularity of its
//! victim (see [`crate::router`] for the rules).

use crate::popularity::{hint_hash, Popularity};
use crate::rank::slot_cost;
use crate::table::{View, ViewRunner};
use smallvec::SmallVec;

/// Models with requests of this router in flight on one runner: (hint hash, requests).
/// A runner never evicts a model in use, so these are not eviction victims.
pub(crate) type Pins = SmallVec<[(u64, u32); 4]>;

/// Most distinct models pinned per runner that are tracked (a runner has few slots).
pub(crate) const MAX_PINS: usize = 64;

/// Cost of a miss on a runner whose every listed model is in use: the load waits for a slot.
pub(crate) const ALL_PINNED_COST: u32 = 1 << 16;

/// A runner's eviction victim as the router last computed it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Victim {
    /// [`hint_hash`] of its least recently used hint.
    pub(crate) hash: u64,
    /// Another available runner lists that hint too.
    pub(crate) dup: bool,
}

/// The eviction a miss on runner `i` causes: 0 for a free slot, 1 for a victim another
/// runner also holds, else 2 + the victim's popularity; [`crate::rank::UNKNOWN_CAPACITY_COST`]
/// when the capacity is unknown.
#[inline]
pub(crate) fn victim_cost(popularity: &Popularity, victims: &[Victim], i: u32, r: &ViewRunner) -> u32 {
    let c = slot_cost(r);
    if c != 1 {
        return c;
    }
    match victims.get(i as usize) {
        Some(v) if v.dup => 1,
        Some(v) => 2 + u32::from(popularity.estimate(v.hash)),
        None => 2,
    }
}

/// The cost of a miss on runner `i` as the router prices it (with `pins`, the models in use
/// on each runner): what [`crate::rank::rank_by`] orders the runners for a miss by.
pub(crate) fn miss_cost(
    view: &View,
    popularity: &Popularity,
    victims: &[Victim],
    pins: &[Pins],
    i: u32,
    r: &ViewRunner,
) -> u32 {
    match pins.get(i as usize) {
        // As many models in use as slots (some perhaps no longer listed): a load waits.
        Some(p) if r.capacity > 0 && p.len() >= r.capacity as usize => ALL_PINNED_COST,
        Some(p) if !p.is_empty() && slot_cost(r) == 1 => pinned_victim_cost(view, popularity, p, i, r),
        _ => victim_cost(popularity, victims, i, r),
    }
}

/// A floor of [`miss_cost`] read without looking up any hint, which the fleet scan reads for
/// every runner: 1 for a full runner with models in use (its victim is found by a walk of its
/// hints; it costs at least 1), otherwise exact when computed. It stays a floor while the
/// runner, its victim and its pins do not change (the router recomputes it when they do) and
/// the popularity counters do not halve (they only grow in between; the router recomputes
/// every floor when they halve). Floors of 0, [`ALL_PINNED_COST`] and
/// [`crate::rank::UNKNOWN_CAPACITY_COST`] are always exact: they depend on the runner and its
/// pins alone.
pub(crate) fn miss_cost_floor(
    popularity: &Popularity,
    victims: &[Victim],
    pins: &[Pins],
    i: u32,
    r: &ViewRunner,
) -> u32 {
    match pins.get(i as usize) {
        Some(p) if r.capacity > 0 && p.len() >= r.capacity as usize => ALL_PINNED_COST,
        Some(p) if !p.is_empty() && slot_cost(r) == 1 => 1,
        _ => victim_cost(popularity, victims, i, r),
    }
}

/// [`victim_cost`] for a full runner with models in use (`pins`): its victim is the least
/// recently used listed model not in use, as a runner evicts; [`ALL_PINNED_COST`] if none.
pub(crate) fn pinned_victim_cost(
    view: &View,
    popularity: &Popularity,
    pins: &Pins,
    idx: u32,
    r: &ViewRunner,
) -> u32 {
    for h in r.hints.iter().rev() {
        let hash = hint_hash(h);
        if pins.iter().any(|&(p, _)| p == hash) {
            continue;
        }
        let dup = view.holders(h).iter().any(|&j| j != idx && view.runner(j).is_some_and(|r| r.available));
        return if dup { 1 } else { 2 + u32::from(popularity.estimate(hash)) };
    }
    ALL_PINNED_COST
}

/// Runner `idx`'s eviction victim in `view`: its last-listed hint.
pub(crate) fn victim_of(view: &View, idx: u32) -> Victim {
    let Some(h) = view.runner(idx).and_then(|r| r.hints.last()) else {
        return Victim::default();
    };
    let dup = view.holders(h).iter().any(|&j| j != idx && view.runner(j).is_some_and(|r| r.available));
    Victim { hash: hint_hash(h), dup }
}
