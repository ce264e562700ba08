//! The report of a `backend-bench` run as Markdown tables.

use std::time::Duration;

use super::{LoadRow, Report};
use crate::cli::BackendKind;

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn gibs(bytes: u64, d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs > 0.0 && bytes > 0 {
        format!("{:.2}", bytes as f64 / secs / f64::from(1u32 << 30))
    } else {
        "-".to_string()
    }
}

/// `floor / load`, as the targets read (1.00: as fast as the floor).
fn ratio(floor: Duration, load: Duration) -> String {
    if load.is_zero() {
        "-".to_string()
    } else {
        format!("{:.2}", floor.as_secs_f64() / load.as_secs_f64())
    }
}

/// The floors a row's cold and warm loads are measured against (see [`tables`]).
fn floors_of(report: &Report, r: &LoadRow) -> (Duration, Duration) {
    let floor = report.floors.iter().find(|f| f.size_mb == r.size_mb);
    let read = floor.map(|f| f.read.median).unwrap_or_default();
    let pinned = floor.and_then(|f| f.pinned_copy.map(|p| p.median));
    match (r.backend, pinned) {
        (BackendKind::Cuda, Some(p)) => (read.max(p), p),
        _ => (read, read),
    }
}

/// The report as Markdown tables.
pub fn tables(report: &Report) -> String {
    let mut out = String::from(
        "Floors (median; GiB/s of the file's bytes):\n\n\
         | model MiB | file bytes | page-cache read ms | GiB/s | read into a new buffer ms | GiB/s | pinned host-to-device copy ms | GiB/s |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for f in &report.floors {
        let (pinned_ms, pinned_rate) = match f.pinned_copy {
            Some(p) => (ms(p.median), gibs(f.file_bytes, p.median)),
            None => ("unmeasured".to_string(), "-".to_string()),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            f.size_mb,
            f.file_bytes,
            ms(f.read.median),
            gibs(f.file_bytes, f.read.median),
            ms(f.read_fresh.median),
            gibs(f.file_bytes, f.read_fresh.median),
            pinned_ms,
            pinned_rate
        ));
    }
    out.push_str(&format!(
        "\nLoads (median ms, and floor/load: 1.00 = the floor's speed; cuda cold loads against \
         min(read, pinned copy), warm re-loads against the pinned copy) and hits, {} load-check thread(s):\n\n\
         | backend | model MiB | first load ms | x floor | re-load ms | x floor | warm re-load ms | x floor | hit ms (median) | hit ms (p90) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        report.load_threads
    ));
    for r in &report.rows {
        let (cold_floor, warm_floor) = floors_of(report, r);
        let real = r.backend != BackendKind::Sim;
        let x = |floor: Duration, load: Duration| if real { ratio(floor, load) } else { "-".to_string() };
        let (warm_ms, warm_x) = match r.warm {
            Some(w) => (ms(w.median), x(warm_floor, w.median)),
            None => ("-".to_string(), "-".to_string()),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.backend,
            r.size_mb,
            ms(r.first.median),
            x(cold_floor, r.first.median),
            ms(r.reload.median),
            x(cold_floor, r.reload.median),
            warm_ms,
            warm_x,
            ms(r.hit.median),
            ms(r.hit.p90)
        ));
    }
    if report.rows.iter().any(|r| !r.first_by_threads.is_empty()) {
        out.push_str(
            "\nFirst loads (checked in full: BLAKE3 and values) by load-check threads (`--load-threads`), median:\n\n\
             | backend | model MiB | load threads | first load ms | GiB/s | x floor |\n\
             | --- | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for r in &report.rows {
            let (cold_floor, _) = floors_of(report, r);
            for (threads, first) in &r.first_by_threads {
                out.push_str(&format!(
                    "| {} | {} | {threads} | {} | {} | {} |\n",
                    r.backend,
                    r.size_mb,
                    ms(first.median),
                    gibs(r.weight_bytes, first.median),
                    ratio(cold_floor, first.median)
                ));
            }
        }
    }
    if let Some(h) = &report.hits {
        let ratio = |a: Duration, b: Duration| {
            if a.is_zero() {
                "-".to_string()
            } else {
                format!("{:.2}", b.as_secs_f64() / a.as_secs_f64())
            }
        };
        out.push_str(&format!(
            "\nHits on a resident {} MiB model (cpu runner), alone and while the same backend loads a {} MiB model \
             ({} loads, each checked in full by {} load-check thread(s)):\n\n\
             | hits | p50 ms | p99 ms |\n| --- | ---: | ---: |\n\
             | alone | {} | {} |\n| during loads | {} | {} |\n| during / alone | {} | {} |\n",
            h.hit_mb,
            h.load_mb,
            h.loads,
            report.load_threads,
            ms(h.alone.median),
            ms(h.alone.p99),
            ms(h.during.median),
            ms(h.during.p99),
            ratio(h.alone.median, h.during.median),
            ratio(h.alone.p99, h.during.p99)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_read_as_the_targets() {
        assert_eq!(ratio(Duration::from_millis(7), Duration::from_millis(10)), "0.70");
        assert_eq!(ratio(Duration::from_millis(7), Duration::ZERO), "-");
    }
}
