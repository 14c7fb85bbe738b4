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
//!
//! The figures are computed in [`figures`], the plots drawn in [`plots`].

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;

use crate::record::RunRecord;

mod figures;
pub(crate) use figures::nearest_rank;
mod onion;
mod plots;

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
    /// Peers each node was connected to at the end of the workload, over
    /// the entries of `connected_peers`.
    pub connected_peers_per_node: Dist,
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
    /// From a member's first wire copy of a message to its delivery, ms:
    /// the node's own work (gossip validation, decryption, the commit),
    /// which in the simulator is wall time on the shared host divided by
    /// the dilation, and which a node does again at every hop before it
    /// forwards (a message is forwarded once committed). Over the pairs of
    /// messages published before the first fault window (later ones may
    /// wait for an older message a fault kept away: causal order, not the
    /// host). The lag sampler, a tokio timer, does not see the nodes'
    /// actor threads queueing for the CPU; this does.
    pub handling_ms: Dist,
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
    /// Direct messages, for a `direct` workload (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct: Option<DirectSummary>,
    /// Delivery latency against the physical limit of the link model;
    /// `None` when the record has no link model.
    pub physical_limit: Option<PhysicalLimit>,
    /// The onion route: private-message latencies and the anonymity set
    /// at one relay (a run with mix nodes; absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onion: Option<onion::OnionSummary>,
}

/// How far deliveries are from what the network model allows at best. For
/// each delivered pair whose publisher and member both have the internet,
/// the *direct path* is the one-way time from publisher to member in the
/// link model without any relay: the region pair's one-way latency plus
/// the message's frame (`wire_size`) on the publisher's uplink (see
/// `LinkRecord::direct_ms`). No protocol can deliver faster; gossip's
/// extra hops, queues and host lag are what the ratio shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhysicalLimit {
    /// Delivered pairs with a direct internet path (the others, through a
    /// radio, are left out of both distributions).
    pub pairs: usize,
    /// The direct path's one-way time over those pairs, ms.
    pub direct_ms: Dist,
    /// Their delivery latency (as `latency_ms`, over the same pairs), ms.
    pub delivery_ms: Dist,
    /// `delivery_ms.p99 / direct_ms.p99`: 1 would be the physical limit.
    pub p99_ratio: Option<f64>,
    /// `delivery_ms.p50 / direct_ms.p50`.
    pub p50_ratio: Option<f64>,
}

/// The figures of a `direct` workload. A message is *delivered* when the
/// recipient's event stream reported it (`DirectMessage` with its id);
/// *receipted* when the sender's said `delivered` (it holds the
/// recipient's signed receipt). Times are model ms after `send` was called.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DirectSummary {
    /// Direct messages sent (`send` answered with an id).
    pub messages: usize,
    /// Messages delivered to their recipient: its event stream reported
    /// it, or its record held it at the end of the run.
    pub delivered: usize,
    /// Delivered messages the recipient's event stream did not report (so
    /// not timed): delivered while a restarted node's stream was not yet
    /// followed.
    pub delivered_untimed: usize,
    /// `delivered / messages`.
    pub delivery_ratio: Option<f64>,
    /// Messages whose sender holds the receipt.
    pub receipted: usize,
    /// `receipted / messages`.
    pub receipt_ratio: Option<f64>,
    /// Send to first delivery at the recipient, over delivered messages.
    pub latency_ms: Dist,
    /// Send to receipt at the sender, over receipted messages.
    pub receipt_ms: Dist,
    /// Copies the recipient's application got, per delivered message (1
    /// each when nothing is delivered twice).
    pub deliveries_per_message: Dist,
    /// Deliveries beyond the first, over all messages. Must be 0.
    pub app_duplicates: u64,
    /// Attempts the sender made per message (one per route tried, retries
    /// included), by the sender's record at the end of the run.
    pub attempts_per_message: Dist,
    /// Messages delivered by each route, by the sender's record (route
    /// names; `unknown` when a receipted message names none).
    pub routes: std::collections::BTreeMap<String, usize>,
    /// Transport bytes all nodes sent over the run (internet links and
    /// radio), divided by `messages`: an upper bound on what one message
    /// cost, background traffic (identify, Kademlia, pings, BLE links)
    /// included.
    pub bytes_sent_per_message: Option<f64>,
    /// Envelope copies per message: every envelope any node handed to a
    /// peer (the sender's attempts, to each first hop; relays' forwards;
    /// receipts and their relays), divided by `messages`.
    pub copies_per_message: Option<f64>,
    /// Of those, the copies relayed for others (BLE flooding, gateways).
    pub relayed_copies_per_message: Option<f64>,
    /// What the copy figures count.
    pub copies_note: String,
    /// The same figures per kind of pair (see `DirectRecord::class` in
    /// `direct.json`).
    pub by_class: std::collections::BTreeMap<String, DirectClass>,
}

