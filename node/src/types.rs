//! The data the node reports: node events, status and peers. These are the
//! JSON bodies of the local API and what `--json` prints, so changing a
//! field name is an API change.

use serde::{Deserialize, Serialize};

/// Generates a unit enum serialised as (and displayed as) fixed lowercase
/// strings: the API's values, kept in one place.
macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $variant),+
        }

        impl $name {
            /// The value as the API writes it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $s),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

string_enum! {
    /// The transport a connection runs over.
    TransportKind {
        /// TCP (with Noise and Yamux).
        Tcp = "tcp",
        /// QUIC.
        Quic = "quic",
        /// A BLE link.
        Ble = "ble",
        /// libp2p's in-memory transport (tests).
        Memory = "memory",
        /// Anything else (the simulator's modelled network).
        Other = "other",
    }
}

string_enum! {
    /// Whether the node is reachable from the internet, as AutoNAT found
    /// out.
    NatReachability {
        /// Peers dialled back a non-relayed address of this node.
        Public = "public",
        /// Dial-backs failed: the node is behind a NAT or a firewall.
        Private = "private",
        /// Not (yet) known: no probe concluded (always so on a LAN or
        /// loopback, where AutoNAT does not judge private addresses).
        Unknown = "unknown",
    }
}

string_enum! {
    /// Which side opened a connection.
    Direction {
        /// The peer dialled us.
        Inbound = "inbound",
        /// We dialled the peer.
        Outbound = "outbound",
    }
}

string_enum! {
    /// How a peer was discovered.
    DiscoveredVia {
        /// mDNS on the local network.
        Mdns = "mdns",
        /// The Kademlia DHT.
        Kad = "kad",
    }
}

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
        /// The connection's transport.
        transport: TransportKind,
        /// Who dialled.
        direction: Direction,
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
        /// How it was found.
        via: DiscoveredVia,
    },
    /// A group message was delivered (in causal order).
    GroupMessage {
        /// The group (hex).
        group_id: String,
        /// The message id (hex).
        id: String,
        /// The sender's peer id.
        sender: String,
        /// The text.
        text: String,
        /// The sender's clock at sending, ms since the Unix epoch.
        timestamp: u64,
    },
    /// This node learned of a group it is a member of, or of a change to
    /// one's membership.
    GroupUpdated {
        /// The group (hex).
        group_id: String,
        /// Whether this node is (still) a member.
        member: bool,
    },
    /// A direct message was delivered to this node (in its sender's
    /// order).
    DirectMessage {
        /// The message id (hex).
        id: String,
        /// The sender's peer id.
        from: String,
        /// The text.
        text: String,
        /// The sender's clock at sending, ms since the Unix epoch.
        timestamp: u64,
    },
    /// An outgoing direct message changed state.
    DirectMessageState {
        /// The message id (hex).
        id: String,
        /// The recipient's peer id.
        to: String,
        /// `queued`, `sent`, `delivered` or `expired`.
        state: String,
        /// The route that delivered it, once delivered.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        route: Option<String>,
    },
    /// A peer added this node to a group: the invitation waits for the
    /// user's `group accept` or `group decline` (unless its admin is
    /// trusted, when the node joins at once and no invitation is made).
    GroupInvite {
        /// The group (hex).
        group_id: String,
        /// Its name, as its admin wrote it.
        name: String,
        /// The admin, who added this node.
        inviter: String,
    },
    /// An undelivered outgoing direct message was deposited with mailbox
    /// holders (or couriers).
    MailDeposited {
        /// The message id (hex).
        id: String,
        /// The recipient's peer id.
        to: String,
        /// The holders that accepted it.
        holders: Vec<String>,
    },
    /// Mail waiting at a holder was picked up and delivered here.
    MailPickedUp {
        /// The holder it came from.
        holder: String,
        /// How many envelopes (letters and receipts).
        count: u64,
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
    /// The BLE radio, when BLE is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ble: Option<BleStatus>,
    /// Reachability from the internet (AutoNAT).
    #[serde(default = "unknown_reachability")]
    pub reachability: NatReachability,
    /// The node's confirmed external addresses, relayed ones aside: those
    /// AutoNAT confirmed (with BLE on, also the IP listen addresses, which
    /// the node announces as external so that identify hides the BLE one).
    #[serde(default)]
    pub external_addrs: Vec<String>,
    /// Relayed addresses this node holds a reservation for.
    #[serde(default)]
    pub relayed_addrs: Vec<String>,
    /// Kademlia's mode now: `server` or `client`.
    #[serde(default)]
    pub kad_mode: String,
    /// This node relays for others now (`--relay-server` and public).
    #[serde(default)]
    pub relay_server: bool,
    /// Kademlia provider records this node holds for other peers (capped:
    /// see docs/SECURITY.md).
    #[serde(default)]
    pub provider_records_for_others: usize,
    /// Sealed direct messages this node holds for others as a mailbox
    /// holder or courier (see docs/protocols/mailbox.md).
    #[serde(default)]
    pub mailbox: MailboxStatus,
}

