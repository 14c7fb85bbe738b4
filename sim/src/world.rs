//! The simulated world: the modelled network ([`SimNet`]), the radio
//! medium when the scenario has BLE nodes, and the nodes, each one a real
//! fogmesh node assembled by [`NodeBuilder`] exactly as the daemon
//! assembles its own. What is the simulator's here is only the mapping
//! from a scenario to the builder's inputs (which transport, which radio,
//! which settings); transports, timeouts, dilation of timers, BLE scaling
//! and metrics are the builder's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use fogmesh::behaviour::{BehaviourConfig, GossipParams};
use fogmesh::builder::{Internet, NodeBuilder, RawStream};
use fogmesh::groups::GroupsConfig;
use fogmesh::node::NodeHandle;
use fogmesh::storage::Store;
use fogmesh_ble::Radio;
use fogmesh_ble::sim::{LinkModel, Medium, Position};
use futures::StreamExt as _;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId, Transport};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::collector::Taps;
use crate::net::{SimNet, SimTransport};
use crate::plan::Plan;
use crate::scenario::{Ble, Scenario};

/// How long a connection nothing holds open stays (model time).
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How many topology dials may be under way at once.
const MAX_CONCURRENT_DIALS: usize = 256;
/// How often a long set-up phase (dials, the group reaching its members)
/// says how far it is.
pub(crate) const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
/// A simulated node's database page cache (a hundred nodes share a host).
const STORE_CACHE_BYTES: usize = 1 << 20;
/// Peers per Kademlia bucket of a simulated node (the daemon's 20 cost
/// 1.6 MB of buckets per node, allocated whole at start).
const KAD_BUCKET_SIZE: std::num::NonZeroUsize = std::num::NonZeroUsize::MIN.saturating_add(7);

/// One node: what survives its restarts, and the running node if it is up.
struct SimNode {
    /// Its index in the scenario (and on the modelled network).
    index: usize,
    key: Keypair,
    data_dir: PathBuf,
    /// Whether it has the internet.
    internet: bool,
    /// Where its radio stands, if it has one.
    position: Option<Position>,
    /// Bytes its radio sent, over every restart.
    radio_sent: Arc<AtomicU64>,
    /// The metrics of each start of the node (they restart from zero).
    metrics: Vec<fogmesh::metrics::NodeMetrics>,
    /// Cancelled to stop the running node.
    stop: CancellationToken,
    handle: Option<NodeHandle>,
    task: Option<JoinHandle<()>>,
}

/// What every node shares, and the settings every node gets.
struct Shared {
    net: Arc<SimNet>,
    /// The radio medium, when the scenario has BLE nodes.
    medium: Option<Medium>,
    gossip: GossipParams,
    /// Below this many peers a node dials the peers it knows of.
    min_peers: usize,
    dilation: f64,
    taps: Taps,
    /// The scenario's mailbox knob.
    mailbox: crate::scenario::MailboxKnob,
    /// Connections a node holds at most (the scenario's `[node]`).
    max_connections: u32,
    /// The onion route's settings and traces (an `[onion]` section).
    onion: Option<crate::onion::OnionSetup>,
}

/// The network, the medium and the nodes.
pub struct World {
    shared: Shared,
    nodes: Vec<SimNode>,
    /// The nodes' databases, removed when the world is dropped.
    _data: TempDir,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("nodes", &self.nodes.len())
            .field("ble", &self.shared.medium.is_some())
            .finish_non_exhaustive()
    }
}

