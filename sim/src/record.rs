//! What a run records, in memory, before it is written out: the input of
//! the report (summary, CSV, plots). Times are milliseconds of *model* time
//! since the start of the run (wall time divided by the time-dilation
//! factor).

use serde::{Deserialize, Serialize};

/// One published group message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    /// The message id (hex), as in `events.ndjson`.
    pub id: String,
    /// Index of the publishing node.
    pub publisher: usize,
    /// When `group send` was called.
    pub t_ms: f64,
    /// Plaintext size in bytes.
    pub size: usize,
    /// Size of the gossip frame on the wire (encrypted, signed envelope).
    pub wire_size: usize,
    /// Indices of the nodes that should deliver it (the group's members
    /// other than the publisher).
    pub recipients: Vec<usize>,
}

/// One direct message of a `direct` workload, from `send` to its
/// receipt.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DirectRecord {
    /// The message id (hex), as `send` answered it.
    pub id: String,
    /// The sending node.
    pub from: usize,
    /// The recipient node.
    pub to: usize,
    /// The kind of pair: `SENDER->RECIPIENT`, each `internet`, `gateway`
    /// (internet and BLE) or `ble`, plus ` (same island)` or
    /// ` (other island)` when both have radios in an `islands` layout.
    pub class: String,
    /// When `send` was called (model ms).
    pub t_ms: f64,
    /// Text size, bytes.
    pub size: usize,
    /// When the recipient's event stream first reported it
    /// (`DirectMessage` with this id), model ms; `None` if it never did.
    pub delivered_ms: Option<f64>,
    /// How many times the recipient's event stream reported it (1 when
    /// delivered once; more would be duplicates).
    pub deliveries: u32,
    /// Whether the recipient's own record holds it at the end of the run
    /// (asked through its handle; `false` when it is down then). Catches a
    /// delivery its event stream could not report: a restarted node's
    /// stream is followed from just after it starts.
    pub in_recipient_record: bool,
    /// When the sender's event stream said `delivered` (it holds the
    /// recipient's signed receipt), model ms.
    pub receipt_ms: Option<f64>,
    /// The route that delivered it, by the sender's record.
    pub route: Option<String>,
    /// The sender's state of it at the end of the run.
    pub state: Option<String>,
    /// Attempts the sender made (one per route tried, retries included),
    /// at the end of the run.
    pub attempts: usize,
}

/// What a node saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReceiptKind {
    /// A copy of a gossip message arrived on the wire (duplicates included).
    Wire,
    /// The node delivered another member's message to the application
    /// (first time). A publisher's own messages are in `published`.
    Delivered,
    /// The node delivered a message it had already delivered (must not
    /// happen).
    DuplicateDelivery,
}

/// One receipt at one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Receipt {
    /// Model time of the receipt.
    pub t_ms: f64,
    /// The receiving node.
    pub node: usize,
    /// The message id (hex).
    pub id: String,
    /// What kind of receipt.
    pub kind: ReceiptKind,
}

/// What kind of fault a window was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Part of the network was cut off from the rest.
    Partition,
    /// Some nodes stopped and restarted.
    Churn,
}

/// A fault window, for the report (catch-up time after a partition heals).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultWindow {
    /// What the fault was.
    pub kind: FaultKind,
    /// Model time it started.
    pub start_ms: f64,
    /// Model time it ended (healed, or nodes back).
    pub end_ms: f64,
}

