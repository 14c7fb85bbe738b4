//! The figures of the summary, computed from a run's record: receipts
//! tallied per (node, message), then each concern on its own: deliveries
//! (pairs, latency, reach, reliability over time), wire copies, bytes,
//! catch-up after partitions, and the host's lag and the nodes' handling
//! time. The definitions are the field docs of [`Summary`].

use std::collections::{BTreeMap, HashMap};

use super::{
    Bucket, Catchup, DirectClass, DirectSummary, Dist, PhysicalLimit, Reach, ReachStat, Summary,
};
use crate::record::{DirectRecord, FaultKind, Published, ReceiptKind, RunRecord};

/// Host lag (p99) above this many ms always counts as host-limited.
const LAG_ABS_LIMIT_MS: f64 = 20.0;
/// Host lag (p99) above this fraction of the median link latency, plus
/// [`TIMER_RESOLUTION_MS`], counts as host-limited.
const LAG_REL_LIMIT: f64 = 0.1;
/// tokio's timers fire on a 1 ms wheel, so even an idle runtime shows about
/// 1 to 2 ms of lag; every modelled delay has the same granularity, so this
/// much is not the host shaping the results.
const TIMER_RESOLUTION_MS: f64 = 2.0;

/// What the plots need besides the summary.
pub(super) struct Series {
    /// Delivery latencies of delivered pairs, sorted.
    pub(super) latencies: Vec<f64>,
    /// Per node average wire copies per message (nodes with wire copies).
    pub(super) dup_per_node: Vec<f64>,
}

/// Every figure of the summary, and the series the plots draw.
pub(super) fn analyse(rec: &RunRecord) -> (Summary, Series) {
    let tally = Tally::of(rec);
    let deliveries = Deliveries::of(rec, &tally);
    let wire = WireCopies::of(&tally);
    let bytes_sent_per_node = dist(rec.bytes_sent.iter().map(|&b| b as f64).collect());
    let payload_bytes_per_node = if rec.wire_sizes_unknown {
        None
    } else {
        ratio(tally.payload as f64, rec.nodes as f64)
    };
    let overhead_bytes_per_node =
        (bytes_sent_per_node.mean.zip(payload_bytes_per_node)).map(|(b, p)| b - p);
    let overhead_ratio =
        (overhead_bytes_per_node.zip(bytes_sent_per_node.mean)).and_then(|(o, b)| ratio(o, b));
    let lag_ms = dist(rec.lag_ms.clone());
    let handling_ms = handling(rec, &tally);
    let (host_limited, host_limited_rule) =
        host_limit(&lag_ms, &handling_ms, rec.median_link_latency_ms);
    let [p90, p95, p99, p100] = deliveries.reach.map(reach_stat);

    let summary = Summary {
        scenario: rec.scenario.clone(),
        seed: rec.seed,
        nodes: rec.nodes,
        messages: rec.published.len(),
        time_dilation: rec.time_dilation,
        duration_ms: rec.duration_ms,
        wall_secs: rec.wall_secs,
        peak_rss_kib: rec.peak_rss_kib,
        pairs: deliveries.pairs,
        delivered_pairs: deliveries.latencies.len(),
        reliability: ratio(deliveries.latencies.len() as f64, deliveries.pairs as f64),
        latency_ms: dist(deliveries.latencies.clone()),
        reach_ms: Reach {
            p90_of_members: p90,
            p95_of_members: p95,
            p99_of_members: p99,
            p100_of_members: p100,
        },
        dup_per_node: dist(wire.per_node.clone()),
        wire_copies: wire.copies,
        duplicate_fraction_wire: ratio(
            (wire.copies - wire.first_copies) as f64,
            wire.copies as f64,
        ),
        app_duplicates: tally.app_duplicates,
        unknown_receipts: tally.unknown_receipts,
        bytes_sent_per_node,
        connected_peers_per_node: dist(rec.connected_peers.iter().map(|&c| c as f64).collect()),
        payload_bytes_per_node,
        overhead_bytes_per_node,
        overhead_ratio,
        catchup_ms: catchup(rec, &tally),
        median_link_latency_ms: rec.median_link_latency_ms,
        lag_ms,
        handling_ms,
        host_limited,
        host_limited_rule,
        advice: host_limited.then(|| "raise --time-dilation".to_owned()),
        reliability_over_time: deliveries.buckets,
        direct: direct(rec),
        physical_limit: physical_limit(rec, &tally),
        onion: super::onion::summary(rec),
    };
    let series = Series {
        latencies: deliveries.latencies,
        dup_per_node: wire.per_node,
    };
    (summary, series)
}