impl World {
    /// The network and medium of scenario `s` as planned, and its nodes,
    /// not yet started. `seed` seeds the link models' losses.
    pub fn new(
        s: &Scenario,
        plan: &Plan,
        seed: u64,
        dilation: f64,
        taps: Taps,
    ) -> anyhow::Result<Self> {
        // Memory ports from a random base, so that runs in one process
        // (tests) do not collide.
        let base: u64 = rand::random::<u64>() >> 16;
        let ports = (1..=s.nodes as u64).map(|i| base + i).collect();
        let net = SimNet::new(
            ports,
            plan.region.clone(),
            plan.latency.clone(),
            plan.uplink.clone(),
            s.link.loss,
            dilation,
            seed,
        );
        let shared = Shared {
            net,
            medium: s.ble.as_ref().map(|b| medium(b, seed, dilation)),
            gossip: gossip_params(s),
            min_peers: s.min_peers(),
            dilation,
            taps,
            mailbox: s.mailbox.clone(),
            max_connections: s.node.max_connections,
            onion: crate::onion::OnionSetup::new(s, plan, seed),
        };
        let data = data_dirs()?;
        let mut nodes = Vec::with_capacity(s.nodes);
        for (i, key) in plan.keys.iter().enumerate() {
            let data_dir = data.path().join(format!("n{i}"));
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("cannot create {}", data_dir.display()))?;
            nodes.push(SimNode {
                index: i,
                key: key.clone(),
                data_dir,
                internet: i < s.internet_nodes(),
                position: plan.topology.nodes[i]
                    .position
                    .map(|[x, y]| Position { x, y }),
                radio_sent: Arc::default(),
                metrics: Vec::new(),
                stop: CancellationToken::new(),
                handle: None,
                task: None,
            });
        }
        Ok(World {
            shared,
            nodes,
            _data: data,
        })
    }

    /// Starts every node, one after the other.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            start_node(&self.shared, node).await?;
        }
        Ok(())
    }

    /// Starts node `i` (again) from its data.
    pub async fn start(&mut self, i: usize) -> anyhow::Result<()> {
        start_node(&self.shared, &mut self.nodes[i]).await
    }

    /// Stops node `i` and waits until it has.
    pub async fn stop(&mut self, i: usize) {
        stop_node(&mut self.nodes[i]).await;
    }

    /// Stops every node at once (each waits for its own actors).
    pub async fn stop_all(&mut self) {
        for node in &self.nodes {
            node.stop.cancel();
        }
        futures::future::join_all(self.nodes.iter_mut().map(stop_node)).await;
    }

    /// How many peers each running node is connected to (nodes that are
    /// down or do not answer count none).
    pub async fn connected_peers(&self) -> Vec<u64> {
        let status = self.nodes.iter().map(|n| async move {
            match &n.handle {
                Some(h) => h.status().await.map_or(0, |s| s.connected_peers as u64),
                None => 0,
            }
        });
        futures::future::join_all(status).await
    }

    /// Connected peers per running node now: mean and max (for the
    /// progress lines of a long set-up).
    pub async fn peers_now(&self) -> (f64, u64) {
        let peers = self.connected_peers().await;
        let max = peers.iter().copied().max().unwrap_or(0);
        let mean = peers.iter().sum::<u64>() as f64 / peers.len().max(1) as f64;
        ((mean * 10.0).round() / 10.0, max)
    }

    /// Node `i`'s handle, while it runs.
    pub fn handle(&self, i: usize) -> Option<NodeHandle> {
        self.nodes[i].handle.clone()
    }

    /// The onion route's settings and traces, with an `[onion]` section.
    pub fn onion(&self) -> Option<&crate::onion::OnionSetup> {
        self.shared.onion.as_ref()
    }

    /// Node `i`'s peer id.
    pub fn peer_id(&self, i: usize) -> PeerId {
        self.nodes[i].key.public().to_peer_id()
    }

    /// Dials along `edges` (`[from, to]`), many at once but a bounded
    /// number: a barrier per batch would make every batch wait for its
    /// slowest (farthest) dial. Failures are summed up in the log.
    pub async fn connect(&self, edges: &[[usize; 2]]) {
        let dials: Vec<(NodeHandle, Multiaddr, NodeHandle, Multiaddr)> = (edges.iter())
            .filter_map(|&[from, to]| {
                let (h, back) = (self.handle(from)?, self.handle(to)?);
                Some((h, self.dial_addr(to), back, self.dial_addr(from)))
            })
            .collect();
        let total = dials.len();
        let started = std::time::Instant::now();
        let mut last_said = started;
        let mut done = 0usize;
        let mut errors: Vec<String> = Vec::new();
        // The far end then asks for the link too (it is up: nothing is
        // dialled), so that both ends hold it open when idle.
        let mut results = futures::stream::iter(dials)
            .map(|(h, addr, back, back_addr)| async move {
                if let Err(e) = h.connect(addr).await {
                    return Some(e.to_string());
                }
                back.connect(back_addr).await.err().map(|e| e.to_string())
            })
            .buffer_unordered(MAX_CONCURRENT_DIALS);
        while let Some(r) = results.next().await {
            done += 1;
            errors.extend(r);
            // A large topology takes minutes to dial: say how far it is.
            if last_said.elapsed() >= PROGRESS_EVERY {
                let (peers_mean, peers_max) = self.peers_now().await;
                last_said = std::time::Instant::now();
                tracing::info!(
                    done,
                    total,
                    failed = errors.len(),
                    peers_mean,
                    peers_max,
                    "topology dials"
                );
            }
        }
        tracing::info!(
            total,
            failed = errors.len(),
            secs = started.elapsed().as_secs(),
            "topology dialled"
        );
        if errors.is_empty() {
            return;
        }
        let mut why: HashMap<&str, usize> = HashMap::new();
        for e in &errors {
            *why.entry(e.as_str()).or_default() += 1;
        }
        let mut why: Vec<(&str, usize)> = why.into_iter().collect();
        why.sort_by_key(|w| std::cmp::Reverse(w.1));
        tracing::warn!(failed = errors.len(), reasons = ?&why[..why.len().min(3)], "some topology dials failed");
    }

    /// Node `i`'s address on the modelled network, with its peer id.
    fn dial_addr(&self, i: usize) -> Multiaddr {
        (self.shared.net.addr(i))
            .with_p2p(self.peer_id(i))
            .unwrap_or_else(|a| a)
    }

    /// Cuts `side` off from the other nodes' internet links.
    pub fn partition(&self, side: &[usize]) {
        let mut sides = vec![0u8; self.nodes.len()];
        for &i in side {
            sides[i] = 1;
        }
        self.shared.net.partition(sides);
    }

    /// Heals the partition.
    pub fn heal(&self) {
        self.shared.net.heal();
    }

    /// Direct-message envelopes every node sent so far (attempts,
    /// receipts and relayed copies, one per hop), and of those relayed.
    pub fn dm_envelopes(&self) -> (u64, u64) {
        let all = self.nodes.iter().flat_map(|n| &n.metrics);
        all.fold((0, 0), |(s, r), m| {
            (
                s + m.dm_envelopes_sent.get(),
                r + m.dm_envelopes_relayed.get(),
            )
        })
    }

    /// Bytes each node sent so far: on the internet links plus over the
    /// radio.
    pub fn bytes_sent(&self) -> Vec<u64> {
        (self.shared.net.bytes_sent().into_iter())
            .zip(&self.nodes)
            .map(|(b, n)| b + n.radio_sent.load(Ordering::Relaxed))
            .collect()
    }
}

