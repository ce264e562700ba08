//! The filter role: per-request routing on every worker.

use crate::host::{self, Map, MetricKind};
use crate::{INFLIGHT_KEY, QUEUE_NAME};
use hint_router_core::config::Config;
use hint_router_core::hint::{classify, parse_hint_list, HintClass};
use hint_router_core::inflight::{self, guesses};
use hint_router_core::queue::{classify_path, JobOp, QueuePath};
use hint_router_core::rank::Outcome;
use hint_router_core::router::{Decision, Router};
use hint_router_core::table::{encode_header_update, encode_header_update_raw};
use hint_router_core::wire::{RUNNER_INFER_MS_HEADER, RUNNER_IN_FLIGHT_HEADER, RUNNER_LOAD_MS_HEADER};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::cell::RefCell;
use std::rc::Rc;

mod refresh;

/// Response header naming the decision (with `debug_headers`).
const DECISION_HEADER: &str = "x-hint-router-decision";
/// Request header naming the model the chosen runner should evict if it must make room for
/// the requested one ([`hint_router_core::router::Router::evicting`]); `runner-example`
/// follows it, other runners ignore it. Envoy strips any client-sent one before this filter.
const EVICT_HEADER: &str = "x-hint-router-evict";
/// Response header naming the runner that answered (with `debug_headers`).
const UPSTREAM_HEADER: &str = "x-hint-router-upstream";
/// Compare-and-swap attempts for one in-flight counter update (fresh reads of the value).
const CAS_ATTEMPTS: usize = 8;
/// Oldest another worker's guess may be for this worker to adopt it: by then the poller has
/// published it (at most a publication gap, 20 ms, after it heard of it), and an older
/// list could undo what this worker learned since.
const GUESS_MAX_AGE_US: u64 = 100_000;

/// The in-flight value as read for ranking, and its CAS token: the increment tries it first
/// instead of reading the value again.
type Snapshot = Option<(Vec<u8>, u32)>;

/// Size of this VM's linear memory in bytes (it only grows: a high-water mark).
fn vm_memory_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        core::arch::wasm32::memory_size(0) as u64 * 65536
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}

struct Metrics {
    requests: u32,
    outcome: [u32; 6],
    invalid_hint: u32,
    table_errors: u32,
    inflight_errors: u32,
    response_hints: u32,
    guesses_adopted: u32,
    table_reloads: u32,
    table_deltas: u32,
    table_reload_us: u32,
    vm_memory: u32,
    queue_submits: u32,
    queue_job_calls: u32,
    queue_bad_ids: u32,
    queue_unknown_ids: u32,
    queue_runner_lost: u32,
    queue_no_runner: u32,
    queue_inflight_corrected: u32,
    warm_misses: u32,
}

fn outcome_slot(o: Outcome) -> usize {
    match o {
        Outcome::Hit => 0,
        Outcome::Miss => 1,
        Outcome::BusyFallback => 2,
        Outcome::Saturated => 3,
        Outcome::NoHint => 4,
        Outcome::NoCandidates => 5,
    }
}

impl Metrics {
    fn define() -> Metrics {
        let c = |n: &str| host::define_metric(MetricKind::Counter, n).unwrap_or(u32::MAX);
        let o = |x: Outcome| c(&format!("hint_router.{}", x.as_str()));
        Metrics {
            requests: c("hint_router.requests"),
            outcome: [
                o(Outcome::Hit),
                o(Outcome::Miss),
                o(Outcome::BusyFallback),
                o(Outcome::Saturated),
                o(Outcome::NoHint),
                o(Outcome::NoCandidates),
            ],
            invalid_hint: c("hint_router.invalid_hint"),
            table_errors: c("hint_router.table_errors"),
            inflight_errors: c("hint_router.inflight_errors"),
            response_hints: c("hint_router.response_hints_learned"),
            guesses_adopted: c("hint_router.guesses_adopted"),
            table_reloads: c("hint_router.table_reloads"),
            table_deltas: c("hint_router.table_deltas"),
            table_reload_us: c("hint_router.table_reload_us"),
            vm_memory: host::define_metric(MetricKind::Gauge, "hint_router.vm_memory_bytes")
                .unwrap_or(u32::MAX),
            queue_submits: c("hint_router.queue.submits"),
            queue_job_calls: c("hint_router.queue.job_calls"),
            queue_bad_ids: c("hint_router.queue.malformed_ids"),
            queue_unknown_ids: c("hint_router.queue.unknown_ids"),
            queue_runner_lost: c("hint_router.queue.runner_unreachable"),
            queue_no_runner: c("hint_router.queue.no_queue_runner"),
            queue_inflight_corrected: c("hint_router.queue.inflight_corrected"),
            warm_misses: c("hint_router.warm_miss"),
        }
    }

