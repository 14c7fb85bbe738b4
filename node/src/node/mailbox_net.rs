//! The network side of mailboxes (docs/protocols/mailbox.md):
//!
//! - **deposits**: the messages actor's [`Command::Deposit`] goes to the
//!   [`HOLDERS`] peers closest to the recipient's mailbox key of the day
//!   (a Kademlia closest-peers lookup of the key), and, with BLE, to up
//!   to [`HOLDERS`] BLE neighbours, which carry it as couriers; a peer
//!   that refuses (or fails) is replaced by the next closest
//!   ([`Placement`]); the holders that accepted are reported back to the
//!   actor;
//! - **deposit duties**: while a deposited message is undelivered, BLE
//!   neighbours met later get a courier copy (at most [`MAX_COURIERS`]
//!   per message) and the internet holders are re-checked every
//!   `recheck` (a new lookup: peers that became closest, or replace
//!   holders that left, get a copy);
//! - **holding**: peers' requests go to the holder thread, whose answers
//!   come back here to be sent; a delete of a held envelope is passed on
//!   to the peers this node placed copies with;
//! - **passes over what is held**: soon after start, after a new internet
//!   connection, after a courier copy arrives over BLE, and every
//!   `recheck`, a holder walks what it holds ([`PASS_ITEMS`] envelopes a
//!   step) and, with internet, deposits each envelope with the peers now
//!   closest to its key that lack it (Kademlia's republish; a courier
//!   that gained internet hands its mail over this way), or, with BLE
//!   only, with a BLE neighbour that is a gateway;
//! - **pickup**: the node asks for its mail every peer it connects to
//!   (at most every [`REFETCH_MS`] per peer: a courier that comes into
//!   range, a holder met again; a fetch that failed is tried again within
//!   seconds) and, every `MailboxConfig::pickup` (a minute) and once
//!   soon after start, the peers closest to its own keys of today and
//!   yesterday; what they hand over goes to the messages actor as
//!   `Input::Picked` (the same path as a direct envelope), which asks for
//!   each holder's copy to be deleted once the letter is committed.
//!
//! A holder knows who asks from the Noise-authenticated connection: it
//! hands out and deletes only the asking peer's mail (or, for deletes,
//! what the asking peer deposited).

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use fogmesh_protocols::mailbox::placement::MAX_ASKS;
use fogmesh_protocols::mailbox::wire::{Id, MAX_DELETE_IDS, decode_envelope};
use fogmesh_protocols::mailbox::{
    HOLDERS, MAX_DEPOSIT, MailboxKey, Placement, Refusal, Request, Response, day, key,
    keys_to_check,
};
use fogmesh_protocols::messages::{Envelope, MessageId};
use fogmesh_protocols::policy::Route;
use fogmesh_protocols::rate::{RateTable, TokenBucket};
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::{PeerId, Swarm, kad};
use tokio::sync::mpsc;

use super::event_loop::Ctx;
use super::exchange::{Exchange, exchange};
use super::peers::PeerBook;
use crate::behaviour::{Behaviour, MailboxFrame};
use crate::mailbox::{
    Command, HeldCopy, Holder, HolderAnswer, HolderInput, HolderOut, HolderRequest,
};
use crate::messages::{Input, MessagesHandle, now_ms};
use crate::types::{MailboxStatus, NodeEvent};

/// Peers a mailbox lookup asks Kademlia for: what its users take at most
/// (a placement asks [`MAX_ASKS`], skipping the recipient and the peer
/// that handed the copy over; a pickup asks `HOLDERS + 1`), not
/// Kademlia's 20. A lookup ends once that many of the closest peers have
/// answered, and a stalled one has that many requests in flight, each
/// over a new connection as often as not.
const LOOKUP_RESULTS: NonZeroUsize = match NonZeroUsize::new(MAX_ASKS + 2) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};

