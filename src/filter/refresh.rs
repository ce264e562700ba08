//! A worker keeping its view up to date with what the poller publishes: the deltas since its
//! generation when the ring has them (work proportional to the runners that changed), else
//! the whole table (`hint_router_core::table::delta`).

use super::{vm_memory_bytes, State};
use crate::host;
use crate::{delta_key, GENERATION_KEY, TABLE_KEY};
use hint_router_core::table::delta::{catch_up, slot, Catchup, DeltaRef, Generations, RING};
use hint_router_core::table::TableRef;

impl State {
    /// Brings the view up to the newest published generation, if it is not there yet.
    pub(super) fn refresh(&mut self) {
        let published = match host::get_shared(GENERATION_KEY) {
            Ok((Some(g), _)) => Generations::decode(&g),
            Ok((None, _)) => return, // no table yet: route by the fallback policy
            Err(e) => {
                log::debug!("hint-router: cannot read table generation: {e}");
                host::increment_metric(self.metrics.table_errors, 1);
                return;
            }
        };
        let Some(published) = published else {
            log::warn!("hint-router: published generation does not parse; keeping the last table");
            host::increment_metric(self.metrics.table_errors, 1);
            return;
        };
        let plan = catch_up(self.seen_generation, published);
        if plan == Catchup::UpToDate {
            return; // the common case: no host call beyond the generation's read
        }
        let started = host::now_ns();
        // The deltas when the ring has them all, else (or if one is missing) the whole table.
        let caught_up = match plan {
            Catchup::Deltas { from, to } => self.apply_deltas(from, to),
            Catchup::UpToDate | Catchup::Full => false,
        };
        if !caught_up {
            self.load_whole(published);
        }
        let took_us = host::now_ns().saturating_sub(started) / 1000;
        host::increment_metric(self.metrics.table_reload_us, took_us as i64);
        log::debug!(
            "hint-router: table generation {} loaded in {took_us} us",
            self.router.view().generation()
        );
    }

    /// Loads the whole table, then the deltas published after it up to `published.current`.
    fn load_whole(&mut self, published: Generations) {
        let bytes = match host::get_shared(TABLE_KEY) {
            Ok((Some(bytes), _)) => bytes,
            Ok((None, _)) => return,
            Err(e) => {
                log::debug!("hint-router: cannot read table: {e}");
                host::increment_metric(self.metrics.table_errors, 1);
                return;
            }
        };
        let Some(t) = TableRef::parse(&bytes) else {
            log::warn!(
                "hint-router: published table does not parse ({} bytes); keeping the last one",
                bytes.len()
            );
            host::increment_metric(self.metrics.table_errors, 1);
            return;
        };
        let generation = t.generation;
        // Parsed in place; copies and re-indexes only the runners that changed.
        self.router.refresh(|view| view.refresh_from_ref(t));
        self.seen_generation = Some(generation);
        host::increment_metric(self.metrics.table_reloads, 1);
        host::record_metric(self.metrics.vm_memory, vm_memory_bytes());
        if generation < published.current && !self.apply_deltas(generation + 1, published.current) {
            // The ring moved on while we read: the next request catches up from here.
            log::debug!("hint-router: table deltas after generation {generation} changed while read");
        }
    }

    /// Applies the deltas of generations `from..=to`; false at the first one missing, not
    /// that generation, or not for this runner list (the view then stays at the last one
    /// applied).
    fn apply_deltas(&mut self, from: u64, to: u64) -> bool {
        if to < from || to - from >= RING {
            return false;
        }
        for generation in from..=to {
            let bytes = match host::get_shared(&delta_key(slot(generation))) {
                Ok((Some(bytes), _)) => bytes,
                _ => return false,
            };
            let Some(delta) = DeltaRef::parse(&bytes) else {
                host::increment_metric(self.metrics.table_errors, 1);
                return false;
            };
            if delta.generation != generation || !self.router.apply_delta(delta) {
                return false;
            }
            self.seen_generation = Some(generation);
            host::increment_metric(self.metrics.table_deltas, 1);
        }
        true
    }
}