    fn outcome(&self, o: Outcome) -> u32 {
        self.outcome.get(outcome_slot(o)).copied().unwrap_or(u32::MAX)
    }
}

/// Worker-local state shared by the root and its streams.
struct State {
    cfg: Config,
    vm_id: String,
    /// This filter fronts fal's queue (root id [`crate::QUEUE_ROOT_ID`], docs/queue.md).
    queue_mode: bool,
    /// The worker's view of the fleet, inside the routing state.
    router: Router,
    /// Generation of the table the view matches, to skip re-reading an unchanged table.
    seen_generation: Option<u64>,
    queue: Option<u32>,
    spin: u32,
    loads: Vec<u32>,
    /// The number of the newest guess in the in-flight value this worker has seen.
    seen_guess: u32,
    candidates: Vec<u32>,
    metrics: Metrics,
}

/// One update of the in-flight value: counters moved, a pin added or released, a guess
/// shared.
struct Edit<'a> {
    in_flight: i32,
    loading: i32,
    pin: PinEdit,
    /// The hint a miss listed on the runner, the runner's list after it, and when (host
    /// clock, microseconds).
    guess: Option<(&'a str, &'a [u8], u64)>,
}

/// What an [`Edit`] that was written did.
struct Written {
    /// The pin edit took (an add fails when the value holds as many pins as it may).
    pinned: bool,
    /// The shared guess's number.
    guess: Option<u32>,
}

/// What a counter update does to the shared pins ([`hint_router_core::inflight`]).
#[derive(Clone, Copy)]
enum PinEdit {
    None,
    /// Count a request using the model with this hash on the runner.
    Add(u64),
    /// Release one such request.
    Remove(u64),
}

impl State {
    /// Reads the in-flight counters into `loads`, and the pins of every worker's requests
    /// and the other workers' new guesses into the router; returns the value and its CAS
    /// token when the key exists (a CAS token of 0 would write unconditionally, so none is
    /// kept then).
    fn read_loads(&mut self, now_us: u64) -> Snapshot {
        let runners = self.router.view().runners().len();
        let (bytes, cas) = match host::get_shared(INFLIGHT_KEY) {
            Ok((Some(bytes), cas)) => (bytes, cas),
            Ok((None, _)) | Err(_) => (Vec::new(), 0),
        };
        inflight::decode(&bytes, 2 * runners, &mut self.loads);
        self.router.sync_pins(inflight::pin_bytes(&bytes));
        let newest = guesses::newest_seq(&bytes);
        if newest != self.seen_guess {
            let (max_bytes, cap) = (self.cfg.max_hint_bytes, self.cfg.max_hints_per_runner);
            for g in guesses::iter(&bytes, runners) {
                // Numbers wrap: "after" is within half the range ahead.
                let new = (g.seq.wrapping_sub(self.seen_guess) as i32) > 0;
                if !new || now_us.saturating_sub(g.at_us) > GUESS_MAX_AGE_US {
                    continue;
                }
                let Ok(hint) = std::str::from_utf8(g.hint) else { continue };
                let list = parse_hint_list(g.list, max_bytes, cap);
                if self.router.adopt_guess(g.runner, hint, &list, g.at_us) {
                    host::increment_metric(self.metrics.guesses_adopted, 1);
                }
            }
            self.seen_guess = newest;
        }
        (cas != 0).then_some((bytes, cas))
    }

