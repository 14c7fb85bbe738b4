//! The report of a run: a pure function from a [`RunRecord`] to the figures
//! researchers expect (`summary.json`, `summary.csv`) and three SVG plots.
//!
//! Every figure is defined in the doc comment of its field; the simulator
//! guide quotes them. Vocabulary:
//! - a *pair* is a (published message, one of its `recipients`);
//! - a pair is *delivered* when that node has a `Delivered` receipt for the
//!   message, by wire or by sync; its *delivery time* is the earliest one;
//! - the *nearest-rank percentile* `pP` of `n` sorted values is the value at
//!   1-based rank `ceil(P/100 * n)` (at least 1): always a sample, never
//!   interpolated; `None` without values. The *median* is `p50` (the lower
//!   median for even `n`).
//!
//! Times are model milliseconds (see [`crate::record`]). Receipts naming an
//! id that was never published only count in `unknown_receipts` and
//! `app_duplicates`. In `summary.json` and `summary.csv`, `None` is null
//! and empty.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::ops::Range;
use std::path::Path;

use anyhow::Context as _;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::record::{FaultKind, Published, ReceiptKind, RunRecord};

/// At most this many steps are drawn in the latency CDF (a 100k-pair run
/// would otherwise weigh megabytes for no visible gain).
const CDF_MAX_POINTS: usize = 2000;
/// Host lag (p99) above this many ms always counts as host-limited.
const LAG_ABS_LIMIT_MS: f64 = 20.0;
/// Host lag (p99) above this fraction of the median link latency, plus
/// [`TIMER_RESOLUTION_MS`], counts as host-limited.
const LAG_REL_LIMIT: f64 = 0.1;
/// tokio's timers fire on a 1 ms wheel, so even an idle runtime shows about
/// 1 to 2 ms of lag; every modelled delay has the same granularity, so this
/// much is not the host shaping the results.
const TIMER_RESOLUTION_MS: f64 = 2.0;

/// The content of `summary.json` (and, flattened, of `summary.csv`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// The seed that reproduces the run.
    pub seed: u64,
    /// Number of nodes.
    pub nodes: usize,
    /// Number of published messages.
    pub messages: usize,
    /// Time-dilation factor (1 = real time).
    pub time_dilation: f64,
    /// Model duration of the run, ms.
    pub duration_ms: f64,
    /// Wall-clock duration of the run, seconds.
    pub wall_secs: f64,
    /// Peak resident memory of the simulator, KiB.
    pub peak_rss_kib: u64,
    /// Number of pairs: the sum over messages of the number of recipients.
    pub pairs: usize,
    /// Number of delivered pairs.
    pub delivered_pairs: usize,
    /// `delivered_pairs / pairs`; `None` when there are no pairs.
    pub reliability: Option<f64>,
    /// Delivery latency over delivered pairs: delivery time minus the
    /// message's publish time.
    pub latency_ms: Dist,
    /// Per message, the time after publishing until 90/95/99/100 % of its
    /// recipients had delivered it (gossipsub-interop style).
    pub reach_ms: Reach,
    /// Wire copies per message, per node: for each node with at least one
    /// `Wire` receipt, its `Wire` receipts (duplicates included) divided by
    /// the number of distinct messages it received on the wire; then taken
    /// over those nodes (publishers of their own messages and sync-only
    /// deliveries add no copies). About D-1 in a gossipsub mesh of degree D.
    pub dup_per_node: Dist,
    /// Total `Wire` receipts: copies received on the wire by all nodes.
    pub wire_copies: u64,
    /// Fraction of the copies received on the wire that were duplicates:
    /// (wire copies - (node, message) pairs with at least one copy) / wire
    /// copies. Not an application duplicate rate: 0.80-0.86 is normal for
    /// gossipsub at D=6. `None` without wire copies.
    pub duplicate_fraction_wire: Option<f64>,
    /// `DuplicateDelivery` receipts (any id): messages the application got
    /// twice. Must be 0.
    pub app_duplicates: u64,
    /// Receipts naming a message id that was never published (should be 0).
    pub unknown_receipts: u64,
    /// Transport bytes sent per node (everything: gossip, control, identify,
    /// Kademlia, sync), over the entries of `bytes_sent`.
    pub bytes_sent_per_node: Dist,
    /// (Sum over all `Wire` receipts of the message's `wire_size`) / nodes.
    /// Every copy received was sent by someone, so this is the mean gossip
    /// payload a node sent. `None` when there are no nodes.
    pub payload_bytes_per_node: Option<f64>,
    /// `bytes_sent_per_node.mean - payload_bytes_per_node`: what a node sent
    /// besides gossip frames (framing, control, discovery, sync).
    pub overhead_bytes_per_node: Option<f64>,
    /// `overhead_bytes_per_node / bytes_sent_per_node.mean`.
    pub overhead_ratio: Option<f64>,
    /// Catch-up after partitions heal; `None` when the run had no fault
    /// window of kind `partition`.
    pub catchup_ms: Option<Catchup>,
    /// The median one-way link latency of the network model, ms.
    pub median_link_latency_ms: f64,
    /// Scheduling lag of the simulator's runtime (how late a 10 ms timer
    /// fired), over the `lag_ms` samples, ms.
    pub lag_ms: Dist,
    /// True when the host, not the network model, may have set the
    /// numbers (see `host_limited_rule`); false when there are no samples.
    pub host_limited: bool,
    /// The rule behind `host_limited`, in words, with its thresholds.
    pub host_limited_rule: String,
    /// `"raise --time-dilation"` when `host_limited`, else `None`.
    pub advice: Option<String>,
    /// Reliability per 1 s of publish time: bucket `t_s` holds the messages
    /// published in `[t_s, t_s + 1)` s; non-empty buckets only. A series:
    /// in `summary.json` and the plot, not in the CSV.
    pub reliability_over_time: Vec<Bucket>,
}

