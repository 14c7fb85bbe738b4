//! Group chat in the node: the groups actor, its handle, and what it
//! exchanges with the swarm's event loop.
//!
//! The protocol logic is the sans-IO core in `fogmesh_protocols::groups`
//! (group state, wire and gossip frames, the sync responder's and
//! requester's decisions); this module gives it a home. One actor (an
//! [`crate::actor::Actor`] on its own thread) owns every group and the group
//! tables of the database. It takes `Input`s (API calls through the
//! [`GroupsHandle`], gossip messages to validate, sync requests and
//! responses, connection changes) and sends `NetCommand`s to the event
//! loop (subscribe, publish, report validation, send sync frames). Keeping
//! the groups off the swarm task keeps signature checks, decryption and
//! database commits out of the network loop, as libp2p advises.
//!
//! Delivery has two paths, both needed:
//! - gossip: a message is published on the group's topic and
//!   validated by every member before it is forwarded (invalid ones are
//!   rejected, which costs the forwarding peer gossipsub score);
//! - sync (anti-entropy, `/fogmesh/group-sync/2`): on every new connection
//!   with a member, and every `sync_interval` with one connected member per
//!   group, the actor sends its summary; a difference triggers
//!   fetches of what is missing. This is how a member that was offline, or
//!   added while offline, catches up, with no resend by the authors.
//!
//! The modules: `handle` (the typed calls), `actor` (state, dispatch,
//! deadlines, storage glue, the batched commit of received messages),
//! `api` (what the calls do), `gossip` (validation, and receiving ops and
//! messages), `sync`, `responder` (the thread that completes answers to
//! peers' sync requests), `store` (the redb tables).

mod actor;
mod api;
mod gossip;
mod handle;
mod responder;
pub(crate) mod store;
mod sync;
#[cfg(test)]
mod tests;

use std::time::Duration;

use fogmesh_protocols::groups::{GroupId, MessageId};
use libp2p::PeerId;
use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::identity::Keypair;
use libp2p::request_response::ResponseChannel;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::actor::Channel;
use crate::behaviour::SyncFrame;
use crate::metrics::NodeMetrics;
use crate::storage::{Store, StoreError};
use crate::types::NodeEvent;
use handle::ApiCall;
pub use handle::GroupsHandle;
pub use responder::SYNC_QUEUE;
pub(crate) use responder::SyncReply;

/// Inputs waiting for the actor; when full, gossip is dropped (and comes
/// back through sync) and API calls get "busy".
const INPUT_QUEUE: usize = 4096;

/// An input of the groups actor.
#[derive(Debug)]
pub(crate) enum Input {
    /// A call from the API, through the [`GroupsHandle`].
    Api(ApiCall),
    /// A gossip message to validate (gossipsub holds it until the verdict
    /// comes back as [`NetCommand::Validation`]).
    Gossip {
        source: PeerId,
        message_id: gossipsub::MessageId,
        data: Vec<u8>,
    },
    /// A peer's sync request, to answer through [`NetCommand::SyncRespond`]
    /// (the answer is completed on the sync worker's thread, see
    /// `responder`).
    SyncRequest {
        peer: PeerId,
        frame: Vec<u8>,
        channel: SyncReply,
    },
    /// The answer to a sync request this node sent about `group`.
    SyncResponse {
        peer: PeerId,
        group: GroupId,
        frame: Vec<u8>,
    },
    /// A sync request this node sent about `group` got no answer.
    SyncFailed {
        peer: PeerId,
        group: GroupId,
        error: String,
    },
    /// What became of a [`NetCommand::Publish`] of an outbox entry.
    Published {
        group: GroupId,
        id: MessageId,
        ok: bool,
    },
    PeerConnected(PeerId),
    PeerDisconnected(PeerId),
}

impl From<ApiCall> for Input {
    fn from(call: ApiCall) -> Self {
        Input::Api(call)
    }
}

/// What the actor asks of the swarm.
#[derive(Debug)]
pub(crate) enum NetCommand {
    Subscribe(String),
    Unsubscribe(String),
    /// Publish `data` on the topic; `outbox` names the outbox entry to
    /// clear once published (answered with [`Input::Published`]).
    Publish {
        topic: String,
        data: Vec<u8>,
        outbox: Option<(GroupId, MessageId)>,
    },
    /// The verdict on an [`Input::Gossip`].
    Validation {
        message_id: gossipsub::MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
    },
    /// Send a sync request about `group` (the event loop tracks it by its
    /// request id and answers with `SyncResponse` or `SyncFailed`).
    SyncRequest {
        peer: PeerId,
        group: GroupId,
        frame: Vec<u8>,
    },
    /// The answer to an [`Input::SyncRequest`].
    SyncRespond {
        /// Who asked (the policy checks the link before a large answer).
        peer: PeerId,
        channel: ResponseChannel<SyncFrame>,
        frame: Vec<u8>,
    },
}

