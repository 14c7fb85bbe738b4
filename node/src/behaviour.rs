//! The node's composed libp2p behaviour and how it is built.
//!
//! The behaviour is independent of the transport, so the daemon (TCP and
//! QUIC) and the simulator (an in-memory transport) build it the same way.

use std::time::Duration;

use fogmesh_protocols::groups::wire::{MAX_SYNC_REQUEST_SIZE, MAX_SYNC_RESPONSE_SIZE};
use libp2p::gossipsub::{self, AllowAllSubscriptionFilter, MaxCountSubscriptionFilter};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::{StreamProtocol, autonat, connection_limits, dcutr, identify, kad, mdns, ping, relay};
use sha2::{Digest, Sha256};

use crate::codec::{Frame, FrameCodec};
use crate::kad_store::ProviderStore;

/// Our Kademlia protocol name: a private DHT of fogmesh nodes, not the IPFS
/// one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/fogmesh/kad/1.0.0");
/// Our identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/fogmesh/id/1.0.0";

/// The group catch-up protocol.
pub const GROUP_SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/fogmesh/group-sync/2");
/// Largest gossip message: a membership op of a 1000-member group is about
/// 172 KiB, a text message at most 64 KiB plus overhead.
pub const MAX_GOSSIP_SIZE: usize = 512 * 1024;
/// Topics a peer may be subscribed to, and may list in one SUBSCRIBE: one
/// topic per group, so the gossipsub default of 100 is too low.
pub const MAX_TOPICS: usize = 10_000;

/// The subscription filter: any topic, but a bounded number of them.
pub type SubscriptionFilter = MaxCountSubscriptionFilter<AllowAllSubscriptionFilter>;

/// One frame of the group sync protocol: an encoded
/// `fogmesh_protocols::groups::SyncRequest` or `SyncResponse`, decoded with
/// that crate's size-checked decoders.
#[derive(Debug, Clone)]
pub struct SyncFrame(pub Vec<u8>);

impl Frame for SyncFrame {
    fn from_bytes(bytes: Vec<u8>) -> Self {
        SyncFrame(bytes)
    }
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// Gossipsub's mesh parameters (the names are the gossipsub spec's).
#[derive(Debug, Clone)]
pub struct GossipParams {
    /// D: the mesh degree aimed at.
    pub mesh_n: usize,
    /// D_low: below this, the mesh grafts.
    pub mesh_n_low: usize,
    /// D_high: above this, the mesh prunes.
    pub mesh_n_high: usize,
    /// D_out: outbound peers kept in the mesh.
    pub mesh_outbound_min: usize,
    /// D_lazy: peers told of messages (IHAVE) outside the mesh.
    pub gossip_lazy: usize,
    /// Mesh maintenance interval.
    pub heartbeat: Duration,
    /// Delay before the first heartbeat.
    pub heartbeat_initial_delay: Duration,
    /// Publish own messages to every subscribed peer, not only the mesh.
    pub flood_publish: bool,
}

impl Default for GossipParams {
    /// Gossipsub's defaults, except a shorter initial delay (1 s, not 5 s):
    /// a node should be ready to carry group messages soon after start.
    fn default() -> Self {
        GossipParams {
            mesh_n: 6,
            mesh_n_low: 5,
            mesh_n_high: 12,
            mesh_outbound_min: 2,
            gossip_lazy: 6,
            heartbeat: Duration::from_secs(1),
            heartbeat_initial_delay: Duration::from_secs(1),
            flood_publish: true,
        }
    }
}

/// See [`BehaviourConfig::gossip_observer`].
pub type GossipObserver = std::sync::Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Gossipsub's data transform: no transformation, but every message
/// received on the wire is shown to the observer first. Gossipsub calls it
/// before its duplicate check, so duplicates are seen too.
#[derive(Clone, Default)]
pub struct ObservingTransform {
    observer: Option<GossipObserver>,
}

impl std::fmt::Debug for ObservingTransform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservingTransform")
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

impl gossipsub::DataTransform for ObservingTransform {
    fn inbound_transform(
        &self,
        raw: gossipsub::RawMessage,
    ) -> Result<gossipsub::Message, std::io::Error> {
        if let Some(o) = &self.observer {
            o(&raw.data);
        }
        Ok(gossipsub::Message {
            source: raw.source,
            data: raw.data,
            sequence_number: raw.sequence_number,
            topic: raw.topic,
        })
    }