/// What one node saw of one message.
#[derive(Default)]
struct AtNode {
    first_delivered: Option<f64>,
    first_wire: Option<f64>,
    wire: u64,
}

/// The receipts, tallied per (node, published message).
struct Tally<'a> {
    at: HashMap<(usize, &'a str), AtNode>,
    /// Receipts naming an id that was never published.
    unknown_receipts: u64,
    /// `DuplicateDelivery` receipts, any id.
    app_duplicates: u64,
    /// Sum over wire copies of their message's `wire_size`.
    payload: u64,
}

impl<'a> Tally<'a> {
    fn of(rec: &'a RunRecord) -> Self {
        let known: HashMap<&str, &Published> =
            rec.published.iter().map(|p| (p.id.as_str(), p)).collect();
        let mut tally = Tally {
            at: HashMap::new(),
            unknown_receipts: 0,
            app_duplicates: 0,
            payload: 0,
        };
        for r in &rec.receipts {
            tally.app_duplicates += u64::from(r.kind == ReceiptKind::DuplicateDelivery);
            let Some(p) = known.get(r.id.as_str()) else {
                tally.unknown_receipts += 1;
                continue;
            };
            let e = tally.at.entry((r.node, p.id.as_str())).or_default();
            match r.kind {
                ReceiptKind::Wire => {
                    e.wire += 1;
                    e.first_wire = Some(e.first_wire.map_or(r.t_ms, |t| t.min(r.t_ms)));
                    tally.payload += p.wire_size as u64;
                }
                // Receipts need not be in time order: keep the earliest.
                ReceiptKind::Delivered => {
                    e.first_delivered = Some(e.first_delivered.map_or(r.t_ms, |t| t.min(r.t_ms)));
                }
                ReceiptKind::DuplicateDelivery => {}
            }
        }
        tally
    }

    /// When `node` first delivered message `id`, if it did.
    fn delivered_at(&self, node: usize, id: &'a str) -> Option<f64> {
        self.at.get(&(node, id)).and_then(|e| e.first_delivered)
    }
}

/// Pairs and their deliveries.
struct Deliveries {
    pairs: usize,
    /// Delivery latencies of the delivered pairs, sorted.
    latencies: Vec<f64>,
    /// Per message with recipients, when 90, 95, 99 and 100 % of them had
    /// delivered it (`None`: never).
    reach: [Vec<Option<f64>>; 4],
    /// Reliability per second of publish time.
    buckets: Vec<Bucket>,
}

impl Deliveries {
    /// Pairs, latencies, reach and the per-second buckets in one pass.
    fn of<'a>(rec: &'a RunRecord, tally: &Tally<'a>) -> Self {
        let (mut pairs, mut latencies) = (0usize, Vec::new());
        let mut reach: [Vec<Option<f64>>; 4] = Default::default();
        // Per second: (messages, pairs, delivered pairs).
        let mut buckets: BTreeMap<u64, (usize, usize, usize)> = BTreeMap::new();
        for p in &rec.published {
            let mut lat: Vec<f64> = (p.recipients.iter())
                .filter_map(|&n| Some(tally.delivered_at(n, &p.id)? - p.t_ms))
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
        let buckets = (buckets.into_iter())
            .map(|(t_s, (messages, pairs, delivered))| Bucket {
                t_s,
                messages,
                reliability: ratio(delivered as f64, pairs as f64),
            })
            .collect();
        Deliveries {
            pairs,
            latencies,
            reach,
            buckets,
        }
    }
}

