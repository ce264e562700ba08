//! The runner table: what the poller publishes to shared data, and the indexed view each
//! worker routes with.

use crate::hint::HintList;
use crate::popularity::hint_hash;
use rustc_hash::FxBuildHasher;
use serde::{Deserialize, Serialize};
use smallvec::{smallvec, SmallVec};
use std::borrow::Cow;
use std::collections::HashMap;

/// One runner as published by the poller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRunner {
    /// `ip:port`, as in the config's `runners` and the cluster.
    pub addr: String,
    /// Answered its last poll and is not draining. Unavailable runners are never listed as
    /// candidates (Envoy's `override_host` policy does not check health itself).
    pub available: bool,
    /// Hints it reported (resident, loading and queued models), sanitised and capped.
    pub hints: Vec<String>,
    /// Its cache capacity in models (0 = unknown).
    pub capacity: u32,
    /// Inferences it runs at once; at or above this many in flight it counts as busy.
    pub max_concurrency: u32,
    /// The token that begins the fal queue request ids it issues (docs/queue.md); 0: it
    /// serves no queue.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub queue_token: u64,
    /// Its last poll failed (dead, frozen or unreachable), as opposed to merely draining.
    #[serde(default, skip_serializing_if = "is_false")]
    pub unreachable: bool,
    /// Models it reported as `warm`: not resident, but loadable from host memory (a cheap
    /// miss), sanitised and capped like `hints`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warm: Vec<String>,
}

impl TableRunner {
    /// A runner at `addr` (empty: a vacant slot) that has not answered a poll yet: unavailable,
    /// nothing known.
    pub fn unpolled(addr: String) -> TableRunner {
        TableRunner {
            addr,
            available: false,
            hints: Vec::new(),
            capacity: 0,
            max_concurrency: 1,
            queue_token: 0,
            unreachable: false,
            warm: Vec::new(),
        }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
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

/// A [`Table`] parsed in place: strings borrow from the encoded bytes (unless JSON escapes
/// forced a copy), so a refresh allocates only for the runners whose hints changed.
#[derive(Debug, Deserialize)]
pub struct TableRef<'a> {
    /// As [`Table::generation`].
    pub generation: u64,
    /// As [`Table::runners`].
    #[serde(borrow)]
    pub runners: Vec<TableRunnerRef<'a>>,
}

/// A string borrowed from the encoded table when it has no JSON escapes (serde borrows a
/// `Cow<str>` only as a direct field, hence this wrapper for lists).
#[derive(Debug, Deserialize)]
pub struct Str<'a>(#[serde(borrow)] pub Cow<'a, str>);

/// A [`TableRunner`] parsed in place.
#[derive(Debug, Deserialize)]
pub struct TableRunnerRef<'a> {
    /// As [`TableRunner::addr`].
    #[serde(borrow)]
    pub addr: Cow<'a, str>,
    /// As [`TableRunner::available`].
    pub available: bool,
    /// As [`TableRunner::hints`].
    #[serde(borrow)]
    pub hints: Vec<Str<'a>>,
    /// As [`TableRunner::capacity`].
    pub capacity: u32,
    /// As [`TableRunner::max_concurrency`].
    pub max_concurrency: u32,
    /// As [`TableRunner::queue_token`].
    #[serde(default)]
    pub queue_token: u64,
    /// As [`TableRunner::unreachable`].
    #[serde(default)]
    pub unreachable: bool,
    /// As [`TableRunner::warm`].
    #[serde(borrow, default)]
    pub warm: Vec<Str<'a>>,
}

impl<'a> TableRef<'a> {
    /// Parses what [`Table::encode`] wrote (accepts exactly what [`Table::decode`] accepts).
    pub fn parse(bytes: &'a [u8]) -> Option<TableRef<'a>> {
        serde_json::from_slice(bytes).ok()
    }

    /// The owned [`Table`].
    pub fn into_owned(self) -> Table {
        Table {
            generation: self.generation,
            runners: self.runners.into_iter().map(TableRunnerRef::into_owned).collect(),
        }
    }
}

impl TableRunnerRef<'_> {
    /// The owned [`TableRunner`].
    pub fn into_owned(self) -> TableRunner {
        TableRunner {
            addr: self.addr.into_owned(),
            available: self.available,
            hints: self.hints.into_iter().map(|h| h.0.into_owned()).collect(),
            capacity: self.capacity,
            max_concurrency: self.max_concurrency,
            queue_token: self.queue_token,
            unreachable: self.unreachable,
            warm: self.warm.into_iter().map(|h| h.0.into_owned()).collect(),
        }
    }
}

