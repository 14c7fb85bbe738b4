//! The onion route in the node: mix relaying, private sending and
//! receiving, SURB acknowledgements, descriptors and cover traffic.
//!
//! The protocol logic is sans-IO in `fogmesh_protocols::onion`; this module
//! runs it:
//! - a **task** ([`service`]) owns the descriptors, the paths, the
//!   per-hop delay queue, the reply blocks and the reassembly of fragments,
//!   and talks to the messages actor (attempts, delivered envelopes,
//!   receipts);
//! - a **thread** ([`worker`]) owns the mix keys and replay filters and
//!   does every Sphinx operation (processing, building packets and SURBs):
//!   nothing of it runs on the swarm's task or the onion task;
//! - **streams** ([`wire`]): `/fogmesh/mix/1` through `libp2p-stream`, one
//!   long-lived outbound stream per neighbour written by a task of its own,
//!   inbound streams read by a task each (size limits and the per-peer
//!   token bucket before anything is queued).
//!
//! The event loop only tells it about connections; the messages network
//! side hands it attempts over `Route::Onion` and receipts of letters that
//! came by it. See docs/protocols/onion.md.

mod service;
mod wire;
mod worker;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fogmesh_protocols::messages::{Envelope, MessageId};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::messages::MessagesHandle;

/// Commands queued for the onion task; beyond, attempts are answered
/// "busy" by the messages network side.
const COMMAND_QUEUE: usize = 1024;

/// See [`OnionConfig::stream_idle`].
pub const STREAM_IDLE: Duration = Duration::from_secs(30);
/// See [`OnionConfig::open_timeout`].
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the onion route.
#[derive(Debug, Clone)]
pub struct OnionConfig {
    /// Relay packets for others (`--mix`). Off by default: see
    /// docs/protocols/onion.md.
    pub mix: bool,
    /// Mix hops of a path (`--onion-hops`, 1 to 4, default 3).
    pub hops: usize,
    /// Mean per-hop delay, ms (`--mix-delay-ms`, default 50; 0 is the
    /// fast profile, without mixing delays).
    pub mean_delay_ms: u64,
    /// Loop cover packets per second (`--cover-rate`, default 0: off).
    pub cover_rate: f64,
    /// Length of a mix key's epoch, ms.
    pub epoch_ms: u64,
    /// Packets per second accepted from one peer, sustained (bursts of
    /// four times as many).
    pub peer_rate: u64,
    /// A mix stream with nothing to write for this long is closed (and
    /// opened again for the next frame), so that a connection is held
    /// open by its onion traffic, not by a stream that once carried
    /// descriptors.
    pub stream_idle: Duration,
    /// How long opening a mix stream to a neighbour (and dialling it, for
    /// a packet) may take before the neighbour counts as failed.
    pub open_timeout: Duration,
    /// Test hook (debug builds only, hidden flag): each message's first
    /// packet is also sent a second time unchanged and once with a header
    /// byte flipped, so the first relay's replay and tamper checks can be
    /// observed end to end.
    pub test_replay_tamper: bool,
    /// Research traces of mix packets (`--event-log`, the simulator): off
    /// (`None`) by default, and then nothing is hashed or recorded.
    pub trace: Option<MixTracer>,
}

impl Default for OnionConfig {
    fn default() -> Self {
        OnionConfig {
            mix: false,
            hops: fogmesh_protocols::onion::DEFAULT_HOPS,
            mean_delay_ms: fogmesh_protocols::onion::DEFAULT_DELAY_MS,
            cover_rate: 0.0,
            epoch_ms: fogmesh_protocols::onion::keys::DEFAULT_EPOCH_MS,
            peer_rate: 200,
            stream_idle: STREAM_IDLE,
            open_timeout: OPEN_TIMEOUT,
            test_replay_tamper: false,
            trace: None,
        }
    }
}

/// What a packet this node built carries, for a [`MixTrace::Sent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MixOrigin {
    /// A fragment of the direct message with this id (hex).
    Message(String),
    /// An acknowledgement sent back through a sender's reply block.
    Reply,
    /// A loop cover packet.
    Cover,
}

/// One mix packet event: research-only ground truth for measuring
/// anonymity (which packets a relay held together). Packets are named by
/// [`packet_hash`] of their bytes, so that a trace can chain one packet's
/// successive forms through relays. Only produced when
/// [`OnionConfig::trace`] is set.
#[derive(Debug, Clone)]
pub enum MixTrace {
    /// This node sent a packet it built to its first hop.
    Sent {
        /// What the packet carries.
        origin: MixOrigin,
        /// Hash of the packet sent.
        packet: String,
        /// When it was handed to the first hop's writer.
        at: std::time::Instant,
    },
    /// This node relayed a packet: it entered the delay queue (its pool)
    /// at `arrived` and left it at `departed`.
    Relayed {
        /// Hash of the packet as it arrived.
        packet_in: String,
        /// Hash of the packet as it left (one layer peeled).
        packet_out: String,
        /// When it entered the delay queue (after Sphinx processing).
        arrived: std::time::Instant,
        /// When it left the delay queue for its successor.
        departed: std::time::Instant,
    },
}

/// Receives a node's [`MixTrace`]s (called on the onion task; must not
/// block).
#[derive(Clone)]
pub struct MixTracer(pub Arc<dyn Fn(MixTrace) + Send + Sync>);