    fn outbound_transform(
        &self,
        _topic: &gossipsub::TopicHash,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, std::io::Error> {
        Ok(data)
    }
}

/// One frame of the file protocol: an encoded
/// `fogmesh_protocols::files::Request` or `Response`, decoded with that
/// crate's size-checked decoders.
#[derive(Debug, Clone)]
pub struct FileFrame(pub Vec<u8>);

impl Frame for FileFrame {
    fn from_bytes(bytes: Vec<u8>) -> Self {
        FileFrame(bytes)
    }
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// The file transfer protocol.
pub const FILE_PROTOCOL: StreamProtocol = StreamProtocol::new(fogmesh_protocols::files::PROTOCOL);

/// One frame of the direct-message protocols: an encoded
/// `fogmesh_protocols::messages::Envelope` (request) or `Ack` (response),
/// decoded with that crate's size-checked decoders.
#[derive(Debug, Clone)]
pub struct DmFrame(pub Vec<u8>);

impl Frame for DmFrame {
    fn from_bytes(bytes: Vec<u8>) -> Self {
        DmFrame(bytes)
    }
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// One frame of the mailbox protocol: an encoded
/// `fogmesh_protocols::mailbox::Request` or `Response`, decoded with that
/// crate's size-checked decoders.
#[derive(Debug, Clone)]
pub struct MailboxFrame(pub Vec<u8>);

impl Frame for MailboxFrame {
    fn from_bytes(bytes: Vec<u8>) -> Self {
        MailboxFrame(bytes)
    }
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// Mailboxes: deposits, fetches and deletes at holders and couriers.
pub const MAILBOX_PROTOCOL: StreamProtocol =
    StreamProtocol::new(fogmesh_protocols::mailbox::PROTOCOL);

/// Direct messages over internet connections.
pub const DM_PROTOCOL: StreamProtocol = StreamProtocol::new(fogmesh_protocols::messages::PROTOCOL);
/// Direct messages over BLE connections.
pub const DM_BLE_PROTOCOL: StreamProtocol =
    StreamProtocol::new(fogmesh_protocols::messages::BLE_PROTOCOL);
/// Announced (inbound only) by gateways: nodes with both internet and BLE.
pub const DM_GATEWAY_PROTOCOL: StreamProtocol =
    StreamProtocol::new(fogmesh_protocols::messages::GATEWAY_PROTOCOL);

/// The agent version this node announces through identify.
pub fn agent_version() -> String {
    format!("fogmesh/{}", env!("CARGO_PKG_VERSION"))
}

/// Which Kademlia mode the node runs (`--kad-mode`).
///
/// A Kademlia server answers DHT queries and is put in other nodes'
/// routing tables; a node nobody can dial must not be one (its address
/// would send every querier into a timeout).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum KadMode {
    /// Follow reachability: server when AutoNAT confirmed a public
    /// address, client when it found the node private, and, while it does
    /// not know, server only on a network where AutoNAT cannot judge (no
    /// peer on a public address: a LAN, loopback, the simulator).
    #[default]
    Auto,
    /// Always serve the DHT (the behaviour before reachability existed).
    Server,
    /// Never serve the DHT.
    Client,
}

impl std::fmt::Display for KadMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KadMode::Auto => "auto",
            KadMode::Server => "server",
            KadMode::Client => "client",
        })
    }
}

