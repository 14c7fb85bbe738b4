//! What the seed decides, before anything runs: node keys, regions and
//! uplinks, the initial dials, the group's members and publishers, the
//! message schedule, which nodes each fault takes and where the radios
//! stand. Written out as `topology.json` and `workload.json`.
//!
//! The same scenario and seed give the same plan. The draws happen in one
//! fixed order (see [`plan`]): changing that order, or drawing something
//! new before the end, changes every later draw and so every plan of every
//! seed, which makes old runs incomparable with new ones.

use std::collections::HashSet;

use libp2p::identity::Keypair;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::scenario::{
    BleLayout, LatencyModel, REGIONS, Scenario, TopologyKind, WorkloadKind, world_latency,
};

/// The generated topology, as written to `topology.json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TopologyOut {
    /// Per node: index, peer id, region, uplink.
    pub nodes: Vec<NodeOut>,
    /// Dials at start: `[from, to]`.
    pub edges: Vec<[usize; 2]>,
}

/// One node of `topology.json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeOut {
    /// Index.
    pub index: usize,
    /// Peer id.
    pub peer_id: String,
    /// Region name.
    pub region: String,
    /// Uplink, bytes per second.
    pub uplink_bps: f64,
    /// `internet`, `ble` or `internet+ble`.
    pub transports: String,
    /// Position on the radio medium, metres (BLE nodes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<[f64; 2]>,
}

/// The generated workload, as written to `workload.json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkloadOut {
    /// Members of the group (node indices; node 0 is the admin).
    pub members: Vec<usize>,
    /// Publishing members.
    pub publishers: Vec<usize>,
    /// Messages: model ms after the workload starts, publisher, size.
    pub messages: Vec<PlannedMessage>,
    /// Partition windows; `nodes` is the small side.
    pub partitions: Vec<FaultNodes>,
    /// Churn windows; `nodes` go down.
    pub churn: Vec<FaultNodes>,
}

/// One planned message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlannedMessage {
    /// Model ms after the workload starts.
    pub t_ms: f64,
    /// Publisher node.
    pub publisher: usize,
    /// Text size.
    pub size: usize,
    /// The recipient of a direct message (`None`: a group message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<usize>,
}

/// A fault's window and the nodes it takes. Written as
/// `[start_ms, end_ms, [nodes]]`, as `workload.json` always had it.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultNodes {
    /// Model ms after the workload starts when it begins.
    pub start_ms: f64,
    /// Model ms when it ends (healed, or the nodes back).
    pub end_ms: f64,
    /// The nodes it takes, sorted.
    pub nodes: Vec<usize>,
}

impl Serialize for FaultNodes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.start_ms, self.end_ms, &self.nodes).serialize(s)
    }
}

/// Everything derived from the scenario and the seed alone.
#[derive(Debug)]
pub struct Plan {
    /// Node keys.
    pub keys: Vec<Keypair>,
    /// Region index per node.
    pub region: Vec<usize>,
    /// Uplink per node, bytes/s (model).
    pub uplink: Vec<f64>,
    /// Latency matrix between regions.
    pub latency: Vec<Vec<f64>>,
    /// `topology.json`.
    pub topology: TopologyOut,
    /// `workload.json`.
    pub workload: WorkloadOut,
}