/// Least time between two fetches from one peer.
const REFETCH_MS: u64 = 10_000;
/// Least time between two fetches from one peer on new connections.
const CONNECT_REFETCH_MS: u64 = 1_000;
/// A fetch that failed (the stream or the connection closed under it) is
/// tried again after this long, at most [`FETCH_RETRIES`] times in a row.
const FETCH_RETRY_MS: u64 = 2_000;
const FETCH_RETRIES: u8 = 3;
/// Requests one peer may send this node per second, sustained (bursts
/// of four times as many).
const PEER_RATE: u64 = 10;
/// Peers whose rate and fetch times are tracked at once.
const MAX_TRACKED_PEERS: usize = 4096;
/// Deposits (and their lookups) in flight at once; beyond, a deposit
/// fails at once and the actor tries again later.
const MAX_FANS: usize = 256;
/// Most BLE couriers one message (or receipt) is given to, over its whole
/// deposit duty.
pub(crate) const MAX_COURIERS: usize = 8;
/// Deposit duties kept at once (the oldest ends beyond).
const MAX_DUTIES: usize = 256;
/// How long a message's deposit duty lasts at most (a holder's lifetime
/// of an envelope); a receipt's lasts a day.
const DUTY_MS: u64 = 7 * 24 * 3600 * 1000;
const RECEIPT_DUTY_MS: u64 = 24 * 3600 * 1000;
/// Duties whose internet holders are re-checked in one poll, and courier
/// copies offered in one poll.
const RECHECKS_PER_POLL: usize = 4;
/// BLE peers one duty remembers having offered a copy to; beyond, it
/// offers no more.
const MAX_TRIED: usize = 64;
const COURIER_OFFERS_PER_POLL: usize = 16;
/// A holder's pass: envelopes per step, the delay of a pass something
/// asked for, and the least time between two steps.
pub(crate) const PASS_ITEMS: usize = 16;
const PASS_SOON_MS: u64 = 2_000;
const PASS_GAP_MS: u64 = 5_000;
/// The first pass after start.
const PASS_FIRST_MS: u64 = 10_000;
/// Held envelopes whose placed copies are remembered (for passing deletes
/// on and not asking the same peers again).
const MAX_PLACED: usize = 4096;

/// What the event loop hands this module from its queues.
pub(super) enum Work {
    /// The holder thread's answer to a peer, or a step of a pass.
    Holder(HolderOut),
    /// The messages actor's command.
    Command(Command),
}

/// What an outstanding request was.
enum Sent {
    /// A deposit of fan `fan`, to a BLE courier (`ble`) or an internet
    /// holder.
    Deposit {
        fan: u64,
        ble: bool,
    },
    Fetch,
    /// A delete of `ids`, after `failures` failed tries in transit.
    Delete {
        ids: Vec<Id>,
        failures: u8,
    },
    /// A delete the user asked for, and where its answer goes.
    UserDelete(tokio::sync::oneshot::Sender<Result<u32, String>>),
}

/// What a Kademlia lookup is for.
enum Lookup {
    /// Candidates for fan `n`'s internet holders.
    Deposit(u64),
    Pickup,
    /// A holder's pass: where these held envelopes (one recipient) go.
    Forward(Vec<HeldCopy>),
}

/// Why a fan runs.
#[derive(Clone, Copy)]
enum Why {
    /// This node's message (`Some`) or receipt (`None`); `first`: the
    /// actor's deposit (always reported), else a duty's (reported when a
    /// peer accepted).
    Deposit { id: Option<MessageId>, first: bool },
    /// A held envelope passed on (replication, hand-off).
    Forward,
}

/// One envelope being placed: BLE couriers and internet holders.
struct Fan {
    why: Why,
    to: PeerId,
    env_id: Id,
    frame: Vec<u8>,
    /// A lookup for internet holders is under way.
    lookup: bool,
    ble: Placement,
    net: Placement,
    errors: Vec<String>,
    /// BLE peers whose deposit failed in transit (not a refusal): a duty
    /// offers them again.
    ble_lost: Vec<PeerId>,
}

impl Fan {
    fn new(why: Why, to: PeerId, env_id: Id, frame: Vec<u8>) -> Self {
        Fan {
            why,
            to,
            env_id,
            frame,
            lookup: false,
            ble: Placement::new(0, MAX_ASKS),
            net: Placement::new(HOLDERS, MAX_ASKS),
            errors: Vec::new(),
            ble_lost: Vec::new(),
        }
    }

    fn done(&self) -> bool {
        !self.lookup && self.ble.done() && self.net.done()
    }
}

/// A deposit of this node's that goes on while it is undelivered.
struct Duty {
    id: Option<MessageId>,
    to: PeerId,
    frame: Vec<u8>,
    /// BLE peers offered a copy (accepted or refused).
    tried: HashSet<PeerId>,
    /// BLE peers that hold a copy.
    couriers: HashSet<PeerId>,
    until: u64,
    next_check: u64,
    /// A fan of this duty is under way.
    busy: bool,
}

