//! The poller role: a singleton on Envoy's main thread that polls every runner's `/hints`,
//! merges hints workers saw in response headers, and publishes the runner table.

use crate::host::{self, Buffer, Map, MetricKind};
use crate::{delta_key, GENERATION_KEY, INFLIGHT_KEY, QUEUE_NAME, TABLE_KEY};
use hint_router_core::config::Config;
use hint_router_core::inflight;
use hint_router_core::members;
use hint_router_core::poller::{Churn, PollEvent, PollFailure, Poller, Update, WARN_EVERY_MS};
use hint_router_core::table::decode_header_update;
use hint_router_core::table::delta::{slot, Generations};
use std::time::Duration;

/// Most queue messages handled per `on_queue_ready` (the rest wait for the next one).
const MAX_DEQUEUE: usize = 4096;
/// Largest admin `/clusters` body read (about 1 KB per host: room for the 10,000 runners a
/// config may have).
const MAX_ADMIN_BODY: usize = 32 << 20;

struct Metrics {
    poll_ok: u32,
    poll_error: u32,
    runner_lost: u32,
    runner_recovered: u32,
    hints_truncated: u32,
    hints_invalid: u32,
    header_updates: u32,
    table_publishes: u32,
    inflight_repaired: u32,
    inflight_raised: u32,
    report_clamped: u32,
    poll_rejected: u32,
    runners_available: u32,
    runners_joined: u32,
    runners_left: u32,
    runners_refused: u32,
    membership_ok: u32,
    membership_error: u32,
    runners: u32,
}

impl Metrics {
    fn define() -> Metrics {
        let c = |n: &str| host::define_metric(MetricKind::Counter, n).unwrap_or(u32::MAX);
        Metrics {
            poll_ok: c("hint_router.poll_ok"),
            poll_error: c("hint_router.poll_error"),
            runner_lost: c("hint_router.runner_lost"),
            runner_recovered: c("hint_router.runner_recovered"),
            hints_truncated: c("hint_router.hints_truncated"),
            hints_invalid: c("hint_router.hints_invalid"),
            header_updates: c("hint_router.response_hint_updates"),
            table_publishes: c("hint_router.table_publishes"),
            inflight_repaired: c("hint_router.inflight_repaired"),
            inflight_raised: c("hint_router.inflight_raised"),
            report_clamped: c("hint_router.report_clamped"),
            poll_rejected: c("hint_router.poll_rejected"),
            runners_available: host::define_metric(MetricKind::Gauge, "hint_router.runners_available")
                .unwrap_or(u32::MAX),
            runners_joined: c("hint_router.runners_joined"),
            runners_left: c("hint_router.runners_left"),
            runners_refused: c("hint_router.runners_refused"),
            membership_ok: c("hint_router.membership_ok"),
            membership_error: c("hint_router.membership_error"),
            runners: host::define_metric(MetricKind::Gauge, "hint_router.runners").unwrap_or(u32::MAX),
        }
    }
}

/// State of the poller root.
pub struct PollerRoot {
    cfg: Config,
    poller: Poller,
    queue: Option<u32>,
    metrics: Metrics,
    /// Earliest time (ns) a change may be published outside a tick; see [`Self::publish_soon`].
    next_publish_ns: u64,
    /// Runners come from the cluster's hosts (no `runners` in the config).
    discovery: Option<Discovery>,
}

/// Reading the runners cluster's membership from the admin API.
struct Discovery {
    path: String,
    /// The call in flight, and when it was sent.
    in_flight: Option<(u32, u64)>,
    next_due_ms: u64,
    last_warn_ms: Option<u64>,
}

/// A publication may take at most 1 / this of the main thread's time outside ticks.
const PUBLISH_DUTY: u64 = 10;
/// Least time between two publications outside ticks. Every publication makes every worker
/// re-read the table, so client traffic that keeps changing it (misses of ever-new hints,
/// each listed as a guess) must not set the pace: changes inside the gap wait for the next
/// tick (at most this gap, or a fifth of the poll interval if shorter) and go out together.
const MIN_PUBLISH_GAP_NS: u64 = 20_000_000;

