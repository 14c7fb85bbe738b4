//! The groups actor: its state, how inputs and deadlines are dispatched,
//! restoring groups at start, and the storage and outbox glue every
//! handler shares.
//!
//! The actor runs on [`crate::actor::spawn`]'s thread. Its two timers are
//! deadlines: the periodic sync (every `sync_interval`) and the outbox
//! flush (every `outbox_interval`, and once at start). Handlers take the
//! `now` they are given; only message timestamps (informational, in ms
//! since the Unix epoch) read the wall clock, in [`now_ms`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fogmesh_protocols::groups::wire::{self, decode_op, encode_sync_response};
use fogmesh_protocols::groups::{Delivered, Group, GroupId, MessageId, Op};
use fogmesh_protocols::rate::{RateTable, TokenBucket};
use libp2p::PeerId;
use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::identity::Keypair;
use tokio::sync::{broadcast, mpsc};

use super::responder::{self, SyncWorker};
use super::store::{Batch, GroupStore};
use super::{GroupsConfig, Input, MAX_COMMIT_BATCH, NetCommand};
use crate::actor::{Actor, ServiceError};
use crate::metrics::NodeMetrics;
use crate::storage::StoreError;
use crate::types::{GroupInvite, GroupMessage, NodeEvent};

/// How long an outbox entry handed to the swarm waits for its answer
/// before it is offered again (an answer lost to a full queue must not
/// block an entry for ever).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// The groups actor's state.
pub(super) struct GroupsActor {
    pub(super) local: PeerId,
    pub(super) keypair: Keypair,
    pub(super) store: GroupStore,
    pub(super) groups: HashMap<GroupId, Group>,
    net: mpsc::Sender<NetCommand>,
    events: broadcast::Sender<NodeEvent>,
    pub(super) metrics: NodeMetrics,
    pub(super) connected: HashSet<PeerId>,
    /// Gossiped messages accepted per sender (see
    /// [`GroupsConfig::sender_rate`]).
    pub(super) rates: RateTable<PeerId>,
    /// Fetches of unknown groups' logs per peer (see [`super::sync`]).
    pub(super) invite_fetches: HashMap<PeerId, TokenBucket>,
    /// Sync requests answered per connected peer (see
    /// [`super::SYNC_REQUEST_RATE`]).
    pub(super) sync_rates: HashMap<PeerId, TokenBucket>,
    /// Invitations: pending, or accepted and waiting for the group's log.
    pub(super) invites: BTreeMap<GroupId, GroupInvite>,
    /// Declined groups, whose invitations are ignored.
    pub(super) declined: HashSet<GroupId>,
    /// When each group last asked a peer to catch up because of a message
    /// from a sender it did not know yet (at most once a second).
    pub(super) caught_up: HashMap<GroupId, Instant>,
    /// Stored envelopes and their bytes, per group (for the quotas).
    pub(super) usage: HashMap<GroupId, (u64, u64)>,
    /// Groups we were told of and asked a member for, with when: one
    /// membership log in flight per group, not one per member that tells
    /// us (a large group's log is hundreds of kilobytes).
    pub(super) joining: HashMap<GroupId, Instant>,
    /// Connected peers that showed they know a group (they sent or answered
    /// a summary of it). Periodic sync goes to a member not in here first,
    /// so that an added member whose neighbours all told it while it was
    /// busy still hears of the group within one interval.
    pub(super) knows: HashMap<GroupId, HashSet<PeerId>>,
    /// Outbox entries handed to the swarm and not answered yet, with when.
    pub(super) publishing: HashMap<MessageId, Instant>,
    pub(super) cfg: GroupsConfig,
    pub(super) rng: rand::rngs::StdRng,
    /// Received messages validated and applied but not committed yet, per
    /// group (see [`MAX_COMMIT_BATCH`]), and how many envelopes they hold.
    staged: Vec<(GroupId, Batch)>,
    staged_envelopes: usize,
    /// Gossip accepted but held until the staged messages are committed:
    /// its verdict forwards it, which must not happen before.
    held: Vec<(gossipsub::MessageId, PeerId)>,
    /// Completes answers to peers' sync requests off this thread (`None`
    /// if its thread could not start: then they are completed here).
    pub(super) responder: Option<SyncWorker>,
    /// When the periodic sync and the outbox flush are next due (set in
    /// `start`).
    next_sync: Option<Instant>,
    next_outbox: Option<Instant>,
}

impl Actor for GroupsActor {
    type Input = Input;

    fn start(&mut self, now: Instant) {
        if let Err(e) = self.restore() {
            tracing::error!("cannot restore groups: {e}");
        }
        self.flush_outbox(now);
        self.next_sync = Some(now + self.cfg.sync_interval);
        self.next_outbox = Some(now + self.cfg.outbox_interval);
    }