impl Duty {
    /// A fan that deposits this duty's envelope again (not the first
    /// deposit); the caller says where (couriers or a lookup).
    fn redeposit(&self, env_id: Id) -> Fan {
        Fan::new(
            Why::Deposit {
                id: self.id,
                first: false,
            },
            self.to,
            env_id,
            self.frame.clone(),
        )
    }
}

pub(super) struct MailboxNet {
    me: PeerId,
    holder: Holder,
    commands: mpsc::Receiver<Command>,
    messages: MessagesHandle,
    recheck_ms: u64,
    /// How often the node asks its holders for mail.
    pickup_ms: u64,
    requests: HashMap<OutboundRequestId, Sent>,
    lookups: HashMap<kad::QueryId, Lookup>,
    fans: HashMap<u64, Fan>,
    next_fan: u64,
    duties: HashMap<Id, Duty>,
    fetched_at: HashMap<PeerId, u64>,
    /// Fetches that failed: when to try again, and how many failed.
    refetch: HashMap<PeerId, (u64, u8)>,
    /// Deletes that failed in transit, per holder: when to try again,
    /// after how many failures, and the ids.
    redelete: HashMap<PeerId, (u64, u8, Vec<Id>)>,
    /// Holders that said more mail waits: fetched again after a delete.
    more: HashSet<PeerId>,
    last_pickup: Option<u64>,
    rates: RateTable<PeerId>,
    /// Where this node, as a holder, placed copies of what it holds.
    placed: HashMap<Id, HashSet<PeerId>>,
    /// When the next step of a pass is due, where it goes on from, and
    /// whether one is under way.
    pass_due: u64,
    pass_cursor: Option<Id>,
    pass_walking: bool,
    last_pass: u64,
}

