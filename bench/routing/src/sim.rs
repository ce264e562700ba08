//! A deterministic discrete-event simulator of the same system: virtual time, no sleeps.
//!
//! Runners behave as `runner-example` does (see its `cache` and `runner` modules): a cache
//! of `capacity` models counting loading ones that evicts the model the router asks for
//! (`x-hint-router-evict`, [`Router::evicting`]) when it can, else its least recently used
//! one (always, with `what_if_runner_lru`), pinned models never evicted, one shared
//! load per absent model (single flight), a FIFO queue of absent models when every slot is
//! pinned or loading (advertised with the hints, the next to load first, at most `capacity` of
//! them), loads that hold no inference slot, and `max_concurrency` inference slots
//! served first come first served. A request that times out is cancelled as Envoy would reset
//! it: it leaves any queue, frees its inference slot and unpins its model. With
//! `host_cache`, each runner also keeps a warm tier in host memory (`--host-cache-mb`): loads
//! of models in it take `warm_load_us`, and polls report them as `warm`.
//!
//! The hint policies are the filter's own [`hint_router_core::router::Router`] (one per
//! `when_holders_busy` mode), fed as the filter feeds it: every runner is polled every
//! `poll_interval_us`, the hints of each response are learned when it is sent back, in-flight
//! counts move at once, and every request that ends is reported to `Router::observe`. The
//! Envoy policies are ports of Envoy's code ([`crate::envoy_lb`]).
//!
//! With `proxies` > 1, several Envoys share the runners, request `i` of the trace going
//! through proxy `i % proxies` (an L4 balancer alternating). Each proxy has its own view,
//! its own poll phases and its own in-flight counts: it counts its own requests, and each of
//! its polls rebases its count for that runner on the runner's own `in_flight` (every proxy's
//! requests), as the filter's poller does. It learns hints only from its own responses.

use crate::envoy_lb::{bounded_pick, header_hash, least_request_pick, Ring};
use crate::report::{Record, Status};
use crate::rng::Rng;
use crate::workload::{model_id, model_name, Trace};
use hint_router_core::hint::HintList;
use hint_router_core::inflight;
use hint_router_core::rank::{rank, Outcome};
use hint_router_core::router::{Decision, Router};
use hint_router_core::table::{Table, TableRunner, View};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

pub use params::SimParams;
pub use policy::Policy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    LoadDone(u32, u32),
    InferDone(u32, u32),
    Timeout(u32),
    /// Proxy, runner.
    Poll(u32, u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqState {
    Pending,
    WaitingLoad(u32, u32),
    ReadyQ(u32),
    Running(u32),
    Done,
}

#[derive(Debug, Clone)]
struct Entry {
    model: u32,
    pins: u32,
    last_used: u64,
    ready: bool,
    waiters: Vec<u32>,
}

#[derive(Debug, Clone, Default)]
struct SimRunner {
    entries: Vec<Entry>,
    /// Models waiting for a cache slot: (model, waiters, the model the router asked to evict).
    queue: VecDeque<(u32, Vec<u32>, Option<u32>)>,
    ready_q: VecDeque<u32>,
    running: u32,
    clock: u64,
    /// The warm tier: (last loaded, model), at most `host_cache`.
    host: Vec<(u64, u32)>,
}

/// One Envoy's routing state: what it knows of the fleet and counts by itself.
struct Proxy {
    /// The filter's routing state (its view of the fleet lives in it).
    router: Router,
    /// `plain_rank`'s view.
    view: View,
    /// This proxy's in-flight count per runner: its own requests, rebased on the runner's
    /// own count at each of its polls.
    inflight: Vec<u32>,
    /// Requests in flight through this proxy (its circuit breaker).
    total_inflight: u32,
    spin: u32,
    rr: u32,
}

struct Sim<'a> {
    p: &'a SimParams,
    trace: &'a Trace,
    policy: Policy,
    now: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    runners: Vec<SimRunner>,
    /// Per runner: the requests it has from every proxy (what it reports as `in_flight`).
    at_runner: Vec<u32>,
    waiting_load: Vec<u32>,
    busy_view: Vec<u32>,
    /// Per request: the filter's decision, for [`Router::observe`] when it ends.
    routed: Vec<Option<Decision>>,
    /// With `what_if_shared_pins`: an in-flight value ([`inflight`]) holding every proxy's
    /// pins, as one Envoy's workers share them, and per request whether its pin went in.
    shared_pins: Vec<u8>,
    pinned_shared: Vec<bool>,
    /// The last `pick`'s decision.
    last_decision: Option<Decision>,
    proxies: Vec<Proxy>,
    states: Vec<ReqState>,
    hit: Vec<bool>,
    /// Per request: since when it has been queued, and whether for an inference slot (else
    /// for a cache slot).
    queued_since: Vec<Option<(u64, bool)>>,
    records: Vec<Record>,
    loads: Vec<u64>,
    names: Vec<String>,
    ring: Ring,
    rng: Rng,
    out: Vec<u32>,
    decisions: BTreeMap<&'static str, u64>,
}

