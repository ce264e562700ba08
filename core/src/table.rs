//! The runner table: what the poller publishes to shared data, and the indexed view each
//! worker routes with.

use crate::hint::HintList;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// One runner as published by the poller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRunner {
    /// `ip:port`, as in the config's `runners` and the cluster.
    pub addr: String,
    /// Answered its last poll and is not draining. Unavailable runners are never listed as
    /// candidates (Envoy's `override_host` policy does not check health itself).
    pub available: bool,
    /// Hints it reported (resident and loading models), sanitised and capped.
    pub hints: Vec<String>,
    /// Its cache capacity in models (0 = unknown).
    pub capacity: u32,
    /// Inferences it runs at once; at or above this many in flight it counts as busy.
    pub max_concurrency: u32,
}

/// The whole table. Runner order is the config's `runners` order, so an index is stable and
/// names the same runner in the in-flight counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    /// Bumped on every publication.
    pub generation: u64,
    /// One entry per configured runner.
    pub runners: Vec<TableRunner>,
}

impl Table {
    /// Serialises the table for shared data.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a table from shared data.
    pub fn decode(bytes: &[u8]) -> Option<Table> {
        serde_json::from_slice(bytes).ok()
    }
}

/// A runner as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewRunner {
    /// `ip:port`.
    pub addr: String,
    /// May receive traffic.
    pub available: bool,
    /// Cache capacity (0 = unknown).
    pub capacity: u32,
    /// Busy threshold (at least 1).
    pub max_concurrency: u32,
    /// Its current hints.
    pub hints: Vec<String>,
}

impl ViewRunner {
    /// Whether its cache has room for another model without evicting.
    pub fn has_free_slot(&self) -> bool {
        self.capacity == 0 || (self.hints.len() as u64) < u64::from(self.capacity)
    }

    /// Claims more hints than its cache can hold: it lists things it cannot all have loaded
    /// (a misconfigured or lying runner). Ranked after honest holders.
    pub fn overclaims(&self) -> bool {
        self.capacity > 0 && (self.hints.len() as u64) > u64::from(self.capacity)
    }
}

/// A worker-local, indexed copy of the [`Table`]: hint -> holders is a hash lookup.
#[derive(Debug, Clone, Default)]
pub struct View {
    generation: u64,
    runners: Vec<ViewRunner>,
    by_hint: HashMap<String, Vec<u32>>,
    by_addr: HashMap<String, u32>,
}

impl View {
    /// Builds the view of a published table.
    pub fn from_table(table: &Table) -> View {
        let mut v = View { generation: table.generation, ..View::default() };
        for (i, r) in table.runners.iter().enumerate() {
            let idx = i as u32;
            v.by_addr.insert(r.addr.clone(), idx);
            for h in &r.hints {
                v.by_hint.entry(h.clone()).or_default().push(idx);
            }
            v.runners.push(ViewRunner {
                addr: r.addr.clone(),
                available: r.available,
                capacity: r.capacity,
                max_concurrency: r.max_concurrency.max(1),
                hints: r.hints.clone(),
            });
        }
        v
    }

    /// The table generation this view was built from.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// All runners, indexed as in the table.
    pub fn runners(&self) -> &[ViewRunner] {
        &self.runners
    }

    /// A runner by index.
    pub fn runner(&self, idx: u32) -> Option<&ViewRunner> {
        self.runners.get(idx as usize)
    }

    /// Index of the runner at `addr`.
    pub fn index_of(&self, addr: &str) -> Option<u32> {
        self.by_addr.get(addr).copied()
    }

