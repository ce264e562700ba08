//! Unit tests of [`super::Router`]: the busy rule, miss placement and listing, pins, the
//! `when_holders_busy` modes and learning.

use super::*;
use crate::table::tests::table;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn go(r: &mut Router, hint: Option<&str>, inf: &[u32]) -> (Decision, Vec<u32>) {
    let mut out = Vec::new();
    let d = r.route(hint, inf, 0, 0, 2, 64, &mut out);
    (d, out)
}

/// Routes `n` concurrent requests for `hint` (none ends), counting them in `inf`.
fn burst(r: &mut Router, hint: &str, inf: &mut [u32], n: u32) {
    let mut out = Vec::new();
    for k in 0..n {
        r.route(Some(hint), inf, 0, k, 2, 64, &mut out);
        inf[out[0] as usize] += 1;
    }
}

/// A table of runners listing `hints`, each with this capacity and max_concurrency.
fn table_shaped(hints: &[&[&str]], capacity: u32, max_concurrency: u32) -> crate::table::Table {
    let mut t = table(hints);
    for r in &mut t.runners {
        (r.capacity, r.max_concurrency) = (capacity, max_concurrency);
    }
    t
}

#[test]
fn requests_waiting_for_a_load_count_as_busy() {
    // 40 concurrent requests for a cold model over 4 idle runners (max_concurrency 2):
    // the router used to count the ones joining the load as not busy, for their whole
    // life, and sent all 40 to one runner ([40, 0, 0, 0]).
    for mode in [WhenHoldersBusy::AnyAvailable, WhenHoldersBusy::Fastest] {
        let mut r = Router::with_mode(View::from_table(&table(&[&[], &[], &[], &[]])), mode);
        let mut inf = vec![0u32; 4];
        burst(&mut r, "cold", &mut inf, 40);
        assert_eq!(inf, vec![10, 10, 10, 10], "{mode:?}");
        // Once the first runner confirmed the load, its waiters still make it busy: the
        // next request goes to another holder.
        assert!(r.confirm(0));
        let (d, out) = go(&mut r, Some("cold"), &[2, 0, 0, 0]);
        assert_eq!(d.outcome, Outcome::Hit, "{mode:?}");
        assert_ne!(out[0], 0, "{mode:?}: another holder");
    }
}

#[test]
fn a_miss_evicts_the_coldest_victim_fleet_wide() {
    // Both runners are full; runner 0's models are hot, runner 1's cold. Rotation (spin 0)
    // and load alone would pick runner 0 and evict a hot model.
    let mut v = Router::new(View::from_table(&table(&[&["a", "b", "c"], &["x", "y", "z"]])));
    for _ in 0..20 {
        for h in ["a", "b", "c"] {
            let (d, out) = go(&mut v, Some(h), &[0, 0]);
            assert_eq!((out[0], d.pin.is_some()), (0, true));
            v.observe(0, &d, Some(10_000)); // ended: no longer in use
        }
    }
    let (d, out) = go(&mut v, Some("new"), &[0, 0]);
    assert_eq!((d.outcome, out), (Outcome::Miss, vec![1, 0]));
    assert_eq!(v.evicting(), Some("z"));
    assert_eq!(v.view().runner(1).unwrap().hints, vec!["new", "x", "y"]);
    assert!(v.popularity_bytes() <= 16 * 1024);
}

#[test]
fn a_model_in_use_is_no_victim() {
    // Runner 0's coldest model c is in use (a request of ours in flight): the runner would
    // have to evict a or b instead, which are hot; runner 1's z is cold and free.
    let mut v = Router::new(View::from_table(&table(&[&["a", "b", "c"], &["x", "y", "z"]])));
    for _ in 0..20 {
        for h in ["a", "b"] {
            let (d, _) = go(&mut v, Some(h), &[0, 0]);
            v.observe(0, &d, None);
        }
    }
    let (busy_c, _) = go(&mut v, Some("c"), &[0, 0]);
    let (miss, out) = go(&mut v, Some("new"), &[1, 0]);
    assert_eq!(out[0], 1);
    v.observe(0, &busy_c, Some(10_000));
    v.observe(1, &miss, None);
    assert!(v.pins.iter().all(|p| p.is_empty()), "every pin released");
}