/// Settings of the actor.
#[derive(Debug, Clone)]
pub struct GroupsConfig {
    /// How often each group is compared with one random connected member.
    pub sync_interval: Duration,
    /// How often unpublished messages are offered to gossipsub again.
    pub outbox_interval: Duration,
    /// How long a node waits for one member's answer with the membership
    /// log of a group it learns of before it asks another member (one log
    /// in flight per group).
    pub join_fetch_retry: Duration,
    /// Gossiped messages per second accepted from one sender, sustained;
    /// bursts of four times as many pass. Beyond that gossip from the sender
    /// is ignored (and arrives later through sync, at the receiver's pace).
    pub sender_rate: f64,
    /// Admins whose invitations are accepted without asking (`--trust`);
    /// anyone else's wait in `group invites` for the user.
    pub trust: Vec<PeerId>,
    /// Accept every invitation without asking. For the simulator, whose
    /// nodes have no user to ask; never set by the daemon.
    pub trust_everyone: bool,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        GroupsConfig {
            sync_interval: Duration::from_secs(2),
            outbox_interval: Duration::from_secs(2),
            join_fetch_retry: Duration::from_secs(10),
            sender_rate: 50.0,
            trust: Vec::new(),
            trust_everyone: false,
        }
    }
}

/// Groups this node may be in at once (well below gossipsub's subscription
/// filter of 10,000 topics per peer). Beyond it, creating or accepting a
/// group is refused and invitations are ignored.
pub const MAX_GROUPS: usize = 1000;
/// Pending invitations in all; a new one beyond it drops the oldest
/// pending one.
pub const MAX_INVITES: usize = 64;
/// Pending invitations from one admin; beyond it, its new ones are ignored.
pub const MAX_INVITES_PER_INVITER: usize = 4;
/// Declined groups remembered (their invitations are ignored); the oldest
/// is forgotten beyond it.
pub const MAX_DECLINED: usize = 1024;
/// Stored message envelopes per group; beyond it, new messages of the
/// group are refused (gossip ignored, a local post answered 403).
pub const MAX_GROUP_MESSAGES: u64 = 200_000;
/// Stored envelope bytes per group, likewise.
pub const MAX_GROUP_BYTES: u64 = 512 * 1024 * 1024;
/// Sync requests one peer may send, per second, sustained.
pub const SYNC_REQUEST_RATE: u64 = 200;
/// Sync requests one peer may send at once (a neighbour that connects
/// sends a summary per shared group, up to [`MAX_GROUPS`]).
pub const SYNC_REQUEST_BURST: u64 = 2 * MAX_GROUPS as u64;
/// Received messages committed in one write transaction at most: what
/// arrives together (gossip and sync answers queued for the actor) is
/// committed together, one fsync for up to this many, and nothing of it is
/// acknowledged (forwarded, announced) before the commit.
pub const MAX_COMMIT_BATCH: usize = 256;
/// Senders whose gossip rate is tracked; beyond it the table starts over.
pub const MAX_RATE_SENDERS: usize = 4096;

/// Opens the group tables and starts the actor thread, which restores
/// every stored group before its first input. Returns the actor's handle
/// and its thread.
pub(crate) fn start(
    keypair: Keypair,
    store: Store,
    net: mpsc::Sender<NetCommand>,
    events: broadcast::Sender<NodeEvent>,
    metrics: NodeMetrics,
    cfg: GroupsConfig,
    shutdown: CancellationToken,
) -> Result<(GroupsHandle, std::thread::JoinHandle<()>), StoreError> {
    let store = store::GroupStore::open(store)?;
    let channel = Channel::bounded(INPUT_QUEUE);
    let handle = GroupsHandle::new(channel.mailbox.clone());
    let actor = actor::GroupsActor::new(keypair, store, net, events, metrics, cfg);
    let thread = crate::actor::spawn("fogmesh-groups", actor, channel, shutdown)
        .map_err(|e| StoreError::Db(format!("cannot start the groups thread: {e}")))?;
    Ok((handle, thread))
}