    fn on_input(&mut self, input: Input, now: Instant) {
        match input {
            Input::Api(call) => {
                // The user reads (and writes after) what was received.
                self.flush();
                self.on_api(call, now)
            }
            Input::Gossip {
                source,
                message_id,
                data,
            } => {
                let acceptance = self.on_gossip(source, &data, now);
                if matches!(acceptance, MessageAcceptance::Reject) {
                    self.metrics.group_messages_rejected.inc();
                }
                if matches!(acceptance, MessageAcceptance::Accept) && !self.staged.is_empty() {
                    // Forwarded once committed (with what else is staged).
                    self.held.push((message_id, source));
                    if self.held.len() >= MAX_COMMIT_BATCH {
                        self.flush();
                    }
                } else {
                    self.net_send(NetCommand::Validation {
                        message_id,
                        source,
                        acceptance,
                    });
                }
            }
            Input::SyncRequest {
                peer,
                frame,
                channel,
            } => {
                // Answers are read from the database: commit first.
                self.flush();
                self.answer_sync_request(peer, &frame, channel, now);
            }
            Input::SyncResponse { peer, group, frame } => {
                self.on_sync_response(peer, group, &frame, now)
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
            Input::PeerConnected(peer) => self.on_connected(peer),
            Input::PeerDisconnected(peer) => {
                self.connected.remove(&peer);
                self.invite_fetches.remove(&peer);
                self.sync_rates.remove(&peer);
                for k in self.knows.values_mut() {
                    k.remove(&peer);
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        [self.next_sync, self.next_outbox]
            .into_iter()
            .flatten()
            .min()
    }

    fn end_of_pass(&mut self, _now: Instant) {
        self.flush();
    }

    fn on_deadline(&mut self, now: Instant) {
        self.flush();
        if self.next_sync.is_some_and(|t| now >= t) {
            self.next_sync = Some(now + self.cfg.sync_interval);
            self.periodic_sync();
        }
        if self.next_outbox.is_some_and(|t| now >= t) {
            self.next_outbox = Some(now + self.cfg.outbox_interval);
            self.flush_outbox(now);
        }
    }

    fn stop(&mut self, _now: Instant) {
        self.flush();
        tracing::debug!("groups actor stopped");
    }
}

impl GroupsActor {
    pub(super) fn new(
        keypair: Keypair,
        store: GroupStore,
        net: mpsc::Sender<NetCommand>,
        events: broadcast::Sender<NodeEvent>,
        metrics: NodeMetrics,
        cfg: GroupsConfig,
    ) -> Self {
        let responder = match SyncWorker::start(store.clone(), net.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!("cannot start the group sync thread, answering inline: {e}");
                None
            }
        };
        GroupsActor {
            local: keypair.public().to_peer_id(),
            keypair,
            store,
            groups: HashMap::new(),
            net,
            events,
            metrics,
            connected: HashSet::new(),
            rates: RateTable::new(super::MAX_RATE_SENDERS),
            invite_fetches: HashMap::new(),
            sync_rates: HashMap::new(),
            invites: BTreeMap::new(),
            declined: HashSet::new(),
            caught_up: HashMap::new(),
            usage: HashMap::new(),
            joining: HashMap::new(),
            knows: HashMap::new(),
            publishing: HashMap::new(),
            cfg,
            rng: rand::make_rng(),
            staged: Vec::new(),
            staged_envelopes: 0,
            held: Vec::new(),
            responder,
            next_sync: None,
            next_outbox: None,
        }
    }

    /// Rebuilds every group from its stored ops and envelopes, and
    /// subscribes to the topics of those this node is a member of.
    /// Then collects the rows of groups it does not hold, and loads the
    /// invitations (accepting those of admins trusted since).
    fn restore(&mut self) -> Result<(), StoreError> {
        for gid in self.store.groups()? {
            if let Some(group) = self.restore_group(gid)? {
                if group.membership().is_member(&self.local) {
                    self.net_send(NetCommand::Subscribe(group.topic()));
                }
                self.groups.insert(gid, group);
            }
        }
        let keep: HashSet<GroupId> = self.groups.keys().copied().collect();
        let orphans = self.store.collect_orphans(&keep)?;
        if !orphans.is_empty() {
            tracing::info!(
                n = orphans.len(),
                "collected the rows of groups this node is not in"
            );
        }
        self.declined = self.store.declined()?.into_iter().collect();
        for mut inv in self.store.invites()? {
            let Some(gid) = super::handle::parse_group(&inv.group_id).ok() else {
                continue;
            };
            if self.groups.contains_key(&gid) {
                self.store.remove_invite(&gid)?;
                continue;
            }
            if !inv.accepted && inv.inviter.parse().is_ok_and(|p| self.trusts(&p)) {
                inv.accepted = true;
                self.store.put_invite(&gid, &inv)?;
            }
            self.invites.insert(gid, inv);
        }
        tracing::info!(
            groups = self.groups.len(),
            invites = self.invites.len(),
            "groups restored"
        );
        Ok(())
    }

    /// Whether invitations from `admin` are accepted without asking.
    pub(super) fn trusts(&self, admin: &PeerId) -> bool {
        self.cfg.trust_everyone || self.cfg.trust.contains(admin)
    }

    fn restore_group(&mut self, gid: GroupId) -> Result<Option<Group>, StoreError> {
        let ops = self.store.ops(&gid)?;
        let mut iter = ops.iter().filter_map(|b| decode_op(b).ok());
        let Some(genesis) = iter.next() else {
            return Ok(None);
        };
        let mut group = match Group::join(self.keypair.clone(), genesis) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(group = %gid.to_hex(), "cannot restore group: {e}");
                return Ok(None);
            }
        };
        for op in iter {
            if let Err(e) = group.receive_op(op) {
                tracing::warn!(group = %gid.to_hex(), "stored op refused on replay: {e}");
            }
        }
        // Deliveries during replay are already in the history, except those
        // a crash cut off between two commits: commit catches them (it skips
        // what was delivered).
        let mut batch = Batch::default();
        let mut usage = (0, 0);
        for bytes in self.store.envelopes_for_replay(&gid)? {
            usage.0 += 1;
            usage.1 += bytes.len() as u64;
            let Ok(env) = wire::decode_envelope(&bytes) else {
                continue;
            };
            if let Ok(d) = group.receive_message(env) {
                batch.delivered.extend(d.iter().map(to_message));
            }
        }
        if !batch.is_empty() {
            let missed = self.store.commit(&gid, batch)?;
            if !missed.is_empty() {
                tracing::info!(group = %gid.to_hex(), n = missed.len(), "recovered deliveries on replay");
            }
        }
        self.usage.insert(gid, usage);
        Ok(Some(group))
    }

    /// A new neighbour: catch up with it on every group it shares with us,
    /// and let it learn groups it was added to.
    fn on_connected(&mut self, peer: PeerId) {
        self.connected.insert(peer);
        let shared: Vec<GroupId> = self
            .groups
            .iter()
            .filter(|(_, g)| {
                g.membership().is_member(&peer) && g.membership().is_member(&self.local)
            })
            .map(|(id, _)| *id)
            .collect();
        for gid in shared {
            self.send_summary(peer, gid);
        }
    }

    pub(super) fn net_send(&self, cmd: NetCommand) {
        // The swarm loop drains this queue quickly; blocking here applies
        // backpressure to the actor, never to the network loop.
        if self.net.blocking_send(cmd).is_err() {
            tracing::debug!("swarm loop gone; dropping a network command");
        }
    }

    /// Refuses a new envelope of `len` bytes when the group is at its
    /// storage quota.
    pub(super) fn check_quota(&self, gid: &GroupId, len: usize) -> Result<(), ServiceError> {
        let (n, bytes) = self.usage.get(gid).copied().unwrap_or_default();
        if n >= super::MAX_GROUP_MESSAGES || bytes + len as u64 > super::MAX_GROUP_BYTES {
            return Err(ServiceError::Forbidden(format!(
                "group {} is at its storage quota ({} messages, {} MiB)",
                gid.to_hex(),
                super::MAX_GROUP_MESSAGES,
                super::MAX_GROUP_BYTES >> 20
            )));
        }
        Ok(())
    }

    /// Counts a stored envelope of `len` bytes.
    pub(super) fn count_stored(&mut self, gid: GroupId, len: usize) {
        let used = self.usage.entry(gid).or_default();
        used.0 += 1;
        used.1 += len as u64;
    }

    pub(super) fn emit(&self, ev: NodeEvent) {
        let _ = self.events.send(ev);
    }

    /// Stages a received message's batch for the next commit (at the end
    /// of the actor's pass, before the next API call or sync answer, or
    /// once [`MAX_COMMIT_BATCH`] envelopes are staged).
    pub(super) fn stage(&mut self, gid: GroupId, batch: Batch) {
        self.staged_envelopes += batch.envelopes.len();
        match self.staged.iter_mut().find(|(g, _)| *g == gid) {
            Some((_, b)) => b.extend(batch),
            None => self.staged.push((gid, batch)),
        }
        if self.staged_envelopes >= MAX_COMMIT_BATCH {
            self.flush();
        }
    }

    /// Commits what is staged in one transaction, then announces what it
    /// delivered and sends the held gossip verdicts: `Accept` once
    /// committed, `Ignore` (not forwarded) if the commit failed.
    pub(super) fn flush(&mut self) {
        if self.staged.is_empty() && self.held.is_empty() {
            return;
        }
        let staged = std::mem::take(&mut self.staged);
        self.staged_envelopes = 0;
        let mut acceptance = MessageAcceptance::Accept;
        if !staged.is_empty() {
            match self.store.commit_many(staged) {
                Ok(done) => {
                    for (gid, delivered) in done {
                        self.announce(&gid, delivered);
                    }
                }
                Err(e) => {
                    tracing::error!("cannot store received group messages: {e}");
                    acceptance = MessageAcceptance::Ignore;
                }
            }
        }
        for (message_id, source) in std::mem::take(&mut self.held) {
            self.net_send(NetCommand::Validation {
                message_id,
                source,
                acceptance,
            });
        }
    }

    /// Sends the answer to a sync request: planned here, completed by the
    /// sync worker (here if its thread did not start; without envelopes if
    /// its queue is full).
    fn answer_sync_request(
        &mut self,
        peer: PeerId,
        frame: &[u8],
        reply: responder::SyncReply,
        now: Instant,
    ) {
        let plan = match self.plan_sync_answer(peer, frame, now) {
            Ok(plan) => plan,
            Err(frame) => return responder::deliver(&self.net, reply, frame),
        };
        let Some(worker) = &self.responder else {
            let frame = responder::answer(&self.store, plan);
            return responder::deliver(&self.net, reply, frame);
        };
        if let Err(back) = worker.submit(plan, reply) {
            let (plan, reply) = *back;
            tracing::debug!(%peer, "sync worker busy: answering without envelopes");
            let frame = encode_sync_response(&plan.fill(|_| None).response);
            responder::deliver(&self.net, reply, frame);
        }
    }

    /// Persists the group's newest `ops` (and what they delivered).
    pub(super) fn commit_ops(
        &mut self,
        id: GroupId,
        ops: Vec<Op>,
        delivered: Vec<Delivered>,
    ) -> Result<(), ServiceError> {
        // In order: what was received before these ops first.
        self.flush();
        let Some(group) = self.groups.get(&id) else {
            return Ok(());
        };
        let first = group.membership().len() - ops.len() as u64;
        let batch = Batch {
            delivered: delivered.iter().map(to_message).collect(),
            ..Batch::of_ops(first, &ops)
        };
        let delivered = self.store.commit(&id, batch)?;
        self.announce(&id, delivered);
        Ok(())
    }

    /// Tells the application of newly delivered messages.
    pub(super) fn announce(&self, gid: &GroupId, delivered: Vec<GroupMessage>) {
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

    /// Offers every unpublished message to gossipsub again, except those
    /// whose last offer is still unanswered.
    fn flush_outbox(&mut self, now: Instant) {
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
            if self
                .publishing
                .get(&mid)
                .is_some_and(|t| now.saturating_duration_since(*t) < PUBLISH_TIMEOUT)
            {
                continue;
            }
            self.publishing.insert(mid, now);
            self.net_send(NetCommand::Publish {
                topic: group.topic(),
                data: frame,
                outbox: Some((gid, mid)),
            });
        }
    }
}

/// A delivered message as the API and the history store it.
pub(super) fn to_message(d: &Delivered) -> GroupMessage {
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

/// Wall-clock time for message and op timestamps, which are informational
/// (never used for ordering or limits).
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(super) use fogmesh_protocols::rate::{MILLI, message_bucket};

#[cfg(test)]
mod tests {
    use super::*;

    /// What passes in `secs` seconds offered one message every `step`.
    fn passed(rate: f64, secs: u64, step: Duration) -> usize {
        let t0 = Instant::now();
        let mut b = message_bucket(rate);
        let steps = Duration::from_secs(secs).as_nanos() / step.as_nanos();
        (0..steps as u32)
            .filter(|i| b.try_take(MILLI, t0 + step * *i).is_ok())
            .count()
    }

    #[test]
    fn message_buckets_pass_bursts_then_the_rate() {
        // A burst of 200, then 50 a second.
        let at_once = {
            let t0 = Instant::now();
            let mut b = message_bucket(50.0);
            (0..1000).filter(|_| b.try_take(MILLI, t0).is_ok()).count()
        };
        assert_eq!(at_once, 200);
        let n = passed(50.0, 10, Duration::from_millis(1));
        assert!((695..=705).contains(&n), "{n}");
    }

    #[test]
    fn rates_below_one_a_second_still_pass() {
        // 0.5/s: a burst of 2, then one every 2 s.
        let n = passed(0.5, 60, Duration::from_millis(100));
        assert!((31..=33).contains(&n), "{n}");
        // 0.1/s: the burst (0.4) is below one message; one every 10 s.
        let n = passed(0.1, 60, Duration::from_millis(100));
        assert!((6..=7).contains(&n), "{n}");
    }
}
