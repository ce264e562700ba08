//! The poll state machine run by the singleton poller service: one slot per runner,
//! `Idle -> InFlight(token) -> Idle`, driven by ticks and call responses. It merges poll
//! results and hints learned from response headers into the [`Table`] it publishes.

use crate::config::Config;
use crate::hint::{parse_hint_list, HintList};
use crate::report::{self, Defaults, Limits, Report};
use crate::table::delta::{Delta, RING};
use crate::table::{Table, TableRunner};
use rustc_hash::FxHashMap;
use std::fmt;

/// Why a poll did not produce a usable report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollFailure {
    /// Envoy could not send the call (e.g. unknown cluster).
    Dispatch,
    /// No answer within the timeout.
    Timeout,
    /// A non-200 status (Envoy synthesises 503/504 for dead or slow runners).
    Status(u16),
    /// A response without a usable `:status`.
    NoStatus,
    /// The body exceeds `max_hints_body_bytes`.
    BodyTooLarge(usize),
    /// The body could not be read from the host.
    BodyUnreadable,
    /// The body is not a valid `/hints` document.
    BadBody(String),
    /// The runner names itself differently from the address polled.
    IdentityMismatch(String),
}

impl fmt::Display for PollFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PollFailure::Dispatch => write!(f, "call could not be dispatched"),
            PollFailure::Timeout => write!(f, "timed out"),
            PollFailure::Status(s) => write!(f, "status {s}"),
            PollFailure::NoStatus => write!(f, "response without status"),
            PollFailure::BodyTooLarge(n) => write!(f, "body of {n} bytes exceeds max_hints_body_bytes"),
            PollFailure::BodyUnreadable => write!(f, "body unreadable"),
            PollFailure::BadBody(e) => write!(f, "bad /hints body: {e}"),
            PollFailure::IdentityMismatch(id) => write!(f, "runner calls itself {id:?}"),
        }
    }
}

/// What one poll result changed, for logs and stats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollEvent {
    /// The runner answered; `recovered` if it was unavailable before.
    Ok {
        /// It was unavailable before this answer.
        recovered: bool,
        /// Hints dropped for exceeding `max_hints_per_runner`.
        truncated: usize,
        /// Hints dropped as malformed.
        invalid: usize,
        /// Report fields that were out of bounds and clamped (count them).
        clamped: Vec<&'static str>,
        /// Worth a warning naming the runner: something was clamped, and this runner was not
        /// warned about that for [`WARN_EVERY_MS`].
        warn: bool,
    },
    /// The poll failed; `lost` if the runner was available before.
    Failed {
        /// Why.
        failure: PollFailure,
        /// It was available before this failure.
        lost: bool,
        /// Worth a warning in the log: the runner was just lost, or it keeps failing and was
        /// not warned about for [`WARN_EVERY_MS`] (a runner that never answers a usable
        /// `/hints` is reported, at a bounded rate, instead of staying silent).
        warn: bool,
    },
}

/// A header-only runner's capacity: the configured default, else the most hints it ever
/// listed, and at least 1. Every runner holds at least one model, and a capacity of 0
/// ("unknown") would rank it after every runner of known capacity, so header-only runners
/// that had listed nothing yet would never get a model while one that had listed some took
/// every miss and thrashed. An underestimate only makes it look full early; its header
/// corrects that upwards as soon as it lists more.
fn inferred_capacity(default: u32, most_hints: usize) -> u32 {
    if default > 0 {
        default
    } else {
        u32::try_from(most_hints).unwrap_or(u32::MAX).max(1)
    }
}

/// Least time between two warnings about the same runner's failing polls.
pub const WARN_EVERY_MS: u64 = 30_000;

/// What a runner is probed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Its `/hints` report (`poll_path`).
    Report,
    /// Its health route (`health_path`): a header-only runner (fal's apps) that answered 404
    /// on `poll_path`. A 2xx makes it available; its hints come from the runner hints header
    /// of this probe's and every other response; capacity and concurrency from the config's
    /// defaults, capacity else from the most hints it ever listed.
    Health,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    InFlight { token: u32, sent_ms: u64 },
}

