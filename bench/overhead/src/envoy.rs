//! The Envoy configurations compared, all rendered from the shipped `envoy/envoy.yaml` by the
//! e2e harness, so that they differ only in the wasm filter:
//!
//! * (a) `no-filter`: the hint-router wasm filter and its poller service removed. The native
//!   filters (header_mutation, header_to_metadata, router) and the runners cluster with its
//!   `override_host` policy stay.
//! * (b) `noop-wasm`: the hint-router filter replaced by `bench/noop-filter` (reads one header);
//!   no poller service.
//! * (p) (b) that also sets the pick header to the two runners hint-router would list: the
//!   native cost of steering (header_to_metadata, the override_host policy).
//! * (c)/(d)/(e) `hint-router`: the shipped config as is, with `debug_headers: false` (the
//!   production setting) and `max_hints_per_runner: 100`; with 1,000 runners also
//!   `poll_interval_ms: 10000`, `poll_timeout_ms: 9000` (see [`options`]).

use crate::fixture::HINTS_PER_RUNNER;
use crate::proc;
use anyhow::{bail, Context, Result};
use hint_router_e2e::{render_config, repo_root, wasm_path, Envoy, EnvoyOptions};
use std::path::PathBuf;

/// Which filter setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// (a) no wasm filter.
    NoFilter,
    /// (b) the no-op wasm filter.
    Noop,
    /// (p) the no-op wasm filter setting a fixed pick (`x-hint-router-pick`) like
    /// hint-router's: what steering costs Envoy natively.
    NoopPick,
    /// (c), (d) hint-router.
    HintRouter,
}

/// One configuration of the comparison.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// Short label: a, b, c, d.
    pub label: &'static str,
    /// What it is.
    pub name: &'static str,
    /// The filter setup.
    pub variant: Variant,
    /// Runners in the cluster (and the filter's `runners`).
    pub runners: usize,
    /// Use [`before_wasm_path`] instead of the built filter (for before/after comparisons).
    pub before: bool,
    /// Runner 0 swaps a hint this often (ms; 0 = never), so tables keep being republished
    /// and reloaded while load runs.
    pub churn_ms: u64,
}

/// The setups: the default six, then `c0`/`d0`/`e0`, which run the module saved at
/// [`before_wasm_path`] (only when asked for with `--setups`).
pub const SETUPS: [Setup; 9] = [
    setup("a", "no wasm filter", Variant::NoFilter, 8, false, 0),
    setup("b", "no-op wasm filter", Variant::Noop, 8, false, 0),
    setup("p", "no-op wasm + fixed pick", Variant::NoopPick, 8, false, 0),
    setup("c", "hint-router, 8 runners", Variant::HintRouter, 8, false, 0),
    setup("d", "hint-router, 1000 runners", Variant::HintRouter, 1000, false, 0),
    setup("e", "d + table change / 250 ms", Variant::HintRouter, 1000, false, 250),
    setup("c0", "before: 8 runners", Variant::HintRouter, 8, true, 0),
    setup("d0", "before: 1000 runners", Variant::HintRouter, 1000, true, 0),
    setup("e0", "before: d + change / 250 ms", Variant::HintRouter, 1000, true, 250),
];

const fn setup(
    label: &'static str,
    name: &'static str,
    variant: Variant,
    runners: usize,
    before: bool,
    churn_ms: u64,
) -> Setup {
    Setup { label, name, variant, runners, before, churn_ms }
}

/// How many of [`SETUPS`] run by default.
pub const DEFAULT_SETUPS: usize = 6;

/// A saved earlier build of the filter, for before/after runs (`c0`, `d0`, `e0`):
/// `$BEFORE_WASM`, else `target/bench/hint_router.before.wasm`.
pub fn before_wasm_path() -> PathBuf {
    std::env::var_os("BEFORE_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/bench/hint_router.before.wasm"))
}

/// The no-op filter module.
pub fn noop_wasm_path() -> PathBuf {
    repo_root().join("target/wasm32-wasip1/release/noop_filter.wasm")
}

const WASM_FILTER_START: &str = "          - name: envoy.filters.http.wasm\n";
const WASM_FILTER_END: &str = "          - &pick_to_metadata_filter\n";
/// fal's queue listener: it has its own hint-router filter, so the other setups drop it.
const QUEUE_LISTENER_START: &str = "  # fal_client's queue door";
const QUEUE_LISTENER_END: &str = "  clusters:\n";
const BOOTSTRAP_START: &str = "bootstrap_extensions:\n";
const BOOTSTRAP_END: &str = "static_resources:\n";

fn block<'a>(text: &'a str, start: &str, end: &str) -> Result<&'a str> {
    let s = text.find(start).with_context(|| format!("{start:?} not in the rendered config"))?;
    let len =
        text.get(s..).and_then(|t| t.find(end)).with_context(|| format!("{end:?} not after {start:?}"))?;
    text.get(s..s + len).context("block bounds")
}

