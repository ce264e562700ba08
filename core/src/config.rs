//! The plugin configuration (JSON), shared by the filter and the poller service.
//!
//! Parsing rejects unknown fields; [`Config::parse`] then validates every value and names the
//! offending field in its error, so Envoy refuses a bad config with a message that says what
//! to fix.

use serde::Deserialize;
use std::collections::HashSet;
use std::fmt;

/// Most runners one filter instance tracks.
pub const MAX_RUNNERS: usize = 10_000;

/// The validated configuration. See `docs/config.md` for every field.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Request header carrying the client's hint.
    pub hint_header: String,
    /// Response header in which runners list their hints.
    pub runner_hints_header: String,
    /// Request header the filter writes its ordered candidate list (`ip:port,ip:port`) to.
    /// Envoy's `header_to_metadata` filter moves it into `envoy.lb` metadata for the
    /// `override_host` LB policy.
    pub pick_header: String,
    /// Header the poller sets on each `/hints` call to pin it to one runner (read by the
    /// poll cluster's `override_host` policy).
    pub poll_target_header: String,
    /// Cluster the poller sends `/hints` calls through.
    pub poll_cluster: String,
    /// Path polled on every runner.
    pub poll_path: String,
    /// Path probed instead on a runner whose `poll_path` answered 404 (a header-only runner,
    /// e.g. a fal app: `GET /health`); empty: no fallback, a 404 is a failed poll.
    pub health_path: String,
    /// Runner addresses (`ip:port`), exactly the members of the runners cluster. Empty (the
    /// default): the runners are the hosts of `cluster`, as Envoy's admin API lists them
    /// through `admin_cluster` (STATIC, STRICT_DNS and EDS clusters alike).
    pub runners: Vec<String>,
    /// The cluster whose hosts are the runners (when `runners` is empty).
    pub cluster: String,
    /// A cluster reaching this Envoy's own admin listener, through which the poller reads
    /// `cluster`'s hosts and their health every `poll_interval_ms` (when `runners` is empty).
    pub admin_cluster: String,
    /// How often each runner is polled.
    pub poll_interval_ms: u64,
    /// Timeout of one poll; must be below `poll_interval_ms`.
    pub poll_timeout_ms: u64,
    /// Longest accepted hint, in bytes.
    pub max_hint_bytes: usize,
    /// Most hints kept per runner; extra ones are dropped and counted.
    pub max_hints_per_runner: usize,
    /// Largest `/hints` body read; larger ones count as a failed poll.
    pub max_hints_body_bytes: usize,
    /// Length of the candidate list handed to Envoy (first = pick, rest = retry order).
    pub max_candidates: usize,
    /// Learn hints from the runner hints response header as well as from polling.
    pub learn_from_responses: bool,
    /// Add `x-hint-router-decision` and `x-hint-router-upstream` to responses (debugging;
    /// reveals runner addresses to clients).
    pub debug_headers: bool,
    /// Testing only: a request whose hint is exactly this value makes the filter abort its
    /// VM, so operators can check what their `failure_policy` does. Unset by default.
    pub failure_test_hint: Option<String>,
    /// Cache capacity (models) assumed for a runner whose `/hints` omits `capacity`
    /// (0 = unknown).
    pub default_capacity: u32,
    /// Inferences at once assumed for a runner whose `/hints` omits `max_concurrency`
    /// (fal's `max_multiplexing` defaults to 1).
    pub default_max_concurrency: u32,
    /// What a request does when every runner holding its model is busy: `"any_available"`
    /// (go at once to another runner, fal's rule) or `"fastest"` (go where it is expected to
    /// finish first, from learned load and inference times). Any other value is rejected.
    pub when_holders_busy: crate::router::WhenHoldersBusy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hint_header: "x-fal-runner-hint".into(),
            runner_hints_header: "x-fal-runner-hints".into(),
            pick_header: "x-hint-router-pick".into(),
            poll_target_header: "x-hint-router-poll-target".into(),
            poll_cluster: "hint_router_poll".into(),
            poll_path: "/hints".into(),
            health_path: "/health".into(),
            runners: Vec::new(),
            cluster: "runners".into(),
            admin_cluster: "hint_router_admin".into(),
            poll_interval_ms: 500,
            poll_timeout_ms: 400,
            max_hint_bytes: 256,
            max_hints_per_runner: 64,
            max_hints_body_bytes: 4 << 20,
            max_candidates: 3,
            learn_from_responses: true,
            debug_headers: false,
            failure_test_hint: None,
            default_capacity: 0,
            default_max_concurrency: 1,
            when_holders_busy: crate::router::WhenHoldersBusy::default(),
        }
    }
}

