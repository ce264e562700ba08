//! Runners from the cluster Envoy already has: the admin API's
//! `GET /clusters?format=json&filter=^<cluster>$`, read in one pass.
//!
//! Envoy lists every host of the cluster, however it learned them (STATIC, STRICT_DNS, EDS),
//! with the address it connects to (a STRICT_DNS name already resolved) and its health flags
//! (active health check, outlier ejection, EDS health). The per-host stats it also lists are
//! skipped without being built, so the cost is one pass over the body.

use serde::Deserialize;
use std::borrow::Cow;

/// One host of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Canonical `ip:port` ([`crate::addr::canonical`]), as Envoy names the upstream.
    pub addr: String,
    /// Envoy would send it traffic: no failed health check, no outlier ejection, EDS health
    /// neither unhealthy, draining nor timed out, not pending removal or a first check.
    pub healthy: bool,
}

/// The cluster's hosts as the admin API listed them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    /// Hosts in the order Envoy listed them, at most `max`, no duplicates.
    pub members: Vec<Member>,
    /// Hosts left out: past `max`, or without an ip:port socket address (a pipe).
    pub dropped: usize,
}

#[derive(Deserialize)]
struct Clusters<'a> {
    #[serde(default, borrow)]
    cluster_statuses: Vec<ClusterStatus<'a>>,
}

#[derive(Deserialize)]
struct ClusterStatus<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    host_statuses: Vec<HostStatus<'a>>,
}

#[derive(Deserialize)]
struct HostStatus<'a> {
    #[serde(default, borrow)]
    address: Option<Address<'a>>,
    #[serde(default, borrow)]
    health_status: Option<HealthStatus<'a>>,
}

#[derive(Deserialize)]
struct Address<'a> {
    #[serde(default, borrow)]
    socket_address: Option<SocketAddress<'a>>,
}

#[derive(Deserialize)]
struct SocketAddress<'a> {
    #[serde(borrow)]
    address: Cow<'a, str>,
    #[serde(default)]
    port_value: u32,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HealthStatus<'a> {
    failed_active_health_check: bool,
    failed_outlier_check: bool,
    failed_eds_health: bool,
    pending_dynamic_removal: bool,
    pending_active_hc: bool,
    excluded_via_immediate_hc_fail: bool,
    active_hc_timeout: bool,
    #[serde(borrow)]
    eds_health_status: Option<Cow<'a, str>>,
}

impl HealthStatus<'_> {
    fn healthy(&self) -> bool {
        let flagged = self.failed_active_health_check
            || self.failed_outlier_check
            || self.failed_eds_health
            || self.pending_dynamic_removal
            || self.pending_active_hc
            || self.excluded_via_immediate_hc_fail
            || self.active_hc_timeout;
        // UNKNOWN and DEGRADED hosts still get traffic from Envoy; so do they here.
        let eds_down =
            matches!(self.eds_health_status.as_deref(), Some("UNHEALTHY" | "DRAINING" | "TIMEOUT"));
        !flagged && !eds_down
    }
}

/// The admin path that lists `cluster` alone (its `filter` is an RE2 regex: the name is
/// matched literally).
pub fn admin_path(cluster: &str) -> String {
    let mut escaped = String::with_capacity(cluster.len() + 4);
    for c in cluster.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            escaped.push(c);
        } else {
            // `\xHH` in the regex, percent-encoded in the query.
            escaped.push_str(&format!("%5Cx{:02x}", u32::from(c) & 0xff));
        }
    }
    format!("/clusters?format=json&filter=%5E{escaped}%24")
}