/// NAT traversal settings: AutoNAT, circuit relay v2 (client and server)
/// and hole punching (DCUtR).
#[derive(Debug, Clone)]
pub struct NatConfig {
    /// Run AutoNAT (v1: asks peers to dial back, and answers their asks).
    pub autonat: bool,
    /// AutoNAT treats private and loopback IPs like public ones: for test
    /// topologies and LANs built of private ranges. Off on the internet,
    /// where a private address is never a reachable one.
    pub autonat_private_addrs: bool,
    /// Offer circuit relaying to others, once AutoNAT confirmed a public,
    /// non-relayed address.
    pub relay_server: bool,
    /// Delay before the first AutoNAT probe.
    pub autonat_boot_delay: Duration,
    /// Interval between AutoNAT probes while the status is not settled.
    pub autonat_retry_interval: Duration,
    /// How long a reservation on the relay server lasts.
    pub relay_reservation: Duration,
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            autonat: true,
            autonat_private_addrs: false,
            relay_server: false,
            autonat_boot_delay: Duration::from_secs(5),
            autonat_retry_interval: Duration::from_secs(30),
            relay_reservation: crate::config::DEFAULT_RELAY_RESERVATION,
        }
    }
}

/// Knobs of the behaviour that differ between the daemon, tests and the
/// simulator.
#[derive(Clone)]
pub struct BehaviourConfig {
    /// Run mDNS discovery.
    pub mdns: bool,
    /// Established connections allowed in total.
    pub max_connections: u32,
    /// How often Kademlia re-runs a bootstrap query; `None` turns the
    /// periodic walk off (Kademlia still walks when its routing table is
    /// small and a peer is added).
    pub kad_bootstrap_interval: Option<Duration>,
    /// Gossipsub parameters.
    pub gossip: GossipParams,
    /// Called with the data of every gossip message received on the wire,
    /// duplicates included (the simulator's and `--event-log`'s "Received
    /// Message").
    pub gossip_observer: Option<GossipObserver>,
    /// Timeout of one group sync exchange.
    pub sync_timeout: Duration,
    /// Backstop timeout of one file request.
    pub file_request_timeout: Duration,
    /// Identify tells peers only the node's external addresses, not its
    /// listen addresses: on with BLE, whose addresses must never reach
    /// internet peers (the node marks its IP listen addresses external).
    pub hide_listen_addrs: bool,
    /// Kademlia's mode (see [`KadMode`]).
    pub kad_mode: KadMode,
    /// AutoNAT, relaying and hole punching.
    pub nat: NatConfig,
    /// Timeout of one hop of a direct message over BLE (the hop's ack,
    /// not the receipt).
    pub dm_ble_timeout: Duration,
    /// Announce [`DM_GATEWAY_PROTOCOL`]: this node has internet and BLE and
    /// carries direct messages between them (set by the builder).
    pub dm_gateway: bool,
    /// How often each connection is pinged (libp2p's 15 s by default).
    pub ping_interval: Duration,
    /// How long a ping may take before it fails, and the connection with
    /// it (libp2p's 20 s by default; stretched by the time dilation).
    pub ping_timeout: Duration,
    /// The least time any stream's protocol negotiation may take
    /// (libp2p's 10 s; stretched by the time dilation, see
    /// `crate::negotiation`).
    pub negotiation_timeout: Duration,
    /// How long one Kademlia lookup may run before it ends with the peers
    /// it found so far (30 s; stretched by the time dilation).
    pub kad_query_timeout: Duration,
    /// How long one Kademlia request to one peer may take, stream
    /// included (libp2p's 10 s; stretched by the time dilation).
    pub kad_request_timeout: Duration,
    /// Peers per Kademlia bucket (k, 20 by default). Kademlia allocates
    /// all 256 buckets whole at start (about 1.6 MB at k = 20): the
    /// simulator, which runs a thousand nodes in one process, keeps fewer.
    pub kad_bucket_size: std::num::NonZeroUsize,
}

/// Stretches the timeouts of a configuration to a BLE link's speed: a full
/// group sync response or file request must fit in one timeout over one
/// link.
pub fn scale_for_ble(cfg: BehaviourConfig, link: fogmesh_ble::LinkLimits) -> BehaviourConfig {
    let sync = link.timeout_for(fogmesh_protocols::groups::wire::MAX_SYNC_RESPONSE_SIZE as u64);
    BehaviourConfig {
        sync_timeout: cfg.sync_timeout.max(sync),
        file_request_timeout: cfg.file_request_timeout.max(sync * 2),
        hide_listen_addrs: true,
        ..cfg
    }
}

