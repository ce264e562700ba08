//! Synthetic runner tables: `n` runners with `h` hints each, every hint held by two runners.

use hint_router_core::table::{Table, TableRunner};

/// Hints per runner used throughout the benchmark.
pub const HINTS_PER_RUNNER: usize = 100;

/// Name of hint number `id`.
pub fn hint_name(id: usize) -> String {
    format!("model-{id:06}")
}

/// Hint ids of runner `i` of `n`, `h` hints each: a window of `h` ids starting at `i * h / 2`
/// (mod `n * h / 2`), so neighbouring runners share half their hints and every hint is held by
/// two runners (for `n >= 2`).
pub fn runner_hint_ids(i: usize, n: usize, h: usize) -> impl Iterator<Item = usize> {
    let step = (h / 2).max(1);
    let space = (n * step).max(h);
    (0..h).map(move |j| (i * step + j) % space)
}

/// Hints of runner `i` of `n`.
pub fn runner_hints(i: usize, n: usize, h: usize) -> Vec<String> {
    runner_hint_ids(i, n, h).map(hint_name).collect()
}

/// A hint held by runners 0 and `n - 1`: the hit case.
pub fn hit_hint() -> String {
    hint_name(0)
}

/// A hint nobody holds: the miss case.
pub fn miss_hint() -> String {
    "model-nobody-holds-this".to_string()
}

/// Capacity reported by every synthetic runner (above its hint count: it has a free slot).
pub const CAPACITY: u32 = 128;

/// `max_concurrency` reported by every synthetic runner.
pub const MAX_CONCURRENCY: u32 = 1000;

/// A published table for runners at `addrs`, `h` hints each, all available.
pub fn table_for(addrs: &[String], h: usize) -> Table {
    let n = addrs.len();
    Table {
        generation: 1,
        runners: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| TableRunner {
                addr: a.clone(),
                available: true,
                hints: runner_hints(i, n, h),
                capacity: CAPACITY,
                max_concurrency: MAX_CONCURRENCY,
                queue_token: 0,
                unreachable: false,
                warm: Vec::new(),
            })
            .collect(),
    }
}

/// Addresses `127.0.0.1:20000..` for `n` runners.
pub fn fake_addrs(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("127.0.0.1:{}", 20000 + i)).collect()
}

/// A table of `n` fake runners with `h` hints each.
pub fn table(n: usize, h: usize) -> Table {
    table_for(&fake_addrs(n), h)
}

/// In-flight counts for `n` runners: a few requests spread around (none busy).
pub fn loads(n: usize) -> Vec<u32> {
    (0..n).map(|i| (i as u32 * 7) % 4).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hint_router_core::table::View;

    #[test]
    fn every_hint_is_held_by_two_runners() {
        for n in [2usize, 8, 100] {
            let v = View::from_table(&table(n, HINTS_PER_RUNNER));
            assert_eq!(v.hint_count(), n * HINTS_PER_RUNNER / 2, "n={n}");
            assert_eq!(v.holders(&hit_hint()), &[0, n as u32 - 1], "n={n}");
            assert!(v.holders(&miss_hint()).is_empty());
        }
    }
}
