//! The report's three SVG plots: the latency CDF over all pairs, the
//! histogram of wire copies per node, and reliability over publish time.

use std::ops::Range;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::Bucket;

/// At most this many steps are drawn in the latency CDF (a 100k-pair run
/// would otherwise weigh megabytes for no visible gain).
const CDF_MAX_POINTS: usize = 2000;

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Renders an 800x500 SVG: a titled chart with labelled axes on which
/// `draw` draws, or only the title and "no data" when `axes` is `None`.
fn plot(
    title: &str,
    axes: Option<(Range<f64>, Range<f64>)>,
    (x_desc, y_desc): (&str, &str),
    draw: impl FnOnce(&mut Chart<'_, '_>) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        if let Some((x, y)) = axes {
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 22))
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(60)
                .build_cartesian_2d(x, y)?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .draw()?;
            draw(&mut chart)?;
        } else {
            root.titled(&format!("{title}: no data"), ("sans-serif", 24))?;
        }
        root.present()?;
    }
    Ok(buf)
}

/// Empirical CDF over *all* pairs: y is the fraction of pairs delivered
/// within x ms, so the curve levels off at the reliability.
pub(super) fn plot_cdf(sorted: &[f64], pairs: usize) -> anyhow::Result<String> {
    let title = format!(
        "Delivery latency CDF ({} of {pairs} pairs delivered)",
        sorted.len()
    );
    let lo = sorted.first().map_or(0.0, |&f| f.min(0.0));
    let axes = sorted.last().map(|&hi| (lo..hi.max(lo + 1.0), 0.0..1.0));
    let n = pairs.max(sorted.len()) as f64;
    let stride = sorted.len().div_ceil(CDF_MAX_POINTS).max(1);
    let mut points = vec![(lo, 0.0)];
    for (i, &x) in sorted.iter().enumerate() {
        if (i + 1) % stride == 0 || i + 1 == sorted.len() {
            let below = points.last().map_or(0.0, |p| p.1);
            points.extend([(x, below), (x, (i + 1) as f64 / n)]);
        }
    }
    let labels = (
        "delivery latency (ms, model time)",
        "fraction of (message, member) pairs",
    );
    plot(&title, axes, labels, |chart| {
        chart.draw_series(LineSeries::new(points, &BLUE))?;
        Ok(())
    })
}

/// Histogram of the per-node average wire copies per message.
pub(super) fn plot_dups(values: &[f64]) -> anyhow::Result<String> {
    let title = format!("Wire copies per message, per node ({} nodes)", values.len());
    let lo = values.iter().copied().min_by(f64::total_cmp).unwrap_or(0.0);
    let hi = values.iter().copied().max_by(f64::total_cmp).unwrap_or(0.0);
    // One value everywhere: a single unit-wide bin centred on it.
    let (lo, hi, bins) = if hi - lo < 1e-9 {
        (lo - 0.5, hi + 0.5, 1)
    } else {
        (lo, hi, 20)
    };
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0usize; bins];
    for &v in values {
        counts[(((v - lo) / width) as usize).min(bins - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0) as f64 + 1.0;
    let axes = (!values.is_empty()).then_some((lo..hi, 0.0..top));
    let labels = (
        "wire copies received per message (duplicates included)",
        "nodes",
    );
    plot(&title, axes, labels, |chart| {
        chart.draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let x0 = lo + i as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width, c as f64)], BLUE.mix(0.6).filled())
        }))?;
        Ok(())
    })
}

/// Reliability of each 1 s bucket of publish time.
pub(super) fn plot_rel(buckets: &[Bucket]) -> anyhow::Result<String> {
    let points: Vec<(f64, f64)> = buckets
        .iter()
        .filter_map(|b| Some((b.t_s as f64, b.reliability?)))
        .collect();
    let axes = points.last().map(|&(last, _)| (0.0..last + 1.0, 0.0..1.05));
    let labels = (
        "publish time (s, model time)",
        "reliability (delivered pairs / pairs)",
    );
    plot(
        "Reliability per 1 s of publish time",
        axes,
        labels,
        |chart| {
            chart.draw_series(LineSeries::new(points.iter().copied(), &BLUE))?;
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))?;
            Ok(())
        },
    )
}
