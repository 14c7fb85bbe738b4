//! The node's composed libp2p behaviour and how it is built.
//!
//! The behaviour is independent of the transport, so the daemon (TCP and
//! QUIC) and the simulator (an in-memory transport) build it the same way.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::{StreamProtocol, connection_limits, identify, kad, mdns, ping};

/// Our Kademlia protocol name: a private DHT of fogmesh nodes, not the IPFS
/// one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/fogmesh/kad/1.0.0");
/// Our identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/fogmesh/id/1.0.0";

/// The agent version this node announces through identify.
pub fn agent_version() -> String {
    format!("fogmesh/{}", env!("CARGO_PKG_VERSION"))
}

/// Knobs of the behaviour that differ between the daemon, tests and the
/// simulator.
#[derive(Debug, Clone)]
pub struct BehaviourConfig {
    /// Run mDNS discovery.
    pub mdns: bool,
    /// Established connections allowed in total.
    pub max_connections: u32,
    /// How often Kademlia re-runs a bootstrap query.
    pub kad_bootstrap_interval: Duration,
}

impl Default for BehaviourConfig {
    fn default() -> Self {
        BehaviourConfig {
            mdns: true,
            max_connections: 200,
            kad_bootstrap_interval: Duration::from_secs(300),
        }
    }
}

pub use composed::{Behaviour, BehaviourEvent};

// The derive generates `BehaviourEvent` with one undocumented variant per
// field; the fields' docs say what each is.
#[allow(missing_docs)]
mod composed {
    use libp2p::swarm::NetworkBehaviour;
    use libp2p::swarm::behaviour::toggle::Toggle;
    use libp2p::{connection_limits, identify, kad, mdns, ping};

    /// Every behaviour of a fogmesh node, composed. The order matters:
    /// connection limits are checked first.
    #[derive(NetworkBehaviour)]
    #[allow(missing_debug_implementations)]
    pub struct Behaviour {
        /// Caps on pending and established connections.
        pub limits: connection_limits::Behaviour,
        /// Exchanges listen addresses and protocols with every peer.
        pub identify: identify::Behaviour,
        /// Liveness and round-trip times.
        pub ping: ping::Behaviour,
        /// Peer (and later provider) discovery.
        pub kad: kad::Behaviour<kad::store::MemoryStore>,
        /// LAN discovery, when enabled.
        pub mdns: Toggle<mdns::tokio::Behaviour>,
    }
}

impl Behaviour {
    /// Builds the behaviour for the node with identity `key`.
    pub fn new(key: &Keypair, cfg: &BehaviourConfig) -> std::io::Result<Self> {
        let peer_id = key.public().to_peer_id();
        let max = cfg.max_connections;
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(max))
            .with_max_established_incoming(Some(max.saturating_mul(3) / 4))
            .with_max_pending_incoming(Some(64))
            .with_max_pending_outgoing(Some(64))
            // One connection per transport (TCP, QUIC, BLE), plus one for a
            // simultaneous dial.
            .with_max_established_per_peer(Some(4));

        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), key.public())
                .with_agent_version(agent_version())
                .with_push_listen_addr_updates(true),
        );

        let mut kad_cfg = kad::Config::new(KAD_PROTOCOL);
        kad_cfg
            .set_query_timeout(Duration::from_secs(30))
            .set_periodic_bootstrap_interval(Some(cfg.kad_bootstrap_interval));
        let mut kad =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_cfg);
        // Every fogmesh node serves the DHT: without this, Kademlia waits for
        // a confirmed external address, which nodes on a LAN or loopback
        // never get.
        kad.set_mode(Some(kad::Mode::Server));

        let mdns = if cfg.mdns {
            Some(mdns::tokio::Behaviour::new(
                mdns::Config::default(),
                peer_id,
            )?)
        } else {
            None
        };

        Ok(Behaviour {
            limits: connection_limits::Behaviour::new(limits),
            identify,
            ping: ping::Behaviour::new(ping::Config::new()),
            kad,
            mdns: mdns.into(),
        })
    }
}