/// A configuration error naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field (e.g. `runners[2]`), or `(json)` for a syntax or type error.
    pub field: String,
    /// What is wrong and what is accepted.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hint-router config: field `{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { field: field.into(), message: message.into() }
}

impl Config {
    /// Parses and validates the plugin configuration bytes. Empty input is an error (not a
    /// JSON object); `{}` is valid: every field has a default.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let cfg: Config = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "(json)".to_string() } else { path };
            err(field, e.into_inner().to_string())
        })?;
        de.end().map_err(|e| err("(json)", e.to_string()))?;
        let mut cfg = cfg;
        cfg.validate()?;
        // One spelling per runner from here on (validate checked every entry parses).
        for r in &mut cfg.runners {
            if let Some(c) = crate::addr::canonical(r) {
                *r = c;
            }
        }
        Ok(cfg)
    }

    /// Checks every value; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("hint_header", &self.hint_header),
            ("runner_hints_header", &self.runner_hints_header),
            ("pick_header", &self.pick_header),
            ("poll_target_header", &self.poll_target_header),
        ] {
            check_header_name(field, value)?;
        }
        if self.pick_header == self.hint_header {
            return Err(err("pick_header", "must differ from hint_header"));
        }
        if self.poll_cluster.is_empty() {
            return Err(err("poll_cluster", "must name a cluster"));
        }
        if !self.poll_path.starts_with('/') || !self.poll_path.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(err("poll_path", "must start with '/' and be visible ASCII"));
        }
        if !self.health_path.is_empty()
            && (!self.health_path.starts_with('/')
                || !self.health_path.bytes().all(|b| (0x21..=0x7e).contains(&b)))
        {
            return Err(err("health_path", "must be empty or start with '/' and be visible ASCII"));
        }
        if self.runners.is_empty() {
            if self.cluster.is_empty()
                || self.cluster.len() > 256
                || !self.cluster.bytes().all(|b| (0x21..=0x7e).contains(&b))
            {
                return Err(err("cluster", "must name the runners cluster (1-256 bytes of visible ASCII)"));
            }
            if self.admin_cluster.is_empty() {
                return Err(err("admin_cluster", "must name a cluster that reaches Envoy's admin listener"));
            }
        }
        if self.runners.len() > MAX_RUNNERS {
            return Err(err("runners", format!("at most {MAX_RUNNERS} runners")));
        }
        let mut seen = HashSet::new();
        for (i, r) in self.runners.iter().enumerate() {
            let Some(c) = crate::addr::canonical(r) else {
                return Err(err(format!("runners[{i}]"), format!("{r:?} is not an ip:port address")));
            };
            if !seen.insert(c) {
                return Err(err(
                    format!("runners[{i}]"),
                    format!("{r:?} is listed twice (same address as an earlier entry)"),
                ));
            }
        }
        range("poll_interval_ms", self.poll_interval_ms, 10, 3_600_000)?;
        range("poll_timeout_ms", self.poll_timeout_ms, 5, 3_600_000)?;
        if self.poll_timeout_ms >= self.poll_interval_ms {
            return Err(err("poll_timeout_ms", "must be below poll_interval_ms"));
        }
        range("max_hint_bytes", self.max_hint_bytes as u64, 1, 8192)?;
        range("max_hints_per_runner", self.max_hints_per_runner as u64, 1, 100_000)?;
        range("max_hints_body_bytes", self.max_hints_body_bytes as u64, 256, 32 << 20)?;
        range("max_candidates", self.max_candidates as u64, 1, 64)?;
        range("default_capacity", u64::from(self.default_capacity), 0, self.max_hints_per_runner as u64)?;
        range(
            "default_max_concurrency",
            u64::from(self.default_max_concurrency),
            1,
            u64::from(crate::report::MAX_CONCURRENCY),
        )?;
        if let Some(h) = &self.failure_test_hint {
            if !matches!(
                crate::hint::classify(Some(h.as_bytes()), self.max_hint_bytes),
                crate::hint::HintClass::Valid(_)
            ) {
                return Err(err("failure_test_hint", "must be a valid hint"));
            }
        }
        Ok(())
    }
}

