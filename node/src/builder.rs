//! The one place a node is assembled: transports, their timeouts, the
//! behaviour, metrics, the actors and the event loop.
//!
//! The daemon ([`crate::daemon`]) and the simulator both build nodes with
//! a [`NodeBuilder`]; they differ only in the inputs they give it:
//!
//! - **transports**: [`Internet::Host`] (TCP and QUIC with Noise and Yamux,
//!   and DNS) for a daemon, [`Internet::Custom`] for a modelled network,
//!   [`Internet::Off`] for an offline node; plus an optional BLE
//!   [`Radio`], upgraded like any other transport;
//! - **settings**: the behaviour's, the actors', the event loop's;
//! - **time dilation**: a simulator running many nodes on one host slows
//!   the model down; every protocol timer the node owns is stretched by the
//!   same factor here, so a simulated node is the daemon's node, slowed.
//!
//! What depends on the transports is derived here, once: the reachability
//! the routing policy sees, the timeouts stretched to a BLE link's speed
//! (connection set-up, group sync, file requests, the chunk scheduler), and
//! identify hiding listen addresses when a BLE address must not reach
//! internet peers.

use std::sync::Arc;
use std::time::Duration;

use fogmesh_ble::{BleTransport, Radio};
use fogmesh_protocols::policy::Reachability;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId, SwarmBuilder, Transport, noise, tcp, yamux};
use tokio_util::sync::CancellationToken;

use crate::behaviour::{Behaviour, BehaviourConfig, Composed, GossipObserver, KadMode, NatConfig};
use crate::eventlog::EventLog;
use crate::files::FilesConfig;
use crate::groups::GroupsConfig;
use crate::metrics::NodeMetrics;
use crate::node::{self, MAINTENANCE_INTERVAL, NodeConfig, RunningNode};
use crate::storage::Store;

/// An authenticated, multiplexed transport, ready for the swarm.
pub type SecuredTransport = Boxed<(PeerId, StreamMuxerBox)>;

/// Error of a transport constructor.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A byte stream a raw transport hands out.
pub trait RawStream: futures::AsyncRead + futures::AsyncWrite + Unpin + Send + 'static {}

impl<T: futures::AsyncRead + futures::AsyncWrite + Unpin + Send + 'static> RawStream for T {}

/// A transport before its upgrade: the builder secures and multiplexes it
/// like the node's own.
pub type RawTransport = Boxed<Box<dyn RawStream>>;

/// libp2p's limit on a whole connection set-up (dial, Noise, Yamux).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a BLE connection's Noise and Yamux upgrade may take.
const BLE_UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

/// How the node reaches peers other than over BLE.
pub enum Internet {
    /// TCP and QUIC on the host's network, with DNS resolution.
    Host,
    /// A transport of the caller's (the simulator's modelled network),
    /// upgraded like TCP (Noise, Yamux).
    Custom(RawTransport),
    /// No internet: BLE only.
    Off,
}

impl std::fmt::Debug for Internet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Internet::Host => "Host",
            Internet::Custom(_) => "Custom",
            Internet::Off => "Off",
        })
    }
}