#[test]
fn a_miss_on_a_runner_listing_far_more_than_its_capacity_stays_linear() {
    // A hostile runner: capacity 1, 60,000 hints listed (max_hints_per_runner allows
    // 100,000). Listing a miss there keeps one hint; with a quadratic drop this took minutes.
    let many: Vec<String> = (0..60_000).map(|i| format!("h{i}")).collect();
    let mut t = table(&[&[]]);
    t.runners[0].hints = many;
    t.runners[0].capacity = 1;
    let mut v = Router::new(View::from_table(&t));
    let (d, _) = go(&mut v, Some("new"), &[0]);
    assert!(d.listed);
    assert_eq!(v.view().runner(0).unwrap().hints, vec!["new"]);
}

#[test]
fn independent_routers_send_a_cold_model_to_the_same_runner_and_spread_different_ones() {
    // Two proxies (or two workers) with their own state and request counters, the same
    // table: a cold model's first request goes to the same runner from both.
    let t = table(&[&[], &[], &[], &[], &[], &[], &[], &[]]);
    let mut firsts = std::collections::HashSet::new();
    for m in 0..64 {
        let hint = format!("model-{m}");
        let (mut a, mut b) = (Router::new(View::from_table(&t)), Router::new(View::from_table(&t)));
        let mut out = Vec::new();
        a.route(Some(&hint), &[0; 8], 0, 7, 3, 64, &mut out);
        let first = out[0];
        b.route(Some(&hint), &[0; 8], 0, 12_345, 3, 64, &mut out);
        assert_eq!(out[0], first, "{hint}");
        firsts.insert(first);
    }
    assert!(firsts.len() >= 6, "64 cold models landed on only {} of 8 runners", firsts.len());
}

#[test]
fn a_duplicate_copy_is_evicted_before_a_single_one() {
    // Runner 0 holds a as its most recently used model, runner 1 as its least; both also
    // hold models nobody else has. Evicting either copy of a loses no model: the miss goes
    // to one of them and asks it to evict a, whatever its LRU order.
    for mode in [WhenHoldersBusy::AnyAvailable, WhenHoldersBusy::Fastest] {
        let mut v = Router::with_mode(View::from_table(&table(&[&["a", "b", "c"], &["x", "y", "a"]])), mode);
        let (d, out) = go(&mut v, Some("new"), &[0, 0]);
        assert_eq!(d.outcome, Outcome::Miss, "{mode:?}");
        assert_eq!(v.evicting(), Some("a"), "{mode:?}");
        assert_eq!(v.view().holders("a"), &[1 - out[0]], "{mode:?}");
        // a is now a single copy, like every other model: a tie of equally cold single
        // copies, each runner evicting its least recently used, broken by the hint (the same
        // on every worker and proxy).
        let (_, out) = go(&mut v, Some("new2"), &[0, 0]);
        assert_eq!(out[0], (hint_hash("new2") >> 32) as u32 % 2, "{mode:?}");
        let lru = v.view().runner(out[0]).map(|r| r.hints.last().cloned());
        assert!(lru.is_some(), "{mode:?}");
    }
}

#[test]
fn a_miss_asks_the_runner_to_evict_its_coldest_model_not_its_least_recently_used() {
    // One full runner; its least recently used model (c) is hot, b is cold.
    let mut v = Router::new(View::from_table(&table(&[&["a", "b", "c"]])));
    for _ in 0..10 {
        for h in ["a", "c"] {
            let (d, _) = go(&mut v, Some(h), &[0]);
            v.observe(0, &d, Some(10_000));
        }
    }
    let (d, _) = go(&mut v, Some("new"), &[0]);
    assert!(d.load && d.listed);
    assert_eq!(v.evicting(), Some("b"));
    assert_eq!(v.view().runner(0).unwrap().hints, vec!["new", "a", "c"]);
    // A hit asks for no eviction.
    go(&mut v, Some("a"), &[0]);
    assert_eq!(v.evicting(), None);
}

