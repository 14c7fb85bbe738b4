//! The event loop: owns the swarm and hands each event, command and timer
//! to the concern it belongs to. Local work (API commands, the actors'
//! requests) goes before new remote work.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::bail;
use fogmesh_protocols::policy::{
    LinkDecision, PeerLink, Policy, Reachability, Requirements, Route,
};
use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, kad};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::ble::{self, BleNet};
use super::discovery;
use super::files_net::FilesNet;
use super::groups_net::GroupsNet;
use super::mailbox_net::MailboxNet;
use super::messages_net::{Link, MessagesNet};
use super::nat::{self, NatNet};
use super::peers::PeerBook;
use super::{Command, LISTEN_TIMEOUT};
use crate::behaviour::{Behaviour, BehaviourEvent};
use crate::metrics::NodeMetrics;
use crate::types::{NodeEvent, Status};

/// What every concern reads: the routing policy and what is up, the event
/// channel, metrics.
pub(super) struct Ctx {
    policy: Policy,
    reach: Reachability,
    events: broadcast::Sender<NodeEvent>,
    pub(super) metrics: NodeMetrics,
    pub(super) libp2p_metrics: libp2p::metrics::Metrics,
    /// Below this many connected peers, discovered peers are dialled.
    pub(super) min_peers: usize,
    /// Kademlia's bucket size (see `discovery::kad_add`).
    pub(super) kad_bucket_size: usize,
}

impl Ctx {
    /// Sends an event to whoever listens (nobody listening is fine).
    pub(super) fn emit(&self, ev: NodeEvent) {
        let _ = self.events.send(ev);
    }

    /// The routes the policy allows a plain unicast message, in order.
    pub(super) fn unicast_routes(&self) -> Vec<Route> {
        self.policy
            .plan(&Requirements::unicast(), &self.reach)
            .routes
    }

    /// The first route the policy gives a plain unicast message, if any is
    /// up: what dials, sync and file requests use.
    pub(super) fn unicast_route(&self) -> Option<Route> {
        self.policy
            .plan(&Requirements::unicast(), &self.reach)
            .first()
    }

    /// Whether the policy lets a broadcast (a group message) go out now.
    pub(super) fn broadcast_route(&self) -> Option<Route> {
        self.policy
            .plan(&Requirements::broadcast(), &self.reach)
            .first()
    }

    /// Whether a request with `req` may go to a peer over `link` now: a
    /// unicast route must be up, and bulk traffic waits for a direct
    /// connection. The one gate of every request the node sends.
    pub(super) fn may_request(&self, req: &Requirements, link: PeerLink) -> Result<(), Held> {
        if self.unicast_route().is_none() {
            return Err(Held::NoRoute);
        }
        match self.policy.over_link(req, link) {
            LinkDecision::Send => Ok(()),
            LinkDecision::WaitForDirect => Err(Held::WaitForDirect),
        }
    }

    /// Whether an answer with `req` may go back to a peer over `link`:
    /// the responder's half of [`Self::may_request`] (a peer that asks for
    /// bulk over a circuit, an older node or a race with a closing direct
    /// connection, is told to ask again later rather than served over it).
    pub(super) fn may_answer(&self, req: &Requirements, link: PeerLink) -> Result<(), Held> {
        match self.policy.over_link(req, link) {
            LinkDecision::Send => Ok(()),
            LinkDecision::WaitForDirect => Err(Held::WaitForDirect),
        }
    }

    pub(super) fn route_up(&self, route: Route) -> bool {
        match route {
            Route::Internet => self.reach.internet,
            Route::Ble => self.reach.ble,
            Route::Onion => self.reach.onion,
            _ => false,
        }
    }
}

/// Why a request was held back; its message is what the asking actor
/// gets as the request's failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum Held {
    /// No route that can carry unicast traffic is up.
    #[error("no route is up")]
    NoRoute,
    /// The peer is reachable only through a circuit relay, and the request
    /// is bulk.
    #[error("relayed connection: waiting for a direct one")]
    WaitForDirect,
}