impl MailboxNet {
    pub(super) fn new(
        me: PeerId,
        holder: Holder,
        commands: mpsc::Receiver<Command>,
        messages: MessagesHandle,
        recheck: Duration,
        pickup: Duration,
    ) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        MailboxNet {
            me,
            holder,
            commands,
            messages,
            recheck_ms: ms(recheck).max(1_000),
            pickup_ms: ms(pickup).max(1_000),
            requests: HashMap::new(),
            lookups: HashMap::new(),
            fans: HashMap::new(),
            next_fan: 0,
            duties: HashMap::new(),
            fetched_at: HashMap::new(),
            refetch: HashMap::new(),
            redelete: HashMap::new(),
            more: HashSet::new(),
            last_pickup: None,
            rates: RateTable::new(MAX_TRACKED_PEERS),
            placed: HashMap::new(),
            pass_due: now_ms().saturating_add(PASS_FIRST_MS),
            pass_cursor: None,
            pass_walking: false,
            last_pass: 0,
        }
    }

    /// What the node holds for others (for `status`).
    pub(super) fn status(&self) -> MailboxStatus {
        self.holder.status()
    }

    /// The next command of the messages actor or output of the holder
    /// thread; `None` once both are gone.
    pub(super) async fn next_work(&mut self) -> Option<Work> {
        tokio::select! {
            Some(a) = self.holder.answers.recv() => Some(Work::Holder(a)),
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
            Work::Holder(HolderOut::Answer(a)) => self.on_answer(swarm, peers, a),
            Work::Holder(HolderOut::Walked { items, next }) => {
                self.on_walked(swarm, ctx, peers, items, next)
            }
            Work::Command(c) => self.on_command(swarm, ctx, peers, c),
        }
    }

    /// Sends the holder's answer to the peer that asked; passes a delete on
    /// to where this node placed copies; a courier copy that came over BLE
    /// is passed on soon (to the internet's holders, or a gateway).
    fn on_answer(&mut self, swarm: &mut Swarm<Behaviour>, peers: &PeerBook, ans: HolderAnswer) {
        let frame = MailboxFrame(ans.resp.encode());
        if swarm
            .behaviour_mut()
            .mailbox
            .send_response(ans.channel, frame)
            .is_err()
        {
            tracing::debug!(peer = %ans.peer, "mailbox answer not sent: the stream closed");
        }
        for id in ans.dropped {
            // This node deposited these copies: its delete is honoured.
            for p in self.placed.remove(&id).into_iter().flatten() {
                self.delete(swarm, p, vec![id], 0);
            }
        }
        if ans.stored && peers.has_ble(&ans.peer) && !peers.has_internet(&ans.peer) {
            self.pass_soon();
        }
    }

    /// Asks for a pass over what is held soon (not sooner than
    /// [`PASS_GAP_MS`] after the last step); a finished sweep starts over.
    fn pass_soon(&mut self) {
        let now = now_ms();
        let at = now
            .saturating_add(PASS_SOON_MS)
            .max(self.last_pass.saturating_add(PASS_GAP_MS));
        self.pass_due = self.pass_due.min(at);
    }

    fn on_command(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        cmd: Command,
    ) {
        match cmd {
            Command::Deposit { id, env } => self.deposit(swarm, ctx, peers, id, env),
            Command::Picked { holder, id } => self.delete(swarm, holder, vec![id], 0),
            Command::Delivered { id, holders, ids } => {
                self.duties
                    .retain(|env_id, d| !(ids.contains(env_id) || (id.is_some() && d.id == id)));
                for h in holders {
                    for chunk in ids.chunks(MAX_DELETE_IDS) {
                        self.delete(swarm, h, chunk.to_vec(), 0);
                    }
                }
            }
        }
    }

    /// The messages actor's deposit of `env` (a message's, or a receipt
    /// when `id` is `None`): its first fan (BLE couriers in range, the
    /// internet holders closest to the recipient's key of today) and the
    /// duty that goes on while it is undelivered.
    fn deposit(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        id: Option<MessageId>,
        env: Envelope,
    ) {
        let frame = env.encode();
        let env_id = Id::of(&env);
        let now = now_ms();
        let mut fan = Fan::new(
            Why::Deposit { id, first: true },
            env.to,
            env_id,
            frame.clone(),
        );
        if frame.len() > MAX_DEPOSIT {
            fan.errors
                .push("too large for mailboxes (16 KiB at most)".into());
            self.finish(fan);
            return;
        }
        if self.fans.len() >= MAX_FANS {
            fan.errors.push("too many deposits under way".into());
            self.finish(fan);
            return;
        }
        let mut duty = self.new_duty(id, env.to, frame, now);
        let mut any = false;
        if ctx.route_up(Route::Ble) {
            // Couriers: BLE neighbours carry it and hand it over
            // when they meet the recipient or gain internet.
            let couriers: Vec<PeerId> = peers
                .ble_neighbours()
                .into_iter()
                .filter(|p| *p != env.to && *p != self.me)
                .collect();
            // Those around now are offered a copy by this deposit
            // only; the duty offers one to those met later.
            duty.tried.extend(couriers.iter().copied());
            if couriers.is_empty() && !ctx.route_up(Route::Internet) {
                fan.errors.push("no BLE neighbour to carry it (yet)".into());
            }
            fan.ble = Placement::new(HOLDERS, MAX_COURIERS);
            fan.ble.add_candidates(couriers);
            any = true;
        }
        if ctx.route_up(Route::Internet) {
            let k = key(&env.to, day(now));
            let q = lookup(swarm, &k);
            self.lookups.insert(q, Lookup::Deposit(self.next_fan));
            fan.lookup = true;
            any = true;
        }
        if !any {
            fan.errors.push("no route is up for mailboxes".into());
        }
        self.duties.insert(env_id, duty);
        self.start(swarm, fan);
    }

    /// The duty of a new deposit, in place of the same message's older
    /// one (the oldest duty makes room when there are too many).
    fn new_duty(&mut self, id: Option<MessageId>, to: PeerId, frame: Vec<u8>, now: u64) -> Duty {
        if id.is_some() {
            self.duties.retain(|_, d| d.id != id);
        }
        if self.duties.len() >= MAX_DUTIES
            && let Some(oldest) = (self.duties.iter())
                .min_by_key(|(_, d)| d.until)
                .map(|(k, _)| *k)
        {
            self.duties.remove(&oldest);
        }
        let life = if id.is_some() {
            DUTY_MS
        } else {
            RECEIPT_DUTY_MS
        };
        Duty {
            id,
            to,
            frame,
            tried: HashSet::new(),
            couriers: HashSet::new(),
            until: now.saturating_add(life),
            next_check: now.saturating_add(self.recheck_ms),
            busy: true,
        }
    }

    /// Registers `fan`, sends its first asks, and settles it if nothing is
    /// awaited.
    fn start(&mut self, swarm: &mut Swarm<Behaviour>, fan: Fan) {
        let n = self.next_fan;
        self.next_fan += 1;
        self.fans.insert(n, fan);
        self.ask(swarm, n);
    }

    /// Sends the deposits fan `n`'s placements ask for now, then settles
    /// it if it is done.
    fn ask(&mut self, swarm: &mut Swarm<Behaviour>, n: u64) {
        let Some(fan) = self.fans.get_mut(&n) else {
            return;
        };
        let asks: Vec<(PeerId, bool)> = (fan.ble.to_ask().into_iter().map(|p| (p, true)))
            .chain(fan.net.to_ask().into_iter().map(|p| (p, false)))
            .collect();
        let frame = Request::Deposit {
            envelope: fan.frame.clone(),
        }
        .encode();
        for (peer, ble) in asks {
            let r = swarm
                .behaviour_mut()
                .mailbox
                .send_request(&peer, MailboxFrame(frame.clone()));
            self.requests.insert(r, Sent::Deposit { fan: n, ble });
        }
        if self.fans.get(&n).is_some_and(Fan::done)
            && let Some(fan) = self.fans.remove(&n)
        {
            self.finish(fan);
        }
    }

    /// A fan is done: its duty learns where copies are, its result goes
    /// to the actor (a deposit) or to the record of placed copies (a
    /// pass).
    fn finish(&mut self, fan: Fan) {
        let accepted: Vec<PeerId> = (fan.ble.accepted().iter())
            .chain(fan.net.accepted())
            .copied()
            .collect();
        match fan.why {
            Why::Forward => {
                if !accepted.is_empty() {
                    tracing::info!(to = %fan.to, holders = accepted.len(), "held mail passed on");
                    if self.placed.len() >= MAX_PLACED && !self.placed.contains_key(&fan.env_id) {
                        self.placed.clear();
                    }
                    self.placed
                        .entry(fan.env_id)
                        .or_default()
                        .extend(accepted.iter().copied());
                }
            }
            Why::Deposit { id, first } => {
                if let Some(d) = self.duties.get_mut(&fan.env_id) {
                    d.busy = false;
                    d.couriers.extend(fan.ble.accepted().iter().copied());
                    for p in &fan.ble_lost {
                        d.tried.remove(p);
                    }
                }
                tracing::debug!(to = %fan.to, holders = accepted.len(), "mailbox deposit settled");
                if !first && accepted.is_empty() {
                    return;
                }
                let mut errors = fan.errors;
                errors.extend(
                    (fan.ble.failed().iter())
                        .chain(fan.net.failed())
                        .map(|(p, e)| format!("{p}: {e}")),
                );
                if !first && id.is_none() {
                    // A receipt's later copies: nothing to report.
                    return;
                }
                if let Err(e) = self.messages.offer(Input::Deposited {
                    id,
                    env_id: fan.env_id,
                    holders: accepted,
                    errors,
                }) {
                    tracing::debug!("deposit result dropped: {e}");
                }
            }
        }
    }

    fn delete(&mut self, swarm: &mut Swarm<Behaviour>, holder: PeerId, ids: Vec<Id>, failures: u8) {
        if ids.is_empty() || holder == self.me {
            return;
        }
        let r = swarm.behaviour_mut().mailbox.send_request(
            &holder,
            MailboxFrame(Request::Delete { ids: ids.clone() }.encode()),
        );
        self.requests.insert(r, Sent::Delete { ids, failures });
    }

    /// A delete failed in transit (the connection closed under it): it
    /// is tried again soon, or when the holder connects again, so the
    /// holder does not go on carrying a copy that was picked up.
    fn delete_failed(&mut self, holder: PeerId, ids: Vec<Id>, failures: u8) {
        let failures = failures.saturating_add(1);
        if failures > FETCH_RETRIES {
            return;
        }
        if !self.redelete.contains_key(&holder) && self.redelete.len() >= MAX_TRACKED_PEERS {
            return;
        }
        let due = now_ms().saturating_add(FETCH_RETRY_MS);
        let e = self
            .redelete
            .entry(holder)
            .or_insert_with(|| (due, failures, Vec::new()));
        e.0 = e.0.min(due);
        e.1 = e.1.max(failures);
        for id in ids {
            if e.2.len() < MAX_DELETE_IDS && !e.2.contains(&id) {
                e.2.push(id);
            }
        }
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

    /// A connection came up: ask the peer for mail (a courier in range, a
    /// holder met again), and look the holders up if that is due. A new
    /// internet connection (or a BLE one: a gateway may have come) asks
    /// for a pass over what this node holds: the peer may be closer to a
    /// held envelope's key, or the way to the internet.
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
        // Deletes that failed go now that the holder is back.
        if let Some(r) = self.redelete.get_mut(&peer) {
            r.0 = now;
        }
        if self.holder.status().envelopes > 0 {
            self.pass_soon();
        }
        self.tick(swarm, ctx, peers);
    }

    /// Periodic (every second): pickups, failed fetches tried again, the
    /// deposit duties, and a holder's pass when one is due.
    pub(super) fn tick(&mut self, swarm: &mut Swarm<Behaviour>, ctx: &Ctx, peers: &PeerBook) {
        let now = now_ms();
        self.retry_failed(swarm, peers, now);
        self.duties_poll(swarm, ctx, peers, now);
        if self.pass_due <= now && !self.pass_walking {
            self.pass_walking = true;
            self.last_pass = now;
            if let Err(e) = self.holder.mailbox.offer(HolderInput::Walk {
                cursor: self.pass_cursor,
                max: PASS_ITEMS,
            }) {
                tracing::debug!("mailbox pass put off: {e}");
                self.pass_walking = false;
                self.pass_due = now.saturating_add(PASS_GAP_MS);
            }
        }
        if self
            .last_pickup
            .is_some_and(|t| now.saturating_sub(t) < self.pickup_ms)
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
            let q = lookup(swarm, &k);
            self.lookups.insert(q, Lookup::Pickup);
        }
    }

    /// Fetches and deletes that failed in transit, tried again when due
    /// (dropped when the peer is gone).
    fn retry_failed(&mut self, swarm: &mut Swarm<Behaviour>, peers: &PeerBook, now: u64) {
        let due: Vec<PeerId> = (self.redelete.iter())
            .filter(|(_, (at, _, _))| *at <= now)
            .map(|(p, _)| *p)
            .collect();
        for p in due {
            if let Some((_, failures, ids)) = self.redelete.remove(&p)
                && (peers.has_ble(&p) || peers.has_internet(&p))
            {
                self.delete(swarm, p, ids, failures);
            }
        }
        let due: Vec<PeerId> = (self.refetch.iter())
            .filter(|(_, (at, _))| *at <= now)
            .map(|(p, _)| *p)
            .collect();
        for p in due {
            if peers.has_ble(&p) || peers.has_internet(&p) {
                // Awaiting this fetch's answer: not due again before it.
                if let Some(r) = self.refetch.get_mut(&p) {
                    r.0 = u64::MAX;
                }
                self.fetch(swarm, p, true);
            } else {
                self.refetch.remove(&p);
            }
        }
    }

    /// The deposit duties: drop those that ended, offer copies to BLE
    /// neighbours that have none, re-check the internet holders of those
    /// due.
    fn duties_poll(&mut self, swarm: &mut Swarm<Behaviour>, ctx: &Ctx, peers: &PeerBook, now: u64) {
        self.duties.retain(|_, d| d.until > now);
        if self.duties.is_empty() || self.fans.len() >= MAX_FANS {
            return;
        }
        let mut fans = Vec::new();
        if ctx.route_up(Route::Ble) {
            let neighbours = peers.ble_neighbours();
            let mut offers = 0;
            for (env_id, d) in self.duties.iter_mut() {
                if offers >= COURIER_OFFERS_PER_POLL {
                    break;
                }
                if d.busy || d.couriers.len() >= MAX_COURIERS || d.tried.len() >= MAX_TRIED {
                    continue;
                }
                let fresh: Vec<PeerId> = (neighbours.iter())
                    .filter(|p| **p != d.to && **p != self.me && !d.tried.contains(p))
                    .take(MAX_COURIERS - d.couriers.len())
                    .copied()
                    .collect();
                if fresh.is_empty() {
                    continue;
                }
                offers += fresh.len();
                d.tried.extend(fresh.iter().copied());
                d.busy = true;
                let mut fan = d.redeposit(*env_id);
                fan.ble = Placement::new(fresh.len(), fresh.len());
                fan.ble.add_candidates(fresh);
                fans.push(fan);
            }
        }
        let internet = ctx.route_up(Route::Internet) && peers.any_internet();
        let mut checks = 0;
        for (env_id, d) in self.duties.iter_mut() {
            if !internet || checks >= RECHECKS_PER_POLL {
                break;
            }
            // A receipt is not re-checked (its holders delete it once its
            // recipient picked it up); a message is, until delivered.
            if d.busy || d.id.is_none() || d.next_check > now {
                continue;
            }
            checks += 1;
            d.next_check = now.saturating_add(self.recheck_ms);
            d.busy = true;
            let mut fan = d.redeposit(*env_id);
            fan.lookup = true;
            fans.push(fan);
        }
        for fan in fans {
            if fan.lookup {
                let k = key(&fan.to, day(now));
                let q = lookup(swarm, &k);
                self.lookups.insert(q, Lookup::Deposit(self.next_fan));
            }
            self.start(swarm, fan);
        }
    }

    /// A step of a pass over what this node holds: with internet, each
    /// envelope goes to the peers now closest to its recipient's key of
    /// today that lack it; with BLE only, to a BLE neighbour that is a
    /// gateway.
    fn on_walked(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        items: Vec<HeldCopy>,
        next: Option<Id>,
    ) {
        let now = now_ms();
        self.pass_walking = false;
        self.pass_cursor = next;
        self.pass_due = if next.is_some() {
            now.saturating_add(PASS_GAP_MS)
        } else {
            now.saturating_add(self.recheck_ms)
        };
        if items.is_empty() {
            return;
        }
        if ctx.route_up(Route::Internet) && peers.any_internet() {
            let mut by_recipient: HashMap<PeerId, Vec<HeldCopy>> = HashMap::new();
            for item in items {
                by_recipient.entry(item.recipient).or_default().push(item);
            }
            let today = day(now);
            for (recipient, items) in by_recipient {
                let k = key(&recipient, today);
                let q = lookup(swarm, &k);
                self.lookups.insert(q, Lookup::Forward(items));
            }
        } else if ctx.route_up(Route::Ble) {
            let gateways = peers.ble_gateways();
            if gateways.is_empty() {
                return;
            }
            for item in items {
                let placed = self.placed.get(&item.id);
                let fresh: Vec<PeerId> = (gateways.iter())
                    .filter(|g| **g != item.recipient && **g != item.depositor)
                    .filter(|g| placed.is_none_or(|s| !s.contains(g)))
                    .copied()
                    .collect();
                if fresh.is_empty() || self.fans.len() >= MAX_FANS {
                    continue;
                }
                let mut fan = Fan::new(Why::Forward, item.recipient, item.id, item.frame);
                fan.net = Placement::new(1, MAX_ASKS);
                fan.net.add_candidates(fresh);
                self.start(swarm, fan);
            }
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
        let target = match &result {
            Ok(ok) => ok.key.clone(),
            Err(kad::GetClosestPeersError::Timeout { key, .. }) => key.clone(),
        };
        let target = kad::KBucketKey::new(target);
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
        // Closest first.
        closest.sort_by_key(|p| kad::KBucketKey::from(*p).distance(&target));
        closest.dedup();
        match what {
            Lookup::Pickup => {
                for p in closest.into_iter().take(HOLDERS + 1) {
                    self.fetch(swarm, p, false);
                }
            }
            Lookup::Deposit(n) => {
                let Some(fan) = self.fans.get_mut(&n) else {
                    return;
                };
                fan.lookup = false;
                let to = fan.to;
                let candidates: Vec<PeerId> = closest.into_iter().filter(|p| *p != to).collect();
                if candidates.is_empty() {
                    fan.errors.push("no mailbox holder found in the DHT".into());
                }
                fan.net.add_candidates(candidates);
                self.ask(swarm, n);
            }
            Lookup::Forward(items) => {
                for item in items {
                    if self.fans.len() >= MAX_FANS {
                        break;
                    }
                    let placed = self.placed.get(&item.id);
                    let mut fan = Fan::new(Why::Forward, item.recipient, item.id, item.frame);
                    // The k closest other than this node, the recipient
                    // and whoever handed it over: those this node placed a copy with count,
                    // the others are asked (further ones replace a
                    // refusal).
                    let order = (closest.iter())
                        .filter(|p| **p != item.recipient && **p != item.depositor)
                        .take(MAX_ASKS)
                        .enumerate();
                    for (i, p) in order {
                        match placed.is_some_and(|s| s.contains(p)) {
                            true if i < HOLDERS => fan.net.already_held(*p),
                            true => {}
                            false => fan.net.add_candidates([*p]),
                        }
                    }
                    self.start(swarm, fan);
                }
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
                            if let Err(e) = self
                                .holder
                                .mailbox
                                .offer(HolderInput::Peer(HolderRequest { peer, req, channel }))
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
        let lost = result.is_err();
        let resp =
            result.and_then(|f| Response::decode(&f).map_err(|e| format!("bad answer: {e}")));
        match sent {
            Sent::Deposit { fan, ble } => self.deposit_answered(swarm, peer, fan, ble, lost, resp),
            Sent::Fetch => self.fetch_answered(ctx, peer, resp),
            Sent::UserDelete(reply) => {
                let _ = reply.send(match resp {
                    Ok(Response::Deleted { count }) => Ok(count),
                    Ok(Response::Refused(r)) => Err(format!("{peer} refused: {r}")),
                    Ok(_) => Err(format!("{peer}: unexpected answer")),
                    Err(e) => Err(format!("{peer}: {e}")),
                });
            }
            Sent::Delete { ids, failures } => {
                if let Err(e) = &resp {
                    tracing::debug!(%peer, "mailbox delete failed: {e}");
                    if lost {
                        self.delete_failed(peer, ids, failures);
                    }
                }
                if self.more.remove(&peer) {
                    self.fetch(swarm, peer, true);
                }
            }
        }
    }

    /// A holder or courier answered a deposit of fan `n` (or the request
    /// was `lost` in transit): the fan records it, and a refusal is
    /// replaced by the next candidate.
    fn deposit_answered(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        n: u64,
        ble: bool,
        lost: bool,
        resp: Result<Response, String>,
    ) {
        if let Some(fan) = self.fans.get_mut(&n) {
            let answer = match resp {
                Ok(Response::Deposited) => Ok(()),
                Ok(Response::Refused(r)) => Err(format!("refused: {r}")),
                Ok(_) => Err("unexpected answer".into()),
                Err(e) => Err(e),
            };
            if ble {
                if lost {
                    fan.ble_lost.push(peer);
                }
                fan.ble.answered(peer, answer);
            } else {
                fan.net.answered(peer, answer);
            }
        }
        self.ask(swarm, n);
    }

    /// A holder answered a fetch: this node's mail goes to the messages
    /// actor; a fetch that failed in transit is tried again soon.
    fn fetch_answered(&mut self, ctx: &Ctx, peer: PeerId, resp: Result<Response, String>) {
        let (items, more) = match resp {
            Ok(Response::Fetched { items, more }) => (items, more),
            Ok(Response::Refused(r)) => {
                self.refetch.remove(&peer);
                tracing::debug!(%peer, "fetch refused: {r}");
                return;
            }
            Ok(_) => {
                self.refetch.remove(&peer);
                return;
            }
            Err(e) => {
                // The stream or the connection closed under it (a
                // duplicate link closed, a link that just came up under
                // load): the next regular fetch would be a minute away,
                // so try again soon.
                tracing::debug!(%peer, "fetch failed: {e}");
                self.fetched_at.remove(&peer);
                let failures = self.refetch.get(&peer).map_or(0, |(_, n)| *n) + 1;
                if failures > FETCH_RETRIES || self.refetch.len() >= MAX_TRACKED_PEERS {
                    self.refetch.remove(&peer);
                } else {
                    self.refetch
                        .insert(peer, (now_ms().saturating_add(FETCH_RETRY_MS), failures));
                }
                return;
            }
        };
        self.refetch.remove(&peer);
        let mut count = 0u64;
        for item in items {
            match decode_envelope(&item.envelope) {
                // Only mail for this node: a holder cannot make it
                // deliver someone else's.
                Ok(env) if env.to == self.me && Id::of(&env) == item.id => {
                    count += 1;
                    if let Err(e) = self.messages.offer(Input::Picked { env, holder: peer }) {
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

    /// Takes one request from `peer`'s allowance.
    fn charge(&mut self, peer: PeerId) -> bool {
        self.rates.try_take(peer, 1, Instant::now(), || {
            TokenBucket::new(PEER_RATE, PEER_RATE * 4)
        })
    }
}

/// Starts a lookup of the [`LOOKUP_RESULTS`] peers closest to mailbox key
/// `k`.
fn lookup(swarm: &mut Swarm<Behaviour>, k: &MailboxKey) -> kad::QueryId {
    (swarm.behaviour_mut().kad).get_n_closest_peers(k.to_vec(), LOOKUP_RESULTS)
}