    /// Moves runner `idx`'s shared in-flight counter by `delta`, and its `loading` counter
    /// too when `load` (one compare-and-swap). The first attempt may use `snapshot`, the value
    /// read earlier in this request; a CAS mismatch (someone wrote since) retries with fresh
    /// reads, `CAS_ATTEMPTS` of them. `pin` adds or releases a pin on the runner in the same
    /// write. Returns `None` when it gave up (a request whose increment gave up must not
    /// decrement later: that would undo someone else's), else whether the pin edit took (an
    /// add fails when the value holds as many pins as it may).
    fn adjust_inflight(
        &self,
        idx: u32,
        load: bool,
        delta: i32,
        pin: PinEdit,
        snapshot: Snapshot,
    ) -> Option<bool> {
        let edit = Edit { in_flight: delta, loading: if load { delta } else { 0 }, pin, guess: None };
        self.update_live(idx, &edit, snapshot).map(|w| w.pinned)
    }

    /// Moves only runner `idx`'s `loading` counter (and releases `pin` there).
    fn adjust_loading(&self, idx: u32, delta: i32, pin: PinEdit) -> Option<bool> {
        self.update_live(idx, &Edit { in_flight: 0, loading: delta, pin, guess: None }, None)
            .map(|w| w.pinned)
    }

    /// Applies `edit` to runner `idx`'s part of the in-flight value, as
    /// [`State::adjust_inflight`] says.
    fn update_live(&self, idx: u32, edit: &Edit<'_>, mut snapshot: Snapshot) -> Option<Written> {
        let &Edit { in_flight, loading, pin, guess } = edit;
        let runners = self.router.view().runners().len();
        let attempts = CAS_ATTEMPTS + usize::from(snapshot.is_some());
        for _ in 0..attempts {
            let (mut bytes, cas) = match snapshot.take() {
                Some(s) => s,
                None => match host::get_shared(INFLIGHT_KEY) {
                    Ok((bytes, cas)) => (bytes.unwrap_or_default(), cas),
                    Err(_) => break,
                },
            };
            inflight::adjust_in_place(&mut bytes, runners, idx, in_flight);
            if loading != 0 {
                inflight::adjust_in_place(&mut bytes, runners, runners as u32 + idx, loading);
            }
            let pinned = match pin {
                PinEdit::None => true,
                PinEdit::Add(hash) => inflight::add_pin(&mut bytes, runners, idx, hash),
                PinEdit::Remove(hash) => {
                    inflight::remove_pin(&mut bytes, runners, idx, hash);
                    true
                }
            };
            let guess = guess.and_then(|(hint, list, at)| {
                guesses::add(&mut bytes, runners, idx, at, hint.as_bytes(), list)
            });
            match host::set_shared(INFLIGHT_KEY, &bytes, cas) {
                Ok(()) => return Some(Written { pinned, guess }),
                Err(host::HostError::CasMismatch) => continue,
                Err(_) => break,
            }
        }
        host::increment_metric(self.metrics.inflight_errors, 1);
        None
    }

    /// Sends runner `idx`'s hint list, as this worker's view has it, to the poller.
    fn forward_hints(&mut self, idx: u32) {
        let Some(r) = self.router.view().runner(idx) else { return };
        let msg = encode_header_update(&r.addr, &r.hints);
        if let Some(q) = self.queue() {
            if let Err(e) = host::enqueue(q, &msg) {
                log::debug!("hint-router: cannot enqueue hints: {e}");
            }
        }
    }

    fn queue(&mut self) -> Option<u32> {
        if self.queue.is_none() {
            self.queue = host::resolve_queue(&self.vm_id, QUEUE_NAME).ok();
        }
        self.queue
    }
}

/// The filter's root state on one worker.
pub struct FilterRoot {
    state: Rc<RefCell<State>>,
}

impl FilterRoot {
    /// Creates the worker state for a validated config.
    pub fn new(cfg: Config, vm_id: String, queue_mode: bool) -> FilterRoot {
        let max = cfg.max_candidates;
        let mode = cfg.when_holders_busy;
        let state = State {
            cfg,
            vm_id,
            queue_mode,
            router: Router::with_mode(Default::default(), mode),
            seen_generation: None,
            queue: None,
            spin: 0,
            loads: Vec::new(),
            seen_guess: 0,
            candidates: Vec::with_capacity(max),
            metrics: Metrics::define(),
        };
        FilterRoot { state: Rc::new(RefCell::new(state)) }
    }

