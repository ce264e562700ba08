//! The poller's reading of a runner's `/hints` body: hostile input, parsed in one pass.
//!
//! A runner (or anything answering on its port) controls every byte of the body, so this
//! parser never allocates more than the body itself and never trusts a number:
//!
//! * `hints` is streamed: each entry is classified as it is read (borrowed from the body when
//!   it has no JSON escapes), repeats of a kept hint are dropped, and entries past the cap
//!   are counted, not stored. A body of a million entries costs one pass and `cap` strings.
//! * Every other field is optional (runners that report only their hints are welcome):
//!   `runner` (identity; checked only when present), `capacity`, `max_concurrency`,
//!   `in_flight` (defaults in [`Defaults`]), `draining`, `queue_token`, and `warm` (streamed
//!   and capped as `hints` are). Other fields, including `loading`, are skipped without being
//!   built.
//! * Numbers must be non-negative integers (else the report is rejected); values above the
//!   bounds below are clamped, and the clamp is reported so the caller can count and log it.

use crate::hint::{classify, HintClass, HintList};
use rustc_hash::FxBuildHasher;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

/// Largest `max_concurrency` believed; more is clamped (a runner claiming millions of slots
/// would never look busy).
pub const MAX_CONCURRENCY: u32 = 100_000;
/// Largest `in_flight` believed.
pub const MAX_IN_FLIGHT: u32 = 1_000_000;

/// What the router assumes for fields a report leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    /// Cache capacity in models (0 = unknown).
    pub capacity: u32,
    /// Inferences at once.
    pub max_concurrency: u32,
}

/// Limits applied while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest hint kept, in bytes.
    pub max_hint_bytes: usize,
    /// Most hints kept; also the largest `capacity` believed (the router cannot track more
    /// models per runner than it keeps hints for).
    pub max_hints: usize,
}

/// A parsed, bounded report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The identity the runner gave, if any (as sent; compare canonical forms).
    pub runner: Option<String>,
    /// Its hints, sanitised and capped.
    pub hints: HintList,
    /// The models it reports `warm` (loadable from host memory), sanitised and capped as
    /// `hints` (empty when absent).
    pub warm: HintList,
    /// Cache capacity (0 = unknown), clamped to [`Limits::max_hints`].
    pub capacity: u32,
    /// Inferences at once, in `1..=MAX_CONCURRENCY`.
    pub max_concurrency: u32,
    /// Requests in progress on the runner, if it said (clamped to [`MAX_IN_FLIGHT`]).
    pub in_flight: Option<u32>,
    /// The runner is shutting down.
    pub draining: bool,
    /// Its fal queue token (docs/queue.md), when it reported a well-formed one.
    pub queue_token: Option<u64>,
    /// Fields whose values were out of bounds and clamped, or unusable and ignored
    /// (`queue_token`); empty for an honest runner.
    pub clamped: Vec<&'static str>,
}

/// Parses a `/hints` body. `Err` carries a short reason (for the log and the stat).
pub fn parse(body: &[u8], limits: Limits, defaults: Defaults) -> Result<Report, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let raw = ReportSeed { limits }.deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    let Some(hints) = raw.hints else {
        return Err("missing field `hints`".into());
    };
    let mut clamped = Vec::new();
    let mut bound = |field: &'static str, v: Option<u64>, lo: u32, hi: u32, default: u32| match v {
        None => default,
        Some(v) if v > u64::from(hi) => {
            clamped.push(field);
            hi
        }
        Some(v) => (v as u32).max(lo),
    };
    let max_hints = u32::try_from(limits.max_hints).unwrap_or(u32::MAX);
    let capacity = bound("capacity", raw.capacity, 0, max_hints, defaults.capacity.min(max_hints));
    let max_concurrency = bound(
        "max_concurrency",
        raw.max_concurrency,
        1,
        MAX_CONCURRENCY,
        defaults.max_concurrency.clamp(1, MAX_CONCURRENCY),
    );
    let in_flight = raw.in_flight.map(|v| bound("in_flight", Some(v), 0, MAX_IN_FLIGHT, 0));
    let queue_token = match raw.queue_token {
        None => None,
        Some(t) => {
            let token = crate::queue::parse_token(t.as_bytes());
            if token.is_none() {
                // Not a token this router can map ids to: the runner gets no queue jobs.
                clamped.push("queue_token");
            }
            token
        }
    };
    Ok(Report {
        runner: raw.runner,
        hints,
        warm: raw.warm.unwrap_or_default(),
        capacity,
        max_concurrency,
        in_flight,
        draining: raw.draining.unwrap_or(false),
        queue_token,
        clamped,
    })
}

