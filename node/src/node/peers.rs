//! Connections and peers: which peers are connected and over what, dials
//! (the user's and the node's own), what identify and ping tell of each
//! peer, and the peer table in the database (written by a thread of its
//! own, so the loop never waits on a commit).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use fogmesh_protocols::policy::{PeerLink, Route};
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError};
use libp2p::{Multiaddr, PeerId, Swarm, identify, ping};
use tokio::sync::{mpsc, oneshot};

use super::ConnectError;
use super::event_loop::Ctx;
use crate::behaviour::{Behaviour, KAD_PROTOCOL};
use crate::metrics::NodeMetrics;
use crate::storage::Store;
use crate::types::{ConnectResponse, Direction, NodeEvent, PeerInfo, TransportKind};

/// Capacity of the queue of peer records waiting to be written.
const STORE_QUEUE: usize = 1024;
/// How long the writer gathers peer records before it writes them.
const STORE_LINGER: std::time::Duration = std::time::Duration::from_millis(200);

/// The reply to an explicit connect.
type ConnectReply = oneshot::Sender<Result<ConnectResponse, ConnectError>>;
/// The user's connects through relays waiting for the node's connection
/// to their relay, at most.
const MAX_WAITING_FOR_RELAY: usize = 64;

#[derive(Default)]
struct PeerMeta {
    agent: Option<String>,
    rtt: Option<Duration>,
    /// Identify lists the direct-message gateway protocol: the peer has
    /// internet and BLE and carries messages between them.
    gateway: bool,
    /// The internet addresses the peer announced through identify.
    addrs: Vec<Multiaddr>,
}

/// A peer record queued for the writer.
struct PeerRecordUpdate {
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    agent: Option<String>,
}

/// What the node knows of the peers it is connected to.
pub(super) struct PeerBook {
    /// Open connections per peer, with their remote addresses.
    connections: HashMap<PeerId, Vec<(ConnectionId, Multiaddr)>>,
    meta: HashMap<PeerId, PeerMeta>,
    /// The user's dials, answered when the connection is up or failed.
    pending_dials: HashMap<ConnectionId, ConnectReply>,
    /// The user's connects through a relay the node was not connected to,
    /// by relay: dialled once the node's connection to the relay is up.
    /// The relay client would dial the relay itself, but libp2p refuses
    /// that dial while another to the relay is under way (the node's
    /// bootstrap dial, just after start), and the circuit then fails with
    /// "oneshot canceled".
    waiting_for_relay: HashMap<PeerId, Vec<(Multiaddr, ConnectReply)>>,
    store_tx: mpsc::Sender<PeerRecordUpdate>,
    /// Peers the user or the bootstrap list asked for: their connections
    /// are held open when idle (`crate::keep_alive`), and they are dialled
    /// again when the last one closes.
    kept: HashMap<PeerId, Kept>,
}

/// A peer asked for: where to dial it, and the back-off of its redials.
#[derive(Debug, Default)]
struct Kept {
    addrs: Vec<Multiaddr>,
    /// Redials since it was last connected.
    fails: u32,
    /// Maintenance ticks to let pass before the next redial.
    wait: u32,
}

/// Redials of a kept peer back off to one every this many maintenance
/// ticks (32: 8 minutes in the daemon).
const MAX_REDIAL_TICKS: u32 = 32;

impl PeerBook {
    /// An empty book and its writer thread (which ends, once it has written
    /// everything queued, when the book is dropped).
    pub(super) fn start(
        store: Store,
        metrics: NodeMetrics,
    ) -> anyhow::Result<(Self, std::thread::JoinHandle<()>)> {
        let (store_tx, store_rx) = mpsc::channel(STORE_QUEUE);
        // A thread of its own, not tokio's blocking pool: it lives as long
        // as the node, and a process with many nodes (the simulator) would
        // otherwise exhaust the pool's 512 threads with writers.
        let writer = std::thread::Builder::new()
            .name("fogmesh-peers".into())
            .spawn(move || write_peers(store, store_rx, metrics))
            .context("cannot start the peer writer thread")?;
        let book = PeerBook {
            connections: HashMap::new(),
            meta: HashMap::new(),
            pending_dials: HashMap::new(),
            waiting_for_relay: HashMap::new(),
            store_tx,
            kept: HashMap::new(),
        };
        Ok((book, writer))
    }