/// Largest capacity a [`View`] believes: the most hints a config lets a runner keep (the
/// poller already clamps reports to the configured cap; this bounds anything sized by it).
pub const MAX_CAPACITY: u32 = 100_000;

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
    /// Its fal queue token (0: none).
    pub queue_token: u64,
    /// Its last poll failed.
    pub unreachable: bool,
    /// Models it can load cheaply (its warm tier), as last polled.
    pub warm: Vec<String>,
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

/// Hash maps of the index: FxHash (rustc-hash) is several times faster than SipHash on short
/// keys. The keys are hints published by runners and runner addresses from the config; clients
/// only look keys up, so they cannot grow a bucket.
type FastMap<K, V> = HashMap<K, V, FxBuildHasher>;

/// Runners holding one hint: up to three inline (the common case: no allocation per hint).
type Holders = SmallVec<[u32; 3]>;

mod index;
use index::HintIndex;

/// A worker-local, indexed copy of the [`Table`]: hint -> holders is a hash lookup (by the
/// hint's model hash, see [`View::holders_hashed`]).
#[derive(Debug, Clone, Default)]
pub struct View {
    generation: u64,
    runners: Vec<ViewRunner>,
    /// Per runner, what the fleet scan reads (see [`View::gates`]): compact arrays, where a scan
    /// over the `ViewRunner`s cost 4-5 ns per runner.
    gates: Vec<u32>,
    slot_costs: Vec<u32>,
    by_hint: HintIndex,
    /// Warm model -> runners that report it warm (most runners report none).
    by_warm: FastMap<String, Holders>,
    by_addr: FastMap<String, u32>,
}

impl View {
    /// Builds the view of a published table.
    pub fn from_table(table: &Table) -> View {
        View::from_owned(table.clone())
    }

    /// Builds the view of a published table, taking its strings instead of copying them
    /// (what a worker does on every table refresh).
    pub fn from_owned(table: Table) -> View {
        let n = table.runners.len();
        let total: usize = table.runners.iter().map(|r| r.hints.len()).sum();
        let mut v = View {
            generation: table.generation,
            runners: Vec::with_capacity(n),
            gates: Vec::with_capacity(n),
            slot_costs: Vec::with_capacity(n),
            by_hint: HintIndex::with_capacity(total / 2),
            by_warm: FastMap::default(),
            by_addr: FastMap::with_capacity_and_hasher(n, Default::default()),
        };
        for (i, r) in table.runners.into_iter().enumerate() {
            let idx = i as u32;
            v.by_addr.insert(r.addr.clone(), idx);
            for h in &r.hints {
                v.by_hint.add(h, hint_hash(h), idx);
            }
            for h in &r.warm {
                index(&mut v.by_warm, h, idx);
            }
            v.runners.push(ViewRunner {
                addr: r.addr,
                available: r.available,
                capacity: r.capacity.min(MAX_CAPACITY),
                max_concurrency: r.max_concurrency.max(1),
                hints: r.hints,
                queue_token: r.queue_token,
                unreachable: r.unreachable,
                warm: r.warm,
            });
            v.gates.push(0);
            v.slot_costs.push(0);
            v.relane(idx);
        }
        v
    }

    /// Brings the view up to date with a newly published table, parsed in place: compares
    /// each runner's hints with the borrowed strings and copies and re-indexes only the lists
    /// that changed (a refresh usually brings one or two changed runners among many). Same
    /// result as a rebuild from the table for everything ranking sees; only the order within
    /// a holder list may differ, which ranking does not depend on (ties break by runner
    /// index). Falls back to a full rebuild when the runner list itself changed.
    pub fn refresh_from_ref(&mut self, table: TableRef<'_>) {
        let same_runners = table.runners.len() == self.runners.len()
            && table.runners.iter().zip(&self.runners).all(|(t, v)| t.addr == v.addr.as_str());
        if !same_runners {
            *self = View::default(); // freed first: lowers the peak memory of the rebuild
            *self = View::from_owned(table.into_owned());
            return;
        }
        self.generation = table.generation;
        for (i, t) in table.runners.into_iter().enumerate() {
            self.apply_runner(i as u32, t);
        }
    }

