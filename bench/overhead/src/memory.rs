//! Native estimate of a filter VM's heap at a table size, with [`crate::alloc::CountingAlloc`].
//!
//! It replays what one worker VM holds: the indexed [`View`] (steady state), the in-flight
//! buffers, and during a refresh also the table bytes copied out of shared data and the
//! in-place parse ([`TableRef`]). Sizes are x86_64 sizes (pointers of 8 bytes); wasm32 has
//! 4-byte pointers, so the filter's own heap is smaller.

use crate::alloc;
use crate::fixture;
use hint_router_core::table::{Table, TableRef, View};
use serde::Serialize;

/// Heap bytes for one table size.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryEstimate {
    /// Runners.
    pub runners: usize,
    /// Hints per runner.
    pub hints_per_runner: usize,
    /// Size of the published table (JSON) in shared data.
    pub table_json_bytes: usize,
    /// Heap held by a decoded [`Table`] (for reference: the filter parses in place).
    pub table_heap_bytes: usize,
    /// Heap held by the worker's [`View`] between refreshes.
    pub view_heap_bytes: usize,
    /// Per-request buffers: the in-flight bytes read from shared data and their decoded
    /// counts (`n * 4` bytes each).
    pub inflight_bytes: usize,
    /// Highest heap use during the first load (JSON copy + in-place parse + new view).
    pub first_load_peak_heap_bytes: usize,
    /// Highest heap use during a refresh that changes one runner (view + JSON copy + in-place
    /// parse + the changed runner's new strings).
    pub refresh_peak_heap_bytes: usize,
}

/// Measures one size. Needs the counting allocator installed (else every figure is 0).
pub fn estimate(n: usize, h: usize) -> Option<MemoryEstimate> {
    if !alloc::installed() {
        // Count something so `installed` can tell.
        drop(std::hint::black_box(vec![0u8; 16]));
        if !alloc::installed() {
            return None;
        }
    }
    let json = fixture::table(n, h).encode();
    alloc::start();
    let r = measure(&json, n, h);
    alloc::stop();
    r
}

fn measure(json: &[u8], n: usize, h: usize) -> Option<MemoryEstimate> {
    let b0 = alloc::live();
    let table = Table::decode(json)?;
    let table_heap_bytes = alloc::live().saturating_sub(b0);
    drop(table);

    // First load, as the filter does it: the shared-data copy, the in-place parse, the view.
    alloc::reset_peak();
    let copy = std::hint::black_box(json.to_vec());
    let mut view = View::default();
    view.refresh_from_ref(TableRef::parse(&copy)?);
    drop(copy);
    let first_load_peak_heap_bytes = alloc::peak().saturating_sub(b0);
    let view_heap_bytes = alloc::live().saturating_sub(b0);

    // A refresh in which one runner changed.
    let mut changed = fixture::table(n, h);
    if let Some(r) = changed.runners.first_mut() {
        r.hints.pop();
        r.hints.push("model-churn".into());
    }
    let changed = changed.encode();
    let b1 = alloc::live();
    alloc::reset_peak();
    let copy = std::hint::black_box(changed.clone());
    view.refresh_from_ref(TableRef::parse(&copy)?);
    drop(copy);
    let refresh_peak_heap_bytes = alloc::peak().saturating_sub(b1) + view_heap_bytes;
    drop(std::hint::black_box(view));
    Some(MemoryEstimate {
        runners: n,
        hints_per_runner: h,
        table_json_bytes: json.len(),
        table_heap_bytes,
        view_heap_bytes,
        inflight_bytes: 2 * 4 * n,
        first_load_peak_heap_bytes,
        refresh_peak_heap_bytes,
    })
}

/// Prints `rows` as the memory table both the overhead benchmark and the criterion bench show.
pub fn print_table(title: &str, rows: &[MemoryEstimate]) {
    println!("{title}");
    println!(
        "{:>8} {:>8} {:>14} {:>14} {:>14} {:>14} {:>14} {:>14}",
        "runners",
        "hints",
        "table JSON",
        "Table heap",
        "View heap",
        "in-flight",
        "1st load peak",
        "refresh peak"
    );
    for m in rows {
        println!(
            "{:>8} {:>8} {:>14} {:>14} {:>14} {:>14} {:>14} {:>14}",
            m.runners,
            m.hints_per_runner,
            m.table_json_bytes,
            m.table_heap_bytes,
            m.view_heap_bytes,
            m.inflight_bytes,
            m.first_load_peak_heap_bytes,
            m.refresh_peak_heap_bytes
        );
    }
}
