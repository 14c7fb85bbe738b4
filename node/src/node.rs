//! The node's event loop: one task owns the Swarm.
//!
//! A cloneable [`NodeHandle`] sends [`Command`]s over a bounded channel; each
//! command carries a oneshot for its reply, and replies that depend on the
//! network wait in maps keyed by the id the swarm gave back (a dial's
//! `ConnectionId`). What happens in the node leaves the loop as
//! [`NodeEvent`]s on a broadcast channel.
//!
//! Slow work never runs inside the loop: database writes go to a writer task
//! through a bounded channel.
//!
//! All outbound traffic the node starts (dials today; requests and messages
//! as protocols arrive) asks the routing [`Policy`] first.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fogmesh_ble::{DeviceAddr, Neighbour, Radio};
use fogmesh_protocols::policy::{Policy, Reachability, Requirements, Route};
use futures::StreamExt;
use futures::stream::BoxStream;
use libp2p::core::ConnectedPoint;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub, identify, kad, mdns, ping, request_response};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::behaviour::{Behaviour, BehaviourEvent, FileFrame, KAD_PROTOCOL, SyncFrame};
use crate::files::{self, Asked, FileCommand, FilesConfig, FilesHandle};
use crate::groups::{self, GroupsConfig, GroupsHandle, Input, NetCommand};
use crate::metrics::NodeMetrics;
use crate::storage::Store;
use crate::types::{BleStatus, ConnectResponse, NodeEvent, PeerInfo, Status};

/// Capacity of the command channel: callers wait when the loop is busy.
const COMMAND_QUEUE: usize = 256;
/// Capacity of the event broadcast: slow subscribers miss events (and are
/// told so) rather than hold memory.
const EVENT_QUEUE: usize = 1024;
/// Capacity of the queue of peer records waiting to be written.
const STORE_QUEUE: usize = 1024;
/// How often the node checks, by default, that it has enough peers.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(15);
/// How long `start` waits for the listeners to report their addresses.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the event loop needs besides the swarm.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start.
    pub bootstrap: Vec<Multiaddr>,
    /// Below this many connected peers, discovered peers are dialled.
    pub min_peers: usize,
    /// Which routes this node has (only the internet for now).
    pub reachability: Reachability,
    /// Group chat settings.
    pub groups: GroupsConfig,
    /// File sharing settings.
    pub files: FilesConfig,
    /// How often the node checks that it has enough peers
    /// ([`MAINTENANCE_INTERVAL`] by default).
    pub maintenance_interval: Duration,
    /// The BLE radio, when BLE is on: the node listens on it, scans for
    /// neighbours and dials them.
    pub ble: Option<Arc<dyn Radio>>,
}

/// Most BLE connections a node keeps (phones keep 6 to 8 links).
pub const BLE_MAX_LINKS: usize = 7;
/// How often the node retries BLE neighbours it is not linked to.
const BLE_TICK: Duration = Duration::from_secs(2);
/// Of two neighbours, the one with the lower peer hint dials; the other
/// dials too if no link came up after this long.
const BLE_DIAL_GRACE: Duration = Duration::from_secs(8);
/// Least time between two dials of one neighbour.
const BLE_REDIAL: Duration = Duration::from_secs(5);

/// Why a connect failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The policy found no route that is up for this peer.
    #[error("no route to the peer is up")]
    NoRoute,
    /// The dial failed.
    #[error("dial failed: {0}")]
    Dial(String),
    /// The node is shutting down.
    #[error("the node is shutting down")]
    Stopped,
}

/// A request to the event loop.
#[derive(Debug)]
enum Command {
    Status(oneshot::Sender<Status>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Connect {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<ConnectResponse, ConnectError>>,
    },
}

/// A cloneable handle to a running node.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    peer_id: PeerId,
    groups: GroupsHandle,
    files: FilesHandle,
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<NodeEvent>,
}

impl NodeHandle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The node's status. Cancel-safe.
    pub async fn status(&self) -> Result<Status, ConnectError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Status(tx)).await?;
        rx.await.map_err(|_| ConnectError::Stopped)
    }

    /// The connected peers. Cancel-safe.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, ConnectError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Peers(tx)).await?;
        rx.await.map_err(|_| ConnectError::Stopped)
    }

    /// Dials `addr` and waits until the connection is up or has failed.
    /// Cancelling the future does not cancel the dial.
    pub async fn connect(&self, addr: Multiaddr) -> Result<ConnectResponse, ConnectError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Connect { addr, reply: tx }).await?;
        rx.await.map_err(|_| ConnectError::Stopped)?
    }

    /// The group chat actor.
    pub fn groups(&self) -> &GroupsHandle {
        &self.groups
    }

    /// The file sharing actor.
    pub fn files(&self) -> &FilesHandle {
        &self.files
    }

    /// Subscribes to the node's events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    async fn send(&self, cmd: Command) -> Result<(), ConnectError> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| ConnectError::Stopped)
    }
}