    /// Runners (available or not) that list `hint`.
    pub fn holders(&self, hint: &str) -> &[u32] {
        self.by_hint.get(hint).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Number of distinct hints indexed.
    pub fn hint_count(&self) -> usize {
        self.by_hint.len()
    }

    /// Replaces one runner's hints (learned from its response header) until the next
    /// published table arrives. Returns whether anything changed.
    pub fn set_runner_hints(&mut self, idx: u32, hints: &HintList) -> bool {
        let Some(r) = self.runners.get_mut(idx as usize) else {
            return false;
        };
        if r.hints == hints.hints {
            return false;
        }
        for old in &r.hints {
            if let Some(list) = self.by_hint.get_mut(old) {
                list.retain(|&x| x != idx);
                if list.is_empty() {
                    self.by_hint.remove(old);
                }
            }
        }
        for h in &hints.hints {
            self.by_hint.entry(h.clone()).or_default().push(idx);
        }
        r.hints = hints.hints.clone();
        true
    }

    /// Formats candidates as the `override_host` list `ip:port,ip:port`.
    pub fn format_candidates(&self, candidates: &[u32]) -> String {
        let mut out = String::new();
        for &c in candidates {
            if let Some(r) = self.runner(c) {
                if !out.is_empty() {
                    out.push(',');
                }
                out.push_str(&r.addr);
            }
        }
        out
    }
}

/// Encodes a worker's "runner X just reported hints Y" message for the poller's queue:
/// `addr` newline `a,b,c`.
pub fn encode_header_update(addr: &str, hints: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(addr.len() + 1 + hints.len() * 16);
    out.extend_from_slice(addr.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(crate::wire::format_hints_header(hints).as_bytes());
    out
}

/// Splits a queue message into the runner address and the raw hint list.
pub fn decode_header_update(msg: &[u8]) -> Option<(&str, &[u8])> {
    let pos = msg.iter().position(|&b| b == b'\n')?;
    let (addr, rest) = msg.split_at(pos);
    let addr = std::str::from_utf8(addr).ok()?;
    Some((addr, rest.get(1..).unwrap_or(&[])))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::hint::parse_hint_list;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// A table of runners `127.0.0.1:1..`, each with the given hints, capacity 3,
    /// max_concurrency 2, all available.
    pub(crate) fn table(hints: &[&[&str]]) -> Table {
        Table {
            generation: 1,
            runners: hints
                .iter()
                .enumerate()
                .map(|(i, hs)| TableRunner {
                    addr: format!("127.0.0.1:{}", i + 1),
                    available: true,
                    hints: hs.iter().map(|s| s.to_string()).collect(),
                    capacity: 3,
                    max_concurrency: 2,
                })
                .collect(),
        }
    }

    #[test]
    fn view_indexes_hints_and_addresses() {
        let v = View::from_table(&table(&[&["a", "b"], &["b"], &[]]));
        assert_eq!(v.holders("a"), &[0]);
        assert_eq!(v.holders("b"), &[0, 1]);
        assert!(v.holders("zz").is_empty());
        assert_eq!(v.index_of("127.0.0.1:3"), Some(2));
        assert_eq!(v.index_of("127.0.0.1:9"), None);
        assert_eq!(v.format_candidates(&[2, 0, 99]), "127.0.0.1:3,127.0.0.1:1");
        assert!(v.runner(2).unwrap().has_free_slot());
    }

    #[test]
    fn set_runner_hints_reindexes() {
        let mut v = View::from_table(&table(&[&["a", "b"], &["b"]]));
        assert!(v.set_runner_hints(0, &parse_hint_list(b"c", 64, 8)));
        assert!(v.holders("a").is_empty());
        assert_eq!(v.holders("b"), &[1]);
        assert_eq!(v.holders("c"), &[0]);
        assert_eq!(v.hint_count(), 2);
        assert!(!v.set_runner_hints(0, &parse_hint_list(b"c", 64, 8)));
        assert!(!v.set_runner_hints(7, &parse_hint_list(b"c", 64, 8)));
    }

    #[test]
    fn table_and_queue_messages_round_trip() {
        let t = table(&[&["a"], &[]]);
        assert_eq!(Table::decode(&t.encode()), Some(t));
        assert_eq!(Table::decode(b"{garbage"), None);
        let m = encode_header_update("127.0.0.1:5", &["x".into(), "y".into()]);
        assert_eq!(decode_header_update(&m), Some(("127.0.0.1:5", &b"x,y"[..])));
        assert_eq!(decode_header_update(b"no-newline"), None);
        assert_eq!(decode_header_update(b"\xff\n"), None);
    }
}
