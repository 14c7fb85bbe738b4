//! The onion route's figures (`onion` in `summary.json`): private-message
//! latencies and the anonymity set an adversary watching one relay sees,
//! from the nodes' mix traces (docs/simulator-guide.md defines them).
//!
//! The anonymity set: with exponential per-hop delays, every packet in a
//! relay's pool (its delay queue) is equally likely to be the next to leave
//! (memorylessness), so when a packet of an observed message leaves relay
//! R, an adversary watching all of R's links can only say that it is one of
//! the packets R held at that instant. The set is the number of distinct
//! messages with a packet in R's pool then (each reply and cover packet a
//! message of its own); its entropy weighs each message by its share of
//! the pool's packets (log2 of the set when each has one packet). The
//! ground truth (which packet is which) is the traces', not the
//! adversary's: a packet is followed through relays by the hashes of its
//! bytes in and out.

use std::collections::HashMap;

use serde::Serialize;

use super::Dist;
use super::figures::nearest_rank;
use crate::record::{MixRecord, RunRecord};

/// The `onion` figures.
#[derive(Debug, Clone, Serialize)]
pub struct OnionSummary {
    /// The nodes that relayed (`--mix`).
    pub mix_nodes: Vec<usize>,
    /// Direct messages sent through the onion route (a data packet of
    /// theirs is in the traces).
    pub private_messages: usize,
    /// Of those, delivered to their recipient.
    pub delivered: usize,
    /// Of those, acknowledged to their sender (the recipient's receipt
    /// back through a reply block).
    pub acked: usize,
    /// Send to delivery at the recipient, ms, over delivered ones.
    pub delivery_ms: Dist,
    /// Send to the acknowledgement at the sender (SURB-acked), ms.
    pub ack_ms: Dist,
    /// Packets the nodes built and sent: data fragments, replies
    /// (acknowledgements), loop cover.
    pub packets_sent: PacketCounts,
    /// Packets relays sent on (every hop of every packet but the last).
    pub relay_passes: usize,
    /// What an adversary watching one relay sees of the private messages.
    pub anonymity: Anonymity,
}

/// Packets built, by what they carry.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PacketCounts {
    /// Fragments of direct messages (retries included).
    pub data: usize,
    /// Acknowledgements through reply blocks.
    pub reply: usize,
    /// Loop cover packets.
    pub cover: usize,
}

/// The anonymity set over observations: each time a packet of a private
/// message leaves a relay.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Anonymity {
    /// (message packet, relay) passes observed.
    pub observations: usize,
    /// Private messages with at least one observation.
    pub messages: usize,
    /// Distinct messages in the relay's pool as the packet left (itself
    /// included).
    pub set: Spread,
    /// Entropy of the relay's pool then, bits: `-Σ p log2 p` over the
    /// messages in it, `p` a message's share of the pool's packets.
    pub entropy_bits: Spread,
    /// Packets in the relay's pool then (itself included).
    pub pool_packets: Spread,
    /// Fraction of observations with a set of 1: the adversary at that
    /// relay links the packet's input to its output.
    pub alone_fraction: Option<f64>,
}

/// A distribution with its lower end: min, nearest-rank 10th and 50th
/// percentiles, mean, max.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Spread {
    /// Number of values.
    pub count: usize,
    /// Smallest.
    pub min: Option<f64>,
    /// Nearest-rank 10th percentile.
    pub p10: Option<f64>,
    /// Nearest-rank median.
    pub p50: Option<f64>,
    /// Mean.
    pub mean: Option<f64>,
    /// Largest.
    pub max: Option<f64>,
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    Spread {
        count: v.len(),
        min: v.first().copied(),
        p10: nearest_rank(&v, 10),
        p50: nearest_rank(&v, 50),
        mean: (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64),
        max: v.last().copied(),
    }
}

fn dist(mut v: Vec<f64>) -> Dist {
    v.sort_by(f64::total_cmp);
    Dist {
        count: v.len(),
        mean: (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64),
        p50: nearest_rank(&v, 50),
        p90: nearest_rank(&v, 90),
        p95: nearest_rank(&v, 95),
        p99: nearest_rank(&v, 99),
        max: v.last().copied(),
    }
}

/// What a packet chain belongs to: a direct message (by id), or a reply
/// or cover packet of its own, or a packet of unknown origin.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Origin {
    Message(String),
    Other(String),
}

/// One stay of a packet in a relay's pool.
#[derive(Debug, Clone)]
struct Stay {
    arrived: f64,
    departed: f64,
    origin: Origin,
}