/// The pieces [`EventLoop::new`] takes.
pub(super) struct Parts {
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) events: broadcast::Sender<NodeEvent>,
    pub(super) metrics: NodeMetrics,
    pub(super) libp2p_metrics: libp2p::metrics::Metrics,
    pub(super) reachability: Reachability,
    pub(super) min_peers: usize,
    pub(super) kad_bucket_size: usize,
    pub(super) maintenance_interval: Duration,
    pub(super) peers: PeerBook,
    pub(super) groups: GroupsNet,
    pub(super) files: FilesNet,
    pub(super) messages: MessagesNet,
    pub(super) mailbox: MailboxNet,
    pub(super) ble: Option<BleNet>,
    pub(super) nat: NatNet,
}

/// The swarm and the state of each concern.
pub(super) struct EventLoop {
    swarm: Swarm<Behaviour>,
    ctx: Ctx,
    commands: mpsc::Receiver<Command>,
    peers: PeerBook,
    groups: GroupsNet,
    files: FilesNet,
    messages: MessagesNet,
    mailbox: MailboxNet,
    ble: Option<BleNet>,
    nat: NatNet,
    /// The DHT walks made when short of peers.
    walks: discovery::Walks,
    maintenance_interval: Duration,
    started: Instant,
    listeners: Vec<ListenerId>,
}

impl EventLoop {
    pub(super) fn new(swarm: Swarm<Behaviour>, parts: Parts) -> Self {
        EventLoop {
            swarm,
            ctx: Ctx {
                policy: Policy::default(),
                reach: parts.reachability,
                events: parts.events,
                metrics: parts.metrics,
                libp2p_metrics: parts.libp2p_metrics,
                min_peers: parts.min_peers,
                kad_bucket_size: parts.kad_bucket_size,
            },
            commands: parts.commands,
            peers: parts.peers,
            groups: parts.groups,
            files: parts.files,
            messages: parts.messages,
            mailbox: parts.mailbox,
            ble: parts.ble,
            nat: parts.nat,
            walks: discovery::Walks::default(),
            maintenance_interval: parts.maintenance_interval,
            started: Instant::now(),
            listeners: Vec::new(),
        }
    }

    /// `peer`, at `addr`, is on the bootstrap list: kept connected.
    pub(super) fn keep(&mut self, peer: PeerId, addr: Multiaddr) {
        self.peers.keep(&mut self.swarm, peer, addr);
    }

    /// Adds a peer's addresses to Kademlia's routing table.
    pub(super) fn add_kad_addresses(&mut self, peer: &PeerId, addrs: &[Multiaddr]) {
        for a in addrs {
            discovery::kad_add(&mut self.swarm, self.ctx.kad_bucket_size, peer, a.clone());
        }
    }

    /// Dials a peer the node already knows, unless connected or dialling.
    pub(super) fn dial_known(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        self.peers
            .dial_known(&mut self.swarm, &self.ctx, peer, addrs);
    }

    /// Applies the Kademlia mode and reserves on the named relays.
    pub(super) fn start_nat(&mut self) {
        self.nat.start(&mut self.swarm);
    }