/// A node whose listeners are up, and the task that runs it.
#[derive(Debug)]
pub struct RunningNode {
    /// Handle for the API and other clients.
    pub handle: NodeHandle,
    /// The addresses the node listens on (known when `start` returns).
    pub listen_addrs: Vec<Multiaddr>,
    /// The event loop; it ends after `shutdown` is cancelled, once its
    /// pending database writes are flushed.
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts listening, restores known peers, dials the bootstrap peers and
/// spawns the event loop. Returns once every listener has reported an
/// address.
pub async fn start(
    key: Keypair,
    mut swarm: Swarm<Behaviour>,
    store: Store,
    cfg: NodeConfig,
    metrics: NodeMetrics,
    libp2p_metrics: libp2p::metrics::Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningNode> {
    let peer_id = *swarm.local_peer_id();
    let mut listeners = HashSet::new();
    let mut listen = cfg.listen.clone();
    if cfg.ble.is_some() {
        listen.push(fogmesh_ble::listen_addr());
    }
    for addr in &listen {
        let id = swarm
            .listen_on(addr.clone())
            .with_context(|| format!("cannot listen on {addr}"))?;
        listeners.insert(id);
    }

    let (store_tx, store_rx) = mpsc::channel(STORE_QUEUE);
    // A thread of its own, not tokio's blocking pool: it lives as long as
    // the node, and a process with many nodes (the simulator) would
    // otherwise exhaust the pool's 512 threads with writers.
    let writer = std::thread::Builder::new()
        .name("fogmesh-peers".into())
        .spawn({
            let store = store.clone();
            let metrics = metrics.clone();
            move || store_writer(store, store_rx, metrics)
        })
        .context("cannot start the peer writer thread")?;

    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let (events, _) = broadcast::channel(EVENT_QUEUE);
    let (net_tx, net_rx) = mpsc::channel(COMMAND_QUEUE);
    let (groups, groups_thread) = groups::start(
        key,
        store.clone(),
        net_tx,
        events.clone(),
        metrics.clone(),
        cfg.groups.clone(),
        shutdown.clone(),
    )?;
    let (file_tx, file_rx) = mpsc::channel(COMMAND_QUEUE);
    let (files, files_thread) = files::start(
        peer_id,
        store.clone(),
        file_tx,
        metrics.clone(),
        cfg.files.clone(),
        shutdown.clone(),
    )?;
    let mut el = EventLoop {
        groups: groups.clone(),
        net: net_rx,
        files: files.clone(),
        file_net: file_rx,
        file_requests: HashMap::new(),
        provider_queries: HashMap::new(),
        swarm,
        commands: cmd_rx,
        events: events.clone(),
        store_tx,
        pending_dials: HashMap::new(),
        connections: HashMap::new(),
        peer_meta: HashMap::new(),
        metrics,
        libp2p_metrics,
        policy: Policy::default(),
        reach: cfg.reachability,
        min_peers: cfg.min_peers,
        maintenance_interval: cfg.maintenance_interval,
        started: Instant::now(),
        listener_ids: Vec::new(),
        ble: cfg.ble.as_ref().map(|radio| BleState {
            radio: radio.clone(),
            hint: fogmesh_ble::peer_hint(&peer_id),
            neighbours: HashMap::new(),
        }),
        ble_scan: cfg.ble.as_ref().map(|r| r.scan()),
    };

    // Remembered peers first (most recent first), then the bootstrap list.
    let remembered = tokio::task::spawn_blocking({
        let store = store.clone();
        move || {
            if let Err(e) = store.prune_peers() {
                tracing::warn!("cannot prune the peer table: {e}");
            }
            store.peers()
        }
    })
    .await
    .context("peer table task failed")??;
    let mut to_dial: Vec<(PeerId, Vec<Multiaddr>)> = Vec::new();
    for (peer, rec) in remembered {
        if peer == peer_id || rec.addrs.is_empty() {
            continue;
        }
        for a in &rec.addrs {
            el.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
        }
        to_dial.push((peer, rec.addrs));
    }
    let restored = to_dial.len();
    to_dial.truncate(cfg.min_peers.max(1));
    for addr in &cfg.bootstrap {
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            bail!("bootstrap address {addr} does not end with /p2p/<peer id>");
        };
        if peer == peer_id {
            tracing::warn!(%addr, "ignoring a bootstrap address of this very node");
            continue;
        }
        let transport = crate::storage::strip_p2p(addr);
        el.swarm
            .behaviour_mut()
            .kad
            .add_address(&peer, transport.clone());
        to_dial.push((peer, vec![transport]));
    }
    tracing::info!(
        restored,
        bootstrap = cfg.bootstrap.len(),
        "dialling known peers"
    );

    el.listener_ids = listeners.iter().copied().collect();
    el.wait_listening(listeners).await?;
    for (peer, addrs) in to_dial {
        el.dial_known(peer, addrs);
    }
    let listen_addrs: Vec<Multiaddr> = el.swarm.listeners().cloned().collect();

    let handle = NodeHandle {
        peer_id,
        groups,
        files,
        commands: cmd_tx,
        events,
    };
    let task = tokio::spawn(async move {
        el.run(shutdown).await;
        // Dropping the loop closes the store queue; wait for the writer to
        // drain it so nothing queued is lost.
        drop(el);
        for (name, t) in [
            ("peer writer", writer),
            ("groups", groups_thread),
            ("files", files_thread),
        ] {
            if !matches!(
                tokio::task::spawn_blocking(move || t.join()).await,
                Ok(Ok(()))
            ) {
                tracing::error!("the {name} actor panicked");
            }
        }
    });
    Ok(RunningNode {
        handle,
        listen_addrs,
        task,
    })
}

/// A database write queued by the event loop.
#[derive(Debug)]
enum StoreOp {
    Peer {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        agent: Option<String>,
    },
}

fn store_writer(store: Store, mut rx: mpsc::Receiver<StoreOp>, metrics: NodeMetrics) {
    while let Some(op) = rx.blocking_recv() {
        match op {
            StoreOp::Peer { peer, addrs, agent } => {
                match store.upsert_peer(&peer, &addrs, agent.as_deref()) {
                    Ok(()) => {
                        metrics.peer_records_written.inc();
                    }
                    Err(e) => tracing::warn!(%peer, "cannot save peer: {e}"),
                }
            }
        }
    }
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    groups: GroupsHandle,
    net: mpsc::Receiver<NetCommand>,
    files: FilesHandle,
    file_net: mpsc::Receiver<FileCommand>,
    /// What each outstanding file request asked, by request id.
    file_requests:
        HashMap<request_response::OutboundRequestId, (fogmesh_protocols::files::FileId, Asked)>,
    /// Provider lookups, by query id.
    provider_queries: HashMap<kad::QueryId, fogmesh_protocols::files::FileId>,
    commands: mpsc::Receiver<Command>,
    events: broadcast::Sender<NodeEvent>,
    store_tx: mpsc::Sender<StoreOp>,
    pending_dials: HashMap<ConnectionId, oneshot::Sender<Result<ConnectResponse, ConnectError>>>,
    /// Open connections per peer, with their remote addresses.
    connections: HashMap<PeerId, Vec<(ConnectionId, Multiaddr)>>,
    peer_meta: HashMap<PeerId, PeerMeta>,
    metrics: NodeMetrics,
    libp2p_metrics: libp2p::metrics::Metrics,
    policy: Policy,
    reach: Reachability,
    min_peers: usize,
    maintenance_interval: Duration,
    started: Instant,
    listener_ids: Vec<libp2p::core::transport::ListenerId>,
    ble: Option<BleState>,
    ble_scan: Option<BoxStream<'static, Neighbour>>,
}

/// What the node knows of its BLE surroundings.
struct BleState {
    radio: Arc<dyn Radio>,
    /// Our own peer hint, as advertised.
    hint: [u8; 6],
    /// fogmesh nodes heard now.
    neighbours: HashMap<DeviceAddr, HeardNeighbour>,
}

struct HeardNeighbour {
    advert: fogmesh_ble::Advert,
    since: Instant,
    last_dial: Option<Instant>,
}

async fn next_neighbour(scan: &mut Option<BoxStream<'static, Neighbour>>) -> Option<Neighbour> {
    match scan {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

#[derive(Default)]
struct PeerMeta {
    agent: Option<String>,
    rtt: Option<Duration>,
}

impl EventLoop {
    async fn wait_listening(
        &mut self,
        mut waiting: HashSet<libp2p::core::transport::ListenerId>,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::sleep(LISTEN_TIMEOUT);
        tokio::pin!(deadline);
        while !waiting.is_empty() {
            tokio::select! {
                ev = self.swarm.select_next_some() => {
                    match &ev {
                        SwarmEvent::NewListenAddr { listener_id, .. } => {
                            waiting.remove(listener_id);
                        }
                        SwarmEvent::ListenerClosed { addresses, reason: Err(e), .. } => {
                            bail!("listener on {addresses:?} failed: {e}");
                        }
                        SwarmEvent::ListenerError { error, .. } => {
                            bail!("listener failed: {error}");
                        }
                        _ => {}
                    }
                    self.on_swarm_event(ev);
                }
                _ = &mut deadline => bail!("listeners did not report an address within {LISTEN_TIMEOUT:?}"),
            }
        }
        Ok(())
    }

    async fn run(&mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.maintenance_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ble_tick = tokio::time::interval(BLE_TICK);
        ble_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                // Local work before new remote work.
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                Some(cmd) = self.net.recv() => self.on_net_command(cmd),
                Some(cmd) = self.file_net.recv() => self.on_file_command(cmd),
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                _ = tick.tick() => self.maintain(),
                n = next_neighbour(&mut self.ble_scan) => match n {
                    Some(n) => self.on_neighbour(n),
                    None => {
                        tracing::warn!("the BLE radio stopped scanning");
                        self.ble_scan = None;
                    }
                },
                _ = ble_tick.tick(), if self.ble.is_some() => self.ble_maintain(),
            }
        }
        // Stop accepting first. (Dropping a listener is not enough for
        // every transport: the memory transport frees its port only here.)
        for id in std::mem::take(&mut self.listener_ids) {
            self.swarm.remove_listener(id);
        }
        tracing::debug!("event loop stopped");
    }

    fn emit(&self, ev: NodeEvent) {
        // No subscriber is fine.
        let _ = self.events.send(ev);
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Status(reply) => {
                let routing_table_peers = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .kbuckets()
                    .map(|b| b.num_entries())
                    .sum();
                let _ = reply.send(Status {
                    peer_id: self.swarm.local_peer_id().to_base58(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    listen_addrs: self.swarm.listeners().map(|a| a.to_string()).collect(),
                    api_addr: String::new(),
                    connected_peers: self.connections.len(),
                    routing_table_peers,
                    uptime_secs: self.started.elapsed().as_secs(),
                    routes: Route::BY_SPEED
                        .iter()
                        .filter(|r| self.route_up(**r))
                        .map(|r| r.to_string())
                        .collect(),
                    ble: self.ble.as_ref().map(|b| BleStatus {
                        device: b.radio.address().to_string(),
                        neighbours: b.neighbours.len(),
                        links: self.ble_links(),
                        link_bandwidth: b.radio.limits().bandwidth,
                    }),
                });
            }
            Command::Peers(reply) => {
                let mut peers: Vec<PeerInfo> = self
                    .connections
                    .iter()
                    .map(|(peer, conns)| {
                        let meta = self.peer_meta.get(peer);
                        PeerInfo {
                            peer_id: peer.to_base58(),
                            addrs: conns.iter().map(|(_, a)| a.to_string()).collect(),
                            transport: conns
                                .first()
                                .map(|(_, a)| transport_name(a))
                                .unwrap_or("other")
                                .to_owned(),
                            agent: meta.and_then(|m| m.agent.clone()),
                            rtt_ms: meta.and_then(|m| m.rtt).map(|d| d.as_secs_f64() * 1000.0),
                            gossip_score: self.swarm.behaviour().gossipsub.peer_score(peer),
                        }
                    })
                    .collect();
                peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
                let _ = reply.send(peers);
            }
            Command::Connect { addr, reply } => self.connect(addr, reply),
        }
    }

    /// The first route the policy gives a plain unicast message, if any is
    /// up: what dials, sync and file requests use.
    fn unicast_route(&self) -> Option<Route> {
        self.policy
            .plan(&Requirements::unicast(), &self.reach)
            .first()
    }

    fn route_up(&self, route: Route) -> bool {
        match route {
            Route::Internet => self.reach.internet,
            Route::Ble => self.reach.ble,
            Route::Onion => self.reach.onion,
            _ => false,
        }
    }

    /// An explicit connect from the user: ask the policy, then dial.
    fn connect(
        &mut self,
        addr: Multiaddr,
        reply: oneshot::Sender<Result<ConnectResponse, ConnectError>>,
    ) {
        let plan = self.policy.plan(&Requirements::unicast(), &self.reach);
        // Of the routes the policy allows, the first that can carry this
        // address.
        let wanted = if fogmesh_ble::is_ble(&addr) {
            Route::Ble
        } else {
            Route::Internet
        };
        let Some(route) = plan.routes.iter().copied().find(|r| *r == wanted) else {
            let _ = reply.send(Err(ConnectError::NoRoute));
            return;
        };
        let peer = match addr.iter().last() {
            Some(Protocol::P2p(p)) => Some(p),
            _ => None,
        };
        if let Some(peer) = peer {
            if peer == *self.swarm.local_peer_id() {
                let _ = reply.send(Err(ConnectError::Dial(
                    "that address is this node's own".into(),
                )));
                return;
            }
            if self.swarm.is_connected(&peer) {
                let _ = reply.send(Ok(ConnectResponse {
                    peer_id: peer.to_base58(),
                    route: route.to_string(),
                }));
                return;
            }
        }
        let opts = match peer {
            Some(p) => DialOpts::peer_id(p)
                .addresses(vec![addr.clone()])
                .condition(PeerCondition::Always)
                .build(),
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.pending_dials.insert(id, reply);
            }
            Err(e) => {
                self.metrics.dial_failures.inc();
                let _ = reply.send(Err(ConnectError::Dial(e.to_string())));
            }
        }
    }