/// Harness options for `setup` in front of `runners`.
/// `extra` plugin members (JSON values) apply to the hint-router setups, after the defaults.
pub fn options(setup: &Setup, runners: &[String], extra: &[(String, String)]) -> Result<EnvoyOptions> {
    // The production config: what users run (no debug headers, runner headers stripped).
    let mut opts = EnvoyOptions { concurrency: 1, ..EnvoyOptions::production() };
    if setup.variant == Variant::HintRouter {
        opts.plugin = vec![
            ("debug_headers".into(), "false".into()),
            ("max_hints_per_runner".into(), HINTS_PER_RUNNER.to_string()),
        ];
        if setup.runners > 100 {
            // The poller publishes the whole table after every poll response that changes
            // anything; with 1,000 runners the startup burst then keeps the main thread busy
            // for seconds, 400 ms polls time out, runners flap and each flap publishes again
            // (seen on this 2-core machine: it does not converge). Slower polls give the
            // startup room; hint changes still arrive at once through response headers.
            opts.plugin.push(("poll_interval_ms".into(), "10000".into()));
            opts.plugin.push(("poll_timeout_ms".into(), "9000".into()));
        }
        opts.plugin.extend(extra.iter().cloned());
        if setup.before {
            opts.replace =
                vec![(wasm_path().display().to_string(), before_wasm_path().display().to_string())];
        }
        return Ok(opts);
    }
    let text = render_config(runners, 10000, 9901, &opts);
    let wasm = block(&text, WASM_FILTER_START, WASM_FILTER_END)?.to_string();
    let noop = format!(
        "{WASM_FILTER_START}            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: noop
                root_id: noop
                vm_config:
                  vm_id: noop
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: {}}}}}
                failure_policy: FAIL_RELOAD
{}",
        noop_wasm_path().display(),
        if setup.variant == Variant::NoopPick {
            // The list hint-router writes for the benchmark's hinted request: both holders.
            let first = runners.first().map(String::as_str).unwrap_or_default();
            let last = runners.last().map(String::as_str).unwrap_or_default();
            format!(
                "                configuration:
                  \"@type\": type.googleapis.com/google.protobuf.StringValue
                  value: \"x-hint-router-pick={first},{last}\"
"
            )
        } else {
            String::new()
        }
    );
    let filter = if setup.variant == Variant::NoFilter { String::new() } else { noop };
    opts.replace = vec![(wasm, filter)];
    // Cut by markers, not replaced by text: the queue listener holds a port the harness picks
    // when it starts Envoy, which differs from this render's.
    opts.cut = vec![
        (BOOTSTRAP_START.into(), BOOTSTRAP_END.into()),
        (QUEUE_LISTENER_START.into(), QUEUE_LISTENER_END.into()),
    ];
    Ok(opts)
}

/// A started Envoy and its pid.
pub struct Running {
    /// The harness handle (kills Envoy on drop).
    pub envoy: Envoy,
    /// Envoy's pid.
    pub pid: u32,
    /// The worker thread's id (`wrk:worker_0`), when found.
    pub worker_tid: Option<u32>,
}

/// Starts Envoy for `setup` in front of `runners`. With `pin = Some((w, r))` its worker
/// thread runs on CPU `w` and its other threads (main: polls, health checks, admin) on `r`.
pub fn start(
    setup: &Setup,
    runners: &[String],
    pin: Option<(usize, usize)>,
    extra: &[(String, String)],
) -> Result<Running> {
    if matches!(setup.variant, Variant::Noop | Variant::NoopPick) && !noop_wasm_path().exists() {
        bail!(
            "{} missing: cargo build --release --target wasm32-wasip1 -p noop-filter",
            noop_wasm_path().display()
        );
    }
    if setup.before && !before_wasm_path().exists() {
        bail!("{} missing: save an earlier build of hint_router.wasm there", before_wasm_path().display());
    }
    let opts = options(setup, runners, extra)?;
    let expect = if setup.variant == Variant::HintRouter { runners.len() as u64 } else { 0 };
    let envoy = Envoy::start(runners, &opts, expect);
    let pid = proc::find_pid_with_arg(&envoy.dir.join("envoy.yaml"))?;
    let threads = proc::threads(pid)?;
    let worker_tid = threads.iter().find(|(_, n)| n.starts_with("wrk:worker")).map(|(t, _)| *t);
    if let Some((worker, rest)) = pin {
        proc::pin_process(pid, rest)?;
        if let Some(tid) = worker_tid {
            proc::pin(tid, worker)?;
        }
    }
    Ok(Running { envoy, pid, worker_tid })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn configs_differ_only_in_the_wasm_filter() {
        let runners = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        // Other TLS and queue ports than the shipped ones, as the harness picks when it starts
        // Envoy: the cuts must not depend on them.
        let render = |s: &Setup| {
            hint_router_e2e::render_config_tls(&runners, 1, 2, (3, 4), &options(s, &runners, &[]).unwrap())
        };
        let a = render(&SETUPS[0]);
        let b = render(&SETUPS[1]);
        let c = render(&SETUPS[3]);
        assert!(!a.contains("envoy.filters.http.wasm") && !a.contains("bootstrap_extensions"));
        assert!(!a.contains("public_queue") && !b.contains("public_queue") && c.contains("public_queue"));
        assert!(b.contains("noop_filter.wasm") && !b.contains("hint_router.wasm"));
        let p = render(&SETUPS[2]);
        assert!(p.contains("noop_filter.wasm") && p.contains("x-hint-router-pick=127.0.0.1:1,127.0.0.1:2"));
        assert!(c.contains("hint_router.wasm") && c.contains("\"debug_headers\":false"));
        for t in [&a, &b, &c] {
            assert!(t.contains("envoy.filters.http.header_mutation"));
            assert!(t.contains("envoy.filters.http.header_to_metadata"));
            assert!(t.contains("envoy.load_balancing_policies.override_host"));
        }
        // Envoy itself accepts each (when built: `make test` builds both filters first).
        if hint_router_e2e::envoy_bin().exists() && wasm_path().exists() && noop_wasm_path().exists() {
            for (name, t) in [("nofilter", &a), ("noop", &b), ("pick", &p), ("hint", &c)] {
                let (accepted, log) = hint_router_e2e::util::validate_config(&format!("overhead-{name}"), t);
                assert!(accepted, "{name} config rejected:\n{log}");
            }
        }
    }
}