/// `status.mailbox`: what this node holds for others.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MailboxStatus {
    /// Whether it accepts deposits (`--no-mailbox` turns it off).
    pub enabled: bool,
    /// Envelopes held.
    pub envelopes: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Envelopes deleted at a peer's request since start (their
    /// recipient picked them up, or their depositor withdrew them).
    #[serde(default)]
    pub deleted: u64,
    /// The quota, bytes (`--mailbox-quota`).
    pub quota_bytes: u64,
}

/// Outgoing messages: where the message was deposited for a recipient
/// that is offline.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MailboxDeposit {
    /// The holders (peer ids) that accepted a copy.
    pub holders: Vec<String>,
    /// When it was last deposited, ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deposited_at: Option<u64>,
    /// Why the last deposit found no holder, if it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The ids of the deposited envelopes (hex), as holders know them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub envelope_ids: Vec<String>,
}

/// `POST /v1/mailbox/delete`: ask a holder to drop envelopes. It drops
/// only those addressed to, or deposited by, this node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MailboxDeleteRequest {
    /// The holder's peer id.
    pub holder: String,
    /// Envelope ids (32 hex digits each), at most 64.
    pub ids: Vec<String>,
}

/// `POST /v1/mailbox/delete` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MailboxDeleteResponse {
    /// How many the holder dropped.
    pub deleted: u32,
}

fn unknown_reachability() -> NatReachability {
    NatReachability::Unknown
}

/// The BLE side of a node, in `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BleStatus {
    /// This radio's device address.
    pub device: String,
    /// fogmesh nodes heard advertising now.
    pub neighbours: usize,
    /// Open BLE connections.
    pub links: usize,
    /// Expected payload throughput of one link, bytes per second.
    pub link_bandwidth: u64,
}

/// One connected peer, in `GET /v1/peers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer.
    pub peer_id: String,
    /// Remote addresses of the connections to it.
    pub addrs: Vec<String>,
    /// Transport of the first connection.
    pub transport: TransportKind,
    /// Agent version from identify, once known.
    pub agent: Option<String>,
    /// Last measured round-trip time, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// The peer's gossipsub score as this node sees it (negative after
    /// invalid messages).
    pub gossip_score: Option<f64>,
    /// Every connection to the peer goes through a circuit relay (no
    /// direct one yet): bulk traffic waits.
    #[serde(default)]
    pub relayed: bool,
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

/// A group, in `GET /v1/groups` and `fogmesh group list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupInfo {
    /// The group id (64 hex characters).
    pub group_id: String,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// The admin's peer id.
    pub admin: String,
    /// Current members' peer ids.
    pub members: Vec<String>,
    /// Current key epoch (advances when a member is removed or leaves).
    pub epoch: u64,
    /// Whether this node is a member now.
    pub is_member: bool,
    /// Messages delivered so far.
    pub messages: u64,
}