#[derive(Debug, Clone)]
struct Slot {
    runner: TableRunner,
    phase: Phase,
    next_due_ms: u64,
    /// `in_flight` from the runner's last report, if it reports one.
    reported_in_flight: Option<u32>,
    /// This Envoy's shared in-flight count for the runner when its last poll was sent.
    in_flight_at_send: u32,
    /// When a failing poll of this runner was last logged at warn (`None`: never).
    last_warn_ms: Option<u64>,
    /// When a clamped report of this runner was last logged at warn.
    last_clamp_warn_ms: Option<u64>,
    probe: Probe,
    /// The most hints it ever listed (a header-only runner's capacity, when unknown).
    most_hints: usize,
    /// A runner occupies the slot; a vacant one (a runner that left the cluster) waits for
    /// the next runner that joins (see [`membership`]).
    member: bool,
    /// Envoy would send it traffic (its health checks and outlier detection; always true
    /// for configured runners).
    envoy_healthy: bool,
    /// The last report applied, while the runner's lists in the table are still exactly
    /// that report's (no failure and no response-header update since): a poll that brings
    /// back the same body (an idle runner, most polls) is applied from it without a parse.
    last: Option<LastReport>,
}

/// A report's body, by hash and length, and what [`Poller::apply`] needs of it besides the
/// lists the table already holds.
#[derive(Debug, Clone)]
struct LastReport {
    hash: u64,
    len: usize,
    recap: Recap,
}

/// A report without its lists.
#[derive(Debug, Clone)]
struct Recap {
    capacity: u32,
    max_concurrency: u32,
    in_flight: Option<u32>,
    draining: bool,
    queue_token: Option<u64>,
    clamped: Vec<&'static str>,
    truncated: usize,
    invalid: usize,
}

/// The identity of a body for [`LastReport`]: FxHash, 8 bytes a step. Not collision-proof,
/// and it need not be: only the runner writes its body, so a collision can only make its own
/// report look unchanged, which it could as well have sent.
fn body_hash(body: &[u8]) -> u64 {
    use std::hash::Hasher as _;
    let mut h = rustc_hash::FxHasher::default();
    h.write(body);
    h.finish()
}

impl Slot {
    /// A slot for the runner at `addr`: unavailable until it answers a poll, due at once.
    fn occupied(addr: String, envoy_healthy: bool, now_ms: u64) -> Slot {
        Slot {
            runner: TableRunner::unpolled(addr),
            phase: Phase::Idle,
            next_due_ms: now_ms,
            reported_in_flight: None,
            in_flight_at_send: 0,
            last_warn_ms: None,
            last_clamp_warn_ms: None,
            probe: Probe::Report,
            most_hints: 0,
            member: true,
            envoy_healthy,
            last: None,
        }
    }
}

/// All runners' poll state.
#[derive(Debug, Clone)]
pub struct Poller {
    slots: Vec<Slot>,
    interval_ms: u64,
    timeout_ms: u64,
    max_hint_bytes: usize,
    max_hints: usize,
    max_body: usize,
    defaults: Defaults,
    poll_path: String,
    health_path: String,
    generation: u64,
    /// Generation of the last whole table published.
    full_generation: u64,
    changes: Changes,
    /// Address -> slot of every occupied slot (a response header names its runner).
    by_addr: FxHashMap<String, usize>,
}

/// Runners changed since the last publication.
#[derive(Debug, Clone, Default)]
struct Changes {
    /// Per slot: listed in `list`.
    touched: Vec<bool>,
    /// Changed slots, each once.
    list: Vec<u32>,
    /// The runner list itself changed (or nothing was published yet): publish it whole.
    all: bool,
}

impl Changes {
    fn touch(&mut self, idx: usize) {
        if self.touched.len() <= idx {
            self.touched.resize(idx + 1, false);
        }
        if let Some(t) = self.touched.get_mut(idx) {
            if !*t {
                *t = true;
                self.list.push(idx as u32);
            }
        }
    }

    fn any(&self) -> bool {
        self.all || !self.list.is_empty()
    }

    /// Whether the whole list changed, and the changed slots; forgets them.
    fn take(&mut self) -> (bool, Vec<u32>) {
        for &i in &self.list {
            if let Some(t) = self.touched.get_mut(i as usize) {
                *t = false;
            }
        }
        (std::mem::take(&mut self.all), std::mem::take(&mut self.list))
    }
}