impl PollerRoot {
    /// Registers the queue, starts the tick and publishes the initial (empty) table.
    pub fn new(cfg: Config) -> Result<PollerRoot, String> {
        let queue = match host::register_queue(QUEUE_NAME) {
            Ok(q) => Some(q),
            Err(e) => {
                log::warn!("hint-router poller: cannot register queue {QUEUE_NAME} ({e}); response-header hints reach the table only through polls");
                None
            }
        };
        // Tick several times per interval so polls keep their cadence and timeouts are
        // noticed, and at least once per publication gap: a change that came inside the gap
        // (a guess a worker forwarded) waits for the next tick, and the other workers route
        // without it until then.
        let tick = (cfg.poll_interval_ms / 5).clamp(10, MIN_PUBLISH_GAP_NS / 1_000_000) as u32;
        host::set_tick_period_ms(tick).map_err(|e| format!("cannot set tick period: {e}"))?;
        let mut poller = Poller::new(&cfg);
        if let Ok((Some(g), _)) = host::get_shared(GENERATION_KEY) {
            if let Some(g) = Generations::decode(&g) {
                poller.continue_from(g.current);
            }
        }
        let discovery = cfg.runners.is_empty().then(|| Discovery {
            path: members::admin_path(&cfg.cluster),
            in_flight: None,
            next_due_ms: 0,
            last_warn_ms: None,
        });
        let mut root =
            PollerRoot { poller, cfg, queue, metrics: Metrics::define(), next_publish_ns: 0, discovery };
        if root.discovery.is_some() {
            log::info!(
                "hint-router poller: runners are the hosts of cluster {} (read through {} every {} ms)",
                root.cfg.cluster,
                root.cfg.admin_cluster,
                root.cfg.poll_interval_ms
            );
        } else {
            log::info!(
                "hint-router poller: polling {} runners every {} ms",
                root.poller.len(),
                root.cfg.poll_interval_ms
            );
        }
        root.publish();
        Ok(root)
    }

    /// Sends due polls, fails overdue ones, publishes changes.
    pub fn on_tick(&mut self) {
        let now = host::now_ms();
        self.read_membership(now);
        for (idx, ev) in self.poller.expire(now) {
            self.record(idx, &ev);
        }
        let due = self.poller.due(now);
        if due.is_empty() {
            self.publish();
            return;
        }
        // This Envoy's in-flight counts as the polls leave: each answer rebases on them.
        let mut counts = Vec::new();
        let n = self.poller.len();
        if let Ok((bytes, _)) = host::get_shared(INFLIGHT_KEY) {
            inflight::decode(&bytes.unwrap_or_default(), n, &mut counts);
        }
        for idx in due {
            let Some(addr) = self.poller.addr(idx).map(str::to_owned) else { continue };
            let path = self.poller.probe_path(idx).to_owned();
            let headers = vec![
                (":method", "GET"),
                (":path", path.as_str()),
                (":authority", addr.as_str()),
                (self.cfg.poll_target_header.as_str(), addr.as_str()),
            ];
            let timeout = Duration::from_millis(self.cfg.poll_timeout_ms);
            match host::dispatch_http_call(&self.cfg.poll_cluster, headers, timeout) {
                Ok(token) => self.poller.on_sent(idx, token, now, counts.get(idx).copied().unwrap_or(0)),
                Err(status) => {
                    let ev = self.poller.on_failure(idx, now, PollFailure::Dispatch);
                    if matches!(ev, PollEvent::Failed { warn: true, .. }) {
                        log::warn!(
                            "hint-router poller: cannot send a poll through cluster {}: {status}",
                            self.cfg.poll_cluster
                        );
                    }
                    self.record(idx, &ev);
                }
            }
        }
        self.publish();
    }

