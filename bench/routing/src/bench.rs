//! Benchmark points, per-point results, the bounds, and the printed table: shared by the
//! `bench-routing` and `simulate` binaries.

use crate::bounds::{belady, lru};
use crate::report::{gap_closed, summarize, Summary};
use crate::sim::{simulate, Policy, SimParams};
use crate::workload::{RankSampler, Trace, Workload};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

mod envoys;

pub use envoys::{
    envoys_comparisons, envoys_table, envoys_target_lines, EnvoysComparison, Side, QUEUE_MS_FLOOR,
    TWO_ENVOYS_HIT_TARGET_POINTS, TWO_ENVOYS_QUEUE_TARGET_RATIO,
};

/// One point of the benchmark: a workload at an offered load (fraction of capacity).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Popularity (and shift).
    pub workload: Workload,
    /// Offered load as a fraction of capacity.
    pub load: f64,
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{:.0}", self.workload, self.load * 100.0)
    }
}

impl FromStr for Point {
    type Err = String;

    /// `WORKLOAD@PERCENT`, e.g. `zipf1.0@60`.
    fn from_str(s: &str) -> Result<Point, String> {
        let (w, l) = s.split_once('@').ok_or_else(|| format!("point {s:?} is not WORKLOAD@PERCENT"))?;
        let pct: f64 = l.trim_end_matches('%').parse().map_err(|_| format!("bad load in {s:?}"))?;
        if !(1.0..=300.0).contains(&pct) {
            return Err(format!("load {pct}% out of range 1..=300"));
        }
        Ok(Point { workload: w.parse()?, load: pct / 100.0 })
    }
}

/// The load sweep on Zipf 1.0, and the other workloads at 60 %.
pub fn default_points() -> Vec<Point> {
    parse_points("zipf1.0@30,zipf1.0@60,zipf1.0@90,zipf0.8@60,zipf1.2@60,uniform@60,shift1.0@60")
        .unwrap_or_default()
}

/// Every workload at every load.
pub fn all_points() -> Vec<Point> {
    let mut v = Vec::new();
    for w in Workload::NAMES {
        for l in [30, 60, 90] {
            if let Ok(p) = format!("{w}@{l}").parse() {
                v.push(p);
            }
        }
    }
    v
}

/// Parses `all`, `default`, or a comma-separated list of points.
pub fn parse_points(s: &str) -> Result<Vec<Point>, String> {
    match s {
        "all" => Ok(all_points()),
        "default" => Ok(default_points()),
        _ => s.split(',').filter(|x| !x.is_empty()).map(str::parse).collect(),
    }
}

/// Parses a comma-separated list of policies (`all` for every one).
pub fn parse_policies(s: &str) -> Result<Vec<Policy>, String> {
    if s == "all" {
        return Ok(Policy::ALL.to_vec());
    }
    s.split(',').filter(|x| !x.is_empty()).map(str::parse).collect()
}

/// The system whose capacity is measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// Runners (K).
    pub runners: usize,
    /// Models per runner cache (C).
    pub capacity: usize,
    /// Inferences at once per runner (M).
    pub max_concurrency: u32,
    /// Model load time, ms.
    pub load_ms: f64,
    /// Inference time, ms.
    pub infer_ms: f64,
    /// Distinct models.
    pub models: usize,
}

impl Cluster {
    /// Inference capacity: `K x M / infer` requests per second.
    pub fn inference_rps(&self) -> f64 {
        self.runners as f64 * f64::from(self.max_concurrency) * 1000.0 / self.infer_ms
    }

    /// Capacity for a workload: the highest request rate an ideal router could sustain.
    ///
    /// Such a router keeps the `R` most popular models resident (one copy each) and uses the
    /// other `K x C - R` cache slots for loads; a load keeps its slot for `load + infer` ms, so
    /// the cluster completes at most `(K x C - R) / (load + infer)` loads per second, and every
    /// request for a model outside the top `R` needs one. The capacity is the best such rate
    /// over `R`, capped by the inference capacity `K x M / infer`.
    pub fn capacity_rps(&self, workload: Workload) -> f64 {
        let sampler = RankSampler::new(workload.popularity, self.models);
        let slots = self.runners * self.capacity;
        let slot_s = (self.load_ms + self.infer_ms) / 1000.0;
        let mut best = 0.0f64;
        let mut mass = 0.0;
        for r in 0..=slots.min(self.models) {
            let miss = 1.0 - mass;
            let rate = if miss <= 1e-9 { f64::INFINITY } else { (slots - r) as f64 / (slot_s * miss) };
            best = best.max(rate);
            mass += sampler.prob(r);
        }
        best.min(self.inference_rps())
    }