    /// A stream context for one request.
    pub fn new_stream(&self) -> Stream {
        Stream {
            state: Rc::clone(&self.state),
            picked: None,
            shared_pin: None,
            load: false,
            outcome: None,
            decision: None,
            started_us: 0,
            answered: false,
            submit: false,
            accepted: false,
            queue_runner: None,
            job_result: None,
        }
    }
}

/// Per-request context.
pub struct Stream {
    state: Rc<RefCell<State>>,
    /// Runner whose in-flight counter this request incremented.
    picked: Option<u32>,
    /// The model this request pinned on `picked` in the shared in-flight value.
    shared_pin: Option<u64>,
    /// The request was routed to wait for a model load (counted in `loading` too).
    load: bool,
    outcome: Option<Outcome>,
    /// The first candidate and the routing decision, for `Router::observe` when the request
    /// ends (also when its in-flight increment gave up: the router's pin must be released).
    decision: Option<(u32, Decision)>,
    /// When it was routed (host clock, microseconds).
    started_us: u64,
    /// Response headers arrived.
    answered: bool,
    /// A fal queue submission (queue mode).
    submit: bool,
    /// A submission the runner accepted (2xx): the job stays in the runner's queue after
    /// this request ends, so its in-flight count stays until the runner's own count
    /// replaces it (the next poll, or `x-runner-in-flight` on a queue response).
    accepted: bool,
    /// Queue mode: the runner a submission or job call went to, and its shared in-flight
    /// count (before this request's own increment) when it was routed.
    queue_runner: Option<(u32, u32)>,
    /// Queue mode: a job's result was asked of this runner; its answer carries the runner's
    /// own load and inference times, the only ones a queued job teaches.
    job_result: Option<u32>,
}

/// What queue mode made of a request before routing.
enum QueueStep {
    /// A submission: route it by its hint.
    Submit,
    /// Answered by the filter (a malformed, unknown or lost id).
    Answered,
    /// A job call sent to the runner holding the id.
    Steered(u32, JobOp),
}

/// A JSON local reply for fal's queue client: `{"detail": ...}`.
fn queue_reply(status: u32, detail: &str) {
    let body = format!("{{\"detail\":\"{detail}\"}}\n");
    if let Err(e) =
        host::send_local_response(status, &[("content-type", "application/json")], body.as_bytes())
    {
        log::warn!("hint-router: cannot answer a queue request locally: {e}");
    }
}

impl Stream {
    /// Queue mode: lowers runner `idx`'s in-flight count to what the runner says it has
    /// (`x-runner-in-flight`) plus what this Envoy routed there since `before` was read. An
    /// accepted job keeps its count until the runner's own count replaces it; without this,
    /// a finished job looked busy until the next poll and a hot model's next job loaded it
    /// elsewhere. Only ever lowers a count: the runner's figure is a floor, not a ceiling, of
    /// the truth (other Envoys' requests are in it too).
    fn correct_from_runner(&self, idx: u32, before: u32) {
        let Ok(st) = self.state.try_borrow() else { return };
        let raw = host::get_header(Map::Response, RUNNER_IN_FLIGHT_HEADER).ok().flatten();
        let Some(reported) = raw.and_then(|r| std::str::from_utf8(&r).ok()?.trim().parse::<u32>().ok())
        else {
            return;
        };
        let own = u32::from(self.submit); // the job this submission added is in `reported`
        if st.lower_inflight(idx, reported, before.saturating_add(own)) {
            host::increment_metric(st.metrics.queue_inflight_corrected, 1);
        }
    }
}

impl Stream {
    /// Queue mode: a job's answer (200) with `x-runner-load-ms` / `x-runner-infer-ms` teaches
    /// the router that runner's times, so `"fastest"` works for queued jobs too (a submission
    /// is answered at once: its latency says nothing).
    fn learn_reported_times(&self, idx: u32) {
        let ok = host::get_header(Map::Response, ":status").ok().flatten();
        if ok.as_deref() != Some(b"200") {
            return;
        }
        let ms = |name: &str| {
            let raw = host::get_header(Map::Response, name).ok().flatten()?;
            let v = std::str::from_utf8(&raw).ok()?.trim().parse::<u64>().ok()?;
            // A runner's claim, bounded: an hour at most.
            Some(v.min(3_600_000).saturating_mul(1000))
        };
        let (load, infer) = (ms(RUNNER_LOAD_MS_HEADER), ms(RUNNER_INFER_MS_HEADER));
        if load.is_none() && infer.is_none() {
            return;
        }
        if let Ok(mut st) = self.state.try_borrow_mut() {
            st.router.learn_reported(idx, load, infer);
        }
    }
}

