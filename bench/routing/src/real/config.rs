//! Text surgery on the shipped Envoy config, one policy at a time.

use crate::sim::Policy;
use anyhow::{anyhow, bail, Result};

/// Text surgery on the shipped config for one policy: `(from, to)` replacements for the
/// harness. The hint policy uses the shipped config unchanged.
pub fn config_edits(
    shipped: &str,
    policy: Policy,
    hash_balance_factor: u32,
) -> Result<Vec<(String, String)>> {
    let mut edits = vec![plain_queue_listener(shipped)?];
    // Keep the runner's identity header on responses, to count requests per runner.
    let hide = "              response_headers_to_remove: [x-runner-id]\n";
    if shipped.contains(hide) {
        edits.push((hide.to_string(), String::new()));
    }
    if policy.is_hint() {
        let anchor = "            \"poll_cluster\": \"hint_router_poll\",\n";
        if shipped.matches(anchor).count() != 1 {
            bail!("the plugin configuration is not where expected in the shipped config");
        }
        let mode = policy.when_holders_busy().as_str();
        edits.push((anchor.to_string(), format!("{anchor}            \"when_holders_busy\": \"{mode}\",\n")));
        return Ok(edits);
    }
    // Drop the wasm HTTP filters, the queue listener's too (the poller service stays; it only
    // polls /hints).
    let start = "          - name: envoy.filters.http.wasm\n";
    let (mut rest, mut found) = (shipped, 0);
    while let Some(wasm) = block_from(rest, start, 10) {
        let at = rest.find(start).unwrap_or(0) + wasm.len();
        rest = rest.get(at..).unwrap_or("");
        edits.push((wasm, String::new()));
        found += 1;
    }
    if found == 0 {
        bail!("wasm filter block not found in the shipped config");
    }
    // Swap the runners cluster's LB policy.
    let cluster_at = shipped
        .find("  - name: runners\n")
        .ok_or_else(|| anyhow!("runners cluster not found in the shipped config"))?;
    let rest = shipped.get(cluster_at..).unwrap_or("");
    let lb = block_from(rest, "    load_balancing_policy:\n", 4)
        .ok_or_else(|| anyhow!("runners cluster has no load_balancing_policy block"))?;
    let typed = |name: &str, ty: &str, extra: &str| {
        format!(
            "    load_balancing_policy:\n      policies:\n      - typed_extension_config:\n          name: envoy.load_balancing_policies.{name}\n          typed_config:\n            \"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.{name}.v3.{ty}\n{extra}"
        )
    };
    let new_lb = match policy {
        Policy::RoundRobin => typed("round_robin", "RoundRobin", ""),
        Policy::LeastRequest => typed("least_request", "LeastRequest", ""),
        Policy::RingHash => typed("ring_hash", "RingHash", ""),
        Policy::RingHashBounded => typed(
            "ring_hash",
            "RingHash",
            &format!(
                "            consistent_hashing_lb_config: {{hash_balance_factor: {hash_balance_factor}}}\n"
            ),
        ),
        Policy::Hint | Policy::HintFastest => String::new(),
    };
    if shipped.matches(lb.as_str()).count() != 1 {
        bail!("the runners cluster's load_balancing_policy block is not unique in the shipped config");
    }
    edits.push((lb, new_lb));
    if matches!(policy, Policy::RingHash | Policy::RingHashBounded) {
        // Every route to the runners (the HTTP and the HTTPS listener's): the edit applies
        // to all of them.
        let route = "                  cluster: runners\n";
        if shipped.matches(route).count() == 0 {
            bail!("the route to the runners cluster is not where expected in the shipped config");
        }
        edits.push((
            route.to_string(),
            format!("{route}                  hash_policy:\n                  - header: {{header_name: x-fal-runner-hint}}\n"),
        ));
    }
    Ok(edits)
}