    /// The hit rate of that ideal router at `rate` requests per second: the most popularity
    /// mass `R` resident models can cover while the other slots keep up with the loads,
    /// `R + rate x (1 - mass(R)) x (load + infer) <= K x C` (0 when no `R` keeps up).
    pub fn ideal_hit(&self, workload: Workload, rate: f64) -> f64 {
        let sampler = RankSampler::new(workload.popularity, self.models);
        let slots = (self.runners * self.capacity) as f64;
        let slot_s = (self.load_ms + self.infer_ms) / 1000.0;
        let mut best = 0.0f64;
        let mut mass = 0.0;
        for r in 0..=(self.runners * self.capacity).min(self.models) {
            if r as f64 + rate * (1.0 - mass) * slot_s <= slots {
                best = best.max(mass);
            }
            mass += sampler.prob(r);
        }
        best
    }
}

/// Hit-rate bounds of a trace's measured window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Bounds {
    /// Belady's MIN on one cache of runners x capacity models.
    pub belady: f64,
    /// LRU on one cache of runners x capacity models.
    pub lru: f64,
    /// The ideal router's hit rate at this rate, loads taking their time
    /// ([`Cluster::ideal_hit`]): a tighter, analytic reference than Belady.
    pub ideal: f64,
}

/// The bounds of `trace` for `slots` pooled cache slots.
pub fn bounds(trace: &Trace, slots: usize) -> Bounds {
    let models: Vec<u32> = trace.reqs.iter().map(|r| r.model).collect();
    Bounds {
        belady: belady(&models, slots, trace.first_measured).rate(),
        lru: lru(&models, slots, trace.first_measured).rate(),
        ideal: 0.0,
    }
}

/// One policy's result at one point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyResult {
    /// The policy.
    pub policy: Policy,
    /// What it did.
    #[serde(flatten)]
    pub summary: Summary,
    /// Real runs: requests sent per second (the generator keeping up with the offered rate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub achieved_rps: Option<f64>,
    /// Real runs: 99th percentile of how late requests were sent after their schedule, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_lag_p99_ms: Option<f64>,
    /// Hint policies: the decisions in the measured window (hit, miss, ...): the simulator's,
    /// or the real filter's counters (with its `queue.*` ones).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub decisions: BTreeMap<String, u64>,
    /// Queue door: status polls per request (mean over the measured window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polls_per_request: Option<f64>,
}

/// Fills in `gap_closed` of every result from the round-robin result among them.
pub fn fill_gap_closed(results: &mut [PolicyResult], belady: f64) {
    let base = round_robin_hit(results);
    fill_gap_closed_with(results, base, belady);
}

/// Fills in `gap_closed` of rows run beside `main` (the queue door's, the 2-Envoy ones) from
/// the round-robin row of `main`.
pub fn fill_gap_closed_beside(rows: &mut [PolicyResult], main: &[PolicyResult], belady: f64) {
    fill_gap_closed_with(rows, round_robin_hit(main), belady);
}

fn round_robin_hit(results: &[PolicyResult]) -> Option<f64> {
    results.iter().find(|r| r.policy == Policy::RoundRobin).map(|r| r.summary.hit_rate)
}

fn fill_gap_closed_with(results: &mut [PolicyResult], base: Option<f64>, belady: f64) {
    for r in results.iter_mut() {
        r.summary.gap_closed = base.and_then(|b| gap_closed(r.summary.hit_rate, b, belady));
    }
}

/// Simulates every policy on `trace`.
pub fn sim_point(params: &SimParams, trace: &Trace, policies: &[Policy], belady: f64) -> Vec<PolicyResult> {
    let mut out: Vec<PolicyResult> =
        policies.iter().map(|&policy| sim_policy(params, trace, policy)).collect();
    fill_gap_closed(&mut out, belady);
    out
}

/// Simulates one policy on `trace` and summarises its measured window (`gap_closed` left for
/// [`fill_gap_closed`]).
pub fn sim_policy(params: &SimParams, trace: &Trace, policy: Policy) -> PolicyResult {
    let start = trace.spec.warmup_us;
    let end = start + trace.spec.measure_us;
    let run = simulate(params, trace, policy);
    let loads = run.loads.iter().filter(|&&t| t >= start && t < end).count() as u64;
    PolicyResult {
        policy,
        summary: summarize(trace, &run.records, loads, params.runners),
        achieved_rps: None,
        send_lag_p99_ms: None,
        decisions: run.decisions.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        polls_per_request: None,
    }
}

