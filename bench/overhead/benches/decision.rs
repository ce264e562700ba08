//! Native micro-benchmarks of the filter's per-request work and of a table refresh, at 8, 100
//! and 1,000 runners with 100 hints each (`cargo bench -p hint-router-bench-overhead`).
//!
//! * `rank/{hit,miss,no_hint}/N`: the decision (`hint_router_core::rank::rank`).
//! * `router/{hit,miss,miss_full}/N`: the same decision as the filter makes it
//!   (`Router::route` on a hit, including the popularity count and the pin `Router::observe`
//!   releases; `Router::rank` on a miss, the eviction-aware placement, with free slots
//!   everywhere or every cache full so each runner's victim is priced).
//! * `router/miss_cold/N`: a miss when every cache is full and each runner's victim is its
//!   only copy, requested 0-7 times before (the steady state of a busy fleet: each runner is
//!   priced by its victim's popularity).
//! * `inflight/{decode,adjust}/N`: the per-request in-flight counter work (decode the shared
//!   value for ranking; one counter update); `inflight/read_pins_guesses/N`, what reading the
//!   value costs with 64 pins and 16 guesses in it, one pin changed since the last read (decode,
//!   pins synced into the router, the look for new guesses); `inflight/adjust_pin/N`, a hit's write there (counter and pin).
//! * `response/{parse_unchanged,compare_unchanged}/N`: what `on_http_response_headers` does
//!   with a runner's unchanged 100-hint header: parse it and compare lists (before), or compare
//!   the raw value with the view's list (after).
//! * `refresh/full/N`: a first load, `Table::decode` + `View::from_owned`.
//! * `refresh/one_changed/N`: a worker's refresh when the new table differs in one runner:
//!   `TableRef::parse` (in place) + `View::refresh_from_ref`.
//! * `refresh/{parse_in_place,decode_owned}/N`: the parse alone, in place or into a `Table`.
//! * `refresh/one_delta/N`: the same change as a worker gets it now, a delta of that runner
//!   (`DeltaRef::parse` + `Router::apply_delta`); `publish/{whole,one_delta}/N`: the poller's
//!   side, encoding the whole table or that delta.
//!
//! Before the runs it prints the native heap estimate of a filter VM (counting allocator);
//! after them, a table of criterion's median estimates, also written to
//! `target/bench/decision.json`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{black_box, BenchmarkId, Criterion};
use hint_router_bench_overhead::alloc::CountingAlloc;
use hint_router_bench_overhead::fixture::{self, HINTS_PER_RUNNER};
use hint_router_bench_overhead::memory;
use hint_router_core::hint::parse_hint_list;
use hint_router_core::inflight;
use hint_router_core::rank::{rank, Outcome};
use hint_router_core::router::{Router, WhenHoldersBusy};
use hint_router_core::table::delta::{Delta, DeltaRef};
use hint_router_core::table::{Table, TableRef, View};
use std::path::PathBuf;
use std::time::Duration;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const SIZES: [usize; 3] = [8, 100, 1000];
const MAX_CANDIDATES: usize = 3;
const MAX_HINT_BYTES: usize = 256;

fn bench_rank(c: &mut Criterion) {
    let mut g = c.benchmark_group("rank");
    for n in SIZES {
        let view = View::from_table(&fixture::table(n, HINTS_PER_RUNNER));
        let loads = fixture::loads(n);
        let (hit, miss) = (fixture::hit_hint(), fixture::miss_hint());
        let mut out = Vec::with_capacity(MAX_CANDIDATES);
        for (case, hint, want) in [
            ("hit", Some(hit.as_str()), Outcome::Hit),
            ("miss", Some(miss.as_str()), Outcome::Miss),
            ("no_hint", None, Outcome::NoHint),
        ] {
            assert_eq!(rank(&view, hint, &loads, 1, MAX_CANDIDATES, &mut out), want, "{case} n={n}");
            let mut spin = 0u32;
            g.bench_with_input(BenchmarkId::new(case, n), &n, |b, _| {
                b.iter(|| {
                    spin = spin.wrapping_add(1);
                    rank(black_box(&view), black_box(hint), black_box(&loads), spin, MAX_CANDIDATES, &mut out)
                })
            });
        }
    }
    g.finish();
}

