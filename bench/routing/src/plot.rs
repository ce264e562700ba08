//! The SVG plot: p99 latency and hit rate against offered load, one line per policy (real
//! runs solid, simulator dashed), Belady's bound on the hit-rate panel.

use crate::bench::{PointResult, PolicyResult};
use crate::sim::Policy;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

fn color(p: Policy) -> RGBColor {
    match p {
        Policy::Hint => RGBColor(214, 39, 40),
        Policy::HintFastest => RGBColor(140, 20, 20),
        Policy::RoundRobin => RGBColor(31, 119, 180),
        Policy::LeastRequest => RGBColor(44, 160, 44),
        Policy::RingHash => RGBColor(148, 103, 189),
        Policy::RingHashBounded => RGBColor(255, 127, 14),
    }
}

type Series = Vec<(f64, f64)>;

fn series(points: &[&PointResult], policy: Policy, real: bool, f: impl Fn(&PolicyResult) -> f64) -> Series {
    points
        .iter()
        .filter_map(|p| {
            let list = if real { &p.real } else { &p.sim };
            list.iter().find(|r| r.policy == policy).map(|r| (p.point.load * 100.0, f(r)))
        })
        .collect()
}

/// Plots the points of `workload` (its load sweep) into an SVG at `path`.
pub fn plot(path: &Path, results: &[PointResult], workload: &str, title: &str) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plot: {e}");
    let mut points: Vec<&PointResult> =
        results.iter().filter(|p| p.point.workload.to_string() == workload).collect();
    points.sort_by(|a, b| a.point.load.total_cmp(&b.point.load));
    let policies: Vec<Policy> = Policy::ALL
        .into_iter()
        .filter(|&p| points.iter().any(|r| r.real.iter().chain(&r.sim).any(|x| x.policy == p)))
        .collect();
    let xmax = points.iter().map(|p| p.point.load * 100.0).fold(0.0, f64::max).max(10.0) + 5.0;
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(600);

    let lat_max = points
        .iter()
        .flat_map(|p| p.real.iter().chain(&p.sim))
        .map(|r| r.summary.p99_ms)
        .fold(100.0, f64::max)
        * 1.5;
    let lat_min = points
        .iter()
        .flat_map(|p| p.real.iter().chain(&p.sim))
        .map(|r| r.summary.p99_ms)
        .fold(f64::INFINITY, f64::min)
        .clamp(1.0, 100.0)
        / 1.5;
    let mut chart = ChartBuilder::on(&left)
        .caption("p99 latency (ms, log scale)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..xmax, (lat_min..lat_max).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("offered load, % of capacity")
        .y_desc("p99 ms")
        .draw()
        .map_err(|e| err(&e))?;
    for &pol in &policies {
        let c = color(pol);
        let real = series(&points, pol, true, |r| r.summary.p99_ms.max(lat_min));
        let sim = series(&points, pol, false, |r| r.summary.p99_ms.max(lat_min));
        if !real.is_empty() {
            chart
                .draw_series(LineSeries::new(real.clone(), c.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(format!("{pol} (real)"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            chart.draw_series(real.iter().map(|&p| Circle::new(p, 4, c.filled()))).map_err(|e| err(&e))?;
        }
        if !sim.is_empty() {
            chart
                .draw_series(DashedLineSeries::new(sim, 6, 4, c.stroke_width(1)))
                .map_err(|e| err(&e))?
                .label(format!("{pol} (sim)"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(1)));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 11))
        .draw()
        .map_err(|e| err(&e))?;

    let mut chart = ChartBuilder::on(&right)
        .caption("cache hit rate (%)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..xmax, 0.0..100.0)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("offered load, % of capacity")
        .y_desc("hit %")
        .draw()
        .map_err(|e| err(&e))?;
    let belady: Series = points.iter().map(|p| (p.point.load * 100.0, p.bounds.belady * 100.0)).collect();
    let lru: Series = points.iter().map(|p| (p.point.load * 100.0, p.bounds.lru * 100.0)).collect();
    chart
        .draw_series(LineSeries::new(belady, BLACK.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("Belady bound (pooled cache)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    let ideal: Series = points.iter().map(|p| (p.point.load * 100.0, p.bounds.ideal * 100.0)).collect();
    chart
        .draw_series(DashedLineSeries::new(ideal, 2, 3, BLACK.stroke_width(1)))
        .map_err(|e| err(&e))?
        .label("static ideal (load times counted)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(1)));
    let grey = RGBColor(128, 128, 128);
    chart
        .draw_series(DashedLineSeries::new(lru, 6, 4, grey.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("global LRU (pooled cache)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(2)));
    for &pol in &policies {
        let c = color(pol);
        let real = series(&points, pol, true, |r| r.summary.hit_rate * 100.0);
        let sim = series(&points, pol, false, |r| r.summary.hit_rate * 100.0);
        if !real.is_empty() {
            chart.draw_series(LineSeries::new(real.clone(), c.stroke_width(2))).map_err(|e| err(&e))?;
            chart.draw_series(real.iter().map(|&p| Circle::new(p, 4, c.filled()))).map_err(|e| err(&e))?;
        }
        if !sim.is_empty() {
            chart.draw_series(DashedLineSeries::new(sim, 6, 4, c.stroke_width(1))).map_err(|e| err(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 11))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