    /// Asks the admin API for the runners cluster's hosts, once per poll interval.
    fn read_membership(&mut self, now: u64) {
        let Some(d) = self.discovery.as_mut() else { return };
        if let Some((_, sent)) = d.in_flight {
            // Envoy answers a timed-out call itself; this only guards against losing one.
            if now.saturating_sub(sent) <= self.cfg.poll_interval_ms.saturating_mul(4) {
                return;
            }
            d.in_flight = None;
        }
        if now < d.next_due_ms {
            return;
        }
        d.next_due_ms = now.saturating_add(self.cfg.poll_interval_ms);
        let headers =
            vec![(":method", "GET"), (":path", d.path.as_str()), (":authority", "hint-router-admin")];
        let timeout = Duration::from_millis(self.cfg.poll_timeout_ms);
        match host::dispatch_http_call(&self.cfg.admin_cluster, headers, timeout) {
            Ok(token) => d.in_flight = Some((token, now)),
            Err(e) => {
                self.membership_failed(now, &format!("cannot call cluster {}: {e}", self.cfg.admin_cluster))
            }
        }
    }

    /// Applies the admin API's answer: the runners become exactly the cluster's hosts.
    fn on_membership(&mut self, body_size: usize) {
        let now = host::now_ms();
        let status = host::get_header(Map::CallResponse, ":status").ok().flatten();
        if status.as_deref() != Some(b"200") {
            let status = status.map(|s| String::from_utf8_lossy(&s).into_owned()).unwrap_or_default();
            return self.membership_failed(now, &format!("admin answered status {status:?}"));
        }
        if body_size > MAX_ADMIN_BODY {
            return self.membership_failed(
                now,
                &format!("admin body of {body_size} bytes is over {MAX_ADMIN_BODY}"),
            );
        }
        let body = match host::get_buffer(Buffer::CallResponseBody, body_size) {
            Ok(b) => b,
            Err(e) => return self.membership_failed(now, &format!("cannot read the admin body: {e}")),
        };
        let listed = match members::parse(&body, &self.cfg.cluster, hint_router_core::config::MAX_RUNNERS) {
            Ok(m) => m,
            Err(e) => return self.membership_failed(now, &e),
        };
        host::increment_metric(self.metrics.membership_ok, 1);
        if let Some(d) = self.discovery.as_mut() {
            d.last_warn_ms = None;
        }
        let churn = self.poller.set_members(&listed.members, now, hint_router_core::config::MAX_RUNNERS);
        if listed.dropped > 0 || churn.refused > 0 {
            host::increment_metric(self.metrics.runners_refused, (listed.dropped + churn.refused) as i64);
        }
        if !churn.is_empty() {
            self.apply_churn(&churn);
        }
    }

    fn apply_churn(&mut self, churn: &Churn) {
        host::increment_metric(self.metrics.runners_joined, churn.joined.len() as i64);
        host::increment_metric(self.metrics.runners_left, churn.left as i64);
        host::record_metric(self.metrics.runners, self.poller.members() as u64);
        log::info!(
            "hint-router poller: cluster {}: {} joined, {} left, {} changed health, {} refused; {} runners",
            self.cfg.cluster,
            churn.joined.len(),
            churn.left,
            churn.health_changed,
            churn.refused,
            self.poller.members()
        );
        if !churn.joined.is_empty() {
            self.reset_counters(&churn.joined);
        }
        // The new runners are due now: poll them at once rather than at the next tick.
        self.on_tick();
    }

    /// A slot taken by a new runner starts from zero in flight: requests still counted there
    /// belonged to the runner that left (their ends, still to come, are corrected by the new
    /// runner's first poll).
    fn reset_counters(&mut self, slots: &[usize]) {
        let n = self.poller.len();
        crate::update_inflight(n, 8, |counts| {
            for &i in slots {
                for c in [i, n + i] {
                    if let Some(v) = counts.get_mut(c) {
                        *v = 0;
                    }
                }
            }
            true
        });
    }