/// A distribution: count, mean, nearest-rank percentiles and max.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Dist {
    /// Number of values.
    pub count: usize,
    /// Arithmetic mean.
    pub mean: Option<f64>,
    /// Nearest-rank 50th percentile (the median).
    pub p50: Option<f64>,
    /// Nearest-rank 90th percentile.
    pub p90: Option<f64>,
    /// Nearest-rank 95th percentile.
    pub p95: Option<f64>,
    /// Nearest-rank 99th percentile.
    pub p99: Option<f64>,
    /// Largest value.
    pub max: Option<f64>,
}

/// Time to reach `ceil(P/100 * recipients)` deliveries, per fraction P.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Reach {
    /// P = 90.
    pub p90_of_members: ReachStat,
    /// P = 95.
    pub p95_of_members: ReachStat,
    /// P = 99.
    pub p99_of_members: ReachStat,
    /// P = 100: every recipient.
    pub p100_of_members: ReachStat,
}

/// One reach figure over the messages that have recipients, ms after
/// publishing. A message that never reached the fraction counts as
/// infinitely late: `max` is `None` if any message never reached it,
/// `median` if more than half never did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReachStat {
    /// Messages that reached the fraction.
    pub reached: usize,
    /// Nearest-rank median over messages.
    pub median: Option<f64>,
    /// Maximum over messages.
    pub max: Option<f64>,
}

/// Catch-up after partitions. For each window of kind `partition`: among
/// messages published before its `end_ms`, each recipient pair delivered
/// after `end_ms` is *late* by (delivery time - `end_ms`), and each pair
/// never delivered is *undelivered*. Counts are summed over windows (a pair
/// counts once per window it outlived), `max` over all of them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Catchup {
    /// Number of `partition` windows.
    pub partitions: usize,
    /// Time until the last missing message reached its member after the
    /// heal; `None` if no pair was late.
    pub max: Option<f64>,
    /// Late pairs.
    pub pairs: usize,
    /// Undelivered pairs.
    pub undelivered_after_heal: usize,
}

/// Reliability of the messages published in one second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    /// Start of the bucket, whole seconds of model time.
    pub t_s: u64,
    /// Messages published in the bucket.
    pub messages: usize,
    /// Their pair reliability; `None` if they have no recipients.
    pub reliability: Option<f64>,
}

/// What the plots need besides the summary.
struct Series {
    /// Delivery latencies of delivered pairs, sorted.
    latencies: Vec<f64>,
    /// Per node average wire copies per message (nodes with wire copies).
    dup_per_node: Vec<f64>,
}

/// What one node saw of one message.
#[derive(Default)]
struct AtNode {
    first_delivered: Option<f64>,
    wire: u64,
}