impl State {
    /// Sets runner `idx`'s in-flight count to `reported` plus the increments made since it
    /// was `baseline`, when that is lower than the count now (and caps its `loading` count
    /// to it). Returns whether it lowered it.
    fn lower_inflight(&self, idx: u32, reported: u32, baseline: u32) -> bool {
        let runners = self.router.view().runners().len();
        crate::update_inflight(runners, CAS_ATTEMPTS, |counts| {
            let now = counts.get(idx as usize).copied().unwrap_or(0);
            let target = reported.saturating_add(now.saturating_sub(baseline));
            if target >= now {
                return false;
            }
            if let Some(c) = counts.get_mut(idx as usize) {
                *c = target;
            }
            if let Some(c) = counts.get_mut(runners + idx as usize) {
                *c = (*c).min(target);
            }
            true
        })
    }

    /// Queue mode, before routing: answers or steers a job call. Submissions are routed by
    /// hint afterwards.
    fn queue_job_call(&mut self) -> QueueStep {
        let path = host::get_header(Map::Request, ":path").ok().flatten().unwrap_or_default();
        let (token, op) = match classify_path(&path) {
            QueuePath::Submit => {
                host::increment_metric(self.metrics.queue_submits, 1);
                return QueueStep::Submit;
            }
            QueuePath::MalformedId => {
                host::increment_metric(self.metrics.queue_bad_ids, 1);
                queue_reply(400, "Malformed request id");
                return QueueStep::Answered;
            }
            QueuePath::Job { token, op } => (token, op),
        };
        host::increment_metric(self.metrics.queue_job_calls, 1);
        let view = self.router.view();
        let Some(idx) = view.runner_by_queue_token(token) else {
            host::increment_metric(self.metrics.queue_unknown_ids, 1);
            queue_reply(404, "Request not found");
            return QueueStep::Answered;
        };
        if view.runner(idx).is_some_and(|r| r.unreachable) {
            // Dead or frozen: say so now instead of letting the client poll a lost job.
            host::increment_metric(self.metrics.queue_runner_lost, 1);
            queue_reply(503, "The runner holding this request is not answering; the request may be lost");
            return QueueStep::Answered;
        }
        let list = view.format_candidates(&[idx]);
        log::trace!("hint-router: queue {op:?} for runner {idx}");
        if let Err(e) = host::set_header(Map::Request, &self.cfg.pick_header, list.as_bytes()) {
            log::warn!("hint-router: cannot set {}: {e}", self.cfg.pick_header);
            queue_reply(503, "Cannot route this request");
            return QueueStep::Answered;
        }
        QueueStep::Steered(idx, op)
    }
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let Ok(mut st) = self.state.try_borrow_mut() else { return Action::Continue };
        let st = &mut *st;
        host::increment_metric(st.metrics.requests, 1);
        st.refresh();
        if st.queue_mode {
            match st.queue_job_call() {
                QueueStep::Submit => self.submit = true,
                QueueStep::Answered => return Action::Pause,
                QueueStep::Steered(idx, op) => {
                    if op == JobOp::Result {
                        self.job_result = Some(idx);
                    }
                    st.read_loads(host::now_ns() / 1000);
                    self.queue_runner = Some((idx, st.loads.get(idx as usize).copied().unwrap_or(0)));
                    return Action::Continue;
                }
            }
        }
        let raw = host::get_header(Map::Request, &st.cfg.hint_header).ok().flatten();
        let hint = match classify(raw.as_deref(), st.cfg.max_hint_bytes) {
            HintClass::Valid(h) => Some(h),
            HintClass::Absent => None,
            HintClass::Invalid(why) => {
                log::debug!("hint-router: ignoring invalid hint ({why:?})");
                host::increment_metric(st.metrics.invalid_hint, 1);
                None
            }
        };
        if hint.is_some() && hint == st.cfg.failure_test_hint.as_deref() {
            log::error!("hint-router: failure_test_hint received: aborting this VM as configured");
            std::process::abort();
        }
        let now_us = host::now_ns() / 1000;
        let snapshot = st.read_loads(now_us);
        st.spin = st.spin.wrapping_add(1);
        let mut candidates = std::mem::take(&mut st.candidates);
        let n = st.router.view().runners().len();
        let (in_flight, _loading) = st.loads.split_at(n.min(st.loads.len()));
        let (max, max_hints) = (st.cfg.max_candidates, st.cfg.max_hints_per_runner);
        let decision = st.router.route(hint, in_flight, now_us, st.spin, max, max_hints, &mut candidates);
        if self.submit {
            // Only runners that report a queue token can take a job. Order is kept; in a
            // fleet of queue runners (the supported setup) nothing is dropped.
            let first = candidates.first().copied();
            let view = st.router.view();
            candidates.retain(|&i| view.runner(i).is_some_and(|r| r.queue_token != 0));
            if candidates.is_empty() {
                if let Some(first) = first {
                    st.router.observe(first, &decision, None); // releases any pin it took
                }
                host::increment_metric(st.metrics.queue_no_runner, 1);
                st.candidates = candidates;
                queue_reply(503, "No runner here serves the queue right now");
                return Action::Pause;
            }
        }
        let outcome = decision.outcome;
        host::increment_metric(st.metrics.outcome(outcome), 1);
        if decision.warm {
            host::increment_metric(st.metrics.warm_misses, 1);
        }
        self.outcome = Some(outcome);
        if let Some(&first) = candidates.first() {
            // Whatever happens next, the router hears when this request ends (it may have
            // pinned the model on `first`).
            self.decision = Some((first, decision));
            self.started_us = now_us;
            let list = st.router.view().format_candidates(&candidates);
            match host::set_header(Map::Request, &st.cfg.pick_header, list.as_bytes()) {
                Ok(()) => {
                    let before = in_flight.get(first as usize).copied().unwrap_or(0);
                    let pin = decision.pin.map_or(PinEdit::None, PinEdit::Add);
                    // A miss's guess goes to the other workers in the same write (and to the
                    // poller below, for the table).
                    let list = if decision.listed {
                        st.router.view().runner(first).map(|r| r.hints.join(","))
                    } else {
                        None
                    };
                    let guess = hint.zip(list.as_deref()).map(|(h, l)| (h, l.as_bytes(), now_us));
                    let edit = Edit { in_flight: 1, loading: i32::from(decision.load), pin, guess };
                    if let Some(w) = st.update_live(first, &edit, snapshot) {
                        self.picked = Some(first);
                        self.shared_pin = decision.pin.filter(|_| w.pinned);
                        // Our own guess needs no adopting (unless others came in between).
                        if w.guess == Some(st.seen_guess.wrapping_add(1)) {
                            st.seen_guess = st.seen_guess.wrapping_add(1);
                        }
                        self.load = decision.load;
                        if self.submit {
                            self.queue_runner = Some((first, before));
                        }
                    }
                    if let Some(victim) = st.router.evicting() {
                        if let Err(e) = host::set_header(Map::Request, EVICT_HEADER, victim.as_bytes()) {
                            log::debug!("hint-router: cannot set {EVICT_HEADER}: {e}");
                        }
                    }
                    if decision.listed {
                        // Tell the other workers at once, through the poller's table, so they
                        // send this model here too instead of loading it a second time.
                        st.forward_hints(first);
                    }
                }
                Err(e) => log::warn!("hint-router: cannot set {}: {e}", st.cfg.pick_header),
            }
        } else {
            // Defence in depth: Envoy strips the header natively before this filter.
            let _ = host::remove_header(Map::Request, &st.cfg.pick_header);
        }
        log::trace!("hint-router: hint={hint:?} outcome={} candidates={candidates:?}", outcome.as_str());
        st.candidates = candidates;
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.answered = true;
        if self.submit {
            let status = host::get_header(Map::Response, ":status").ok().flatten();
            self.accepted = status.is_some_and(|s| s.first() == Some(&b'2'));
        }
        if let Some((idx, before)) = self.queue_runner.take() {
            // A refused submission is decremented when it ends; nothing to correct.
            if !self.submit || self.accepted {
                self.correct_from_runner(idx, before);
            }
        }
        if let Some(idx) = self.job_result.take() {
            self.learn_reported_times(idx);
        }
        let Ok(mut st) = self.state.try_borrow_mut() else { return Action::Continue };
        let st = &mut *st;
        // A submission's answer lists the runner's hints from before its job asked for the
        // model: learning from it would drop the guess that the runner is loading it now.
        let learn = st.cfg.learn_from_responses && !self.submit;
        let debug = st.cfg.debug_headers;
        if !learn && !debug {
            return Action::Continue;
        }
        let raw = if learn {
            host::get_header(Map::Response, &st.cfg.runner_hints_header).ok().flatten()
        } else {
            None
        };
        if raw.is_none() && !debug {
            return Action::Continue; // nothing to learn: no need for the upstream's address
        }
        let upstream = host::get_property(&["upstream", "address"]).ok().flatten();
        let upstream = upstream.as_deref().and_then(|u| std::str::from_utf8(u).ok()).unwrap_or("");
        if !upstream.is_empty() {
            if let Some(raw) = raw {
                let (max_bytes, cap) = (st.cfg.max_hint_bytes, st.cfg.max_hints_per_runner);
                // The common case, the runner's list as the view has it: nothing to parse.
                let view = st.router.view();
                // Envoy names upstreams canonically, as the config's runners are stored; any
                // other spelling is normalised before giving up.
                let known = view
                    .index_of(upstream)
                    .or_else(|| hint_router_core::addr::canonical(upstream).and_then(|a| view.index_of(&a)));
                let same = |idx| st.router.view().runner_hints_equal(idx, &raw, max_bytes, cap);
                // The runner's list differs from the view, or equals what we only guessed:
                // either way the published table is behind; tell the poller.
                let news = match known {
                    Some(idx) if same(idx) => {
                        st.router.confirm(idx).then(|| encode_header_update_raw(upstream, &raw))
                    }
                    Some(idx) => {
                        let list = parse_hint_list(&raw, max_bytes, cap);
                        st.router.learn(idx, &list).then(|| encode_header_update(upstream, &list.hints))
                    }
                    None => None,
                };
                if let Some(msg) = news {
                    host::increment_metric(st.metrics.response_hints, 1);
                    if let Some(q) = st.queue() {
                        if let Err(e) = host::enqueue(q, &msg) {
                            log::debug!("hint-router: cannot enqueue response hints: {e}");
                        }
                    }
                }
            }
        }
        if debug {
            let outcome = self.outcome.map(Outcome::as_str).unwrap_or("none");
            let _ = host::set_header(Map::Response, DECISION_HEADER, outcome.as_bytes());
            let _ = host::set_header(Map::Response, UPSTREAM_HEADER, upstream.as_bytes());
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let (picked, decision) = (self.picked.take(), self.decision.take());
        if picked.is_none() && decision.is_none() {
            return;
        }
        let Ok(mut st) = self.state.try_borrow_mut() else { return };
        if let Some(idx) = picked {
            let pin = self.shared_pin.take().map_or(PinEdit::None, PinEdit::Remove);
            if self.accepted {
                // The job is still queued or running on the runner: only its wait for a
                // load (if any) is over as far as this request can tell. (Its pin goes: no
                // end of the job will be heard to release it.)
                if self.load || matches!(pin, PinEdit::Remove(_)) {
                    st.adjust_loading(idx, if self.load { -1 } else { 0 }, pin);
                }
            } else {
                st.adjust_inflight(idx, self.load, -1, pin, None);
            }
        }
        if let Some((idx, d)) = decision {
            let elapsed = (host::now_ns() / 1000).saturating_sub(self.started_us);
            // A submission's answer comes at once: its time says nothing about the runner.
            let timed = self.answered && !self.submit;
            st.router.observe(idx, &d, timed.then_some(elapsed));
        }
    }
}

/// The stream context used when the root is not a configured filter: does nothing.
pub struct PassThrough;

impl Context for PassThrough {}
impl HttpContext for PassThrough {}
