//! Runners that come and go: the poller's slots follow the runners cluster's hosts
//! ([`crate::members`]) instead of a configured list.
//!
//! A slot's index names its runner in the published table and in the cross-worker in-flight
//! counters, so a runner keeps its slot for as long as it is a member. A runner that leaves
//! frees its slot, and the next one to join takes the lowest free slot: rollouts that give
//! every pod a new address reuse slots instead of growing the table, so memory is bounded by
//! the largest fleet seen at once (and by `max`), never by the number of joins.

use super::{Phase, Poller, Probe, Slot};
use crate::members::Member;
use crate::table::TableRunner;
use std::collections::HashMap;

/// What one membership update changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Churn {
    /// Slots taken by runners that joined (their in-flight counters start from zero).
    pub joined: Vec<usize>,
    /// Runners that left (their slots are free now).
    pub left: usize,
    /// Runners whose health as Envoy sees it changed.
    pub health_changed: usize,
    /// Runners left out because `max` slots are taken.
    pub refused: usize,
}

impl Churn {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.joined.is_empty() && self.left == 0 && self.health_changed == 0 && self.refused == 0
    }
}

impl Slot {
    fn vacate(&mut self) {
        self.runner = TableRunner::unpolled(String::new());
        // A poll still in flight for the old runner is ignored when it answers.
        self.phase = Phase::Idle;
        self.reported_in_flight = None;
        self.last = None;
        self.probe = Probe::Report;
        self.most_hints = 0;
        self.member = false;
        self.envoy_healthy = false;
    }
}