    /// Dials a peer the node already knows, unless connected or dialling.
    fn dial_known(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if self.unicast_route().is_none() {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, "not dialling: {e}");
        }
    }

    /// Periodic: when short of peers, look for more.
    fn maintain(&mut self) {
        if self.connections.len() >= self.min_peers {
            return;
        }
        // A bootstrap query walks the DHT towards our own id, connecting to
        // the peers it meets; with no known peer it fails, which is fine.
        if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
            tracing::trace!("kad bootstrap not possible: {e:?}");
        }
    }

    /// BLE connections open now.
    fn ble_links(&self) -> usize {
        self.connections
            .values()
            .flatten()
            .filter(|(_, a)| fogmesh_ble::is_ble(a))
            .count()
    }

    fn on_neighbour(&mut self, n: Neighbour) {
        let Some(ble) = self.ble.as_mut() else { return };
        match n {
            Neighbour::Found { device, advert, .. } => {
                let fresh = !ble.neighbours.contains_key(&device);
                let e = ble.neighbours.entry(device).or_insert(HeardNeighbour {
                    advert,
                    since: Instant::now(),
                    last_dial: None,
                });
                e.advert = advert;
                if fresh {
                    tracing::debug!(%device, "BLE neighbour heard");
                }
                self.ble_dial(device);
            }
            Neighbour::Lost { device } => {
                tracing::debug!(%device, "BLE neighbour lost");
                ble.neighbours.remove(&device);
            }
        }
    }

    /// Periodic: dial BLE neighbours we have no link with.
    fn ble_maintain(&mut self) {
        let devices: Vec<DeviceAddr> = self
            .ble
            .as_ref()
            .map(|b| b.neighbours.keys().copied().collect())
            .unwrap_or_default();
        for d in devices {
            self.ble_dial(d);
        }
    }

    /// Dials a BLE neighbour if the policy allows it, we are not linked to
    /// it (over BLE or otherwise), we are below the link limit, and it is
    /// our turn (the lower peer hint dials first).
    fn ble_dial(&mut self, device: DeviceAddr) {
        let plan = self.policy.plan(&Requirements::unicast(), &self.reach);
        if !plan.routes.contains(&Route::Ble) {
            return;
        }
        let linked = self.connections.values().flatten().any(|(_, a)| {
            fogmesh_ble::addr::parse(a) == Some(fogmesh_ble::addr::BleAddr::Device(device))
        });
        if linked || self.ble_links() >= BLE_MAX_LINKS {
            return;
        }
        let Some(ble) = self.ble.as_mut() else { return };
        let Some(n) = ble.neighbours.get_mut(&device) else {
            return;
        };
        let theirs = n.advert.peer_hint;
        if theirs == ble.hint {
            return; // Ourselves, heard through another radio.
        }
        if self
            .connections
            .keys()
            .any(|p| fogmesh_ble::peer_hint(p) == theirs)
        {
            return; // Already connected to that node over another route.
        }
        if ble.hint > theirs && n.since.elapsed() < BLE_DIAL_GRACE {
            return; // Their turn to dial.
        }
        if n.last_dial.is_some_and(|t| t.elapsed() < BLE_REDIAL) {
            return;
        }
        n.last_dial = Some(Instant::now());
        let opts = DialOpts::unknown_peer_id()
            .address(fogmesh_ble::device_multiaddr(device))
            .build();
        tracing::debug!(%device, "dialling a BLE neighbour");
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%device, "BLE dial refused: {e}");
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        use libp2p::metrics::Recorder;
        self.libp2p_metrics.record(&event);
        match event {
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                // With BLE on, identify tells peers only external addresses
                // (BLE addresses must never reach internet peers): the IP
                // listen addresses are those.
                if self.ble.is_some() && !fogmesh_ble::is_ble(&address) && is_dialable(&address) {
                    self.swarm.add_external_address(address.clone());
                }
                self.emit(NodeEvent::ListenAddr {
                    addr: address.to_string(),
                });
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let (addr, direction) = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => (address.clone(), "outbound"),
                    ConnectedPoint::Listener { send_back_addr, .. } => {
                        (send_back_addr.clone(), "inbound")
                    }
                };
                tracing::debug!(%peer_id, %addr, direction, "connection established");
                let route = if fogmesh_ble::is_ble(&addr) {
                    Route::Ble
                } else {
                    Route::Internet
                };
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(ConnectResponse {
                        peer_id: peer_id.to_base58(),
                        route: route.to_string(),
                    }));
                }
                // An address we dialled successfully is worth remembering
                // (not a BLE one: neighbours are found again by scanning).
                if endpoint.is_dialer() && route == Route::Internet {
                    self.save_peer(peer_id, vec![addr.clone()], None);
                }
                let conns = self.connections.entry(peer_id).or_default();
                let first = conns.is_empty();
                conns.push((connection_id, addr.clone()));
                if first {
                    self.groups.offer(Input::PeerConnected(peer_id));
                    self.files.offer(files::Input::PeerConnected(peer_id));
                    self.metrics
                        .connected_peers
                        .set(self.connections.len() as i64);
                    self.emit(NodeEvent::PeerConnected {
                        peer_id: peer_id.to_base58(),
                        addr: addr.to_string(),
                        transport: transport_name(&addr).to_owned(),
                        direction: direction.to_owned(),
                    });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                ..
            } => {
                if let Some(conns) = self.connections.get_mut(&peer_id) {
                    conns.retain(|(id, _)| *id != connection_id);
                    if conns.is_empty() {
                        self.connections.remove(&peer_id);
                        self.peer_meta.remove(&peer_id);
                        self.groups.offer(Input::PeerDisconnected(peer_id));
                        self.files.offer(files::Input::PeerDisconnected(peer_id));
                        self.metrics
                            .connected_peers
                            .set(self.connections.len() as i64);
                        self.emit(NodeEvent::PeerDisconnected {
                            peer_id: peer_id.to_base58(),
                        });
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                self.metrics.dial_failures.inc();
                tracing::debug!(?peer_id, "dial failed: {error}");
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(ConnectError::Dial(error.to_string())));
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.swarm.remove_external_address(&address);
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!("listener error: {error}");
            }
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        use libp2p::metrics::Recorder;
        match event {
            BehaviourEvent::Identify(ev) => {
                self.libp2p_metrics.record(&ev);
                if let identify::Event::Received { peer_id, info, .. } = ev {
                    let addrs: Vec<Multiaddr> = info
                        .listen_addrs
                        .into_iter()
                        .filter(|a| is_dialable(a) && !fogmesh_ble::is_ble(a))
                        .take(crate::storage::MAX_ADDRS_PER_PEER)
                        .collect();
                    // Feed Kademlia's routing table with peers that speak
                    // our DHT protocol.
                    if info.protocols.contains(&KAD_PROTOCOL) {
                        for a in &addrs {
                            self.swarm
                                .behaviour_mut()
                                .kad
                                .add_address(&peer_id, a.clone());
                        }
                    }
                    self.peer_meta.entry(peer_id).or_default().agent =
                        Some(info.agent_version.clone());
                    self.save_peer(peer_id, addrs, Some(info.agent_version));
                }
            }
            BehaviourEvent::Ping(ev) => {
                self.libp2p_metrics.record(&ev);
                if let ping::Event {
                    peer,
                    result: Ok(rtt),
                    ..
                } = ev
                {
                    self.peer_meta.entry(peer).or_default().rtt = Some(rtt);
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            }) => {
                let Some(file) = self.provider_queries.get(&id).copied() else {
                    return;
                };
                if step.last {
                    self.provider_queries.remove(&id);
                }
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result {
                    self.files.offer(files::Input::Providers {
                        file,
                        peers: providers.into_iter().collect(),
                    });
                }
            }
            BehaviourEvent::Kad(ev) => {
                self.libp2p_metrics.record(&ev);
                // Kademlia adds the address of every connection it sees;
                // a BLE address must never be handed to internet peers in
                // answers, so it never stays in the routing table.
                if let kad::Event::RoutingUpdated {
                    peer, addresses, ..
                } = &ev
                    && addresses.iter().any(fogmesh_ble::is_ble)
                {
                    // (`remove_address` matches addresses with a /p2p
                    // suffix only, which kad does not store for dialled
                    // ones: take the peer out, put the rest back.)
                    let kad = &mut self.swarm.behaviour_mut().kad;
                    kad.remove_peer(peer);
                    for a in addresses.iter().filter(|a| !fogmesh_ble::is_ble(a)) {
                        kad.add_address(peer, a.clone());
                    }
                }
                if let kad::Event::RoutingUpdated {
                    peer,
                    is_new_peer: true,
                    addresses,
                    ..
                } = ev
                {
                    let addrs: Vec<Multiaddr> = addresses.into_vec();
                    self.metrics.peers_discovered.inc();
                    self.emit(NodeEvent::PeerDiscovered {
                        peer_id: peer.to_base58(),
                        addrs: addrs.iter().map(|a| a.to_string()).collect(),
                        via: "kad".into(),
                    });
                    if self.connections.len() < self.min_peers {
                        self.dial_known(peer, addrs);
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in list {
                    by_peer.entry(peer).or_default().push(addr);
                }
                for (peer, addrs) in by_peer {
                    self.metrics.peers_discovered.inc();
                    for a in &addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
                    }
                    self.emit(NodeEvent::PeerDiscovered {
                        peer_id: peer.to_base58(),
                        addrs: addrs.iter().map(|a| a.to_string()).collect(),
                        via: "mdns".into(),
                    });
                    if self.connections.len() < self.min_peers {
                        self.dial_known(peer, addrs);
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(_)) => {}
            BehaviourEvent::Limits(never) => match never {},
            BehaviourEvent::Gossipsub(ev) => {
                self.libp2p_metrics.record(&ev);
                if let gossipsub::Event::Message {
                    propagation_source,
                    message_id,
                    message,
                } = ev
                {
                    let input = Input::Gossip {
                        source: propagation_source,
                        message_id: message_id.clone(),
                        data: message.data,
                    };
                    if !self.groups.offer(input) {
                        // The actor is saturated: let the message go
                        // without penalty; sync brings it back if it matters.
                        self.swarm
                            .behaviour_mut()
                            .gossipsub
                            .report_message_validation_result(
                                &message_id,
                                &propagation_source,
                                gossipsub::MessageAcceptance::Ignore,
                            );
                    }
                }
            }
            BehaviourEvent::Files(ev) => match ev {
                request_response::Event::Message { peer, message, .. } => match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        self.files.offer(files::Input::Request {
                            peer,
                            frame: request.0,
                            channel,
                        });
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        if let Some((file, asked)) = self.file_requests.remove(&request_id) {
                            self.files.offer(files::Input::Response {
                                peer,
                                file,
                                asked,
                                result: Ok(response.0),
                            });
                        }
                    }
                },
                request_response::Event::OutboundFailure {
                    peer,
                    request_id,
                    error,
                    ..
                } => {
                    if let Some((file, asked)) = self.file_requests.remove(&request_id) {
                        self.files.offer(files::Input::Response {
                            peer,
                            file,
                            asked,
                            result: Err(error.to_string()),
                        });
                    }
                }
                request_response::Event::InboundFailure { peer, error, .. } => {
                    tracing::debug!(%peer, "file response failed: {error}");
                }
                request_response::Event::ResponseSent { .. } => {}
            },
            BehaviourEvent::GroupSync(ev) => match ev {
                request_response::Event::Message { peer, message, .. } => match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        self.groups.offer(Input::SyncRequest {
                            peer,
                            frame: request.0,
                            channel,
                        });
                    }
                    request_response::Message::Response { response, .. } => {
                        self.groups.offer(Input::SyncResponse {
                            peer,
                            frame: response.0,
                        });
                    }
                },
                request_response::Event::OutboundFailure { peer, error, .. } => {
                    tracing::debug!(%peer, "group sync request failed: {error}");
                }
                request_response::Event::InboundFailure { peer, error, .. } => {
                    tracing::debug!(%peer, "group sync response failed: {error}");
                }
                request_response::Event::ResponseSent { .. } => {}
            },
        }
    }

    fn on_net_command(&mut self, cmd: NetCommand) {
        let gs = &mut self.swarm.behaviour_mut().gossipsub;
        match cmd {
            NetCommand::Subscribe(topic) => {
                let topic = gossipsub::IdentTopic::new(topic);
                if let Err(e) = gs.subscribe(&topic) {
                    tracing::warn!(%topic, "cannot subscribe: {e}");
                }
                if let Err(e) =
                    gs.set_topic_params(topic, crate::behaviour::group_topic_score_params())
                {
                    tracing::warn!("cannot set topic score parameters: {e}");
                }
            }
            NetCommand::Unsubscribe(topic) => {
                gs.unsubscribe(&gossipsub::IdentTopic::new(topic));
            }
            NetCommand::Publish {
                topic,
                data,
                outbox,
            } => {
                // A broadcast: the policy says which routes may carry it,
                // and store-and-forward (the outbox) covers none being up.
                let plan = self.policy.plan(&Requirements::broadcast(), &self.reach);
                let ok = if plan.first().is_some() {
                    match self
                        .swarm
                        .behaviour_mut()
                        .gossipsub
                        .publish(gossipsub::IdentTopic::new(topic), data)
                    {
                        Ok(_) | Err(gossipsub::PublishError::Duplicate) => true,
                        Err(e) => {
                            tracing::debug!("publish deferred: {e}");
                            false
                        }
                    }
                } else {
                    false
                };
                if let Some((group, id)) = outbox {
                    self.groups.offer(Input::Published { group, id, ok });
                }
            }
            NetCommand::Validation {
                message_id,
                source,
                acceptance,
            } => {
                gs.report_message_validation_result(&message_id, &source, acceptance);
            }
            NetCommand::SyncRequest { peer, frame } => {
                if self.unicast_route().is_some() {
                    self.swarm
                        .behaviour_mut()
                        .group_sync
                        .send_request(&peer, SyncFrame(frame));
                }
            }
            NetCommand::SyncRespond { channel, frame } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .group_sync
                    .send_response(channel, SyncFrame(frame))
                    .is_err()
                {
                    tracing::debug!("sync response not sent: the requester went away");
                }
            }
        }
    }

    fn on_file_command(&mut self, cmd: FileCommand) {
        match cmd {
            FileCommand::Request {
                peer,
                file,
                asked,
                frame,
            } => {
                if self.unicast_route().is_none() {
                    self.files.offer(files::Input::Response {
                        peer,
                        file,
                        asked,
                        result: Err("no route is up".into()),
                    });
                    return;
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .files
                    .send_request(&peer, FileFrame(frame));
                self.file_requests.insert(id, (file, asked));
            }
            FileCommand::Respond { channel, frame } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .files
                    .send_response(channel, FileFrame(frame))
                    .is_err()
                {
                    tracing::debug!("file response not sent: the requester went away");
                }
            }
            FileCommand::StartProviding(file) => {
                let key = kad::RecordKey::new(&file.0);
                if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(key) {
                    tracing::warn!(%file, "cannot announce the file: {e}");
                }
            }
            FileCommand::StopProviding(file) => {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .stop_providing(&kad::RecordKey::new(&file.0));
            }
            FileCommand::FindProviders(file) => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(kad::RecordKey::new(&file.0));
                self.provider_queries.insert(id, file);
            }
        }
    }

    fn save_peer(&self, peer: PeerId, addrs: Vec<Multiaddr>, agent: Option<String>) {
        if addrs.is_empty() && agent.is_none() {
            return;
        }
        // Best effort: when the writer falls behind, an address update is
        // dropped (it is learned again on the next connection).
        if self
            .store_tx
            .try_send(StoreOp::Peer { peer, addrs, agent })
            .is_err()
        {
            tracing::debug!(%peer, "peer store queue full; update dropped");
        }
    }
}

