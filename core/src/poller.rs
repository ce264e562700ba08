//! The poll state machine run by the singleton poller service: one slot per runner,
//! `Idle -> InFlight(token) -> Idle`, driven by ticks and call responses. It merges poll
//! results and hints learned from response headers into the [`Table`] it publishes.

use crate::config::Config;
use crate::hint::{parse_hint_list, sanitize_hints, HintList};
use crate::table::{Table, TableRunner};
use crate::wire::HintsReport;
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
    },
    /// The poll failed; `lost` if the runner was available before.
    Failed {
        /// Why.
        failure: PollFailure,
        /// It was available before this failure.
        lost: bool,
    },
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
    /// `in_flight` from the runner's last report.
    reported_in_flight: u32,
    /// Consecutive polls on which this Envoy counted more in flight than the runner did,
    /// and the smallest such excess.
    excess_polls: u8,
    min_excess: u32,
}

/// Consecutive polls a counting excess must persist before it is treated as leaked.
pub const LEAK_POLLS: u8 = 3;

/// All runners' poll state.
#[derive(Debug, Clone)]
pub struct Poller {
    slots: Vec<Slot>,
    interval_ms: u64,
    timeout_ms: u64,
    max_hint_bytes: usize,
    max_hints: usize,
    max_body: usize,
    generation: u64,
    dirty: bool,
}