impl Poller {
    /// Makes the runners exactly `members` (the cluster's hosts, as Envoy lists them): new
    /// hosts take free slots (at most `max` slots in all) and are polled at once; hosts gone
    /// free theirs; a host Envoy deems unhealthy leaves the candidates at once and returns
    /// after its next successful poll once Envoy deems it healthy again. Cost: proportional
    /// to the fleet, once per membership read.
    pub fn set_members(&mut self, members: &[Member], now_ms: u64, max: usize) -> Churn {
        let mut churn = Churn::default();
        let wanted: HashMap<&str, bool> = members.iter().map(|m| (m.addr.as_str(), m.healthy)).collect();
        let mut present: HashMap<String, usize> = HashMap::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if !s.member {
                continue;
            }
            match wanted.get(s.runner.addr.as_str()) {
                None => {
                    self.by_addr.remove(&s.runner.addr);
                    s.vacate();
                    churn.left += 1;
                    self.changes.touch(i);
                }
                Some(&healthy) => {
                    if healthy != s.envoy_healthy {
                        churn.health_changed += 1;
                        s.envoy_healthy = healthy;
                        if healthy {
                            s.next_due_ms = now_ms; // back after one good poll
                        } else if s.runner.available {
                            s.runner.available = false;
                            self.changes.touch(i);
                        }
                    }
                    present.insert(s.runner.addr.clone(), i);
                }
            }
        }
        // Lowest free slot first, so a steady fleet stays packed at the front.
        let mut free: Vec<usize> =
            self.slots.iter().enumerate().filter(|(_, s)| !s.member).map(|(i, _)| i).rev().collect();
        for m in members {
            if present.contains_key(&m.addr) {
                continue;
            }
            let slot = Slot::occupied(m.addr.clone(), m.healthy, now_ms);
            let idx = match free.pop() {
                Some(i) => i,
                None if self.slots.len() < max => {
                    self.slots.push(slot.clone());
                    self.changes.all = true; // a longer table: published whole
                    self.slots.len() - 1
                }
                None => {
                    churn.refused += 1;
                    continue;
                }
            };
            if let Some(s) = self.slots.get_mut(idx) {
                *s = slot;
            }
            present.insert(m.addr.clone(), idx);
            self.by_addr.insert(m.addr.clone(), idx);
            churn.joined.push(idx);
            self.changes.touch(idx);
        }
        churn
    }

    /// Runners that occupy a slot now.
    pub fn members(&self) -> usize {
        self.slots.iter().filter(|s| s.member).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn discovering() -> Poller {
        Poller::new(&Config::parse(br#"{"poll_interval_ms":100,"poll_timeout_ms":50}"#).unwrap())
    }

    fn m(port: u16, healthy: bool) -> Member {
        Member { addr: format!("127.0.0.1:{port}"), healthy }
    }

    fn addrs(p: &mut Poller) -> Vec<String> {
        p.take_table().map(|t| t.runners.into_iter().map(|r| r.addr).collect()).unwrap_or_default()
    }

    #[test]
    fn joins_take_free_slots_and_leaves_free_them() {
        let mut p = discovering();
        assert!(p.is_empty());
        let c = p.set_members(&[m(1, true), m(2, true), m(3, true)], 0, 10);
        assert_eq!(c.joined, vec![0, 1, 2]);
        assert_eq!(p.due(0), vec![0, 1, 2]);
        assert_eq!(addrs(&mut p), ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        // 2 leaves, 4 joins: 4 takes 2's slot; nothing else moves.
        let c = p.set_members(&[m(1, true), m(3, true), m(4, true)], 10, 10);
        assert_eq!((c.joined.clone(), c.left), (vec![1], 1));
        assert_eq!(addrs(&mut p), ["127.0.0.1:1", "127.0.0.1:4", "127.0.0.1:3"]);
        // The same list again changes nothing and publishes nothing.
        assert!(p.set_members(&[m(1, true), m(3, true), m(4, true)], 20, 10).is_empty());
        assert!(p.take_table().is_none());
        // Everyone leaves: vacant slots are never polled.
        let c = p.set_members(&[], 30, 10);
        assert_eq!(c.left, 3);
        assert!(p.due(1000).is_empty());
        assert_eq!(addrs(&mut p), ["", "", ""]);
    }

    #[test]
    fn unhealthy_members_leave_the_candidates_until_healthy_and_polled_again() {
        let mut p = discovering();
        const REPORT: &[u8] = br#"{"hints":["a"]}"#;
        p.set_members(&[m(1, true)], 0, 10);
        p.on_sent(0, 2, 1, 0);
        p.on_response(0, 2, Some(200), None, Ok(REPORT));
        assert!(p.take_table().unwrap().runners[0].available);
        let c = p.set_members(&[m(1, false)], 5, 10);
        assert_eq!(c.health_changed, 1);
        assert!(!p.take_table().unwrap().runners[0].available, "out at once");
        // Polls keep succeeding, but Envoy's verdict wins.
        p.on_sent(0, 3, 200, 0);
        p.on_response(0, 201, Some(200), None, Ok(REPORT));
        assert!(p.take_table().map_or(true, |t| !t.runners[0].available));
        p.set_members(&[m(1, true)], 300, 10);
        assert_eq!(p.due(300), vec![0], "polled at once");
        p.on_sent(0, 4, 300, 0);
        p.on_response(0, 301, Some(200), None, Ok(REPORT));
        assert!(p.take_table().unwrap().runners[0].available);
    }

    #[test]
    fn a_late_answer_for_a_runner_that_left_is_ignored() {
        let mut p = discovering();
        p.set_members(&[m(1, true)], 0, 10);
        p.on_sent(0, 7, 0, 0);
        p.set_members(&[m(2, true)], 1, 10);
        assert_eq!(p.find_token(7), None, "the slot now holds another runner");
        assert_eq!(p.addr(0), Some("127.0.0.1:2"));
    }

    #[test]
    fn ten_thousand_rollouts_reuse_slots_and_the_cap_holds() {
        let mut p = discovering();
        let mut port = 1u16;
        for round in 0..10_000u64 {
            // Five runners at once; every round one of them is replaced by a new address.
            let fleet: Vec<Member> = (0..5).map(|k| m(port + k, true)).collect();
            p.set_members(&fleet, round, 10);
            port = port.wrapping_add(1).max(1);
        }
        assert_eq!(p.len(), 5, "each new runner takes the slot the one it replaced freed");
        assert_eq!(p.members(), 5);
        let table_bytes = p.take_table().unwrap().encode().len();
        assert!(table_bytes < 2048, "{table_bytes}");
        // Over the cap: refused, counted.
        let big: Vec<Member> = (0..20).map(|k| m(30_000 + k, true)).collect();
        let c = p.set_members(&big, 0, 10);
        assert_eq!((p.len(), c.refused), (10, 10));
    }
}
