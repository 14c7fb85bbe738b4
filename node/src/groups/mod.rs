//! Group chat in the node: the groups actor.
//!
//! The protocol logic is the sans-IO core in `fogmesh_protocols::groups`;
//! this module gives it a home. One actor thread owns every [`Group`] and
//! the group tables of the database. It takes [`Input`]s (API calls, gossip
//! messages to validate, sync requests and responses, connection changes)
//! and sends [`NetCommand`]s to the swarm's event loop (subscribe, publish,
//! report validation, send sync frames). Keeping the groups off the swarm
//! task keeps signature checks, decryption and database commits out of the
//! network loop, as libp2p advises.
//!
//! Delivery has two paths, both needed:
//! - gossip: a message is published on the group's topic and validated by
//!   every member before it is forwarded (invalid ones are rejected, which
//!   costs the forwarding peer gossipsub score);
//! - sync (anti-entropy, `/fogmesh/group-sync/2`): on every new connection
//!   with a member, and every `sync_interval` with one random connected
//!   member per group, the actor sends its summary; a difference triggers
//!   fetches of what is missing. This is how a member that was offline, or
//!   added while offline, catches up, with no resend by the authors.

pub(crate) mod store;

use std::collections::{HashMap, HashSet};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fogmesh_protocols::groups::sync::{SyncRequest, SyncResponse, Want, diff};
use fogmesh_protocols::groups::wire::{
    self, MAX_SYNC_RESPONSE_SIZE, SignedEnvelope, decode_sync_request, decode_sync_response,
    encode_sync_request, encode_sync_response,
};
use fogmesh_protocols::groups::{
    Delivered, Group, GroupError, GroupId, MembershipError, MessageId, Op,
};
use libp2p::PeerId;
use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::identity::Keypair;
use libp2p::request_response::ResponseChannel;
use tokio::sync::{broadcast, mpsc};

use crate::actor::{Mailbox, Reply, ServiceError};
use crate::behaviour::SyncFrame;
use crate::metrics::NodeMetrics;
use crate::storage::{Store, StoreError};
use crate::types::{CreateGroup, GroupAck, GroupInfo, GroupMessage, NodeEvent};
use store::{Batch, GroupStore};

/// Gossip frame tag of a message envelope.
const TAG_MESSAGE: u8 = 1;
/// Gossip frame tag of a membership op.
const TAG_OP: u8 = 2;
/// Inputs waiting for the actor; when full, gossip is dropped (and comes
/// back through sync) and API calls get "busy".
const INPUT_QUEUE: usize = 4096;
/// Fetches of unknown groups' logs one peer may trigger: per second,
/// sustained (bursts of four times as many: enough to learn of 128 groups at
/// once, not enough for a stranger to keep this node busy).
const INVITE_FETCH_RATE: f64 = 32.0;
/// How long a node waits for one member's answer with a group's membership
/// log before asking another member.
const JOIN_FETCH_RETRY: Duration = Duration::from_secs(10);

/// Encodes a message envelope for gossip.
pub fn encode_gossip_message(env: &SignedEnvelope) -> Vec<u8> {
    let mut out = vec![TAG_MESSAGE];
    out.extend(wire::encode_envelope(env));
    out
}

/// Encodes a membership op for gossip.
pub fn encode_gossip_op(op: &Op) -> Vec<u8> {
    let mut out = vec![TAG_OP];
    out.extend(wire::encode_op(op));
    out
}

/// A decoded gossip frame.
#[derive(Debug)]
pub enum GossipFrame {
    /// A message envelope.
    Message(SignedEnvelope),
    /// A membership op.
    Op(Op),
}

/// Decodes a gossip frame; every decoder underneath is size-limited.
pub fn decode_gossip(bytes: &[u8]) -> Result<GossipFrame, String> {
    match bytes.split_first() {
        Some((&TAG_MESSAGE, rest)) => wire::decode_envelope(rest)
            .map(GossipFrame::Message)
            .map_err(|e| e.to_string()),
        Some((&TAG_OP, rest)) => wire::decode_op(rest)
            .map(GossipFrame::Op)
            .map_err(|e| e.to_string()),
        Some((tag, _)) => Err(format!("unknown gossip frame tag {tag}")),
        None => Err("empty gossip frame".into()),
    }
}

fn group_error(e: GroupError) -> ServiceError {
    match e {
        GroupError::NotAdmin | GroupError::NotAMember => ServiceError::Forbidden(e.to_string()),
        other => ServiceError::BadRequest(other.to_string()),
    }
}