#[test]
fn the_copies_of_a_hot_model_share_its_demand_in_either_mode() {
    // a is hot and held twice; b (runner 0) and c (runner 1) are single copies, b lukewarm.
    // A copy of a is priced at its share of a's demand, above b's: b goes, in both modes
    // (two routers, as Envoy's workers are, would otherwise each evict a copy of a at once).
    // Once a has cooled, its copy is the cheapest victim again.
    let mut t = table(&[&["a", "b"], &["a", "c"]]);
    for r in &mut t.runners {
        r.capacity = 2;
    }
    for mode in [WhenHoldersBusy::Fastest, WhenHoldersBusy::AnyAvailable] {
        let mut v = Router::with_mode(View::from_table(&t), mode);
        for k in 0..40 {
            let h = match k % 8 {
                0 => "b",
                1..=3 => "c",
                _ => "a",
            };
            let (d, out) = go(&mut v, Some(h), &[0, 0]);
            v.observe(out[0], &d, Some(10_000));
        }
        let mut hot = v.clone();
        go(&mut hot, Some("new"), &[0, 0]);
        assert_eq!(hot.evicting(), Some("b"), "{mode:?}");
        // Requests for b and c alone: a's estimate halves away below b's.
        for k in 0..2_000 {
            let h = if k % 2 == 0 { "b" } else { "c" };
            let (d, out) = go(&mut v, Some(h), &[0, 0]);
            v.observe(out[0], &d, Some(10_000));
        }
        go(&mut v, Some("new"), &[0, 0]);
        assert_eq!(v.evicting(), Some("a"), "{mode:?}: a cold duplicate goes first");
    }
}

/// Teaches `r` that runner `idx` loads in `load_us` and infers in `infer_us`.
fn teach(r: &mut Router, idx: u32, load_us: u64, infer_us: u64) {
    let hit =
        Decision { outcome: Outcome::Hit, load: false, listed: false, ahead: 0, pin: None, warm: false };
    r.observe(idx, &hit, Some(infer_us));
    let load =
        Decision { outcome: Outcome::Miss, load: true, listed: true, ahead: 0, pin: None, warm: false };
    r.observe(idx, &load, Some(load_us + infer_us));
}

#[test]
fn fastest_waits_for_a_short_queue_any_available_does_not() {
    let t = table(&[&["a"], &["q"]]);
    let mut any = Router::with_mode(View::from_table(&t), WhenHoldersBusy::AnyAvailable);
    let mut fast = Router::with_mode(View::from_table(&t), WhenHoldersBusy::Fastest);
    // Nothing learned yet: fastest behaves as any_available.
    assert_eq!(go(&mut fast.clone(), Some("a"), &[2, 0]).0.outcome, Outcome::BusyFallback);
    for r in [&mut any, &mut fast] {
        teach(r, 0, 200_000, 10_000);
        assert_eq!(r.learned_times(0), (Some(200_000), Some(10_000)));
        assert_eq!(r.learned_times(1), (Some(200_000), Some(10_000)), "the fleet's");
    }
    // Holder 0 is busy (2 in flight, max_concurrency 2): one round of 10 ms ahead.
    let (d, out) = go(&mut any, Some("a"), &[2, 0]);
    assert_eq!((d.outcome, d.load, out[0]), (Outcome::BusyFallback, true, 1));
    let (d, out) = go(&mut fast, Some("a"), &[2, 0]);
    assert_eq!((d.outcome, d.load, d.ahead, out[0]), (Outcome::Hit, false, 2, 0));
    // A queue longer than a load (30 rounds of 10 ms > 200 + 10 ms): load elsewhere.
    let (d, out) = go(&mut fast, Some("a"), &[60, 0]);
    assert_eq!((d.outcome, out[0]), (Outcome::BusyFallback, 1));
}