    /// The addresses the swarm listens on.
    pub(super) fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.swarm.listeners().cloned().collect()
    }

    /// Runs the swarm until every listener in `waiting` has an address.
    pub(super) async fn wait_listening(
        &mut self,
        mut waiting: HashSet<ListenerId>,
    ) -> anyhow::Result<()> {
        self.listeners = waiting.iter().copied().collect();
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

    /// Runs until `shutdown` is cancelled or every handle is dropped.
    pub(super) async fn run(&mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.maintenance_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ble_tick = tokio::time::interval(ble::TICK);
        // The mailbox side's timers (pickups, deposit duties, passes over
        // what is held) are checked every second.
        let mut mailbox_tick = tokio::time::interval(std::time::Duration::from_secs(1));
        mailbox_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                Some(cmd) = self.groups.next_command() => {
                    self.groups.on_command(&mut self.swarm, &self.ctx, &self.peers, cmd)
                }
                Some(cmd) = self.files.next_command() => {
                    self.files.on_command(&mut self.swarm, &self.ctx, &self.peers, cmd)
                }
                Some(cmd) = self.messages.next_command() => {
                    self.messages.on_command(&mut self.swarm, &self.ctx, &self.peers, cmd)
                }
                Some(work) = self.mailbox.next_work() => {
                    self.mailbox.on_work(&mut self.swarm, &self.ctx, &self.peers, work)
                }
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                _ = tick.tick() => {
                    discovery::maintain(
                        &mut self.swarm,
                        &mut self.walks,
                        self.peers.connected() < self.ctx.min_peers,
                        self.nat.wants_relays(),
                    );
                    self.nat.tick(&mut self.swarm);
                    self.peers.redial_kept(&mut self.swarm, &self.ctx);
                }
                _ = mailbox_tick.tick() => {
                    self.mailbox.tick(&mut self.swarm, &self.ctx, &self.peers);
                }
                n = ble::next_neighbour(&mut self.ble) => self.on_neighbour(n),
                _ = ble_tick.tick(), if self.ble.is_some() => self.ble_maintain(),
            }
        }
        // Stop accepting first. (Dropping a listener is not enough for
        // every transport: the memory transport frees its port only here.)
        for id in std::mem::take(&mut self.listeners) {
            self.swarm.remove_listener(id);
        }
        tracing::debug!("event loop stopped");
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Peers(reply) => {
                let _ = reply.send(self.peers.list(&self.swarm));
            }
            Command::Connect { addr, reply } => {
                self.peers.connect(&mut self.swarm, &self.ctx, addr, reply)
            }
            Command::MailboxDelete { holder, ids, reply } => {
                self.mailbox
                    .user_delete(&mut self.swarm, holder, ids, reply)
            }
        }
    }

    fn status(&mut self) -> Status {
        let routing_table_peers = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|b| b.num_entries())
            .sum();
        Status {
            peer_id: self.swarm.local_peer_id().to_base58(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            listen_addrs: self.swarm.listeners().map(|a| a.to_string()).collect(),
            api_addr: String::new(),
            connected_peers: self.peers.connected(),
            routing_table_peers,
            uptime_secs: self.started.elapsed().as_secs(),
            routes: Route::BY_SPEED
                .iter()
                .filter(|r| self.ctx.route_up(**r))
                .map(|r| r.to_string())
                .collect(),
            ble: self.ble.as_ref().map(|b| b.status(self.peers.ble_links())),
            reachability: self.nat.reachability(),
            external_addrs: self
                .swarm
                .external_addresses()
                .filter(|a| !nat::is_relayed(a))
                .map(|a| a.to_string())
                .collect(),
            relayed_addrs: self
                .swarm
                .external_addresses()
                .filter(|a| nat::is_relayed(a))
                .map(|a| a.to_string())
                .collect(),
            kad_mode: self.nat.kad_mode().to_owned(),
            relay_server: self.nat.relay_server_on(),
            provider_records_for_others: self
                .swarm
                .behaviour_mut()
                .kad
                .store_mut()
                .records_for_others(),
            mailbox: self.mailbox.status(),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        use libp2p::metrics::Recorder;
        self.ctx.libp2p_metrics.record(&event);
        match event {
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            SwarmEvent::NewListenAddr { address, .. } => {
                self.nat.on_new_listen_addr(&mut self.swarm, &address);
                let hide = self.ble.is_some();
                self.peers
                    .on_listen_addr(&mut self.swarm, &self.ctx, address, hide);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let first = self.peers.on_established(
                    &mut self.swarm,
                    &self.ctx,
                    peer_id,
                    connection_id,
                    &endpoint,
                );
                if first {
                    self.groups.peer_connected(peer_id);
                    self.files.peer_connected(peer_id);
                }
                // A new BLE neighbour may carry a message to anyone.
                let ble_link = fogmesh_ble::is_ble(endpoint.get_remote_address());
                self.messages.wake((!ble_link).then_some(peer_id));
                self.mailbox
                    .peer_connected(&mut self.swarm, &self.ctx, &self.peers, peer_id);
                if !ble_link {
                    self.messages.onion.connected(peer_id);
                }
                self.nat
                    .on_established(&mut self.swarm, endpoint.get_remote_address());
                if !endpoint.is_relayed() {
                    self.close_superseded_relayed(peer_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                ..
            } => self.on_closed(peer_id, connection_id),
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => self
                .peers
                .on_dial_error(&self.swarm, &self.ctx, connection_id, peer_id, &error),
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.swarm.remove_external_address(&address);
                if self.nat.on_expired_listen_addr(&mut self.swarm, &address) {
                    self.rebind();
                }
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                self.nat.on_external_addr_expired(&mut self.swarm, &address);
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!("listener error: {error}");
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                ..
            } => {
                // A reservation's relayed addresses end with it.
                for a in addresses.iter().filter(|a| nat::is_relayed(a)) {
                    self.swarm.remove_external_address(a);
                }
                self.nat.on_listener_closed(&mut self.swarm, listener_id);
            }
            _ => {}
        }
    }

    /// Kademlia: lookup results go to the part that started the lookup;
    /// the rest is discovery.
    fn on_kad(&mut self, ev: kad::Event) {
        use libp2p::metrics::Recorder;
        // Every lookup counts in libp2p's metrics, also those a part of
        // the node started (mailboxes, peer routing, providers).
        self.ctx.libp2p_metrics.record(&ev);
        discovery::log_finished(&ev);
        match ev {
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetClosestPeers(result),
                ..
            } if self.messages.owns_lookup(id) => {
                self.messages.on_lookup(&mut self.swarm, id, result)
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetClosestPeers(result),
                ..
            } if self.mailbox.owns_lookup(id) => {
                self.mailbox.on_lookup(&mut self.swarm, id, result)
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            } => self.files.on_providers(
                &mut self.swarm,
                &self.ctx,
                &self.peers,
                id,
                result,
                step.last,
            ),
            ev => {
                if let Some((peer, addrs)) = discovery::on_kad(&mut self.swarm, &self.ctx, ev) {
                    self.dial_discovered(peer, addrs);
                }
            }
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        use libp2p::metrics::Recorder;
        match event {
            BehaviourEvent::Identify(ev) => {
                self.ctx.libp2p_metrics.record(&ev);
                if let libp2p::identify::Event::Received { peer_id, info, .. } = ev {
                    if info
                        .protocols
                        .contains(&crate::behaviour::DM_GATEWAY_PROTOCOL)
                    {
                        self.messages.wake(None);
                    }
                    self.nat.on_identify(&mut self.swarm, peer_id, &info);
                    (self.peers).on_identify(&mut self.swarm, &self.ctx, peer_id, info);
                }
            }
            BehaviourEvent::Ping(ev) => {
                self.ctx.libp2p_metrics.record(&ev);
                self.peers.on_ping(&mut self.swarm, ev);
            }
            BehaviourEvent::Kad(ev) => self.on_kad(ev),
            BehaviourEvent::Mdns(ev) => {
                for (peer, addrs) in discovery::on_mdns(&mut self.swarm, &self.ctx, ev) {
                    self.dial_discovered(peer, addrs);
                }
            }
            BehaviourEvent::Limits(never) => match never {},
            BehaviourEvent::Gossipsub(ev) => {
                self.ctx.libp2p_metrics.record(&ev);
                self.groups.on_gossipsub(&mut self.swarm, ev);
            }
            BehaviourEvent::GroupSync(ev) => self.groups.on_sync_event(&self.ctx, &self.peers, ev),
            BehaviourEvent::Files(ev) => {
                self.files
                    .on_event(&mut self.swarm, &self.ctx, &self.peers, ev)
            }
            BehaviourEvent::Dm(ev) => {
                self.messages
                    .on_event(&mut self.swarm, &self.ctx, &self.peers, Link::Internet, ev)
            }
            BehaviourEvent::DmBle(ev) => {
                self.messages
                    .on_event(&mut self.swarm, &self.ctx, &self.peers, Link::Ble, ev)
            }
            BehaviourEvent::Mailbox(ev) => self.mailbox.on_event(&mut self.swarm, &self.ctx, ev),
            BehaviourEvent::Mix(()) => {}
            BehaviourEvent::Autonat(ev) => self.nat.on_autonat(&mut self.swarm, ev),
            BehaviourEvent::RelayClient(ev) => self.nat.on_relay_client(ev),
            BehaviourEvent::RelayServer(ev) => {
                self.ctx.libp2p_metrics.record(&ev);
                self.nat.on_relay_server(ev);
            }
            BehaviourEvent::Dcutr(ev) => {
                self.ctx.libp2p_metrics.record(&ev);
                if let Some(peer) = self.nat.on_dcutr(&ev) {
                    self.close_superseded_relayed(peer);
                }
            }
        }
    }

    /// A connection closed; the last one to a peer is news for every
    /// concern.
    fn on_closed(&mut self, peer: PeerId, id: libp2p::swarm::ConnectionId) {
        if self.peers.on_closed(&self.ctx, peer, id) {
            self.groups.peer_disconnected(peer);
            self.files.peer_disconnected(peer);
            self.nat.on_disconnected(&mut self.swarm, peer);
            self.messages.onion.closed(peer);
        }
    }

    /// A direct listen address went away (the node left a network): the
    /// connections made over it are likely dead, yet TCP would hold them
    /// for minutes. Each direct connection is closed and its peer dialled
    /// again, over whatever network the node has now (AutoNAT's next probe
    /// then goes over a connection that shows where the node is).
    fn rebind(&mut self) {
        let conns = self.peers.direct_ip_connections();
        if !conns.is_empty() {
            tracing::info!(connections = conns.len(), "network changed: reconnecting");
        }
        for (peer, id, addrs) in conns {
            self.swarm.close_connection(id);
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, "not dialled again: {e}");
            }
        }
    }

    /// Once a peer has a direct connection, its relayed ones are closed:
    /// request-response picks any connection to a peer, and a circuit
    /// would cut a transfer short.
    fn close_superseded_relayed(&mut self, peer: PeerId) {
        for id in self.peers.superseded_relayed(&peer) {
            tracing::debug!(%peer, "closing the relayed connection: a direct one exists");
            self.swarm.close_connection(id);
        }
    }

    /// A newly discovered peer is dialled while the node is short of peers
    /// (or, private, short of relays).
    fn dial_discovered(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if self.peers.connected() < self.ctx.min_peers || self.nat.wants_relays() {
            self.dial_known(peer, addrs);
        }
    }

    fn on_neighbour(&mut self, n: Option<fogmesh_ble::Neighbour>) {
        let Some(ble) = self.ble.as_mut() else { return };
        match n {
            Some(n) => {
                if let Some(device) = ble.on_neighbour(n) {
                    let links = self.peers.ble_view();
                    ble.dial(&mut self.swarm, &self.ctx, device, &links);
                }
            }
            None => ble.scan_ended(),
        }
    }

    /// Periodic: dial BLE neighbours we have no link with.
    fn ble_maintain(&mut self) {
        let Some(ble) = self.ble.as_mut() else { return };
        let links = self.peers.ble_view();
        ble.dial_due(&mut self.swarm, &self.ctx, &links);
    }
}