/// Derives topology and workload from the scenario and the seed: the same
/// seed gives the same plan.
pub fn plan(s: &Scenario, seed: u64) -> Plan {
    let mut rng = StdRng::seed_from_u64(seed);
    let keys = node_keys(seed, s.nodes);
    // The draws, in their fixed order.
    let (latency, region) = regions(s, &mut rng);
    let uplink = uplinks(s, &mut rng);
    let edges = dials(s, &mut rng);
    let (members, publishers) = group(s, &mut rng);
    let messages = schedule(s, &publishers);
    let (partitions, churn) = fault_nodes(s, &publishers, &mut rng);
    // Radios' places last, so that adding radios left the rest of a plan
    // as it was.
    let positions = positions(s, &mut rng);
    // Direct messages' recipients after that, for the same reason.
    let mut messages = messages;
    if s.workload.kind == WorkloadKind::Direct {
        for m in &mut messages {
            let to = rng.random_range(0..s.nodes - 1);
            // Every node but the sender, equally likely.
            m.to = Some(if to >= m.publisher { to + 1 } else { to });
        }
    }

    let nodes = (0..s.nodes)
        .map(|i| NodeOut {
            index: i,
            peer_id: keys[i].public().to_peer_id().to_base58(),
            region: match s.link.model {
                LatencyModel::World => REGIONS[region[i]].to_owned(),
                LatencyModel::Uniform => "uniform".to_owned(),
            },
            uplink_bps: uplink[i],
            transports: transports(s, i).to_owned(),
            position: positions[i],
        })
        .collect();
    Plan {
        keys,
        region,
        uplink,
        latency,
        topology: TopologyOut { nodes, edges },
        workload: WorkloadOut {
            members,
            publishers,
            messages,
            partitions,
            churn,
        },
    }
}

/// Node `i`'s key: a hash of the seed and the index, so that a node keeps
/// its peer id across runs of the same seed.
fn node_keys(seed: u64, nodes: usize) -> Vec<Keypair> {
    (0..nodes as u64)
        .map(|i| {
            let mut h = Sha256::new();
            h.update(b"fogmesh-sim node key");
            h.update(seed.to_be_bytes());
            h.update(i.to_be_bytes());
            let bytes: [u8; 32] = h.finalize().into();
            Keypair::ed25519_from_bytes(bytes).expect("32 bytes make an ed25519 key")
        })
        .collect()
}

/// The latency matrix between regions, and each node's region.
fn regions(s: &Scenario, rng: &mut StdRng) -> (Vec<Vec<f64>>, Vec<usize>) {
    match s.link.model {
        LatencyModel::World => (
            world_latency(),
            (0..s.nodes)
                .map(|_| rng.random_range(0..REGIONS.len()))
                .collect(),
        ),
        LatencyModel::Uniform => (vec![vec![s.link.latency_ms]], vec![0; s.nodes]),
    }
}

/// Each node's uplink, bytes per second: the fast one for a
/// `fast_fraction` of them.
fn uplinks(s: &Scenario, rng: &mut StdRng) -> Vec<f64> {
    let bytes_per_sec = |mbps: f64| mbps * 1_000_000.0 / 8.0;
    (0..s.nodes)
        .map(|_| {
            if rng.random::<f64>() < s.link.fast_fraction {
                bytes_per_sec(s.link.fast_bandwidth_mbps)
            } else {
                bytes_per_sec(s.link.bandwidth_mbps)
            }
        })
        .collect()
}

/// The dials at start, `[from, to]`. They join the nodes that have the
/// internet: a prefix of the indices (see [`Scenario::internet_nodes`]).
fn dials(s: &Scenario, rng: &mut StdRng) -> Vec<[usize; 2]> {
    let n = s.internet_nodes();
    let mut edges = Vec::new();
    if n < 2 {
        return edges;
    }
    match s.topology.kind {
        TopologyKind::Ring => (0..n).for_each(|i| edges.push([i, (i + 1) % n])),
        TopologyKind::Line => (0..n - 1).for_each(|i| edges.push([i, i + 1])),
        TopologyKind::Full => (0..n).for_each(|i| (i + 1..n).for_each(|j| edges.push([i, j]))),
        TopologyKind::Random => {
            // Each node dials `degree` others; a pair dialled both ways
            // is one edge.
            let mut joined = HashSet::new();
            for i in 0..n {
                let mut others: Vec<usize> = (0..n).filter(|j| *j != i).collect();
                others.shuffle(rng);
                for &j in others.iter().take(s.topology.degree.min(n - 1)) {
                    if joined.insert((i.min(j), i.max(j))) {
                        edges.push([i, j]);
                    }
                }
            }
        }
    }
    edges
}