#[test]
fn fastest_loads_into_a_free_slot_once_the_waits_paid_for_it() {
    // Holder 0 has 8 in flight (max_concurrency 2): 4 rounds of 10 ms ahead, a 40 ms wait,
    // which beats a 200 ms load on runner 1 (a free slot) for each request alone. Four such
    // waits are 160 ms; the fifth would bring them to the load's price: that one loads.
    let mut r = Router::with_mode(View::from_table(&table(&[&["a"], &["q"]])), WhenHoldersBusy::Fastest);
    teach(&mut r, 0, 200_000, 10_000);
    let held = |r: &mut Router, n: usize| {
        for k in 0..n {
            let (d, out) = go(r, Some("a"), &[8, 0]);
            assert_eq!((d.outcome, out[0]), (Outcome::Hit, 0), "request {k} waits at the holder");
        }
    };
    held(&mut r, 4);
    let (d, out) = go(&mut r, Some("a"), &[8, 0]);
    assert_eq!((d.outcome, d.load, out[0]), (Outcome::BusyFallback, true, 1), "paid for: a copy");
    // A free holder clears what was paid: the next four wait again.
    let mut r = Router::with_mode(View::from_table(&table(&[&["a"], &["q"]])), WhenHoldersBusy::Fastest);
    teach(&mut r, 0, 200_000, 10_000);
    held(&mut r, 3);
    assert_eq!(go(&mut r, Some("a"), &[0, 0]).0.outcome, Outcome::Hit);
    held(&mut r, 4);
    // A load that would evict (runner 1 full) is weighed per request only: never paid for.
    let t = table(&[&["a"], &["x", "y", "z"]]);
    let mut r = Router::with_mode(View::from_table(&t), WhenHoldersBusy::Fastest);
    teach(&mut r, 0, 200_000, 10_000);
    held(&mut r, 20);
}

#[test]
fn fastest_waits_at_a_busy_holder_rather_than_load_where_every_slot_is_in_use() {
    // Runner 0 holds "a" with a long queue (200 in flight, max_concurrency 4: 51 rounds of
    // 10 ms, longer than a load). Runner 1 is not busy but both its slots hold models in use:
    // a load there waits for one of them to be released, and evicts it. On the bistable 8 x 2
    // shape (docs/bench-routing.md, "Loads that wait for a slot") every busy model's request
    // went to such a runner and the fleet thrashed.
    let shaped = |hints: &[&[&str]]| table_shaped(hints, 2, 4);
    let run = |t: &crate::table::Table, mode| {
        let mut r = Router::with_mode(View::from_table(t), mode);
        teach(&mut r, 0, 200_000, 10_000);
        let mut inf = vec![0u32; t.runners.len()];
        for h in ["x", "y"] {
            let (d, out) = go(&mut r, Some(h), &inf);
            assert_eq!((d.outcome, out[0], d.pin.is_some()), (Outcome::Hit, 1, true), "{h} in use");
            inf[1] += 1;
        }
        inf[0] = 200;
        let (d, out) = go(&mut r, Some("a"), &inf);
        (d.outcome, out[0])
    };
    let pinned = shaped(&[&["a"], &["x", "y"]]);
    assert_eq!(run(&pinned, WhenHoldersBusy::Fastest), (Outcome::Hit, 0), "waits at the holder");
    // `any_available` too: no runner could start the request now (next test).
    assert_eq!(run(&pinned, WhenHoldersBusy::AnyAvailable), (Outcome::Saturated, 0));
    // A runner with a free slot: the queue is longer than a load there, so it loads.
    let free = shaped(&[&["a"], &["x", "y"], &[]]);
    assert_eq!(run(&free, WhenHoldersBusy::Fastest), (Outcome::BusyFallback, 2));
}