/// Node databases in memory where possible: every delivery is an fsync'd
/// commit, and a hundred nodes' fsyncs on one disk would make the host,
/// not the model, set the latencies.
fn data_dirs() -> anyhow::Result<TempDir> {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    };
    dir.context("cannot create the nodes' data directories")
}

/// The radio model slowed down like the network: latencies longer, links
/// slower, by the dilation factor.
fn medium(b: &Ble, seed: u64, dilation: f64) -> Medium {
    Medium::new(LinkModel {
        latency_ms: b.link.latency_ms * dilation,
        bandwidth: ((b.link.bandwidth as f64 / dilation) as u64).max(100),
        drop_mean_secs: b.link.drop_mean_secs.map(|d| d * dilation),
        seed,
        ..b.link.clone()
    })
}

/// Gossipsub's parameters in model time (the builder dilates them).
pub fn gossip_params(s: &Scenario) -> GossipParams {
    let heartbeat = Duration::from_secs_f64(s.gossip.heartbeat_ms / 1000.0);
    GossipParams {
        mesh_n: s.gossip.mesh_n,
        mesh_n_low: s.gossip.mesh_n_low,
        mesh_n_high: s.gossip.mesh_n_high,
        mesh_outbound_min: s.gossip.mesh_outbound_min,
        gossip_lazy: s.gossip.gossip_lazy,
        heartbeat,
        heartbeat_initial_delay: heartbeat,
        flood_publish: s.gossip.flood_publish,
    }
}