/// Delivery against the direct path of each delivered pair (see
/// [`PhysicalLimit`]); `None` without a link model.
fn physical_limit<'a>(rec: &'a RunRecord, tally: &Tally<'a>) -> Option<PhysicalLimit> {
    let link = rec.link.as_ref()?;
    let (mut direct_ms, mut delivery_ms) = (Vec::new(), Vec::new());
    for p in &rec.published {
        for &n in &p.recipients {
            let Some(t) = tally.delivered_at(n, &p.id) else {
                continue;
            };
            if let Some(d) = link.direct_ms(p.publisher, n, p.wire_size) {
                direct_ms.push(d);
                delivery_ms.push(t - p.t_ms);
            }
        }
    }
    let pairs = direct_ms.len();
    let (direct_ms, delivery_ms) = (dist(direct_ms), dist(delivery_ms));
    let over = |a: Option<f64>, b: Option<f64>| a.zip(b).and_then(|(a, b)| ratio(a, b));
    Some(PhysicalLimit {
        pairs,
        p99_ratio: over(delivery_ms.p99, direct_ms.p99),
        p50_ratio: over(delivery_ms.p50, direct_ms.p50),
        direct_ms,
        delivery_ms,
    })
}

/// Copies received on the wire.
struct WireCopies {
    /// All of them.
    copies: u64,
    /// The first copy of each (node, message).
    first_copies: u64,
    /// Per node with copies: copies / distinct messages.
    per_node: Vec<f64>,
}

impl WireCopies {
    fn of(tally: &Tally<'_>) -> Self {
        // Per node: (copies, distinct messages).
        let mut per_node: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
        for (&(node, _), e) in tally.at.iter().filter(|(_, e)| e.wire > 0) {
            let n = per_node.entry(node).or_default();
            *n = (n.0 + e.wire, n.1 + 1);
        }
        WireCopies {
            copies: per_node.values().map(|n| n.0).sum(),
            first_copies: per_node.values().map(|n| n.1).sum(),
            per_node: (per_node.values())
                .map(|&(c, m)| c as f64 / m as f64)
                .collect(),
        }
    }
}