/// The fields as read, before defaults and bounds.
#[derive(Default)]
struct RawReport {
    runner: Option<String>,
    hints: Option<HintList>,
    warm: Option<HintList>,
    capacity: Option<u64>,
    max_concurrency: Option<u64>,
    in_flight: Option<u64>,
    draining: Option<bool>,
    queue_token: Option<String>,
}

struct ReportSeed {
    limits: Limits,
}

impl<'de> DeserializeSeed<'de> for ReportSeed {
    type Value = RawReport;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RawReport, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ReportSeed {
    type Value = RawReport;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a /hints object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawReport, A::Error> {
        let mut r = RawReport::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "runner" => r.runner = Some(map.next_value()?),
                "hints" => r.hints = Some(map.next_value_seed(HintsSeed { limits: self.limits })?),
                "warm" => r.warm = Some(map.next_value_seed(HintsSeed { limits: self.limits })?),
                "capacity" => r.capacity = Some(map.next_value()?),
                "max_concurrency" => r.max_concurrency = Some(map.next_value()?),
                "in_flight" => r.in_flight = Some(map.next_value()?),
                "draining" => r.draining = Some(map.next_value()?),
                "queue_token" => r.queue_token = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(r)
    }
}

/// Streams the `hints` array into a capped [`HintList`].
struct HintsSeed {
    limits: Limits,
}

impl<'de> DeserializeSeed<'de> for HintsSeed {
    type Value = HintList;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<HintList, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for HintsSeed {
    type Value = HintList;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of hint strings")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<HintList, A::Error> {
        let mut out = HintList::default();
        let mut kept: HashSet<Cow<'de, str>, FxBuildHasher> = HashSet::default();
        while let Some(item) = seq.next_element::<Cow<'de, str>>()? {
            match classify(Some(item.as_bytes()), self.limits.max_hint_bytes) {
                HintClass::Absent => {}
                HintClass::Invalid(_) => out.invalid += 1,
                HintClass::Valid(h) if kept.contains(h) => {}
                // Past the cap entries are counted without remembering them (that would
                // cost memory in proportion to the body).
                HintClass::Valid(_) if out.hints.len() >= self.limits.max_hints => out.truncated += 1,
                HintClass::Valid(h) => {
                    out.hints.push(h.to_string());
                    // `classify` trims spaces; remember the trimmed form.
                    let trimmed = h.len() != item.len();
                    kept.insert(if trimmed { Cow::Owned(h.to_string()) } else { item });
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const LIMITS: Limits = Limits { max_hint_bytes: 16, max_hints: 4 };
    const DEFAULTS: Defaults = Defaults { capacity: 0, max_concurrency: 1 };

    fn ok(body: &str) -> Report {
        parse(body.as_bytes(), LIMITS, DEFAULTS).unwrap()
    }

    #[test]
    fn only_hints_is_required() {
        let r = ok(r#"{"hints":["a","b"]}"#);
        assert_eq!(r.hints.hints, vec!["a", "b"]);
        assert_eq!(
            (r.runner, r.capacity, r.max_concurrency, r.in_flight, r.draining),
            (None, 0, 1, None, false)
        );
        let d = Defaults { capacity: 3, max_concurrency: 2 };
        let r = parse(br#"{"hints":[]}"#, LIMITS, d).unwrap();
        assert_eq!((r.capacity, r.max_concurrency), (3, 2));
        let e = parse(br#"{"runner":"127.0.0.1:1","capacity":3}"#, LIMITS, DEFAULTS).unwrap_err();
        assert!(e.contains("hints"), "{e}");
    }

    #[test]
    fn a_full_report_is_read_and_unknown_fields_skipped() {
        let r = ok(r#"{"runner":"127.0.0.1:1","hints":["a"],"loading":["a"],"capacity":3,"in_flight":2,
            "max_concurrency":4,"draining":true,"future":{"deep":[1,2,{"x":null}]}}"#);
        assert_eq!(r.runner.as_deref(), Some("127.0.0.1:1"));
        assert_eq!((r.capacity, r.max_concurrency, r.in_flight, r.draining), (3, 4, Some(2), true));
        assert!(r.clamped.is_empty());
    }

    #[test]
    fn hostile_numbers_are_clamped_and_reported() {
        let r = ok(
            r#"{"hints":[],"capacity":4294967295,"max_concurrency":18446744073709551615,"in_flight":99999999999}"#,
        );
        assert_eq!((r.capacity, r.max_concurrency, r.in_flight), (4, MAX_CONCURRENCY, Some(MAX_IN_FLIGHT)));
        assert_eq!(r.clamped, vec!["capacity", "max_concurrency", "in_flight"]);
        // 0 slots would make it always busy: at least 1.
        assert_eq!(ok(r#"{"hints":[],"max_concurrency":0}"#).max_concurrency, 1);
        // Not a non-negative integer: the report is rejected.
        for bad in [
            r#"{"hints":[],"capacity":-1}"#,
            r#"{"hints":[],"capacity":2e8}"#,
            r#"{"hints":[],"capacity":1.5}"#,
            r#"{"hints":[],"capacity":"3"}"#,
            r#"{"hints":[],"in_flight":1e400}"#,
            r#"{"hints":[],"max_concurrency":184467440737095516150}"#,
        ] {
            assert!(parse(bad.as_bytes(), LIMITS, DEFAULTS).is_err(), "{bad}");
        }
    }

    #[test]
    fn hints_are_streamed_sanitised_and_capped() {
        let r = ok(r#"{"hints":["a"," a ","bad hint","x\"y","b","a","c","d","e","f","e"]}"#);
        assert_eq!(r.hints.hints, vec!["a", "x\"y", "b", "c"]);
        // Past the cap, repeats are not recognised: d, e, f, e count 4.
        assert_eq!((r.hints.invalid, r.hints.truncated), (1, 4));
        for bad in
            [r#"{"hints":"a"}"#, r#"{"hints":[1]}"#, r#"{"hints":[["a"]]}"#, r#"[]"#, r#"{"hints":[]} x"#]
        {
            assert!(parse(bad.as_bytes(), LIMITS, DEFAULTS).is_err(), "{bad}");
        }
    }

    #[test]
    fn warm_is_optional_and_read_like_hints() {
        assert!(ok(r#"{"hints":["a"]}"#).warm.hints.is_empty());
        let r = ok(r#"{"hints":["a"],"warm":["b","bad hint","b","c","d","e","f"]}"#);
        assert_eq!(r.warm.hints, vec!["b", "c", "d", "e"]);
        assert_eq!((r.warm.invalid, r.warm.truncated), (1, 1));
        assert!(r.hints.invalid == 0 && r.hints.truncated == 0);
        for bad in [r#"{"hints":[],"warm":"a"}"#, r#"{"hints":[],"warm":[1]}"#, r#"{"hints":[],"warm":null}"#]
        {
            assert!(parse(bad.as_bytes(), LIMITS, DEFAULTS).is_err(), "{bad}");
        }
    }

    #[test]
    fn three_hundred_thousand_entries_keep_only_the_cap() {
        let mut body = String::from(r#"{"hints":["#);
        for i in 0..300_000 {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&format!("\"h{i}\""));
        }
        body.push_str("]}");
        let r = parse(body.as_bytes(), LIMITS, DEFAULTS).unwrap();
        assert_eq!(r.hints.hints, vec!["h0", "h1", "h2", "h3"]);
        assert_eq!(r.hints.truncated, 299_996);
    }
}