/// A call from the API.
#[derive(Debug)]
pub enum ApiCall {
    /// Create a group.
    Create(CreateGroup, Reply<GroupAck>),
    /// List groups.
    List(Reply<Vec<GroupInfo>>),
    /// Show one group.
    Show(String, Reply<GroupInfo>),
    /// Add a member.
    Add(String, String, Reply<GroupAck>),
    /// Remove a member.
    Remove(String, String, Reply<GroupAck>),
    /// Leave.
    Leave(String, Reply<GroupAck>),
    /// Post a message.
    Send(String, String, Reply<GroupAck>),
    /// Read delivered messages (the last N).
    Messages(String, Option<usize>, Reply<Vec<GroupMessage>>),
}

impl From<ApiCall> for Input {
    fn from(call: ApiCall) -> Self {
        Input::Api(call)
    }
}

/// An input of the actor.
#[derive(Debug)]
#[allow(missing_docs)] // Transitional: crate-private again once the handle is a newtype.
pub enum Input {
    Api(ApiCall),
    Gossip {
        source: PeerId,
        message_id: gossipsub::MessageId,
        data: Vec<u8>,
    },
    SyncRequest {
        peer: PeerId,
        frame: Vec<u8>,
        channel: ResponseChannel<SyncFrame>,
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
    Published {
        group: GroupId,
        id: MessageId,
        ok: bool,
    },
    PeerConnected(PeerId),
    PeerDisconnected(PeerId),
}

/// What the actor asks of the swarm.
#[derive(Debug)]
#[allow(missing_docs)] // Transitional: crate-private again once the handle is a newtype.
pub enum NetCommand {
    Subscribe(String),
    Unsubscribe(String),
    /// Publish `data` on the topic; `outbox` names the outbox entry to
    /// clear once published.
    Publish {
        topic: String,
        data: Vec<u8>,
        outbox: Option<(GroupId, MessageId)>,
    },
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
    SyncRespond {
        channel: ResponseChannel<SyncFrame>,
        frame: Vec<u8>,
    },
}

/// The API's and the event loop's handle on the actor.
pub type GroupsHandle = Mailbox<Input>;

/// Settings of the actor.
#[derive(Debug, Clone)]
pub struct GroupsConfig {
    /// How often each group is compared with one random connected member.
    pub sync_interval: Duration,
    /// How often unpublished messages are offered to gossipsub again.
    pub outbox_interval: Duration,
    /// Gossiped messages per second accepted from one sender, sustained;
    /// bursts of four times as many pass. Beyond that gossip from the sender
    /// is ignored (and arrives later through sync, at the receiver's pace).
    pub sender_rate: f64,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        GroupsConfig {
            sync_interval: Duration::from_secs(2),
            outbox_interval: Duration::from_secs(2),
            sender_rate: 50.0,
        }
    }
}

