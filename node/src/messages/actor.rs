//! The messages actor: the outbox (each pending message's route state,
//! driven by its deadlines), sealing, opening, ordering and receipts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fogmesh_protocols::groups::crypto::MemberSecret;
use fogmesh_protocols::messages::{
    self, Arrival, DEFAULT_TTL, Envelope, Inbox, Letter, MAX_TEXT, MessageId, Payload, Receipt,
    Step,
};
use fogmesh_protocols::policy::{Policy, Preference, Reachability, Requirements, Route};
use fogmesh_protocols::rate::{MILLI, RateTable, message_bucket};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use tokio::sync::{broadcast, mpsc};

use super::handle::ApiCall;
use super::store::{DmStore, InLetter, OutRecord};
use super::{AttemptResult, Input, MessagesConfig, NetCommand, now_ms};
use crate::actor::{Actor, ServiceError};
use crate::storage::StoreError;
use crate::types::{DirectAck, NodeEvent};

mod mailbox;

/// Senders whose rate is tracked at once; the least recently seen are
/// forgotten beyond this.
const MAX_TRACKED_SENDERS: usize = 4096;

pub(super) struct MessagesActor {
    me: PeerId,
    keypair: Keypair,
    secret: MemberSecret,
    store: DmStore,
    net: mpsc::Sender<NetCommand>,
    events: broadcast::Sender<NodeEvent>,
    reach: Reachability,
    cfg: MessagesConfig,
    /// Outgoing messages not yet delivered or expired, by id.
    pending: HashMap<MessageId, OutRecord>,
    /// Per-sender order state, loaded on first use.
    inboxes: HashMap<PeerId, Inbox>,
    rates: RateTable<PeerId>,
    /// The wall clock read once at start, and the monotonic instant it was
    /// read at: every time this actor uses is derived from the two, so
    /// deadlines and the times they are compared with never disagree.
    anchor: (Instant, u64),
    /// The network's mailbox side: deposits, deletes (none: no mailboxes).
    mailbox: Option<mpsc::Sender<crate::mailbox::Command>>,
    /// Deposits sent and not yet answered: messages, and receipts.
    depositing: std::collections::HashSet<MessageId>,
    receipts_depositing: usize,
    /// Messages deposited since this node started: the network side has
    /// their deposit duty (it lives in memory, so a message deposited
    /// before a restart is deposited once more).
    deposited_run: std::collections::HashSet<MessageId>,
}

impl MessagesActor {
    pub(super) fn new(
        keypair: Keypair,
        store: DmStore,
        net: mpsc::Sender<NetCommand>,
        events: broadcast::Sender<NodeEvent>,
        reach: Reachability,
        cfg: MessagesConfig,
    ) -> Result<Self, StoreError> {
        let secret = MemberSecret::from_keypair(&keypair)
            .map_err(|e| StoreError::Db(format!("identity key: {e}")))?;
        Ok(MessagesActor {
            me: keypair.public().to_peer_id(),
            keypair,
            secret,
            store,
            net,
            events,
            reach,
            cfg,
            pending: HashMap::new(),
            inboxes: HashMap::new(),
            rates: RateTable::new(MAX_TRACKED_SENDERS),
            anchor: (Instant::now(), now_ms()),
            mailbox: None,
            depositing: Default::default(),
            receipts_depositing: 0,
            deposited_run: Default::default(),
        })
    }