#[test]
fn any_available_waits_at_the_least_loaded_holder_where_no_runner_could_start_a_load_now() {
    // Runners 0 and 1 hold "a" and are busy (max_concurrency 1), 1 the less loaded. Runner 2
    // is not busy, but its only slot holds "x" in use: a load there waits until "x" is
    // released, then evicts it. Every runner would make the request wait, so it waits where
    // its model already is, the least loaded holder (as with every runner busy), and needs
    // no learned times. On the 90 % points this kept fleets out of a collapse where every
    // busy holder's request queued a load behind models in use ("Loads that wait for a
    // slot", docs/bench-routing.md).
    let shaped = |hints: &[&[&str]]| table_shaped(hints, 1, 1);
    let run = |t: &crate::table::Table| {
        let mut r = Router::with_mode(View::from_table(t), WhenHoldersBusy::AnyAvailable);
        let mut inf = vec![0u32; t.runners.len()];
        let (d, out) = go(&mut r, Some("x"), &inf);
        assert_eq!((d.outcome, out[0], d.pin.is_some()), (Outcome::Hit, 2, true), "x in use");
        (inf[0], inf[1]) = (3, 2);
        let (d, out) = go(&mut r, Some("a"), &inf);
        (d.outcome, d.load, out[0])
    };
    assert_eq!(run(&shaped(&[&["a"], &["a"], &["x"]])), (Outcome::Saturated, false, 1));
    // With a runner that can load now (an empty one), the rule sends it there at once.
    assert_eq!(run(&shaped(&[&["a"], &["a"], &["x"], &[]])), (Outcome::BusyFallback, true, 3));
    // So with one whose capacity is unknown (it reports none, as fal's runners): it may.
    let mut mixed = shaped(&[&["a"], &["a"], &["x"], &["y"]]);
    mixed.runners[3].capacity = 0;
    assert_eq!(run(&mixed), (Outcome::BusyFallback, true, 3));
}

#[test]
fn observe_learns_inference_from_queued_hits_and_ignores_unknown_runners() {
    let mut r = Router::new(View::from_table(&table(&[&["a"]])));
    // 4 ahead with max_concurrency 2: the request waited 2 rounds, then ran (3 x 10 ms).
    let queued =
        Decision { outcome: Outcome::Hit, load: false, listed: false, ahead: 4, pin: None, warm: false };
    r.observe(0, &queued, Some(30_000));
    assert_eq!(r.learned_times(0), (None, Some(10_000)));
    r.observe(7, &queued, Some(1));
    r.observe(0, &queued, None); // no answer: nothing learned
    assert_eq!(r.learned_times(0), (None, Some(10_000)));
    r.observe(0, &queued, Some(u64::MAX)); // clamped, no overflow
    assert!(r.learned_times(0).1.unwrap() < 100_000_000);
}

#[test]
fn a_miss_lists_its_hint_on_the_chosen_runner_at_once() {
    let mut v = Router::new(View::from_table(&table(&[&["x", "y", "z"], &["q"]])));
    let (d, out) = go(&mut v, Some("new"), &[0, 0]);
    assert_eq!((d.outcome, d.load, d.listed, out[0]), (Outcome::Miss, true, true, 1));
    assert_eq!(v.view().runner(1).unwrap().hints, vec!["new", "q"]);
    assert_eq!(v.view().holders("new"), &[1]);
    // The next request for it follows, as a hit, but joins the load: counted as one.
    let (d, out) = go(&mut v, Some("new"), &[0, 1]);
    assert_eq!((d.outcome, d.load, d.listed, out[0]), (Outcome::Hit, true, false, 1));
    // Once the runner confirms it (same list, or a new one), requests are plain hits.
    let mut w = v.clone();
    assert!(w.confirm(1));
    assert!(!w.confirm(1));
    let d = go(&mut w, Some("new"), &[0, 1]).0;
    assert_eq!((d.outcome, d.load, d.listed, d.ahead), (Outcome::Hit, false, false, 1));
    assert!(!v.learn(1, &HintList { hints: vec!["new".into(), "q".into()], invalid: 0, truncated: 0 }));
    let (d, _) = go(&mut v, Some("new"), &[0, 1]);
    assert_eq!((d.outcome, d.load), (Outcome::Hit, false));
}

