//! The network side of mailboxes (docs/protocols/mailbox.md):
//!
//! - **deposits**: the messages actor's [`Command::Deposit`] goes to the
//!   [`HOLDERS`] peers closest to the recipient's mailbox key of the day
//!   (a Kademlia closest-peers lookup of the key), and, with BLE, to up
//!   to [`HOLDERS`] BLE neighbours, which carry it as couriers; the
//!   holders that accepted are reported back to the actor;
//! - **pickup**: the node asks for its mail every peer it connects to
//!   (at most every [`REFETCH_MS`] per peer: a courier that comes into
//!   range, a holder met again) and, every [`PICKUP_MS`] and once soon
//!   after start, the peers closest to its own keys of today and
//!   yesterday; what they hand over goes to the messages actor as
//!   `Input::Picked` (the same path as a direct envelope), which asks for
//!   each holder's copy to be deleted once the letter is committed;
//! - **holding**: peers' requests go to the holder thread, whose answers
//!   come back here to be sent.
//!
//! A holder knows who asks from the Noise-authenticated connection: it
//! hands out and deletes only the asking peer's mail (or, for deletes,
//! what the asking peer deposited).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use fogmesh_protocols::mailbox::wire::{Id, MAX_DELETE_IDS, decode_envelope};
use fogmesh_protocols::mailbox::{
    HOLDERS, MAX_DEPOSIT, Refusal, Request, Response, key, keys_to_check,
};
use fogmesh_protocols::messages::MessageId;
use fogmesh_protocols::policy::Route;
use fogmesh_protocols::rate::{RateTable, TokenBucket};
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::{PeerId, Swarm, kad};
use tokio::sync::mpsc;

use super::event_loop::Ctx;
use super::exchange::{Exchange, exchange};
use super::peers::PeerBook;
use crate::behaviour::{Behaviour, MailboxFrame};
use crate::mailbox::{Command, Holder, HolderAnswer, HolderRequest};
use crate::messages::{Input, MessagesHandle, now_ms};
use crate::types::{MailboxStatus, NodeEvent};

/// How often the node asks its holders for mail.
const PICKUP_MS: u64 = 60_000;
/// Least time between two fetches from one peer.
const REFETCH_MS: u64 = 10_000;
/// Least time between two fetches from one peer on new connections.
const CONNECT_REFETCH_MS: u64 = 1_000;
/// Requests one peer may send this node per second, sustained (bursts
/// of four times as many).
const PEER_RATE: u64 = 10;
/// Peers whose rate and fetch times are tracked at once.
const MAX_TRACKED_PEERS: usize = 4096;
/// Deposits (and their lookups) in flight at once; beyond, a deposit
/// fails at once and the actor tries again later.
const MAX_FANS: usize = 256;

/// What the event loop hands this module from its queues.
pub(super) enum Work {
    /// The holder thread's answer to a peer.
    Answer(HolderAnswer),
    /// The messages actor's command.
    Command(Command),
}

/// What an outstanding request was.
enum Sent {
    Deposit(u64),
    Fetch,
    Delete,
    /// A delete the user asked for, and where its answer goes.
    UserDelete(tokio::sync::oneshot::Sender<Result<u32, String>>),
}

/// What a Kademlia lookup is for.
enum Lookup {
    Deposit(u64),
    Pickup,
}

/// One deposit under way: the holders asked and their answers.
struct Fan {
    id: Option<MessageId>,
    to: PeerId,
    env_id: Id,
    frame: Vec<u8>,
    outstanding: usize,
    asked: HashSet<PeerId>,
    holders: Vec<PeerId>,
    errors: Vec<String>,
}

pub(super) struct MailboxNet {
    me: PeerId,
    holder: Holder,
    commands: mpsc::Receiver<Command>,
    messages: MessagesHandle,
    requests: HashMap<OutboundRequestId, Sent>,
    lookups: HashMap<kad::QueryId, Lookup>,
    fans: HashMap<u64, Fan>,
    next_fan: u64,
    fetched_at: HashMap<PeerId, u64>,
    /// Holders that said more mail waits: fetched again after a delete.
    more: HashSet<PeerId>,
    last_pickup: Option<u64>,
    rates: RateTable<PeerId>,
}

impl MailboxNet {
    pub(super) fn new(
        me: PeerId,
        holder: Holder,
        commands: mpsc::Receiver<Command>,
        messages: MessagesHandle,
    ) -> Self {
        MailboxNet {
            me,
            holder,
            commands,
            messages,
            requests: HashMap::new(),
            lookups: HashMap::new(),
            fans: HashMap::new(),
            next_fan: 0,
            fetched_at: HashMap::new(),
            more: HashSet::new(),
            last_pickup: None,
            rates: RateTable::new(MAX_TRACKED_PEERS),
        }
    }