    /// `at` as ms since the Unix epoch.
    fn ms(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.anchor.0).as_millis();
        self.anchor
            .1
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }

    /// The instant of `ms` since the Unix epoch.
    fn instant(&self, ms: u64) -> Instant {
        self.anchor.0 + Duration::from_millis(ms.saturating_sub(self.anchor.1))
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

    fn emit_state(&self, rec: &OutRecord) {
        self.emit(NodeEvent::DirectMessageState {
            id: rec.id.to_string(),
            to: rec.to.to_string(),
            state: rec.out.state.as_str().into(),
            route: rec.out.delivered_by.map(|r| r.as_str().into()),
        });
    }

    fn on_api(&mut self, call: ApiCall, now: u64) {
        match call {
            ApiCall::Send {
                to,
                text,
                preference,
                private,
                reply,
            } => {
                let _ = reply.send(self.send(to, text, preference, private, now));
            }
            ApiCall::List { peer, limit, reply } => {
                let _ = reply.send(
                    self.store
                        .list(&self.me, peer.as_ref(), limit)
                        .map_err(ServiceError::from),
                );
            }
            ApiCall::Get { id, reply } => {
                let found = self.store.get(&self.me, &id).map_err(ServiceError::from);
                let _ = reply.send(found.and_then(|m| {
                    m.ok_or_else(|| ServiceError::NotFound(format!("no message {id} on this node")))
                }));
            }
            ApiCall::MailboxFlush { reply } => {
                let _ = reply.send(Ok(self.mailbox_flush(now)));
            }
            ApiCall::Outbox { reply } => {
                let mut recs: Vec<&OutRecord> = self.pending.values().collect();
                recs.sort_by_key(|r| (r.timestamp, r.seq));
                let _ = reply.send(Ok(recs.iter().map(|r| r.to_api(&self.me)).collect()));
            }
        }
    }

    fn send(
        &mut self,
        to: PeerId,
        text: String,
        preference: Preference,
        private: bool,
        now: u64,
    ) -> Result<DirectAck, ServiceError> {
        if text.len() > MAX_TEXT {
            return Err(ServiceError::BadRequest(format!(
                "message of {} bytes exceeds the limit of {MAX_TEXT}",
                text.len()
            )));
        }
        if to == self.me {
            return Err(ServiceError::BadRequest(
                "cannot send a direct message to this node itself".into(),
            ));
        }
        if let Err(e) = fogmesh_protocols::groups::crypto::ed25519_key(&to) {
            return Err(ServiceError::BadRequest(e.to_string()));
        }
        let waiting = self.pending.values().filter(|r| r.to == to).count();
        if waiting >= self.cfg.max_outbox_per_peer {
            return Err(ServiceError::BadRequest(format!(
                "{waiting} messages to {to} are already waiting (the limit): try again once some are delivered"
            )));
        }
        let req = Requirements {
            preference,
            private,
            ..Requirements::unicast()
        };
        let plan = Policy::default().plan(&req, &self.reach).routes;
        let note = plan.is_empty().then(|| match (preference, private) {
            (_, true) | (Preference::Only(Route::Onion), _) => {
                "private: the onion route needs the internet, which is off on this node (--no-internet)"
                    .to_owned()
            }
            (Preference::Only(Route::Ble), _) => {
                "waiting for route ble, which is off on this node (start it with --ble)".to_owned()
            }
            (Preference::Only(Route::Internet), _) => {
                "waiting for route internet, which is off on this node (--no-internet)".to_owned()
            }
            (Preference::Only(r), _) => format!("waiting for route {r}"),
            _ => "no route is up on this node".to_owned(),
        });
        let lifetime = u64::try_from(self.cfg.lifetime.as_millis()).unwrap_or(u64::MAX);
        let id = MessageId::random(&mut rand::rng());
        let rec = self.store.queue(&to, |seq| OutRecord {
            id,
            to,
            text,
            timestamp: now,
            seq,
            out: messages::Outgoing::new(plan, note, now, lifetime),
            mailbox: Default::default(),
        })?;
        let ack = DirectAck {
            message_id: id.to_string(),
            route_plan: rec.out.plan.iter().map(|r| r.as_str().into()).collect(),
            waiting: rec.out.waiting.clone(),
        };
        self.emit_state(&rec);
        self.pending.insert(id, rec);
        // The first attempt goes out at once (on the next deadline pass,
        // which is now).
        Ok(ack)
    }

    /// Runs every pending message whose deadline has come.
    fn poll(&mut self, now: u64) {
        let due: Vec<MessageId> = self
            .pending
            .iter()
            .filter(|(_, r)| r.out.deadline().is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        let mut changed = Vec::new();
        for id in due {
            changed.push(id);
            loop {
                let step = match self.pending.get_mut(&id) {
                    Some(rec) => rec.out.poll(now, &self.cfg.timeouts),
                    None => None,
                };
                match step {
                    Some(Step::Try { n, route }) => self.attempt(id, n, route, now),
                    Some(Step::TimedOut { route, .. }) => {
                        if let Some(rec) = self.pending.get(&id) {
                            self.net_send(NetCommand::NoReceipt { to: rec.to, route });
                        }
                    }
                    Some(Step::Expired) | None => break,
                }
            }
        }
        self.save(&changed);
    }

    /// Seals attempt `n` and hands it to the event loop.
    fn attempt(&mut self, id: MessageId, n: u32, route: Route, now: u64) {
        let Some(rec) = self.pending.get(&id) else {
            return;
        };
        let to = rec.to;
        // Everything before the lowest number still pending towards this
        // peer is delivered or given up.
        let floor = self
            .pending
            .values()
            .filter(|r| r.to == to)
            .map(|r| r.seq)
            .min()
            .unwrap_or(rec.seq);
        let letter = Letter {
            id,
            seq: rec.seq,
            floor,
            attempt: n,
            sent_at_ms: rec.timestamp,
            text: rec.text.clone(),
        };
        match messages::seal(
            &mut rand::rng(),
            &self.keypair,
            &to,
            &Payload::Letter(letter),
        ) {
            Ok(body) => self.net_send(NetCommand::Send {
                id,
                n,
                route,
                env: Envelope {
                    to,
                    ttl: DEFAULT_TTL,
                    body,
                },
            }),
            Err(e) => {
                if let Some(rec) = self.pending.get_mut(&id) {
                    rec.out.failed(n, format!("cannot seal: {e}"), now);
                }
            }
        }
    }

    /// Saves the records of `ids`, emits their state when it changed to a
    /// final one, and drops final ones from memory.
    fn save(&mut self, ids: &[MessageId]) {
        if ids.is_empty() {
            return;
        }
        let recs: Vec<&OutRecord> = ids.iter().filter_map(|id| self.pending.get(id)).collect();
        if let Err(e) = self.store.save_out(recs) {
            tracing::error!("cannot save the outbox: {e}");
            return;
        }
        for id in ids {
            if self.pending.get(id).is_some_and(|r| r.out.is_final())
                && let Some(rec) = self.pending.remove(id)
            {
                self.emit_state(&rec);
            }
        }
    }

    fn on_attempt(&mut self, id: MessageId, n: u32, result: AttemptResult, now: u64) {
        let Some(rec) = self.pending.get_mut(&id) else {
            return;
        };
        let before = rec.out.state;
        match result {
            AttemptResult::Accepted => rec.out.sent(n),
            AttemptResult::Unavailable(why) => rec.out.unavailable(n, why, now),
            AttemptResult::Failed(why) => rec.out.failed(n, why, now),
        }
        let changed = rec.out.state != before;
        self.save(&[id]);
        if changed && let Some(rec) = self.pending.get(&id) {
            self.emit_state(rec);
        }
    }

    fn on_envelope(&mut self, env: Envelope, via: Route, now: u64) {
        let opened = match messages::open(&self.secret, &self.me, &env.body) {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!("direct message dropped: {e}");
                return;
            }
        };
        match opened.payload {
            Payload::Letter(letter) => self.on_letter(opened.from, letter, via, now),
            Payload::Receipt(r) => self.on_receipt(opened.from, r),
        }
    }

    fn on_letter(&mut self, from: PeerId, letter: Letter, via: Route, now: u64) {
        if !self.charge(from) {
            tracing::debug!(%from, "direct message over the sender's rate: not acknowledged");
            return;
        }
        let inbox = match self.inboxes.get_mut(&from) {
            Some(i) => i,
            None => match self.store.inbox(&from) {
                Ok(i) => self.inboxes.entry(from).or_insert(i),
                Err(e) => {
                    tracing::error!("cannot read the inbox: {e}");
                    return;
                }
            },
        };
        let seq = letter.seq;
        let arrival = inbox.arrive(seq, letter.floor);
        let through = inbox.through;
        let in_letter = InLetter {
            id: letter.id,
            from,
            text: letter.text,
            timestamp: letter.sent_at_ms,
        };
        let stored = match &arrival {
            Arrival::Duplicate => Ok(()),
            Arrival::Full => return,
            Arrival::Held => self.store.hold(seq, &in_letter),
            Arrival::Deliver(seqs) => self
                .store
                .deliver(&from, seqs, Some((seq, in_letter)), through)
                .map(|delivered| {
                    for l in delivered {
                        self.emit(NodeEvent::DirectMessage {
                            id: l.id.to_string(),
                            from: l.from.to_string(),
                            text: l.text,
                            timestamp: l.timestamp,
                        });
                    }
                }),
        };
        if let Err(e) = stored {
            // The cached state ran ahead of the database: reload it next
            // time; the sender retries, having no receipt.
            tracing::error!("cannot store a direct message: {e}");
            self.inboxes.remove(&from);
            return;
        }
        let _ = now;
        self.send_receipt(from, vec![(letter.id, letter.attempt)], via);
    }

    /// Takes one letter from `from`'s allowance.
    fn charge(&mut self, from: PeerId) -> bool {
        let rate = self.cfg.sender_rate;
        self.rates
            .try_take(from, MILLI, Instant::now(), || message_bucket(rate))
    }

    fn send_receipt(&self, to: PeerId, ids: Vec<(MessageId, u32)>, via: Route) {
        match messages::seal(
            &mut rand::rng(),
            &self.keypair,
            &to,
            &Payload::Receipt(Receipt { ids }),
        ) {
            Ok(body) => self.net_send(NetCommand::Receipt {
                env: Envelope {
                    to,
                    ttl: DEFAULT_TTL,
                    body,
                },
                prefer: via,
            }),
            Err(e) => tracing::warn!("cannot seal a receipt: {e}"),
        }
    }

    fn on_receipt(&mut self, from: PeerId, receipt: Receipt) {
        let mut done = Vec::new();
        for (id, n) in receipt.ids.iter().copied() {
            // Only the recipient's own signature delivers a message.
            if let Some(rec) = self.pending.get_mut(&id)
                && rec.to == from
                && rec.out.receipt(n)
            {
                done.push(id);
            }
        }
        self.mailbox_delivered(&done, &receipt.ids);
        self.save(&done);
    }

    fn wake(&mut self, peer: Option<PeerId>, now: u64) {
        for rec in self.pending.values_mut() {
            if peer.is_none_or(|p| p == rec.to) {
                rec.out.wake(now);
            }
        }
    }
}

