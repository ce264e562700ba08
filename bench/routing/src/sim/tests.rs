//! The simulator's unit tests.

use super::*;
use crate::report::summarize;
use crate::workload::{TraceSpec, Workload};

fn trace(load: f64, models: usize, seed: u64) -> Trace {
    Trace::generate(TraceSpec {
        workload: "zipf1.0".parse::<Workload>().unwrap(),
        models,
        // About the 8 x 3 cluster's capacity for Zipf 1.0 (see `Cluster::capacity_rps`).
        rate: load * 160.0,
        warmup_us: 2_000_000,
        measure_us: 8_000_000,
        seed,
    })
}

#[test]
fn simulation_is_deterministic() {
    let t = trace(0.6, 100, 5);
    let p = SimParams::default();
    for policy in Policy::ALL {
        let a = simulate(&p, &t, policy);
        let b = simulate(&p, &t, policy);
        assert_eq!(a.records, b.records, "{policy}");
        assert_eq!(a.loads, b.loads, "{policy}");
    }
}

#[test]
fn single_runner_single_model_hits_after_one_load() {
    let t = Trace::generate(TraceSpec {
        workload: "zipf1.0".parse::<Workload>().unwrap(),
        models: 1,
        rate: 20.0,
        warmup_us: 0,
        measure_us: 5_000_000,
        seed: 1,
    });
    let p = SimParams { runners: 1, ..SimParams::default() };
    let run = simulate(&p, &t, Policy::Hint);
    assert_eq!(run.loads.len(), 1);
    let misses = run.records.iter().filter(|r| !r.hit).count();
    // Only the requests that came during the first load miss.
    assert!((1..=3).contains(&misses), "{misses}");
    assert!(run.records.iter().all(|r| r.status == Status::Ok));
    let first = run.records.first().unwrap();
    assert_eq!(first.latency_us, 200_000 + 10_000 + 1_000);
}

#[test]
fn cache_capacity_and_concurrency_are_respected() {
    // Two models alternating on one runner with capacity 1: every request loads.
    let mut t = trace(0.1, 2, 1);
    for (k, r) in t.reqs.iter_mut().enumerate() {
        r.model = (k % 2) as u32;
        r.at_us = k as u64 * 1_000_000;
    }
    t.reqs.truncate(6);
    t.first_measured = 0;
    let p = SimParams { runners: 1, capacity: 1, max_concurrency: 1, ..SimParams::default() };
    let run = simulate(&p, &t, Policy::RoundRobin);
    assert_eq!(run.loads.len(), 6);
    assert!(run.records.iter().all(|r| !r.hit && r.latency_us == 211_000));
    // Same model, 3 requests at once, max_concurrency 1: one load, inferences serialised.
    for r in t.reqs.iter_mut() {
        r.at_us = 0;
        r.model = 0;
    }
    t.reqs.truncate(3);
    let run = simulate(&p, &t, Policy::RoundRobin);
    assert_eq!(run.loads.len(), 1);
    let mut lat: Vec<u64> = run.records.iter().map(|r| r.latency_us).collect();
    lat.sort_unstable();
    assert_eq!(lat, vec![211_000, 221_000, 231_000]);
}

#[test]
fn hint_beats_round_robin_on_hits() {
    let t = trace(0.6, 100, 11);
    let p = SimParams::default();
    let s = |policy| summarize(&t, &simulate(&p, &t, policy).records, 0, p.runners);
    let (hint, rr) = (s(Policy::Hint), s(Policy::RoundRobin));
    assert!(hint.hit_rate > rr.hit_rate + 0.2, "{} vs {}", hint.hit_rate, rr.hit_rate);
}

#[test]
fn the_warm_tier_makes_a_reload_cheap_and_forgets_the_least_recently_loaded() {
    // One runner, one slot, a tier of two models: model 0, 1, 0, 2, 1 one second apart.
    let mut t = trace(0.1, 3, 1);
    for (k, (r, m)) in t.reqs.iter_mut().zip([0, 1, 0, 2, 1]).enumerate() {
        r.model = m;
        r.at_us = k as u64 * 1_000_000;
    }
    t.reqs.truncate(5);
    t.first_measured = 0;
    let p = SimParams {
        runners: 1,
        capacity: 1,
        max_concurrency: 1,
        host_cache: 2,
        warm_load_us: 20_000,
        ..SimParams::default()
    };
    let run = simulate(&p, &t, Policy::RoundRobin);
    let lat: Vec<u64> = run.records.iter().map(|r| r.latency_us).collect();
    // Cold, cold, warm (0 is in the tier), cold (2 pushes out 1, the least recently loaded),
    // cold again for 1.
    assert_eq!(lat, vec![211_000, 211_000, 31_000, 211_000, 211_000]);
    // Without a tier every load is cold.
    let run = simulate(&SimParams { host_cache: 0, ..p }, &t, Policy::RoundRobin);
    assert!(run.records.iter().all(|r| r.latency_us == 211_000));
}
