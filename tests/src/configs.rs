//! The shipped Envoy configs, and how they derive from one another: `envoy/envoy.yaml`
//! (production), `envoy/demo.yaml` (+ [`DEMO_EDITS`]) and `envoy/eds.yaml` (+ [`EDS_EDITS`]).
//! Unit tests check each derived file byte for byte, so retries, health checks and routing
//! cannot drift apart between them.

/// The production config, relative to the repo root.
pub const PRODUCTION_CONFIG: &str = "envoy/envoy.yaml";

/// The demo config, relative to the repo root: [`PRODUCTION_CONFIG`] with [`DEMO_EDITS`].
pub const DEMO_CONFIG: &str = "envoy/demo.yaml";

/// How the demo config differs from the production one: `(production text, demo text)`, each
/// found exactly once. A unit test checks that applying them to `envoy/envoy.yaml` gives
/// `envoy/demo.yaml` byte for byte, so retries, health checks and routing cannot drift apart.
pub const DEMO_EDITS: [(&str, &str); 6] = [
    (
        "# hint-router production config: Envoy on 127.0.0.1:10000 in front of three runners
# (127.0.0.1:18081-18083). Run from the repository root: `envoy -c envoy/envoy.yaml`.
",
        "# hint-router DEMO config: `envoy/envoy.yaml` plus debug headers, and runner headers
# (x-cache, x-fal-runner-hints) left on responses, so the demo (`make demo`, `make up`) can
# show where each request went. It reveals runner addresses and every runner's models to
# clients: never use it in production. Run from the repository root.
",
    ),
    ("            \"debug_headers\": false\n", "            \"debug_headers\": true\n"),
    (
        "            - name: runners\n              domains: [\"*\"]\n",
        "            - name: runners
              domains: [\"*\"]
              # Demo: x-cache, x-fal-runner-hints and the debug headers reach clients.
              response_headers_to_remove: [x-runner-id]
",
    ),
    (
        "            - name: fal_queue\n              domains: [\"*\"]\n",
        "            - name: fal_queue
              domains: [\"*\"]
              response_headers_to_remove: [x-runner-id]
",
    ),
    (
        "            - name: fal\n              domains: [\"*\"]\n",
        "            - name: fal
              domains: [\"*\"]
              response_headers_to_remove: [x-runner-id]
",
    ),
    (
        "                response_mutations:
                - remove: x-fal-runner-hints
                - remove: x-cache
                - remove: x-runner-id
                - remove: x-runner-overloaded
                - remove: x-runner-in-flight
                - remove: x-runner-load-ms
                - remove: x-runner-infer-ms
                - remove: x-hint-router-decision
                - remove: x-hint-router-upstream
",
        "",
    ),
];

/// The EDS demo config, relative to the repo root: [`DEMO_CONFIG`] with [`EDS_EDITS`].
pub const EDS_CONFIG: &str = "envoy/eds.yaml";

/// How the EDS demo config differs from the demo one: both runner clusters read their hosts
/// from `envoy/eds/runners.yaml` (file-based EDS) instead of a static list. Checked like
/// [`DEMO_EDITS`].
pub const EDS_EDITS: [(&str, &str); 4] = [
    (
        "# hint-router DEMO config: `envoy/envoy.yaml` plus debug headers, and runner headers
# (x-cache, x-fal-runner-hints) left on responses, so the demo (`make demo`, `make up`) can
# show where each request went. It reveals runner addresses and every runner's models to
# clients: never use it in production. Run from the repository root.
",
        "# hint-router EDS DEMO config: `envoy/demo.yaml` with the runners fed by file-based EDS from
# `envoy/eds/runners.yaml`: edit that file (atomically: write a new file in the same directory,
# then rename it over the old one) and Envoy applies it at once; the filter follows within one
# poll interval, nothing restarts. Same ports as `envoy/envoy.yaml`; debug headers on, like the
# demo config: never use it in production. Run from the repository root.
",
    ),
    ("\nadmin:\n", "\n# EDS subscriptions need a node identity.\nnode: {id: hint-router-demo, cluster: hint-router}\n\nadmin:\n"),
    (
        "  - name: runners
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: runners
      endpoints: &runner_endpoints
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18081}}}
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18082}}}
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18083}}}
",
        "  - name: runners
    type: EDS
    connect_timeout: 1s
    # A runner removed from the file goes at once, even while it passes health checks (by
    # default Envoy keeps such a host, pending removal, until a check fails).
    ignore_health_on_host_removal: true
    eds_cluster_config: &runner_eds
      service_name: runners
      eds_config:
        path_config_source: {path: envoy/eds/runners.yaml}
        resource_api_version: V3
",
    ),
    (
        "  - name: hint_router_poll
    type: STATIC
    connect_timeout: 0.25s
    load_assignment:
      cluster_name: hint_router_poll
      endpoints: *runner_endpoints
",
        "  - name: hint_router_poll
    type: EDS
    connect_timeout: 0.25s
    # The same hosts, from the same file (same service_name).
    eds_cluster_config: *runner_eds
",
    ),
];

