//! One routing decision as a worker makes it: [`rank_by`] plus the rules that make the fleet's
//! separate caches behave like one (found and measured with the routing benchmark's
//! simulator, see `docs/bench-routing.md`):
//!
//! * **Busy is honest.** A runner is busy when the requests in flight to it, including those
//!   waiting there for a model load, reach its `max_concurrency`: every one of them will need
//!   an inference slot. (An earlier rule did not count requests routed to wait for a load, so
//!   40 requests for a cold model all went to one runner.)
//! * **Misses evict the coldest model.** A miss goes to the runner whose eviction victim (the
//!   last model in its hint list, which runners send most recently used first) costs least
//!   fleet-wide: a free slot first, then a model another runner also holds (a duplicate), then
//!   the victim with the lowest [`Popularity`] estimate (a fixed-size sketch of recent request
//!   frequencies), then the fewest in flight. Capacity 0 ("unknown") ranks after every runner
//!   of known capacity.
//! * **A miss lists its hint at once.** The runner a miss is sent to is treated as holding the
//!   model from that moment (most recently used first, the least recently used dropped if the
//!   cache is full, as `runner-example` evicts), so the next requests for it follow and join
//!   the load instead of starting another one elsewhere. The runner's response header or next
//!   poll replaces the guess with the truth.
//! * **Busy holders** are handled as [`WhenHoldersBusy`] says: go at once to another available
//!   runner (`any_available`, fal's rule), or go where the request is expected to finish first
//!   (`fastest`), from load and inference times learned with [`Router::observe`]; under
//!   `fastest` a model whose requests keep queueing is copied into a free slot elsewhere once
//!   their waits add up to a load (`router/busy.rs`, `rent.rs`: ski rental).

use crate::hint::HintList;
use crate::learned::Times;
use crate::placement::{
    best_victim, miss_cost, miss_cost_floor, pinned, victim_of, Pins, Prices, Victim, ALL_PINNED_COST,
};
use crate::popularity::{hint_hash, Popularity};
use crate::rank::{rank_hinted, Costs, Hinted, Outcome, UNKNOWN_CAPACITY_COST};
use crate::rent::Rent;
use crate::table::View;
use busy::RentMove;
use serde::Deserialize;
use smallvec::SmallVec;

/// What to do with a request whose model's holders are all busy (plugin config field
/// `when_holders_busy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenHoldersBusy {
    /// Go at once to another available runner (which loads the model): fal's documented rule.
    AnyAvailable,
    /// Go where the request is expected to finish first: a busy holder's queue
    /// (`requests ahead / max_concurrency x inference time`) against a load elsewhere (load
    /// time + inference, plus the cost of the eviction it causes). Until load and inference
    /// times have been observed it behaves as `AnyAvailable`. A model whose requests keep
    /// queueing is loaded elsewhere once the waits they paid since its queue last cleared
    /// reach the load's price (ski rental, `core/src/rent.rs`).
    #[default]
    Fastest,
}

impl WhenHoldersBusy {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            WhenHoldersBusy::AnyAvailable => "any_available",
            WhenHoldersBusy::Fastest => "fastest",
        }
    }
}

/// What [`Router::route`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// How the first candidate was chosen.
    pub outcome: Outcome,
    /// The request will wait for a model load on the first candidate (it does not hold the
    /// model yet, or only as a guess of ours). Count it in the `loading` counter until it
    /// ends.
    pub load: bool,
    /// This decision listed the hint on the first candidate (a guess): other workers should
    /// hear of it (the filter forwards the runner's new list to the poller).
    pub listed: bool,
    /// Requests in flight to the first candidate when it was chosen (for [`Router::observe`]).
    pub ahead: u32,
    /// The hint's hash, when this request pins its model on the first candidate (until
    /// [`Router::observe`] hears that it ended).
    pub pin: Option<u64>,
    /// The first candidate will load the model from its warm tier (it reports the model
    /// `warm`): a cheap load, not taught as a load time.
    pub warm: bool,
}

