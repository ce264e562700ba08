//! The poller's unit tests.
use super::*;
use crate::wire::HintsReport;
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
        capacity: 2,
        in_flight: 0,
        max_concurrency: 4,
        draining: false,
        resident_bytes: None,
        memory_budget_bytes: None,
        warm: Vec::new(),
        queue_token: None,
    })
    .unwrap()
}

fn with_token(runner: &str, token: &str) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&body(runner, &["a"])).unwrap();
    v["queue_token"] = token.into();
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn queue_tokens_are_published_unique_and_failures_mark_runners_unreachable() {
    let mut p = poller();
    p.take_table();
    let token = "00000000000000ab";
    p.on_sent(0, 1, 0, 0);
    p.on_response(0, 1, Some(200), None, Ok(&with_token("127.0.0.1:1", token)));
    // The second runner claims the first one's token: it gets none, and it is reported.
    p.on_sent(1, 2, 0, 0);
    let ev = p.on_response(1, 1, Some(200), None, Ok(&with_token("127.0.0.1:2", token)));
    assert!(
        matches!(ev, PollEvent::Ok { ref clamped, warn: true, .. } if clamped == &vec!["queue_token (another runner's)"]),
        "{ev:?}"
    );
    let t = p.take_table().unwrap();
    assert_eq!((t.runners[0].queue_token, t.runners[1].queue_token), (0xab, 0));
    assert!(!t.runners[0].unreachable);
    // A malformed token is ignored, and said.
    p.on_sent(1, 3, 100, 0);
    let ev = p.on_response(1, 101, Some(200), None, Ok(&with_token("127.0.0.1:2", "AB")));
    assert!(matches!(ev, PollEvent::Ok { ref clamped, .. } if clamped == &vec!["queue_token"]), "{ev:?}");
    // A failed poll keeps the token (job calls get a clear 503, not a 404) and marks the
    // runner unreachable; an answer clears it.
    p.on_sent(0, 4, 100, 0);
    p.on_failure(0, 150, PollFailure::Timeout);
    let t = p.take_table().unwrap();
    assert!(t.runners[0].unreachable && !t.runners[0].available);
    assert_eq!(t.runners[0].queue_token, 0xab);
    p.on_sent(0, 5, 200, 0);
    p.on_response(0, 201, Some(200), None, Ok(&body("127.0.0.1:1", &["a"])));
    let t = p.take_table().unwrap();
    assert!(!t.runners[0].unreachable && t.runners[0].available);
    assert_eq!(t.runners[0].queue_token, 0, "a restarted runner without a queue");
    // Draining is not unreachable.
    let mut v: serde_json::Value = serde_json::from_slice(&with_token("127.0.0.1:1", token)).unwrap();
    v["draining"] = true.into();
    p.on_sent(0, 6, 300, 0);
    p.on_response(0, 301, Some(200), None, Ok(&serde_json::to_vec(&v).unwrap()));
    let t = p.take_table().unwrap();
    assert!(!t.runners[0].available && !t.runners[0].unreachable);
    assert_eq!(t.runners[0].queue_token, 0xab);
}

#[test]
fn cycle_publishes_only_on_change() {
    let mut p = poller();
    assert_eq!(p.take_table().unwrap().runners.iter().filter(|r| r.available).count(), 0);
    assert!(p.take_table().is_none());
    assert_eq!(p.due(0), vec![0, 1]);
    p.on_sent(0, 7, 0, 0);
    assert_eq!(p.due(0), vec![1]);
    assert_eq!(p.find_token(7), Some(0));
    let ev = p.on_response(0, 10, Some(200), None, Ok(&body("127.0.0.1:1", &["a", "bad hint", "b", "c"])));
    assert_eq!(ev, PollEvent::Ok { recovered: true, truncated: 1, invalid: 1, clamped: vec![], warn: false });
    let t = p.take_table().unwrap();
    assert_eq!(t.generation, 2);
    assert!(t.runners[0].available);
    assert_eq!(t.runners[0].hints, vec!["a", "b"]);
    assert_eq!(t.runners[0].max_concurrency, 4);
    // Next poll keeps the cadence: sent at 0, due at 100.
    assert!(p.due(99).iter().all(|&i| i != 0));
    assert!(p.due(100).contains(&0));
    p.on_sent(0, 8, 100, 0);
    p.on_response(0, 110, Some(200), None, Ok(&body("127.0.0.1:1", &["a", "b"])));
    assert!(p.take_table().is_none(), "same report, nothing to publish");
}

