//! Scenario files (TOML): what to simulate. Every section and key is
//! documented in docs/simulator-guide.md; unknown keys are errors.

use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// A whole scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A name for reports.
    pub name: String,
    /// Number of nodes.
    pub nodes: usize,
    /// Model seconds from the start of the workload to the end of the run
    /// (after warm-up).
    pub duration_secs: f64,
    /// Seed, unless `--seed` overrides it.
    #[serde(default = "one")]
    pub seed: u64,
    /// Slow the model down by this factor (see the guide); `--time-dilation`
    /// overrides it.
    #[serde(default = "one_f")]
    pub time_dilation: f64,
    /// How nodes are connected at start.
    #[serde(default)]
    pub topology: Topology,
    /// The link model.
    #[serde(default)]
    pub link: Link,
    /// Gossipsub's parameters.
    #[serde(default)]
    pub gossip: Gossip,
    /// What the nodes do.
    #[serde(default)]
    pub workload: Workload,
    /// Faults.
    #[serde(default)]
    pub faults: Faults,
    /// Nodes on a simulated BLE radio, placed in space (none when absent).
    #[serde(default)]
    pub ble: Option<Ble>,
    /// Mailboxes: whether waiting direct messages are deposited with
    /// holders (on by default, as in the daemon), and after how long.
    #[serde(default)]
    pub mailbox: MailboxKnob,
    /// The onion route: mix nodes, hops, delays, cover traffic (absent: no
    /// node relays, and mix packets are not traced).
    #[serde(default)]
    pub onion: Option<OnionKnob>,
    /// Every node's own settings.
    #[serde(default)]
    pub node: NodeKnob,
}

/// `[node]`: settings of every node, in-process and in a Shadow export
/// alike.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeKnob {
    /// Established connections a node holds at most (the daemon's
    /// `--max-connections`; three quarters of them may be inbound).
    /// Connections beyond it are refused once their handshake is done.
    pub max_connections: u32,
}

impl Default for NodeKnob {
    fn default() -> Self {
        NodeKnob {
            max_connections: 1000,
        }
    }
}

/// `[onion]`: mix nodes and the onion route's settings (docs/protocols/
/// onion.md), for every node with the internet.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnionKnob {
    /// How many nodes relay (`--mix`): internet nodes drawn with the seed,
    /// senders last.
    pub mix_nodes: usize,
    /// Mix hops of a path (`--onion-hops`, 1 to 4).
    pub hops: usize,
    /// Mean per-hop delay, model ms (`--mix-delay-ms`; 0 is the fast
    /// profile).
    pub mix_delay_ms: u64,
    /// Loop cover packets per model second, per node (`--cover-rate`).
    pub cover_rate: f64,
}

impl Default for OnionKnob {
    fn default() -> Self {
        OnionKnob {
            mix_nodes: 0,
            hops: fogmesh_protocols::onion::DEFAULT_HOPS,
            mix_delay_ms: fogmesh_protocols::onion::DEFAULT_DELAY_MS,
            cover_rate: 0.0,
        }
    }
}

/// `[mailbox]`: the direct-message mailbox knob.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailboxKnob {
    /// Deposit waiting messages with holders, and hold for others.
    pub enabled: bool,
    /// Model seconds a message waits for its recipient before it is
    /// deposited.
    pub after_secs: f64,
}

impl Default for MailboxKnob {
    fn default() -> Self {
        MailboxKnob {
            enabled: true,
            after_secs: 30.0,
        }
    }
}

/// Nodes on the radio. Node indices are laid out as: internet-only nodes
/// first, then the BLE nodes, of which the first `gateways` also have the
/// internet. (With `nodes` equal to the scenario's, node 0, the group's
/// admin, is the first BLE node.)
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ble {
    /// How many nodes have a BLE radio (the last ones).
    pub nodes: usize,
    /// How many of them also have the internet.
    pub gateways: usize,
    /// Where the radios stand.
    pub layout: BleLayout,
    /// Metres between neighbours, for `line` and `grid`.
    pub spacing_m: f64,
    /// Side of the crowd's square, metres.
    pub area_m: f64,
    /// For `islands`: how many clusters (BLE node `k` is in island
    /// `k % islands`, so the first `gateways` nodes spread over the
    /// islands).
    pub islands: usize,
    /// For `islands`: metres between two neighbouring islands (far beyond
    /// radio range, so that only gateways join them).
    pub island_gap_m: f64,
    /// The radio link model: `range_m`, `mtu`, `bandwidth` (B/s per link),
    /// `latency_ms`, `loss`, `drop_mean_secs`, `max_links`.
    pub link: fogmesh_ble::sim::LinkModel,
}