/// Computes every figure of the summary; see the field docs of [`Summary`].
#[cfg_attr(not(test), allow(dead_code))]
pub fn summarize(rec: &RunRecord) -> Summary {
    analyse(rec).0
}

/// Writes `summary.json`, `summary.csv`, `latency_cdf.svg`,
/// `duplicates_per_node.svg` and `reliability_over_time.svg` into `dir`
/// (created if missing) and returns the summary.
pub fn write_report(rec: &RunRecord, dir: &Path) -> anyhow::Result<Summary> {
    let (summary, series) = analyse(rec);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(&summary).context("serializing the summary")?;
    let files = [
        ("summary.json", json + "\n"),
        ("summary.csv", to_csv(&summary)?),
        (
            "latency_cdf.svg",
            plot_cdf(&series.latencies, summary.pairs)?,
        ),
        ("duplicates_per_node.svg", plot_dups(&series.dup_per_node)?),
        (
            "reliability_over_time.svg",
            plot_rel(&summary.reliability_over_time)?,
        ),
    ];
    for (name, content) in files {
        let path = dir.join(name);
        std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summary)
}

fn analyse(rec: &RunRecord) -> (Summary, Series) {
    let known: HashMap<&str, &Published> =
        rec.published.iter().map(|p| (p.id.as_str(), p)).collect();
    let (mut unknown_receipts, mut app_duplicates, mut payload) = (0u64, 0u64, 0u64);
    let mut at: HashMap<(usize, &str), AtNode> = HashMap::new();
    for r in &rec.receipts {
        app_duplicates += u64::from(r.kind == ReceiptKind::DuplicateDelivery);
        let Some(p) = known.get(r.id.as_str()) else {
            unknown_receipts += 1;
            continue;
        };
        let e = at.entry((r.node, p.id.as_str())).or_default();
        match r.kind {
            ReceiptKind::Wire => {
                e.wire += 1;
                payload += p.wire_size as u64;
            }
            // Receipts need not be in time order: keep the earliest.
            ReceiptKind::Delivered => {
                e.first_delivered = Some(e.first_delivered.map_or(r.t_ms, |t| t.min(r.t_ms)));
            }
            ReceiptKind::DuplicateDelivery => {}
        }
    }
    let delivered_at = |node, id| at.get(&(node, id)).and_then(|e: &AtNode| e.first_delivered);

    // Pairs, latencies, reach and the per-second buckets in one pass.
    let (mut pairs, mut latencies) = (0usize, Vec::new());
    let mut reach: [Vec<Option<f64>>; 4] = Default::default();
    let mut buckets: BTreeMap<u64, (usize, usize, usize)> = BTreeMap::new();
    for p in &rec.published {
        let mut lat: Vec<f64> = (p.recipients.iter())
            .filter_map(|&n| Some(delivered_at(n, &p.id)? - p.t_ms))
            .collect();
        lat.sort_by(f64::total_cmp);
        let k = p.recipients.len();
        pairs += k;
        if k > 0 {
            for (times, pct) in reach.iter_mut().zip([90, 95, 99, 100]) {
                // When the ceil(pct% of k)-th recipient delivered, if it did.
                times.push(lat.get(rank(pct, k) - 1).copied());
            }
        }
        // `as` saturates: negative or NaN times land in bucket 0.
        let b = buckets.entry((p.t_ms / 1000.0) as u64).or_default();
        *b = (b.0 + 1, b.1 + k, b.2 + lat.len());
        latencies.extend(lat);
    }
    latencies.sort_by(f64::total_cmp);
    let delivered_pairs = latencies.len();

    // Wire copies per node: (copies, distinct messages).
    let mut per_node: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
    for (&(node, _), e) in at.iter().filter(|(_, e)| e.wire > 0) {
        let n = per_node.entry(node).or_default();
        *n = (n.0 + e.wire, n.1 + 1);
    }
    let wire_copies: u64 = per_node.values().map(|n| n.0).sum();
    let first_copies: u64 = per_node.values().map(|n| n.1).sum();
    let dup_per_node: Vec<f64> = per_node
        .values()
        .map(|&(c, m)| c as f64 / m as f64)
        .collect();

    let bytes_sent_per_node = dist(rec.bytes_sent.iter().map(|&b| b as f64).collect());
    let payload_bytes_per_node = ratio(payload as f64, rec.nodes as f64);
    let overhead_bytes_per_node =
        (bytes_sent_per_node.mean.zip(payload_bytes_per_node)).map(|(b, p)| b - p);
    let overhead_ratio =
        (overhead_bytes_per_node.zip(bytes_sent_per_node.mean)).and_then(|(o, b)| ratio(o, b));

    let mut catchup_ms: Option<Catchup> = None;
    for w in rec.faults.iter().filter(|w| w.kind == FaultKind::Partition) {
        let c = catchup_ms.get_or_insert_with(Catchup::default);
        c.partitions += 1;
        for p in rec.published.iter().filter(|p| p.t_ms < w.end_ms) {
            for &n in &p.recipients {
                match delivered_at(n, &p.id) {
                    Some(t) if t > w.end_ms => {
                        c.pairs += 1;
                        c.max = Some(c.max.map_or(t - w.end_ms, |m| m.max(t - w.end_ms)));
                    }
                    Some(_) => {}
                    None => c.undelivered_after_heal += 1,
                }
            }
        }
    }

    let lag_ms = dist(rec.lag_ms.clone());
    let rel_limit = LAG_REL_LIMIT * rec.median_link_latency_ms + TIMER_RESOLUTION_MS;
    let host_limited = (lag_ms.p99).is_some_and(|p| p > rel_limit || p > LAG_ABS_LIMIT_MS);
    let host_limited_rule = format!(
        "lag_ms.p99 > {}% of median_link_latency_ms + {TIMER_RESOLUTION_MS} ms of timer \
         resolution (= {rel_limit} ms) or lag_ms.p99 > {LAG_ABS_LIMIT_MS} ms",
        LAG_REL_LIMIT * 100.0
    );
    let [p90, p95, p99, p100] = reach.map(reach_stat);

    let summary = Summary {
        scenario: rec.scenario.clone(),
        seed: rec.seed,
        nodes: rec.nodes,
        messages: rec.published.len(),
        time_dilation: rec.time_dilation,
        duration_ms: rec.duration_ms,
        wall_secs: rec.wall_secs,
        peak_rss_kib: rec.peak_rss_kib,
        pairs,
        delivered_pairs,
        reliability: ratio(delivered_pairs as f64, pairs as f64),
        latency_ms: dist(latencies.clone()),
        reach_ms: Reach {
            p90_of_members: p90,
            p95_of_members: p95,
            p99_of_members: p99,
            p100_of_members: p100,
        },
        dup_per_node: dist(dup_per_node.clone()),
        wire_copies,
        duplicate_fraction_wire: ratio((wire_copies - first_copies) as f64, wire_copies as f64),
        app_duplicates,
        unknown_receipts,
        bytes_sent_per_node,
        payload_bytes_per_node,
        overhead_bytes_per_node,
        overhead_ratio,
        catchup_ms,
        median_link_latency_ms: rec.median_link_latency_ms,
        lag_ms,
        host_limited,
        host_limited_rule,
        advice: host_limited.then(|| "raise --time-dilation".to_owned()),
        reliability_over_time: (buckets.into_iter())
            .map(|(t_s, (messages, pairs, delivered))| Bucket {
                t_s,
                messages,
                reliability: ratio(delivered as f64, pairs as f64),
            })
            .collect(),
    };
    let series = Series {
        latencies,
        dup_per_node,
    };
    (summary, series)
}