fn range(field: &str, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        return Err(err(field, format!("{v} is out of range {lo}..={hi}")));
    }
    Ok(())
}

fn check_header_name(field: &str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty()
        && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(err(field, format!("{v:?} is not a lower-case header name")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn field_of(json: &str) -> String {
        Config::parse(json.as_bytes()).unwrap_err().field
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(br#"{"runners":["127.0.0.1:1","[::1]:2"]}"#).unwrap();
        assert_eq!(c.hint_header, "x-fal-runner-hint");
        assert_eq!(c.max_candidates, 3);
        assert_eq!(c.runners.len(), 2);
    }

    #[test]
    fn runner_addresses_are_canonical_and_spellings_of_one_runner_are_duplicates() {
        let c = Config::parse(br#"{"runners":["[0:0:0:0:0:0:0:1]:8000","10.0.0.1:08001"]}"#).unwrap();
        assert_eq!(c.runners, vec!["[::1]:8000", "10.0.0.1:8001"]);
        for dup in [
            r#"{"runners":["[::1]:8000","[0:0:0:0:0:0:0:1]:8000"]}"#,
            r#"{"runners":["10.0.0.1:8000","10.0.0.1:08000"]}"#,
        ] {
            let e = Config::parse(dup.as_bytes()).unwrap_err();
            assert_eq!(e.field, "runners[1]", "{dup}");
            assert!(e.message.contains("twice"), "{e}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert!(Config::parse(b"{}").unwrap().runners.is_empty(), "discovery from the runners cluster");
        assert_eq!(field_of(r#"{"cluster":""}"#), "cluster");
        assert_eq!(field_of(r#"{"admin_cluster":""}"#), "admin_cluster");
        assert_eq!(field_of(r#"{"runners":["127.0.0.1:1","nope"]}"#), "runners[1]");
        assert_eq!(field_of(r#"{"runners":["127.0.0.1:1","127.0.0.1:1"]}"#), "runners[1]");
        assert_eq!(field_of(r#"{"runners":["127.0.0.1:1"],"poll_interval_ms":1}"#), "poll_interval_ms");
        assert_eq!(
            field_of(r#"{"runners":["127.0.0.1:1"],"poll_interval_ms":100,"poll_timeout_ms":100}"#),
            "poll_timeout_ms"
        );
        assert_eq!(field_of(r#"{"runners":["127.0.0.1:1"],"hint_header":"X Bad"}"#), "hint_header");
        assert_eq!(field_of(r#"{"runners":["127.0.0.1:1"],"max_candidates":0}"#), "max_candidates");
        assert_eq!(field_of(r#"{"runners":["127.0.0.1:1"],"poll_path":"hints"}"#), "poll_path");
        assert_eq!(
            field_of(r#"{"runners":["127.0.0.1:1"],"pick_header":"x-fal-runner-hint"}"#),
            "pick_header"
        );
    }

    #[test]
    fn unknown_and_mistyped_fields_are_named_in_the_message() {
        let e = Config::parse(br#"{"runners":["127.0.0.1:1"],"pol_interval_ms":5}"#).unwrap_err();
        assert!(e.message.contains("pol_interval_ms"), "{e}");
        assert_eq!(field_of(r#"{"runners":["127.0.0.1:1"],"max_candidates":"3"}"#), "max_candidates");
        assert_eq!(field_of(r#"{"runners":["127.0.0.1:1", 7]}"#), "runners[1]");
        assert!(Config::parse(b"").is_err());
        // when_holders_busy: the two modes, nothing else.
        use crate::router::WhenHoldersBusy;
        let mode = |v: &str| {
            Config::parse(format!(r#"{{"runners":["127.0.0.1:1"],"when_holders_busy":{v}}}"#).as_bytes())
        };
        assert_eq!(mode(r#""any_available""#).unwrap().when_holders_busy, WhenHoldersBusy::AnyAvailable);
        assert_eq!(mode(r#""fastest""#).unwrap().when_holders_busy, WhenHoldersBusy::Fastest);
        for bad in [r#""Fastest""#, r#""""#, "1", "null"] {
            let e = mode(bad).unwrap_err();
            assert_eq!(e.field, "when_holders_busy", "{bad}: {e}");
        }
        assert!(mode(r#""nope""#).unwrap_err().message.contains("any_available"));
        assert!(Config::parse(b"\xff\xfe").is_err());
    }
}
