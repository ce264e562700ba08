//! One Envoy against two in front of the same runners (`bench-routing --two-envoys`, and the
//! simulator's two-proxy rows once it has them): the comparison, its targets, its lines.
//!
//! The targets, from "several Envoys, one consistent view": at the same load, split over two
//! Envoys (request `i` to Envoy `i % 2`), the hint policies keep
//!
//! * their hit rate within [`TWO_ENVOYS_HIT_TARGET_POINTS`] points below one Envoy's (a higher
//!   hit rate with two meets it too), and
//! * the runner-side mean `queue_ms` (time queued at a runner for a cache or an inference
//!   slot) within [`TWO_ENVOYS_QUEUE_TARGET_RATIO`] of one Envoy's (lower meets it too).
//!
//! The runner reports `queue_ms` in whole milliseconds, and at moderate load most requests
//! queue for 0 ms: a mean below [`QUEUE_MS_FLOOR`] is a handful of requests, and a ratio of two
//! such means is noise. So the ratio is printed only when the 1-Envoy mean is at least the
//! floor, and the rule is: the 2-Envoy mean may be at most `1.10 x max(1-Envoy mean, 0.5 ms)`.
//! Below the floor that allows up to 0.55 ms (less than a twentieth of one 10 ms inference);
//! at and above it, it is the plain ratio.

use super::{decision_line, table, verdict, PointResult, PolicyResult};
use crate::sim::Policy;

/// The 2-Envoy hit rate may be at most this many points below the 1-Envoy one.
pub const TWO_ENVOYS_HIT_TARGET_POINTS: f64 = 3.0;

/// The 2-Envoy mean `queue_ms` may be at most this times the 1-Envoy one (see the module).
pub const TWO_ENVOYS_QUEUE_TARGET_RATIO: f64 = 1.10;

/// Below this 1-Envoy mean `queue_ms` the ratio is not meaningful and the floor stands in
/// for the 1-Envoy mean (see the module).
pub const QUEUE_MS_FLOOR: f64 = 0.5;

/// What the comparison reads of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Side {
    /// Hit rate, percent.
    pub hit: f64,
    /// Runner-side mean `queue_ms` of the 200s.
    pub queue_ms: f64,
    /// Of that, the mean wait for an inference slot (`slot_ms`).
    pub slot_ms: f64,
    /// Model loads started per second.
    pub loads_per_s: f64,
    /// Timeouts, overflows and errors.
    pub errors: u64,
}

impl Side {
    fn of(r: &PolicyResult) -> Side {
        Side {
            hit: r.summary.hit_rate * 100.0,
            queue_ms: r.summary.queue_ms,
            slot_ms: r.summary.slot_ms,
            loads_per_s: r.summary.loads_per_s,
            errors: r.summary.errors,
        }
    }
}

/// One hint policy behind one Envoy and behind two, at one point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EnvoysComparison {
    /// The policy.
    pub policy: Policy,
    /// `real` or `sim`.
    pub source: &'static str,
    /// Behind one Envoy.
    pub one: Side,
    /// Behind two.
    pub two: Side,
}

impl EnvoysComparison {
    /// Two minus one Envoy, hit-rate points.
    pub fn hit_diff_points(&self) -> f64 {
        self.two.hit - self.one.hit
    }

    /// Whether the hit-rate target is met.
    pub fn hit_met(&self) -> bool {
        self.hit_diff_points() >= -TWO_ENVOYS_HIT_TARGET_POINTS
    }

    /// Two over one Envoy's mean `queue_ms`; `None` (not meaningful) when the 1-Envoy mean is
    /// below [`QUEUE_MS_FLOOR`].
    pub fn queue_ratio(&self) -> Option<f64> {
        (self.one.queue_ms >= QUEUE_MS_FLOOR).then(|| self.two.queue_ms / self.one.queue_ms)
    }

    /// The highest 2-Envoy mean `queue_ms` that meets the target.
    pub fn queue_allowed_ms(&self) -> f64 {
        TWO_ENVOYS_QUEUE_TARGET_RATIO * self.one.queue_ms.max(QUEUE_MS_FLOOR)
    }

    /// Whether the `queue_ms` target is met.
    pub fn queue_met(&self) -> bool {
        self.two.queue_ms <= self.queue_allowed_ms() + 1e-9
    }

    /// The ratio, or the difference where the ratio means nothing.
    pub fn queue_text(&self) -> String {
        match self.queue_ratio() {
            Some(r) => format!("ratio {r:.2}"),
            None => format!("{:+.2} ms, ratio n/m", self.two.queue_ms - self.one.queue_ms),
        }
    }
}