    /// What the node holds for others (for `status`).
    pub(super) fn status(&self) -> MailboxStatus {
        self.holder.status()
    }

    /// The next command of the messages actor or answer of the holder
    /// thread; `None` once both are gone.
    pub(super) async fn next_work(&mut self) -> Option<Work> {
        tokio::select! {
            Some(a) = self.holder.answers.recv() => Some(Work::Answer(a)),
            Some(c) = self.commands.recv() => Some(Work::Command(c)),
            else => None,
        }
    }

    /// Carries out one piece of [`MailboxNet::next_work`].
    pub(super) fn on_work(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        work: Work,
    ) {
        match work {
            Work::Answer(a) => self.on_answer(swarm, a),
            Work::Command(c) => self.on_command(swarm, ctx, peers, c),
        }
    }

    /// Sends the holder's answer to the peer that asked.
    fn on_answer(&mut self, swarm: &mut Swarm<Behaviour>, ans: HolderAnswer) {
        let frame = MailboxFrame(ans.resp.encode());
        if swarm
            .behaviour_mut()
            .mailbox
            .send_response(ans.channel, frame)
            .is_err()
        {
            tracing::debug!(peer = %ans.peer, "mailbox answer not sent: the stream closed");
        }
    }

    fn on_command(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        cmd: Command,
    ) {
        match cmd {
            Command::Deposit { id, env } => {
                let frame = env.encode();
                let n = self.next_fan;
                self.next_fan += 1;
                let mut fan = Fan {
                    id,
                    to: env.to,
                    env_id: Id::of(&env),
                    frame,
                    outstanding: 0,
                    asked: HashSet::new(),
                    holders: Vec::new(),
                    errors: Vec::new(),
                };
                if fan.frame.len() > MAX_DEPOSIT {
                    fan.errors
                        .push("too large for mailboxes (16 KiB at most)".into());
                } else if self.fans.len() >= MAX_FANS {
                    fan.errors.push("too many deposits under way".into());
                } else {
                    if ctx.route_up(Route::Ble) {
                        // Couriers: BLE neighbours carry it and hand it
                        // over when they meet the recipient.
                        let couriers: Vec<PeerId> = peers
                            .ble_neighbours()
                            .into_iter()
                            .filter(|p| *p != env.to && *p != self.me)
                            .take(HOLDERS)
                            .collect();
                        for p in couriers {
                            self.send_deposit(swarm, &mut fan, n, p);
                        }
                    }
                    if ctx.route_up(Route::Internet) {
                        let k = key(&env.to, fogmesh_protocols::mailbox::day(now_ms()));
                        let q = swarm.behaviour_mut().kad.get_closest_peers(k.to_vec());
                        self.lookups.insert(q, Lookup::Deposit(n));
                        fan.outstanding += 1;
                    }
                    if fan.outstanding == 0 {
                        fan.errors.push("no route is up for mailboxes".into());
                    }
                }
                self.fans.insert(n, fan);
                self.settle(n);
            }
            Command::Picked { holder, id } => self.delete(swarm, holder, vec![id]),
            Command::Delivered { holders, ids } => {
                for h in holders {
                    for chunk in ids.chunks(MAX_DELETE_IDS) {
                        self.delete(swarm, h, chunk.to_vec());
                    }
                }
            }
        }
    }

    fn send_deposit(&mut self, swarm: &mut Swarm<Behaviour>, fan: &mut Fan, n: u64, peer: PeerId) {
        if !fan.asked.insert(peer) {
            return;
        }
        let req = Request::Deposit {
            envelope: fan.frame.clone(),
        };
        let r = swarm
            .behaviour_mut()
            .mailbox
            .send_request(&peer, MailboxFrame(req.encode()));
        self.requests.insert(r, Sent::Deposit(n));
        fan.outstanding += 1;
    }

    fn delete(&mut self, swarm: &mut Swarm<Behaviour>, holder: PeerId, ids: Vec<Id>) {
        if ids.is_empty() || holder == self.me {
            return;
        }
        let r = swarm
            .behaviour_mut()
            .mailbox
            .send_request(&holder, MailboxFrame(Request::Delete { ids }.encode()));
        self.requests.insert(r, Sent::Delete);
    }