fn bench_router(c: &mut Criterion) {
    let mut g = c.benchmark_group("router");
    for n in SIZES {
        let free = fixture::table(n, HINTS_PER_RUNNER);
        let mut full = free.clone();
        for r in &mut full.runners {
            r.capacity = r.hints.len() as u32;
        }
        let loads = fixture::loads(n);
        let (hit, miss) = (fixture::hit_hint(), fixture::miss_hint());
        let mut out = Vec::with_capacity(MAX_CANDIDATES);
        let mut router = Router::with_mode(View::from_table(&free), WhenHoldersBusy::Fastest);
        let d = router.route(Some(hit.as_str()), &loads, 0, 1, MAX_CANDIDATES, 64, &mut out);
        assert_eq!(d.outcome, Outcome::Hit, "n={n}");
        let mut spin = 0u32;
        g.bench_with_input(BenchmarkId::new("hit", n), &n, |b, _| {
            b.iter(|| {
                spin = spin.wrapping_add(1);
                let d = router.route(
                    black_box(Some(hit.as_str())),
                    &loads,
                    0,
                    spin,
                    MAX_CANDIDATES,
                    64,
                    &mut out,
                );
                if let Some(&first) = out.first() {
                    router.observe(first, &d, Some(10_000));
                }
                d
            })
        });
        let mut cold = full.clone();
        for (i, r) in cold.runners.iter_mut().enumerate() {
            if let Some(last) = r.hints.last_mut() {
                *last = format!("victim-{i}");
            }
        }
        for (case, table) in [("miss", &free), ("miss_full", &full), ("miss_cold", &cold)] {
            let mut router = Router::with_mode(View::from_table(table), WhenHoldersBusy::Fastest);
            if case == "miss_cold" {
                for i in 0..n {
                    for _ in 0..i % 8 {
                        let v = format!("victim-{i}");
                        let d = router.route(Some(v.as_str()), &loads, 0, 1, MAX_CANDIDATES, 64, &mut out);
                        if let Some(&first) = out.first() {
                            router.observe(first, &d, Some(10_000));
                        }
                    }
                }
            }
            assert_eq!(
                router.rank(Some(miss.as_str()), &loads, 0, 1, MAX_CANDIDATES, &mut out),
                Outcome::Miss
            );
            g.bench_with_input(BenchmarkId::new(case, n), &n, |b, _| {
                b.iter(|| {
                    spin = spin.wrapping_add(1);
                    router.rank(black_box(Some(miss.as_str())), &loads, 0, spin, MAX_CANDIDATES, &mut out)
                })
            });
        }
    }
    g.finish();
}

fn bench_inflight(c: &mut Criterion) {
    let mut g = c.benchmark_group("inflight");
    for n in SIZES {
        // `n` runners: their in-flight counters, then their (zero) loading counters.
        let bytes = inflight::encode(&[fixture::loads(n), vec![0; n]].concat());
        let mut out = Vec::with_capacity(2 * n);
        g.bench_with_input(BenchmarkId::new("decode", n), &n, |b, _| {
            b.iter(|| inflight::decode(black_box(&bytes), 2 * n, &mut out))
        });
        g.bench_with_input(BenchmarkId::new("adjust", n), &n, |b, _| {
            b.iter(|| {
                let mut v = black_box(&bytes).clone();
                inflight::adjust_in_place(&mut v, n, black_box(1), 1);
                v
            })
        });
        // The value as the workers share it under load: 64 models in use (pins) over the
        // runners and the last 16 misses' guesses.
        let mut shared = bytes.clone();
        for k in 0..64u64 {
            inflight::add_pin(&mut shared, n, (k as usize % n) as u32, k);
        }
        for k in 0..16u32 {
            let list = fixture::runner_hints((k as usize) % n, n, 3).join(",");
            inflight::guesses::add(&mut shared, n, k % n as u32, 0, b"model-x", list.as_bytes());
        }
        // The same with one more request in flight (one more pin), as the next read finds it.
        let mut shared2 = shared.clone();
        inflight::add_pin(&mut shared2, n, (n / 2) as u32, 1 << 40);
        let mut router = Router::new(View::from_table(&fixture::table(n, HINTS_PER_RUNNER)));
        // What `read_loads` adds per request when another worker changed the pins (every
        // request, under load): the pins sync (alternating between the two values, so each
        // sync rebuilds a runner's pins and recomputes its cost floor) and the look for new
        // guesses.
        let mut flip = false;
        g.bench_with_input(BenchmarkId::new("read_pins_guesses", n), &n, |b, _| {
            b.iter(|| {
                flip = !flip;
                let v = if flip { &shared2 } else { &shared };
                inflight::decode(black_box(v), 2 * n, &mut out);
                router.sync_pins(inflight::pin_bytes(black_box(v)));
                inflight::guesses::newest_seq(black_box(v))
            })
        });
        // The write of a hit: its counter and its pin, in that value.
        g.bench_with_input(BenchmarkId::new("adjust_pin", n), &n, |b, _| {
            b.iter(|| {
                let mut v = black_box(&shared).clone();
                inflight::adjust_in_place(&mut v, n, black_box(1), 1);
                inflight::add_pin(&mut v, n, black_box(1), black_box(99));
                v
            })
        });
    }
    g.finish();
}

