//! The workload: open-loop Poisson arrivals, each request naming one model (its hint), drawn
//! from a Zipf or uniform popularity, optionally with the popularity ranks permuted halfway
//! through the measured window.

use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How popular each model is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Popularity {
    /// Zipf with exponent `s`: the model of rank `k` (1-based) has weight `1 / k^s`.
    Zipf(f64),
    /// Every model equally likely.
    Uniform,
}

/// A named workload: a popularity and whether it shifts mid-run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// Popularity of the models.
    pub popularity: Popularity,
    /// Permute the popularity ranks halfway through the measured window.
    pub shift: bool,
}

impl Workload {
    /// The workloads of the benchmark, by name.
    pub const NAMES: [&'static str; 5] = ["zipf0.8", "zipf1.0", "zipf1.2", "uniform", "shift1.0"];
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.popularity, self.shift) {
            (Popularity::Uniform, false) => write!(f, "uniform"),
            (Popularity::Uniform, true) => write!(f, "shift-uniform"),
            (Popularity::Zipf(s), false) => write!(f, "zipf{s:.1}"),
            (Popularity::Zipf(s), true) => write!(f, "shift{s:.1}"),
        }
    }
}

impl FromStr for Workload {
    type Err = String;

    fn from_str(s: &str) -> Result<Workload, String> {
        let bad = || format!("unknown workload {s:?} (zipfS, shiftS or uniform, e.g. zipf1.0)");
        if s == "uniform" {
            return Ok(Workload { popularity: Popularity::Uniform, shift: false });
        }
        let (shift, rest) = if let Some(r) = s.strip_prefix("zipf") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("shift") {
            (true, r)
        } else {
            return Err(bad());
        };
        let e: f64 = rest.parse().map_err(|_| bad())?;
        if !(0.0..=5.0).contains(&e) {
            return Err(bad());
        }
        Ok(Workload { popularity: Popularity::Zipf(e), shift })
    }
}

/// Draws model ranks (0 = most popular) from a popularity by inverting its CDF.
#[derive(Debug, Clone)]
pub struct RankSampler {
    cdf: Vec<f64>,
}

impl RankSampler {
    /// A sampler over `models` ranks.
    pub fn new(popularity: Popularity, models: usize) -> RankSampler {
        let weights: Vec<f64> = (1..=models.max(1))
            .map(|k| match popularity {
                Popularity::Zipf(s) => 1.0 / (k as f64).powf(s),
                Popularity::Uniform => 1.0,
            })
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        RankSampler { cdf }
    }

    /// Probability of rank `k`.
    pub fn prob(&self, k: usize) -> f64 {
        let hi = self.cdf.get(k).copied().unwrap_or(1.0);
        let lo = if k == 0 { 0.0 } else { self.cdf.get(k - 1).copied().unwrap_or(1.0) };
        hi - lo
    }

    /// One rank.
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        let u = rng.f64();
        let k = self.cdf.partition_point(|&c| c <= u);
        k.min(self.cdf.len() - 1) as u32
    }
}

/// One request of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Req {
    /// Scheduled send time, microseconds from the start of the run.
    pub at_us: u64,
    /// The model (and hint), an index into the model names.
    pub model: u32,
}

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceSpec {
    /// Popularity and shift.
    pub workload: Workload,
    /// Number of distinct models.
    pub models: usize,
    /// Mean arrival rate, requests per second.
    pub rate: f64,
    /// Warm-up (discarded from the results), microseconds.
    pub warmup_us: u64,
    /// Measured window after the warm-up, microseconds.
    pub measure_us: u64,
    /// Seed.
    pub seed: u64,
}

/// A generated trace: the same requests go through every policy.
#[derive(Debug, Clone)]
pub struct Trace {
    /// What it was generated from.
    pub spec: TraceSpec,
    /// Requests in send order.
    pub reqs: Vec<Req>,
    /// Index of the first measured request.
    pub first_measured: usize,
}