    /// Brings runner `idx` up to date with its published entry `t` (the same runner: the
    /// caller checked the address), copying and re-indexing only the lists that changed.
    /// Work proportional to that runner alone.
    pub fn apply_runner(&mut self, idx: u32, t: TableRunnerRef<'_>) {
        let i = idx as usize;
        let Some(v) = self.runners.get_mut(i) else { return };
        v.available = t.available;
        v.capacity = t.capacity.min(MAX_CAPACITY);
        v.max_concurrency = t.max_concurrency.max(1);
        v.queue_token = t.queue_token;
        v.unreachable = t.unreachable;
        let same =
            |a: &[String], b: &[Str<'_>]| a.len() == b.len() && a.iter().zip(b).all(|(a, b)| *a == b.0);
        if !same(&v.warm, &t.warm) {
            self.set_runner_warm(idx, t.warm.into_iter().map(|h| h.0.into_owned()).collect());
        }
        let Some(v) = self.runners.get_mut(i) else { return };
        if !same(&v.hints, &t.hints) {
            let new = t.hints.into_iter().map(|h| h.0.into_owned()).collect();
            let old = std::mem::replace(&mut v.hints, new);
            self.reindex(idx, &old);
        }
        self.relane(idx);
    }

    /// Puts the runner `t` at index `idx` in place of another (a runner took the slot one that
    /// left had freed): its address and lists are re-indexed, in work proportional to the two
    /// runners alone.
    pub fn replace_runner(&mut self, idx: u32, t: TableRunnerRef<'_>) {
        let Some(v) = self.runners.get_mut(idx as usize) else { return };
        let (old_hints, old_warm) = (std::mem::take(&mut v.hints), std::mem::take(&mut v.warm));
        let old_addr = std::mem::replace(&mut v.addr, t.addr.clone().into_owned());
        relist_hints(&mut self.by_hint, idx, &old_hints, &[]);
        relist(&mut self.by_warm, idx, &old_warm, &[]);
        if self.by_addr.get(&old_addr) == Some(&idx) {
            self.by_addr.remove(&old_addr);
        }
        self.by_addr.insert(t.addr.clone().into_owned(), idx);
        self.apply_runner(idx, t);
    }

    /// Sets the generation of the table this view now matches (after
    /// [`View::apply_runner`] brought it up to date with a [`delta::Delta`]).
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// Brings runner `idx`'s lanes up to date with the runner (after any change to it).
    fn relane(&mut self, idx: u32) {
        let i = idx as usize;
        let Some(r) = self.runners.get(i) else { return };
        // max_concurrency is at least 1, so 0 can only mean "unavailable".
        let gate = if r.available { r.max_concurrency } else { 0 };
        let cost = crate::rank::slot_cost(r);
        if let (Some(g), Some(c)) = (self.gates.get_mut(i), self.slot_costs.get_mut(i)) {
            (*g, *c) = (gate, cost);
        }
    }

    /// Moves runner `idx` in the hint index from its `old` hints to its current ones.
    fn reindex(&mut self, idx: u32, old: &[String]) {
        if let Some(r) = self.runners.get(idx as usize) {
            relist_hints(&mut self.by_hint, idx, old, &r.hints);
        }
    }

    /// The table generation this view was built from.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// All runners, indexed as in the table.
    pub fn runners(&self) -> &[ViewRunner] {
        &self.runners
    }

    /// Per runner, in table order: its `max_concurrency` if it is available (busy at that many
    /// in flight), else 0. With [`View::slot_costs`], all a miss or an unhinted request needs
    /// to know of each runner besides its load.
    pub(crate) fn gates(&self) -> &[u32] {
        &self.gates
    }

    /// Per runner, in table order: [`crate::rank::slot_cost`].
    pub(crate) fn slot_costs(&self) -> &[u32] {
        &self.slot_costs
    }

    /// A runner by index.
    pub fn runner(&self, idx: u32) -> Option<&ViewRunner> {
        self.runners.get(idx as usize)
    }

    /// Index of the runner at `addr`.
    pub fn index_of(&self, addr: &str) -> Option<u32> {
        self.by_addr.get(addr).copied()
    }

    /// The runner whose fal queue token is `token` (0 matches none). A linear scan: job
    /// calls are a small share of requests, and the poller keeps tokens unique.
    pub fn runner_by_queue_token(&self, token: u64) -> Option<u32> {
        if token == 0 {
            return None;
        }
        self.runners.iter().position(|r| r.queue_token == token).map(|i| i as u32)
    }

    /// Runners (available or not) that list `hint`.
    pub fn holders(&self, hint: &str) -> &[u32] {
        self.by_hint.get(hint, hint_hash(hint))
    }

    /// [`View::holders`] for a caller that already has `hash`, the hint's [`hint_hash`] (the
    /// router's hot path: the hint is not hashed a second time). The hint is still compared,
    /// so a wrong `hash` may find nothing, but never another hint's holders.
    #[inline]
    pub fn holders_hashed(&self, hint: &str, hash: u64) -> &[u32] {
        self.by_hint.get(hint, hash)
    }

    /// Runners (available or not) that report `hint` warm: a miss there is a copy from host
    /// memory, not a disk read (a runner may list a model both as a hint and warm, for a
    /// while: its hints come from response headers, its warm list only from polls).
    pub fn warm_holders(&self, hint: &str) -> &[u32] {
        self.by_warm.get(hint).map(|h| h.as_slice()).unwrap_or(&[])
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
        let old = std::mem::replace(&mut r.hints, hints.hints.clone());
        self.reindex(idx, &old);
        self.relane(idx);
        true
    }

    /// Replaces one runner's warm list (as a poll would); returns whether it changed.
    pub fn set_runner_warm(&mut self, idx: u32, warm: Vec<String>) -> bool {
        let Some(r) = self.runners.get_mut(idx as usize) else {
            return false;
        };
        if r.warm == warm {
            return false;
        }
        let old = std::mem::replace(&mut r.warm, warm);
        relist(&mut self.by_warm, idx, &old, &r.warm);
        true
    }

    /// Whether `raw`, a runner's `x-fal-runner-hints` value, is exactly runner `idx`'s current
    /// hint list joined by `,` (the form runners send, and the common case: nothing new).
    /// Then `parse_hint_list(raw, max_hint_bytes, cap)` would return that same list, so the
    /// caller can skip parsing: a view's hints are sanitised on the way in (by the poller's
    /// `report::parse` or the filter's `parse_hint_list`, with the same limits), so each is
    /// non-empty visible ASCII without `,`, and they are distinct; the lengths and the count
    /// are checked here again.
    /// False for anything else, including an unknown runner; the caller then parses.
    pub fn runner_hints_equal(&self, idx: u32, raw: &[u8], max_hint_bytes: usize, cap: usize) -> bool {
        let Some(r) = self.runner(idx) else {
            return false;
        };
        if r.hints.len() > cap {
            return false;
        }
        let mut rest = raw;
        for (i, h) in r.hints.iter().enumerate() {
            if i > 0 {
                match rest.split_first() {
                    Some((b',', tail)) => rest = tail,
                    _ => return false,
                }
            }
            let h = h.as_bytes();
            if h.is_empty() || h.len() > max_hint_bytes || !rest.starts_with(h) {
                return false;
            }
            rest = rest.get(h.len()..).unwrap_or(&[]);
        }
        rest.is_empty()
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

/// Adds runner `idx` to `h`'s list in `map`.
fn index(map: &mut FastMap<String, Holders>, h: &str, idx: u32) {
    match map.get_mut(h) {
        Some(list) => list.push(idx),
        None => {
            map.insert(h.to_owned(), smallvec![idx]);
        }
    }
}

/// Moves runner `idx` in `map` from the lists of its `old` entries to those of its `new` ones.
fn relist(map: &mut FastMap<String, Holders>, idx: u32, old: &[String], new: &[String]) {
    for h in old {
        if let Some(list) = map.get_mut(h.as_str()) {
            list.retain(|x| *x != idx);
            if list.is_empty() {
                map.remove(h.as_str());
            }
        }
    }
    for h in new {
        index(map, h, idx);
    }
}

/// [`relist`] for the hint index.
fn relist_hints(map: &mut HintIndex, idx: u32, old: &[String], new: &[String]) {
    for h in old {
        map.remove(h, hint_hash(h), idx);
    }
    for h in new {
        map.add(h, hint_hash(h), idx);
    }
}

/// Encodes a worker's "runner X just reported hints Y" message for the poller's queue:
/// `addr` newline `a,b,c`.
pub fn encode_header_update(addr: &str, hints: &[String]) -> Vec<u8> {
    encode_header_update_raw(addr, crate::wire::format_hints_header(hints).as_bytes())
}

/// [`encode_header_update`] with the hint list as the runner sent it (`a,b,c`).
pub fn encode_header_update_raw(addr: &str, raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(addr.len() + 1 + raw.len());
    out.extend_from_slice(addr.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(raw);
    out
}

/// Splits a queue message into the runner address and the raw hint list.
pub fn decode_header_update(msg: &[u8]) -> Option<(&str, &[u8])> {
    let pos = msg.iter().position(|&b| b == b'\n')?;
    let (addr, rest) = msg.split_at(pos);
    let addr = std::str::from_utf8(addr).ok()?;
    Some((addr, rest.get(1..).unwrap_or(&[])))
}

pub mod delta;

#[cfg(test)]
pub(crate) mod tests;
