//! Direct messages in the node: the messages actor, its handle, and what
//! it exchanges with the swarm's event loop.
//!
//! The protocol logic is sans-IO in `fogmesh_protocols::messages`
//! (envelopes, sealing, per-sender order, each message's route state);
//! this module gives it a home. One actor (a thread) owns the outbox, the
//! conversations and their tables. The API sends through the
//! [`MessagesHandle`]; the actor seals each attempt and asks the event
//! loop to carry it over one route ([`NetCommand::Send`]); the event loop
//! answers with what the first hop said ([`Input::Attempt`]) and hands
//! over envelopes addressed to this node ([`Input::Envelope`]). Receipts
//! travel back as envelopes too.
//!
//! Relaying (BLE flooding, gateways) never reaches the actor: the event
//! loop decides it from the envelope's clear header (recipient, hop
//! limit), see `node/messages_net.rs`.

mod actor;
mod handle;
pub(crate) mod store;

use std::time::Duration;

use fogmesh_protocols::messages::{Envelope, MessageId, Timeouts};
use fogmesh_protocols::policy::{Reachability, Route};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::actor::Channel;
use crate::storage::{Store, StoreError};
use crate::types::NodeEvent;
use handle::ApiCall;
pub use handle::MessagesHandle;

/// The wall clock, ms since the Unix epoch: message timestamps, expiry,
/// and the relaying timers (seen envelopes, redials, lookups).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Inputs waiting for the actor: when full, envelopes are refused as busy
/// (their senders retry) and API calls get "busy".
const INPUT_QUEUE: usize = 1024;

/// Settings of direct messages.
#[derive(Debug, Clone)]
pub struct MessagesConfig {
    /// How long each route gets to bring a receipt before the next route
    /// of the plan is tried.
    pub timeouts: Timeouts,
    /// How long an undelivered message is kept and retried.
    pub lifetime: Duration,
    /// Undelivered messages allowed per recipient.
    pub max_outbox_per_peer: usize,
    /// Letters per second accepted from one sender, sustained (bursts of
    /// four times as many pass); beyond, letters are not acknowledged and
    /// their senders retry.
    pub sender_rate: f64,
    /// How long a message waits for its recipient before it is deposited
    /// with mailbox holders; `None`: never (`--mailbox-after-secs`).
    pub mailbox_after: Option<Duration>,
}

impl Default for MessagesConfig {
    fn default() -> Self {
        MessagesConfig {
            timeouts: Timeouts::default(),
            lifetime: Duration::from_secs(7 * 24 * 3600),
            max_outbox_per_peer: 1000,
            sender_rate: 20.0,
            mailbox_after: Some(Duration::from_secs(30)),
        }
    }
}

/// An input of the messages actor.
#[derive(Debug)]
pub(crate) enum Input {
    /// A call from the API.
    Api(ApiCall),
    /// An envelope addressed to this node, and the route it came by.
    Envelope { env: Envelope, via: Route },
    /// What the first hop(s) said of attempt `n` of message `id`.
    Attempt {
        id: MessageId,
        n: u32,
        result: AttemptResult,
    },
    /// A way to `peer` may have appeared (a connection): retry what waits
    /// for it. `None`: a way to anyone may have appeared (a BLE neighbour,
    /// a gateway).
    Wake(Option<PeerId>),
    /// An envelope addressed to this node, picked up from a mailbox
    /// holder (or courier): delivered like a direct one, then the
    /// holder's copy is deleted and the receipt is also deposited for the
    /// sender.
    Picked { env: Envelope, holder: PeerId },
    /// What became of a deposit of message `id` (envelope `env_id`), or
    /// of a receipt (`None`).
    Deposited {
        id: Option<MessageId>,
        env_id: fogmesh_protocols::mailbox::wire::Id,
        holders: Vec<PeerId>,
        errors: Vec<String>,
    },
}

impl From<ApiCall> for Input {
    fn from(call: ApiCall) -> Self {
        Input::Api(call)
    }
}

/// The first hop's answer to an attempt.
#[derive(Debug, Clone)]
pub(crate) enum AttemptResult {
    /// A first hop took it.
    Accepted,
    /// The route has no way to the peer now.
    Unavailable(String),
    /// Refused or the exchange failed.
    Failed(String),
}

/// What the actor asks of the swarm.
#[derive(Debug)]
pub(crate) enum NetCommand {
    /// Carry attempt `n` of message `id` over `route` (answered with
    /// [`Input::Attempt`]).
    Send {
        id: MessageId,
        n: u32,
        route: Route,
        env: Envelope,
    },
    /// Carry a receipt, preferably over `prefer`; no answer.
    Receipt { env: Envelope, prefer: Route },
    /// An attempt to `to` over `route` brought no receipt in time: the
    /// link may be dead.
    NoReceipt { to: PeerId, route: Route },
}

/// Opens the tables and starts the actor thread, which restores the
/// outbox before its first input.
// One argument per channel and setting the actor is wired with.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start(
    keypair: Keypair,
    store: Store,
    net: mpsc::Sender<NetCommand>,
    events: broadcast::Sender<NodeEvent>,
    reach: Reachability,
    cfg: MessagesConfig,
    mailbox: Option<mpsc::Sender<crate::mailbox::Command>>,
    shutdown: CancellationToken,
) -> Result<(MessagesHandle, std::thread::JoinHandle<()>), StoreError> {
    let store = store::DmStore::open(store)?;
    let channel = Channel::bounded(INPUT_QUEUE);
    let handle = MessagesHandle::new(channel.mailbox.clone());
    let mut actor = actor::MessagesActor::new(keypair, store, net, events, reach, cfg)?;
    actor.set_mailbox(mailbox);
    let thread = crate::actor::spawn("fogmesh-messages", actor, channel, shutdown)
        .map_err(|e| StoreError::Db(format!("cannot start the messages thread: {e}")))?;
    Ok((handle, thread))
}