impl Trace {
    /// Generates the trace. With a shift, the model of rank `k` is `k` before the middle of the
    /// measured window and `perm[k]` after it.
    pub fn generate(spec: TraceSpec) -> Trace {
        let mut rng = Rng::new(spec.seed);
        let sampler = RankSampler::new(spec.workload.popularity, spec.models);
        let perm = rng.permutation(spec.models.max(1));
        let shift_at = spec.warmup_us + spec.measure_us / 2;
        let end = spec.warmup_us + spec.measure_us;
        let mean_gap_us = if spec.rate > 0.0 { 1e6 / spec.rate } else { f64::INFINITY };
        let mut reqs = Vec::with_capacity((spec.rate * end as f64 / 1e6 * 1.05) as usize + 16);
        let mut t = 0.0f64;
        let mut first_measured = None;
        loop {
            t += rng.exp(mean_gap_us);
            if !t.is_finite() || t >= end as f64 {
                break;
            }
            let at_us = t as u64;
            let rank = sampler.sample(&mut rng);
            let model = if spec.workload.shift && at_us >= shift_at {
                perm.get(rank as usize).copied().unwrap_or(rank)
            } else {
                rank
            };
            if first_measured.is_none() && at_us >= spec.warmup_us {
                first_measured = Some(reqs.len());
            }
            reqs.push(Req { at_us, model });
        }
        let first_measured = first_measured.unwrap_or(reqs.len());
        Trace { spec, reqs, first_measured }
    }

    /// The requests of the measured window.
    pub fn measured(&self) -> &[Req] {
        self.reqs.get(self.first_measured..).unwrap_or(&[])
    }
}

/// The hint (and model name) of model `i`.
pub fn model_name(i: u32) -> String {
    format!("m{i:05}")
}

/// The model [`model_name`] names, if it is one.
pub fn model_id(name: &str) -> Option<u32> {
    name.strip_prefix('m')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(workload: &str) -> TraceSpec {
        TraceSpec {
            workload: workload.parse().unwrap(),
            models: 100,
            rate: 1000.0,
            warmup_us: 1_000_000,
            measure_us: 20_000_000,
            seed: 42,
        }
    }

    #[test]
    fn workload_names_round_trip() {
        for n in Workload::NAMES {
            assert_eq!(n.parse::<Workload>().unwrap().to_string(), n);
        }
        assert!("zipf".parse::<Workload>().is_err());
        assert!("pareto1".parse::<Workload>().is_err());
    }

    #[test]
    fn zipf_sampler_has_the_right_shape() {
        let s = RankSampler::new(Popularity::Zipf(1.0), 100);
        let h100: f64 = (1..=100).map(|k| 1.0 / k as f64).sum();
        assert!((s.prob(0) - 1.0 / h100).abs() < 1e-12);
        assert!((s.prob(9) - 0.1 / h100).abs() < 1e-12);
        let mut rng = Rng::new(3);
        let mut counts = [0u32; 100];
        let n = 200_000;
        for _ in 0..n {
            counts[s.sample(&mut rng) as usize] += 1;
        }
        // Empirical frequencies match 1/k (within a few standard errors).
        for k in [0usize, 1, 4, 19, 99] {
            let p = s.prob(k);
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            let f = f64::from(counts[k]) / n as f64;
            assert!((f - p).abs() < 5.0 * sd, "rank {k}: {f} vs {p}");
        }
        // Rank 1 is about twice as frequent as rank 2 for s = 1.
        let ratio = f64::from(counts[0]) / f64::from(counts[1]);
        assert!((ratio - 2.0).abs() < 0.1, "{ratio}");
        let u = RankSampler::new(Popularity::Uniform, 4);
        assert!((u.prob(3) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn poisson_trace_rate_warmup_and_determinism() {
        let t = Trace::generate(spec("zipf1.0"));
        let n = t.reqs.len() as f64;
        assert!((n - 21_000.0).abs() < 5.0 * 21_000f64.sqrt(), "{n}");
        assert!(t.reqs.windows(2).all(|w| w[0].at_us <= w[1].at_us));
        assert!(t.measured().iter().all(|r| r.at_us >= 1_000_000));
        assert!(t.reqs[..t.first_measured].iter().all(|r| r.at_us < 1_000_000));
        let again = Trace::generate(spec("zipf1.0"));
        assert_eq!(t.reqs, again.reqs);
    }

    #[test]
    fn shift_permutes_the_ranks_mid_window() {
        let plain = Trace::generate(spec("zipf1.0"));
        let shifted = Trace::generate(spec("shift1.0"));
        let mid = 11_000_000;
        let top = |t: &Trace, before: bool| {
            let mut c = [0u32; 100];
            for r in t.reqs.iter().filter(|r| (r.at_us < mid) == before) {
                c[r.model as usize] += 1;
            }
            (0..100).max_by_key(|&i| c[i]).unwrap()
        };
        assert_eq!(top(&plain, true), 0);
        assert_eq!(top(&plain, false), 0);
        assert_eq!(top(&shifted, true), 0);
        assert_ne!(top(&shifted, false), 0);
    }
}
