//! The data the node reports: node events, status and peers. These are the
//! JSON bodies of the local API and what `--json` prints, so changing a
//! field name is an API change.

use serde::{Deserialize, Serialize};

/// Something that happened in the node, as streamed by `/v1/events` and
/// `fogmesh events`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum NodeEvent {
    /// The node listens on a new address.
    ListenAddr {
        /// The address.
        addr: String,
    },
    /// A connection to a peer was established (the first one to that peer).
    PeerConnected {
        /// The peer.
        peer_id: String,
        /// The remote address of the connection.
        addr: String,
        /// `tcp`, `quic`, `ble`, `memory` or `other`.
        transport: String,
        /// `inbound` or `outbound`.
        direction: String,
    },
    /// The last connection to a peer closed.
    PeerDisconnected {
        /// The peer.
        peer_id: String,
    },
    /// A peer was discovered.
    PeerDiscovered {
        /// The peer.
        peer_id: String,
        /// Addresses it was found at.
        addrs: Vec<String>,
        /// `mdns` or `kad`.
        via: String,
    },
    /// Events were dropped because the consumer was too slow.
    Lagged {
        /// How many.
        missed: u64,
    },
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// This node's peer id.
    pub peer_id: String,
    /// The node's software version.
    pub version: String,
    /// Addresses the node listens on.
    pub listen_addrs: Vec<String>,
    /// Address (host:port) of the local API.
    pub api_addr: String,
    /// Number of peers with at least one connection.
    pub connected_peers: usize,
    /// Peers in the Kademlia routing table.
    pub routing_table_peers: usize,
    /// Seconds since the node started.
    pub uptime_secs: u64,
    /// Routes the node can use now (see the routing policy).
    pub routes: Vec<String>,
}

/// One connected peer, in `GET /v1/peers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer.
    pub peer_id: String,
    /// Remote addresses of the connections to it.
    pub addrs: Vec<String>,
    /// Transport of the first connection: `tcp`, `quic`, `ble`, `memory` or
    /// `other`.
    pub transport: String,
    /// Agent version from identify, once known.
    pub agent: Option<String>,
    /// Last measured round-trip time, in milliseconds.
    pub rtt_ms: Option<f64>,
}

/// `POST /v1/connect` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectRequest {
    /// The multiaddr to dial, with or without `/p2p/<id>`.
    pub addr: String,
}

/// `POST /v1/connect` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectResponse {
    /// The peer that answered.
    pub peer_id: String,
    /// The route the policy chose.
    pub route: String,
}

/// The error body of every API error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, for a human.
    pub error: String,
}