/// Each 2-Envoy row (real, then the simulator's) with the 1-Envoy row of the same policy.
pub fn envoys_comparisons(p: &PointResult) -> Vec<EnvoysComparison> {
    let pairs = [("real", &p.real, &p.two_envoys), ("sim", &p.sim, &p.two_envoys_sim)];
    pairs
        .into_iter()
        .flat_map(|(source, ones, twos)| {
            twos.iter().filter_map(move |t| {
                let o = ones.iter().find(|r| r.policy == t.policy)?;
                Some(EnvoysComparison { policy: t.policy, source, one: Side::of(o), two: Side::of(t) })
            })
        })
        .collect()
}

/// The lines of one point's 2-Envoy runs: their rows, the comparison with one Envoy, and the
/// filter's decisions summed over both Envoys.
pub fn envoys_table(p: &PointResult) -> String {
    if p.two_envoys.is_empty() && p.two_envoys_sim.is_empty() {
        return String::new();
    }
    let mut s = String::new();
    if !p.two_envoys.is_empty() {
        s.push_str(&table("x2", &p.two_envoys));
    }
    if !p.two_envoys_sim.is_empty() {
        s.push_str(&table("simx2", &p.two_envoys_sim));
    }
    s.push_str("  1 vs 2 Envoys (1E: the policy's real or sim row, 2E: its x2 or simx2 row; queue: runner-side mean queue ms)\n");
    let row = |cells: [&str; 14]| {
        let [src, pol, h1, h2, d, hm, q1, q2, qt, qm, l1, l2, e1, e2] = cells;
        format!(
            "  {src:<5} {pol:<13} {h1:>7} {h2:>7} {d:>7} {hm:>6}  {q1:>8} {q2:>8} {qt:<21} {qm:>6}  {l1:>10} {l2:>10}  {e1:>6} {e2:>6}\n"
        )
    };
    s.push_str(&row([
        "",
        "policy",
        "hit% 1E",
        "hit% 2E",
        "points",
        "",
        "queue 1E",
        "queue 2E",
        "2E vs 1E",
        "",
        "loads/s 1E",
        "loads/s 2E",
        "err 1E",
        "err 2E",
    ]));
    let mut not_meaningful = false;
    for c in envoys_comparisons(p) {
        not_meaningful |= c.queue_ratio().is_none();
        s.push_str(&row([
            c.source,
            c.policy.name(),
            &format!("{:.2}", c.one.hit),
            &format!("{:.2}", c.two.hit),
            &format!("{:+.2}", c.hit_diff_points()),
            verdict(c.hit_met()),
            &format!("{:.2}", c.one.queue_ms),
            &format!("{:.2}", c.two.queue_ms),
            &c.queue_text(),
            verdict(c.queue_met()),
            &format!("{:.1}", c.one.loads_per_s),
            &format!("{:.1}", c.two.loads_per_s),
            &c.one.errors.to_string(),
            &c.two.errors.to_string(),
        ]));
    }
    s.push_str(&format!(
        "  targets: hit at most {TWO_ENVOYS_HIT_TARGET_POINTS:.0} points below 1 Envoy; mean queue ms at most {TWO_ENVOYS_QUEUE_TARGET_RATIO:.2} x max(1-Envoy mean, {QUEUE_MS_FLOOR} ms){}\n",
        if not_meaningful {
            format!("; n/m: 1-Envoy mean below {QUEUE_MS_FLOOR} ms, a ratio of such means is noise")
        } else {
            String::new()
        }
    ));
    for (what, list) in [("1 Envoy", &p.real), ("2 Envoys", &p.two_envoys)] {
        for r in list.iter().filter(|r| {
            r.policy.is_hint() && !r.decisions.is_empty() && p.two_envoys.iter().any(|t| t.policy == r.policy)
        }) {
            s.push_str(&format!(
                "  filter decisions, {} {what}: {}\n",
                r.policy,
                decision_line(&r.decisions)
            ));
        }
    }
    s
}