#[test]
#[allow(clippy::type_complexity)]
fn failures_take_runner_out_and_keep_last_good_hints() {
    let mut p = poller();
    p.on_sent(0, 1, 0, 0);
    p.on_response(0, 1, Some(200), None, Ok(&body("127.0.0.1:1", &["a"])));
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
        p.on_sent(0, 2, 0, 0);
        match p.on_response(0, 1, status, None, b) {
            PollEvent::Failed { failure, lost, warn } => {
                assert_eq!(lost, i == 0, "case {i}");
                // Warned when lost; then not again within WARN_EVERY_MS.
                assert_eq!(warn, i == 0, "case {i}");
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
    p.on_sent(0, 3, 0, 0);
    assert!(matches!(
        p.on_response(0, 1, Some(200), None, Ok(&body("127.0.0.1:1", &[]))),
        PollEvent::Ok { recovered: true, .. }
    ));
    assert!(p.take_table().unwrap().runners[0].available);
}

#[test]
fn identity_mismatch_and_oversized_body_fail() {
    let mut p = poller();
    p.on_sent(1, 1, 0, 0);
    let ev = p.on_response(1, 1, Some(200), None, Ok(&body("127.0.0.1:1", &["a"])));
    assert!(matches!(ev, PollEvent::Failed { failure: PollFailure::IdentityMismatch(_), .. }));
    p.on_sent(1, 1, 0, 0);
    let big = vec![b' '; 2000];
    let ev = p.on_response(1, 1, Some(200), None, Ok(&big));
    assert!(matches!(ev, PollEvent::Failed { failure: PollFailure::BodyTooLarge(2000), .. }));
}

#[test]
fn draining_runner_is_unavailable() {
    let mut p = poller();
    p.on_sent(0, 1, 0, 0);
    let mut r: HintsReport = serde_json::from_slice(&body("127.0.0.1:1", &["a"])).unwrap();
    r.draining = true;
    let ev = p.on_response(0, 1, Some(200), None, Ok(&serde_json::to_vec(&r).unwrap()));
    assert_eq!(
        ev,
        PollEvent::Ok { recovered: false, truncated: 0, invalid: 0, clamped: vec![], warn: false }
    );
    assert!(!p.take_table().unwrap().runners[0].available);
}

#[test]
fn expire_fails_lost_calls() {
    let mut p = poller();
    p.on_sent(0, 1, 0, 0);
    assert!(p.expire(100).is_empty());
    let ev = p.expire(101);
    assert_eq!(ev.len(), 1);
    assert_eq!(p.find_token(1), None);
}

fn report(runner: &str, in_flight: u32) -> Vec<u8> {
    format!(r#"{{"runner":"{runner}","hints":[],"in_flight":{in_flight}}}"#).into_bytes()
}

#[test]
fn in_flight_is_rebased_on_the_runners_report_in_both_directions() {
    let mut p = poller();
    // Sent while this Envoy counted 5; the runner has 2; meanwhile one more started here.
    p.on_sent(0, 1, 0, 5);
    p.on_response(0, 1, Some(200), None, Ok(&report("127.0.0.1:1", 2)));
    assert_eq!(p.rebased_in_flight(0, 6), Some(3));
    assert!(!p.in_flight_agrees(0));
    // Counted too few (the runner also serves another Envoy): corrected upwards.
    p.on_sent(0, 2, 100, 1);
    p.on_response(0, 101, Some(200), None, Ok(&report("127.0.0.1:1", 7)));
    assert_eq!(p.rebased_in_flight(0, 1), Some(7));
    assert_eq!(p.rebased_in_flight(0, 0), Some(6), "one ended since the send");
    // Agreement (the runner had what this Envoy counted), and runners that say nothing:
    // left alone.
    p.on_sent(0, 5, 150, 3);
    p.on_response(0, 151, Some(200), None, Ok(&report("127.0.0.1:1", 3)));
    assert_eq!(p.rebased_in_flight(0, 3), None);
    assert_eq!(p.rebased_in_flight(0, 5), None);
    assert!(p.in_flight_agrees(0), "so the caller need not read the count");
    p.on_sent(1, 3, 0, 4);
    p.on_response(1, 1, Some(200), None, Ok(br#"{"hints":[]}"#));
    assert_eq!(p.rebased_in_flight(1, 4), None);
    assert!(p.in_flight_agrees(1));
    assert_eq!(p.rebased_in_flight(9, 4), None);
    // Never below zero.
    p.on_sent(0, 4, 200, 9);
    p.on_response(0, 201, Some(200), None, Ok(&report("127.0.0.1:1", 0)));
    assert_eq!(p.rebased_in_flight(0, 1), Some(0));
}

#[test]
fn identity_is_compared_in_canonical_form_and_optional() {
    let cfg = Config::parse(br#"{"runners":["[::1]:8000","10.0.0.1:9"]}"#).unwrap();
    let mut p = Poller::new(&cfg);
    for (idx, id, ok) in [
        (0, "[0:0:0:0:0:0:0:1]:8000", true),
        (0, "[::1]:08000", true),
        (0, "[::1]:8001", false),
        (1, "10.0.0.1:09", true),
        (1, "not an address", false),
    ] {
        p.on_sent(idx, 1, 0, 0);
        let ev = p.on_response(idx, 1, Some(200), None, Ok(&report(id, 0)));
        assert_eq!(matches!(ev, PollEvent::Ok { .. }), ok, "{id}: {ev:?}");
    }
    p.on_sent(0, 1, 0, 0);
    assert!(matches!(p.on_response(0, 1, Some(200), None, Ok(br#"{"hints":["a"]}"#)), PollEvent::Ok { .. }));
    assert_eq!(p.on_header_hints("[0::1]:8000", b"b").unwrap().hints, vec!["b"]);
}

#[test]
fn hostile_report_numbers_are_clamped_and_failing_runners_warned_at_a_bounded_rate() {
    let mut p = poller();
    p.on_sent(0, 1, 0, 0);
    let body = br#"{"runner":"127.0.0.1:1","hints":["a"],"capacity":4294967295,"max_concurrency":200000000,"in_flight":0}"#;
    let ev = p.on_response(0, 1, Some(200), None, Ok(body));
    assert_eq!(
        ev,
        PollEvent::Ok {
            recovered: true,
            truncated: 0,
            invalid: 0,
            clamped: vec!["capacity", "max_concurrency"],
            warn: true
        }
    );
    let t = p.take_table().unwrap();
    assert_eq!((t.runners[0].capacity, t.runners[0].max_concurrency), (2, report::MAX_CONCURRENCY));
    // Runner 1 never answers usefully: warned at once, then once per WARN_EVERY_MS.
    let warns: Vec<bool> = [0, 500, 29_999, 30_000, 30_500, 61_000]
        .into_iter()
        .map(|now| {
            p.on_sent(1, 9, now, 0);
            match p.on_response(1, now, Some(404), None, Ok(b"")) {
                PollEvent::Failed { warn, lost, .. } => warn && !lost,
                other => panic!("{other:?}"),
            }
        })
        .collect();
    assert_eq!(warns, vec![true, false, false, true, false, true]);
}

#[test]
fn a_runner_without_hints_is_probed_on_its_health_route_and_routed_by_its_header() {
    let cfg = Config::parse(br#"{"runners":["127.0.0.1:1"],"default_max_concurrency":1}"#).unwrap();
    let mut p = Poller::new(&cfg);
    assert_eq!(p.probe_path(0), "/hints");
    p.on_sent(0, 1, 0, 0);
    // fal's apps answer 404 on /hints (with their hints header, as on every response).
    let ev = p.on_response(0, 5, Some(404), Some(b"llama"), Ok(b"{}"));
    assert!(matches!(ev, PollEvent::Failed { .. }));
    assert_eq!((p.probe(0), p.probe_path(0)), (Some(Probe::Health), "/health"));
    assert_eq!(p.due(5), vec![0], "the health probe goes out at once");
    p.on_sent(0, 2, 5, 0);
    let ev = p.on_response(0, 6, Some(200), Some(b"llama,sdxl"), Ok(b"{\"version\":\"1\"}"));
    assert!(matches!(ev, PollEvent::Ok { recovered: true, .. }), "{ev:?}");
    let t = p.take_table().unwrap();
    let r = &t.runners[0];
    assert!(r.available);
    assert_eq!((r.hints.clone(), r.capacity, r.max_concurrency), (vec!["llama".into(), "sdxl".into()], 2, 1));
    // A probe without the header keeps the hints; a response header updates them, and
    // capacity follows the most hints ever listed.
    p.on_sent(0, 3, 600, 0);
    p.on_response(0, 601, Some(204), None, Ok(b""));
    assert!(p.take_table().is_none());
    assert!(p.on_header_hints("127.0.0.1:1", b"a,b,c").is_some());
    assert_eq!(p.take_table().unwrap().runners[0].capacity, 3);
    // A failing health probe takes it out.
    p.on_sent(0, 4, 1200, 0);
    assert!(matches!(p.on_response(0, 1201, Some(503), None, Ok(b"")), PollEvent::Failed { lost: true, .. }));
    // One that has listed nothing yet still holds one model, so it is not ranked as of
    // unknown capacity (after every other runner) and gets misses.
    let cfg = Config::parse(br#"{"runners":["127.0.0.1:1"]}"#).unwrap();
    let mut p = Poller::new(&cfg);
    p.on_sent(0, 1, 0, 0);
    p.on_response(0, 1, Some(404), None, Ok(b""));
    p.on_sent(0, 2, 1, 0);
    p.on_response(0, 2, Some(200), None, Ok(b""));
    assert_eq!(p.take_table().unwrap().runners[0].capacity, 1);
    // With no health_path, a 404 is just a failed poll.
    let cfg = Config::parse(br#"{"runners":["127.0.0.1:1"],"health_path":""}"#).unwrap();
    let mut p = Poller::new(&cfg);
    p.on_sent(0, 1, 0, 0);
    p.on_response(0, 1, Some(404), None, Ok(b""));
    assert_eq!(p.probe(0), Some(Probe::Report));
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

#[test]
fn a_reported_warm_list_is_published_capped_and_emptied_by_a_report_without_it() {
    let mut p = poller();
    p.take_table();
    let mut v: serde_json::Value = serde_json::from_slice(&body("127.0.0.1:1", &["a"])).unwrap();
    v["warm"] = serde_json::json!(["w1", "bad hint", "w2", "w3"]);
    p.on_sent(0, 1, 0, 0);
    p.on_response(0, 1, Some(200), None, Ok(&serde_json::to_vec(&v).unwrap()));
    let t = p.take_table().unwrap();
    // max_hints_per_runner is 2 here: the warm list is capped like the hints.
    assert_eq!(t.runners[0].warm, vec!["w1", "w2"]);
    assert!(t.runners[1].warm.is_empty());
    // Without the field, the list is empty again.
    p.on_sent(0, 2, 100, 0);
    p.on_response(0, 101, Some(200), None, Ok(&body("127.0.0.1:1", &["a"])));
    assert!(p.take_table().unwrap().runners[0].warm.is_empty());
}

#[test]
fn an_unchanged_body_is_applied_without_a_parse_and_as_a_parse_would() {
    let mut p = poller();
    p.take_table();
    let b = body("127.0.0.1:1", &["a", "b"]);
    p.on_sent(0, 1, 0, 0);
    let first = p.on_response(0, 1, Some(200), None, Ok(&b));
    assert!(matches!(first, PollEvent::Ok { recovered: true, .. }), "{first:?}");
    assert_eq!(p.take_table().unwrap().runners[0].hints, vec!["a", "b"]);
    // The same body again: the same answer, nothing to publish, the in-flight report kept.
    p.on_sent(0, 2, 100, 3);
    let again = p.on_response(0, 101, Some(200), None, Ok(&b));
    assert!(matches!(again, PollEvent::Ok { recovered: false, truncated: 0, invalid: 0, .. }), "{again:?}");
    assert!(p.take_table().is_none());
    assert_eq!(p.rebased_in_flight(0, 3), Some(0), "the runner's in_flight (0) plus what moved (0)");
    assert!(!p.in_flight_agrees(0), "sent at 3, reported 0");
    // A response header changes the hints: the same body then puts the report's back.
    assert!(p.on_header_hints("127.0.0.1:1", b"c").is_some());
    assert_eq!(p.take_table().unwrap().runners[0].hints, vec!["c"]);
    p.on_sent(0, 3, 200, 0);
    p.on_response(0, 201, Some(200), None, Ok(&b));
    assert_eq!(p.take_table().unwrap().runners[0].hints, vec!["a", "b"]);
    // After a failure, the same body makes it available again, with its hints.
    p.on_sent(0, 4, 300, 0);
    p.on_failure(0, 350, PollFailure::Timeout);
    let t = p.take_table().unwrap();
    assert!(!t.runners[0].available && t.runners[0].unreachable);
    p.on_sent(0, 5, 400, 0);
    let back = p.on_response(0, 401, Some(200), None, Ok(&b));
    assert!(matches!(back, PollEvent::Ok { recovered: true, .. }), "{back:?}");
    let t = p.take_table().unwrap();
    assert!(t.runners[0].available && !t.runners[0].unreachable);
    assert_eq!(t.runners[0].hints, vec!["a", "b"]);
    // A body with clamped numbers is reported as clamped every time, parsed or not.
    let mut v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    v["capacity"] = 99.into();
    let clamped = serde_json::to_vec(&v).unwrap();
    for (token, at) in [(6, 500), (7, 600)] {
        p.on_sent(0, token, at, 0);
        let ev = p.on_response(0, at + 1, Some(200), None, Ok(&clamped));
        assert!(matches!(ev, PollEvent::Ok { ref clamped, .. } if clamped == &vec!["capacity"]), "{ev:?}");
    }
    assert!(p.take_table().is_none(), "clamped to max_hints_per_runner (2), as it was");
    // Draining, twice: unavailable both times.
    v["draining"] = true.into();
    let draining = serde_json::to_vec(&v).unwrap();
    for (token, at) in [(8, 700), (9, 800)] {
        p.on_sent(0, token, at, 0);
        p.on_response(0, at + 1, Some(200), None, Ok(&draining));
        assert!(!p.take_table().is_some_and(|t| t.runners[0].available));
    }
}

/// A poller over `n` configured runners.
fn poller_of(n: usize) -> Poller {
    let runners: Vec<String> = (0..n).map(|i| format!("\"127.0.0.1:{}\"", i + 1)).collect();
    let cfg = format!(r#"{{"runners":[{}],"poll_interval_ms":100,"poll_timeout_ms":50}}"#, runners.join(","));
    Poller::new(&Config::parse(cfg.as_bytes()).unwrap())
}

/// Runner `idx` of poller `p` answers a poll listing `hints`.
fn answer(p: &mut Poller, idx: usize, token: u32, hints: &[&str]) {
    p.on_sent(idx, token, 0, 0);
    let addr = format!("127.0.0.1:{}", idx + 1);
    p.on_response(idx, 1, Some(200), None, Ok(&body(&addr, hints)));
}

#[test]
fn a_change_of_one_runner_is_published_as_that_runner_alone() {
    let mut p = poller_of(8);
    // The first publication is the whole table.
    let Some(Update::Full(t)) = p.take_update() else { panic!("the first publication is whole") };
    assert_eq!((t.generation, p.full_generation()), (1, 1));
    assert_eq!(p.take_update(), None);
    answer(&mut p, 3, 1, &["a"]);
    let Some(Update::Delta(d)) = p.take_update() else { panic!("one runner changed: a delta") };
    assert_eq!(d.generation, 2);
    assert_eq!(d.runners.len(), 1);
    assert_eq!((d.runners[0].0, d.runners[0].1.hints.clone()), (3, vec!["a".to_string()]));
    assert_eq!(p.full_generation(), 1, "a delta leaves the whole table where it was");
    // The same runner twice before a publication: listed once, as it is now.
    p.on_header_hints("127.0.0.1:4", b"b,a");
    p.on_header_hints("127.0.0.1:4", b"c,b,a");
    let Some(Update::Delta(d)) = p.take_update() else { panic!("a delta") };
    assert_eq!(d.runners.len(), 1);
    assert_eq!(d.runners[0].1.hints, ["c", "b", "a"]);
    // Half the fleet at once is still a delta; more than half, the whole table.
    for i in 0..4 {
        answer(&mut p, i, 10 + i as u32, &["w"]);
    }
    assert!(matches!(p.take_update(), Some(Update::Delta(d)) if d.runners.len() == 4));
    for i in 0..5 {
        answer(&mut p, i, 10 + i as u32, &["z"]);
    }
    assert!(matches!(p.take_update(), Some(Update::Full(t)) if t.generation == 5));
    assert_eq!(p.full_generation(), 5);
    // After a write that failed, the next publication is whole.
    answer(&mut p, 5, 20, &["y"]);
    p.publish_whole_next();
    assert!(matches!(p.take_update(), Some(Update::Full(_))));
}

#[test]
fn the_whole_table_follows_at_most_ring_minus_one_deltas() {
    let mut p = poller_of(8);
    assert!(matches!(p.take_update(), Some(Update::Full(_))));
    let mut deltas = 0;
    for k in 0..3 * RING as usize {
        p.on_header_hints("127.0.0.1:1", format!("h{k}").as_bytes());
        match p.take_update() {
            Some(Update::Delta(d)) => {
                deltas += 1;
                assert!(
                    d.generation - p.full_generation() < RING,
                    "{} after {}",
                    d.generation,
                    p.full_generation()
                );
            }
            Some(Update::Full(t)) => {
                assert_eq!(deltas, RING as usize - 1, "whole at generation {}", t.generation);
                deltas = 0;
            }
            None => panic!("a change was not published"),
        }
    }
}

#[test]
fn a_runner_taking_a_freed_slot_is_a_delta_and_a_longer_table_is_whole() {
    use crate::members::Member;
    let cfg = Config::parse(br#"{"poll_interval_ms":100,"poll_timeout_ms":50}"#).unwrap();
    let mut p = Poller::new(&cfg);
    let m = |port: u16| Member { addr: format!("127.0.0.1:{port}"), healthy: true };
    let fleet: Vec<Member> = (1..=8).map(m).collect();
    p.set_members(&fleet, 0, 100);
    assert!(matches!(p.take_update(), Some(Update::Full(t)) if t.runners.len() == 8));
    // One pod replaced by another: it takes the freed slot; one runner changed.
    let mut next = fleet.clone();
    next[2] = m(99);
    p.set_members(&next, 1, 100);
    let Some(Update::Delta(d)) = p.take_update() else { panic!("a delta") };
    assert_eq!(d.runners.len(), 1);
    assert_eq!((d.runners[0].0, d.runners[0].1.addr.as_str()), (2, "127.0.0.1:99"));
    // A response header names its runner: the one gone is unknown now, the new one is found.
    assert_eq!(p.on_header_hints("127.0.0.1:3", b"a"), None);
    assert!(p.on_header_hints("127.0.0.1:99", b"a").is_some());
    let Some(Update::Delta(d)) = p.take_update() else { panic!("a delta") };
    assert_eq!((d.runners[0].0, d.runners[0].1.hints.clone()), (2, vec!["a".to_string()]));
    // A ninth runner makes the table longer: whole.
    next.push(m(100));
    p.set_members(&next, 2, 100);
    assert!(matches!(p.take_update(), Some(Update::Full(t)) if t.runners.len() == 9));
}