/// A worker's routing state: its [`View`] of the fleet, plus the hints it listed on runners
/// itself when it sent them a miss (not yet confirmed by the runner), the popularity
/// estimate, each runner's eviction victim and the learned times.
#[derive(Debug, Default, Clone)]
pub struct Router {
    view: View,
    mode: WhenHoldersBusy,
    /// Per runner: hints listed by [`Router::route`] and not yet confirmed, with the time
    /// (microseconds, the caller's clock) they were listed.
    guessed: Vec<Vec<(String, u64)>>,
    popularity: Popularity,
    victims: Vec<Victim>,
    times: Vec<Times>,
    fleet: Times,
    pins: Vec<Pins>,
    /// The shared pin entries [`Router::sync_pins`] last took, and the runners whose pins
    /// this worker changed since: together they say which runners the next sync must rebuild.
    synced_pins: Vec<u8>,
    touched_since_sync: Vec<u32>,
    /// Per runner: a floor of the cost of a miss there ([`miss_cost_floor`]), read by the fleet
    /// scan; recomputed whenever what it depends on changes.
    floors: Vec<u32>,
    /// The model the last [`Router::route`] asks its first candidate to evict, if it made
    /// room there.
    evicting: Option<String>,
    /// Cache slots of the fleet (every runner's capacity, at least 1 each): sizes the
    /// popularity window.
    slots: u64,
    /// Waits paid at busy holders per model (`fastest`).
    rent: Rent,
}

/// Whether runner `j`'s eviction victim is the model with `hash`.
fn is_victim(victims: &[Victim], j: u32, hash: u64) -> bool {
    victims.get(j as usize).is_some_and(|v| v.hash == hash)
}

/// Where equally good runners start being tried ([`rank_by`]'s rotation): for a hinted
/// request a point fixed by the hint, so that every worker and every Envoy in front of the
/// same runners (same table order) sends a cold model's first request to the same runner
/// without talking to each other, and different models still spread over the fleet; for an
/// unhinted one the caller's per-request `spin`, which rotates.
fn tie_break(hint: Option<&str>, hash: u64, spin: u32) -> u32 {
    match hint {
        Some(_) => (hash >> 32) as u32,
        None => spin,
    }
}

impl Router {
    /// A router over `view` (busy holders handled the default way).
    pub fn new(view: View) -> Router {
        Router::with_mode(view, WhenHoldersBusy::default())
    }

    /// A router over `view` handling busy holders as `mode` says.
    pub fn with_mode(view: View, mode: WhenHoldersBusy) -> Router {
        let mut r = Router { view, mode, ..Router::default() };
        r.reindex_all();
        r
    }

    /// The current view.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// The model the last [`Router::route`] chose for its first candidate to evict to make
    /// room for the requested one (a miss on a full runner), if any: the filter sends it in
    /// the `x-hint-router-evict` request header.
    pub fn evicting(&self) -> Option<&str> {
        self.evicting.as_deref()
    }

    /// How busy holders are handled.
    pub fn mode(&self) -> WhenHoldersBusy {
        self.mode
    }

    /// Bytes of the state kept per model: the popularity estimate and the waits paid at busy
    /// holders (both fixed, whatever the number of distinct hints).
    pub fn popularity_bytes(&self) -> usize {
        self.popularity.bytes() + self.rent.bytes()
    }

    /// The learned (load, inference) times of runner `idx` in microseconds, falling back to
    /// the fleet's; `None` until observed.
    pub fn learned_times(&self, idx: u32) -> (Option<u64>, Option<u64>) {
        let own = self.times.get(idx as usize).copied().unwrap_or_default();
        (own.load.get().or(self.fleet.load.get()), own.infer.get().or(self.fleet.infer.get()))
    }

    /// Replaces the view (a newly published table); drops all guesses.
    pub fn replace_view(&mut self, view: View) {
        self.view = view;
        self.guessed.clear();
        self.forget_pins();
        self.reindex_all();
    }

    /// Refreshes the view in place (from a newly published table) with `f`. Guesses the new
    /// view still lists stay guesses until the runner answers the request that made them
    /// ([`Router::confirm`], [`Router::learn`]); guesses it no longer lists are dropped.
    pub fn refresh(&mut self, f: impl FnOnce(&mut View)) {
        let before = self.view.runners().len();
        f(&mut self.view);
        if self.view.runners().len() != before {
            self.forget_pins(); // other runners now: what was pinned where is unknown
        }
        let view = &self.view;
        for (i, g) in (0u32..).zip(self.guessed.iter_mut()) {
            match view.runner(i) {
                Some(r) => g.retain(|(h, _)| r.hints.iter().any(|x| x == h)),
                None => g.clear(),
            }
        }
        self.reindex_all();
    }

    /// Sizes the per-runner state for the view and recomputes every victim.
    fn reindex_all(&mut self) {
        let n = self.view.runners().len();
        self.times.resize_with(n, Times::default);
        self.pins.resize_with(n, Pins::new);
        self.slots = self.view.runners().iter().map(|r| u64::from(r.capacity.max(1))).sum();
        self.size_window();
        self.revictim_all();
    }