/// Reads the hosts of `cluster` from an admin `/clusters?format=json` body. `Err` when the
/// body is not that document or does not list the cluster (a wrong `cluster` name, or an
/// admin API that is not Envoy's).
pub fn parse(body: &[u8], cluster: &str, max: usize) -> Result<Members, String> {
    let doc: Clusters<'_> = serde_json::from_slice(body).map_err(|e| format!("admin /clusters body: {e}"))?;
    let status = doc
        .cluster_statuses
        .into_iter()
        .find(|c| c.name == cluster)
        .ok_or_else(|| format!("the admin API lists no cluster named {cluster:?}"))?;
    let mut out = Members::default();
    let mut seen = std::collections::HashSet::new();
    for h in status.host_statuses {
        let Some(sa) = h.address.and_then(|a| a.socket_address) else {
            out.dropped += 1;
            continue;
        };
        let spelled = if sa.address.contains(':') {
            format!("[{}]:{}", sa.address, sa.port_value)
        } else {
            format!("{}:{}", sa.address, sa.port_value)
        };
        let Some(addr) = crate::addr::canonical(&spelled) else {
            out.dropped += 1;
            continue;
        };
        if out.members.len() >= max {
            out.dropped += 1;
            continue;
        }
        if !seen.insert(addr.clone()) {
            continue; // one host twice (two priorities or localities): one runner
        }
        let healthy = h.health_status.as_ref().map_or(true, HealthStatus::healthy);
        out.members.push(Member { addr, healthy });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn host(addr: &str, port: u32, health: &str) -> String {
        format!(
            r#"{{"address":{{"socket_address":{{"address":"{addr}","port_value":{port}}}}},
               "stats":[{{"name":"cx_total","value":"3"}},{{"type":"GAUGE","name":"rq_active"}}],
               "health_status":{health},"weight":1,"locality":{{}},"hostname":"localhost"}}"#
        )
    }

    fn body(hosts: &[String]) -> Vec<u8> {
        format!(
            r#"{{"cluster_statuses":[{{"name":"other","host_statuses":[{}]}},
                {{"name":"runners","added_via_api":true,"host_statuses":[{}]}}]}}"#,
            host("10.9.9.9", 1, r#"{"eds_health_status":"HEALTHY"}"#),
            hosts.join(",")
        )
        .into_bytes()
    }

    #[test]
    fn hosts_and_their_health_as_envoy_sees_them() {
        let b = body(&[
            host("127.0.0.1", 18081, r#"{"eds_health_status":"HEALTHY"}"#),
            host("127.0.0.1", 18082, r#"{"failed_active_health_check":true,"eds_health_status":"HEALTHY"}"#),
            host("127.0.0.1", 18083, r#"{"failed_outlier_check":true}"#),
            host("127.0.0.1", 18084, r#"{"eds_health_status":"DRAINING"}"#),
            host("127.0.0.1", 18085, r#"{"eds_health_status":"DEGRADED"}"#),
            host("0:0:0:0:0:0:0:1", 18086, r#"{"pending_active_hc":true}"#),
            host("127.0.0.1", 18081, r#"{}"#),
        ]);
        let m = parse(&b, "runners", 100).unwrap();
        let got: Vec<(&str, bool)> = m.members.iter().map(|m| (m.addr.as_str(), m.healthy)).collect();
        assert_eq!(
            got,
            vec![
                ("127.0.0.1:18081", true),
                ("127.0.0.1:18082", false),
                ("127.0.0.1:18083", false),
                ("127.0.0.1:18084", false),
                ("127.0.0.1:18085", true),
                ("[::1]:18086", false),
            ]
        );
        assert_eq!(m.dropped, 0);
    }

    #[test]
    fn caps_pipes_missing_clusters_and_garbage() {
        let hosts: Vec<String> = (0..5).map(|i| host("127.0.0.1", 2000 + i, "{}")).collect();
        let m = parse(&body(&hosts), "runners", 3).unwrap();
        assert_eq!((m.members.len(), m.dropped), (3, 2));
        let pipe = r#"{"address":{"pipe":{"path":"/tmp/x"}}}"#.to_string();
        assert_eq!(parse(&body(&[pipe]), "runners", 3).unwrap().dropped, 1);
        assert!(parse(&body(&[]), "runners", 3).unwrap().members.is_empty(), "an empty cluster is valid");
        assert!(parse(&body(&[]), "nope", 3).unwrap_err().contains("no cluster"));
        assert!(parse(b"<html>", "runners", 3).is_err());
        assert!(parse(b"{}", "runners", 3).is_err());
    }

    #[test]
    fn the_admin_path_matches_the_name_literally() {
        assert_eq!(admin_path("runners"), "/clusters?format=json&filter=%5Erunners%24");
        assert_eq!(admin_path("a.b-c"), "/clusters?format=json&filter=%5Ea%5Cx2eb%5Cx2dc%24");
    }
}