/// The transport a multiaddr uses, as reported in `peers` and events.
pub fn transport_name(addr: &Multiaddr) -> &'static str {
    let mut name = "other";
    for p in addr.iter() {
        match p {
            Protocol::QuicV1 | Protocol::Quic => return "quic",
            Protocol::Tcp(_) => name = "tcp",
            Protocol::Memory(_) => return "memory",
            Protocol::Ip6zone(_) if fogmesh_ble::is_ble(addr) => return "ble",
            _ => {}
        }
    }
    name
}

/// Whether an address announced by a peer is worth dialling or storing
/// (unspecified addresses such as 0.0.0.0 are not).
fn is_dialable(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => !ip.is_unspecified(),
        Some(Protocol::Ip6(ip)) => !ip.is_unspecified(),
        Some(_) => true,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_names() {
        let t = |s: &str| transport_name(&s.parse::<Multiaddr>().expect("ma"));
        assert_eq!(t("/ip4/1.2.3.4/tcp/1"), "tcp");
        assert_eq!(t("/ip4/1.2.3.4/udp/1/quic-v1"), "quic");
        assert_eq!(t("/memory/5"), "memory");
        assert_eq!(t("/ip4/1.2.3.4/udp/1"), "other");
    }

    #[test]
    fn unspecified_addresses_are_not_dialable() {
        assert!(!is_dialable(&"/ip4/0.0.0.0/tcp/1".parse().expect("ma")));
        assert!(is_dialable(&"/ip4/127.0.0.1/tcp/1".parse().expect("ma")));
    }
}