    /// Recomputes every victim and cost floor (the view changed, or the popularity counters
    /// halved).
    fn revictim_all(&mut self) {
        let n = self.view.runners().len() as u32;
        self.victims.clear();
        let prices = Prices { popularity: &self.popularity };
        self.victims.extend((0..n).map(|i| victim_of(&self.view, prices, i)));
        self.refloor_all();
    }

    /// TinyLFU's sample size: about ten times the cache, here every slot of the fleet.
    fn size_window(&mut self) {
        self.popularity.set_window(u32::try_from(self.slots.saturating_mul(16)).unwrap_or(u32::MAX));
    }

    fn reindex(&mut self, idx: u32) {
        let v = victim_of(&self.view, Prices { popularity: &self.popularity }, idx);
        if let Some(slot) = self.victims.get_mut(idx as usize) {
            *slot = v;
        }
        self.refloor(idx);
    }

    /// Recomputes runner `idx`'s cost floor (its runner, victim or pins changed).
    fn refloor(&mut self, idx: u32) {
        let (prices, victims, pins) = (Prices { popularity: &self.popularity }, &self.victims, &self.pins);
        let floor = self.view.runner(idx).map(|r| miss_cost_floor(prices, victims, pins, idx, r));
        if let (Some(f), Some(slot)) = (floor, self.floors.get_mut(idx as usize)) {
            *slot = f;
        }
    }

    /// Recomputes every runner's cost floor.
    fn refloor_all(&mut self) {
        let (prices, victims, pins) = (Prices { popularity: &self.popularity }, &self.victims, &self.pins);
        let runners = (0u32..).zip(self.view.runners());
        self.floors.clear();
        self.floors.extend(runners.map(|(i, r)| miss_cost_floor(prices, victims, pins, i, r)));
    }

    /// After a request for the hint with `hash` was counted in the popularity estimate
    /// (`halved`: the count halved every counter), brings the victims and cost floors that
    /// count moved up to date. The cost floors stay floors while counts grow; when the
    /// counters halve they may not, and all are recomputed. (A floor that lags behind a
    /// growing count is still one: the scan then prices that runner exactly. A hit on a runner
    /// whose victim it is brings that floor up to date.) [`Router::route`] calls it only when
    /// [`Router::recount_needed`] says so (the common hit path needs nothing).
    fn recount(&mut self, hint: &str, hash: u64, halved: bool) {
        if halved {
            // Which model is cheapest to evict may have changed anywhere.
            self.revictim_all();
            return;
        }
        // Runners whose victim this is now price it higher: another of their models may be
        // cheaper to evict. (Only a holder can have it as its victim.)
        let victims = &self.victims;
        let holders = self.view.holders_hashed(hint, hash);
        let stale: SmallVec<[u32; 8]> =
            holders.iter().copied().filter(|&j| is_victim(victims, j, hash)).collect();
        for j in stale {
            self.reindex(j);
        }
    }

    /// Whether [`Router::recount`] has anything to do for a request counted with `halved`,
    /// whose hint (hash `hash`) `holders` list.
    fn recount_needed(&self, halved: bool, hash: u64, holders: &[u32]) -> bool {
        halved || holders.iter().any(|&j| is_victim(&self.victims, j, hash))
    }

    /// Runner `idx` itself confirmed its hint list is what the view has: our guesses for it
    /// are now facts. Returns whether there were guesses (the view then knew more than the
    /// published table, which should hear of it).
    pub fn confirm(&mut self, idx: u32) -> bool {
        match self.guessed.get_mut(idx as usize) {
            Some(g) if !g.is_empty() => {
                g.clear();
                true
            }
            _ => false,
        }
    }

    /// Records what runner `idx` itself said it holds (a response header); drops our guesses
    /// for it. Returns whether its hints changed.
    pub fn learn(&mut self, idx: u32, hints: &HintList) -> bool {
        if let Some(g) = self.guessed.get_mut(idx as usize) {
            g.clear();
        }
        let changed = self.view.set_runner_hints(idx, hints);
        if changed {
            self.reindex(idx);
        }
        changed
    }

    /// Learns runner `idx`'s times from what it reported itself about one request (a queued
    /// job's answer: `x-runner-load-ms`, `x-runner-infer-ms`), where the proxy could not time
    /// the request. The same estimates [`Router::observe`] feeds.
    pub fn learn_reported(&mut self, idx: u32, load_us: Option<u64>, infer_us: Option<u64>) {
        if self.view.runner(idx).is_none() {
            return;
        }
        if let Some(load) = load_us {
            self.fleet.load.add(load);
            if let Some(t) = self.times.get_mut(idx as usize) {
                t.load.add(load);
            }
        }
        if let Some(infer) = infer_us {
            self.fleet.infer.add(infer);
            if let Some(t) = self.times.get_mut(idx as usize) {
                t.infer.add(infer);
            }
        }
    }