/// Delivery of one kind of pair.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DirectClass {
    /// Messages sent.
    pub messages: usize,
    /// Messages delivered (as `DirectSummary::delivered`).
    pub delivered: usize,
    /// `delivered / messages`.
    pub delivery_ratio: Option<f64>,
    /// Nearest-rank median of send to delivery over the timed ones, ms.
    pub latency_p50_ms: Option<f64>,
    /// Largest send to delivery, ms.
    pub latency_max_ms: Option<f64>,
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

/// Computes every figure of the summary; see the field docs of [`Summary`].
#[cfg_attr(not(test), allow(dead_code))]
pub fn summarize(rec: &RunRecord) -> Summary {
    figures::analyse(rec).0
}

/// Writes `summary.json`, `summary.csv`, `latency_cdf.svg`,
/// `duplicates_per_node.svg` and `reliability_over_time.svg` into `dir`
/// (created if missing) and returns the summary.
pub fn write_report(rec: &RunRecord, dir: &Path) -> anyhow::Result<Summary> {
    let (summary, series) = figures::analyse(rec);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(&summary).context("serializing the summary")?;
    let files = [
        ("summary.json", json + "\n"),
        ("summary.csv", to_csv(&summary)?),
        (
            "latency_cdf.svg",
            plots::plot_cdf(&series.latencies, summary.pairs)?,
        ),
        (
            "duplicates_per_node.svg",
            plots::plot_dups(&series.dup_per_node)?,
        ),
        (
            "reliability_over_time.svg",
            plots::plot_rel(&summary.reliability_over_time)?,
        ),
    ];
    for (name, content) in files {
        let path = dir.join(name);
        std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    if !rec.direct.is_empty() {
        // One object per direct message: send, delivery and receipt times,
        // route and attempts (the input of the `direct` figures).
        let path = dir.join("direct.json");
        let json = serde_json::to_string_pretty(&rec.direct).context("serializing")?;
        std::fs::write(&path, json + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summary)
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

#[cfg(test)]
mod tests {
    use super::figures::nearest_rank;
    use super::*;
    use crate::record::{Published, Receipt, ReceiptKind};
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

    /// Ten messages from node 0 to node 1, no fault: node 1 delivers each
    /// `handling[i]` ms after its first wire copy (a second copy later).
    fn handled(handling: [f64; 10]) -> RunRecord {
        let ids: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
        let msgs: Vec<Msg<'_>> = (0..10)
            .map(|i| (ids[i].as_str(), 0, i as f64 * 100.0, 100, &[1usize][..]))
            .collect();
        let mut receipts = Vec::new();
        for (i, h) in handling.iter().enumerate() {
            let wire = i as f64 * 100.0 + 50.0;
            receipts.push((wire + 5.0, 1, ids[i].as_str(), Wire));
            receipts.push((wire, 1, ids[i].as_str(), Wire));
            receipts.push((wire + h, 1, ids[i].as_str(), Delivered));
        }
        RunRecord {
            lag_ms: vec![1.0],
            median_link_latency_ms: 100.0,
            ..record(&msgs, &receipts)
        }
    }

    #[test]
    fn handling_counts_from_the_first_wire_copy_and_limits_the_host() {
        let s = summarize(&handled([0.5; 10]));
        assert_eq!(
            (s.handling_ms.count, s.handling_ms.p90),
            (10, Some(0.5)),
            "from the earliest wire copy, not the later one"
        );
        assert!(!s.host_limited, "fast handling, no lag");
        // One slow message in ten (p90 is the ninth): still the protocol's.
        let mut h = [1.0; 10];
        h[9] = 500.0;
        assert!(!summarize(&handled(h)).host_limited);
        // Two in ten over 10 % of the 100 ms link + 2 ms: the host.
        h[8] = 40.0;
        let s = summarize(&handled(h));
        assert_eq!(s.handling_ms.p90, Some(40.0));
        assert!(s.host_limited, "{}", s.host_limited_rule);
        assert_eq!(s.advice.as_deref(), Some("raise --time-dilation"));
    }

    #[test]
    fn handling_leaves_out_messages_from_the_first_fault_on() {
        let mut h = [1.0; 10];
        h[5..].fill(900.0);
        let rec = RunRecord {
            faults: serde_json::from_str(
                r#"[{"kind": "partition", "start_ms": 450, "end_ms": 600}]"#,
            )
            .expect("faults"),
            ..handled(h)
        };
        let s = summarize(&rec);
        assert_eq!((s.handling_ms.count, s.handling_ms.max), (5, Some(1.0)));
        assert!(!s.host_limited);
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

    /// The physical limit by hand: regions 0, 1, 0 with 2 ms inside a
    /// region and 35 ms between, uplinks of 1000 B/s (so a 100 B frame
    /// takes 100 ms to leave). Delivered: "a" (node 0, 100 B) at node 1
    /// after 10 ms (direct 35 + 100) and node 2 after 40 (direct 2 + 100);
    /// "b" (node 1, 200 B) at node 0 after 750 (direct 35 + 200).
    #[test]
    fn physical_limit_by_hand() {
        use crate::record::LinkRecord;
        let link = LinkRecord {
            region: vec![0, 1, 0],
            latency_ms: vec![vec![2.0, 35.0], vec![35.0, 2.0]],
            uplink_bps: vec![1000.0; 3],
            internet: vec![true; 3],
        };
        let rec = RunRecord {
            link: Some(link.clone()),
            ..hand_made()
        };
        let p = summarize(&rec).physical_limit.expect("a link model");
        assert_eq!(p.pairs, 3);
        assert_eq!(
            (p.direct_ms.p50, p.direct_ms.p99),
            (Some(135.0), Some(235.0))
        );
        assert_eq!(p.delivery_ms.p99, Some(750.0));
        assert!(close(p.p99_ratio, 750.0 / 235.0));
        assert!(close(p.p50_ratio, 40.0 / 135.0));
        // A radio-only node has no direct path: its pairs are left out.
        let mut radio = link;
        radio.internet[2] = false;
        let rec = RunRecord {
            link: Some(radio),
            ..hand_made()
        };
        assert_eq!(summarize(&rec).physical_limit.expect("limit").pairs, 2);
        assert!(summarize(&hand_made()).physical_limit.is_none());
    }

    /// The direct figures from hand-made records: a delivered message, one
    /// delivered only by the recipient's record (untimed), one receipted
    /// but held back (undelivered), one lost; classes counted apart.
    #[test]
    fn direct_figures_by_hand() {
        use crate::record::DirectRecord;
        let m = |id: &str, class: &str, t: f64, delivered: Option<f64>, receipt: Option<f64>| {
            DirectRecord {
                id: id.into(),
                class: class.into(),
                t_ms: t,
                delivered_ms: delivered,
                deliveries: u32::from(delivered.is_some()),
                receipt_ms: receipt,
                route: receipt.map(|_| "ble".to_owned()),
                attempts: 1,
                ..DirectRecord::default()
            }
        };
        let mut untimed = m("b", "ble->internet", 0.0, None, Some(900.0));
        untimed.in_recipient_record = true;
        let rec = RunRecord {
            bytes_sent: vec![1000, 3000],
            direct: vec![
                m("a", "ble->internet", 100.0, Some(400.0), Some(700.0)),
                untimed,
                m("c", "ble->ble (other island)", 0.0, None, Some(50.0)),
                m("d", "ble->ble (other island)", 0.0, None, None),
            ],
            ..RunRecord::default()
        };
        let d = summarize(&rec).direct.expect("direct figures");
        assert_eq!((d.messages, d.delivered, d.delivered_untimed), (4, 2, 1));
        assert!(close(d.delivery_ratio, 0.5));
        assert_eq!(d.receipted, 3);
        assert_eq!(d.latency_ms.count, 1);
        assert!(close(d.latency_ms.p99, 300.0));
        assert!(close(d.receipt_ms.max, 900.0));
        assert_eq!(d.app_duplicates, 0);
        assert!(close(d.bytes_sent_per_message, 1000.0));
        assert_eq!(d.routes.get("ble"), Some(&3));
        let other = &d.by_class["ble->ble (other island)"];
        assert_eq!((other.messages, other.delivered), (2, 0));
        let out = &d.by_class["ble->internet"];
        assert!(close(out.delivery_ratio, 1.0));
        assert!(close(out.latency_p50_ms, 300.0));
        // A group run has no direct figures, and none in its CSV.
        let none = summarize(&RunRecord::default());
        assert!(none.direct.is_none());
        assert!(!to_csv(&none).expect("csv").contains("direct"));
    }
}