    /// The user's delete (`fogmesh mailbox-delete`): answered with the
    /// holder's count.
    pub(super) fn user_delete(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        holder: PeerId,
        ids: Vec<Id>,
        reply: tokio::sync::oneshot::Sender<Result<u32, String>>,
    ) {
        if holder == self.me {
            let _ = reply.send(Err("this node is not its own holder".into()));
            return;
        }
        let r = swarm
            .behaviour_mut()
            .mailbox
            .send_request(&holder, MailboxFrame(Request::Delete { ids }.encode()));
        self.requests.insert(r, Sent::UserDelete(reply));
    }

    fn fetch(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, force: bool) {
        if peer == self.me {
            return;
        }
        let now = now_ms();
        if !force
            && self
                .fetched_at
                .get(&peer)
                .is_some_and(|t| now.saturating_sub(*t) < REFETCH_MS)
        {
            return;
        }
        if self.fetched_at.len() >= MAX_TRACKED_PEERS {
            self.fetched_at.clear();
        }
        self.fetched_at.insert(peer, now);
        let r = swarm
            .behaviour_mut()
            .mailbox
            .send_request(&peer, MailboxFrame(Request::Fetch.encode()));
        self.requests.insert(r, Sent::Fetch);
    }

    /// Reports a deposit whose answers are all in.
    fn settle(&mut self, n: u64) {
        if self.fans.get(&n).is_none_or(|f| f.outstanding > 0) {
            return;
        }
        let Some(fan) = self.fans.remove(&n) else {
            return;
        };
        tracing::debug!(to = %fan.to, holders = fan.holders.len(), "mailbox deposit settled");
        if let Err(e) = self.messages.offer(Input::Deposited {
            id: fan.id,
            env_id: fan.env_id,
            holders: fan.holders,
            errors: fan.errors,
        }) {
            tracing::debug!("deposit result dropped: {e}");
        }
    }

    /// A connection came up: ask the peer for mail (a courier in range, a
    /// holder met again), and look the holders up if that is due.
    pub(super) fn peer_connected(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        peer: PeerId,
    ) {
        // A new connection is worth a fetch even if the last one was
        // recent (a courier back in range): only simultaneous connections
        // (TCP and QUIC at once) share one.
        let now = now_ms();
        let recent = self
            .fetched_at
            .get(&peer)
            .is_some_and(|t| now.saturating_sub(*t) < CONNECT_REFETCH_MS);
        self.fetch(swarm, peer, !recent);
        self.tick(swarm, ctx, peers);
    }

    /// Periodic: look up this node's holders and ask them for mail.
    pub(super) fn tick(&mut self, swarm: &mut Swarm<Behaviour>, ctx: &Ctx, peers: &PeerBook) {
        let now = now_ms();
        if self
            .last_pickup
            .is_some_and(|t| now.saturating_sub(t) < PICKUP_MS)
        {
            return;
        }
        self.last_pickup = Some(now);
        // Couriers around may have come by a link that is older than
        // their load.
        if ctx.route_up(Route::Ble) {
            for p in peers.ble_neighbours() {
                self.fetch(swarm, p, false);
            }
        }
        if !ctx.route_up(Route::Internet) {
            return;
        }
        for k in keys_to_check(&self.me, now) {
            let q = swarm.behaviour_mut().kad.get_closest_peers(k.to_vec());
            self.lookups.insert(q, Lookup::Pickup);
        }
    }

    /// Whether a Kademlia query is one of this module's lookups.
    pub(super) fn owns_lookup(&self, id: kad::QueryId) -> bool {
        self.lookups.contains_key(&id)
    }

    /// A lookup of a mailbox key ended: deposit with, or fetch from, the
    /// closest peers.
    pub(super) fn on_lookup(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        id: kad::QueryId,
        result: kad::GetClosestPeersResult,
    ) {
        let Some(what) = self.lookups.remove(&id) else {
            return;
        };
        let found = super::discovery::closest_found(result);
        let mut closest = Vec::new();
        for info in found {
            if info.peer_id == self.me {
                continue;
            }
            for a in info.addrs.iter().filter(|a| !fogmesh_ble::is_ble(a)) {
                swarm.add_peer_address(info.peer_id, a.clone());
            }
            closest.push(info.peer_id);
        }
        match what {
            Lookup::Pickup => {
                for p in closest.into_iter().take(HOLDERS + 1) {
                    self.fetch(swarm, p, false);
                }
            }
            Lookup::Deposit(n) => {
                let Some(mut fan) = self.fans.remove(&n) else {
                    return;
                };
                fan.outstanding = fan.outstanding.saturating_sub(1);
                let holders: Vec<PeerId> = closest
                    .into_iter()
                    .filter(|p| *p != fan.to)
                    .take(HOLDERS)
                    .collect();
                if holders.is_empty() {
                    fan.errors.push("no mailbox holder found in the DHT".into());
                }
                for p in holders {
                    self.send_deposit(swarm, &mut fan, n, p);
                }
                self.fans.insert(n, fan);
                self.settle(n);
            }
        }
    }