    fn membership_failed(&mut self, now: u64, why: &str) {
        host::increment_metric(self.metrics.membership_error, 1);
        let Some(d) = self.discovery.as_mut() else { return };
        let warn = d.last_warn_ms.map_or(true, |t| now.saturating_sub(t) >= WARN_EVERY_MS);
        if warn {
            d.last_warn_ms = Some(now);
            log::warn!(
                "hint-router poller: cannot read the hosts of cluster {} through {}: {why}; keeping the last known runners (repeats are logged at debug for 30 s)",
                self.cfg.cluster,
                self.cfg.admin_cluster
            );
        } else {
            log::debug!("hint-router poller: membership read failed: {why}");
        }
    }

    /// Handles a `/hints` response (or Envoy's synthesised error response).
    pub fn on_http_call_response(&mut self, token: u32, body_size: usize) {
        if let Some(d) = self.discovery.as_mut() {
            if d.in_flight.is_some_and(|(t, _)| t == token) {
                d.in_flight = None;
                self.on_membership(body_size);
                self.publish_soon();
                return;
            }
        }
        let Some(idx) = self.poller.find_token(token) else {
            log::debug!("hint-router poller: response for unknown call {token}");
            return;
        };
        let now = host::now_ms();
        let status = host::get_header(Map::CallResponse, ":status")
            .ok()
            .flatten()
            .and_then(|s| std::str::from_utf8(&s).ok().and_then(|s| s.trim().parse::<u16>().ok()));
        let body = if body_size > self.poller.max_body() {
            Err(PollFailure::BodyTooLarge(body_size))
        } else {
            host::get_buffer(Buffer::CallResponseBody, body_size).map_err(|_| PollFailure::BodyUnreadable)
        };
        let body_ref = body.as_deref().map_err(Clone::clone);
        let header = host::get_header(Map::CallResponse, &self.cfg.runner_hints_header).ok().flatten();
        let ev = self.poller.on_response(idx, now, status, header.as_deref(), body_ref);
        self.record(idx, &ev);
        if matches!(ev, PollEvent::Ok { .. }) {
            self.rebase_in_flight(idx);
        }
        self.publish_soon();
    }