/// Opens the node's database, assembles the node and starts it, with the
/// collector's taps on its gossip and its event stream.
async fn start_node(shared: &Shared, node: &mut SimNode) -> anyhow::Result<()> {
    let index = node.index;
    let dir = node.data_dir.clone();
    let store =
        tokio::task::spawn_blocking(move || Store::open_with_cache(&dir, Some(STORE_CACHE_BYTES)))
            .await??;
    node.stop = CancellationToken::new();
    let built = builder(shared, node, store)
        .start(node.stop.clone())
        .await?;
    node.metrics.push(built.metrics.clone());
    let running = built.running;
    shared.taps.follow(
        index,
        node.key.public().to_peer_id(),
        running.handle.subscribe(),
    );
    node.handle = Some(running.handle);
    node.task = Some(running.task);
    Ok(())
}

/// The builder inputs for `node`: the scenario's transports and settings.
fn builder(shared: &Shared, node: &SimNode, store: Store) -> NodeBuilder {
    let index = node.index;
    // A radio joins the medium now and leaves it when the node stops
    // (dropped with the swarm).
    let radio: Option<Arc<dyn Radio>> = match (&shared.medium, node.position) {
        (Some(m), Some(pos)) => Some(Arc::new(m.join_counted(pos, node.radio_sent.clone()))),
        _ => None,
    };
    let (internet, listen) = if node.internet {
        let transport = SimTransport::new(shared.net.clone(), index)
            .map(|stream, _| Box::new(stream) as Box<dyn RawStream>)
            .boxed();
        (Internet::Custom(transport), vec![shared.net.addr(index)])
    } else {
        (Internet::Off, Vec::new())
    };
    let mut b = NodeBuilder::new(node.key.clone(), store);
    if let Some(o) = &shared.onion {
        b = b.onion(o.config(index));
    }
    b.internet(internet)
        .radio(radio)
        .listen(listen)
        .min_peers(shared.min_peers)
        .maintenance_interval(Duration::from_secs(2))
        // Connections nothing holds open (Kademlia's, a finished exchange)
        // close after `IDLE_TIMEOUT`; the topology's links are held open
        // by both ends (see `connect`).
        .idle_timeout(IDLE_TIMEOUT)
        .behaviour(BehaviourConfig {
            // No multicast on the modelled network, and no Kademlia walks:
            // the initial dials are the scenario's.
            mdns: false,
            max_connections: shared.max_connections,
            kad_bootstrap_interval: None,
            kad_bucket_size: KAD_BUCKET_SIZE,
            gossip: shared.gossip.clone(),
            ..BehaviourConfig::default()
        })
        .groups(GroupsConfig {
            // The workload's rate is the scenario's business.
            sender_rate: 1e9,
            // Simulated nodes have no user to accept invitations.
            trust_everyone: true,
            ..GroupsConfig::default()
        })
        .mailbox(fogmesh::mailbox::MailboxConfig {
            enabled: shared.mailbox.enabled,
            deposit_after: shared
                .mailbox
                .enabled
                .then(|| Duration::from_secs_f64(shared.mailbox.after_secs.max(0.0))),
            ..fogmesh::mailbox::MailboxConfig::default()
        })
        .time_dilation(shared.dilation)
        .observe_gossip(shared.taps.wire_observer(index))
}

/// Stops `node` and waits for its event loop to end.
async fn stop_node(node: &mut SimNode) {
    node.stop.cancel();
    node.handle = None;
    if let Some(t) = node.task.take() {
        let _ = t.await;
    }
}