/// Upgrades a raw transport the way every fogmesh transport is upgraded:
/// multistream-select 1, Noise with the node's key, Yamux; the upgrade
/// bounded by `timeout`.
fn secure<T>(transport: T, key: &Keypair, timeout: Duration) -> Result<SecuredTransport, BoxError>
where
    T: Transport + Send + Unpin + 'static,
    T::Output: futures::AsyncRead + futures::AsyncWrite + Unpin + Send + 'static,
    T::Error: Send + Sync + 'static,
    T::Dial: Send + 'static,
    T::ListenerUpgrade: Send + 'static,
{
    Ok(transport
        .upgrade(Version::V1)
        .authenticate(noise::Config::new(key)?)
        .multiplex(yamux::Config::default())
        .timeout(timeout)
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

/// TCP whose every dial leaves from a new ephemeral port: libp2p-tcp
/// binds a dial to the listening port when the dial asks for port reuse
/// (the swarm's default), which needs `SO_REUSEPORT`.
struct NewPorts(tcp::tokio::Transport);

impl Transport for NewPorts {
    type Output = <tcp::tokio::Transport as Transport>::Output;
    type Error = <tcp::tokio::Transport as Transport>::Error;
    type ListenerUpgrade = <tcp::tokio::Transport as Transport>::ListenerUpgrade;
    type Dial = <tcp::tokio::Transport as Transport>::Dial;

    fn listen_on(
        &mut self,
        id: libp2p::core::transport::ListenerId,
        addr: Multiaddr,
    ) -> Result<(), libp2p::core::transport::TransportError<Self::Error>> {
        self.0.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: libp2p::core::transport::ListenerId) -> bool {
        self.0.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        mut opts: libp2p::core::transport::DialOpts,
    ) -> Result<Self::Dial, libp2p::core::transport::TransportError<Self::Error>> {
        opts.port_use = libp2p::core::transport::PortUse::New;
        self.0.dial(addr, opts)
    }

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<libp2p::core::transport::TransportEvent<Self::ListenerUpgrade, Self::Error>>
    {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

/// The BLE transport over `radio`, upgraded like any other.
pub fn ble_transport(key: &Keypair, radio: Arc<dyn Radio>) -> Result<SecuredTransport, BoxError> {
    let local = key.public().to_peer_id();
    secure(BleTransport::new(radio, &local), key, BLE_UPGRADE_TIMEOUT)
}

/// A node's inputs; [`NodeBuilder::start`] assembles and starts it.
pub struct NodeBuilder {
    key: Keypair,
    store: Store,
    internet: Internet,
    radio: Option<Arc<dyn Radio>>,
    behaviour: BehaviourConfig,
    node: NodeConfig,
    idle_timeout: Duration,
    dilation: f64,
    observers: Vec<GossipObserver>,
    event_log: Option<EventLog>,
    tcp_port_reuse: bool,
}

/// A started node and what the caller may serve from it.
#[derive(Debug)]
pub struct BuiltNode {
    /// The running node.
    pub running: RunningNode,
    /// The Prometheus registry holding libp2p's and the node's metrics.
    pub registry: libp2p::metrics::Registry,
    /// The node's own counters (the API counts its requests in them).
    pub metrics: NodeMetrics,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("peer_id", &self.key.public().to_peer_id())
            .field("internet", &self.internet)
            .field("ble", &self.radio.is_some())
            .field("behaviour", &self.behaviour)
            .field("node", &self.node)
            .field("dilation", &self.dilation)
            .field("observers", &self.observers.len())
            .finish_non_exhaustive()
    }
}

impl NodeBuilder {
    /// A node with identity `key` and database `store`, on the host's
    /// internet, with every setting at its default.
    pub fn new(key: Keypair, store: Store) -> Self {
        NodeBuilder {
            key,
            store,
            internet: Internet::Host,
            radio: None,
            behaviour: BehaviourConfig::default(),
            node: default_node_config(),
            idle_timeout: Duration::from_secs(60),
            dilation: 1.0,
            observers: Vec::new(),
            event_log: None,
            tcp_port_reuse: true,
        }
    }

    /// Whether TCP dials leave from the listening port (the default:
    /// peers see one address per node, and NAT hole punching needs it)
    /// or from a new ephemeral port each (for a network without
    /// `SO_REUSEPORT`, such as the Shadow simulator's).
    pub fn tcp_port_reuse(mut self, reuse: bool) -> Self {
        self.tcp_port_reuse = reuse;
        self
    }

    /// How the node reaches internet peers.
    pub fn internet(mut self, internet: Internet) -> Self {
        self.internet = internet;
        self
    }

    /// The BLE radio, if any: the node listens on it, finds neighbours
    /// with it and dials them.
    pub fn radio(mut self, radio: Option<Arc<dyn Radio>>) -> Self {
        self.radio = radio;
        self
    }

    /// Addresses to listen on (the radio's is added when there is one).
    pub fn listen(mut self, addrs: Vec<Multiaddr>) -> Self {
        self.node.listen = addrs;
        self
    }

    /// Peers to dial at start (`/p2p/` addresses).
    pub fn bootstrap(mut self, addrs: Vec<Multiaddr>) -> Self {
        self.node.bootstrap = addrs;
        self
    }

    /// Circuit relays to reserve a slot on, whatever the node's
    /// reachability (`/p2p/` addresses).
    pub fn relays(mut self, addrs: Vec<Multiaddr>) -> Self {
        self.node.relays = addrs;
        self
    }

    /// Below this many connected peers, discovered peers are dialled.
    pub fn min_peers(mut self, n: usize) -> Self {
        self.node.min_peers = n;
        self
    }

    /// How often the node checks that it has enough peers (before
    /// dilation).
    pub fn maintenance_interval(mut self, every: Duration) -> Self {
        self.node.maintenance_interval = every;
        self
    }

    /// The behaviour's settings (before dilation and BLE scaling).
    pub fn behaviour(mut self, cfg: BehaviourConfig) -> Self {
        self.behaviour = cfg;
        self
    }

    /// Group chat settings (before dilation).
    pub fn groups(mut self, cfg: GroupsConfig) -> Self {
        self.node.groups = cfg;
        self
    }

    /// Direct message settings (before dilation).
    pub fn messages(mut self, cfg: crate::messages::MessagesConfig) -> Self {
        self.node.messages = cfg;
        self
    }

    /// Mailbox settings (holding for others, quotas; timers before
    /// dilation).
    pub fn mailbox(mut self, cfg: crate::mailbox::MailboxConfig) -> Self {
        self.node.mailbox = cfg;
        self
    }

    /// The onion route's settings (mix relaying, hops, delays, cover).
    pub fn onion(mut self, cfg: crate::onion::OnionConfig) -> Self {
        self.node.onion = cfg;
        self
    }

    /// File sharing settings (before BLE scaling).
    pub fn files(mut self, cfg: FilesConfig) -> Self {
        self.node.files = cfg;
        self
    }

    /// How long a connection with no stream open is kept.
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }

    /// Stretches every protocol timer by `factor` (≥ 1; the simulator's
    /// time dilation).
    pub fn time_dilation(mut self, factor: f64) -> Self {
        self.dilation = factor.max(1.0);
        self
    }

    /// Shows every gossip message received on the wire (duplicates
    /// included) to `observer`.
    pub fn observe_gossip(mut self, observer: GossipObserver) -> Self {
        self.observers.push(observer);
        self
    }

    /// Writes the node's event log (`--event-log`) through `log`.
    pub fn event_log(mut self, log: EventLog) -> Self {
        self.event_log = Some(log);
        self
    }

    /// Assembles the swarm, starts the actors and the event loop, and
    /// returns once every listener has an address. The node stops when
    /// `shutdown` is cancelled.
    pub async fn start(self, shutdown: CancellationToken) -> anyhow::Result<BuiltNode> {
        let NodeBuilder {
            key,
            store,
            internet,
            radio,
            mut behaviour,
            mut node,
            idle_timeout,
            dilation,
            mut observers,
            event_log,
            tcp_port_reuse,
        } = self;
        let peer_id = key.public().to_peer_id();
        if let Some(log) = &event_log {
            observers.push(log.observer());
            let tracer = log.mix_tracer();
            node.onion.trace = Some(match node.onion.trace.take() {
                Some(t) => t.and(tracer),
                None => tracer,
            });
        }
        behaviour.gossip_observer = merge_observers(behaviour.gossip_observer.take(), observers);

        dilate(&mut behaviour, &mut node, dilation);
        let idle_timeout = idle_timeout.mul_f64(dilation);
        // A mix stream idle for longer than a connection may be is closed
        // sooner (see `OnionConfig::stream_idle`).
        node.onion.stream_idle = node.onion.stream_idle.min(idle_timeout);
        // A whole connection set-up must finish within this: libp2p's 10 s
        // (dilated: between the farthest regions of a slowed model a
        // handshake takes longer), unless a BLE link, whose dial alone may
        // take 20 s, is among the transports.
        let mut connection_timeout = CONNECTION_TIMEOUT.mul_f64(dilation);
        if let Some(r) = &radio {
            behaviour = crate::behaviour::scale_for_ble(behaviour, r.limits());
            node.files = node.files.scaled_for_ble(r.limits());
            connection_timeout =
                connection_timeout.max(fogmesh_ble::DIAL_TIMEOUT + BLE_UPGRADE_TIMEOUT);
        }
        behaviour.dm_gateway = radio.is_some() && !matches!(internet, Internet::Off);
        node.reachability = Reachability {
            internet: !matches!(internet, Internet::Off),
            ble: radio.is_some(),
            // The onion route runs over internet connections; whether
            // enough mix nodes are known is the route's own answer to each
            // attempt (the message waits with that reason).
            onion: !matches!(internet, Internet::Off),
        };
        node.ble = radio.clone();
        node.kad_mode = behaviour.kad_mode;
        node.kad_bucket_size = behaviour.kad_bucket_size.get();
        node.nat = behaviour.nat.clone();

        let mut registry = libp2p::metrics::Registry::default();
        let metrics = NodeMetrics::register(&mut registry);
        let swarm = build_swarm(
            &key,
            (internet, tcp_port_reuse),
            radio,
            &behaviour,
            idle_timeout,
            connection_timeout,
            &mut registry,
        )?;
        let libp2p_metrics = libp2p::metrics::Metrics::new(&mut registry);
        // The event log subscribes before the node starts: its first
        // connections are made while it does.
        let events = node::event_channel();
        if let Some(log) = event_log {
            tokio::spawn(log.follow(events.subscribe(), peer_id));
        }
        let running = node::start(
            key,
            swarm,
            store,
            node,
            metrics.clone(),
            libp2p_metrics,
            events,
            shutdown,
        )
        .await?;
        Ok(BuiltNode {
            running,
            registry,
            metrics,
        })
    }
}

/// A node's settings before the builder's calls.
fn default_node_config() -> NodeConfig {
    NodeConfig {
        listen: Vec::new(),
        bootstrap: Vec::new(),
        min_peers: 8,
        reachability: Reachability::default(),
        groups: GroupsConfig::default(),
        files: FilesConfig::default(),
        messages: crate::messages::MessagesConfig::default(),
        mailbox: crate::mailbox::MailboxConfig::default(),
        maintenance_interval: MAINTENANCE_INTERVAL,
        ble: None,
        relays: Vec::new(),
        kad_mode: KadMode::default(),
        kad_bucket_size: libp2p::kad::K_VALUE.get(),
        nat: NatConfig::default(),
        onion: crate::onion::OnionConfig::default(),
    }
}

/// Stretches every protocol timer of `behaviour` and `node` by `dilation`
/// (the simulator's time dilation; 1 leaves them as they are).
fn dilate(behaviour: &mut BehaviourConfig, node: &mut NodeConfig, dilation: f64) {
    let scale = |d: Duration| d.mul_f64(dilation);
    behaviour.gossip.heartbeat = scale(behaviour.gossip.heartbeat);
    behaviour.gossip.heartbeat_initial_delay = scale(behaviour.gossip.heartbeat_initial_delay);
    behaviour.sync_timeout = scale(behaviour.sync_timeout);
    // A ping that fails closes its connection: undilated, the slowed
    // model's farthest round trips (with a busy host) lost connections.
    behaviour.ping_interval = scale(behaviour.ping_interval);
    behaviour.ping_timeout = scale(behaviour.ping_timeout);
    // libp2p's fixed 10 s for a stream's negotiation, of every protocol
    // (a failed ping negotiation closes the connection as well).
    behaviour.negotiation_timeout = scale(behaviour.negotiation_timeout);
    // Kademlia's: undilated, a lookup stopped after 1.5 model seconds at
    // dilation 20, and a request to a far region, over a new stream, could
    // not come back within its 10 s (0.5 model seconds).
    behaviour.kad_query_timeout = scale(behaviour.kad_query_timeout);
    behaviour.kad_request_timeout = scale(behaviour.kad_request_timeout);
    node.groups.sync_interval = scale(node.groups.sync_interval);
    node.groups.outbox_interval = scale(node.groups.outbox_interval);
    // Undilated, a member that had not received a group's 172 KB log
    // within 0.5 model seconds (at dilation 20; 1000 members asking at
    // once) asked another member, and another.
    node.groups.join_fetch_retry = scale(node.groups.join_fetch_retry);
    node.maintenance_interval = scale(node.maintenance_interval);
    // The mailbox's periodic lookups: undilated, each node's pickups
    // (two Kademlia lookups a minute) came ten times as often in model
    // time, and their dials piled up connections.
    node.mailbox.recheck = scale(node.mailbox.recheck);
    node.mailbox.pickup = scale(node.mailbox.pickup);
    node.mailbox.deposit_after = node.mailbox.deposit_after.map(scale);
    let t = &mut node.messages.timeouts;
    let scale_ms = |ms: u64| (ms as f64 * dilation) as u64;
    t.internet_ms = scale_ms(t.internet_ms);
    t.ble_ms = scale_ms(t.ble_ms);
    t.onion_ms = scale_ms(t.onion_ms);
    node.onion.mean_delay_ms = scale_ms(node.onion.mean_delay_ms);
    node.onion.stream_idle = scale(node.onion.stream_idle);
    // Undilated, opening a mix stream (a dial, for a packet) had half a
    // model second at dilation 20, less than a far region's round trips.
    node.onion.open_timeout = scale(node.onion.open_timeout);
    node.onion.cover_rate /= dilation;
    behaviour.dm_ble_timeout = scale(behaviour.dm_ble_timeout);
}

/// One observer calling each of `extra` after `first`.
fn merge_observers(
    first: Option<GossipObserver>,
    extra: Vec<GossipObserver>,
) -> Option<GossipObserver> {
    let all: Vec<GossipObserver> = first.into_iter().chain(extra).collect();
    match all.len() {
        0 => None,
        1 => all.into_iter().next(),
        _ => Some(Arc::new(move |data: &[u8]| {
            for o in &all {
                o(data);
            }
        })),
    }
}

/// The swarm over the chosen transports. (The builder's phases are
/// distinct types, hence one macro for the common tail.)
fn build_swarm(
    key: &Keypair,
    (internet, tcp_port_reuse): (Internet, bool),
    radio: Option<Arc<dyn Radio>>,
    behaviour: &BehaviourConfig,
    idle_timeout: Duration,
    connection_timeout: Duration,
    registry: &mut libp2p::metrics::Registry,
) -> anyhow::Result<libp2p::Swarm<Behaviour>> {
    macro_rules! finish {
        ($builder:expr, $make:expr) => {
            $builder
                .with_bandwidth_metrics(registry)
                .with_behaviour($make)
                .map_err(|e| anyhow::anyhow!("cannot build the node's behaviours: {e}"))?
                .with_swarm_config(|c| c.with_idle_connection_timeout(idle_timeout))
                .with_connection_timeout(connection_timeout)
                .build()
        };
    }
    let make = |key: &Keypair, relay: Option<libp2p::relay::client::Behaviour>| {
        Composed::new(key, behaviour, relay)
            .map(|b| Behaviour::new(b, behaviour.negotiation_timeout))
            .map_err(|e| Box::new(e) as BoxError)
    };
    let builder = SwarmBuilder::with_existing_identity(key.clone()).with_tokio();
    let swarm = match internet {
        Internet::Host => {
            // The relay client's transport comes after BLE's (a circuit
            // is dialled through an IP connection to the relay) and DNS.
            macro_rules! host {
                ($ip:expr) => {
                    match radio {
                        Some(radio) => finish!(
                            $ip.with_other_transport(|key| ble_transport(key, radio))?
                                .with_dns()?
                                .with_relay_client(noise::Config::new, yamux::Config::default)?,
                            |key, relay| make(key, Some(relay))
                        ),
                        None => finish!(
                            $ip.with_dns()?
                                .with_relay_client(noise::Config::new, yamux::Config::default)?,
                            |key, relay| make(key, Some(relay))
                        ),
                    }
                };
            }
            let tcp = tcp::Config::default().nodelay(true);
            if tcp_port_reuse {
                host!(
                    builder
                        .with_tcp(tcp, noise::Config::new, yamux::Config::default)?
                        .with_quic()
                )
            } else {
                host!(builder.with_quic().with_other_transport(move |key| {
                    secure(
                        NewPorts(tcp::tokio::Transport::new(tcp)),
                        key,
                        connection_timeout,
                    )
                })?)
            }
        }
        // A modelled network has no NAT: no relay client.
        Internet::Custom(raw) => {
            finish!(
                builder.with_other_transport(move |key| {
                    let ip = secure(raw, key, connection_timeout)?;
                    Ok::<_, BoxError>(match radio {
                        Some(radio) => ip
                            .or_transport(ble_transport(key, radio)?)
                            .map(|either, _| either.into_inner())
                            .boxed(),
                        None => ip,
                    })
                })?,
                |key| make(key, None)
            )
        }
        Internet::Off => match radio {
            Some(radio) => finish!(
                builder.with_other_transport(|key| ble_transport(key, radio))?,
                |key| make(key, None)
            ),
            None => anyhow::bail!("no transport is on (--no-internet without --ble)"),
        },
    };
    Ok(swarm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The simulator's dilation stretches Kademlia's lookup and request
    /// timeouts, and the wait for a group's log, with the other protocol
    /// timers.
    #[test]
    fn dilation_stretches_kademlia_timeouts() {
        let (mut behaviour, mut node) = (BehaviourConfig::default(), default_node_config());
        let before = behaviour.clone();
        let join_fetch_retry = node.groups.join_fetch_retry;
        dilate(&mut behaviour, &mut node, 20.0);
        assert_eq!(node.groups.join_fetch_retry, join_fetch_retry * 20);
        assert_eq!(node.onion.open_timeout, crate::onion::OPEN_TIMEOUT * 20);
        assert_eq!(behaviour.kad_query_timeout, before.kad_query_timeout * 20);
        assert_eq!(
            behaviour.kad_request_timeout,
            before.kad_request_timeout * 20
        );
        assert_eq!(behaviour.ping_timeout, before.ping_timeout * 20);
        let (mut same, mut node) = (BehaviourConfig::default(), default_node_config());
        dilate(&mut same, &mut node, 1.0);
        assert_eq!(same.kad_query_timeout, Duration::from_secs(30));
    }
}
