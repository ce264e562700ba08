//! Per-request records and the per-policy summary computed from them (the same code for the
//! real run and the simulator).

use crate::workload::Trace;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// How a request ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Not sent (yet).
    #[default]
    NotSent,
    /// 200.
    Ok,
    /// No answer within the timeout.
    Timeout,
    /// Refused by the proxy's circuit breakers (503 overflow).
    Overflow,
    /// Any other failure (non-200 status, connection error).
    Error,
}

/// One request's result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Record {
    /// From the scheduled send time to the end of the answer (or the failure).
    pub latency_us: u64,
    /// `x-cache: hit`.
    pub hit: bool,
    /// Which runner served it, when known.
    pub runner: Option<u32>,
    /// How it ended.
    pub status: Status,
    /// Time it spent queued at its runner for a cache slot or an inference slot (the
    /// runner's own `queue_ms`; load time not included), answered requests only.
    pub queue_us: u64,
    /// Of `queue_us`, the time it waited for an inference slot with its model ready (the
    /// runner's `slot_ms`).
    pub slot_us: u64,
}

/// What one policy did at one point.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Requests in the measured window.
    pub requests: u64,
    /// Answered 200.
    pub ok: u64,
    /// Everything else (timeouts, overflows, errors).
    pub errors: u64,
    /// Of which timeouts.
    pub timeouts: u64,
    /// `x-cache: hit` among the 200s.
    pub hit_rate: f64,
    /// Model loads started per second during the measured window.
    pub loads_per_s: f64,
    /// Latency percentiles over answered and timed-out requests (a timeout counts as the
    /// timeout), milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Mean latency, milliseconds.
    pub mean_ms: f64,
    /// 200s per second of the measured window.
    pub throughput: f64,
    /// Requests per runner (measured window, answered or not).
    pub per_runner: Vec<u64>,
    /// Most requests on one runner over the mean.
    pub spread: f64,
    /// (hit - round_robin hit) / (Belady hit - round_robin hit), filled in later.
    pub gap_closed: Option<f64>,
    /// Mean time the 200s spent queued at their runners for a cache or inference slot
    /// ([`Record::queue_us`]), milliseconds.
    #[serde(default)]
    pub queue_ms: f64,
    /// Of `queue_ms`, the mean wait for an inference slot ([`Record::slot_us`]), ms.
    #[serde(default)]
    pub slot_ms: f64,
    /// Hits among the 200s that waited under [`PROMPT_US`] at their runner: the hits a
    /// router gets without sending a request to wait behind another's inference, which is
    /// what fal's rule (`any_available`) forbids and what the Envoy policies do freely.
    #[serde(default)]
    pub prompt_hit_rate: f64,
}

/// A hit that queued at its runner for less than this is "prompt" ([`Summary::prompt_hit_rate`]):
/// the real runners report their queue in milliseconds, the simulator's are exact.
pub const PROMPT_US: u64 = 1_000;

/// Quantiles of recorded values (microseconds), exact to five significant digits
/// (hdrhistogram).
pub struct Quantiles(Option<Histogram<u64>>);

impl Quantiles {
    /// The values' distribution.
    pub fn of(values: impl IntoIterator<Item = u64>) -> Quantiles {
        let mut h = Histogram::new_with_bounds(1, 1 << 42, 5).ok();
        if let Some(h) = h.as_mut() {
            for v in values {
                h.saturating_record(v);
            }
        }
        Quantiles(h)
    }

    /// The `q` quantile (0..=1): the smallest recorded value (to five digits) that at least
    /// that fraction of the values do not exceed; 0 when empty.
    pub fn get(&self, q: f64) -> u64 {
        match &self.0 {
            Some(h) if !h.is_empty() => h.lowest_equivalent(h.value_at_quantile(q)),
            _ => 0,
        }
    }
}

/// Summarises the measured window of `records` (one per request of `trace`).
pub fn summarize(trace: &Trace, records: &[Record], loads_in_window: u64, runners: usize) -> Summary {
    let measured = records.get(trace.first_measured..).unwrap_or(&[]);
    let secs = trace.spec.measure_us as f64 / 1e6;
    let mut s =
        Summary { requests: measured.len() as u64, per_runner: vec![0; runners], ..Summary::default() };
    let mut lat = Vec::with_capacity(measured.len());
    let (mut hits, mut prompt_hits, mut queued_us, mut slot_us) = (0u64, 0u64, 0u64, 0u64);
    for r in measured {
        match r.status {
            Status::Ok => {
                s.ok += 1;
                hits += u64::from(r.hit);
                prompt_hits += u64::from(r.hit && r.queue_us < PROMPT_US);
                queued_us += r.queue_us;
                slot_us += r.slot_us;
                lat.push(r.latency_us);
            }
            Status::Timeout => {
                s.errors += 1;
                s.timeouts += 1;
                lat.push(r.latency_us);
            }
            _ => s.errors += 1,
        }
        if let Some(c) = r.runner.and_then(|i| s.per_runner.get_mut(i as usize)) {
            *c += 1;
        }
    }
    let q = Quantiles::of(lat.iter().copied());
    let ms = |us: u64| us as f64 / 1000.0;
    let of_ok = |n: u64| if s.ok > 0 { n as f64 / s.ok as f64 } else { 0.0 };
    (s.hit_rate, s.prompt_hit_rate) = (of_ok(hits), of_ok(prompt_hits));
    s.loads_per_s = loads_in_window as f64 / secs;
    s.p50_ms = ms(q.get(0.5));
    s.p99_ms = ms(q.get(0.99));
    s.p999_ms = ms(q.get(0.999));
    s.mean_ms = if lat.is_empty() { 0.0 } else { lat.iter().sum::<u64>() as f64 / lat.len() as f64 / 1000.0 };
    s.throughput = s.ok as f64 / secs;
    let mean_ms = |us: u64| if s.ok > 0 { us as f64 / s.ok as f64 / 1000.0 } else { 0.0 };
    (s.queue_ms, s.slot_ms) = (mean_ms(queued_us), mean_ms(slot_us));
    let total: u64 = s.per_runner.iter().sum();
    let max = s.per_runner.iter().copied().max().unwrap_or(0);
    s.spread = if total > 0 { max as f64 * runners as f64 / total as f64 } else { 0.0 };
    s
}

/// `(hit - base) / (best - base)`, `None` when the bound is not above the baseline.
pub fn gap_closed(hit: f64, base: f64, best: f64) -> Option<f64> {
    if best - base > 1e-9 {
        Some((hit - base) / (best - base))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_nearest_rank() {
        let q = Quantiles::of((1..=1000).rev());
        assert_eq!((q.get(0.5), q.get(0.99), q.get(0.999), q.get(1.0)), (500, 990, 999, 1000));
        assert_eq!(Quantiles::of([]).get(0.5), 0);
        // Five significant digits: 10 s is kept to 64 us, 0.2 s exactly.
        let q = Quantiles::of([211_000, 10_000_000, 9_999_999]);
        assert_eq!((q.get(0.3), q.get(0.6), q.get(1.0)), (211_000, 9_999_936, 10_000_000));
        assert!((gap_closed(0.5, 0.2, 0.8).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(gap_closed(0.5, 0.8, 0.8), None);
    }
}