impl Default for Ble {
    fn default() -> Self {
        Ble {
            nodes: 0,
            gateways: 0,
            layout: BleLayout::Line,
            spacing_m: 10.0,
            area_m: 50.0,
            islands: 2,
            island_gap_m: 1000.0,
            link: fogmesh_ble::sim::LinkModel::default(),
        }
    }
}

/// Where the radios stand (`ble.layout`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BleLayout {
    /// In a line, `spacing_m` apart.
    #[default]
    Line,
    /// On a square grid, `spacing_m` apart, filled row by row.
    Grid,
    /// Uniformly at random in a square of side `area_m`.
    Crowd,
    /// In `islands` clusters `island_gap_m` apart, each a square grid
    /// `spacing_m` apart: offline islands that only gateways join.
    Islands,
}

impl Scenario {
    /// Nodes with the internet: a prefix `0..internet_nodes()` of the
    /// indices.
    pub fn internet_nodes(&self) -> usize {
        match &self.ble {
            Some(b) => self.nodes - b.nodes + b.gateways,
            None => self.nodes,
        }
    }

    /// Below this many peers a node dials the peers it knows of: the
    /// topology's degree.
    pub fn min_peers(&self) -> usize {
        match self.topology.kind {
            TopologyKind::Random => self.topology.degree,
            TopologyKind::Full => self.nodes - 1,
            TopologyKind::Ring | TopologyKind::Line => 2,
        }
    }

    /// The index of the first BLE node.
    pub fn first_ble_node(&self) -> usize {
        self.nodes - self.ble.as_ref().map_or(0, |b| b.nodes)
    }
}

fn one() -> u64 {
    1
}
fn one_f() -> f64 {
    1.0
}

/// How nodes are connected at start: each node dials the peers this gives
/// it; later connections come only from the protocols (Kademlia walks are
/// off in the simulator so that the topology is the scenario's).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topology {
    /// The shape of the initial dials.
    pub kind: TopologyKind,
    /// Dials per node for `random`.
    pub degree: usize,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            kind: TopologyKind::Random,
            degree: 8,
        }
    }
}

/// The shape of the initial dials (`topology.kind`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopologyKind {
    /// Each node dials `degree` others chosen with the seed.
    #[default]
    Random,
    /// Node i dials node i + 1, and the last dials node 0.
    Ring,
    /// Node i dials node i + 1.
    Line,
    /// Every node dials every node after it.
    Full,
}

/// The link model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Link {
    /// Where latencies come from.
    pub model: LatencyModel,
    /// One-way latency for `uniform`, ms.
    pub latency_ms: f64,
    /// Uplink of most nodes, Mbit/s.
    pub bandwidth_mbps: f64,
    /// Fraction of nodes with the fast uplink.
    pub fast_fraction: f64,
    /// Uplink of the fast nodes, Mbit/s.
    pub fast_bandwidth_mbps: f64,
    /// Probability that a frame is lost (and retransmitted after a timeout).
    pub loss: f64,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            model: LatencyModel::World,
            latency_ms: 50.0,
            bandwidth_mbps: 50.0,
            fast_fraction: 0.2,
            fast_bandwidth_mbps: 1000.0,
            loss: 0.0,
        }
    }
}

/// Where the links' latencies come from (`link.model`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatencyModel {
    /// 8 regions, one-way latencies 2 to 220 ms, as in the
    /// gossipsub-interop model ([`world_latency`]).
    #[default]
    World,
    /// `latency_ms` between every two nodes.
    Uniform,
}

/// Gossipsub's parameters (see fogmesh's `GossipParams`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gossip {
    /// D.
    pub mesh_n: usize,
    /// D_low.
    pub mesh_n_low: usize,
    /// D_high.
    pub mesh_n_high: usize,
    /// D_out.
    pub mesh_outbound_min: usize,
    /// D_lazy.
    pub gossip_lazy: usize,
    /// Heartbeat, model ms.
    pub heartbeat_ms: f64,
    /// Flood own messages to all subscribed peers.
    pub flood_publish: bool,
}

impl Default for Gossip {
    fn default() -> Self {
        Gossip {
            mesh_n: 6,
            mesh_n_low: 5,
            mesh_n_high: 12,
            mesh_outbound_min: 2,
            gossip_lazy: 6,
            heartbeat_ms: 1000.0,
            flood_publish: true,
        }
    }
}