/// A delivered group message, as stored and as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupMessage {
    /// Position in this node's delivery order (0-based).
    pub index: u64,
    /// The message id (hex SHA-256 of the signed envelope).
    pub id: String,
    /// The sender's peer id.
    pub sender: String,
    /// The sender's sequence number (from 1).
    pub seq: u64,
    /// The key epoch it was sent in.
    pub epoch: u64,
    /// The text.
    pub text: String,
    /// The sender's clock at sending, ms since the Unix epoch.
    pub timestamp: u64,
    /// Ids of the messages it causally follows.
    pub deps: Vec<String>,
}

/// `POST /v1/groups` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateGroup {
    /// The name (at most 64 bytes).
    pub name: String,
    /// A description (at most 512 bytes).
    #[serde(default)]
    pub description: String,
    /// Members besides the creator.
    #[serde(default)]
    pub members: Vec<String>,
}

/// `POST /v1/groups/{id}/members` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberRequest {
    /// The peer to add.
    pub peer_id: String,
}

/// `POST /v1/groups/{id}/messages` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PostMessage {
    /// The text (at most 64 KiB).
    pub text: String,
}

/// Answer of a group operation: the group and, for a post, the message id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupAck {
    /// The group.
    pub group_id: String,
    /// The message id, for a post.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<String>,
}

/// `POST /v1/files` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShareFile {
    /// Absolute path of the file to share.
    pub path: String,
    /// Share with this group only: the file is encrypted under a new key,
    /// and a message with its link and key is posted to the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// `POST /v1/files/{id}/get` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetFile {
    /// Absolute path to write the file to; empty (or absent): `downloads/<id>`
    /// in the daemon's data directory.
    #[serde(default)]
    pub output: String,
    /// The link fetched (`fogmesh-file:<id>#<key>`), whose key decrypts
    /// the file; absent: the one key received for the file, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// `POST /v1/messages` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendDirect {
    /// The recipient's peer id.
    pub to: String,
    /// The text (at most 64 KiB).
    pub text: String,
    /// `auto` (default), `internet`, `ble` or `onion`.
    #[serde(default)]
    pub route: Option<String>,
    /// Only a privacy route may carry it.
    #[serde(default)]
    pub private: bool,
}

/// The answer to `POST /v1/messages`: the message is durable here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirectAck {
    /// The message id (hex).
    pub message_id: String,
    /// The routes the policy chose, in the order they are tried.
    pub route_plan: Vec<String>,
    /// Why it cannot go out now, when that is known at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

/// A direct message, either direction, as the API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirectMessage {
    /// The message id (hex).
    pub id: String,
    /// The sender's peer id.
    pub from: String,
    /// The recipient's peer id.
    pub to: String,
    /// The text.
    pub text: String,
    /// The sender's clock at sending, ms since the Unix epoch.
    pub timestamp: u64,
    /// `in` (received) or `out` (sent by this node).
    pub direction: String,
    /// Outgoing only: `queued`, `sent`, `delivered` or `expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Outgoing only: the route that delivered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Outgoing only: the policy's plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_plan: Option<Vec<String>>,
    /// Outgoing only: every attempt (route, start, outcome).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<fogmesh_protocols::messages::Attempt>>,
    /// Outgoing and not final: why it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Outgoing and not final: when it is tried next, ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<u64>,
    /// Outgoing and not final: when it expires, ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Outgoing only: the mailbox holders it was deposited with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mailbox: Option<MailboxDeposit>,
}

/// An invitation to a group, in `GET /v1/groups/invites` and `fogmesh
/// group invites`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupInvite {
    /// The group (64 hex characters).
    pub group_id: String,
    /// Its name, as its admin wrote it.
    pub name: String,
    /// The admin, who added this node.
    pub inviter: String,
    /// The peer that told this node of the group.
    pub via: String,
    /// When it arrived, ms since the Unix epoch.
    pub received: u64,
    /// Accepted, and waiting for a member to send the group's log.
    pub accepted: bool,
}