    /// `peer` is one the operator asked for (a bootstrap line, `connect`):
    /// its connections are held open when idle.
    /// `addr` is where it was reached (without `/p2p`; a BLE neighbour is
    /// found again by scanning, not redialled here).
    pub(super) fn keep(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, addr: Multiaddr) {
        let kept = self.kept.entry(peer).or_default();
        if !fogmesh_ble::is_ble(&addr) && !kept.addrs.contains(&addr) {
            kept.addrs.insert(0, addr);
            kept.addrs.truncate(crate::storage::MAX_ADDRS_PER_PEER);
        }
        swarm.behaviour_mut().keep.insert(peer);
    }

    /// Periodic: dials the kept peers that are not connected, each at
    /// most every `2^fails` ticks (up to [`MAX_REDIAL_TICKS`]).
    pub(super) fn redial_kept(&mut self, swarm: &mut Swarm<Behaviour>, ctx: &Ctx) {
        if ctx.unicast_route().is_none() {
            return;
        }
        let mut due = Vec::new();
        for (peer, kept) in &mut self.kept {
            if self.connections.contains_key(peer) || kept.addrs.is_empty() {
                continue;
            }
            if kept.wait > 0 {
                kept.wait -= 1;
                continue;
            }
            kept.fails = kept.fails.saturating_add(1);
            kept.wait = (1u32 << kept.fails.min(5)).min(MAX_REDIAL_TICKS) - 1;
            tracing::debug!(%peer, fails = kept.fails, "dialling a peer asked for again");
            due.push((*peer, kept.addrs.clone()));
        }
        for (peer, addrs) in due {
            self.dial_known(swarm, ctx, peer, addrs);
        }
    }

    /// Peers with at least one connection.
    pub(super) fn connected(&self) -> usize {
        self.connections.len()
    }

    /// BLE connections open now.
    pub(super) fn ble_links(&self) -> usize {
        self.connections
            .values()
            .flatten()
            .filter(|(_, a)| fogmesh_ble::is_ble(a))
            .count()
    }

    /// The links as the BLE dial rule sees them.
    pub(super) fn ble_view(&self) -> fogmesh_ble::Links {
        let mut links = fogmesh_ble::Links::default();
        for (peer, conns) in &self.connections {
            links.peer_hints.insert(fogmesh_ble::peer_hint(peer));
            for (_, a) in conns {
                if let Some(fogmesh_ble::addr::BleAddr::Device(d)) = fogmesh_ble::addr::parse(a) {
                    links.ble_links += 1;
                    links.devices.insert(d);
                }
            }
        }
        links
    }

    /// Whether `peer` has a BLE connection.
    pub(super) fn has_ble(&self, peer: &PeerId) -> bool {
        self.connections
            .get(peer)
            .is_some_and(|c| c.iter().any(|(_, a)| fogmesh_ble::is_ble(a)))
    }

    /// Whether `peer` has a connection that is not BLE (TCP, QUIC,
    /// relayed, the simulator's network).
    pub(super) fn has_internet(&self, peer: &PeerId) -> bool {
        self.connections
            .get(peer)
            .is_some_and(|c| c.iter().any(|(_, a)| !fogmesh_ble::is_ble(a)))
    }