impl std::fmt::Debug for BehaviourConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BehaviourConfig")
            .field("mdns", &self.mdns)
            .field("max_connections", &self.max_connections)
            .field("gossip", &self.gossip)
            .field("gossip_observer", &self.gossip_observer.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for BehaviourConfig {
    fn default() -> Self {
        BehaviourConfig {
            mdns: true,
            max_connections: 200,
            kad_bootstrap_interval: Some(Duration::from_secs(300)),
            gossip: GossipParams::default(),
            gossip_observer: None,
            sync_timeout: Duration::from_secs(60),
            file_request_timeout: Duration::from_secs(300),
            hide_listen_addrs: false,
            kad_mode: KadMode::Auto,
            nat: NatConfig::default(),
            dm_ble_timeout: Duration::from_secs(30),
            dm_gateway: false,
            ping_interval: Duration::from_secs(15),
            ping_timeout: Duration::from_secs(20),
            negotiation_timeout: crate::negotiation::NEGOTIATION_TIMEOUT,
            kad_query_timeout: Duration::from_secs(30),
            kad_request_timeout: Duration::from_secs(10),
            kad_bucket_size: kad::K_VALUE,
        }
    }
}

pub use composed::{Behaviour as Composed, BehaviourEvent};

/// The swarm's behaviour: every behaviour of a node ([`Composed`]), each
/// stream's protocol negotiation given at least
/// [`BehaviourConfig::negotiation_timeout`] (see `crate::negotiation`).
/// Derefs to [`Composed`].
pub type Behaviour = crate::negotiation::Floor<Composed>;

// The derive generates `BehaviourEvent` with one undocumented variant per
// field; the fields' docs say what each is.
#[allow(missing_docs)]
mod composed {
    use libp2p::swarm::NetworkBehaviour;
    use libp2p::swarm::behaviour::toggle::Toggle;
    use libp2p::{
        autonat, connection_limits, dcutr, gossipsub, identify, kad, mdns, ping, relay,
        request_response,
    };

    /// Every behaviour of a fogmesh node, composed. The order matters:
    /// connection limits are checked first.
    #[derive(NetworkBehaviour)]
    #[allow(missing_debug_implementations)]
    pub struct Behaviour {
        /// Caps on pending and established connections.
        pub limits: connection_limits::Behaviour,
        /// Exchanges listen addresses and protocols with every peer.
        pub identify: identify::Behaviour,
        /// Liveness and round-trip times (its streams do not keep a
        /// connection open, see `crate::keep_alive`).
        pub ping: crate::keep_alive::IdleStreams<ping::Behaviour>,
        /// Peer and provider discovery; the store caps what it holds for
        /// others (see `crate::kad_store`).
        pub kad: kad::Behaviour<crate::kad_store::ProviderStore>,
        /// LAN discovery, when enabled.
        pub mdns: Toggle<mdns::tokio::Behaviour>,
        /// Group messages: one topic per group, messages validated by the
        /// groups actor before they are forwarded. Its streams do not keep
        /// a connection open, its mesh does (see `crate::keep_alive`).
        pub gossipsub: crate::keep_alive::IdleStreams<
            gossipsub::Behaviour<super::ObservingTransform, super::SubscriptionFilter>,
        >,
        /// Group catch-up (anti-entropy): summaries and fetches.
        pub group_sync: request_response::Behaviour<
            crate::codec::FrameCodec<super::SyncFrame, super::SyncFrame>,
        >,
        /// File transfer: manifests, have-maps and chunks.
        pub files: request_response::Behaviour<
            crate::codec::FrameCodec<super::FileFrame, super::FileFrame>,
        >,
        /// AutoNAT v1: is this node reachable from the internet?
        pub autonat: Toggle<autonat::Behaviour>,
        /// Circuit relay v2 client: reservations on relays, relayed dials
        /// (present with an IP transport).
        pub relay_client: Toggle<relay::client::Behaviour>,
        /// Circuit relay v2 server (`--relay-server`); offered only while
        /// AutoNAT confirms a public, non-relayed address.
        pub relay_server: Toggle<relay::Behaviour>,
        /// Hole punching: upgrades a relayed connection to a direct one.
        pub dcutr: Toggle<dcutr::Behaviour>,
        /// Direct messages over internet connections only.
        pub dm: crate::only_on::OnlyOn<
            request_response::Behaviour<crate::codec::FrameCodec<super::DmFrame, super::DmFrame>>,
        >,
        /// Direct messages over BLE connections only.
        pub dm_ble: crate::only_on::OnlyOn<
            request_response::Behaviour<crate::codec::FrameCodec<super::DmFrame, super::DmFrame>>,
        >,
        /// Mailboxes: sealed envelopes held for offline recipients (any
        /// connection: holders over the internet, couriers over BLE).
        pub mailbox: request_response::Behaviour<
            crate::codec::FrameCodec<super::MailboxFrame, super::MailboxFrame>,
        >,
        /// The onion route's mix streams (`/fogmesh/mix/1`), on internet
        /// connections only; the onion task drives them through a
        /// `libp2p_stream::Control`.
        pub mix: crate::only_on::OnlyOn<libp2p_stream::Behaviour>,
        /// Holds open the connections to the peers the operator asked for
        /// and every BLE link.
        pub keep: crate::keep_alive::Keep,
    }
}

impl Composed {
    /// Builds the behaviour for the node with identity `key`; `relay_client`
    /// is the relay client the swarm builder made with its transport (none
    /// without an IP transport: no relaying, no hole punching).
    pub fn new(
        key: &Keypair,
        cfg: &BehaviourConfig,
        relay_client: Option<relay::client::Behaviour>,
    ) -> std::io::Result<Self> {
        let peer_id = key.public().to_peer_id();
        let max = cfg.max_connections;
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(max))
            .with_max_established_incoming(Some(max.saturating_mul(3) / 4))
            .with_max_pending_incoming(Some(64))
            .with_max_pending_outgoing(Some(64))
            // One connection per transport (TCP, QUIC, BLE), plus one for a
            // simultaneous dial, plus room for AutoNAT: each dial-back is a
            // new connection (idle ones close after the idle timeout), and a
            // dial-back refused by this limit reads as "not reachable" to
            // the peer asking.
            .with_max_established_per_peer(Some(8));

        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), key.public())
                .with_agent_version(agent_version())
                .with_push_listen_addr_updates(true)
                .with_hide_listen_addrs(cfg.hide_listen_addrs),
        );

        let kad = kademlia(peer_id, cfg);

        let mdns = if cfg.mdns {
            Some(mdns::tokio::Behaviour::new(
                mdns::Config::default(),
                peer_id,
            )?)
        } else {
            None
        };

        let gossipsub = crate::keep_alive::IdleStreams::new(gossipsub_behaviour(key, cfg)?);
        let group_sync = request_response::Behaviour::with_codec(
            FrameCodec::new(MAX_SYNC_REQUEST_SIZE, MAX_SYNC_RESPONSE_SIZE),
            [(GROUP_SYNC_PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(cfg.sync_timeout)
                .with_max_concurrent_streams(64),
        );

        let files = request_response::Behaviour::with_codec(
            FrameCodec::new(
                fogmesh_protocols::files::MAX_REQUEST_SIZE,
                fogmesh_protocols::files::MAX_RESPONSE_SIZE,
            ),
            [(FILE_PROTOCOL, ProtocolSupport::Full)],
            // The scheduler times chunks out itself, from measured rates;
            // this is only the backstop for a request that never ends.
            request_response::Config::default()
                .with_request_timeout(cfg.file_request_timeout)
                .with_max_concurrent_streams(256),
        );

        let (dm, dm_ble) = dm_behaviours(cfg);
        let (autonat, relay_server) = nat_behaviours(peer_id, &cfg.nat);
        let dcutr = relay_client
            .is_some()
            .then(|| dcutr::Behaviour::new(peer_id));
        Ok(Composed {
            autonat: autonat.into(),
            relay_client: relay_client.into(),
            relay_server: relay_server.into(),
            dcutr: dcutr.into(),
            limits: connection_limits::Behaviour::new(limits),
            identify,
            ping: crate::keep_alive::IdleStreams::new(ping::Behaviour::new(
                ping::Config::new()
                    .with_interval(cfg.ping_interval)
                    .with_timeout(cfg.ping_timeout),
            )),
            kad,
            mdns: mdns.into(),
            gossipsub,
            group_sync,
            files,
            dm: crate::only_on::OnlyOn::new(dm, |a| !fogmesh_ble::is_ble(a)),
            dm_ble: crate::only_on::OnlyOn::new(dm_ble, fogmesh_ble::is_ble),
            mailbox: mailbox_behaviour(cfg),
            mix: crate::only_on::OnlyOn::new(libp2p_stream::Behaviour::new(), |a| {
                !fogmesh_ble::is_ble(a)
            }),
            keep: crate::keep_alive::Keep::default(),
        })
    }
}