    /// Applies hints workers saw in response headers.
    pub fn on_queue_ready(&mut self, queue_id: u32) {
        if Some(queue_id) != self.queue {
            return;
        }
        for _ in 0..MAX_DEQUEUE {
            match host::dequeue(queue_id) {
                Ok(Some(msg)) => {
                    if let Some((addr, raw)) = decode_header_update(&msg) {
                        if let Some(list) = self.poller.on_header_hints(addr, raw) {
                            host::increment_metric(self.metrics.header_updates, 1);
                            if list.truncated > 0 {
                                host::increment_metric(self.metrics.hints_truncated, list.truncated as i64);
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log::debug!("hint-router poller: dequeue failed: {e}");
                    break;
                }
            }
        }
        self.publish_soon();
    }

    /// Rebases this Envoy's in-flight count for runner `idx` on the runner's own report (see
    /// [`Poller::rebased_in_flight`]): leaked increments, mis-charged retries and other
    /// proxies' requests are corrected once per poll, in either direction. A lost
    /// compare-and-swap race just waits for the next poll.
    fn rebase_in_flight(&mut self, idx: usize) {
        if self.poller.in_flight_agrees(idx) {
            return; // whatever the count is now, it stays: no read of the counters
        }
        let n = self.poller.len();
        let (mut now, mut target) = (0, 0);
        // One attempt: a lost race just waits for the next poll.
        let wrote = crate::update_inflight(n, 1, |counts| {
            now = counts.get(idx).copied().unwrap_or(0);
            let Some(t) = self.poller.rebased_in_flight(idx, now) else { return false };
            target = t;
            // Both counters of the runner: in flight, and (never above it) loading.
            if let Some(c) = counts.get_mut(idx) {
                *c = target;
            }
            if let Some(c) = counts.get_mut(n + idx) {
                *c = (*c).min(target);
            }
            true
        });
        if wrote {
            if target < now {
                host::increment_metric(self.metrics.inflight_repaired, i64::from(now - target));
                log::debug!(
                    "hint-router poller: {} counted {now} in flight, the runner {target}: corrected down",
                    self.poller.addr(idx).unwrap_or("?")
                );
            } else {
                host::increment_metric(self.metrics.inflight_raised, i64::from(target - now));
            }
        }
    }

    fn record(&self, idx: usize, ev: &PollEvent) {
        let addr = self.poller.addr(idx).unwrap_or("?");
        match ev {
            PollEvent::Ok { recovered, truncated, invalid, clamped, warn } => {
                host::increment_metric(self.metrics.poll_ok, 1);
                if !clamped.is_empty() {
                    host::increment_metric(self.metrics.report_clamped, 1);
                    if *warn {
                        log::warn!(
                            "hint-router poller: runner {addr} reported out-of-bounds or unusable {}; clamped or ignored (see docs/config.md)",
                            clamped.join(", ")
                        );
                    }
                }
                if *recovered {
                    host::increment_metric(self.metrics.runner_recovered, 1);
                    log::info!("hint-router poller: runner {addr} is available");
                }
                if *truncated > 0 {
                    host::increment_metric(self.metrics.hints_truncated, *truncated as i64);
                }
                if *invalid > 0 {
                    host::increment_metric(self.metrics.hints_invalid, *invalid as i64);
                }
            }
            PollEvent::Failed { failure, lost, warn } => {
                host::increment_metric(self.metrics.poll_error, 1);
                if matches!(failure, PollFailure::BadBody(_) | PollFailure::IdentityMismatch(_)) {
                    host::increment_metric(self.metrics.poll_rejected, 1);
                }
                if *lost {
                    host::increment_metric(self.metrics.runner_lost, 1);
                    log::warn!("hint-router poller: runner {addr} left out: poll failed: {failure}");
                } else if *warn {
                    log::warn!("hint-router poller: runner {addr} is left out: poll failed: {failure} (repeats are logged at debug for 30 s)");
                } else {
                    log::debug!("hint-router poller: poll of {addr} failed: {failure}");
                }
            }
        }
    }

    /// Publishes a change now if the last publication was long enough ago, else leaves it to
    /// the next tick. Publishing a 1,000-runner table after every poll answer swamped the main
    /// thread until polls timed out; this keeps publications to at most 1/[`PUBLISH_DUTY`] of
    /// its time and at most one per [`MIN_PUBLISH_GAP_NS`] (plus one per tick), while a
    /// change after a quiet spell still goes out at once.
    fn publish_soon(&mut self) {
        if host::now_ns() >= self.next_publish_ns {
            self.publish();
        }
    }

    /// Publishes what changed: the runners that did (a delta in its ring slot), or the whole
    /// table; then the generations, which workers read on every request.
    fn publish(&mut self) {
        let started = host::now_ns();
        let Some(update) = self.poller.take_update() else { return };
        let (generation, key, bytes) = match &update {
            Update::Full(table) => (table.generation, TABLE_KEY.to_string(), table.encode()),
            Update::Delta(delta) => (delta.generation, delta_key(slot(delta.generation)), delta.encode()),
        };
        if let Err(e) = host::set_shared(&key, &bytes, 0) {
            log::error!("hint-router poller: cannot publish {key} ({} bytes): {e}", bytes.len());
            // Workers must not be told of a generation they cannot read: the next
            // publication carries the whole table, this change included.
            self.poller.publish_whole_next();
            return;
        }
        let published = Generations { current: generation, full: self.poller.full_generation() };
        if let Err(e) = host::set_shared(GENERATION_KEY, &published.encode(), 0) {
            log::error!("hint-router poller: cannot publish generation: {e}");
        }
        host::increment_metric(self.metrics.table_publishes, 1);
        host::record_metric(self.metrics.runners_available, self.poller.available() as u64);
        let now = host::now_ns();
        let gap = now.saturating_sub(started).saturating_mul(PUBLISH_DUTY).max(MIN_PUBLISH_GAP_NS);
        self.next_publish_ns = now.saturating_add(gap);
    }
}