/// The edit that makes the queue listener (`public_queue`) plain HTTP: the bench's client
/// speaks no TLS. Everything else of the listener is kept.
fn plain_queue_listener(shipped: &str) -> Result<(String, String)> {
    let tls = "    - transport_socket: *dev_tls_socket\n      filters:\n";
    let at = shipped
        .find("  - name: public_queue\n")
        .ok_or_else(|| anyhow!("the queue listener public_queue is not in the shipped config"))?;
    let listener =
        block_from(shipped.get(at..).unwrap_or(""), "  - name: public_queue\n", 3).unwrap_or_default();
    if !listener.contains(tls) || shipped.matches(tls).count() != 1 {
        bail!("the queue listener's TLS transport socket is not where expected in the shipped config");
    }
    Ok((tls.to_string(), "    - filters:\n".to_string()))
}

/// The text from the line `start` to the next line indented less than `indent` spaces, or
/// (at the same indentation) starting a new list item; `None` if `start` is absent.
fn block_from(text: &str, start: &str, indent: usize) -> Option<String> {
    let at = text.find(start)?;
    let body = text.get(at + start.len()..)?;
    let mut len = start.len();
    for line in body.split_inclusive('\n') {
        let lead = line.len() - line.trim_start_matches(' ').len();
        let ends = line.trim().is_empty()
            || lead < indent
            || (lead == indent && line.trim_start().starts_with("- "));
        if ends {
            break;
        }
        len += line.len();
    }
    text.get(at..at + len).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hint_router_e2e::EnvoyOptions;

    fn shipped() -> String {
        // The config the bench renders (the harness's default).
        let file = EnvoyOptions::default().config_file;
        std::fs::read_to_string(hint_router_e2e::repo_root().join(file)).unwrap()
    }

    #[test]
    fn config_edits_apply_to_the_shipped_config() {
        let text = shipped();
        for policy in Policy::ALL {
            let edits = config_edits(&text, policy, 150).unwrap();
            let mut t = text.clone();
            for (from, to) in &edits {
                assert!(t.contains(from.as_str()), "{policy}: {from}");
                t = t.replace(from.as_str(), to);
            }
            let has_wasm = t.contains("envoy.filters.http.wasm");
            assert_eq!(has_wasm, policy.is_hint(), "{policy}");
            assert!(!t.contains("response_headers_to_remove: [x-runner-id]"));
            match policy {
                Policy::Hint | Policy::HintFastest => {
                    assert!(t.contains("override_host_sources:\n            - metadata:"));
                    let mode = format!("\"when_holders_busy\": \"{}\",", policy.when_holders_busy().as_str());
                    assert!(t.contains(&mode), "{policy}");
                }
                Policy::RoundRobin => assert!(t.contains("round_robin.v3.RoundRobin\n\n")),
                Policy::LeastRequest => assert!(t.contains("least_request.v3.LeastRequest\n\n")),
                Policy::RingHash | Policy::RingHashBounded => {
                    assert!(t.contains(
                        "hash_policy:\n                  - header: {header_name: x-fal-runner-hint}"
                    ));
                    assert_eq!(t.contains("hash_balance_factor: 150"), policy == Policy::RingHashBounded);
                }
            }
            // The poll cluster keeps its own policy.
            assert!(t.contains("x-hint-router-poll-target"));
            // The queue listener is plain HTTP; the HTTPS listener keeps its certificate.
            assert!(!t.contains("*dev_tls_socket"), "{policy}");
            assert!(t.contains("- transport_socket: &dev_tls_socket"), "{policy}");
            let queue = t.find("  - name: public_queue\n").unwrap();
            let listener = block_from(&t[queue..], "  - name: public_queue\n", 3).unwrap();
            assert!(listener.contains("    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n"));
            assert!(listener.contains("stat_prefix: public_queue"));
            assert_eq!(listener.contains("root_id: hint_router_queue"), policy.is_hint(), "{policy}");
        }
    }

    #[test]
    fn block_from_stops_at_dedent_and_siblings() {
        let t = "a:\n  - x: 1\n    y: 2\n  - z: 3\nb: 4\n";
        assert_eq!(block_from(t, "  - x: 1\n", 2).unwrap(), "  - x: 1\n    y: 2\n");
        assert_eq!(block_from(t, "a:\n", 1).unwrap(), "a:\n  - x: 1\n    y: 2\n  - z: 3\n");
        assert!(block_from(t, "c:\n", 0).is_none());
    }
}