/// The result of one simulated run: a record per request of the trace, and load start times.
#[derive(Debug, Clone)]
pub struct SimRun {
    /// One per request, in trace order.
    pub records: Vec<Record>,
    /// Start times of every model load, microseconds.
    pub loads: Vec<u64>,
    /// The hint policy's decisions ([`Outcome`] names) in the measured window.
    pub decisions: BTreeMap<&'static str, u64>,
}

/// Runs `trace` through `policy`.
pub fn simulate(p: &SimParams, trace: &Trace, policy: Policy) -> SimRun {
    let addrs = p.runner_addrs();
    let table = Table {
        generation: 1,
        runners: addrs
            .iter()
            .map(|a| TableRunner {
                addr: a.clone(),
                available: true,
                hints: Vec::new(),
                capacity: p.capacity as u32,
                max_concurrency: p.max_concurrency,
                queue_token: 0,
                unreachable: false,
                warm: Vec::new(),
            })
            .collect(),
    };
    let n = trace.reqs.len();
    let proxy = || Proxy {
        router: Router::with_mode(View::from_table(&table), policy.when_holders_busy()),
        view: View::from_table(&table),
        inflight: vec![0; p.runners],
        total_inflight: 0,
        spin: 0,
        rr: 0,
    };
    let mut sim = Sim {
        p,
        trace,
        policy,
        now: 0,
        seq: 0,
        events: BinaryHeap::with_capacity(1024),
        runners: vec![SimRunner::default(); p.runners],
        at_runner: vec![0; p.runners],
        waiting_load: vec![0; p.runners],
        busy_view: vec![0; p.runners],
        routed: vec![None; n],
        shared_pins: Vec::new(),
        pinned_shared: vec![false; n],
        last_decision: None,
        proxies: (0..p.proxies.max(1)).map(|_| proxy()).collect(),
        states: vec![ReqState::Pending; n],
        hit: vec![false; n],
        queued_since: vec![None; n],
        records: vec![Record::default(); n],
        loads: Vec::new(),
        names: (0..trace.spec.models as u32).map(model_name).collect(),
        ring: if matches!(policy, Policy::RingHash | Policy::RingHashBounded) {
            Ring::new(&addrs)
        } else {
            Ring::new(&[])
        },
        rng: Rng::new(p.seed),
        out: Vec::with_capacity(4),
        decisions: BTreeMap::new(),
    };
    sim.run();
    SimRun { records: sim.records, loads: sim.loads, decisions: sim.decisions }
}