/// The figures, when the run has mix traces.
pub(super) fn summary(rec: &RunRecord) -> Option<OnionSummary> {
    let onion = rec.onion.as_ref()?;
    let mut packets_sent = PacketCounts::default();
    for p in &onion.packets {
        match p.origin.as_deref() {
            Some("reply") => packets_sent.reply += 1,
            Some("cover") => packets_sent.cover += 1,
            Some(_) => packets_sent.data += 1,
            None => {}
        }
    }
    let sent_ids: std::collections::HashSet<&str> = (onion.packets.iter())
        .filter_map(|p| p.origin.as_deref())
        .collect();
    let private: Vec<_> = (rec.direct.iter())
        .filter(|d| sent_ids.contains(d.id.as_str()))
        .collect();
    let delivery: Vec<f64> = (private.iter())
        .filter_map(|d| d.delivered_ms.map(|t| t - d.t_ms))
        .collect();
    let ack: Vec<f64> = (private.iter())
        .filter_map(|d| d.receipt_ms.map(|t| t - d.t_ms))
        .collect();
    Some(OnionSummary {
        mix_nodes: onion.mix_nodes.clone(),
        private_messages: private.len(),
        delivered: (private.iter())
            .filter(|d| d.delivered_ms.is_some() || d.in_recipient_record)
            .count(),
        acked: ack.len(),
        delivery_ms: dist(delivery),
        ack_ms: dist(ack),
        packets_sent,
        relay_passes: onion.packets.iter().filter(|p| p.origin.is_none()).count(),
        anonymity: anonymity(&onion.packets),
    })
}

