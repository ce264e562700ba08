//! Publishing a change of a few runners at the cost of those runners, not of the fleet.
//!
//! The poller publishes the whole [`Table`](super::Table) under one shared-data key only when
//! the runner list grows or shrinks, when many runners changed at once, or once every
//! [`RING`] generations; otherwise a generation is a [`Delta`]: the runners that changed, in
//! ring slot `generation % RING`. A worker at generation `seen` applies the deltas after it
//! ([`catch_up`]), each one checked to be the generation expected (a slot overwritten since
//! is noticed, and the worker reloads the whole table). The ring always holds every delta
//! since the last whole table, so a worker can always catch up from that table.

use super::{TableRunner, TableRunnerRef};
use serde::{Deserialize, Serialize};

/// Delta slots in shared data (keys never freed: a fixed number, whatever the churn). At most
/// `RING - 1` deltas follow a whole table.
pub const RING: u64 = 256;

/// One generation's changed runners: (index in the table, the runner as it is now). An entry
/// whose address differs from the worker's runner at that index is a runner that took a
/// freed slot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The generation this delta makes.
    pub generation: u64,
    /// The runners that changed, each once.
    pub runners: Vec<(u32, TableRunner)>,
}

impl Delta {
    /// Serialises the delta for shared data.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A [`Delta`] parsed in place (strings borrow from the encoded bytes).
#[derive(Debug, Deserialize)]
pub struct DeltaRef<'a> {
    /// As [`Delta::generation`].
    pub generation: u64,
    /// As [`Delta::runners`].
    #[serde(borrow)]
    pub runners: Vec<(u32, TableRunnerRef<'a>)>,
}

impl<'a> DeltaRef<'a> {
    /// Parses what [`Delta::encode`] wrote.
    pub fn parse(bytes: &'a [u8]) -> Option<DeltaRef<'a>> {
        serde_json::from_slice(bytes).ok()
    }
}

/// What the poller last published: the newest generation, and the generation of the last
/// whole table (every generation after it, up to `current`, is a delta in the ring).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Generations {
    /// Newest generation.
    pub current: u64,
    /// Generation of the whole table in shared data.
    pub full: u64,
}

impl Generations {
    /// 16 bytes: `current`, then `full`, little-endian.
    pub fn encode(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        let (c, f) = b.split_at_mut(8);
        c.copy_from_slice(&self.current.to_le_bytes());
        f.copy_from_slice(&self.full.to_le_bytes());
        b
    }

    /// Parses [`Generations::encode`]'s bytes; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Generations> {
        let c: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
        let f: [u8; 8] = bytes.get(8..16)?.try_into().ok()?;
        (bytes.len() == 16)
            .then(|| Generations { current: u64::from_le_bytes(c), full: u64::from_le_bytes(f) })
    }
}

/// The ring slot of `generation`'s delta.
pub fn slot(generation: u64) -> u64 {
    generation % RING
}

/// How a worker whose view is at generation `seen` (`None`: no table yet) catches up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Catchup {
    /// Nothing new.
    UpToDate,
    /// Apply the deltas of generations `from..=to`, in order.
    Deltas {
        /// First delta to apply.
        from: u64,
        /// Last one.
        to: u64,
    },
    /// Load the whole table, then apply the deltas after its generation up to `current`.
    Full,
}

/// What a worker at `seen` does given what was published.
pub fn catch_up(seen: Option<u64>, published: Generations) -> Catchup {
    match seen {
        Some(s) if s == published.current => Catchup::UpToDate,
        // Every delta after the whole table is in the ring, so any view at or after that
        // table's generation can follow them.
        Some(s) if s >= published.full && s < published.current => {
            Catchup::Deltas { from: s + 1, to: published.current }
        }
        _ => Catchup::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn generations_round_trip_and_reject_other_lengths() {
        let g = Generations { current: 1 << 40, full: 7 };
        assert_eq!(Generations::decode(&g.encode()), Some(g));
        assert_eq!(Generations::decode(&[0; 8]), None);
        assert_eq!(Generations::decode(&[0; 17]), None);
        assert_eq!(Generations::decode(&[]), None);
    }

    #[test]
    fn a_worker_follows_the_deltas_after_the_whole_table_it_has() {
        let g = Generations { current: 20, full: 10 };
        assert_eq!(catch_up(Some(20), g), Catchup::UpToDate);
        assert_eq!(catch_up(Some(10), g), Catchup::Deltas { from: 11, to: 20 });
        assert_eq!(catch_up(Some(19), g), Catchup::Deltas { from: 20, to: 20 });
        // Before the whole table (the ring may no longer hold those deltas), ahead of what
        // was published (a restarted poller), or no table at all: the whole table.
        assert_eq!(catch_up(Some(9), g), Catchup::Full);
        assert_eq!(catch_up(Some(21), g), Catchup::Full);
        assert_eq!(catch_up(None, g), Catchup::Full);
        assert_eq!(slot(RING + 3), 3);
    }

    #[test]
    fn a_delta_parses_in_place() {
        let d = Delta {
            generation: 5,
            runners: vec![(
                2,
                TableRunner { hints: vec!["a".into()], ..TableRunner::unpolled("1.2.3.4:5".into()) },
            )],
        };
        let bytes = d.encode();
        let r = DeltaRef::parse(&bytes).unwrap();
        assert_eq!(r.generation, 5);
        let (idx, t) = r.runners.into_iter().next().unwrap();
        assert_eq!((idx, t.into_owned()), d.runners[0].clone());
        assert!(DeltaRef::parse(b"{\"generation\":1}").is_none());
        assert!(DeltaRef::parse(b"garbage").is_none());
    }
}