    /// Learns from a request that ended: `decision` routed it to runner `idx`, and it took
    /// `elapsed_us` from routing to its end. A request that started a load teaches the load
    /// time (less the inference time known so far); a plain hit teaches the inference time
    /// (its latency divided by the rounds of `max_concurrency` requests ahead of it).
    /// Call it once for every decision whose request ended, whatever its status: it also
    /// releases the model the request pinned. `elapsed_us` is `None` for a request that got
    /// no answer (reset, timeout): nothing is learned from it.
    pub fn observe(&mut self, idx: u32, decision: &Decision, elapsed_us: Option<u64>) {
        if let Some(hash) = decision.pin {
            self.unpin(idx, hash);
        }
        let (Some(r), Some(elapsed_us)) = (self.view.runner(idx), elapsed_us) else { return };
        let mc = r.max_concurrency.max(1);
        if decision.listed && !decision.warm {
            // (A load from the warm tier is no sample of a load from disk, which is what the
            // `fastest` rule weighs a busy holder's queue against.)
            let infer = self.learned_times(idx).1.unwrap_or(0);
            let sample = elapsed_us.saturating_sub(infer);
            self.fleet.load.add(sample);
            if let Some(t) = self.times.get_mut(idx as usize) {
                t.load.add(sample);
            }
        } else if !decision.load && decision.outcome == Outcome::Hit {
            // (Most hits find a free slot: no division then, which was a tenth of `observe`.)
            let rounds = if decision.ahead < mc { 1 } else { u64::from(decision.ahead / mc) + 1 };
            let sample = if rounds == 1 { elapsed_us } else { elapsed_us / rounds };
            self.fleet.infer.add(sample);
            if let Some(t) = self.times.get_mut(idx as usize) {
                t.infer.add(sample);
            }
        }
    }

    /// Ranks candidates for a request with `hint` into `out` (best first, at most `max`),
    /// where `in_flight[i]` counts the requests in flight to runner `i` (all of them,
    /// including those waiting for a model load) and `now_us` is the caller's clock in
    /// microseconds. `max_hints` caps a runner's list when its capacity is unknown.
    #[allow(clippy::too_many_arguments)]
    pub fn route(
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
        let spin = tie_break(hint, hash, spin);
        // The holders, looked up by the hash (the hint is hashed once per request) and, unless
        // counting the request changed a victim, once for the count and the whole ranking.
        let hinted = match hint {
            Some(h) => {
                let holders = self.view.holders_hashed(h, hash);
                let halved = self.popularity.record(hash);
                if self.recount_needed(halved, hash, holders) {
                    self.recount(h, hash, halved);
                    Some(Hinted { hint: h, holders: self.view.holders_hashed(h, hash) })
                } else {
                    Some(Hinted { hint: h, holders })
                }
            }
            None => None,
        };
        let (outcome, rent) = self.rank_hashed(hinted, hash, in_flight, now_us, spin, max, out);
        self.settle_rent(hash, rent);
        self.follow(hint, hash, outcome, in_flight, now_us, max_hints, out)
    }