/// What the poller publishes for one generation ([`Poller::take_update`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The whole table.
    Full(Table),
    /// Only the runners that changed (`crate::table::delta`).
    Delta(Delta),
}

impl Poller {
    /// A poller for the configured runners; all start unavailable, due at once.
    pub fn new(cfg: &Config) -> Poller {
        Poller {
            slots: cfg.runners.iter().map(|a| Slot::occupied(a.clone(), true, 0)).collect(),
            interval_ms: cfg.poll_interval_ms,
            timeout_ms: cfg.poll_timeout_ms,
            max_hint_bytes: cfg.max_hint_bytes,
            max_hints: cfg.max_hints_per_runner,
            max_body: cfg.max_hints_body_bytes,
            defaults: Defaults {
                capacity: cfg.default_capacity,
                max_concurrency: cfg.default_max_concurrency,
            },
            poll_path: cfg.poll_path.clone(),
            health_path: cfg.health_path.clone(),
            generation: 0,
            full_generation: 0,
            changes: Changes { all: true, ..Changes::default() },
            by_addr: cfg.runners.iter().enumerate().map(|(i, a)| (a.clone(), i)).collect(),
        }
    }

    /// Continues numbering after `generation` (a restarted poller must not reuse the
    /// generation of a table workers already hold).
    pub fn continue_from(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// Number of runners.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no runner is configured.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Address of runner `idx`.
    pub fn addr(&self, idx: usize) -> Option<&str> {
        self.slots.get(idx).map(|s| s.runner.addr.as_str())
    }

    /// The path runner `idx` is probed on now ([`Probe`]).
    pub fn probe_path(&self, idx: usize) -> &str {
        match self.slots.get(idx).map(|s| s.probe) {
            Some(Probe::Health) => &self.health_path,
            _ => &self.poll_path,
        }
    }

    /// How runner `idx` is probed.
    pub fn probe(&self, idx: usize) -> Option<Probe> {
        self.slots.get(idx).map(|s| s.probe)
    }

    /// Number of runners currently available.
    pub fn available(&self) -> usize {
        self.slots.iter().filter(|s| s.runner.available).count()
    }

    /// Largest body a poll may return.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Runners whose next poll is due at `now_ms` and that have no poll in flight.
    pub fn due(&self, now_ms: u64) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.member && s.phase == Phase::Idle && s.next_due_ms <= now_ms)
            .map(|(i, _)| i)
            .collect()
    }

    /// Records that the poll of `idx` was sent as call `token`, when this Envoy's shared
    /// in-flight count for it was `in_flight` (see [`Poller::rebased_in_flight`]).
    pub fn on_sent(&mut self, idx: usize, token: u32, now_ms: u64, in_flight: u32) {
        if let Some(s) = self.slots.get_mut(idx) {
            s.phase = Phase::InFlight { token, sent_ms: now_ms };
            s.in_flight_at_send = in_flight;
        }
    }

    /// The runner whose poll is call `token`.
    pub fn find_token(&self, token: u32) -> Option<usize> {
        self.slots.iter().position(|s| matches!(s.phase, Phase::InFlight { token: t, .. } if t == token))
    }

    /// Polls sent longer ago than twice the timeout get failed (a safety net: Envoy normally
    /// answers a timed-out call itself). Returns the events.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(usize, PollEvent)> {
        let limit = self.timeout_ms.saturating_mul(2);
        let stale: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.phase, Phase::InFlight { sent_ms, .. } if now_ms.saturating_sub(sent_ms) > limit))
            .map(|(i, _)| i)
            .collect();
        stale.into_iter().map(|i| (i, self.on_failure(i, now_ms, PollFailure::Timeout))).collect()
    }

    fn finish(&mut self, idx: usize, now_ms: u64) {
        let interval = self.interval_ms;
        if let Some(s) = self.slots.get_mut(idx) {
            let sent = match s.phase {
                Phase::InFlight { sent_ms, .. } => sent_ms,
                Phase::Idle => now_ms,
            };
            s.phase = Phase::Idle;
            // Keep the cadence of sends, but never schedule in the past.
            s.next_due_ms = sent.saturating_add(interval).max(now_ms.saturating_add(1));
        }
    }

    /// Applies a failed poll: the runner is left out until it answers again.
    pub fn on_failure(&mut self, idx: usize, now_ms: u64, failure: PollFailure) -> PollEvent {
        self.finish(idx, now_ms);
        let (mut lost, mut warn) = (false, false);
        if let Some(s) = self.slots.get_mut(idx) {
            s.last = None;
            lost = s.runner.available;
            if lost || !s.runner.unreachable {
                s.runner.available = false;
                s.runner.unreachable = true;
                self.changes.touch(idx);
            }
            warn = lost || s.last_warn_ms.map_or(true, |t| now_ms.saturating_sub(t) >= WARN_EVERY_MS);
            if warn {
                s.last_warn_ms = Some(now_ms);
            }
        }
        PollEvent::Failed { failure, lost, warn }
    }

    /// Applies a poll response (`status`, the runner hints header if it had one, and the
    /// body if it was read).
    pub fn on_response(
        &mut self,
        idx: usize,
        now_ms: u64,
        status: Option<u16>,
        header_hints: Option<&[u8]>,
        body: Result<&[u8], PollFailure>,
    ) -> PollEvent {
        let probe = self.probe(idx);
        if probe == Some(Probe::Health) {
            return self.on_health(idx, now_ms, status, header_hints);
        }
        if status == Some(404) && !self.health_path.is_empty() {
            // No `/hints` here: a header-only runner. Probe its health route from now on,
            // at once.
            let ev = self.on_failure(idx, now_ms, PollFailure::Status(404));
            if let Some(s) = self.slots.get_mut(idx) {
                s.probe = Probe::Health;
                s.next_due_ms = now_ms;
            }
            return ev;
        }
        // A 200's body, by hash and length: the same as the last report applied needs no parse.
        let key = match (status, &body) {
            (Some(200), Ok(b)) => Some((body_hash(b), b.len())),
            _ => None,
        };
        let last = self.slots.get(idx).and_then(|s| s.last.as_ref());
        if let Some(recap) = last.filter(|l| Some((l.hash, l.len)) == key).map(|l| l.recap.clone()) {
            return self.apply(idx, now_ms, recap, None);
        }
        match self.parse(idx, status, body) {
            Err(f) => self.on_failure(idx, now_ms, f),
            Ok(report) => {
                let recap = Recap {
                    capacity: report.capacity,
                    max_concurrency: report.max_concurrency,
                    in_flight: report.in_flight,
                    draining: report.draining,
                    queue_token: report.queue_token,
                    clamped: report.clamped,
                    truncated: report.hints.truncated,
                    invalid: report.hints.invalid,
                };
                let ev =
                    self.apply(idx, now_ms, recap.clone(), Some((report.hints.hints, report.warm.hints)));
                if let (Some(s), Some((hash, len))) = (self.slots.get_mut(idx), key) {
                    s.last = Some(LastReport { hash, len, recap });
                }
                ev
            }
        }
    }

    /// Applies a report that answered runner `idx`'s poll: `lists` are its hints and warm
    /// models, `None` when the table already holds them (the body was the last one's).
    fn apply(
        &mut self,
        idx: usize,
        now_ms: u64,
        recap: Recap,
        lists: Option<(Vec<String>, Vec<String>)>,
    ) -> PollEvent {
        self.finish(idx, now_ms);
        // A token another runner already reports would steer that runner's job calls
        // here: the later claimant gets none (and no queue submissions).
        let queue_token = recap
            .queue_token
            .filter(|&t| !self.slots.iter().enumerate().any(|(j, o)| j != idx && o.runner.queue_token == t))
            .unwrap_or(0);
        let mut clamped = recap.clamped;
        if recap.queue_token.is_some() && queue_token == 0 {
            clamped.push("queue_token (another runner's)");
        }
        let Some(s) = self.slots.get_mut(idx) else {
            return PollEvent::Failed { failure: PollFailure::Dispatch, lost: false, warn: false };
        };
        s.reported_in_flight = recap.in_flight;
        s.last_warn_ms = None;
        let warn = !clamped.is_empty()
            && s.last_clamp_warn_ms.map_or(true, |t| now_ms.saturating_sub(t) >= WARN_EVERY_MS);
        if warn {
            s.last_clamp_warn_ms = Some(now_ms);
        }
        let available = !recap.draining && s.envoy_healthy;
        let recovered = !s.runner.available && available;
        let changed = s.runner.available != available
            || s.runner.capacity != recap.capacity
            || s.runner.max_concurrency != recap.max_concurrency
            || s.runner.queue_token != queue_token
            || s.runner.unreachable;
        s.runner.available = available;
        s.runner.capacity = recap.capacity;
        s.runner.max_concurrency = recap.max_concurrency;
        s.runner.queue_token = queue_token;
        s.runner.unreachable = false;
        let mut dirty = changed;
        if let Some((hints, warm)) = lists {
            if s.runner.hints != hints {
                s.runner.hints = hints;
                dirty = true;
            }
            if s.runner.warm != warm {
                s.runner.warm = warm;
                dirty = true;
            }
        }
        if dirty {
            self.changes.touch(idx);
        }
        PollEvent::Ok { recovered, truncated: recap.truncated, invalid: recap.invalid, clamped, warn }
    }

    fn on_health(
        &mut self,
        idx: usize,
        now_ms: u64,
        status: Option<u16>,
        header: Option<&[u8]>,
    ) -> PollEvent {
        match status {
            Some(200..=299) => {}
            Some(s) => return self.on_failure(idx, now_ms, PollFailure::Status(s)),
            None => return self.on_failure(idx, now_ms, PollFailure::NoStatus),
        }
        self.finish(idx, now_ms);
        let list = header.map(|h| parse_hint_list(h, self.max_hint_bytes, self.max_hints));
        let defaults = self.defaults;
        let Some(s) = self.slots.get_mut(idx) else {
            return PollEvent::Failed { failure: PollFailure::Dispatch, lost: false, warn: false };
        };
        s.reported_in_flight = None;
        s.last_warn_ms = None;
        let recovered = !s.runner.available && s.envoy_healthy;
        let (truncated, invalid) = list.as_ref().map_or((0, 0), |l| (l.truncated, l.invalid));
        let mut next = s.runner.clone();
        next.available = s.envoy_healthy;
        next.unreachable = false;
        next.queue_token = 0;
        next.warm = Vec::new(); // a header reports no warm tier
        if let Some(l) = list {
            next.hints = l.hints;
        }
        s.most_hints = s.most_hints.max(next.hints.len());
        next.capacity = inferred_capacity(defaults.capacity, s.most_hints);
        next.max_concurrency = defaults.max_concurrency.max(1);
        if next != s.runner {
            s.runner = next;
            self.changes.touch(idx);
        }
        PollEvent::Ok { recovered, truncated, invalid, clamped: Vec::new(), warn: false }
    }

    fn parse(
        &self,
        idx: usize,
        status: Option<u16>,
        body: Result<&[u8], PollFailure>,
    ) -> Result<Report, PollFailure> {
        match status {
            Some(200) => {}
            Some(s) => return Err(PollFailure::Status(s)),
            None => return Err(PollFailure::NoStatus),
        }
        let body = body?;
        if body.len() > self.max_body {
            return Err(PollFailure::BodyTooLarge(body.len()));
        }
        let limits = Limits { max_hint_bytes: self.max_hint_bytes, max_hints: self.max_hints };
        let report = report::parse(body, limits, self.defaults).map_err(PollFailure::BadBody)?;
        // The identity, when given, must be the address polled, in any spelling.
        if let Some(id) = &report.runner {
            let addr = self.addr(idx).unwrap_or_default();
            if crate::addr::canonical(id).as_deref() != Some(addr) {
                return Err(PollFailure::IdentityMismatch(id.chars().take(64).collect()));
            }
        }
        Ok(report)
    }

    /// The in-flight count this Envoy should hold for runner `idx` after its poll answered,
    /// given its count `now` (or `None` to leave it: the runner does not report `in_flight`,
    /// or the count already agrees).
    ///
    /// The runner's own `in_flight` is the truth as of its answer: every request it has, from
    /// every Envoy and worker. The count is rebased on it, plus what this Envoy's count moved
    /// while the poll was out (requests started and ended since it was sent). So whatever
    /// drifted since the last poll is corrected in either direction, once per poll interval:
    /// increments a dead VM never undid, a request counted on its first candidate while a
    /// retry served it elsewhere, a request still uploading (the runner counts it once its
    /// body arrived), a lost compare-and-swap, other Envoys' requests. The error left is what
    /// happened between the poll's send and the runner writing its answer.
    pub fn rebased_in_flight(&self, idx: usize, now: u32) -> Option<u32> {
        let s = self.slots.get(idx)?;
        let reported = s.reported_in_flight?;
        let moved = i64::from(now) - i64::from(s.in_flight_at_send);
        let target = (i64::from(reported) + moved).clamp(0, i64::from(u32::MAX)) as u32;
        (target != now).then_some(target)
    }

    /// Whether runner `idx` reported (in its last answer) the in-flight count this Envoy had
    /// for it when that poll was sent, or reports none: then [`Poller::rebased_in_flight`] is
    /// `None` whatever the count is now (the rebase would keep it), so the caller need not
    /// read it. An idle runner's answer (0 and 0) always agrees.
    pub fn in_flight_agrees(&self, idx: usize) -> bool {
        self.slots.get(idx).map_or(true, |s| s.reported_in_flight.map_or(true, |r| r == s.in_flight_at_send))
    }

    /// Applies hints a worker saw in runner `addr`'s response header (newer than its last
    /// poll). Unknown runners are ignored. Returns the parsed list when it changed the table.
    pub fn on_header_hints(&mut self, addr: &str, raw: &[u8]) -> Option<HintList> {
        let list = parse_hint_list(raw, self.max_hint_bytes, self.max_hints);
        let pos = match self.by_addr.get(addr) {
            Some(&i) => i,
            None => *self.by_addr.get(&crate::addr::canonical(addr)?)?,
        };
        let defaults = self.defaults;
        let s = self.slots.get_mut(pos)?;
        if s.runner.hints == list.hints {
            return None;
        }
        s.runner.hints = list.hints.clone();
        s.last = None; // the table no longer holds the last report's list
        if s.probe == Probe::Health {
            s.most_hints = s.most_hints.max(list.hints.len());
            s.runner.capacity = inferred_capacity(defaults.capacity, s.most_hints);
        }
        self.changes.touch(pos);
        Some(list)
    }

    /// The whole table to publish, if anything changed since the last call.
    pub fn take_table(&mut self) -> Option<Table> {
        if !self.changes.any() {
            return None;
        }
        self.changes.take();
        Some(self.whole_table())
    }

    /// What to publish, if anything changed since the last call: only the runners that
    /// changed ([`Update::Delta`], work proportional to them), or the whole table when the
    /// runner list grew, when more than half of the runners changed at once, or when
    /// [`RING`] - 1 deltas followed the last whole table (so the ring always holds every
    /// delta since it; the table's cost, proportional to the fleet, is spread over them).
    pub fn take_update(&mut self) -> Option<Update> {
        if !self.changes.any() {
            return None;
        }
        let (all, list) = self.changes.take();
        let n = self.slots.len();
        let next = self.generation.wrapping_add(1);
        if all || list.len().saturating_mul(2) > n || next.wrapping_sub(self.full_generation) >= RING {
            return Some(Update::Full(self.whole_table()));
        }
        self.generation = next;
        let slots = &self.slots;
        let runners =
            list.iter().filter_map(|&i| slots.get(i as usize).map(|s| (i, s.runner.clone()))).collect();
        Some(Update::Delta(Delta { generation: next, runners }))
    }

    /// Makes the next [`Poller::take_update`] the whole table (the last publication could not
    /// be written: it must not be followed by deltas that assume it).
    pub fn publish_whole_next(&mut self) {
        self.changes.all = true;
    }

    /// Generation of the last whole table [`Poller::take_update`] or [`Poller::take_table`]
    /// returned.
    pub fn full_generation(&self) -> u64 {
        self.full_generation
    }

    fn whole_table(&mut self) -> Table {
        self.generation = self.generation.wrapping_add(1);
        self.full_generation = self.generation;
        Table { generation: self.generation, runners: self.slots.iter().map(|s| s.runner.clone()).collect() }
    }
}

mod membership;
pub use membership::Churn;

#[cfg(test)]
mod tests;