impl std::fmt::Debug for MixTracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MixTracer")
    }
}

impl MixTracer {
    /// One tracer calling `self`, then `other`.
    pub fn and(self, other: MixTracer) -> MixTracer {
        MixTracer(Arc::new(move |t: MixTrace| {
            (self.0)(t.clone());
            (other.0)(t);
        }))
    }
}

/// A short name of a packet for traces: the first 8 bytes of the SHA-256
/// of its bytes, in hex.
pub fn packet_hash(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(bytes)[..8])
}

/// The onion route's counters, on `/metrics` with the node's.
#[derive(Debug, Clone, Default)]
pub struct OnionMetrics {
    /// Packets read from peers.
    pub packets_received: Counter,
    /// Packets relayed to a successor.
    pub packets_relayed: Counter,
    /// Packets dropped as replays.
    pub replays_dropped: Counter,
    /// Packets dropped as tampered (header MAC).
    pub tampered_dropped: Counter,
    /// Packets dropped otherwise (malformed, not a mix, queues full, rate).
    pub packets_dropped: Counter,
    /// Packets sent (data, replies, cover).
    pub packets_sent: Counter,
    /// Messages reassembled and delivered to this node.
    pub messages_received: Counter,
    /// Replies (acknowledgements) received through this node's SURBs.
    pub acks_received: Counter,
    /// Loop cover packets sent and come back.
    pub cover_sent: Counter,
    /// Loop cover packets that came back.
    pub cover_returned: Counter,
}

impl OnionMetrics {
    /// Registers every counter under `fogmesh_onion_*`.
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("onion");
        let all: [(&str, &str, &Counter); 10] = [
            (
                "packets_received",
                "Onion packets read from peers",
                &self.packets_received,
            ),
            (
                "packets_relayed",
                "Onion packets relayed to a successor",
                &self.packets_relayed,
            ),
            (
                "replays_dropped",
                "Onion packets dropped as replays",
                &self.replays_dropped,
            ),
            (
                "tampered_dropped",
                "Onion packets dropped as tampered (header MAC)",
                &self.tampered_dropped,
            ),
            (
                "packets_dropped",
                "Onion packets dropped otherwise (malformed, rate, queues, not a mix)",
                &self.packets_dropped,
            ),
            (
                "packets_sent",
                "Onion packets sent (data, replies, cover)",
                &self.packets_sent,
            ),
            (
                "messages_received",
                "Private messages reassembled and delivered here",
                &self.messages_received,
            ),
            (
                "acks_received",
                "SURB acknowledgements received",
                &self.acks_received,
            ),
            ("cover_sent", "Loop cover packets sent", &self.cover_sent),
            (
                "cover_returned",
                "Loop cover packets come back",
                &self.cover_returned,
            ),
        ];
        for (name, help, c) in all {
            r.register(name, help, c.clone());
        }
    }
}

/// What the node asks of the onion task.
#[derive(Debug)]
pub(crate) enum Command {
    /// Attempt `n` of message `id`: answered to the messages actor.
    Send {
        id: MessageId,
        n: u32,
        env: Envelope,
    },
    /// A receipt of a letter that came by the onion route: through the
    /// sender's reply block, or not at all.
    Receipt { env: Envelope },
    /// A connection to `peer` came up (not over BLE).
    Connected(PeerId),
    /// The last connection to `peer` closed.
    Closed(PeerId),
}

/// The peers the node has an internet connection to, as the event loop
/// knows them: set before the onion task hears of a connection, cleared
/// as soon as the last one closes. A writer asks it before it opens a
/// stream for descriptors, since opening a stream to a peer with no
/// connection dials that peer.
#[derive(Debug, Clone, Default)]
pub(crate) struct Linked(Arc<Mutex<HashSet<PeerId>>>);

impl Linked {
    fn set(&self, peer: PeerId, up: bool) {
        let mut peers = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if up {
            peers.insert(peer);
        } else {
            peers.remove(&peer);
        }
    }

    /// Whether the node has a connection to `peer`.
    pub(crate) fn contains(&self, peer: &PeerId) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(peer)
    }
}

/// The node's handle on the onion task. Cloneable.
#[derive(Debug, Clone)]
pub(crate) struct OnionHandle {
    tx: mpsc::Sender<Command>,
    linked: Linked,
}

impl OnionHandle {
    /// Queues a command; false when the task is busy or gone.
    pub(crate) fn offer(&self, cmd: Command) -> bool {
        self.tx.try_send(cmd).is_ok()
    }

    /// A connection to `peer` came up (not over BLE).
    pub(crate) fn connected(&self, peer: PeerId) {
        self.linked.set(peer, true);
        self.offer(Command::Connected(peer));
    }

    /// The last connection to `peer` closed.
    pub(crate) fn closed(&self, peer: PeerId) {
        self.linked.set(peer, false);
        self.offer(Command::Closed(peer));
    }
}

/// Starts the onion task, its worker thread and its stream acceptor.
pub(crate) fn start(
    key: Keypair,
    control: libp2p_stream::Control,
    actor: MessagesHandle,
    metrics: OnionMetrics,
    cfg: OnionConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<(OnionHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let metrics = Arc::new(metrics);
    let (thread, linked) = service::spawn(key, control, actor, metrics, cfg, rx, shutdown)?;
    Ok((OnionHandle { tx, linked }, thread))
}