    /// What [`Router::route`] does once `out` is ranked (`outcome`): the decision, a pin for
    /// its model, and a miss listed on the first candidate.
    #[allow(clippy::too_many_arguments)]
    fn follow(
        &mut self,
        hint: Option<&str>,
        hash: u64,
        outcome: Outcome,
        in_flight: &[u32],
        now_us: u64,
        max_hints: usize,
        out: &[u32],
    ) -> Decision {
        let ahead = out.first().map(|&i| in_flight.get(i as usize).copied().unwrap_or(0)).unwrap_or(0);
        let pin = match (hint, out.first()) {
            (Some(_), Some(&first)) => self.pin(first, hash).then_some(hash),
            _ => None,
        };
        self.evicting = None;
        let plain = Decision { outcome, load: false, listed: false, ahead, pin, warm: false };
        let (Some(h), Some(&first)) = (hint, out.first()) else {
            return plain;
        };
        let Some(r) = self.view.runner(first) else {
            return plain;
        };
        // A hit's first candidate holds the hint (rank's rule), so only other outcomes look.
        if outcome == Outcome::Hit || r.hints.iter().any(|x| x == h) {
            // A hit, unless the hint is only our own guess: then it joins a load.
            let guessed = self.guessed.get(first as usize).is_some_and(|g| g.iter().any(|(x, _)| x == h));
            return Decision { load: guessed, ..plain };
        }
        let warm = r.warm.iter().any(|x| x == h);
        let keep = if r.capacity > 0 { r.capacity as usize } else { max_hints.max(1) };
        // The runner makes room by evicting the victim we name (below), then, if it needs more
        // room, its least recently used models not in use; if all are in use the load waits,
        // and the list still holds `keep` models.
        let excess = (r.hints.len() + 1).saturating_sub(keep);
        let pins = self.pins.get(first as usize);
        let in_use = |hash: u64| pins.is_some_and(|p| pinned(p, hash));
        // One mark per listed hint (a runner's list may be long: linear, not quadratic).
        let mut drop = vec![false; r.hints.len()];
        let mut dropping = 0;
        // The model the runner is asked to evict first: the cheapest one not in use.
        let mut evict = None;
        if excess > 0 {
            if let Some((_, k)) =
                best_victim(&self.view, Prices { popularity: &self.popularity }, first, in_use)
            {
                if let (Some(d), Some(x)) = (drop.get_mut(k), r.hints.get(k)) {
                    *d = true;
                    dropping += 1;
                    evict = Some(x.clone());
                }
            }
        }
        for pass_in_use in [false, true] {
            for (k, x) in r.hints.iter().enumerate().rev() {
                if dropping >= excess {
                    break;
                }
                if let Some(d) = drop.get_mut(k) {
                    if !*d && in_use(hint_hash(x)) == pass_in_use {
                        *d = true;
                        dropping += 1;
                    }
                }
            }
        }
        let mut hints = Vec::with_capacity(keep.min(r.hints.len() + 1));
        hints.push(h.to_string());
        let mut dropped = Vec::with_capacity(dropping);
        for (x, d) in r.hints.iter().zip(&drop) {
            if *d {
                dropped.push(x.clone());
            } else {
                hints.push(x.clone());
            }
        }
        self.view.set_runner_hints(first, &HintList { hints, invalid: 0, truncated: 0 });
        self.evicting = evict;
        self.reindex(first);
        // Runners that hold the hint too now have a duplicate (a cheaper victim); runners
        // that held a dropped hint too may have lost theirs.
        dropped.push(h.to_string());
        self.reindex_sharers(first, &dropped);
        let n = self.view.runners().len();
        if self.guessed.len() < n {
            self.guessed.resize_with(n, Vec::new);
        }
        if let Some(g) = self.guessed.get_mut(first as usize) {
            g.retain(|(x, _)| x != h);
            g.insert(0, (h.to_string(), now_us));
            g.truncate(keep);
        }
        Decision { load: true, listed: true, warm, ..plain }
    }

    /// The ranking part of [`Router::route`] alone: what it would answer, without recording
    /// the request or listing a miss (for benchmarks and diagnostics).
    pub fn rank(
        &self,
        hint: Option<&str>,
        in_flight: &[u32],
        now_us: u64,
        spin: u32,
        max: usize,
        out: &mut Vec<u32>,
    ) -> Outcome {
        let hash = hint.map(hint_hash).unwrap_or(0);
        let hinted = hint.map(|h| Hinted { hint: h, holders: self.view.holders_hashed(h, hash) });
        self.rank_hashed(hinted, hash, in_flight, now_us, spin, max, out).0
    }

    #[allow(clippy::too_many_arguments)]
    fn rank_hashed(
        &self,
        hinted: Option<Hinted<'_>>,
        hash: u64,
        in_flight: &[u32],
        now_us: u64,
        spin: u32,
        max: usize,
        out: &mut Vec<u32>,
    ) -> (Outcome, RentMove) {
        let (view, victims, pins) = (&self.view, &self.victims, &self.pins);
        let prices = Prices { popularity: &self.popularity };
        let exact = |i: u32, floor: u32| match floor {
            0 | ALL_PINNED_COST | UNKNOWN_CAPACITY_COST => floor, // always exact (miss_cost_floor)
            _ => view.runner(i).map_or(floor, |r| miss_cost(view, prices, victims, pins, i, r)),
        };
        let costs = Costs { floor: &self.floors, exact };
        let outcome = rank_hinted(view, hinted, in_flight, in_flight, costs, spin, max, out);
        self.when_holders_busy(outcome, hinted, hash, in_flight, now_us, max, out)
    }
}

mod adopt;
mod busy;
mod delta;
mod pins;
#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;