/// Loads every stored group and starts the actor thread. Returns its
/// handle, the subscriptions to make, and the thread.
pub(crate) fn start(
    keypair: Keypair,
    store: Store,
    net: mpsc::Sender<NetCommand>,
    events: broadcast::Sender<NodeEvent>,
    metrics: NodeMetrics,
    cfg: GroupsConfig,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(GroupsHandle, std::thread::JoinHandle<()>), StoreError> {
    let store = GroupStore::open(store)?;
    let (tx, rx) = std_mpsc::sync_channel(INPUT_QUEUE);
    let mut actor = Actor {
        local: keypair.public().to_peer_id(),
        keypair,
        store,
        groups: HashMap::new(),
        net,
        events,
        metrics,
        connected: HashSet::new(),
        rates: HashMap::new(),
        invite_fetches: HashMap::new(),
        joining: HashMap::new(),
        knows: HashMap::new(),
        publishing: HashMap::new(),
        cfg,
        rng: rand::make_rng(),
        shutdown,
    };
    // Restoring happens on the actor's thread: it commits and talks to the
    // swarm with blocking calls, which must not run on the async runtime.
    let thread = std::thread::Builder::new()
        .name("fogmesh-groups".into())
        .spawn(move || {
            if let Err(e) = actor.load() {
                tracing::error!("cannot restore groups: {e}");
            }
            actor.run(rx)
        })
        .map_err(|e| StoreError::Db(format!("cannot start the groups thread: {e}")))?;
    Ok((Mailbox::from_sender(tx), thread))
}

struct Actor {
    local: PeerId,
    keypair: Keypair,
    store: GroupStore,
    groups: HashMap<GroupId, Group>,
    net: mpsc::Sender<NetCommand>,
    events: broadcast::Sender<NodeEvent>,
    metrics: NodeMetrics,
    connected: HashSet<PeerId>,
    rates: HashMap<PeerId, TokenBucket>,
    invite_fetches: HashMap<PeerId, TokenBucket>,
    /// Groups we were told of and asked a member for, with when: one
    /// membership log in flight per group, not one per member that tells
    /// us (a large group's log is hundreds of kilobytes).
    joining: HashMap<GroupId, Instant>,
    /// Connected peers that showed they know a group (they sent or answered
    /// a summary of it). Periodic sync goes to a member not in here first,
    /// so that an added member whose neighbours all told it while it was
    /// busy still hears of the group within one interval.
    knows: HashMap<GroupId, HashSet<PeerId>>,
    /// Outbox entries handed to the swarm and not answered yet, with when
    /// (an answer lost to a full queue must not block an entry for ever).
    publishing: HashMap<MessageId, Instant>,
    cfg: GroupsConfig,
    rng: rand::rngs::StdRng,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Actor {
    /// Rebuilds every group from its stored ops and envelopes.
    fn load(&mut self) -> Result<(), StoreError> {
        for gid in self.store.groups()? {
            let ops = self.store.ops(&gid)?;
            let mut iter = ops.iter().filter_map(|b| wire::decode_op(b).ok());
            let Some(genesis) = iter.next() else { continue };
            let mut group = match Group::join(self.keypair.clone(), genesis) {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(group = %gid.to_hex(), "cannot restore group: {e}");
                    continue;
                }
            };
            for op in iter {
                if let Err(e) = group.receive_op(op) {
                    tracing::warn!(group = %gid.to_hex(), "stored op refused on replay: {e}");
                }
            }
            // Deliveries during replay are already in the history, except
            // those a crash cut off between two commits: commit catches them
            // (it skips what was delivered).
            let mut batch = Batch::default();
            for bytes in self.store.envelopes_for_replay(&gid)? {
                let Ok(env) = wire::decode_envelope(&bytes) else {
                    continue;
                };
                if let Ok(d) = group.receive_message(env) {
                    batch
                        .delivered
                        .extend(d.into_iter().map(|d| to_message(&d)));
                }
            }
            if !batch.is_empty() {
                let missed = self.store.commit(&gid, batch)?;
                if !missed.is_empty() {
                    tracing::info!(group = %gid.to_hex(), n = missed.len(), "recovered deliveries on replay");
                }
            }
            if group.membership().is_member(&self.local) {
                self.net_send(NetCommand::Subscribe(group.topic()));
            }
            self.groups.insert(gid, group);
        }
        tracing::info!(groups = self.groups.len(), "groups restored");
        Ok(())
    }

    fn run(&mut self, rx: std_mpsc::Receiver<Input>) {
        let tick = Duration::from_millis(200);
        let mut last_sync = Instant::now();
        let mut last_outbox = Instant::now();
        self.flush_outbox();
        while !self.shutdown.is_cancelled() {
            match rx.recv_timeout(tick) {
                Ok(input) => self.on_input(input),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if last_sync.elapsed() >= self.cfg.sync_interval {
                last_sync = Instant::now();
                self.periodic_sync();
            }
            if last_outbox.elapsed() >= self.cfg.outbox_interval {
                last_outbox = Instant::now();
                self.flush_outbox();
            }
        }
        tracing::debug!("groups actor stopped");
    }

    fn net_send(&self, cmd: NetCommand) {
        // The swarm loop drains this queue quickly; blocking here applies
        // backpressure to the actor, never to the network loop.
        if self.net.blocking_send(cmd).is_err() {
            tracing::debug!("swarm loop gone; dropping a network command");
        }
    }

    fn emit(&self, ev: NodeEvent) {
        let _ = self.events.send(ev);
    }

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Api(call) => self.on_api(call),
            Input::Gossip {
                source,
                message_id,
                data,
            } => {
                let acceptance = self.on_gossip(source, &data);
                if matches!(acceptance, MessageAcceptance::Reject) {
                    self.metrics.group_messages_rejected.inc();
                }
                self.net_send(NetCommand::Validation {
                    message_id,
                    source,
                    acceptance,
                });
            }
            Input::SyncRequest {
                peer,
                frame,
                channel,
            } => {
                let resp = self.on_sync_request(peer, &frame);
                self.net_send(NetCommand::SyncRespond {
                    channel,
                    frame: resp,
                });
            }
            Input::SyncResponse { peer, group, frame } => {
                self.on_sync_response(peer, group, &frame)
            }
            Input::SyncFailed { peer, group, error } => {
                tracing::debug!(%peer, group = %group.to_hex(), "sync request failed: {error}");
                // A membership log asked of a peer that went away: ask the
                // next member that tells us of the group, now.
                self.joining.remove(&group);
            }
            Input::Published { group, id, ok } => {
                self.publishing.remove(&id);
                if ok && let Err(e) = self.store.outbox_done(&group, &id) {
                    tracing::warn!("cannot clear the outbox: {e}");
                }
            }
            Input::PeerConnected(peer) => {
                self.connected.insert(peer);
                // Catch up with the new neighbour on every group it shares
                // with us, and let it learn groups it was added to.
                let shared: Vec<GroupId> = self
                    .groups
                    .iter()
                    .filter(|(_, g)| {
                        g.membership().is_member(&peer) && g.membership().is_member(&self.local)
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for gid in shared {
                    self.send_summary(peer, gid, true);
                }
            }
            Input::PeerDisconnected(peer) => {
                self.connected.remove(&peer);
                self.rates.remove(&peer);
                for k in self.knows.values_mut() {
                    k.remove(&peer);
                }
            }
        }
    }

    // ---- API ----

    fn on_api(&mut self, call: ApiCall) {
        match call {
            ApiCall::Create(req, reply) => {
                let _ = reply.send(self.create(req));
            }
            ApiCall::List(reply) => {
                let mut list: Vec<GroupInfo> = self.groups.values().map(|g| self.info(g)).collect();
                list.sort_by(|a, b| a.name.cmp(&b.name).then(a.group_id.cmp(&b.group_id)));
                let _ = reply.send(Ok(list));
            }
            ApiCall::Show(gid, reply) => {
                let r = self.find(&gid).map(|id| self.info(&self.groups[&id]));
                let _ = reply.send(r);
            }
            ApiCall::Add(gid, peer, reply) => {
                let _ = reply.send(self.change(&gid, Change::Add(peer)));
            }
            ApiCall::Remove(gid, peer, reply) => {
                let _ = reply.send(self.change(&gid, Change::Remove(peer)));
            }
            ApiCall::Leave(gid, reply) => {
                let _ = reply.send(self.change(&gid, Change::Leave));
            }
            ApiCall::Send(gid, text, reply) => {
                let _ = reply.send(self.post(&gid, &text));
            }
            ApiCall::Messages(gid, limit, reply) => {
                let r = self
                    .find(&gid)
                    .and_then(|id| self.store.history(&id, limit).map_err(Into::into));
                let _ = reply.send(r);
            }
        }
    }

    fn find(&self, gid: &str) -> Result<GroupId, ServiceError> {
        let bytes = hex::decode(gid)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                ServiceError::BadRequest(format!("{gid:?} is not a group id (64 hex characters)"))
            })?;
        let id = GroupId(bytes);
        if self.groups.contains_key(&id) {
            Ok(id)
        } else {
            Err(ServiceError::NotFound(format!(
                "no group {gid} on this node"
            )))
        }
    }

    fn info(&self, g: &Group) -> GroupInfo {
        let m = g.membership();
        GroupInfo {
            group_id: g.id().to_hex(),
            name: m.name().to_owned(),
            description: m.description().to_owned(),
            admin: m.admin().to_base58(),
            members: m.members().iter().map(|p| p.to_base58()).collect(),
            epoch: m.epoch(),
            is_member: m.is_member(&self.local),
            messages: g.causal().per_sender().iter().map(|(_, n)| *n).sum(),
        }
    }

    fn create(&mut self, req: CreateGroup) -> Result<GroupAck, ServiceError> {
        let members = parse_peers(&req.members)?;
        let (group, ops) = Group::create(
            self.keypair.clone(),
            &req.name,
            &req.description,
            &members,
            &mut self.rng,
            now_ms(),
        )
        .map_err(group_error)?;
        let gid = group.id();
        self.store.commit(&gid, Batch::of_ops(0, &ops))?;
        self.net_send(NetCommand::Subscribe(group.topic()));
        self.groups.insert(gid, group);
        self.emit(NodeEvent::GroupUpdated {
            group_id: gid.to_hex(),
            member: true,
        });
        tracing::info!(group = %gid.to_hex(), members = members.len() + 1, "group created");
        self.push_to_members(gid);
        Ok(GroupAck {
            group_id: gid.to_hex(),
            id: None,
        })
    }

    fn change(&mut self, gid: &str, change: Change) -> Result<GroupAck, ServiceError> {
        let id = self.find(gid)?;
        let now = now_ms();
        let group = self
            .groups
            .get_mut(&id)
            .ok_or_else(|| ServiceError::NotFound(gid.into()))?;
        let op = match &change {
            Change::Add(p) => group.add(parse_peer(p)?, &mut self.rng, now),
            Change::Remove(p) => group.remove(parse_peer(p)?, &mut self.rng, now),
            Change::Leave => group.leave(now),
        }
        .map_err(group_error)?;
        self.commit_ops(id, vec![op.clone()], Vec::new())?;
        let topic = self.groups[&id].topic();
        self.net_send(NetCommand::Publish {
            topic: topic.clone(),
            data: encode_gossip_op(&op),
            outbox: None,
        });
        if matches!(change, Change::Leave) {
            self.net_send(NetCommand::Unsubscribe(topic));
        }
        self.emit(NodeEvent::GroupUpdated {
            group_id: id.to_hex(),
            member: self.groups[&id].membership().is_member(&self.local),
        });
        self.push_to_members(id);
        Ok(GroupAck {
            group_id: id.to_hex(),
            id: None,
        })
    }

    fn post(&mut self, gid: &str, text: &str) -> Result<GroupAck, ServiceError> {
        let id = self.find(gid)?;
        let now = now_ms();
        let group = self
            .groups
            .get_mut(&id)
            .ok_or_else(|| ServiceError::NotFound(gid.into()))?;
        let deps = group.causal().deps_for_send(&self.local);
        let (env, mid) = group
            .compose(&mut self.rng, text, now)
            .map_err(group_error)?;
        let topic = group.topic();
        let delivered = Delivered {
            id: mid,
            sender: self.local,
            seq: env.body.seq,
            epoch: env.body.epoch,
            text: text.to_owned(),
            timestamp_ms: now,
            deps,
        };
        let frame = encode_gossip_message(&env);
        let batch = Batch {
            envelopes: vec![(mid, wire::encode_envelope(&env))],
            delivered: vec![to_message(&delivered)],
            outbox_add: vec![(mid, frame.clone())],
            ..Batch::default()
        };
        // Durable before acknowledged.
        let delivered = self.store.commit(&id, batch)?;
        self.announce(&id, delivered);
        self.publishing.insert(mid, Instant::now());
        self.net_send(NetCommand::Publish {
            topic,
            data: frame,
            outbox: Some((id, mid)),
        });
        Ok(GroupAck {
            group_id: id.to_hex(),
            id: Some(hex::encode(mid.0)),
        })
    }

    /// Persists new ops (and what they delivered), handling what they mean
    /// for this node.
    fn commit_ops(
        &mut self,
        id: GroupId,
        ops: Vec<Op>,
        delivered: Vec<Delivered>,
    ) -> Result<(), ServiceError> {
        let Some(group) = self.groups.get(&id) else {
            return Ok(());
        };
        let len = group.membership().len();
        let first = len - ops.len() as u64;
        let batch = Batch {
            delivered: delivered.iter().map(to_message).collect(),
            ..Batch::of_ops(first, &ops)
        };
        let delivered = self.store.commit(&id, batch)?;
        self.announce(&id, delivered);
        Ok(())
    }

    fn announce(&self, gid: &GroupId, delivered: Vec<GroupMessage>) {
        for m in delivered {
            self.metrics.group_messages_delivered.inc();
            self.emit(NodeEvent::GroupMessage {
                group_id: gid.to_hex(),
                id: m.id,
                sender: m.sender,
                text: m.text,
                timestamp: m.timestamp,
            });
        }
    }

    /// After a local change, connected members hear of it at once.
    fn push_to_members(&mut self, gid: GroupId) {
        let Some(group) = self.groups.get(&gid) else {
            return;
        };
        let peers: Vec<PeerId> = group
            .membership()
            .members()
            .iter()
            .filter(|p| **p != self.local && self.connected.contains(p))
            .copied()
            .collect();
        for p in peers {
            self.send_summary(p, gid, true);
        }
    }

    // ---- gossip ----

    fn on_gossip(&mut self, source: PeerId, data: &[u8]) -> MessageAcceptance {
        let frame = match decode_gossip(data) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(%source, "undecodable gossip: {e}");
                return MessageAcceptance::Reject;
            }
        };
        match frame {
            GossipFrame::Message(env) => {
                let gid = env.body.group_id;
                let sender = env.body.sender;
                if !self.groups.contains_key(&gid) {
                    return MessageAcceptance::Ignore;
                }
                if !self
                    .rates
                    .entry(sender)
                    .or_insert_with(|| TokenBucket::new(self.cfg.sender_rate))
                    .take()
                {
                    self.metrics.group_messages_rate_limited.inc();
                    return MessageAcceptance::Ignore;
                }
                match self.receive_envelope(gid, env) {
                    Ok(()) => MessageAcceptance::Accept,
                    Err(acceptance) => acceptance,
                }
            }
            GossipFrame::Op(op) => {
                // A genesis op (no group id) never travels by gossip.
                let Some(gid) = op.body.group_id else {
                    return MessageAcceptance::Reject;
                };
                if !self.groups.contains_key(&gid) {
                    return MessageAcceptance::Ignore;
                }
                match self.receive_ops(gid, vec![op]) {
                    Ok(()) => MessageAcceptance::Accept,
                    Err(a) => a,
                }
            }
        }
    }

    /// Feeds one envelope to its group and stores it if it is valid.
    fn receive_envelope(
        &mut self,
        gid: GroupId,
        env: SignedEnvelope,
    ) -> Result<(), MessageAcceptance> {
        let Some(group) = self.groups.get_mut(&gid) else {
            return Err(MessageAcceptance::Ignore);
        };
        let mid = env.id();
        if group.causal().contains(&mid) {
            return Ok(());
        }
        let bytes = wire::encode_envelope(&env);
        match group.receive_message(env) {
            Ok(delivered) => {
                let batch = Batch {
                    envelopes: vec![(mid, bytes)],
                    delivered: delivered.iter().map(to_message).collect(),
                    ..Batch::default()
                };
                match self.store.commit(&gid, batch) {
                    Ok(d) => self.announce(&gid, d),
                    Err(e) => tracing::error!("cannot store a group message: {e}"),
                }
                Ok(())
            }
            // Not this peer's fault: we lack the key (we were removed, or
            // the op that gives it has not arrived).
            Err(GroupError::NoKeyForEpoch(_)) => Err(MessageAcceptance::Ignore),
            Err(e) => {
                tracing::debug!(group = %gid.to_hex(), "message rejected: {e}");
                Err(MessageAcceptance::Reject)
            }
        }
    }

    /// Feeds ops to their group, persists them and acts on them.
    fn receive_ops(&mut self, gid: GroupId, ops: Vec<Op>) -> Result<(), MessageAcceptance> {
        let Some(group) = self.groups.get_mut(&gid) else {
            return Err(MessageAcceptance::Ignore);
        };
        let was_member = group.membership().is_member(&self.local);
        let before = group.membership().len();
        let mut delivered = Vec::new();
        let mut must_rotate = false;
        let mut verdict = Ok(());
        for op in ops {
            match group.receive_op(op) {
                Ok(r) => {
                    delivered.extend(r.delivered);
                    must_rotate |= r.must_rotate;
                }
                Err(GroupError::Membership(MembershipError::Fork { .. })) => {
                    verdict = Err(MessageAcceptance::Ignore);
                }
                Err(e) => {
                    tracing::debug!(group = %gid.to_hex(), "op rejected: {e}");
                    verdict = Err(MessageAcceptance::Reject);
                }
            }
        }
        let new_ops: Vec<Op> = group.membership().ops_since(before).to_vec();
        let is_member = group.membership().is_member(&self.local);
        let topic = group.topic();
        if !new_ops.is_empty() || !delivered.is_empty() {
            if let Err(e) = self.commit_ops(gid, new_ops.clone(), delivered) {
                tracing::error!("cannot store group ops: {e}");
            }
            if was_member && !is_member {
                tracing::info!(group = %gid.to_hex(), "this node was removed from the group");
                self.net_send(NetCommand::Unsubscribe(topic.clone()));
            }
            if !new_ops.is_empty() {
                self.emit(NodeEvent::GroupUpdated {
                    group_id: gid.to_hex(),
                    member: is_member,
                });
            }
        }
        if must_rotate && let Some(group) = self.groups.get_mut(&gid) {
            match group.rotate(&mut self.rng, now_ms()) {
                Ok(op) => {
                    if let Err(e) = self.commit_ops(gid, vec![op.clone()], Vec::new()) {
                        tracing::error!("cannot store the rotation: {e}");
                    }
                    self.net_send(NetCommand::Publish {
                        topic,
                        data: encode_gossip_op(&op),
                        outbox: None,
                    });
                    self.push_to_members(gid);
                }
                Err(e) => tracing::warn!("cannot rotate keys: {e}"),
            }
        }
        verdict
    }

    // ---- sync ----

    fn send_summary(&mut self, peer: PeerId, gid: GroupId, full: bool) {
        let Some(group) = self.groups.get(&gid) else {
            return;
        };
        let summary = if full {
            group.summary()
        } else {
            group.summary().brief()
        };
        let frame = encode_sync_request(&SyncRequest::Summary {
            group_id: gid,
            summary,
        });
        self.metrics.group_sync_requests.inc();
        self.net_send(NetCommand::SyncRequest {
            peer,
            group: gid,
            frame,
        });
    }

    fn send_fetch(&mut self, peer: PeerId, gid: GroupId, want: Want) {
        let frame = encode_sync_request(&SyncRequest::Fetch {
            group_id: gid,
            want,
        });
        self.metrics.group_sync_requests.inc();
        self.net_send(NetCommand::SyncRequest {
            peer,
            group: gid,
            frame,
        });
    }

    /// Every interval, each group compares a brief summary with one random
    /// connected member: a few dozen bytes per group when in sync.
    fn periodic_sync(&mut self) {
        use rand::seq::IndexedRandom;
        let mut plan = Vec::new();
        for (gid, g) in &self.groups {
            let m = g.membership();
            if !m.is_member(&self.local) {
                continue;
            }
            let candidates: Vec<PeerId> = m
                .members()
                .iter()
                .filter(|p| **p != self.local && self.connected.contains(p))
                .copied()
                .collect();
            let knowing = self.knows.get(gid);
            let unaware: Vec<PeerId> = candidates
                .iter()
                .filter(|p| !knowing.is_some_and(|k| k.contains(p)))
                .copied()
                .collect();
            let pool = if unaware.is_empty() {
                &candidates
            } else {
                &unaware
            };
            if let Some(p) = pool.choose(&mut self.rng) {
                plan.push((*p, *gid));
            }
        }
        for (peer, gid) in plan {
            self.send_summary(peer, gid, false);
        }
    }

    fn on_sync_request(&mut self, peer: PeerId, frame: &[u8]) -> Vec<u8> {
        let empty = |gid| SyncResponse {
            group_id: gid,
            summary: None,
            ops: Vec::new(),
            messages: Vec::new(),
        };
        let req = match decode_sync_request(frame) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%peer, "bad sync request: {e}");
                return encode_sync_response(&empty(GroupId([0; 32])));
            }
        };
        let (gid, remote, want) = match req {
            SyncRequest::Summary { group_id, summary } => (group_id, Some(summary), None),
            SyncRequest::Fetch { group_id, want } => (group_id, None, Some(want)),
            _ => return encode_sync_response(&empty(GroupId([0; 32]))),
        };
        let Some(group) = self.groups.get(&gid) else {
            // A member telling us of a group we do not know: we may have
            // been added while away. Ask for its membership log (rate-limited
            // per peer, as anyone can send this).
            let asked_recently = self
                .joining
                .get(&gid)
                .is_some_and(|t| t.elapsed() < JOIN_FETCH_RETRY);
            if remote.is_some() && !asked_recently && self.allow_invite_fetch(peer) {
                self.joining.retain(|_, t| t.elapsed() < JOIN_FETCH_RETRY);
                self.joining.insert(gid, Instant::now());
                self.send_fetch(
                    peer,
                    gid,
                    Want {
                        membership_from: Some(0),
                        ..Want::default()
                    },
                );
            }
            return encode_sync_response(&empty(gid));
        };
        // Only members (current or former, for the epochs they had) get
        // anything; others learn nothing, not even that the group exists.
        if !group.membership().is_member(&peer) {
            return encode_sync_response(&empty(gid));
        }
        if remote.is_some() {
            self.knows.entry(gid).or_default().insert(peer);
        }
        let mine = group.summary();
        let mut resp = empty(gid);
        let mut size = 1024usize;
        let (ops_from, ranges) = match (&remote, &want) {
            (Some(r), _) => {
                resp.summary = Some(if r.heads_hash == mine.heads_hash {
                    mine.brief()
                } else {
                    mine.clone()
                });
                let w = diff(r, &mine);
                (
                    Some(r.membership_len),
                    if r.per_sender.is_empty() {
                        Vec::new()
                    } else {
                        w.ranges
                    },
                )
            }
            (None, Some(w)) => (w.membership_from, w.ranges.clone()),
            (None, None) => (None, Vec::new()),
        };
        if let Some(from) = ops_from {
            for op in group.membership().ops_since(from) {
                let len = wire::encode_op(op).len();
                if size + len > MAX_SYNC_RESPONSE_SIZE {
                    break;
                }
                size += len;
                resp.ops.push(op.clone());
            }
        }
        'outer: for (sender, from, to) in ranges {
            for seq in from..=to {
                let Some(id) = group.causal().id_of(&sender, seq) else {
                    break;
                };
                let Ok(Some(bytes)) = self.store.envelope(&gid, &id) else {
                    break;
                };
                if size + bytes.len() > MAX_SYNC_RESPONSE_SIZE {
                    break 'outer;
                }
                if let Ok(env) = wire::decode_envelope(&bytes) {
                    size += bytes.len();
                    resp.messages.push(env);
                }
            }
        }
        // What we lack from them: ask in a request of our own.
        if let Some(r) = &remote {
            let w = diff(&mine, r);
            if w.need_full_summary {
                self.send_summary(peer, gid, true);
            } else if !w.is_empty() {
                self.send_fetch(peer, gid, w);
            }
        }
        encode_sync_response(&resp)
    }

    fn allow_invite_fetch(&mut self, peer: PeerId) -> bool {
        self.invite_fetches
            .entry(peer)
            .or_insert_with(|| TokenBucket::new(INVITE_FETCH_RATE))
            .take()
    }

    fn on_sync_response(&mut self, peer: PeerId, asked: GroupId, frame: &[u8]) {
        let resp = match decode_sync_response(frame) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%peer, "bad sync response: {e}");
                return;
            }
        };
        let gid = resp.group_id;
        // An answer is about the group we asked about, or it is ignored.
        if gid != asked {
            tracing::debug!(%peer, "sync response about another group than asked");
            return;
        }
        let mut ops = resp.ops.into_iter();
        if !self.groups.contains_key(&gid) {
            // Learning a group: the first op must be its genesis, which
            // proves the id; keep it only if we turn out to be a member.
            let Some(genesis) = ops.next() else { return };
            let Ok(group) = Group::join(self.keypair.clone(), genesis.clone()) else {
                return;
            };
            if group.id() != gid {
                return;
            }
            self.groups.insert(gid, group);
            self.joining.remove(&gid);
            let rest: Vec<Op> = ops.collect();
            let _ = self.receive_ops(gid, rest);
            let keep = self
                .groups
                .get(&gid)
                .is_some_and(|g| g.membership().is_member(&self.local));
            if !keep {
                self.groups.remove(&gid);
                return;
            }
            let all: Vec<Op> = self.groups[&gid].membership().ops_since(0).to_vec();
            if let Err(e) = self.store.commit(&gid, Batch::of_ops(0, &all)) {
                tracing::error!("cannot store a new group: {e}");
                self.groups.remove(&gid);
                return;
            }
            tracing::info!(group = %gid.to_hex(), from = %peer, "learned of a group this node was added to");
            self.net_send(NetCommand::Subscribe(self.groups[&gid].topic()));
            self.emit(NodeEvent::GroupUpdated {
                group_id: gid.to_hex(),
                member: true,
            });
            // Now fetch its messages from every connected member (the peer
            // that answered among them), which also tells them of the group:
            // they may not know of it either, so an invitation spreads
            // through the members, not only from its admin.
            self.push_to_members(gid);
        } else {
            let rest: Vec<Op> = ops.collect();
            if !rest.is_empty() {
                let _ = self.receive_ops(gid, rest);
            }
        }
        let mut n = 0;
        for env in resp.messages {
            if env.body.group_id == gid && self.receive_envelope(gid, env).is_ok() {
                n += 1;
            }
        }
        if n > 0 {
            self.metrics.group_messages_synced.inc_by(n);
        }
        if resp.summary.is_some() && self.groups.contains_key(&gid) {
            self.knows.entry(gid).or_default().insert(peer);
        }
        if let (Some(remote), Some(group)) = (resp.summary, self.groups.get(&gid)) {
            let mine = group.summary();
            let w = diff(&mine, &remote);
            if w.need_full_summary {
                self.send_summary(peer, gid, true);
            } else if !w.is_empty() {
                self.send_fetch(peer, gid, w);
            }
        }
    }

    // ---- outbox ----

    fn flush_outbox(&mut self) {
        let pending = match self.store.outbox() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("cannot read the outbox: {e}");
                return;
            }
        };
        for (gid, mid, frame) in pending {
            let Some(group) = self.groups.get(&gid) else {
                continue;
            };
            // Handed to the swarm already; its answer is on its way.
            if self
                .publishing
                .get(&mid)
                .is_some_and(|t| t.elapsed() < Duration::from_secs(30))
            {
                continue;
            }
            self.publishing.insert(mid, Instant::now());
            self.net_send(NetCommand::Publish {
                topic: group.topic(),
                data: frame,
                outbox: Some((gid, mid)),
            });
        }
    }
}

