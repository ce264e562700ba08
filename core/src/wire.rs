//! The `/hints` document a runner serves, and the runner's response header format.
//!
//! Both `runner-example` and the filter's poller use these types, so the two sides of the
//! protocol cannot drift apart.

use serde::{Deserialize, Serialize};

/// Default response header a runner lists its hints in (fal's `provide_hints()` result).
pub const RUNNER_HINTS_HEADER: &str = "x-fal-runner-hints";
/// Default request header carrying the client's routing hint (fal_client's `hint=`).
pub const RUNNER_HINT_HEADER: &str = "x-fal-runner-hint";
/// Response header a runner names itself in (its listen address).
pub const RUNNER_ID_HEADER: &str = "x-runner-id";
/// Response header with the runner's requests and jobs in progress as the response starts, the
/// request answered excluded (`/hints` `in_flight`, between polls). Optional.
pub const RUNNER_IN_FLIGHT_HEADER: &str = "x-runner-in-flight";
/// Response header of an inference answer: milliseconds the inference took (the runner's own
/// measure, free of queueing and network). Optional; the queue filter learns times from it.
pub const RUNNER_INFER_MS_HEADER: &str = "x-runner-infer-ms";
/// Response header of an inference answer that waited for its model to load: how long, in
/// milliseconds. Optional.
pub const RUNNER_LOAD_MS_HEADER: &str = "x-runner-load-ms";
/// Response header saying whether the request found its model loaded (`hit`) or not (`miss`).
pub const CACHE_HEADER: &str = "x-cache";

/// Body of `GET /hints` on a runner.
///
/// Unknown fields are ignored, so runners may report more than this (and newer runners stay
/// compatible with older filters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintsReport {
    /// The runner's identity: the `ip:port` it is reached at. The poller checks it equals the
    /// address it polled, so a mis-wired cluster cannot attribute hints to the wrong runner.
    pub runner: String,
    /// Hints this runner can serve now or very soon: its resident and loading models (and, from
    /// `runner-example`, models queued to load when a cache slot frees).
    pub hints: Vec<String>,
    /// Models being loaded right now (a subset of `hints`).
    #[serde(default)]
    pub loading: Vec<String>,
    /// How many models its cache holds at most.
    pub capacity: u32,
    /// Requests in progress on the runner (queued or running).
    pub in_flight: u32,
    /// How many inferences it runs at once; more requests queue on the runner.
    pub max_concurrency: u32,
    /// The runner is shutting down: send it nothing new.
    #[serde(default)]
    pub draining: bool,
    /// Bytes of model weights resident in memory (real backends only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident_bytes: Option<u64>,
    /// The memory budget of the cache in bytes, when the runner has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_budget_bytes: Option<u64>,
    /// Models not resident (not in `hints`) that the runner can load cheaply, from host
    /// memory instead of disk (its warm tier), most recently used first. Advisory: a miss there
    /// costs a host-to-device copy instead of a disk read and checks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warm: Vec<String>,
    /// Present when the runner serves fal's queue (docs/queue.md): 16 lowercase hex digits,
    /// random per process start, that begin every request id it issues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_token: Option<String>,
}

/// Formats hints as the `x-fal-runner-hints` header value: `a,b,c` (empty string for none).
pub fn format_hints_header<S: AsRef<str>>(hints: &[S]) -> String {
    let mut out = String::new();
    for (i, h) in hints.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(h.as_ref());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn report_round_trips_and_ignores_unknown_fields() {
        let body = br#"{"runner":"127.0.0.1:1","hints":["a"],"capacity":3,"in_flight":1,
            "max_concurrency":2,"future_field":{"x":1}}"#;
        let r: HintsReport = serde_json::from_slice(body).unwrap();
        assert_eq!(r.runner, "127.0.0.1:1");
        assert_eq!(r.hints, vec!["a".to_string()]);
        assert!(r.loading.is_empty());
        assert!(!r.draining);
        let again: HintsReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn header_format() {
        assert_eq!(format_hints_header::<&str>(&[]), "");
        assert_eq!(format_hints_header(&["a", "b"]), "a,b");
    }
}