#[test]
fn guesses_survive_a_refresh_that_still_lists_them() {
    let mut v = Router::new(View::from_table(&table(&[&["x"], &["q"]])));
    let (_, out) = go(&mut v, Some("new"), &[0, 0]);
    let (d, _) = go(&mut v, Some("new"), &[0, 0]);
    assert!(d.load, "joining a guessed load");
    // A table that lists it (another worker forwarded the guess) keeps it a guess.
    let listed = if out[0] == 0 { table(&[&["new", "x"], &["q"]]) } else { table(&[&["x"], &["new", "q"]]) };
    v.refresh(|view| *view = View::from_table(&listed));
    assert!(go(&mut v, Some("new"), &[0, 0]).0.load);
    // A table that does not list it drops the guess.
    v.refresh(|view| *view = View::from_table(&table(&[&["x"], &["q"]])));
    assert!(!v.confirm(0) && !v.confirm(1));
}

#[test]
fn a_full_runner_drops_its_least_recently_used_hint() {
    // Runner 0 is the only one: full (capacity 3), the new model evicts the last-listed.
    let mut v = Router::new(View::from_table(&table(&[&["x", "y", "z"]])));
    let (d, _) = go(&mut v, Some("new"), &[0]);
    assert!(d.load);
    assert_eq!(v.view().runner(0).unwrap().hints, vec!["new", "x", "y"]);
    assert!(v.view().holders("z").is_empty());
}

#[test]
fn no_hint_and_no_candidates_change_nothing() {
    let mut v = Router::new(View::from_table(&table(&[&["x"]])));
    let (d, out) = go(&mut v, None, &[0]);
    assert_eq!((d.outcome, d.load, out), (Outcome::NoHint, false, vec![0]));
    let mut empty = Router::default();
    let (d, out) = go(&mut empty, Some("a"), &[]);
    assert_eq!((d.outcome, d.load, out), (Outcome::NoCandidates, false, vec![]));
    assert_eq!(v.view().runner(0).unwrap().hints, vec!["x"]);
}

#[test]
fn a_miss_on_a_warm_runner_is_marked_warm_and_teaches_no_load_time() {
    // Runner 0 is full with "a" warm, runner 1 has room: the miss goes to 0, as a warm load.
    let mut t = table(&[&["x", "y", "z"], &[]]);
    t.runners[0].warm = vec!["a".into()];
    let mut r = Router::new(View::from_table(&t));
    let (d, out) = go(&mut r, Some("a"), &[0, 0]);
    assert_eq!((d.outcome, d.load, d.listed, d.warm, out[0]), (Outcome::Miss, true, true, true, 0));
    // The guess lists it on runner 0 at once: the next request is a hit there.
    let (d, out) = go(&mut r, Some("a"), &[1, 0]);
    assert_eq!((d.outcome, d.warm, out[0]), (Outcome::Hit, false, 0));
    r.observe(
        0,
        &Decision { outcome: Outcome::Miss, load: true, listed: true, ahead: 0, pin: None, warm: true },
        Some(5_000),
    );
    assert_eq!(r.learned_times(0).0, None, "a warm load is no sample of a load from disk");
    // A cold miss is not marked warm.
    let (d, out) = go(&mut r, Some("b"), &[0, 0]);
    assert_eq!((d.outcome, d.warm, out[0]), (Outcome::Miss, false, 1));
}

/// Every cost floor of `r` is what a full recomputation of victims and floors gives.
fn assert_floors_fresh(r: &Router) {
    let mut fresh = r.clone();
    fresh.revictim_all();
    assert_eq!(r.floors, fresh.floors);
}

/// Two workers' routers with the same history: a and b hot on runner 0 (c there cold), x, y
/// and z warm on runner 1.
fn two_workers() -> (Router, Router) {
    let mut v = Router::new(View::from_table(&table(&[&["a", "b", "c"], &["x", "y", "z"]])));
    for round in 0..20 {
        for h in ["a", "b", "x", "y", "z"] {
            if round < 5 || !["x", "y", "z"].contains(&h) {
                let (d, out) = go(&mut v, Some(h), &[0, 0]);
                v.observe(out[0], &d, Some(10_000));
            }
        }
    }
    (v.clone(), v)
}