/// One direct-message request-response behaviour.
type DmBehaviour = request_response::Behaviour<FrameCodec<DmFrame, DmFrame>>;

/// The two direct-message behaviours: internet (with the gateway mark when
/// this node is one) and BLE. Each hop answers at once with an ack, so the
/// timeouts cover one hop, not the receipt.
fn dm_behaviours(cfg: &BehaviourConfig) -> (DmBehaviour, DmBehaviour) {
    use fogmesh_protocols::messages::wire::{MAX_ACK, MAX_ENVELOPE};
    let mut protocols = vec![(DM_PROTOCOL, ProtocolSupport::Full)];
    if cfg.dm_gateway {
        protocols.push((DM_GATEWAY_PROTOCOL, ProtocolSupport::Inbound));
    }
    let dm = request_response::Behaviour::with_codec(
        FrameCodec::new(MAX_ENVELOPE, MAX_ACK),
        protocols,
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(10))
            .with_max_concurrent_streams(64),
    );
    let dm_ble = request_response::Behaviour::with_codec(
        FrameCodec::new(MAX_ENVELOPE, MAX_ACK),
        [(DM_BLE_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(cfg.dm_ble_timeout)
            .with_max_concurrent_streams(32),
    );
    (dm, dm_ble)
}

/// The mailbox request-response behaviour: a deposit of up to 16 KiB or
/// a fetch answer of up to 16 of them must fit one timeout over BLE too.
fn mailbox_behaviour(
    cfg: &BehaviourConfig,
) -> request_response::Behaviour<FrameCodec<MailboxFrame, MailboxFrame>> {
    use fogmesh_protocols::mailbox::{MAX_REQUEST, MAX_RESPONSE};
    request_response::Behaviour::with_codec(
        FrameCodec::new(MAX_REQUEST, MAX_RESPONSE),
        [(MAILBOX_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(cfg.dm_ble_timeout.max(Duration::from_secs(30)))
            .with_max_concurrent_streams(32),
    )
}

/// AutoNAT v1 and, with `--relay-server`, the relay server (disabled until
/// the event loop sees a public address confirmed).
///
/// Why AutoNAT v1 and not v2: v1 gives one overall status (public,
/// private, unknown) with a confidence, which is what Kademlia's mode and
/// the choice to reserve relay slots need, and it re-tests on its own at
/// a fixed interval; v2's client never re-tests an address after it
/// expires (rust-libp2p issue 6203), so a node whose NAT changes would keep
/// a stale answer.
fn nat_behaviours(
    peer_id: libp2p::PeerId,
    nat: &NatConfig,
) -> (Option<autonat::Behaviour>, Option<relay::Behaviour>) {
    let autonat = nat.autonat.then(|| {
        autonat::Behaviour::new(
            peer_id,
            autonat::Config {
                boot_delay: nat.autonat_boot_delay,
                retry_interval: nat.autonat_retry_interval,
                throttle_server_period: Duration::from_secs(15),
                only_global_ips: !nat.autonat_private_addrs,
                ..Default::default()
            },
        )
    });
    let relay_server = nat.relay_server.then(|| {
        // relay v2's defaults: 128 reservations (4 per peer) of 1 h (or
        // `--relay-reservation-secs`), 16 circuits (4 per peer) of at most
        // 2 min and 128 KiB each.
        let config = relay::Config {
            reservation_duration: nat.relay_reservation,
            ..relay::Config::default()
        };
        let mut r = relay::Behaviour::new(peer_id, config);
        // Never offered on the swarm's say-so: the swarm counts relayed
        // addresses as confirmed, which would make a relayed node a relay.
        r.set_status(Some(relay::Status::Disable));
        r
    });
    (autonat, relay_server)
}

/// Kademlia on our own protocol name, in server mode until the event
/// loop applies the configured [`KadMode`].
fn kademlia(peer_id: libp2p::PeerId, cfg: &BehaviourConfig) -> kad::Behaviour<ProviderStore> {
    let mut kad_cfg = kad::Config::new(KAD_PROTOCOL);
    kad_cfg
        .set_query_timeout(cfg.kad_query_timeout)
        .set_substreams_timeout(cfg.kad_request_timeout)
        .set_periodic_bootstrap_interval(cfg.kad_bootstrap_interval)
        .set_kbucket_size(cfg.kad_bucket_size)
        // The node puts peers in the table (`node::discovery::kad_add`).
        .set_kbucket_inserts(kad::BucketInserts::Manual);

    // One provider record per shared file, without a cap; the records
    // held for other peers are capped (ADD_PROVIDER from strangers).
    let mut kad = kad::Behaviour::with_config(peer_id, ProviderStore::new(peer_id), kad_cfg);
    // The mode is always set explicitly (never Kademlia's automatic one,
    // which counts relayed addresses as reachable); the event loop sets it
    // from `--kad-mode` and reachability.
    kad.set_mode(Some(match cfg.kad_mode {
        KadMode::Client => kad::Mode::Client,
        KadMode::Auto | KadMode::Server => kad::Mode::Server,
    }));

    kad
}

fn gossipsub_behaviour(
    key: &Keypair,
    cfg: &BehaviourConfig,
) -> std::io::Result<gossipsub::Behaviour<ObservingTransform, SubscriptionFilter>> {
    let config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(cfg.gossip.heartbeat)
        .heartbeat_initial_delay(cfg.gossip.heartbeat_initial_delay)
        .mesh_n(cfg.gossip.mesh_n)
        .mesh_n_low(cfg.gossip.mesh_n_low)
        .mesh_n_high(cfg.gossip.mesh_n_high)
        .mesh_outbound_min(cfg.gossip.mesh_outbound_min)
        .gossip_lazy(cfg.gossip.gossip_lazy)
        .flood_publish(cfg.gossip.flood_publish)
        // Every message is signed by its publisher and checked by gossipsub;
        // the content is then checked by the groups actor before it is
        // forwarded (validate_messages).
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        // Our payloads are content-addressed: the same envelope relayed by
        // two publishers is one message.
        .message_id_fn(|m: &gossipsub::Message| gossipsub::MessageId::new(&Sha256::digest(&m.data)))
        .max_transmit_size(MAX_GOSSIP_SIZE)
        .build()
        .map_err(|e| invalid(&e.to_string()))?;
    let filter = MaxCountSubscriptionFilter {
        filter: AllowAllSubscriptionFilter {},
        max_subscribed_topics: MAX_TOPICS,
        max_subscriptions_per_request: MAX_TOPICS,
    };
    let mut gs = gossipsub::Behaviour::new_with_subscription_filter_and_transform(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        config,
        filter,
        ObservingTransform {
            observer: cfg.gossip_observer.clone(),
        },
    )
    .map_err(invalid)?;
    let mut params = gossipsub::PeerScoreParams::default();
    // Nodes on one host or LAN share an address; that is not a Sybil sign
    // for loopback.
    params
        .ip_colocation_factor_whitelist
        .insert([127, 0, 0, 1].into());
    gs.with_peer_score(params, gossipsub::PeerScoreThresholds::default())
        .map_err(|e| invalid(&e))?;
    Ok(gs)
}

fn invalid(e: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_owned())
}

/// Score parameters for a group topic. Chat traffic is sparse, so the
/// mesh-delivery penalties (P3, P3b) that suit busy topics are off; invalid
/// messages (P4) cost a lot: one is enough to fall below the graylist
/// threshold.
pub fn group_topic_score_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -100.0,
        invalid_message_deliveries_decay: 0.9,
        ..gossipsub::TopicScoreParams::default()
    }
}