    /// `peer`'s connections that are not BLE.
    pub(super) fn internet_connections(&self, peer: &PeerId) -> Vec<ConnectionId> {
        self.connections
            .get(peer)
            .into_iter()
            .flatten()
            .filter(|(_, a)| !fogmesh_ble::is_ble(a))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The internet addresses `peer` announced (while it is connected).
    pub(super) fn announced(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.meta
            .get(peer)
            .map(|m| m.addrs.clone())
            .unwrap_or_default()
    }

    /// Peers with a BLE connection: the node's BLE neighbours.
    pub(super) fn ble_neighbours(&self) -> Vec<PeerId> {
        self.connections
            .keys()
            .filter(|p| self.has_ble(p))
            .copied()
            .collect()
    }

    /// BLE neighbours that are gateways (identify lists the gateway
    /// protocol: they have internet too).
    pub(super) fn ble_gateways(&self) -> Vec<PeerId> {
        self.ble_neighbours()
            .into_iter()
            .filter(|p| self.meta.get(p).is_some_and(|m| m.gateway))
            .collect()
    }

    /// Whether any peer is connected over something other than BLE.
    pub(super) fn any_internet(&self) -> bool {
        self.connections.keys().any(|p| self.has_internet(p))
    }

    /// Connected gateways (peers with internet and BLE), reachable over
    /// the internet.
    pub(super) fn gateways(&self) -> Vec<PeerId> {
        self.meta
            .iter()
            .filter(|(p, m)| m.gateway && self.has_internet(p))
            .map(|(p, _)| *p)
            .collect()
    }

    /// The node's link to `peer`, as the routing policy sees it.
    pub(super) fn link(&self, peer: &PeerId) -> PeerLink {
        match self.connections.get(peer) {
            None => PeerLink::NotConnected,
            Some(conns) if conns.iter().all(|(_, a)| super::nat::is_relayed(a)) => {
                PeerLink::RelayedOnly
            }
            Some(_) => PeerLink::Direct,
        }
    }

    /// The direct IP connections (not relayed, not BLE), with the
    /// addresses to dial each peer at again: what it announced, and the
    /// address of the connection.
    pub(super) fn direct_ip_connections(&self) -> Vec<(PeerId, ConnectionId, Vec<Multiaddr>)> {
        let mut out = Vec::new();
        for (peer, conns) in &self.connections {
            for (id, a) in conns {
                if super::nat::is_relayed(a) || fogmesh_ble::is_ble(a) {
                    continue;
                }
                let mut addrs = self.announced(peer);
                if !addrs.contains(a) {
                    addrs.push(a.clone());
                }
                out.push((*peer, *id, addrs));
            }
        }
        out
    }

    /// The relayed connections to `peer` once it also has a direct one
    /// (closing them makes every protocol use the direct connection).
    pub(super) fn superseded_relayed(&self, peer: &PeerId) -> Vec<ConnectionId> {
        if self.link(peer) != PeerLink::Direct {
            return Vec::new();
        }
        self.connections
            .get(peer)
            .into_iter()
            .flatten()
            .filter(|(_, a)| super::nat::is_relayed(a))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The connected peers, for `GET /v1/peers`.
    pub(super) fn list(&self, swarm: &Swarm<Behaviour>) -> Vec<PeerInfo> {
        let mut peers: Vec<PeerInfo> = self
            .connections
            .iter()
            .map(|(peer, conns)| {
                let meta = self.meta.get(peer);
                PeerInfo {
                    peer_id: peer.to_base58(),
                    addrs: conns.iter().map(|(_, a)| a.to_string()).collect(),
                    transport: conns
                        .first()
                        .map_or(TransportKind::Other, |(_, a)| transport_kind(a)),
                    agent: meta.and_then(|m| m.agent.clone()),
                    rtt_ms: meta.and_then(|m| m.rtt).map(|d| d.as_secs_f64() * 1000.0),
                    gossip_score: swarm.behaviour().gossipsub.peer_score(peer),
                    relayed: self.link(peer) == PeerLink::RelayedOnly,
                }
            })
            .collect();
        peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        peers
    }

    /// An explicit connect from the user: ask the policy, then dial.
    pub(super) fn connect(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        addr: Multiaddr,
        reply: ConnectReply,
    ) {
        // Of the routes the policy allows, the one that can carry this
        // address.
        let wanted = if fogmesh_ble::is_ble(&addr) {
            Route::Ble
        } else {
            Route::Internet
        };
        let Some(route) = ctx.unicast_routes().into_iter().find(|r| *r == wanted) else {
            let _ = reply.send(Err(ConnectError::NoRoute));
            return;
        };
        let peer = crate::storage::last_peer(&addr);
        if let Some(peer) = peer {
            if peer == *swarm.local_peer_id() {
                let _ = reply.send(Err(ConnectError::Dial(
                    "that address is this node's own".into(),
                )));
                return;
            }
            if swarm.is_connected(&peer) {
                self.keep(swarm, peer, crate::storage::strip_p2p(&addr));
                let _ = reply.send(Ok(ConnectResponse {
                    peer_id: peer.to_base58(),
                    route: route.to_string(),
                }));
                return;
            }
        }
        if let Some((relay, relay_addr)) = circuit_relay(&addr)
            && !swarm.is_connected(&relay)
        {
            self.connect_via_relay(swarm, ctx, relay, relay_addr, addr, reply);
            return;
        }
        self.dial_for_user(swarm, ctx, addr, peer, reply);
    }

    /// A connect through `relay`, which the node is not connected to: the
    /// relay first (unless a dial to it is under way), then the circuit.
    fn connect_via_relay(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        relay: PeerId,
        relay_addr: Multiaddr,
        addr: Multiaddr,
        reply: ConnectReply,
    ) {
        let waiting: usize = self.waiting_for_relay.values().map(Vec::len).sum();
        if waiting >= MAX_WAITING_FOR_RELAY {
            let _ = reply.send(Err(ConnectError::Dial(
                "too many connects waiting for their relay; try again".into(),
            )));
            return;
        }
        let opts = DialOpts::peer_id(relay)
            .addresses(vec![relay_addr])
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match swarm.dial(opts) {
            Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {
                self.waiting_for_relay
                    .entry(relay)
                    .or_default()
                    .push((addr, reply));
            }
            Err(e) => {
                ctx.metrics.dial_failures.inc();
                let _ = reply.send(Err(ConnectError::Dial(format!(
                    "cannot reach the relay: {e}"
                ))));
            }
        }
    }

    /// Dials `addr` for the user, who is answered when the connection is
    /// up or the dial failed.
    fn dial_for_user(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        addr: Multiaddr,
        peer: Option<PeerId>,
        reply: ConnectReply,
    ) {
        let opts = match peer {
            Some(p) => DialOpts::peer_id(p)
                .addresses(vec![addr])
                .condition(PeerCondition::Always)
                .build(),
            None => DialOpts::unknown_peer_id().address(addr).build(),
        };
        let id = opts.connection_id();
        match swarm.dial(opts) {
            Ok(()) => {
                self.pending_dials.insert(id, reply);
            }
            Err(e) => {
                ctx.metrics.dial_failures.inc();
                let _ = reply.send(Err(ConnectError::Dial(e.to_string())));
            }
        }
    }

    /// Dials a peer the node already knows, unless connected or dialling.
    pub(super) fn dial_known(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    ) {
        if ctx.unicast_route().is_none() {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = swarm.dial(opts) {
            tracing::debug!(%peer, "not dialling: {e}");
        }
    }

    /// A listener has a new address. With BLE on, identify tells peers only
    /// external addresses (a BLE address must never reach internet peers):
    /// the IP listen addresses are made those.
    pub(super) fn on_listen_addr(
        &self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        address: Multiaddr,
        hide_listen_addrs: bool,
    ) {
        tracing::info!(%address, "listening");
        if hide_listen_addrs && !fogmesh_ble::is_ble(&address) && is_dialable(&address) {
            swarm.add_external_address(address.clone());
        }
        ctx.emit(NodeEvent::ListenAddr {
            addr: address.to_string(),
        });
    }

    /// A connection is up; `true` when it is the first to that peer.
    pub(super) fn on_established(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peer: PeerId,
        id: ConnectionId,
        endpoint: &ConnectedPoint,
    ) -> bool {
        let (addr, direction) = match endpoint {
            ConnectedPoint::Dialer { address, .. } => (address.clone(), Direction::Outbound),
            // A circuit accepted through a reservation: the relay client
            // gives `/p2p/<peer>` as the send-back address, with nothing
            // saying it is relayed; the local address (the relay's,
            // `/p2p-circuit`) does.
            ConnectedPoint::Listener { local_addr, .. } if endpoint.is_relayed() => (
                local_addr.clone().with(Protocol::P2p(peer)),
                Direction::Inbound,
            ),
            ConnectedPoint::Listener { send_back_addr, .. } => {
                (send_back_addr.clone(), Direction::Inbound)
            }
        };
        tracing::debug!(%peer, %addr, %direction, "connection established");
        let route = if fogmesh_ble::is_ble(&addr) {
            Route::Ble
        } else {
            Route::Internet
        };
        if let Some(kept) = self.kept.get_mut(&peer) {
            (kept.fails, kept.wait) = (0, 0);
        }
        // Connects through this relay may go now.
        for (circuit, reply) in self.waiting_for_relay.remove(&peer).unwrap_or_default() {
            let target = crate::storage::last_peer(&circuit);
            self.dial_for_user(swarm, ctx, circuit, target, reply);
        }
        if let Some(reply) = self.pending_dials.remove(&id) {
            self.keep(swarm, peer, crate::storage::strip_p2p(&addr));
            let _ = reply.send(Ok(ConnectResponse {
                peer_id: peer.to_base58(),
                route: route.to_string(),
            }));
        }
        // An address we dialled successfully is worth remembering (not a
        // BLE one: neighbours are found again by scanning; not a relayed
        // one: reservations come and go).
        if endpoint.is_dialer() && route == Route::Internet && !endpoint.is_relayed() {
            self.save(peer, vec![addr.clone()], None);
        }
        let conns = self.connections.entry(peer).or_default();
        let first = conns.is_empty();
        conns.push((id, addr.clone()));
        if first {
            ctx.metrics
                .connected_peers
                .set(self.connections.len() as i64);
            ctx.emit(NodeEvent::PeerConnected {
                peer_id: peer.to_base58(),
                addr: addr.to_string(),
                transport: transport_kind(&addr),
                direction,
            });
        }
        first
    }

    /// A connection closed; `true` when it was the last to that peer.
    pub(super) fn on_closed(&mut self, ctx: &Ctx, peer: PeerId, id: ConnectionId) -> bool {
        let Some(conns) = self.connections.get_mut(&peer) else {
            return false;
        };
        conns.retain(|(c, _)| *c != id);
        if !conns.is_empty() {
            return false;
        }
        self.connections.remove(&peer);
        self.meta.remove(&peer);
        ctx.metrics
            .connected_peers
            .set(self.connections.len() as i64);
        ctx.emit(NodeEvent::PeerDisconnected {
            peer_id: peer.to_base58(),
        });
        true
    }

    /// A dial failed.
    pub(super) fn on_dial_error(
        &mut self,
        swarm: &Swarm<Behaviour>,
        ctx: &Ctx,
        id: ConnectionId,
        peer: Option<PeerId>,
        error: &DialError,
    ) {
        ctx.metrics.dial_failures.inc();
        tracing::debug!(?peer, "dial failed: {error}");
        if let Some(reply) = self.pending_dials.remove(&id) {
            let _ = reply.send(Err(ConnectError::Dial(error.to_string())));
        }
        // The relay of waiting connects could not be reached.
        if let Some(relay) = peer
            && !swarm.is_connected(&relay)
            && let Some(waiting) = self.waiting_for_relay.remove(&relay)
        {
            for (_, reply) in waiting {
                let _ = reply.send(Err(ConnectError::Dial(format!(
                    "cannot reach the relay: {error}"
                ))));
            }
        }
    }

    /// Identify told us a peer's addresses, protocols and agent: peers that
    /// speak our DHT feed Kademlia, and the record is saved.
    pub(super) fn on_identify(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peer_id: PeerId,
        info: identify::Info,
    ) {
        let addrs: Vec<Multiaddr> = info
            .listen_addrs
            .into_iter()
            .filter(|a| is_dialable(a) && !fogmesh_ble::is_ble(a))
            .take(crate::storage::MAX_ADDRS_PER_PEER)
            .collect();
        if info.protocols.contains(&KAD_PROTOCOL) {
            for a in &addrs {
                super::discovery::kad_add(swarm, ctx.kad_bucket_size, &peer_id, a.clone());
            }
        } else {
            // A Kademlia client (a node that is not reachable, or no longer
            // is) has no place in the routing table.
            swarm.behaviour_mut().kad.remove_peer(&peer_id);
        }
        let meta = self.meta.entry(peer_id).or_default();
        meta.agent = Some(info.agent_version.clone());
        meta.gateway = info
            .protocols
            .contains(&crate::behaviour::DM_GATEWAY_PROTOCOL);
        meta.addrs = addrs.clone();
        self.save(peer_id, addrs, Some(info.agent_version));
    }

    /// A round-trip time was measured, or a ping failed. A failed ping
    /// (not an unsupported one) on an IP or relayed connection (20 s
    /// without an answer, or a broken stream) means the
    /// connection is dead, which TCP would only notice after many minutes
    /// (the peer moved to another network, its NAT forgot the mapping): it
    /// is closed, so that nothing keeps using it (AutoNAT judges a peer by
    /// any of its connections' addresses). BLE links, slow by nature, are
    /// left to their own timeouts.
    pub(super) fn on_ping(&mut self, swarm: &mut Swarm<Behaviour>, ev: ping::Event) {
        match ev.result {
            Ok(rtt) => {
                // Only for connected peers: a late ping must not resurrect
                // one.
                if self.connections.contains_key(&ev.peer) {
                    self.meta.entry(ev.peer).or_default().rtt = Some(rtt);
                }
            }
            // A peer without ping (a minimal implementation) is not dead.
            Err(ping::Failure::Unsupported) => {}
            Err(e) => {
                let ble = self
                    .connections
                    .get(&ev.peer)
                    .into_iter()
                    .flatten()
                    .any(|(id, a)| *id == ev.connection && fogmesh_ble::is_ble(a));
                if !ble {
                    tracing::info!(peer = %ev.peer, "ping failed ({e}): closing the connection");
                    swarm.close_connection(ev.connection);
                }
            }
        }
    }

    fn save(&self, peer: PeerId, addrs: Vec<Multiaddr>, agent: Option<String>) {
        if addrs.is_empty() && agent.is_none() {
            return;
        }
        // Best effort: when the writer falls behind, an address update is
        // dropped (it is learned again on the next connection).
        if self
            .store_tx
            .try_send(PeerRecordUpdate { peer, addrs, agent })
            .is_err()
        {
            tracing::debug!(%peer, "peer store queue full; update dropped");
        }
    }
}

/// Writes the queued peer records, what came within [`STORE_LINGER`] of
/// the first in one transaction: a burst of connections (a Kademlia walk
/// makes dozens a second) costs one durable commit, not one each. What a
/// crash loses is at most that long of a cache that is learned again.
fn write_peers(store: Store, mut rx: mpsc::Receiver<PeerRecordUpdate>, metrics: NodeMetrics) {
    while let Some(first) = rx.blocking_recv() {
        std::thread::sleep(STORE_LINGER);
        let mut batch = vec![first];
        while batch.len() < STORE_QUEUE
            && let Ok(u) = rx.try_recv()
        {
            batch.push(u);
        }
        let seen = batch
            .iter()
            .map(|u| (&u.peer, u.addrs.as_slice(), u.agent.as_deref()));
        match store.upsert_peers(seen) {
            Ok(()) => {
                metrics.peer_records_written.inc_by(batch.len() as u64);
            }
            Err(e) => tracing::warn!(records = batch.len(), "cannot save peers: {e}"),
        }
    }
}

/// The transport a multiaddr uses, as reported in `peers` and events.
pub fn transport_kind(addr: &Multiaddr) -> TransportKind {
    let mut kind = TransportKind::Other;
    for p in addr.iter() {
        match p {
            Protocol::QuicV1 | Protocol::Quic => return TransportKind::Quic,
            Protocol::Tcp(_) => kind = TransportKind::Tcp,
            Protocol::Memory(_) => return TransportKind::Memory,
            Protocol::Ip6zone(_) if fogmesh_ble::is_ble(addr) => return TransportKind::Ble,
            _ => {}
        }
    }
    kind
}

/// Whether an address announced by a peer is worth dialling or storing
/// (unspecified addresses such as 0.0.0.0 are not).
pub(super) fn is_dialable(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => !ip.is_unspecified(),
        Some(Protocol::Ip6(ip)) => !ip.is_unspecified(),
        Some(_) => true,
        None => false,
    }
}

/// The relay of a circuit address (`<relay address>/p2p/<relay>/p2p-circuit/...`)
/// and the relay's own address, if `addr` is one.
fn circuit_relay(addr: &Multiaddr) -> Option<(PeerId, Multiaddr)> {
    let mut relay_addr = Multiaddr::empty();
    let mut relay = None;
    for p in addr.iter() {
        match p {
            Protocol::P2pCircuit => return relay.map(|r| (r, relay_addr)),
            Protocol::P2p(id) => {
                relay = Some(id);
                relay_addr.push(p);
            }
            p => relay_addr.push(p),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_kinds() {
        let t = |s: &str| transport_kind(&s.parse::<Multiaddr>().expect("ma"));
        assert_eq!(t("/ip4/1.2.3.4/tcp/1"), TransportKind::Tcp);
        assert_eq!(t("/ip4/1.2.3.4/udp/1/quic-v1"), TransportKind::Quic);
        assert_eq!(t("/memory/5"), TransportKind::Memory);
        assert_eq!(t("/ip4/1.2.3.4/udp/1"), TransportKind::Other);
        assert_eq!(t("/ip6zone/ble-02:00:00:00:00:01"), TransportKind::Ble);
    }

    #[test]
    fn a_circuit_address_names_its_relay_and_the_relays_address() {
        let relay = PeerId::random();
        let target = PeerId::random();
        let ma = |s: String| s.parse::<Multiaddr>().expect("ma");
        let circuit = ma(format!(
            "/ip4/10.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{target}"
        ));
        assert_eq!(
            circuit_relay(&circuit),
            Some((relay, ma(format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}"))))
        );
        assert_eq!(crate::storage::last_peer(&circuit), Some(target));
        // Not a circuit, or a circuit without the relay's id: none.
        assert_eq!(
            circuit_relay(&ma(format!("/ip4/10.0.0.1/tcp/4001/p2p/{target}"))),
            None
        );
        assert_eq!(
            circuit_relay(&ma(format!(
                "/ip4/10.0.0.1/tcp/4001/p2p-circuit/p2p/{target}"
            ))),
            None
        );
    }

    #[test]
    fn unspecified_addresses_are_not_dialable() {
        assert!(!is_dialable(&"/ip4/0.0.0.0/tcp/1".parse().expect("ma")));
        assert!(is_dialable(&"/ip4/127.0.0.1/tcp/1".parse().expect("ma")));
    }
}
