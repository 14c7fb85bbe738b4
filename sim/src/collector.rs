//! What the run records: every node's receipts (wire copies, deliveries)
//! and the workload's publishes, gathered in one place, written as they
//! come to `events.ndjson` (in the node's event-log format,
//! [`fogmesh::eventlog`]) and kept for the report; and the host's
//! scheduling lag, sampled beside them.
//!
//! The nodes report through [`Taps`]: the gossip observer the builder
//! installs in each node, and a task following each node's event stream.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use fogmesh::behaviour::GossipObserver;
use fogmesh::eventlog::{self, Line, Msg};
use fogmesh::types::NodeEvent;
use libp2p::PeerId;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::ModelClock;
use crate::plan::NodeOut;
use crate::record::{DirectRecord, Published, Receipt, ReceiptKind};
use crate::workload::PublishOutcome;

/// One receipt at one node, on its way to the collector.
#[derive(Debug)]
pub struct Seen {
    /// When it happened, for model time.
    at: Instant,
    /// When it happened, for the log's `time`.
    time: SystemTime,
    node: usize,
    id: String,
    kind: ReceiptKind,
    /// The gossip frame's size, for a wire copy.
    wire_size: Option<usize>,
}

impl Seen {
    fn now(node: usize, id: String, kind: ReceiptKind, wire_size: Option<usize>) -> Self {
        Seen {
            at: Instant::now(),
            time: SystemTime::now(),
            node,
            id,
            kind,
            wire_size,
        }
    }
}

/// A direct message's arrival at its recipient, or its receipt at its
/// sender, as the node's event stream reported it.
#[derive(Debug, Clone)]
struct DirectSeen {
    at: Instant,
    id: String,
    /// `None`: the recipient delivered it; `Some(route)`: the sender holds
    /// the receipt (and the route that delivered it, if it said).
    receipt: Option<Option<String>>,
}

/// How the nodes report to the collector. Cheap to clone; every node (and
/// every restart of one) gets its own taps from it.
#[derive(Debug, Clone)]
pub struct Taps {
    // Unbounded: the gossip observer runs inside gossipsub and cannot wait,
    // and a receipt dropped for want of room would bias every figure. The
    // collector drains it as fast as the nodes fill it.
    receipts: mpsc::UnboundedSender<Seen>,
    /// Nodes whose event stream said they joined a group (the simulator
    /// has one).
    joined: Arc<Mutex<HashSet<usize>>>,
    /// Direct messages' deliveries and receipts, in the order seen (at
    /// most a few per message the workload sends).
    direct: Arc<Mutex<Vec<DirectSeen>>>,
}