/// What the nodes do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// `group` (one group chat) or `direct` (direct messages, each from a
    /// publisher to a node drawn with the seed).
    pub kind: WorkloadKind,
    /// Members of the one group (node 0 creates it); 0 means every node.
    pub members: usize,
    /// How many members publish (chosen with the seed).
    pub publishers: usize,
    /// Messages in all.
    pub messages: usize,
    /// Messages per second over all publishers (model time).
    pub rate_per_sec: f64,
    /// Message size, bytes of text.
    pub message_size: usize,
    /// Model seconds after every member knows the group before the first
    /// message (lets the gossip mesh form).
    pub warmup_secs: f64,
    /// Direct messages only: send them privately (`send --private`: the
    /// onion route, through the `[onion]` section's mix nodes).
    pub private: bool,
}

/// What kind of messages the workload sends (`workload.kind`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// Group messages: node 0 creates the group, the publishers post to it.
    #[default]
    Group,
    /// Direct messages: `messages` of them, round-robin over the
    /// publishers, each to another node drawn with the seed; no group.
    Direct,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            kind: WorkloadKind::Group,
            members: 0,
            publishers: 10,
            messages: 100,
            rate_per_sec: 10.0,
            message_size: 256,
            warmup_secs: 5.0,
            private: false,
        }
    }
}

/// Faults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Network partitions.
    #[serde(default)]
    pub partition: Vec<Partition>,
    /// Nodes going down and coming back.
    #[serde(default)]
    pub churn: Vec<Churn>,
}

/// A partition: a `fraction` of the nodes (chosen with the seed; never node
/// 0's side alone) is cut off from the rest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// Model seconds after the workload starts.
    pub at_secs: f64,
    /// How long.
    pub duration_secs: f64,
    /// Fraction of nodes on the small side.
    pub fraction: f64,
}

/// Churn: a `fraction` of the nodes (not publishers) stop and restart with
/// their data.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Churn {
    /// Model seconds after the workload starts.
    pub at_secs: f64,
    /// How long they stay down.
    pub down_secs: f64,
    /// Fraction of nodes.
    pub fraction: f64,
    /// Stop a fraction of the publishers instead (of the publishers, not of
    /// all nodes): senders that leave.
    #[serde(default)]
    pub publishers: bool,
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let s: Scenario = toml::from_str(&text)
            .with_context(|| format!("invalid scenario {}", path.display()))?;
        s.check()?;
        Ok(s)
    }

    /// Checks ranges (the enumerated choices are checked when parsing).
    pub fn check(&self) -> anyhow::Result<()> {
        if self.nodes < 2 {
            bail!("nodes must be at least 2");
        }
        if !(self.time_dilation >= 1.0 && self.time_dilation.is_finite()) {
            bail!("time_dilation must be 1 or more");
        }
        if self.link.bandwidth_mbps <= 0.0 || self.link.fast_bandwidth_mbps <= 0.0 {
            bail!("bandwidths must be positive");
        }
        if !(0.0..1.0).contains(&self.link.loss) {
            bail!("link.loss must be in [0, 1)");
        }
        if self.node.max_connections < 8 {
            bail!("node.max_connections must be at least 8");
        }
        if self.workload.members > self.nodes {
            bail!("workload.members is more than nodes");
        }
        if self.workload.rate_per_sec <= 0.0 {
            bail!("workload.rate_per_sec must be positive");
        }
        if self.workload.message_size > 64 * 1024 {
            bail!("workload.message_size is over the 64 KiB message limit");
        }
        for p in &self.faults.partition {
            if !(0.0..1.0).contains(&p.fraction) || p.fraction == 0.0 {
                bail!("a partition's fraction must be in (0, 1)");
            }
        }
        if let Some(b) = &self.ble {
            if b.nodes > self.nodes {
                bail!("ble.nodes is more than nodes");
            }
            if b.gateways > b.nodes {
                bail!("ble.gateways is more than ble.nodes");
            }
            if !(b.spacing_m > 0.0 && b.area_m > 0.0) {
                bail!("ble.spacing_m and ble.area_m must be positive");
            }
            if b.layout == BleLayout::Islands && (b.islands == 0 || b.island_gap_m <= 0.0) {
                bail!("ble.islands must be at least 1 and ble.island_gap_m positive");
            }
            b.link
                .validate()
                .map_err(|e| anyhow::anyhow!("ble.link: {e}"))?;
        }
        for c in &self.faults.churn {
            if c.publishers && !(0.0..=1.0).contains(&c.fraction) {
                bail!("a publishers' churn fraction must be in [0, 1]");
            }
            if !c.publishers && !(0.0..1.0).contains(&c.fraction) {
                bail!("a churn fraction must be in [0, 1)");
            }
        }
        if !(self.mailbox.after_secs >= 0.0 && self.mailbox.after_secs.is_finite()) {
            bail!("mailbox.after_secs must be a number of seconds");
        }
        if self.workload.private && self.workload.kind != WorkloadKind::Direct {
            bail!("workload.private needs workload.kind = \"direct\"");
        }
        if let Some(o) = &self.onion {
            use fogmesh_protocols::onion::{MAX_DELAY_MS, MAX_HOPS, MIN_HOPS};
            if o.mix_nodes > self.internet_nodes() {
                bail!("onion.mix_nodes is more than the nodes with the internet");
            }
            if !(MIN_HOPS..=MAX_HOPS).contains(&o.hops) {
                bail!("onion.hops must be between {MIN_HOPS} and {MAX_HOPS}");
            }
            if o.mix_delay_ms > MAX_DELAY_MS {
                bail!("onion.mix_delay_ms must be at most {MAX_DELAY_MS}");
            }
            if !(o.cover_rate >= 0.0 && o.cover_rate.is_finite()) {
                bail!("onion.cover_rate must be a rate (0 or more per second)");
            }
        }
        Ok(())
    }
}