impl Sim<'_> {
    fn push(&mut self, at: u64, ev: Event) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, ev)));
    }

    fn run(&mut self) {
        let mut next_arrival = 0usize;
        if self.policy.is_hint() {
            let mut rng = Rng::new(self.p.seed ^ 0x5eed);
            for k in 0..self.proxies.len() as u32 {
                for r in 0..self.p.runners as u32 {
                    let phase = rng.below(self.p.poll_interval_us.max(1));
                    self.push(phase, Event::Poll(k, r));
                }
            }
        }
        let end = self.trace.spec.warmup_us + self.trace.spec.measure_us;
        loop {
            // Arrivals are merged from the trace instead of sitting in the heap.
            let next_ev = self.events.peek().map(|Reverse((t, _, _))| *t);
            let arrival = self.trace.reqs.get(next_arrival).map(|r| r.at_us);
            let take_arrival = match (arrival, next_ev) {
                (Some(a), Some(e)) => a <= e,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if take_arrival {
                if let Some(a) = arrival {
                    self.now = a;
                }
                self.arrive(next_arrival as u32);
                next_arrival += 1;
                continue;
            }
            let Some(Reverse((t, _, ev))) = self.events.pop() else { break };
            self.now = t;
            match ev {
                Event::LoadDone(r, m) => self.load_done(r, m),
                Event::InferDone(r, i) => self.infer_done(r, i),
                Event::Timeout(i) => self.timeout(i),
                Event::Poll(k, r) => {
                    self.poll(k, r);
                    // Stop polling once nothing is left to do.
                    let busy = self.proxies.iter().any(|px| px.total_inflight > 0);
                    if next_arrival < self.trace.reqs.len() || busy || t < end {
                        self.push(t + self.p.poll_interval_us.max(1), Event::Poll(k, r));
                    }
                }
            }
        }
    }

    /// The runner proxy `k` picks for a request for `model`.
    fn pick(&mut self, k: usize, model: u32) -> Option<u32> {
        let px = self.proxies.get_mut(k)?;
        let hint = self.names.get(model as usize).map(String::as_str);
        match self.policy {
            Policy::Hint | Policy::HintFastest if !self.p.plain_rank => {
                // Exactly what the filter does per request (src/filter.rs).
                if self.p.what_if_shared_pins {
                    px.router.sync_pins(inflight::pin_bytes(&self.shared_pins));
                }
                px.spin = px.spin.wrapping_add(1);
                let d = px.router.route(hint, &px.inflight, self.now, px.spin, 3, 64, &mut self.out);
                self.last_decision = Some(d);
                if self.now >= self.trace.spec.warmup_us {
                    *self.decisions.entry(d.outcome.as_str()).or_default() += 1;
                }
                match self.out.first() {
                    Some(&r) => Some(r),
                    None => least_request_pick(&mut self.rng, &px.inflight),
                }
            }
            Policy::Hint | Policy::HintFastest => {
                px.spin = px.spin.wrapping_add(1);
                let loads: &[u32] = if self.p.what_if_loading_not_busy {
                    for ((b, f), w) in self.busy_view.iter_mut().zip(&px.inflight).zip(&self.waiting_load) {
                        *b = f.saturating_sub(*w);
                    }
                    &self.busy_view
                } else {
                    &px.inflight
                };
                let outcome: Outcome = rank(&px.view, hint, loads, px.spin, 3, &mut self.out);
                if self.p.what_if_optimistic_hints {
                    if let (Some(&r), Some(h)) = (self.out.first(), hint) {
                        let listed = px.view.runner(r).map(|v| v.hints.iter().any(|x| x == h));
                        if listed == Some(false) {
                            let mut hints = vec![h.to_string()];
                            if let Some(v) = px.view.runner(r) {
                                hints.extend(v.hints.iter().take(self.p.capacity.saturating_sub(1)).cloned());
                            }
                            px.view.set_runner_hints(r, &HintList { hints, invalid: 0, truncated: 0 });
                        }
                    }
                }
                if self.now >= self.trace.spec.warmup_us {
                    *self.decisions.entry(outcome.as_str()).or_default() += 1;
                }
                match self.out.first() {
                    Some(&r) => Some(r),
                    None => least_request_pick(&mut self.rng, &px.inflight),
                }
            }
            Policy::RoundRobin => {
                let r = px.rr % self.p.runners.max(1) as u32;
                px.rr = px.rr.wrapping_add(1);
                Some(r)
            }
            Policy::LeastRequest => least_request_pick(&mut self.rng, &px.inflight),
            Policy::RingHash => self.ring.pick(header_hash(hint.unwrap_or(""))),
            Policy::RingHashBounded => bounded_pick(
                &self.ring,
                header_hash(hint.unwrap_or("")),
                self.p.hash_balance_factor,
                &px.inflight,
            ),
        }
    }

    /// The proxy request `i` goes through.
    fn proxy_of(&self, i: u32) -> usize {
        i as usize % self.proxies.len().max(1)
    }

    fn arrive(&mut self, i: u32) {
        let Some(req) = self.trace.reqs.get(i as usize).copied() else { return };
        let k = self.proxy_of(i);
        if self.proxies.get(k).map_or(0, |px| px.total_inflight) >= self.p.max_inflight {
            self.finish(i, None, Status::Overflow);
            return;
        }
        if self.p.what_if_exact_in_flight {
            if let Some(px) = self.proxies.get_mut(k) {
                px.inflight.clone_from(&self.at_runner);
            }
        }
        let Some(r) = self.pick(k, req.model) else {
            self.finish(i, None, Status::Error);
            return;
        };
        if let Some(px) = self.proxies.get_mut(k) {
            if let Some(c) = px.inflight.get_mut(r as usize) {
                *c += 1;
            }
            px.total_inflight += 1;
        }
        if let Some(c) = self.at_runner.get_mut(r as usize) {
            *c += 1;
        }
        let listed = self.last_decision.is_some_and(|d| d.listed);
        if let (true, Some(hash)) = (self.p.what_if_shared_pins, self.last_decision.and_then(|d| d.pin)) {
            let added = inflight::add_pin(&mut self.shared_pins, self.p.runners, r, hash);
            if let Some(p) = self.pinned_shared.get_mut(i as usize) {
                *p = added;
            }
        }
        if let Some(d) = self.routed.get_mut(i as usize) {
            *d = self.last_decision.take();
        }
        if listed && self.p.what_if_shared_guesses {
            // As one Envoy's workers share a miss's guess (src/filter.rs): the others adopt
            // it at their next request; here at once.
            let list = self.proxies.get(k).and_then(|px| px.router.view().runner(r)).map(|v| HintList {
                hints: v.hints.clone(),
                invalid: 0,
                truncated: 0,
            });
            let hint = self.names.get(req.model as usize);
            if let (Some(list), Some(hint)) = (list, hint) {
                for (j, px) in self.proxies.iter_mut().enumerate() {
                    if j != k {
                        px.router.adopt_guess(r, hint, &list, self.now);
                    }
                }
            }
        }
        if let Some(rec) = self.records.get_mut(i as usize) {
            rec.runner = Some(r);
        }
        // The model the router asked the runner to evict to make room (`x-hint-router-evict`).
        let evict = if self.policy.is_hint() && !self.p.plain_rank && !self.p.what_if_runner_lru {
            self.proxies.get(k).and_then(|px| px.router.evicting()).and_then(model_id)
        } else {
            None
        };
        self.push(self.now + self.p.timeout_us, Event::Timeout(i));
        self.acquire(r, i, req.model, evict);
    }

    fn infer_done(&mut self, r: u32, i: u32) {
        if self.states.get(i as usize) != Some(&ReqState::Running(r)) {
            return; // cancelled
        }
        if let Some(run) = self.runners.get_mut(r as usize) {
            run.running = run.running.saturating_sub(1);
        }
        let model = self.trace.reqs.get(i as usize).map(|q| q.model).unwrap_or(0);
        self.unpin(r, model);
        self.leave(r, i);
        let hit = self.hit.get(i as usize).copied().unwrap_or(false);
        self.finish(i, Some(hit), Status::Ok);
        if self.p.learn_from_responses {
            if self.p.what_if_shared_responses {
                for k in 0..self.proxies.len() {
                    self.learn(k, r, false);
                }
            } else {
                self.learn(self.proxy_of(i), r, false);
            }
        }
        self.try_start(r);
    }

    fn timeout(&mut self, i: u32) {
        let state = self.states.get(i as usize).copied().unwrap_or(ReqState::Done);
        let model = self.trace.reqs.get(i as usize).map(|q| q.model).unwrap_or(0);
        let r = match state {
            ReqState::Done | ReqState::Pending => return,
            ReqState::WaitingLoad(r, m) => {
                if let Some(run) = self.runners.get_mut(r as usize) {
                    if let Some(e) = run.entries.iter_mut().find(|e| e.model == m) {
                        e.waiters.retain(|&w| w != i);
                    } else if let Some(pos) = run.queue.iter().position(|(qm, _, _)| *qm == m) {
                        if let Some((_, w, _)) = run.queue.get_mut(pos) {
                            w.retain(|&x| x != i);
                            if w.is_empty() {
                                run.queue.remove(pos);
                            }
                        }
                        self.leave(r, i);
                        self.finish(i, None, Status::Timeout);
                        return;
                    }
                }
                r
            }
            ReqState::ReadyQ(r) => {
                if let Some(run) = self.runners.get_mut(r as usize) {
                    run.ready_q.retain(|&x| x != i);
                }
                r
            }
            ReqState::Running(r) => {
                if let Some(run) = self.runners.get_mut(r as usize) {
                    run.running = run.running.saturating_sub(1);
                }
                r
            }
        };
        self.unpin(r, model);
        self.leave(r, i);
        self.finish(i, None, Status::Timeout);
        self.try_start(r);
    }

    /// Request `i` leaves runner `r`.
    fn leave(&mut self, r: u32, i: u32) {
        let k = self.proxy_of(i);
        if let Some(px) = self.proxies.get_mut(k) {
            if let Some(c) = px.inflight.get_mut(r as usize) {
                *c = c.saturating_sub(1);
            }
            px.total_inflight = px.total_inflight.saturating_sub(1);
        }
        if let Some(c) = self.at_runner.get_mut(r as usize) {
            *c = c.saturating_sub(1);
        }
    }

    fn finish(&mut self, i: u32, hit: Option<bool>, status: Status) {
        let at = self.trace.reqs.get(i as usize).map(|q| q.at_us).unwrap_or(0);
        let latency = self.now.saturating_sub(at) + self.p.overhead_us;
        // The filter learns from every request that ends (its on_log).
        let routed = self.routed.get_mut(i as usize).and_then(Option::take);
        if let (Some(d), Some(r)) = (routed, self.records.get(i as usize).and_then(|rec| rec.runner)) {
            let answered = (status == Status::Ok).then_some(latency);
            let k = self.proxy_of(i);
            if let Some(px) = self.proxies.get_mut(k) {
                px.router.observe(r, &d, answered);
            }
            let shared = self.pinned_shared.get_mut(i as usize).map(std::mem::take);
            if let (Some(true), Some(hash)) = (shared, d.pin) {
                inflight::remove_pin(&mut self.shared_pins, self.p.runners, r, hash);
            }
        }
        self.set_state(i, ReqState::Done);
        if let Some(rec) = self.records.get_mut(i as usize) {
            rec.latency_us = latency;
            rec.hit = hit.unwrap_or(false);
            rec.status = status;
        }
    }

    /// Proxy `k` polls runner `r`: it learns its hints, and rebases its in-flight count for
    /// it on the runner's own (the filter's poller, `Poller::rebased_in_flight`; a poll is
    /// answered at once here, so nothing moved while it was out).
    fn poll(&mut self, k: u32, r: u32) {
        self.learn(k as usize, r, true);
        let truth = self.at_runner.get(r as usize).copied().unwrap_or(0);
        if let Some(c) = self.proxies.get_mut(k as usize).and_then(|px| px.inflight.get_mut(r as usize)) {
            *c = truth;
        }
    }

    /// The runner's hints (queued, loading and resident models, most recently used first) reach
    /// proxy `k`'s view.
    /// `poll`: as the filter gets a poll (through a published table, which keeps our
    /// guesses it still lists); else as a response header (which confirms them).
    fn learn(&mut self, k: usize, r: u32, poll: bool) {
        if !self.policy.is_hint() {
            return;
        }
        let Some(run) = self.runners.get(r as usize) else { return };
        let mut e: Vec<(u64, u32)> = run.entries.iter().map(|e| (e.last_used, e.model)).collect();
        e.sort_unstable_by_key(|&(t, _)| Reverse(t));
        // As `runner-example` advertises them: models queued for a slot (the next to load
        // first, at most `capacity`), then the slots' models.
        let queued = run.queue.iter().take(self.p.capacity).map(|&(m, _, _)| m);
        let models = queued.chain(e.into_iter().map(|(_, m)| m));
        let hints: Vec<String> = models.filter_map(|m| self.names.get(m as usize).cloned()).collect();
        // A poll also brings the warm tier's models that are not resident, most recently
        // loaded first (a response header does not).
        let mut host: Vec<(u64, u32)> =
            run.host.iter().copied().filter(|&(_, m)| !run.entries.iter().any(|e| e.model == m)).collect();
        host.sort_unstable_by_key(|&(t, _)| Reverse(t));
        let warm: Vec<String> = if self.p.what_if_blind_to_warm {
            Vec::new()
        } else {
            host.into_iter().filter_map(|(_, m)| self.names.get(m as usize).cloned()).collect()
        };
        let list = HintList { hints, invalid: 0, truncated: 0 };
        let Some(px) = self.proxies.get_mut(k) else { return };
        if self.p.plain_rank {
            px.view.set_runner_hints(r, &list);
        } else if poll {
            px.router.refresh(|v| {
                v.set_runner_hints(r, &list);
                v.set_runner_warm(r, warm);
            });
        } else {
            px.router.learn(r, &list);
        }
    }
}

mod params;
mod policy;
mod runner;
#[cfg(test)]
mod tests;