/// 1-based nearest rank of the `pct` percentile among `n` values:
/// `ceil(pct * n / 100)`, at least 1. Integer arithmetic, so that p90 of 10
/// values is rank 9 and not 10 (`0.9 * 10.0 = 9.000000000000002`).
fn rank(pct: usize, n: usize) -> usize {
    (pct * n).div_ceil(100).max(1)
}

/// Nearest-rank percentile of sorted values; `None` when empty.
fn nearest_rank<T: Copy>(sorted: &[T], pct: usize) -> Option<T> {
    sorted.get(rank(pct, sorted.len()) - 1).copied()
}

/// `a / b`, `None` when `b` is 0.
fn ratio(a: f64, b: f64) -> Option<f64> {
    (b != 0.0).then(|| a / b)
}

fn dist(mut v: Vec<f64>) -> Dist {
    v.sort_by(f64::total_cmp);
    Dist {
        count: v.len(),
        mean: ratio(v.iter().sum(), v.len() as f64),
        p50: nearest_rank(&v, 50),
        p90: nearest_rank(&v, 90),
        p95: nearest_rank(&v, 95),
        p99: nearest_rank(&v, 99),
        max: v.last().copied(),
    }
}

/// Median and max over messages, `None` (never reached) sorting last.
fn reach_stat(mut times: Vec<Option<f64>>) -> ReachStat {
    times.sort_by(|a, b| match (a, b) {
        (Some(x), Some(y)) => x.total_cmp(y),
        (a, b) => b.is_some().cmp(&a.is_some()),
    });
    ReachStat {
        reached: times.iter().flatten().count(),
        median: nearest_rank(&times, 50).flatten(),
        max: times.last().copied().flatten(),
    }
}