impl Taps {
    /// The taps and the receiving end of their receipts.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Seen>) {
        let (receipts, rx) = mpsc::unbounded_channel();
        let taps = Taps {
            receipts,
            joined: Arc::default(),
            direct: Arc::default(),
        };
        (taps, rx)
    }

    /// Node `node`'s gossip observer: every group message copy it receives
    /// on the wire, duplicates included.
    pub fn wire_observer(&self, node: usize) -> GossipObserver {
        let receipts = self.receipts.clone();
        eventlog::observe_messages(move |id, size| {
            let _ = receipts.send(Seen::now(node, id, ReceiptKind::Wire, Some(size)));
        })
    }

    /// Follows node `node`'s event stream until it ends: deliveries of
    /// other members' messages (each checked against what the node already
    /// delivered) and the node joining the group. Its own messages are
    /// recorded by the workload when it publishes them.
    pub fn follow(&self, node: usize, local: PeerId, mut events: broadcast::Receiver<NodeEvent>) {
        let receipts = self.receipts.clone();
        let joined = self.joined.clone();
        let direct = self.direct.clone();
        let local = local.to_base58();
        let note = move |id: String, receipt| {
            if let Ok(mut d) = direct.lock() {
                d.push(DirectSeen {
                    at: Instant::now(),
                    id,
                    receipt,
                });
            }
        };
        tokio::spawn(async move {
            let mut delivered = HashSet::new();
            loop {
                match events.recv().await {
                    Ok(NodeEvent::GroupMessage { id, sender, .. }) => {
                        let kind = match (delivered.insert(id.clone()), sender == local) {
                            (false, _) => ReceiptKind::DuplicateDelivery,
                            (true, false) => ReceiptKind::Delivered,
                            (true, true) => continue,
                        };
                        let _ = receipts.send(Seen::now(node, id, kind, None));
                    }
                    Ok(NodeEvent::DirectMessage { id, .. }) => note(id, None),
                    Ok(NodeEvent::DirectMessageState {
                        id, state, route, ..
                    }) if state == "delivered" => {
                        note(id, Some(route));
                    }
                    Ok(NodeEvent::GroupUpdated { member: true, .. }) => {
                        if let Ok(mut j) = joined.lock() {
                            j.insert(node);
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            node,
                            missed = n,
                            "event stream lagged: deliveries missed in the record"
                        );
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }

    /// The nodes that have said they joined.
    pub fn joined(&self) -> HashSet<usize> {
        self.joined.lock().map(|j| j.clone()).unwrap_or_default()
    }
}

/// The record being gathered, from the workload's start on.
#[derive(Debug)]
pub struct Collector {
    clock: ModelClock,
    log: eventlog::Writer<BufWriter<File>>,
    /// The group's members: a message's recipients are the others.
    members: Vec<usize>,
    published: Vec<Published>,
    receipts: Vec<Receipt>,
    /// Direct messages sent.
    direct: Vec<DirectRecord>,
    /// Each message's gossip frame size, from its first wire copy.
    wire_size: HashMap<String, usize>,
}

impl Collector {
    /// Creates the event log at `path` and writes every node's `PeerID`
    /// line.
    pub fn create(
        path: &Path,
        clock: ModelClock,
        nodes: &[NodeOut],
        members: Vec<usize>,
    ) -> anyhow::Result<Self> {
        let file =
            File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
        let mut log = eventlog::Writer::new(BufWriter::new(file));
        for node in nodes {
            let line = Line::new(SystemTime::now(), Msg::PeerId, node.peer_id.as_str());
            log.write(&line.in_simulation(0.0, node.index))?;
        }
        Ok(Collector {
            clock,
            log,
            members,
            published: Vec::new(),
            receipts: Vec::new(),
            direct: Vec::new(),
            wire_size: HashMap::new(),
        })
    }

    /// Records and logs one receipt.
    pub fn on_seen(&mut self, seen: Seen) -> anyhow::Result<()> {
        let t_ms = self.clock.ms(seen.at);
        let msg = match seen.kind {
            ReceiptKind::Wire => Msg::Received,
            ReceiptKind::Delivered => Msg::Delivered,
            ReceiptKind::DuplicateDelivery => Msg::DuplicateDelivery,
        };
        let line = Line::new(seen.time, msg, seen.id.as_str()).in_simulation(t_ms, seen.node);
        self.log.write(&line)?;
        if let Some(size) = seen.wire_size {
            self.wire_size.entry(seen.id.clone()).or_insert(size);
        }
        self.receipts.push(Receipt {
            t_ms,
            node: seen.node,
            id: seen.id,
            kind: seen.kind,
        });
        Ok(())
    }

    /// Records and logs one publish (a failed one is only reported).
    pub fn on_publish(&mut self, outcome: PublishOutcome) -> anyhow::Result<()> {
        let publisher = outcome.publisher;
        let id = match outcome.result {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(publisher, "publish failed: {e}");
                return Ok(());
            }
        };
        let t_ms = self.clock.ms(outcome.at);
        if let Some(to) = outcome.to {
            // Direct messages stay out of the group's event log and figures.
            self.direct.push(DirectRecord {
                id,
                from: publisher,
                to,
                t_ms,
                size: outcome.size,
                ..DirectRecord::default()
            });
            return Ok(());
        }
        let line = Line::new(outcome.time, Msg::Published, id.as_str());
        self.log.write(&line.in_simulation(t_ms, publisher))?;
        self.published.push(Published {
            id,
            publisher,
            t_ms,
            size: outcome.size,
            // Known once the wire copies are in (see `finish`).
            wire_size: 0,
            recipients: (self.members.iter().copied())
                .filter(|m| *m != publisher)
                .collect(),
        });
        Ok(())
    }

    /// The direct messages sent so far, with their deliveries and receipts
    /// seen so far (`taps`' record).
    pub fn direct(&self, taps: &Taps) -> Vec<DirectRecord> {
        let seen = taps.direct.lock().map(|d| d.clone()).unwrap_or_default();
        let mut direct = self.direct.clone();
        let index: HashMap<&str, usize> = (direct.iter().enumerate())
            .map(|(i, d)| (d.id.as_str(), i))
            .collect();
        let mut updates = Vec::new();
        for s in seen {
            if let Some(&i) = index.get(s.id.as_str()) {
                updates.push((i, self.clock.ms(s.at), s.receipt));
            }
        }
        for (i, t_ms, receipt) in updates {
            let d = &mut direct[i];
            match receipt {
                None => {
                    d.deliveries += 1;
                    d.delivered_ms = Some(d.delivered_ms.map_or(t_ms, |t| t.min(t_ms)));
                }
                Some(route) => {
                    d.receipt_ms = Some(d.receipt_ms.map_or(t_ms, |t| t.min(t_ms)));
                    d.route = d.route.take().or(route);
                }
            }
        }
        direct
    }

    /// Takes the receipts still queued after the nodes stopped, closes the
    /// log and returns the publishes (with their wire sizes) and receipts.
    pub fn finish(
        mut self,
        mut queued: mpsc::UnboundedReceiver<Seen>,
    ) -> anyhow::Result<(Vec<Published>, Vec<Receipt>)> {
        while let Ok(seen) = queued.try_recv() {
            self.on_seen(seen)?;
        }
        self.log.flush()?;
        for m in &mut self.published {
            // A message no node received on the wire (delivered by sync
            // alone, or not at all) counts its text size.
            m.wire_size = self.wire_size.get(&m.id).copied().unwrap_or(m.size);
        }
        Ok((self.published, self.receipts))
    }
}

/// The scheduling lag of the simulator's runtime: a timer set to fire
/// every 10 ms records how late it fired, in model ms, once measuring.
#[derive(Debug)]
pub struct HostLag {
    samples: Arc<Mutex<Vec<f64>>>,
    measuring: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl HostLag {
    /// Starts the timer (not yet measuring).
    pub fn start(dilation: f64) -> Self {
        let lag = HostLag {
            samples: Arc::default(),
            measuring: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (samples, measuring, stop) =
            (lag.samples.clone(), lag.measuring.clone(), lag.stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    due = tick.tick() => {
                        let late_ms = Instant::now().duration_since(due).as_secs_f64() * 1000.0;
                        if measuring.load(Ordering::Relaxed)
                            && let Ok(mut s) = samples.lock()
                        {
                            s.push(late_ms / dilation);
                        }
                    }
                }
            }
        });
        lag
    }

    /// Keeps samples from now on. (Set-up, with its key generation and
    /// handshakes, shapes no measured latency, so it is not counted.)
    pub fn measure(&self) {
        self.measuring.store(true, Ordering::Relaxed);
    }

    /// Stops the timer and returns the samples.
    pub fn finish(self) -> Vec<f64> {
        self.stop.cancel();
        self.samples.lock().map(|s| s.clone()).unwrap_or_default()
    }
}