impl Actor for MessagesActor {
    type Input = Input;

    fn start(&mut self, now: Instant) {
        match self.store.pending() {
            Ok(recs) => {
                let now = self.ms(now);
                for mut rec in recs {
                    // An attempt in flight when the node stopped is lost
                    // with the process: try again at once.
                    rec.out.restart(now);
                    self.pending.insert(rec.id, rec);
                }
            }
            Err(e) => tracing::error!("cannot restore the outbox: {e}"),
        }
    }

    fn on_input(&mut self, input: Input, now: Instant) {
        let now = self.ms(now);
        match input {
            Input::Api(call) => self.on_api(call, now),
            Input::Envelope { env, via } => self.on_envelope(env, via, now),
            Input::Attempt { id, n, result } => self.on_attempt(id, n, result, now),
            Input::Wake(peer) => self.wake(peer, now),
            Input::Picked { env, holder } => self.on_picked(env, holder, now),
            Input::Deposited {
                id,
                env_id,
                holders,
                errors,
            } => self.on_deposited(id, env_id, holders, errors, now),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let next = self
            .pending
            .values()
            .filter_map(|r| r.out.deadline())
            .chain(self.mailbox_deadline())
            .min()?;
        Some(self.instant(next))
    }

    fn on_deadline(&mut self, now: Instant) {
        self.poll(self.ms(now));
        self.mailbox_poll(self.ms(now));
    }
}