enum Change {
    Add(String),
    Remove(String),
    Leave,
}

fn parse_peer(s: &str) -> Result<PeerId, ServiceError> {
    s.parse()
        .map_err(|e| ServiceError::BadRequest(format!("{s:?} is not a peer id: {e}")))
}

fn parse_peers(list: &[String]) -> Result<Vec<PeerId>, ServiceError> {
    list.iter().map(|s| parse_peer(s)).collect()
}

fn to_message(d: &Delivered) -> GroupMessage {
    GroupMessage {
        index: 0,
        id: hex::encode(d.id.0),
        sender: d.sender.to_base58(),
        seq: d.seq,
        epoch: d.epoch,
        text: d.text.clone(),
        timestamp: d.timestamp_ms,
        deps: d.deps.iter().map(|m| hex::encode(m.0)).collect(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A token bucket: `rate` per second, up to four seconds' worth.
struct TokenBucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: f64) -> Self {
        TokenBucket {
            rate,
            tokens: rate * 4.0,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        // Refill for the time elapsed, capped at four seconds' worth.
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate)
            .min(self.rate * 4.0);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gossip_frames_reject_garbage() {
        assert!(decode_gossip(&[]).is_err());
        assert!(decode_gossip(&[9, 1, 2]).is_err());
        assert!(decode_gossip(&[TAG_MESSAGE, 0xff, 0x00]).is_err());
        assert!(decode_gossip(&[TAG_OP]).is_err());
    }

    #[test]
    fn in_sync_check_is_small() {
        // The periodic check sends a brief summary: what it costs per group
        // and interval when members agree.
        let req = SyncRequest::Summary {
            group_id: GroupId([7; 32]),
            summary: fogmesh_protocols::groups::Summary {
                membership_len: 12,
                heads_hash: [9; 32],
                per_sender: Vec::new(),
            },
        };
        let len = encode_sync_request(&req).len();
        assert!(len <= 160, "brief summary request is {len} bytes");
    }

    #[test]
    fn token_bucket_limits_bursts() {
        let mut b = TokenBucket::new(50.0);
        let passed = (0..1000).filter(|_| b.take()).count();
        assert!((200..210).contains(&passed), "{passed}");
    }
}