impl Poller {
    /// A poller for the configured runners; all start unavailable, due at once.
    pub fn new(cfg: &Config) -> Poller {
        Poller {
            slots: cfg
                .runners
                .iter()
                .map(|a| Slot {
                    runner: TableRunner {
                        addr: a.clone(),
                        available: false,
                        hints: Vec::new(),
                        capacity: 0,
                        max_concurrency: 1,
                    },
                    phase: Phase::Idle,
                    next_due_ms: 0,
                    reported_in_flight: 0,
                    excess_polls: 0,
                    min_excess: u32::MAX,
                })
                .collect(),
            interval_ms: cfg.poll_interval_ms,
            timeout_ms: cfg.poll_timeout_ms,
            max_hint_bytes: cfg.max_hint_bytes,
            max_hints: cfg.max_hints_per_runner,
            max_body: cfg.max_hints_body_bytes,
            generation: 0,
            dirty: true,
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
            .filter(|(_, s)| s.phase == Phase::Idle && s.next_due_ms <= now_ms)
            .map(|(i, _)| i)
            .collect()
    }

    /// Records that the poll of `idx` was sent as call `token`.
    pub fn on_sent(&mut self, idx: usize, token: u32, now_ms: u64) {
        if let Some(s) = self.slots.get_mut(idx) {
            s.phase = Phase::InFlight { token, sent_ms: now_ms };
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
        let mut lost = false;
        if let Some(s) = self.slots.get_mut(idx) {
            lost = s.runner.available;
            if lost {
                s.runner.available = false;
                self.dirty = true;
            }
        }
        PollEvent::Failed { failure, lost }
    }

    /// Applies a poll response (`status`, and the body if it was read).
    pub fn on_response(
        &mut self,
        idx: usize,
        now_ms: u64,
        status: Option<u16>,
        body: Result<&[u8], PollFailure>,
    ) -> PollEvent {
        match self.parse(idx, status, body) {
            Err(f) => self.on_failure(idx, now_ms, f),
            Ok((report, list)) => {
                self.finish(idx, now_ms);
                let Some(s) = self.slots.get_mut(idx) else {
                    return PollEvent::Failed { failure: PollFailure::Dispatch, lost: false };
                };
                s.reported_in_flight = report.in_flight;
                let recovered = !s.runner.available && !report.draining;
                let next = TableRunner {
                    addr: s.runner.addr.clone(),
                    available: !report.draining,
                    hints: list.hints,
                    capacity: report.capacity,
                    max_concurrency: report.max_concurrency.max(1),
                };
                if next != s.runner {
                    s.runner = next;
                    self.dirty = true;
                }
                PollEvent::Ok { recovered, truncated: list.truncated, invalid: list.invalid }
            }
        }
    }

    fn parse(
        &self,
        idx: usize,
        status: Option<u16>,
        body: Result<&[u8], PollFailure>,
    ) -> Result<(HintsReport, HintList), PollFailure> {
        match status {
            Some(200) => {}
            Some(s) => return Err(PollFailure::Status(s)),
            None => return Err(PollFailure::NoStatus),
        }
        let body = body?;
        if body.len() > self.max_body {
            return Err(PollFailure::BodyTooLarge(body.len()));
        }
        let report: HintsReport =
            serde_json::from_slice(body).map_err(|e| PollFailure::BadBody(e.to_string()))?;
        let addr = self.addr(idx).unwrap_or_default();
        if report.runner != addr {
            return Err(PollFailure::IdentityMismatch(report.runner.chars().take(64).collect()));
        }
        let list = sanitize_hints(&report.hints, self.max_hint_bytes, self.max_hints);
        Ok((report, list))
    }

    /// Leak repair for the shared in-flight counters. A worker VM that dies (or a lost
    /// `on_log`) leaves increments that are never undone, making a runner look busy for good.
    /// The runner's own `in_flight` counts every request it has (from all proxies), so this
    /// Envoy's count should never stay above it. Call after each successful poll of `idx`
    /// with this Envoy's current count; returns how much to subtract once the excess has
    /// persisted for [`LEAK_POLLS`] polls (the smallest excess seen, so requests merely in
    /// transit at poll time are not mistaken for leaks).
    pub fn leaked_in_flight(&mut self, idx: usize, local: u32) -> Option<u32> {
        let s = self.slots.get_mut(idx)?;
        let excess = local.saturating_sub(s.reported_in_flight);
        if excess == 0 {
            s.excess_polls = 0;
            s.min_excess = u32::MAX;
            return None;
        }
        s.excess_polls = s.excess_polls.saturating_add(1);
        s.min_excess = s.min_excess.min(excess);
        if s.excess_polls < LEAK_POLLS {
            return None;
        }
        let leaked = s.min_excess;
        s.excess_polls = 0;
        s.min_excess = u32::MAX;
        Some(leaked)
    }

    /// Applies hints a worker saw in runner `addr`'s response header (newer than its last
    /// poll). Unknown runners are ignored. Returns the parsed list when it changed the table.
    pub fn on_header_hints(&mut self, addr: &str, raw: &[u8]) -> Option<HintList> {
        let list = parse_hint_list(raw, self.max_hint_bytes, self.max_hints);
        let s = self.slots.iter_mut().find(|s| s.runner.addr == addr)?;
        if s.runner.hints == list.hints {
            return None;
        }
        s.runner.hints = list.hints.clone();
        self.dirty = true;
        Some(list)
    }

    /// The table to publish, if anything changed since the last call.
    pub fn take_table(&mut self) -> Option<Table> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        self.generation = self.generation.wrapping_add(1);
        Some(Table {
            generation: self.generation,
            runners: self.slots.iter().map(|s| s.runner.clone()).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn poller() -> Poller {
        let cfg = Config::parse(br#"{"runners":["127.0.0.1:1","127.0.0.1:2"],"poll_interval_ms":100,"poll_timeout_ms":50,"max_hints_per_runner":2,"max_hints_body_bytes":1024}"#).unwrap();
        Poller::new(&cfg)
    }

    fn body(runner: &str, hints: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&HintsReport {
            runner: runner.into(),
            hints: hints.iter().map(|s| s.to_string()).collect(),
            loading: vec![],
            capacity: 3,
            in_flight: 0,
            max_concurrency: 4,
            draining: false,
            resident_bytes: None,
            memory_budget_bytes: None,
            warm: Vec::new(),
        })
        .unwrap()
    }

    #[test]
    fn cycle_publishes_only_on_change() {
        let mut p = poller();
        assert_eq!(p.take_table().unwrap().runners.iter().filter(|r| r.available).count(), 0);
        assert!(p.take_table().is_none());
        assert_eq!(p.due(0), vec![0, 1]);
        p.on_sent(0, 7, 0);
        assert_eq!(p.due(0), vec![1]);
        assert_eq!(p.find_token(7), Some(0));
        let ev = p.on_response(0, 10, Some(200), Ok(&body("127.0.0.1:1", &["a", "bad hint", "b", "c"])));
        assert_eq!(ev, PollEvent::Ok { recovered: true, truncated: 1, invalid: 1 });
        let t = p.take_table().unwrap();
        assert_eq!(t.generation, 2);
        assert!(t.runners[0].available);
        assert_eq!(t.runners[0].hints, vec!["a", "b"]);
        assert_eq!(t.runners[0].max_concurrency, 4);
        // Next poll keeps the cadence: sent at 0, due at 100.
        assert!(p.due(99).iter().all(|&i| i != 0));
        assert!(p.due(100).contains(&0));
        p.on_sent(0, 8, 100);
        p.on_response(0, 110, Some(200), Ok(&body("127.0.0.1:1", &["a", "b"])));
        assert!(p.take_table().is_none(), "same report, nothing to publish");
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn failures_take_runner_out_and_keep_last_good_hints() {
        let mut p = poller();
        p.on_sent(0, 1, 0);
        p.on_response(0, 1, Some(200), Ok(&body("127.0.0.1:1", &["a"])));
        p.take_table();
        let cases: Vec<(Option<u16>, Result<&[u8], PollFailure>, PollFailure)> = vec![
            (Some(503), Ok(b""), PollFailure::Status(503)),
            (None, Ok(b""), PollFailure::NoStatus),
            (Some(200), Ok(b"{\"runner\":"), PollFailure::BadBody(String::new())),
            (Some(200), Ok(b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]"), PollFailure::BadBody(String::new())),
            (Some(200), Ok(br#"{"runner":1,"hints":"a"}"#), PollFailure::BadBody(String::new())),
            (Some(200), Err(PollFailure::BodyTooLarge(5000)), PollFailure::BodyTooLarge(5000)),
        ];
        for (i, (status, b, want)) in cases.into_iter().enumerate() {
            p.on_sent(0, 2, 0);
            match p.on_response(0, 1, status, b) {
                PollEvent::Failed { failure, lost } => {
                    assert_eq!(lost, i == 0, "case {i}");
                    match (&failure, &want) {
                        (PollFailure::BadBody(_), PollFailure::BadBody(_)) => {}
                        _ => assert_eq!(failure, want, "case {i}"),
                    }
                }
                other => panic!("case {i}: {other:?}"),
            }
        }
        let t = p.take_table().unwrap();
        assert!(!t.runners[0].available);
        assert_eq!(t.runners[0].hints, vec!["a"]);
        // The runner answers again: back in.
        p.on_sent(0, 3, 0);
        assert!(matches!(
            p.on_response(0, 1, Some(200), Ok(&body("127.0.0.1:1", &[]))),
            PollEvent::Ok { recovered: true, .. }
        ));
        assert!(p.take_table().unwrap().runners[0].available);
    }

    #[test]
    fn identity_mismatch_and_oversized_body_fail() {
        let mut p = poller();
        p.on_sent(1, 1, 0);
        let ev = p.on_response(1, 1, Some(200), Ok(&body("127.0.0.1:1", &["a"])));
        assert!(matches!(ev, PollEvent::Failed { failure: PollFailure::IdentityMismatch(_), .. }));
        p.on_sent(1, 1, 0);
        let big = vec![b' '; 2000];
        let ev = p.on_response(1, 1, Some(200), Ok(&big));
        assert!(matches!(ev, PollEvent::Failed { failure: PollFailure::BodyTooLarge(2000), .. }));
    }

    #[test]
    fn draining_runner_is_unavailable() {
        let mut p = poller();
        p.on_sent(0, 1, 0);
        let mut r: HintsReport = serde_json::from_slice(&body("127.0.0.1:1", &["a"])).unwrap();
        r.draining = true;
        let ev = p.on_response(0, 1, Some(200), Ok(&serde_json::to_vec(&r).unwrap()));
        assert_eq!(ev, PollEvent::Ok { recovered: false, truncated: 0, invalid: 0 });
        assert!(!p.take_table().unwrap().runners[0].available);
    }

    #[test]
    fn expire_fails_lost_calls() {
        let mut p = poller();
        p.on_sent(0, 1, 0);
        assert!(p.expire(100).is_empty());
        let ev = p.expire(101);
        assert_eq!(ev.len(), 1);
        assert_eq!(p.find_token(1), None);
    }

    #[test]
    fn persistent_counting_excess_is_reported_as_leaked() {
        let mut p = poller();
        p.on_sent(0, 1, 0);
        let mut r: HintsReport = serde_json::from_slice(&body("127.0.0.1:1", &[])).unwrap();
        r.in_flight = 2;
        p.on_response(0, 1, Some(200), Ok(&serde_json::to_vec(&r).unwrap()));
        // In transit at one poll only: not a leak.
        assert_eq!(p.leaked_in_flight(0, 3), None);
        assert_eq!(p.leaked_in_flight(0, 2), None);
        // Five counted, two real, three polls in a row (excess 3, 4, 3): three leaked.
        assert_eq!(p.leaked_in_flight(0, 5), None);
        assert_eq!(p.leaked_in_flight(0, 6), None);
        assert_eq!(p.leaked_in_flight(0, 5), Some(3));
        // The streak restarts after a correction.
        assert_eq!(p.leaked_in_flight(0, 5), None);
        assert_eq!(p.leaked_in_flight(9, 5), None);
    }

    #[test]
    fn header_hints_update_known_runners_only() {
        let mut p = poller();
        p.take_table();
        assert_eq!(p.on_header_hints("127.0.0.1:2", b"x, y").unwrap().hints, vec!["x", "y"]);
        assert!(p.on_header_hints("127.0.0.1:2", b"x,y").is_none());
        assert!(p.on_header_hints("127.0.0.1:9", b"x").is_none());
        assert_eq!(p.take_table().unwrap().runners[1].hints, vec!["x", "y"]);
    }
}