/// The anonymity set of every pass of a direct message's packet through a
/// relay (see the module documentation).
fn anonymity(packets: &[MixRecord]) -> Anonymity {
    // Name every packet form by its chain's origin: the packets nodes
    // built, then relay passes in order of arrival (a packet arrives at a
    // relay after it left the previous one).
    let mut origin_of: HashMap<&str, Origin> = HashMap::new();
    for p in packets {
        match p.origin.as_deref() {
            Some(o @ ("reply" | "cover")) => {
                origin_of.insert(
                    &p.packet_out,
                    Origin::Other(format!("{o}:{}", p.packet_out)),
                );
            }
            Some(id) => {
                origin_of.insert(&p.packet_out, Origin::Message(id.to_owned()));
            }
            None => {}
        }
    }
    let mut relayed: Vec<&MixRecord> = (packets.iter())
        .filter(|p| p.origin.is_none() && p.packet_in.is_some())
        .collect();
    relayed.sort_by(|a, b| {
        let at = |p: &MixRecord| p.arrived_ms.unwrap_or(p.t_ms);
        at(a).total_cmp(&at(b))
    });
    let mut pools: HashMap<usize, Vec<Stay>> = HashMap::new();
    for p in relayed {
        let packet_in = p.packet_in.as_deref().unwrap_or_default();
        let origin = (origin_of.get(packet_in).cloned())
            .unwrap_or_else(|| Origin::Other(format!("?:{packet_in}")));
        origin_of.insert(&p.packet_out, origin.clone());
        pools.entry(p.node).or_default().push(Stay {
            arrived: p.arrived_ms.unwrap_or(p.t_ms),
            departed: p.t_ms,
            origin,
        });
    }

    let (mut sets, mut entropies, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
    let mut observed = std::collections::HashSet::new();
    for stays in pools.values() {
        // Sorted by arrival (above); no stay is longer than this, so the
        // pool at `d` is among the stays that arrived in [d - longest, d].
        let longest = (stays.iter())
            .map(|s| s.departed - s.arrived)
            .fold(0.0, f64::max);
        for s in stays {
            let Origin::Message(id) = &s.origin else {
                continue;
            };
            let d = s.departed;
            let from = stays.partition_point(|x| x.arrived < d - longest);
            let mut count: HashMap<&Origin, usize> = HashMap::new();
            let mut packets = 0usize;
            for x in &stays[from..] {
                if x.arrived > d {
                    break;
                }
                if x.departed >= d {
                    *count.entry(&x.origin).or_default() += 1;
                    packets += 1;
                }
            }
            let entropy: f64 = (count.values())
                .map(|&c| {
                    let p = c as f64 / packets as f64;
                    -p * p.log2()
                })
                .sum();
            observed.insert(id.as_str());
            sets.push(count.len() as f64);
            entropies.push(entropy.max(0.0));
            sizes.push(packets as f64);
        }
    }
    let alone = sets.iter().filter(|s| **s <= 1.0).count();
    Anonymity {
        observations: sets.len(),
        messages: observed.len(),
        alone_fraction: (!sets.is_empty()).then(|| alone as f64 / sets.len() as f64),
        set: spread(sets),
        entropy_bits: spread(entropies),
        pool_packets: spread(sizes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{DirectRecord, OnionRecord};

    fn sent(node: usize, origin: &str, out: &str, t_ms: f64) -> MixRecord {
        MixRecord {
            node,
            origin: Some(origin.to_owned()),
            packet_out: out.to_owned(),
            t_ms,
            ..MixRecord::default()
        }
    }

    fn relayed(node: usize, packet_in: &str, out: &str, arrived: f64, left: f64) -> MixRecord {
        MixRecord {
            node,
            origin: None,
            packet_in: Some(packet_in.to_owned()),
            packet_out: out.to_owned(),
            arrived_ms: Some(arrived),
            t_ms: left,
        }
    }

    /// Two relays, 8 and 9, by hand:
    /// - message "a" (one packet a0): relay 8 holds it 10..50 (as a1),
    ///   then relay 9 holds it 60..70;
    /// - message "b" (two fragments b0, c0) both at relay 8, 20..60 and
    ///   30..40;
    /// - a cover packet k0 at relay 8, 45..55, and a packet of unknown
    ///   origin z0 at relay 9, 65..90.
    ///
    /// At relay 8: a leaves at 50 with b0 (20..60) and k0 (45..55) in the
    /// pool: 3 messages, 3 packets; b0 leaves at 60 alone (a left at 50, k0
    /// at 55): 1; c0 leaves at 40 with a, b0, c0 (b twice): 2 messages, 3
    /// packets, entropy -(1/3 log 1/3 + 2/3 log 2/3) = 0.918. At relay 9: a
    /// leaves at 70 with z0: 2 messages. Sets: 1, 2, 2, 3.
    #[test]
    fn anonymity_set_by_hand() {
        let packets = vec![
            sent(0, "a", "a0", 5.0),
            sent(1, "b", "b0", 15.0),
            sent(1, "b", "c0", 25.0),
            sent(2, "cover", "k0", 40.0),
            relayed(8, "a0", "a1", 10.0, 50.0),
            relayed(8, "b0", "b1", 20.0, 60.0),
            relayed(8, "c0", "c1", 30.0, 40.0),
            relayed(8, "k0", "k1", 45.0, 55.0),
            relayed(9, "a1", "a2", 60.0, 70.0),
            relayed(9, "z0", "z1", 65.0, 90.0),
        ];
        let a = anonymity(&packets);
        assert_eq!(a.observations, 4);
        assert_eq!(a.messages, 2);
        assert_eq!(a.set.min, Some(1.0));
        assert_eq!(a.set.p50, Some(2.0));
        assert_eq!(a.set.max, Some(3.0));
        assert_eq!(a.set.mean, Some(2.0));
        assert_eq!(a.pool_packets.max, Some(3.0));
        assert_eq!(a.alone_fraction, Some(0.25));
        let e = a.entropy_bits;
        assert_eq!(e.min, Some(0.0));
        assert!((e.p50.unwrap_or_default() - 0.9183).abs() < 1e-3, "{e:?}");
        assert!(
            (e.max.unwrap_or_default() - 3f64.log2()).abs() < 1e-9,
            "{e:?}"
        );

        // In the summary, with the direct records: "a" delivered at 100
        // and acked at 150, "b" neither; a message not sent privately
        // is not counted.
        let direct = vec![
            DirectRecord {
                id: "a".into(),
                t_ms: 0.0,
                delivered_ms: Some(100.0),
                receipt_ms: Some(150.0),
                ..DirectRecord::default()
            },
            DirectRecord {
                id: "b".into(),
                t_ms: 10.0,
                ..DirectRecord::default()
            },
            DirectRecord {
                id: "plain".into(),
                ..DirectRecord::default()
            },
        ];
        let rec = RunRecord {
            direct,
            onion: Some(OnionRecord {
                mix_nodes: vec![8, 9],
                packets,
            }),
            ..RunRecord::default()
        };
        let s = summary(&rec).expect("onion figures");
        assert_eq!((s.private_messages, s.delivered, s.acked), (2, 1, 1));
        assert_eq!(
            (s.delivery_ms.p50, s.ack_ms.p50),
            (Some(100.0), Some(150.0))
        );
        assert_eq!(
            (
                s.packets_sent.data,
                s.packets_sent.reply,
                s.packets_sent.cover
            ),
            (3, 0, 1)
        );
        assert_eq!(s.relay_passes, 6);
        assert!(summary(&RunRecord::default()).is_none());
    }
}