/// A file-based EDS source for [`EDS_CONFIG`]: the runners cluster's hosts, replaced
/// atomically (written next to the file, then renamed over it) as Envoy expects.
pub struct EdsFile {
    /// The file Envoy watches.
    pub path: std::path::PathBuf,
    version: std::cell::Cell<u64>,
}

impl EdsFile {
    /// A new file in a scratch directory, listing no hosts yet.
    pub fn new() -> EdsFile {
        let path = crate::scratch_dir("eds").join("runners.yaml");
        let f = EdsFile { path, version: std::cell::Cell::new(0) };
        f.set(&[]);
        f
    }

    /// Replaces the host list: `(address, health)` with an EDS health status such as
    /// `HEALTHY`, `UNHEALTHY` or `DRAINING`; the address is `ip:port` or `name:port`.
    pub fn set(&self, hosts: &[(&str, &str)]) {
        self.version.set(self.version.get() + 1);
        let mut text = format!(
            "version_info: \"{}\"\nresources:\n- \"@type\": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment\n  cluster_name: runners\n  endpoints:\n  - lb_endpoints:{}\n",
            self.version.get(),
            if hosts.is_empty() { " []" } else { "" }
        );
        for (addr, health) in hosts {
            let (host, port) = addr.rsplit_once(':').expect("host:port");
            text.push_str(&format!(
                "    - endpoint: {{address: {{socket_address: {{address: {host}, port_value: {port}}}}}}}\n      health_status: {health}\n"
            ));
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write eds");
        std::fs::rename(&tmp, &self.path).expect("rename eds");
    }

    /// Harness options rendering [`EDS_CONFIG`] with this file as its EDS source.
    pub fn options(&self, base: crate::EnvoyOptions) -> crate::EnvoyOptions {
        let mut replace = base.replace.clone();
        replace.push(("path: envoy/eds/runners.yaml".into(), format!("path: {}", self.path.display())));
        crate::EnvoyOptions { config_file: EDS_CONFIG.into(), replace, ..base }
    }
}

impl Default for EdsFile {
    fn default() -> Self {
        EdsFile::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo_root;
    use std::fs;

    /// `HINT_ROUTER_WRITE_CONFIGS=1 cargo test -p hint-router-e2e --lib configs` rewrites the
    /// derived configs from their sources and edits (in order: demo first, then eds).
    fn regenerate() -> bool {
        std::env::var_os("HINT_ROUTER_WRITE_CONFIGS").is_some()
    }

    #[test]
    fn the_demo_config_is_the_production_config_plus_the_demo_edits() {
        let prod = fs::read_to_string(repo_root().join(PRODUCTION_CONFIG)).unwrap();
        let demo = fs::read_to_string(repo_root().join(DEMO_CONFIG)).unwrap();
        let mut t = prod.clone();
        for (from, to) in DEMO_EDITS {
            assert_eq!(t.matches(from).count(), 1, "{from:?} not exactly once in {PRODUCTION_CONFIG}");
            t = t.replace(from, to);
        }
        if regenerate() {
            fs::write(repo_root().join(DEMO_CONFIG), &t).unwrap();
            return;
        }
        assert!(t == demo, "{DEMO_CONFIG} is not {PRODUCTION_CONFIG} + DEMO_EDITS: update one of them");
    }

    #[test]
    fn the_production_config_leaks_no_runner_header_and_has_no_per_try_timeout() {
        let prod = fs::read_to_string(repo_root().join(PRODUCTION_CONFIG)).unwrap();
        assert!(prod.contains("\"debug_headers\": false"));
        assert!(!prod.lines().any(|l| l.trim_start().starts_with("per_try_timeout")));
        for h in ["x-fal-runner-hints", "x-cache", "x-runner-id", "x-hint-router-upstream"] {
            assert!(prod.contains(&format!("                - remove: {h}\n")), "{h} not stripped");
        }
    }

    #[test]
    fn the_eds_config_is_the_demo_config_plus_the_eds_edits() {
        let demo = fs::read_to_string(repo_root().join(DEMO_CONFIG)).unwrap();
        let eds = fs::read_to_string(repo_root().join(EDS_CONFIG)).unwrap_or_default();
        let mut t = demo.clone();
        for (from, to) in EDS_EDITS {
            assert_eq!(t.matches(from).count(), 1, "{from:?} not exactly once in {DEMO_CONFIG}");
            t = t.replace(from, to);
        }
        if regenerate() {
            fs::write(repo_root().join(EDS_CONFIG), &t).unwrap();
            return;
        }
        assert!(t == eds, "{EDS_CONFIG} is not {DEMO_CONFIG} + EDS_EDITS: update one of them");
        assert_eq!(t.matches("path_config_source: {path: envoy/eds/runners.yaml}").count(), 1);
    }
}