    /// An event of the mailbox behaviour.
    pub(super) fn on_event(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        ev: request_response::Event<MailboxFrame, MailboxFrame>,
    ) {
        match exchange("mailbox", ev) {
            Some(Exchange::Request {
                peer,
                frame,
                channel,
            }) => {
                let refused = if !self.charge(peer) {
                    Some(Refusal::Busy)
                } else {
                    match Request::decode(&frame) {
                        Ok(req) => {
                            // A full queue drops the request with its
                            // channel: the peer sees a closed stream and
                            // tries again later.
                            if let Err(e) =
                                self.holder
                                    .mailbox
                                    .offer(HolderRequest { peer, req, channel })
                            {
                                tracing::debug!(%peer, "mailbox request dropped: {e}");
                            }
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(%peer, "malformed mailbox request: {e}");
                            Some(Refusal::Malformed)
                        }
                    }
                };
                if let Some(r) = refused {
                    let _ = swarm
                        .behaviour_mut()
                        .mailbox
                        .send_response(channel, MailboxFrame(Response::Refused(r).encode()));
                }
            }
            Some(Exchange::Answer {
                peer,
                request_id,
                result,
            }) => self.answered(swarm, ctx, peer, request_id, result),
            None => {}
        }
    }

    fn answered(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peer: PeerId,
        request_id: OutboundRequestId,
        result: Result<Vec<u8>, String>,
    ) {
        let Some(sent) = self.requests.remove(&request_id) else {
            return;
        };
        let resp =
            result.and_then(|f| Response::decode(&f).map_err(|e| format!("bad answer: {e}")));
        match sent {
            Sent::Deposit(n) => {
                if let Some(fan) = self.fans.get_mut(&n) {
                    fan.outstanding = fan.outstanding.saturating_sub(1);
                    match resp {
                        Ok(Response::Deposited) => fan.holders.push(peer),
                        Ok(Response::Refused(r)) => fan.errors.push(format!("{peer} refused: {r}")),
                        Ok(_) => fan.errors.push(format!("{peer}: unexpected answer")),
                        Err(e) => fan.errors.push(format!("{peer}: {e}")),
                    }
                }
                self.settle(n);
            }
            Sent::Fetch => match resp {
                Ok(Response::Fetched { items, more }) => {
                    let mut count = 0u64;
                    for item in items {
                        match decode_envelope(&item.envelope) {
                            // Only mail for this node: a holder cannot make
                            // it deliver someone else's.
                            Ok(env) if env.to == self.me && Id::of(&env) == item.id => {
                                count += 1;
                                if let Err(e) =
                                    self.messages.offer(Input::Picked { env, holder: peer })
                                {
                                    tracing::debug!("picked-up mail dropped: {e}");
                                }
                            }
                            _ => tracing::debug!(%peer, "holder handed over mail that is not ours"),
                        }
                    }
                    if count > 0 {
                        tracing::info!(%peer, count, "picked up mail");
                        ctx.emit(NodeEvent::MailPickedUp {
                            holder: peer.to_string(),
                            count,
                        });
                    }
                    if more {
                        self.more.insert(peer);
                    }
                }
                Ok(Response::Refused(r)) => tracing::debug!(%peer, "fetch refused: {r}"),
                Ok(_) => {}
                Err(e) => tracing::debug!(%peer, "fetch failed: {e}"),
            },
            Sent::UserDelete(reply) => {
                let _ = reply.send(match resp {
                    Ok(Response::Deleted { count }) => Ok(count),
                    Ok(Response::Refused(r)) => Err(format!("{peer} refused: {r}")),
                    Ok(_) => Err(format!("{peer}: unexpected answer")),
                    Err(e) => Err(format!("{peer}: {e}")),
                });
            }
            Sent::Delete => {
                if let Err(e) = &resp {
                    tracing::debug!(%peer, "mailbox delete failed: {e}");
                }
                if self.more.remove(&peer) {
                    self.fetch(swarm, peer, true);
                }
            }
        }
    }

    /// Takes one request from `peer`'s allowance.
    fn charge(&mut self, peer: PeerId) -> bool {
        self.rates.try_take(peer, 1, Instant::now(), || {
            TokenBucket::new(PEER_RATE, PEER_RATE * 4)
        })
    }
}
