//! Mailboxes in the node: the holder (a thread that keeps sealed
//! envelopes for others in redb, within quotas), what the messages actor
//! asks of the network for its deposits and pickups, and the outbox's
//! record of where a message was deposited.
//!
//! The protocol logic is sans-IO in `fogmesh_protocols::mailbox` (keys,
//! frames, the holder's [`Ledger`](fogmesh_protocols::mailbox::Ledger)).
//! The network side (Kademlia lookups of mailbox keys, deposits, fetches,
//! deletes, couriers over BLE) is `node/mailbox_net.rs`. Picked-up
//! envelopes go to the messages actor as `Input::Picked` and take the same
//! path as a direct envelope. See docs/protocols/mailbox.md.

mod actor;
pub(crate) mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fogmesh_protocols::mailbox::wire::Id;
use fogmesh_protocols::mailbox::{Quotas, Request, Response};
use fogmesh_protocols::messages::{Envelope, MessageId};
use libp2p::PeerId;
use libp2p::request_response::ResponseChannel;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::actor::{Channel, Mailbox};
use crate::behaviour::MailboxFrame;
use crate::storage::{Store, StoreError};
use crate::types::{MailboxDeposit, MailboxStatus};

/// The attempt number a deposited letter carries: its receipt says the
/// mailbox delivered it.
pub(crate) const MAILBOX_ATTEMPT: u32 = u32::MAX;
/// A deposit that found no holder is tried again after this long.
pub(crate) const RETRY_MS: u64 = 60_000;
/// A deposited message still undelivered is sealed and deposited anew
/// after this long (the network side re-checks its holders far more
/// often, see `MailboxConfig::recheck`; this bounds how long one
/// envelope is used).
pub(crate) const REDEPOSIT_MS: u64 = 12 * 3600 * 1000;
/// Default of `MailboxConfig::recheck` (`--mailbox-recheck-secs`).
pub const DEFAULT_RECHECK: Duration = Duration::from_secs(300);
/// Default of `MailboxConfig::pickup`.
pub const DEFAULT_PICKUP: Duration = Duration::from_secs(60);
/// Requests queued for the holder thread; beyond, peers get `Busy`.
const HOLDER_QUEUE: usize = 256;

/// Settings of mailboxes.
#[derive(Debug, Clone)]
pub struct MailboxConfig {
    /// Hold envelopes for others (`--no-mailbox` turns it off; deposits
    /// are then refused as `Disabled`).
    pub enabled: bool,
    /// The holder's quotas (`--mailbox-quota` sets the total).
    pub quotas: Quotas,
    /// How long an outgoing message waits for its recipient before it is
    /// deposited (`--mailbox-after-secs`); `None`: never deposit.
    pub deposit_after: Option<Duration>,
    /// How often a depositor re-checks the holders of its undelivered
    /// messages, and a holder the peers closest to the keys it holds
    /// (`--mailbox-recheck-secs`).
    pub recheck: Duration,
    /// How often the node asks the peers closest to its own mailbox keys
    /// for mail (two Kademlia lookups each time; also once soon after
    /// start, and from every peer on connecting).
    pub pickup: Duration,
}

impl Default for MailboxConfig {
    fn default() -> Self {
        MailboxConfig {
            enabled: true,
            quotas: Quotas::default(),
            deposit_after: Some(Duration::from_secs(30)),
            recheck: DEFAULT_RECHECK,
            pickup: DEFAULT_PICKUP,
        }
    }
}

/// Where an outgoing message's copies are (part of its outbox record).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Deposits {
    /// Holders that accepted a copy.
    #[serde(default)]
    pub(crate) holders: Vec<PeerId>,
    /// The ids of the deposited envelopes (what the sender deletes once
    /// the receipt came).
    #[serde(default)]
    pub(crate) ids: Vec<Id>,
    /// When it was last deposited.
    #[serde(default)]
    pub(crate) at_ms: Option<u64>,
    /// When to deposit (again); `None`: when it has waited long enough.
    #[serde(default)]
    pub(crate) next_ms: Option<u64>,
    /// Why the last deposit found no holder.
    #[serde(default)]
    pub(crate) note: Option<String>,
    /// The receipt named the mailbox copy.
    #[serde(default)]
    pub(crate) delivered: bool,
}

impl Deposits {
    pub(crate) fn to_api(&self) -> Option<MailboxDeposit> {
        if self.holders.is_empty() && self.note.is_none() {
            return None;
        }
        Some(MailboxDeposit {
            holders: self.holders.iter().map(|p| p.to_string()).collect(),
            deposited_at: self.at_ms,
            note: self.note.clone(),
            envelope_ids: self.ids.iter().map(|i| i.to_string()).collect(),
        })
    }