/// All results of one point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointResult {
    /// Which point.
    pub point: Point,
    /// `point` as text.
    pub name: String,
    /// Offered requests per second.
    pub offered_rps: f64,
    /// Requests in the measured window.
    pub measured_requests: u64,
    /// Hit-rate bounds.
    pub bounds: Bounds,
    /// Real Envoy runs (empty when not run).
    pub real: Vec<PolicyResult>,
    /// Simulator runs of the same trace.
    pub sim: Vec<PolicyResult>,
    /// Hint policies through fal's queue door, side by side with `real` (`--queue-mode`;
    /// empty when not run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queue: Vec<PolicyResult>,
    /// Hint policies behind two Envoys in front of the same runners, request `i` to Envoy
    /// `i % 2`, side by side with `real` (`--two-envoys`; empty when not run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub two_envoys: Vec<PolicyResult>,
    /// The simulator's hint policies behind two proxies (`SimParams::proxies` 2), side by side
    /// with `sim` (`bench-routing --two-envoys`; empty when not run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub two_envoys_sim: Vec<PolicyResult>,
}

/// Issue 13's target: the queue door's hit rate within this many points of the blocking one.
pub const QUEUE_HIT_TARGET_POINTS: f64 = 3.0;

/// One hint policy through both doors at one point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueComparison {
    /// The policy.
    pub policy: Policy,
    /// Hit rate through the blocking door, percent.
    pub blocking_hit: f64,
    /// Hit rate through the queue door, percent.
    pub queue_hit: f64,
}

impl QueueComparison {
    /// Queue minus blocking, points.
    pub fn diff_points(&self) -> f64 {
        self.queue_hit - self.blocking_hit
    }

    /// Whether the queue door's hit rate is within [`QUEUE_HIT_TARGET_POINTS`] below the
    /// blocking door's (a higher queue hit rate meets it too).
    pub fn met(&self) -> bool {
        self.diff_points() >= -QUEUE_HIT_TARGET_POINTS
    }
}

/// Each queue row with the blocking row of the same policy.
pub fn queue_comparisons(p: &PointResult) -> Vec<QueueComparison> {
    p.queue
        .iter()
        .filter_map(|q| {
            let b = p.real.iter().find(|r| r.policy == q.policy)?;
            Some(QueueComparison {
                policy: q.policy,
                blocking_hit: b.summary.hit_rate * 100.0,
                queue_hit: q.summary.hit_rate * 100.0,
            })
        })
        .collect()
}

/// How a target check prints: `met` or `MISSED`.
pub fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