/// Everything the report needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunRecord {
    /// Scenario name.
    pub scenario: String,
    /// The seed used.
    pub seed: u64,
    /// Number of nodes.
    pub nodes: usize,
    /// The time-dilation factor (1 = real time).
    pub time_dilation: f64,
    /// Model duration of the run.
    pub duration_ms: f64,
    /// Wall-clock duration of the run, seconds.
    pub wall_secs: f64,
    /// Peak resident memory of the simulator process, KiB (VmHWM).
    pub peak_rss_kib: u64,
    /// Published messages.
    pub published: Vec<Published>,
    /// Receipts at every node.
    pub receipts: Vec<Receipt>,
    /// Bytes each node sent at the transport level (after Noise and Yamux
    /// framing; everything: gossip, control, identify, Kademlia, sync).
    pub bytes_sent: Vec<u64>,
    /// Peers each node was connected to at the end of the workload (the
    /// topology's links and whatever else the nodes dialled: Kademlia's
    /// lookups and bootstrap); under Shadow, from the daemons' `Peer
    /// Connected` and `Peer Disconnected` lines (one entry per event log).
    #[serde(default)]
    pub connected_peers: Vec<u64>,
    /// Direct-message envelopes all nodes handed to a peer (attempts,
    /// receipts, relayed copies; one per hop), from the nodes' counters.
    #[serde(default)]
    pub dm_envelopes_sent: u64,
    /// Of those, the copies relayed for others.
    #[serde(default)]
    pub dm_envelopes_relayed: u64,
    /// Scheduling lag samples of the simulator's runtime, ms: how late a
    /// 10 ms timer fired.
    pub lag_ms: Vec<f64>,
    /// Fault windows.
    pub faults: Vec<FaultWindow>,
    /// The median one-way latency of the link model, ms (model time): the
    /// scale against which host lag is judged.
    pub median_link_latency_ms: f64,
    /// Direct messages (a `direct` workload; empty otherwise).
    #[serde(default)]
    pub direct: Vec<DirectRecord>,
    /// The internet link model the run used, for the physical limit of
    /// each delivery (`None` in records written before it existed).
    #[serde(default)]
    pub link: Option<LinkRecord>,
    /// True when `Published::wire_size` is not known (a run analysed from
    /// daemons' event logs, which do not log frame sizes): the payload
    /// figures are then left out rather than computed from zeros.
    #[serde(default)]
    pub wire_sizes_unknown: bool,
    /// The onion route's mix nodes and packet traces (a scenario with an
    /// `[onion]` section; `None` otherwise).
    #[serde(default)]
    pub onion: Option<OnionRecord>,
}

/// What a run with mix nodes records of the onion route.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OnionRecord {
    /// The nodes started with `--mix`.
    pub mix_nodes: Vec<usize>,
    /// Every mix packet event of every node (the nodes' mix traces, as in
    /// `--event-log`), in model time.
    pub packets: Vec<MixRecord>,
}

/// One mix packet event (a node's mix trace, [`fogmesh::onion::MixTrace`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MixRecord {
    /// The node.
    pub node: usize,
    /// A packet the node built and sent: what it carries (a direct
    /// message's id, `reply` or `cover`); `None` for a relayed packet.
    pub origin: Option<String>,
    /// A relayed packet: its hash as it arrived.
    pub packet_in: Option<String>,
    /// The packet's hash as it left the node.
    pub packet_out: String,
    /// A relayed packet: when it entered the node's delay queue (its pool),
    /// model ms.
    pub arrived_ms: Option<f64>,
    /// When it left the node (sent, or left the pool), model ms.
    pub t_ms: f64,
}

/// The internet link model of a run: what the direct path between two
/// nodes costs at the least (see [`LinkRecord::direct_ms`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LinkRecord {
    /// Region index of each node.
    pub region: Vec<usize>,
    /// One-way latency between regions, ms.
    pub latency_ms: Vec<Vec<f64>>,
    /// Uplink of each node, bytes per second.
    pub uplink_bps: Vec<f64>,
    /// Whether each node has the internet (a radio-only node has no direct
    /// internet path).
    pub internet: Vec<bool>,
}

impl LinkRecord {
    /// The one-way time of the direct path from `from` to `to` for a frame
    /// of `bytes`: the region pair's latency plus the frame's time on the
    /// sender's uplink. `None` when either node lacks the internet or is
    /// not in the model.
    pub fn direct_ms(&self, from: usize, to: usize, bytes: usize) -> Option<f64> {
        if !(*self.internet.get(from)? && *self.internet.get(to)?) {
            return None;
        }
        let latency = *self
            .latency_ms
            .get(*self.region.get(from)?)?
            .get(*self.region.get(to)?)?;
        let uplink = *self.uplink_bps.get(from)?;
        let serialise = if uplink > 0.0 {
            bytes as f64 / uplink * 1000.0
        } else {
            0.0
        };
        Some(latency + serialise)
    }
}