/// Catch-up after each partition window (see [`Catchup`]); `None` without
/// one.
fn catchup<'a>(rec: &'a RunRecord, tally: &Tally<'a>) -> Option<Catchup> {
    let mut catchup_ms: Option<Catchup> = None;
    for w in rec.faults.iter().filter(|w| w.kind == FaultKind::Partition) {
        let c = catchup_ms.get_or_insert_with(Catchup::default);
        c.partitions += 1;
        for p in rec.published.iter().filter(|p| p.t_ms < w.end_ms) {
            for &n in &p.recipients {
                match tally.delivered_at(n, &p.id) {
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
    catchup_ms
}

/// Whether the host's lag may have set the numbers, and the rule, in
/// words, with its thresholds.
fn host_limit(lag_ms: &Dist, handling_ms: &Dist, median_link_latency_ms: f64) -> (bool, String) {
    let rel_limit = LAG_REL_LIMIT * median_link_latency_ms + TIMER_RESOLUTION_MS;
    let over = |p: Option<f64>| p.is_some_and(|p| p > rel_limit || p > LAG_ABS_LIMIT_MS);
    let limited = over(lag_ms.p99) || over(handling_ms.p90);
    let rule = format!(
        "lag_ms.p99 or handling_ms.p90 > {}% of median_link_latency_ms + {TIMER_RESOLUTION_MS} \
         ms of timer resolution (= {rel_limit} ms) or > {LAG_ABS_LIMIT_MS} ms",
        LAG_REL_LIMIT * 100.0
    );
    (limited, rule)
}

/// How long nodes took from a message's first wire copy to its delivery
/// (their own work: validation, decryption, the commit; in the simulator
/// wall time on a shared host, divided by the dilation), over the pairs
/// of the messages published before the first fault window (afterwards a
/// message may wait for an older one that a partition or a restart kept
/// away, which is the protocol's causal order, not the host).
fn handling(rec: &RunRecord, tally: &Tally<'_>) -> Dist {
    let first_fault = rec
        .faults
        .iter()
        .map(|f| f.start_ms)
        .fold(f64::INFINITY, f64::min);
    let mut v = Vec::new();
    for p in rec.published.iter().filter(|p| p.t_ms < first_fault) {
        for &node in &p.recipients {
            let Some(e) = tally.at.get(&(node, p.id.as_str())) else {
                continue;
            };
            if let (Some(wire), Some(delivered)) = (e.first_wire, e.first_delivered) {
                v.push((delivered - wire).max(0.0));
            }
        }
    }
    dist(v)
}

/// 1-based nearest rank of the `pct` percentile among `n` values:
/// `ceil(pct * n / 100)`, at least 1. Integer arithmetic, so that p90 of 10
/// values is rank 9 and not 10 (`0.9 * 10.0 = 9.000000000000002`).
fn rank(pct: usize, n: usize) -> usize {
    (pct * n).div_ceil(100).max(1)
}

/// Nearest-rank percentile of sorted values; `None` when empty.
pub(crate) fn nearest_rank<T: Copy>(sorted: &[T], pct: usize) -> Option<T> {
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

/// The direct-message figures; `None` without direct messages.
fn direct(rec: &RunRecord) -> Option<DirectSummary> {
    if rec.direct.is_empty() {
        return None;
    }
    let d = &rec.direct;
    let latencies: Vec<f64> = (d.iter())
        .filter_map(|m| m.delivered_ms.map(|t| t - m.t_ms))
        .collect();
    let receipts: Vec<f64> = (d.iter())
        .filter_map(|m| m.receipt_ms.map(|t| t - m.t_ms))
        .collect();
    let mut routes = std::collections::BTreeMap::new();
    for m in d
        .iter()
        .filter(|m| m.receipt_ms.is_some() || m.route.is_some())
    {
        let route = m.route.clone().unwrap_or_else(|| "unknown".to_owned());
        *routes.entry(route).or_insert(0) += 1;
    }
    let total_bytes: u64 = rec.bytes_sent.iter().sum();
    let delivered = |m: &&DirectRecord| m.delivered_ms.is_some() || m.in_recipient_record;
    let n_delivered = d.iter().filter(delivered).count();
    let mut by_class: BTreeMap<String, DirectClass> = BTreeMap::new();
    let mut class_latencies: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for m in d {
        let c = by_class.entry(m.class.clone()).or_default();
        c.messages += 1;
        c.delivered += usize::from(delivered(&m));
        let l = class_latencies.entry(m.class.as_str()).or_default();
        l.extend(m.delivered_ms.map(|t| t - m.t_ms));
    }
    for (class, c) in &mut by_class {
        c.delivery_ratio = ratio(c.delivered as f64, c.messages as f64);
        let l = dist(class_latencies.remove(class.as_str()).unwrap_or_default());
        (c.latency_p50_ms, c.latency_max_ms) = (l.p50, l.max);
    }
    Some(DirectSummary {
        messages: d.len(),
        delivered: n_delivered,
        delivered_untimed: n_delivered - latencies.len(),
        delivery_ratio: ratio(n_delivered as f64, d.len() as f64),
        receipted: receipts.len(),
        receipt_ratio: ratio(receipts.len() as f64, d.len() as f64),
        latency_ms: dist(latencies),
        receipt_ms: dist(receipts),
        deliveries_per_message: dist(
            (d.iter())
                .filter(|m| m.deliveries > 0)
                .map(|m| f64::from(m.deliveries))
                .collect(),
        ),
        app_duplicates: d
            .iter()
            .map(|m| u64::from(m.deliveries.saturating_sub(1)))
            .sum(),
        attempts_per_message: dist(d.iter().map(|m| m.attempts as f64).collect()),
        routes,
        bytes_sent_per_message: ratio(total_bytes as f64, d.len() as f64),
        copies_per_message: ratio(rec.dm_envelopes_sent as f64, d.len() as f64),
        relayed_copies_per_message: ratio(rec.dm_envelopes_relayed as f64, d.len() as f64),
        copies_note: "envelopes handed to a peer by any node (the nodes' dm_envelopes_sent \
                      counters), receipts included, per message sent; background traffic \
                      (identify, Kademlia, pings, BLE links) is in bytes_sent_per_message only"
            .to_owned(),
        by_class,
    })
}