/// The target lines of one point (for the final targets check).
pub fn envoys_target_lines(p: &PointResult) -> Vec<String> {
    envoys_comparisons(p)
        .iter()
        .map(|c| {
            format!(
                "  {:<12} {:<4} {:<12} 2 Envoys vs 1: hit {:.2}% vs {:.2}%, {:+.2} points (target: within {TWO_ENVOYS_HIT_TARGET_POINTS:.0} below) [{}]; queue {:.2} vs {:.2} ms, {} (target: <= {:.2} ms) [{}], of which inference slot {:.2} vs {:.2} ms; loads/s {:.1} vs {:.1}; errors {} vs {}",
                p.name,
                c.source,
                c.policy.name(),
                c.two.hit,
                c.one.hit,
                c.hit_diff_points(),
                verdict(c.hit_met()),
                c.two.queue_ms,
                c.one.queue_ms,
                c.queue_text(),
                c.queue_allowed_ms(),
                verdict(c.queue_met()),
                c.two.slot_ms,
                c.one.slot_ms,
                c.two.loads_per_s,
                c.one.loads_per_s,
                c.two.errors,
                c.one.errors,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Summary;

    fn side(hit: f64, queue_ms: f64) -> Side {
        Side { hit, queue_ms, slot_ms: 0.0, loads_per_s: 10.0, errors: 0 }
    }

    fn cmp(one: Side, two: Side) -> EnvoysComparison {
        EnvoysComparison { policy: Policy::Hint, source: "real", one, two }
    }

    #[test]
    fn hit_target_is_three_points_below() {
        let c = cmp(side(60.0, 1.0), side(57.5, 1.0));
        assert!((c.hit_diff_points() + 2.5).abs() < 1e-9);
        assert!(c.hit_met());
        assert!(cmp(side(60.0, 1.0), side(57.0, 1.0)).hit_met());
        assert!(!cmp(side(60.0, 1.0), side(56.9, 1.0)).hit_met());
        assert!(cmp(side(60.0, 1.0), side(70.0, 1.0)).hit_met());
    }

    #[test]
    fn queue_target_is_a_ratio_above_the_floor_and_the_floor_below() {
        // Above the floor: the plain ratio.
        let c = cmp(side(60.0, 2.0), side(60.0, 2.2));
        assert!((c.queue_ratio().unwrap() - 1.1).abs() < 1e-9);
        assert!(c.queue_met());
        assert_eq!(c.queue_text(), "ratio 1.10");
        assert!(!cmp(side(60.0, 2.0), side(60.0, 2.21)).queue_met());
        assert!(cmp(side(60.0, 2.0), side(60.0, 0.1)).queue_met());
        // Below it: no ratio, the 2-Envoy mean may reach 1.10 x the floor.
        let tiny = cmp(side(60.0, 0.1), side(60.0, 0.4));
        assert_eq!(tiny.queue_ratio(), None);
        assert!((tiny.queue_allowed_ms() - 0.55).abs() < 1e-9);
        assert!(tiny.queue_met());
        assert_eq!(tiny.queue_text(), "+0.30 ms, ratio n/m");
        assert!(cmp(side(60.0, 0.0), side(60.0, 0.0)).queue_met());
        assert!(!cmp(side(60.0, 0.0), side(60.0, 0.6)).queue_met());
        // Continuous at the floor.
        let at = cmp(side(60.0, QUEUE_MS_FLOOR), side(60.0, 0.55));
        assert!(at.queue_ratio().is_some() && at.queue_met());
    }

    fn result(policy: Policy, hit_rate: f64, queue_ms: f64) -> PolicyResult {
        PolicyResult {
            policy,
            summary: Summary { hit_rate, queue_ms, ..Summary::default() },
            achieved_rps: None,
            send_lag_p99_ms: None,
            decisions: Default::default(),
            polls_per_request: None,
        }
    }

    #[test]
    fn rows_pair_up_by_policy_and_source() {
        let mut p = PointResult {
            point: "zipf1.0@60".parse().unwrap(),
            name: "zipf1.0@60".into(),
            offered_rps: 100.0,
            measured_requests: 1000,
            bounds: Default::default(),
            real: vec![
                result(Policy::Hint, 0.6, 1.0),
                result(Policy::HintFastest, 0.7, 2.0),
                result(Policy::RoundRobin, 0.1, 5.0),
            ],
            sim: vec![result(Policy::Hint, 0.62, 0.0)],
            queue: Vec::new(),
            two_envoys: vec![result(Policy::HintFastest, 0.65, 3.0), result(Policy::Hint, 0.59, 1.05)],
            two_envoys_sim: Vec::new(),
        };
        let c = envoys_comparisons(&p);
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].policy, c[0].source), (Policy::HintFastest, "real"));
        assert!((c[0].hit_diff_points() + 5.0).abs() < 1e-9 && !c[0].hit_met());
        assert!(!c[0].queue_met());
        assert!(c[1].hit_met() && c[1].queue_met());
        let text = envoys_table(&p);
        assert!(text.contains("MISSED") && text.contains("  x2    hint_fastest"), "{text}");
        assert!(!text.contains("  simx2 "));
        assert_eq!(envoys_target_lines(&p).len(), 2);
        // The simulator's rows, once it has them, pair with its own 1-proxy rows.
        p.two_envoys_sim = vec![result(Policy::Hint, 0.61, 0.2)];
        let c = envoys_comparisons(&p);
        assert_eq!(c.len(), 3);
        assert_eq!(c[2].source, "sim");
        assert!(envoys_table(&p).contains("  simx2 "));
        // Nothing run, nothing printed.
        p.two_envoys.clear();
        p.two_envoys_sim.clear();
        assert!(envoys_table(&p).is_empty() && envoys_comparisons(&p).is_empty());
    }
}