/// `metric,value` rows: the summary's scalars flattened with dots (keys in
/// alphabetical order), plain decimal numbers, `None` as empty, arrays left
/// out (they are series, in `summary.json` and the plots).
fn to_csv(summary: &Summary) -> anyhow::Result<String> {
    fn rows(v: &Value, key: &str, out: &mut String) {
        let value = match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let sub = if key.is_empty() {
                        k.clone()
                    } else {
                        format!("{key}.{k}")
                    };
                    rows(v, &sub, out);
                }
                return;
            }
            Value::Array(_) => return,
            Value::Null => String::new(),
            Value::Bool(b) => b.to_string(),
            // Rust's f64 Display never uses an exponent: plain decimal.
            Value::Number(n) => match (n.as_u64(), n.as_f64()) {
                (Some(u), _) => u.to_string(),
                (_, Some(f)) => f.to_string(),
                _ => n.to_string(),
            },
            Value::String(s) if s.contains([',', '"', '\n', '\r']) => {
                format!("\"{}\"", s.replace('"', "\"\""))
            }
            Value::String(s) => s.clone(),
        };
        let _ = writeln!(out, "{key},{value}");
    }
    let mut out = String::from("metric,value\n");
    let value = serde_json::to_value(summary).context("serializing the summary")?;
    rows(&value, "", &mut out);
    Ok(out)
}

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
fn plot_cdf(sorted: &[f64], pairs: usize) -> anyhow::Result<String> {
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
fn plot_dups(values: &[f64]) -> anyhow::Result<String> {
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
fn plot_rel(buckets: &[Bucket]) -> anyhow::Result<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Receipt;
    use ReceiptKind::*;

    type Msg<'a> = (&'a str, usize, f64, usize, &'a [usize]);

    /// A record from (id, publisher, t_ms, wire_size, recipients) and
    /// (t_ms, node, id, kind) tuples.
    fn record(msgs: &[Msg<'_>], receipts: &[(f64, usize, &str, ReceiptKind)]) -> RunRecord {
        let published = (msgs.iter().map(|&(id, publisher, t_ms, wire_size, to)| {
            let (id, recipients) = (id.to_owned(), to.to_vec());
            Published {
                id,
                publisher,
                t_ms,
                size: 10,
                wire_size,
                recipients,
            }
        }))
        .collect();
        let receipts = (receipts.iter().map(|&(t_ms, node, id, kind)| Receipt {
            t_ms,
            node,
            id: id.to_owned(),
            kind,
        }))
        .collect();
        RunRecord {
            published,
            receipts,
            ..Default::default()
        }
    }

    /// 3 nodes, 2 messages, every figure known by hand:
    /// - "a" (node 0, t=0, 100 B on the wire) to 1 and 2: node 1 gets two
    ///   wire copies and delivers at 10, then a second time (app duplicate);
    ///   node 2 delivers at 40 by sync (no wire copy).
    /// - "b" (node 1, t=1500, 200 B) to 0 and 2, during a partition
    ///   1000..2000: node 0 gets three copies and delivers at 2250; node 2
    ///   never delivers it.
    fn hand_made() -> RunRecord {
        let msgs: [Msg<'_>; 2] = [("a", 0, 0.0, 100, &[1, 2]), ("b", 1, 1500.0, 200, &[0, 2])];
        let receipts = [
            (30.0, 1, "a", Wire),
            (10.0, 1, "a", Wire),
            (10.0, 1, "a", Delivered),
            (40.0, 2, "a", Delivered),
            (70.0, 1, "a", DuplicateDelivery),
            (2250.0, 0, "b", Wire),
            (2250.0, 0, "b", Delivered),
            (2260.0, 0, "b", Wire),
            (2270.0, 0, "b", Wire),
        ];
        let faults = r#"[{"kind": "partition", "start_ms": 1000, "end_ms": 2000},
                         {"kind": "churn", "start_ms": 0, "end_ms": 2500}]"#;
        RunRecord {
            scenario: "hand, made".into(),
            nodes: 3,
            bytes_sent: vec![1000, 2000, 3000],
            lag_ms: vec![1.0, 1.0, 2.0, 30.0],
            faults: serde_json::from_str(faults).expect("faults"),
            median_link_latency_ms: 50.0,
            ..record(&msgs, &receipts)
        }
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(
            nearest_rank(&v, 90),
            Some(9.0),
            "no float round-up to rank 10"
        );
        assert_eq!(
            (nearest_rank(&v, 50), nearest_rank(&v, 91)),
            (Some(5.0), Some(10.0))
        );
        assert_eq!(
            (nearest_rank(&v, 0), nearest_rank::<f64>(&[], 50)),
            (Some(1.0), None)
        );
    }

    #[test]
    fn hand_made_figures() {
        let s = summarize(&hand_made());
        assert_eq!(
            (s.nodes, s.messages, s.pairs, s.delivered_pairs),
            (3, 2, 4, 3)
        );
        assert!(close(s.reliability, 0.75));
        // Latencies 10, 40, 750: nearest rank, not interpolated.
        let l = &s.latency_ms;
        assert_eq!(
            (l.count, l.p50, l.p90, l.p99),
            (3, Some(40.0), Some(750.0), Some(750.0))
        );
        assert!(close(l.mean, 800.0 / 3.0));
        // "a" reaches both members at 40; "b" never reaches its second.
        let r = &s.reach_ms.p100_of_members;
        assert_eq!((r.reached, r.median, r.max), (1, Some(40.0), None));
        // Node 1: 2 copies of 1 message; node 0: 3 of 1; node 2: none.
        let d = &s.dup_per_node;
        assert_eq!(
            (d.count, d.mean, d.p50, d.max),
            (2, Some(2.5), Some(2.0), Some(3.0))
        );
        assert_eq!(
            (s.wire_copies, s.app_duplicates, s.unknown_receipts),
            (5, 1, 0)
        );
        assert!(close(s.duplicate_fraction_wire, 3.0 / 5.0));
        // Payload: 2 x 100 + 3 x 200 = 800 B over 3 nodes; mean sent 2000.
        assert!(close(s.payload_bytes_per_node, 800.0 / 3.0));
        assert!(close(s.overhead_bytes_per_node, 2000.0 - 800.0 / 3.0));
        assert!(close(s.overhead_ratio, (2000.0 - 800.0 / 3.0) / 2000.0));
        // Only the partition counts: "b" at node 0 is 250 ms late, node 2 never.
        let c = s.catchup_ms.expect("a partition window");
        let c = (c.partitions, c.max, c.pairs, c.undelivered_after_heal);
        assert_eq!(c, (1, Some(250.0), 1, 1));
        // Buckets: second 0 ("a", 2/2) and second 1 ("b", 1/2).
        let b = s
            .reliability_over_time
            .iter()
            .map(|b| (b.t_s, b.messages, b.reliability));
        assert_eq!(
            b.collect::<Vec<_>>(),
            [(0, 1, Some(1.0)), (1, 1, Some(0.5))]
        );
        // Lag p99 = 30 ms > 5 ms (10 % of 50 ms).
        assert_eq!((s.lag_ms.p99, s.host_limited), (Some(30.0), true));
        assert_eq!(s.advice.as_deref(), Some("raise --time-dilation"));
    }

    #[test]
    fn host_limited_rule() {
        let limited = |lag_ms: Vec<f64>, median_link_latency_ms: f64| {
            let s = summarize(&RunRecord {
                lag_ms,
                median_link_latency_ms,
                ..hand_made()
            });
            assert_eq!(s.advice.is_some(), s.host_limited);
            s.host_limited
        };
        assert!(!limited(vec![3.0], 100.0), "under 10 % and under 20 ms");
        assert!(
            !limited(vec![11.0], 100.0),
            "within 10 % + the timer resolution"
        );
        assert!(
            limited(vec![12.5], 100.0),
            "over 10 % of the link latency + 2 ms"
        );
        assert!(
            !limited(vec![15.0], 500.0),
            "under 10 % of 500 ms and under 20 ms"
        );
        assert!(limited(vec![25.0], 500.0), "over 20 ms");
        assert!(!limited(vec![], 1.0), "no samples");
    }

    #[test]
    fn csv_rows() {
        let csv = to_csv(&summarize(&hand_made())).expect("csv");
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "metric,value");
        for row in [
            "latency_ms.p99,750",
            "reliability,0.75",
            "host_limited,true",
        ] {
            assert!(lines.contains(&row), "{row} in {csv}");
        }
        assert!(
            lines.contains(&"reach_ms.p100_of_members.max,"),
            "None is empty"
        );
        assert!(lines.contains(&"scenario,\"hand, made\""), "quoted");
        assert!(
            !csv.contains("reliability_over_time"),
            "series are left out"
        );
        let values = lines.iter().filter_map(|l| Some(l.split_once(',')?.1));
        let mut numbers = values.filter(|v| v.parse::<f64>().is_ok());
        assert!(numbers.all(|v| !v.contains(['e', 'E'])), "plain decimal");
    }

    #[test]
    fn write_report_creates_five_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (sub, rec) in [("full", hand_made()), ("empty", RunRecord::default())] {
            let out = dir.path().join(sub);
            write_report(&rec, &out).expect("report");
            let read = |name: &str| std::fs::read_to_string(out.join(name)).expect(name);
            let json: Value = serde_json::from_str(&read("summary.json")).expect("json");
            assert!(json.get("reliability").is_some());
            assert!(read("summary.csv").starts_with("metric,value\n"));
            for svg in [
                "latency_cdf.svg",
                "duplicates_per_node.svg",
                "reliability_over_time.svg",
            ] {
                let text = read(svg);
                assert!(text.starts_with("<svg"), "{sub}/{svg}");
                assert_eq!(text.contains("no data"), sub == "empty", "{sub}/{svg}");
            }
        }
    }

    /// Pseudo-random run (an LCG, no rand dependency) checked against
    /// counts taken straight from the receipts.
    #[test]
    fn figures_agree_with_direct_counts() {
        let mut x: u64 = 0x5eed;
        let mut next = move |m: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % m
        };
        let (mut msgs, mut receipts, ids) = (vec![], vec![], (0..50).map(|m| m.to_string()));
        let ids: Vec<String> = ids.collect();
        let members: Vec<usize> = (0..20).collect();
        for (m, id) in ids.iter().enumerate() {
            let (publisher, t0) = (next(20) as usize, m as f64 * 100.0);
            msgs.push((id.as_str(), publisher, t0, 120, &members[..]));
            for n in (0..20).filter(|&n| n != publisher) {
                let copies = next(5);
                receipts.extend((0..copies).map(|c| (t0 + 5.0 * c as f64, n, id.as_str(), Wire)));
                if copies > 0 || next(2) == 0 {
                    receipts.push((t0 + next(300) as f64, n, id.as_str(), Delivered));
                }
            }
        }
        // Every node is a recipient, the publisher too (it never delivers).
        let rec = RunRecord {
            nodes: 20,
            ..record(&msgs, &receipts)
        };
        let s = summarize(&rec);
        let count = |k| rec.receipts.iter().filter(|r| r.kind == k).count();
        let (delivered, wire) = (count(Delivered), count(Wire));
        assert_eq!(
            (s.pairs, s.delivered_pairs, s.latency_ms.count),
            (1000, delivered, delivered)
        );
        assert!(close(s.reliability, delivered as f64 / 1000.0));
        assert_eq!(s.wire_copies, wire as u64);
        assert!(close(s.payload_bytes_per_node, wire as f64 * 120.0 / 20.0));
        // The buckets partition the pairs: their weighted sum is the whole.
        let per_bucket = s.reliability_over_time.iter();
        let sum: f64 = per_bucket
            .filter_map(|b| Some(b.reliability? * 20.0 * b.messages as f64))
            .sum();
        assert!((sum - delivered as f64).abs() < 1e-6);
        assert_eq!(
            s.reach_ms.p100_of_members.reached, 0,
            "no publisher delivers"
        );
    }
}