#[test]
fn a_model_in_use_by_another_worker_is_no_victim_once_synced() {
    let (mut a, mut b) = two_workers();
    let mut control = b.clone();
    // Worker a routes a request for c: in use on runner 0 until it ends.
    let (busy_c, out) = go(&mut a, Some("c"), &[0, 0]);
    assert_eq!(out[0], 0);
    let hash = busy_c.pin.expect("a hit pins its model");
    let mut shared = crate::inflight::encode(&[1, 0, 0, 0]);
    assert!(crate::inflight::add_pin(&mut shared, 2, 0, hash));
    // Worker b, not told, would evict c on runner 0: the runner could not (c is in use).
    let (_, out) = go(&mut control, Some("new"), &[1, 0]);
    assert_eq!((out[0], control.evicting()), (0, Some("c")));
    // Told through the shared value, it evicts the cheapest model not in use: z on runner 1.
    b.sync_pins(crate::inflight::pin_bytes(&shared));
    let (miss, out) = go(&mut b, Some("new"), &[1, 0]);
    assert_eq!((out[0], b.evicting()), (1, Some("z")));
    b.observe(1, &miss, None);
    // The request ends: the pin leaves the shared value, and b's sync releases it.
    crate::inflight::remove_pin(&mut shared, 2, 0, hash);
    b.sync_pins(crate::inflight::pin_bytes(&shared));
    assert!(b.pins.iter().all(|p| p.is_empty()));
    assert_floors_fresh(&b);
}

#[test]
fn a_workers_own_pin_is_counted_once_after_a_sync() {
    let (mut a, _) = two_workers();
    let (d, out) = go(&mut a, Some("c"), &[0, 0]);
    let mut shared = crate::inflight::encode(&[1, 0, 0, 0]);
    assert!(crate::inflight::add_pin(&mut shared, 2, out[0], d.pin.unwrap()));
    a.sync_pins(crate::inflight::pin_bytes(&shared));
    a.sync_pins(crate::inflight::pin_bytes(&shared)); // unchanged: the same
    assert_eq!(a.pins[0].as_slice(), &[(d.pin.unwrap(), 1)]);
    a.observe(out[0], &d, Some(10_000));
    assert!(a.pins.iter().all(|p| p.is_empty()), "released by its own end");
    // A pin the shared value lost (cleared by the poller) goes at the next sync, and one on
    // a runner this view does not have is ignored.
    let (d, out) = go(&mut a, Some("c"), &[0, 0]);
    assert!(d.pin.is_some());
    let mut foreign = crate::inflight::encode(&[0; 6]);
    assert!(crate::inflight::add_pin(&mut foreign, 3, 2, 77));
    a.sync_pins(crate::inflight::pin_bytes(&foreign));
    assert!(a.pins.iter().all(|p| p.is_empty()), "runner {}", out[0]);
    assert_floors_fresh(&a);
}

#[test]
fn sync_pins_caps_models_per_runner() {
    let (mut a, _) = two_workers();
    let mut shared = crate::inflight::encode(&[1, 1, 0, 0]);
    for h in 0..(crate::placement::MAX_PINS as u64 + 10) {
        assert!(crate::inflight::add_pin(&mut shared, 2, 1, h));
    }
    a.sync_pins(crate::inflight::pin_bytes(&shared));
    assert_eq!(a.pins[1].len(), crate::placement::MAX_PINS);
    assert_floors_fresh(&a);
}