/// The filter decisions worth printing (hit, miss, busy_fallback, ...), as `name n` pairs.
pub fn decision_line(d: &BTreeMap<String, u64>) -> String {
    const SHOWN: [&str; 8] = [
        "hit",
        "miss",
        "busy_fallback",
        "saturated",
        "no_hint",
        "no_candidates",
        "queue.submits",
        "queue.inflight_corrected",
    ];
    SHOWN
        .iter()
        .filter_map(|&k| d.get(k).filter(|&&v| v > 0).map(|v| format!("{k} {v}")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The queue door's lines of one point: its table and the comparison with the blocking door.
pub fn queue_table(p: &PointResult) -> String {
    if p.queue.is_empty() {
        return String::new();
    }
    let mut s = table("queue", &p.queue);
    for c in queue_comparisons(p) {
        let polls = p
            .queue
            .iter()
            .find(|q| q.policy == c.policy)
            .and_then(|q| q.polls_per_request)
            .map(|x| format!("; {x:.1} status polls/request"))
            .unwrap_or_default();
        s.push_str(&format!(
            "  queue vs blocking, {}: hit {:.2}% vs {:.2}%, {:+.2} points (target: within {QUEUE_HIT_TARGET_POINTS:.0} points below) [{}]{polls}\n",
            c.policy,
            c.queue_hit,
            c.blocking_hit,
            c.diff_points(),
            verdict(c.met()),
        ));
    }
    for (door, list) in [("blocking", &p.real), ("queue", &p.queue)] {
        for r in list.iter().filter(|r| r.policy.is_hint() && !r.decisions.is_empty()) {
            s.push_str(&format!(
                "  filter decisions, {} {door}: {}\n",
                r.policy,
                decision_line(&r.decisions)
            ));
        }
    }
    s
}

fn opt(v: Option<f64>, width: usize, prec: usize) -> String {
    match v {
        Some(x) => format!("{x:>width$.prec$}"),
        None => format!("{:>width$}", "-"),
    }
}

/// The table of one point's results (`label` says real or sim).
pub fn table(label: &str, results: &[PolicyResult]) -> String {
    let mut s = format!(
        "  {label:<5} {:<18} {:>6} {:>7} {:>8} {:>8} {:>9} {:>8} {:>8} {:>7} {:>6} {:>6}{}\n",
        "policy",
        "hit%",
        "gap",
        "loads/s",
        "p50ms",
        "p99ms",
        "p99.9ms",
        "queue ms",
        "tput",
        "errors",
        "spread",
        if results.iter().any(|r| r.achieved_rps.is_some()) { "  sent/s lag99ms" } else { "" }
    );
    for r in results {
        let m = &r.summary;
        s.push_str(&format!(
            "  {label:<5} {:<18} {:>6.1} {} {:>8.1} {:>8.1} {:>9.1} {:>8.1} {:>8.2} {:>7.1} {:>6} {:>6.2}",
            r.policy.name(),
            m.hit_rate * 100.0,
            opt(m.gap_closed, 7, 2),
            m.loads_per_s,
            m.p50_ms,
            m.p99_ms,
            m.p999_ms,
            m.queue_ms,
            m.throughput,
            m.errors,
            m.spread,
        ));
        if r.achieved_rps.is_some() {
            s.push_str(&format!("  {} {}", opt(r.achieved_rps, 6, 1), opt(r.send_lag_p99_ms, 7, 1)));
        }
        s.push('\n');
    }
    s
}

/// Heading of one point.
pub fn heading(p: &PointResult) -> String {
    format!(
        "{}: offered {:.0} req/s, {} measured requests; hit-rate bounds: Belady {:.1}%, global LRU {:.1}%, static ideal {:.1}%\n",
        p.name,
        p.offered_rps,
        p.measured_requests,
        p.bounds.belady * 100.0,
        p.bounds.lru * 100.0,
        p.bounds.ideal * 100.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_parse() {
        assert_eq!(default_points().len(), 7);
        assert_eq!(all_points().len(), 15);
        let p: Point = "zipf1.2@90".parse().unwrap();
        assert_eq!(p.to_string(), "zipf1.2@90");
        assert!("zipf1.2".parse::<Point>().is_err());
        assert!("zipf1.2@0".parse::<Point>().is_err());
        assert_eq!(parse_policies("hint,ring_hash").unwrap(), vec![Policy::Hint, Policy::RingHash]);
        assert!(parse_policies("maglev").is_err());
    }

    #[test]
    fn queue_comparison_target() {
        let c = QueueComparison { policy: Policy::Hint, blocking_hit: 80.0, queue_hit: 77.5 };
        assert!((c.diff_points() + 2.5).abs() < 1e-9);
        assert!(c.met());
        assert!(!QueueComparison { queue_hit: 76.9, ..c }.met());
        assert!(QueueComparison { queue_hit: 85.0, ..c }.met());
        let mut d = BTreeMap::new();
        d.insert("hit".to_string(), 5);
        d.insert("miss".to_string(), 0);
        d.insert("queue.submits".to_string(), 7);
        d.insert("table_reloads".to_string(), 9);
        assert_eq!(decision_line(&d), "hit 5, queue.submits 7");
    }

    #[test]
    fn rows_beside_take_the_main_rows_round_robin() {
        let row = |policy, hit_rate| PolicyResult {
            policy,
            summary: Summary { hit_rate, ..Summary::default() },
            achieved_rps: None,
            send_lag_p99_ms: None,
            decisions: BTreeMap::new(),
            polls_per_request: None,
        };
        let main = vec![row(Policy::Hint, 0.6), row(Policy::RoundRobin, 0.2)];
        let mut beside = vec![row(Policy::Hint, 0.5)];
        fill_gap_closed_beside(&mut beside, &main, 0.7);
        assert!((beside[0].summary.gap_closed.unwrap() - 0.6).abs() < 1e-9);
        fill_gap_closed_beside(&mut beside, &main[..1], 0.7);
        assert_eq!(beside[0].summary.gap_closed, None);
    }

    #[test]
    fn capacity_is_the_ideal_routers_sustainable_rate() {
        let c = Cluster {
            runners: 8,
            capacity: 3,
            max_concurrency: 1,
            load_ms: 190.0,
            infer_ms: 10.0,
            models: 100,
        };
        assert!((c.inference_rps() - 800.0).abs() < 1e-9);
        // Uniform: keeping models resident never pays; every request loads: 24 / 0.2 s.
        assert!((c.capacity_rps("uniform".parse().unwrap()) - 120.0).abs() < 1e-6);
        // Skewed popularity sustains more, more skew more still.
        let z1 = c.capacity_rps("zipf1.0".parse().unwrap());
        let z12 = c.capacity_rps("zipf1.2".parse().unwrap());
        assert!(z1 > 150.0 && z1 < 200.0, "{z1}");
        assert!(z12 > z1);
        // Every model fits: only inference limits.
        // At capacity the ideal router just keeps up; below it, it hits more.
        let w = "zipf1.0".parse().unwrap();
        let at_cap = c.ideal_hit(w, z1);
        assert!(at_cap > 0.3 && at_cap < 0.6, "{at_cap}");
        assert!(c.ideal_hit(w, 0.6 * z1) > at_cap);
        assert_eq!(c.ideal_hit(w, 10.0 * z1), 0.0);
        let small = Cluster { models: 10, ..c };
        assert!((small.capacity_rps("zipf1.0".parse().unwrap()) - 800.0).abs() < 1e-9);
    }
}