/// The group's members (node 0, its admin, and others drawn with the
/// seed) and, among them, the publishers; both sorted.
fn group(s: &Scenario, rng: &mut StdRng) -> (Vec<usize>, Vec<usize>) {
    let w = &s.workload;
    let count = if w.members == 0 { s.nodes } else { w.members };
    let mut others: Vec<usize> = (1..s.nodes).collect();
    others.shuffle(rng);
    let mut members: Vec<usize> = std::iter::once(0)
        .chain(others.into_iter().take(count - 1))
        .collect();
    members.sort_unstable();
    let mut publishers: Vec<usize> = members
        .sample(rng, w.publishers.clamp(1, count))
        .copied()
        .collect();
    publishers.sort_unstable();
    (members, publishers)
}

/// The messages, evenly spaced at the workload's rate, round-robin over
/// the publishers (no draw).
fn schedule(s: &Scenario, publishers: &[usize]) -> Vec<PlannedMessage> {
    let w = &s.workload;
    (0..w.messages)
        .map(|k| PlannedMessage {
            t_ms: k as f64 * 1000.0 / w.rate_per_sec,
            publisher: publishers[k % publishers.len()],
            size: w.message_size,
            to: None,
        })
        .collect()
}

/// The nodes each partition cuts off (never node 0) and each churn window
/// stops (never a publisher, nor node 0).
fn fault_nodes(
    s: &Scenario,
    publishers: &[usize],
    rng: &mut StdRng,
) -> (Vec<FaultNodes>, Vec<FaultNodes>) {
    let n = s.nodes;
    let sorted = |mut nodes: Vec<usize>| {
        nodes.sort_unstable();
        nodes
    };
    let all_but_admin: Vec<usize> = (1..n).collect();
    let partitions = (s.faults.partition.iter())
        .map(|p| {
            let k = ((n as f64 * p.fraction).round() as usize).clamp(1, n - 1);
            FaultNodes {
                start_ms: p.at_secs * 1000.0,
                end_ms: (p.at_secs + p.duration_secs) * 1000.0,
                nodes: sorted(all_but_admin.sample(rng, k).copied().collect()),
            }
        })
        .collect();
    let quiet: Vec<usize> = (1..n).filter(|i| !publishers.contains(i)).collect();
    let churn = (s.faults.churn.iter())
        .map(|c| {
            // Publishers' churn stops a fraction of the publishers; other
            // churn a fraction of all nodes, among the quiet ones.
            let (pool, of) = if c.publishers {
                (publishers, publishers.len())
            } else {
                (quiet.as_slice(), n)
            };
            let k = (of as f64 * c.fraction).round() as usize;
            FaultNodes {
                start_ms: c.at_secs * 1000.0,
                end_ms: (c.at_secs + c.down_secs) * 1000.0,
                nodes: sorted(pool.sample(rng, k.min(pool.len())).copied().collect()),
            }
        })
        .collect();
    (partitions, churn)
}

/// Each node's place on the radio medium, metres (`None` without a radio).
fn positions(s: &Scenario, rng: &mut StdRng) -> Vec<Option<[f64; 2]>> {
    let mut places = vec![None; s.nodes];
    let Some(b) = &s.ble else {
        return places;
    };
    let first = s.first_ble_node();
    let side = (b.nodes as f64).sqrt().ceil().max(1.0) as usize;
    for k in 0..b.nodes {
        places[first + k] = Some(match b.layout {
            BleLayout::Line => [k as f64 * b.spacing_m, 0.0],
            BleLayout::Grid => [
                (k % side) as f64 * b.spacing_m,
                (k / side) as f64 * b.spacing_m,
            ],
            BleLayout::Crowd => [
                rng.random::<f64>() * b.area_m,
                rng.random::<f64>() * b.area_m,
            ],
            BleLayout::Islands => {
                let islands = b.islands.max(1);
                let (island, j) = (k % islands, k / islands);
                let per = b.nodes.div_ceil(islands);
                let side = (per as f64).sqrt().ceil().max(1.0) as usize;
                [
                    island as f64 * b.island_gap_m + (j % side) as f64 * b.spacing_m,
                    (j / side) as f64 * b.spacing_m,
                ]
            }
        });
    }
    places
}