/// The world model's regions and one-way latencies (ms), after the
/// gossipsub-interop harness: 8 regions, 2 ms within a region, up to 220 ms
/// between the farthest.
pub const REGIONS: [&str; 8] = [
    "us-east",
    "us-west",
    "south-america",
    "europe",
    "africa",
    "middle-east",
    "asia",
    "oceania",
];

/// One-way latency between world regions, ms.
pub fn world_latency() -> Vec<Vec<f64>> {
    // Symmetric; the diagonal is the intra-region latency.
    let upper: [[f64; 8]; 8] = [
        [2.0, 35.0, 60.0, 40.0, 110.0, 95.0, 110.0, 100.0],
        [0.0, 2.0, 85.0, 75.0, 145.0, 125.0, 80.0, 70.0],
        [0.0, 0.0, 2.0, 95.0, 160.0, 150.0, 170.0, 160.0],
        [0.0, 0.0, 0.0, 2.0, 75.0, 45.0, 120.0, 140.0],
        [0.0, 0.0, 0.0, 0.0, 2.0, 80.0, 170.0, 220.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 80.0, 150.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 60.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0],
    ];
    (0..8)
        .map(|i| {
            (0..8)
                .map(|j| if i <= j { upper[i][j] } else { upper[j][i] })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shipped scenario parses unchanged and passes its checks.
    #[test]
    fn shipped_scenarios_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "toml") {
                if let Err(e) = Scenario::load(&path) {
                    panic!("{}: {e:#}", path.display());
                }
                seen += 1;
            }
        }
        assert!(
            seen >= 10,
            "only {seen} scenarios found in {}",
            dir.display()
        );
    }

    /// The enumerated choices keep their TOML spellings; an unknown one is
    /// refused with the value and the choices in the message.
    #[test]
    fn choices_parse_by_name_and_unknown_ones_are_refused() {
        let base = "name = \"x\"\nnodes = 3\nduration_secs = 1\n";
        let parse = |extra: &str| toml::from_str::<Scenario>(&format!("{base}{extra}"));
        let s = parse(
            "[topology]\nkind = \"ring\"\n[link]\nmodel = \"uniform\"\n\
             [ble]\nnodes = 2\nlayout = \"crowd\"\n",
        )
        .map_err(|e| e.to_string());
        let s = s.as_ref().map(|s| {
            (
                s.topology.kind,
                s.link.model,
                s.ble.as_ref().map(|b| b.layout),
            )
        });
        assert_eq!(
            s,
            Ok((
                TopologyKind::Ring,
                LatencyModel::Uniform,
                Some(BleLayout::Crowd)
            ))
        );
        let capped = parse("[node]\nmax_connections = 64\n").expect("parses");
        assert_eq!(capped.node.max_connections, 64);
        assert_eq!(parse("").expect("parses").node.max_connections, 1000);
        let e = parse("[node]\nmax_connections = 4\n")
            .expect("parses")
            .check()
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("node.max_connections must be at least 8")
        );
        for (extra, bad) in [
            ("[topology]\nkind = \"star\"\n", "star"),
            ("[link]\nmodel = \"moon\"\n", "moon"),
            ("[ble]\nlayout = \"circle\"\n", "circle"),
        ] {
            let e = parse(extra)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                e.contains(&format!("unknown variant `{bad}`")),
                "{extra}: {e}"
            );
        }
    }
}