#[test]
fn another_workers_guess_is_adopted_with_its_eviction() {
    let (mut a, mut b) = two_workers();
    let (miss, out) = go(&mut a, Some("new"), &[0, 0]);
    assert!(miss.listed);
    let first = out[0];
    let list = HintList { hints: a.view().runner(first).unwrap().hints.clone(), invalid: 0, truncated: 0 };
    let evicted = a.evicting().map(str::to_owned).expect("a full runner makes room");
    assert!(b.adopt_guess(first, "new", &list, 5));
    let r = b.view().runner(first).unwrap();
    assert_eq!(r.hints, list.hints);
    assert!(!r.hints.contains(&evicted));
    // b's next request for the model joins the load there, as a's would.
    let (d, out) = go(&mut b, Some("new"), &[1, 0]);
    assert_eq!((d.outcome, out[0], d.load), (Outcome::Hit, first, true));
    // Already listed: nothing to adopt; a list without the hint is no guess of it.
    assert!(!b.adopt_guess(first, "new", &list, 6));
    assert!(!b.adopt_guess(first, "other", &list, 6));
    assert!(!b.adopt_guess(9, "new", &list, 6), "no such runner");
    assert_floors_fresh(&b);
}

#[test]
fn an_adopted_guess_keeps_this_workers_own_guess_on_the_runner() {
    // Runner 0 has room for 3. Worker b guessed "mine" there; worker a, not yet told, guessed
    // "theirs" with a list that lacks "mine".
    let t = table(&[&["a"], &["x", "y", "z"]]);
    let (mut a, mut b) = (Router::new(View::from_table(&t)), Router::new(View::from_table(&t)));
    let (d, out) = go(&mut b, Some("mine"), &[0, 9]);
    assert!(d.listed && out[0] == 0);
    let (d, out) = go(&mut a, Some("theirs"), &[0, 9]);
    assert!(d.listed && out[0] == 0);
    let list = HintList { hints: a.view().runner(0).unwrap().hints.clone(), invalid: 0, truncated: 0 };
    assert_eq!(list.hints, vec!["theirs", "a"]);
    assert!(b.adopt_guess(0, "theirs", &list, 1));
    assert_eq!(b.view().runner(0).unwrap().hints, vec!["theirs", "mine", "a"]);
    // Both are b's guesses now: a request for either joins a load.
    for h in ["theirs", "mine"] {
        let (d, out) = go(&mut b, Some(h), &[0, 9]);
        assert_eq!((out[0], d.load), (0, true), "{h}");
    }
}

#[test]
fn incremental_pin_syncs_match_a_fresh_router() {
    // Random shared pins, with local routes in between: after every sync the pins are exactly
    // the shared ones and every cost floor is what a full recomputation gives.
    let (mut a, _) = two_workers();
    let hints = ["a", "b", "c", "x", "y", "z"];
    let mut shared = crate::inflight::encode(&[0; 4]);
    let mut x = 11u64;
    for step in 0..3000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let (runner, h) = ((x >> 33) as u32 % 2, hints[(x >> 40) as usize % hints.len()]);
        if x >> 62 == 0 {
            let (d, out) = go(&mut a, Some(h), &[0, 0]);
            if let Some(hash) = d.pin {
                crate::inflight::add_pin(&mut shared, 2, out[0], hash);
            }
        } else if x >> 63 == 0 {
            // The listed models, and a crowd of others (past 64 entries: the long compares).
            let hash = if x & 1 == 0 { hint_hash(h) } else { (x >> 20) % 300 };
            crate::inflight::add_pin(&mut shared, 2, runner, hash);
        } else {
            let hash = if x & 1 == 0 { hint_hash(h) } else { (x >> 20) % 300 };
            crate::inflight::remove_pin(&mut shared, 2, runner, hash);
        }
        if (x >> 8) % 3 != 0 {
            continue; // several changes between two syncs, as between two requests
        }
        a.sync_pins(crate::inflight::pin_bytes(&shared));
        for r in 0..2u32 {
            let mut want: Vec<(u64, u32)> = crate::inflight::pins(&shared, 2)
                .filter(|p| p.runner == r)
                .map(|p| (p.hash, p.count))
                .take(crate::placement::MAX_PINS)
                .collect();
            let mut got: Vec<(u64, u32)> = a.pins[r as usize].to_vec();
            want.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, want, "step {step} runner {r}");
        }
        assert_floors_fresh(&a);
    }
}