    /// Records holders that accepted a copy (at most 16 remembered).
    pub(crate) fn accepted(&mut self, holders: &[PeerId], id: Id, now: u64) {
        for h in holders {
            if !self.holders.contains(h) {
                self.holders.push(*h);
            }
        }
        if !self.ids.contains(&id) {
            self.ids.push(id);
        }
        let extra = self.holders.len().saturating_sub(16);
        self.holders.drain(..extra);
        let extra = self.ids.len().saturating_sub(16);
        self.ids.drain(..extra);
        self.at_ms = Some(now);
        self.note = None;
    }
}

/// What the messages actor asks of the network's mailbox side.
#[derive(Debug)]
pub(crate) enum Command {
    /// Deposit `env` with the recipient's holders (and BLE couriers);
    /// answered with `messages::Input::Deposited` when `id` is a message.
    Deposit {
        id: Option<MessageId>,
        env: Envelope,
    },
    /// A picked-up envelope is committed (or worthless): the holder may
    /// drop it.
    Picked { holder: PeerId, id: Id },
    /// The message (`id`, when it is one of this node's) is delivered:
    /// drop its copies and end its deposit duty.
    Delivered {
        id: Option<MessageId>,
        holders: Vec<PeerId>,
        ids: Vec<Id>,
    },
}

/// What the holder thread is asked.
#[derive(Debug)]
pub(crate) enum HolderInput {
    /// A peer's request.
    Peer(HolderRequest),
    /// The node's own pass over what it holds: up to `max` envelopes
    /// after `cursor`.
    Walk { cursor: Option<Id>, max: usize },
}

/// What the holder thread hands back to the event loop.
#[derive(Debug)]
pub(crate) enum HolderOut {
    /// An answer to a peer.
    Answer(HolderAnswer),
    /// A step of a pass: held envelopes, and where to go on from.
    Walked {
        items: Vec<HeldCopy>,
        next: Option<Id>,
    },
}

/// One held envelope, for a holder's pass (replication, hand-off).
#[derive(Debug, Clone)]
pub(crate) struct HeldCopy {
    pub(crate) id: Id,
    pub(crate) recipient: PeerId,
    pub(crate) depositor: PeerId,
    pub(crate) frame: Vec<u8>,
}

/// A request from a peer, for the holder thread.
#[derive(Debug)]
pub(crate) struct HolderRequest {
    pub(crate) peer: PeerId,
    pub(crate) req: Request,
    pub(crate) channel: ResponseChannel<MailboxFrame>,
}

/// The holder thread's answer, for the event loop to send.
#[derive(Debug)]
pub(crate) struct HolderAnswer {
    pub(crate) peer: PeerId,
    pub(crate) resp: Response,
    pub(crate) channel: ResponseChannel<MailboxFrame>,
    /// A new envelope was stored by this request.
    pub(crate) stored: bool,
    /// Envelopes this request removed (a delete).
    pub(crate) dropped: Vec<Id>,
}

/// What the holder holds, read by `status` without asking the thread.
#[derive(Debug, Default)]
pub(crate) struct Held {
    pub(crate) envelopes: AtomicU64,
    pub(crate) bytes: AtomicU64,
    /// Envelopes deleted at a peer's request since start.
    pub(crate) deleted: AtomicU64,
}

/// The holder side, as the event loop sees it.
#[derive(Debug)]
pub(crate) struct Holder {
    pub(crate) mailbox: Mailbox<HolderInput>,
    pub(crate) answers: mpsc::Receiver<HolderOut>,
    pub(crate) held: Arc<Held>,
    pub(crate) enabled: bool,
    pub(crate) quota: u64,
}

impl Holder {
    pub(crate) fn status(&self) -> MailboxStatus {
        MailboxStatus {
            enabled: self.enabled,
            envelopes: self.held.envelopes.load(Ordering::Relaxed),
            bytes: self.held.bytes.load(Ordering::Relaxed),
            deleted: self.held.deleted.load(Ordering::Relaxed),
            quota_bytes: self.quota,
        }
    }
}

/// Opens the holder's tables and starts its thread.
pub(crate) fn start(
    me: PeerId,
    store: Store,
    cfg: &MailboxConfig,
    shutdown: CancellationToken,
) -> Result<(Holder, std::thread::JoinHandle<()>), StoreError> {
    let store = store::HolderStore::open(store)?;
    let channel = Channel::bounded(HOLDER_QUEUE);
    let (tx, rx) = mpsc::channel(HOLDER_QUEUE);
    let held = Arc::new(Held::default());
    let holder = actor::HolderActor::new(me, store, cfg, tx, held.clone())?;
    let mailbox = channel.mailbox.clone();
    let thread = crate::actor::spawn("fogmesh-mailbox", holder, channel, shutdown)
        .map_err(|e| StoreError::Db(format!("cannot start the mailbox thread: {e}")))?;
    Ok((
        Holder {
            mailbox,
            answers: rx,
            held,
            enabled: cfg.enabled,
            quota: cfg.quotas.total_bytes,
        },
        thread,
    ))
}