fn bench_response(c: &mut Criterion) {
    let mut g = c.benchmark_group("response");
    for n in SIZES {
        let mut view = View::from_table(&fixture::table(n, HINTS_PER_RUNNER));
        let idx = (n / 2) as u32;
        let header = fixture::runner_hints(idx as usize, n, HINTS_PER_RUNNER).join(",");
        // Before: parse the header and compare lists (what the filter did on every response).
        g.bench_with_input(BenchmarkId::new("parse_unchanged", n), &n, |b, _| {
            b.iter(|| {
                let list = parse_hint_list(black_box(header.as_bytes()), MAX_HINT_BYTES, HINTS_PER_RUNNER);
                view.set_runner_hints(idx, &list)
            })
        });
        // After: compare the raw value with the view's list first.
        g.bench_with_input(BenchmarkId::new("compare_unchanged", n), &n, |b, _| {
            b.iter(|| {
                view.runner_hints_equal(idx, black_box(header.as_bytes()), MAX_HINT_BYTES, HINTS_PER_RUNNER)
            })
        });
    }
    g.finish();
}

fn bench_refresh(c: &mut Criterion) {
    let mut g = c.benchmark_group("refresh");
    for n in SIZES {
        let table = fixture::table(n, HINTS_PER_RUNNER);
        let json = table.encode();
        // The same table with runner 0's last hint swapped: a typical change.
        let mut changed = table.clone();
        if let Some(r) = changed.runners.first_mut() {
            r.hints.pop();
            r.hints.push("model-churn".into());
        }
        changed.generation += 1;
        let json2 = changed.encode();
        g.throughput(criterion::Throughput::Elements(n as u64));
        // First load (or a changed runner list): decode and index everything.
        g.bench_with_input(BenchmarkId::new("full", n), &n, |b, _| {
            b.iter(|| View::from_owned(Table::decode(black_box(&json)).expect("decode")))
        });
        // What a worker does when a new generation differs in one runner: parse in place,
        // compare, re-index that runner.
        let mut view = View::from_owned(table.clone());
        let mut flip = false;
        g.bench_with_input(BenchmarkId::new("one_changed", n), &n, |b, _| {
            b.iter(|| {
                flip = !flip;
                let bytes = if flip { &json2 } else { &json };
                view.refresh_from_ref(TableRef::parse(black_box(bytes)).expect("parse"));
            })
        });
        // The same change as a delta: parse it and apply that runner to the router.
        let deltas: Vec<Vec<u8>> = [&changed, &table]
            .iter()
            .zip([table.generation + 1, table.generation + 2])
            .map(|(t, generation)| {
                let runners = t.runners.first().map(|r| (0, r.clone())).into_iter().collect();
                Delta { generation, runners }.encode()
            })
            .collect();
        let mut router = Router::new(View::from_owned(table.clone()));
        let mut k = 0usize;
        g.bench_with_input(BenchmarkId::new("one_delta", n), &n, |b, _| {
            b.iter(|| {
                k += 1;
                let bytes = &deltas[k % 2];
                router.apply_delta(DeltaRef::parse(black_box(bytes)).expect("parse"))
            })
        });
        g.bench_with_input(BenchmarkId::new("parse_in_place", n), &n, |b, _| {
            b.iter(|| TableRef::parse(black_box(&json)).map(|t| t.runners.len()))
        });
        g.bench_with_input(BenchmarkId::new("decode_owned", n), &n, |b, _| {
            b.iter(|| Table::decode(black_box(&json)).expect("decode"))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("publish");
    for n in SIZES {
        let table = fixture::table(n, HINTS_PER_RUNNER);
        let delta = Delta {
            generation: 2,
            runners: table.runners.first().map(|r| (0, r.clone())).into_iter().collect(),
        };
        g.bench_with_input(BenchmarkId::new("whole", n), &n, |b, _| b.iter(|| black_box(&table).encode()));
        g.bench_with_input(BenchmarkId::new("one_delta", n), &n, |b, _| {
            b.iter(|| black_box(&delta).encode())
        });
    }
    g.finish();
}

/// Where criterion keeps its results.
fn criterion_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| hint_router_e2e::repo_root().join("target"));
    target.join("criterion")
}

/// Criterion's median estimate (ns) of one benchmark, if it ran.
fn median_ns(group: &str, func: &str, n: usize) -> Option<f64> {
    let p = criterion_dir().join(group).join(func).join(n.to_string()).join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn print_memory() {
    let rows: Vec<_> = SIZES.iter().filter_map(|&n| memory::estimate(n, HINTS_PER_RUNNER)).collect();
    memory::print_table("native heap of a filter VM (x86_64 sizes, counting allocator), bytes:", &rows);
}

fn main() {
    print_memory();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
        .configure_from_args();
    bench_rank(&mut c);
    bench_router(&mut c);
    bench_inflight(&mut c);
    bench_response(&mut c);
    bench_refresh(&mut c);
    c.final_summary();
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test` runs each benchmark once: no estimates to report
    }

    let rows = [
        ("rank", "hit"),
        ("rank", "miss"),
        ("rank", "no_hint"),
        ("router", "hit"),
        ("router", "miss"),
        ("router", "miss_full"),
        ("router", "miss_cold"),
        ("inflight", "decode"),
        ("inflight", "adjust"),
        ("response", "parse_unchanged"),
        ("response", "compare_unchanged"),
        ("refresh", "full"),
        ("refresh", "one_changed"),
        ("refresh", "parse_in_place"),
        ("refresh", "decode_owned"),
        ("refresh", "one_delta"),
        ("publish", "whole"),
        ("publish", "one_delta"),
    ];
    let mut doc = serde_json::Map::new();
    println!("\ncriterion median estimates (ns):");
    println!("{:<28} {:>12} {:>12} {:>12}", "benchmark", "n=8", "n=100", "n=1000");
    for (g, f) in rows {
        let vals: Vec<Option<f64>> = SIZES.iter().map(|&n| median_ns(g, f, n)).collect();
        if vals.iter().all(Option::is_none) {
            continue;
        }
        let cell = |v: &Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<28} {:>12} {:>12} {:>12}",
            format!("{g}/{f}"),
            cell(&vals[0]),
            cell(&vals[1]),
            cell(&vals[2])
        );
        let per: serde_json::Map<String, serde_json::Value> =
            SIZES.iter().zip(&vals).map(|(n, v)| (n.to_string(), serde_json::json!(v))).collect();
        doc.insert(format!("{g}/{f}"), serde_json::Value::Object(per));
    }
    for (g, f) in
        [("refresh", "full"), ("refresh", "one_changed"), ("refresh", "one_delta"), ("publish", "one_delta")]
    {
        if let (Some(r100), Some(r1000)) = (median_ns(g, f, 100), median_ns(g, f, 1000)) {
            println!(
                "{g}/{f} growth 100 -> 1000 runners: x{:.1} (linear = x10, independent of the fleet = x1)",
                r1000 / r100
            );
        }
    }
    let out = hint_router_e2e::repo_root().join("target/bench/decision.json");
    if let Some(d) = out.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let _ =
        std::fs::write(&out, serde_json::to_vec_pretty(&serde_json::Value::Object(doc)).unwrap_or_default());
}