/// `topology.json`'s name for node `i`'s transports.
fn transports(s: &Scenario, i: usize) -> &'static str {
    match (i < s.internet_nodes(), i >= s.first_ble_node()) {
        (true, true) => "internet+ble",
        (false, true) => "ble",
        _ => "internet",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_plan() {
        let s: Scenario = toml::from_str(
            r#"
            name = "t"
            nodes = 20
            duration_secs = 5
            [workload]
            members = 10
            publishers = 3
            messages = 7
            rate_per_sec = 2
            message_size = 10
            warmup_secs = 1
            [[faults.partition]]
            at_secs = 1
            duration_secs = 1
            fraction = 0.3
            "#,
        )
        .expect("scenario");
        let a = plan(&s, 42);
        let b = plan(&s, 42);
        assert_eq!(a.topology, b.topology);
        assert_eq!(a.workload, b.workload);
        let c = plan(&s, 43);
        assert_ne!(a.topology, c.topology);
        assert_eq!(a.workload.members.len(), 10);
        assert!(a.workload.members.contains(&0));
        assert_eq!(a.workload.publishers.len(), 3);
        assert_eq!(a.workload.partitions[0].nodes.len(), 6);
    }

    /// A fault window keeps `workload.json`'s `[start, end, [nodes]]`.
    #[test]
    fn fault_windows_are_written_as_triples() {
        let w = FaultNodes {
            start_ms: 1000.0,
            end_ms: 2500.0,
            nodes: vec![3, 7],
        };
        assert_eq!(
            serde_json::to_string(&w).ok().as_deref(),
            Some("[1000.0,2500.0,[3,7]]")
        );
    }

    /// A direct workload draws a recipient other than the sender for each
    /// message, the same for the same seed, without changing the rest of
    /// the plan; an islands layout puts the first BLE nodes (the gateways)
    /// one per island, the islands `island_gap_m` apart.
    #[test]
    fn direct_recipients_and_islands() {
        let text = |kind: &str| {
            format!(
                "name = \"t\"\nnodes = 8\nduration_secs = 5\n\
                 [workload]\nkind = \"{kind}\"\npublishers = 3\nmessages = 40\n\
                 [ble]\nnodes = 6\ngateways = 2\nlayout = \"islands\"\nislands = 2\n\
                 island_gap_m = 500\nspacing_m = 10\n"
            )
        };
        let direct: Scenario = toml::from_str(&text("direct")).expect("scenario");
        let group: Scenario = toml::from_str(&text("group")).expect("scenario");
        let (a, b, g) = (plan(&direct, 7), plan(&direct, 7), plan(&group, 7));
        assert_eq!(a.workload, b.workload);
        assert_eq!(a.topology, g.topology);
        assert_eq!(a.workload.publishers, g.workload.publishers);
        for m in &a.workload.messages {
            let to = m.to.expect("a recipient");
            assert!(to != m.publisher && to < 8, "{m:?}");
        }
        assert!(g.workload.messages.iter().all(|m| m.to.is_none()));
        let x = |i: usize| a.topology.nodes[i].position.expect("a radio")[0];
        // Nodes 2 and 3 are the gateways, one per island.
        assert_eq!((x(2), x(3)), (0.0, 500.0));
        assert!(x(4) < 100.0 && x(5) >= 500.0);
    }
}
