//! The network side of direct messages: the messages actor's attempts and
//! receipts go out over the route it names, envelopes from peers are
//! delivered (to the actor), forwarded or refused, and every hop answers
//! with an ack.
//!
//! Routes, as this module carries them:
//! - **internet**: `/fogmesh/dm/1` to the peer over a non-BLE connection
//!   (dialled when there is none: addresses come from the peer table and
//!   Kademlia), and, when the peer is not connected, also to up to
//!   [`MAX_GATEWAYS`] connected gateways, which carry it into BLE;
//! - **BLE**: `/fogmesh/dm-ble/1` straight to the peer when it is a BLE
//!   neighbour, else to every BLE neighbour (directed flooding with a hop
//!   limit: see `fogmesh_protocols::messages::mesh`).
//!
//! Relaying: an envelope for someone else that came over BLE, or reached
//! this node as a gateway, goes straight to its recipient when it is a
//! neighbour (BLE first, then internet), else on to every other BLE
//! neighbour with one hop less; a gateway also dials the recipient over
//! the internet and passes what came over BLE to the other gateways it is
//! connected to (another island may hold the recipient). Relays see only the recipient, the hop limit and a padded
//! sealed body; nothing is stored.

use std::collections::HashMap;
use std::time::Instant;

use fogmesh_protocols::messages::mesh::{Relay, SeenSet, relay};
use fogmesh_protocols::messages::{Ack, Envelope, MessageId, Refusal};
use fogmesh_protocols::policy::Route;
use fogmesh_protocols::rate::{RateTable, TokenBucket};
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{PeerId, Swarm, kad};
use tokio::sync::mpsc;

use super::event_loop::Ctx;
use super::exchange::{Exchange, exchange};
use super::peers::PeerBook;
use crate::behaviour::{Behaviour, DmFrame};
use crate::messages::{AttemptResult, Input, MessagesHandle, NetCommand, now_ms};

/// Gateways an internet attempt also goes through when the peer is not
/// connected.
pub(super) const MAX_GATEWAYS: usize = 3;
/// Envelopes per second one peer may hand this node, sustained (bursts of
/// four times as many pass); beyond, they are refused as busy.
const PEER_RATE: u64 = 50;
/// Peers whose rate is tracked at once.
const MAX_TRACKED_PEERS: usize = 4096;
/// Requests (attempts, receipts, relayed copies) in flight at once;
/// beyond, relayed copies are dropped.
const MAX_IN_FLIGHT: usize = 1024;
/// Least time between two internet dials of a peer connected over BLE.
const REDIAL_MS: u64 = 10_000;
/// Least time between two Kademlia lookups of one recipient.
const LOOKUP_MS: u64 = 60_000;

/// What an outstanding request carries.
enum Carried {
    /// An attempt of the actor's.
    Attempt(MessageId, u32),
    /// A receipt or a relayed copy: nobody waits for its answer.
    Other,
}

/// The answers still expected for one attempt that went to several hops.
#[derive(Default)]
struct Fan {
    outstanding: usize,
    accepted: bool,
    errors: Vec<String>,
}

/// Which of the two behaviours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Link {
    Internet,
    Ble,
}

impl Link {
    fn route(self) -> Route {
        match self {
            Link::Internet => Route::Internet,
            Link::Ble => Route::Ble,
        }
    }
}

pub(super) struct MessagesNet {
    actor: MessagesHandle,
    commands: mpsc::Receiver<NetCommand>,
    me: PeerId,
    seen: SeenSet,
    requests: HashMap<OutboundRequestId, Carried>,
    fans: HashMap<(MessageId, u32), Fan>,
    rates: RateTable<PeerId>,
    /// When each peer connected over BLE only was last dialled over the
    /// internet.
    redial: HashMap<PeerId, u64>,
    /// Kademlia lookups of recipients not connected, by query id, and
    /// when each recipient was last looked up.
    lookups: HashMap<kad::QueryId, PeerId>,
    looked_up: HashMap<PeerId, u64>,
    /// The onion route (`Route::Onion`): see `onion_net.rs`.
    pub(super) onion: super::onion_net::OnionNet,
}

impl MessagesNet {
    pub(super) fn new(
        actor: MessagesHandle,
        commands: mpsc::Receiver<NetCommand>,
        me: PeerId,
    ) -> Self {
        MessagesNet {
            actor,
            commands,
            me,
            seen: SeenSet::default(),
            requests: HashMap::new(),
            fans: HashMap::new(),
            rates: RateTable::new(MAX_TRACKED_PEERS),
            redial: HashMap::new(),
            lookups: HashMap::new(),
            looked_up: HashMap::new(),
            onion: Default::default(),
        }
    }

    /// The actor's next command; `None` once the actor is gone.
    pub(super) async fn next_command(&mut self) -> Option<NetCommand> {
        self.commands.recv().await
    }

    /// A connection came up: messages waiting for this peer (or, over BLE
    /// or to a gateway, for anyone) are tried again.
    pub(super) fn wake(&self, peer: Option<PeerId>) {
        self.offer(Input::Wake(peer));
    }

    fn offer(&self, input: Input) -> bool {
        match self.actor.offer(input) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("messages input dropped: {e}");
                false
            }
        }
    }

    /// Carries out one of the actor's commands.
    pub(super) fn on_command(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        cmd: NetCommand,
    ) {
        match cmd {
            NetCommand::Send {
                id,
                n,
                route: Route::Onion,
                env,
            } => {
                if let Err(result) = self.onion.send(id, n, env) {
                    self.offer(Input::Attempt { id, n, result });
                }
            }
            NetCommand::Receipt {
                env,
                prefer: Route::Onion,
            } => self.onion.receipt(env),
            NetCommand::Send { id, n, route, env } => {
                self.send(swarm, ctx, peers, (id, n), route, &env);
            }
            NetCommand::NoReceipt { to, route } => {
                // A connection that cannot carry a few hundred bytes and
                // their receipt within the timeout is treated as dead:
                // closing it lets the BLE dial rule (which leaves peers
                // connected over the internet alone) give the peer a BLE
                // link, and the next attempt a way through.
                if route == Route::Internet && ctx.route_up(Route::Ble) {
                    for id in peers.internet_connections(&to) {
                        tracing::info!(peer = %to, "no receipt over the internet in time: closing the connection");
                        swarm.close_connection(id);
                    }
                }
            }
            NetCommand::Receipt { env, prefer } => {
                self.send_receipt(swarm, ctx, peers, &env, prefer);
            }
        }
    }

    /// Attempt `n` of message `id` over the internet or BLE: the envelope
    /// goes out (the attempt then waits for the requests' outcomes), or the
    /// actor hears at once that the route is unavailable.
    fn send(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        (id, n): (MessageId, u32),
        route: Route,
        env: &Envelope,
    ) {
        self.seen.insert(env.id(), now_ms());
        let sent = match route {
            Route::Internet if !ctx.route_up(Route::Internet) => {
                Err("the internet route is off on this node".to_owned())
            }
            Route::Internet => self.carry_internet(swarm, peers, env, true),
            Route::Ble if !ctx.route_up(Route::Ble) => Err("BLE is off on this node".to_owned()),
            Route::Ble => self.carry_ble(swarm, peers, env, None),
            _ => Err(format!("route {route} is not carried here")),
        };
        match sent {
            Ok(reqs) => {
                ctx.metrics.dm_envelopes_sent.inc_by(reqs.len() as u64);
                self.fans.insert(
                    (id, n),
                    Fan {
                        outstanding: reqs.len(),
                        ..Fan::default()
                    },
                );
                for r in reqs {
                    self.requests.insert(r, Carried::Attempt(id, n));
                }
            }
            Err(why) => {
                self.offer(Input::Attempt {
                    id,
                    n,
                    result: AttemptResult::Unavailable(why),
                });
            }
        }
    }

    /// A receipt, over the route its letter came by first (`prefer`),
    /// else the other; none up, the sender retries and gets another.
    fn send_receipt(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        env: &Envelope,
        prefer: Route,
    ) {
        self.seen.insert(env.id(), now_ms());
        let order = match prefer {
            Route::Ble => [Route::Ble, Route::Internet],
            _ => [Route::Internet, Route::Ble],
        };
        for route in order {
            if !ctx.route_up(route) {
                continue;
            }
            let sent = match route {
                Route::Ble => self.carry_ble(swarm, peers, env, None),
                _ => self.carry_internet(swarm, peers, env, true),
            };
            if let Ok(reqs) = sent {
                ctx.metrics.dm_envelopes_sent.inc_by(reqs.len() as u64);
                for r in reqs {
                    self.requests.insert(r, Carried::Other);
                }
                return;
            }
        }
        tracing::debug!(to = %env.to, "no way to send a receipt now; the sender will retry");
    }

    /// Sends `env` towards its recipient over the internet: to the peer
    /// (dialled if need be, when `dial`), plus gateways when the peer is
    /// not connected.
    fn carry_internet(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peers: &PeerBook,
        env: &Envelope,
        dial: bool,
    ) -> Result<Vec<OutboundRequestId>, String> {
        let frame = env.encode();
        let b = swarm.behaviour_mut();
        if peers.has_internet(&env.to) {
            return Ok(vec![b.dm.inner_mut().send_request(&env.to, DmFrame(frame))]);
        }
        if peers.has_ble(&env.to) {
            // Connected over BLE only: request-response would not dial a
            // connected peer, so dial its internet addresses ourselves
            // (at most every REDIAL_MS); this attempt goes by the next
            // route, later ones by the internet once the dial succeeds.
            let addrs = peers.announced(&env.to);
            let now = now_ms();
            let due = self
                .redial
                .get(&env.to)
                .is_none_or(|t| now.saturating_sub(*t) >= REDIAL_MS);
            if dial && due && !addrs.is_empty() {
                self.redial.insert(env.to, now);
                if self.redial.len() > MAX_TRACKED_PEERS {
                    self.redial.clear();
                }
                let opts = DialOpts::peer_id(env.to)
                    .addresses(addrs)
                    .condition(PeerCondition::Always)
                    .build();
                if let Err(e) = swarm.dial(opts) {
                    tracing::debug!(peer = %env.to, "internet dial failed: {e}");
                }
            }
            return Err("connected over BLE only; dialling over the internet".into());
        }
        if dial {
            self.look_up(swarm, env.to);
        }
        let b = swarm.behaviour_mut();
        let mut reqs = Vec::new();
        for g in peers.gateways().into_iter().take(MAX_GATEWAYS) {
            if g != env.to && g != self.me {
                reqs.push(b.dm.inner_mut().send_request(&g, DmFrame(frame.clone())));
            }
        }
        if dial {
            // Addresses come from the peer table and Kademlia; with none
            // the request fails at once with a dial error.
            reqs.push(b.dm.inner_mut().send_request(&env.to, DmFrame(frame)));
        }
        if reqs.is_empty() {
            return Err("not connected".into());
        }
        Ok(reqs)
    }

    /// Asks Kademlia for a recipient that is not connected (at most every
    /// [`LOOKUP_MS`]): if the DHT knows its addresses, it is dialled, and
    /// its connection wakes the messages waiting for it.
    fn look_up(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId) {
        let now = now_ms();
        if self
            .looked_up
            .get(&peer)
            .is_some_and(|t| now.saturating_sub(*t) < LOOKUP_MS)
        {
            return;
        }
        if self.looked_up.len() >= MAX_TRACKED_PEERS {
            self.looked_up.clear();
        }
        self.looked_up.insert(peer, now);
        let id = swarm.behaviour_mut().kad.get_closest_peers(peer);
        self.lookups.insert(id, peer);
    }

    /// Whether a Kademlia query is one of this module's lookups.
    pub(super) fn owns_lookup(&self, id: kad::QueryId) -> bool {
        self.lookups.contains_key(&id)
    }

    /// A lookup ended: the recipient, if found with addresses, is dialled.
    pub(super) fn on_lookup(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        id: kad::QueryId,
        result: kad::GetClosestPeersResult,
    ) {
        let Some(peer) = self.lookups.remove(&id) else {
            return;
        };
        let found = super::discovery::closest_found(result);
        let Some(info) = found.into_iter().find(|p| p.peer_id == peer) else {
            tracing::debug!(%peer, "recipient not found in the DHT");
            return;
        };
        let addrs: Vec<_> = info
            .addrs
            .into_iter()
            .filter(|a| !fogmesh_ble::is_ble(a))
            .collect();
        if addrs.is_empty() {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = swarm.dial(opts) {
            tracing::debug!(%peer, "dial after lookup failed: {e}");
        }
    }

    /// Sends `env` over BLE: to the recipient when it is a neighbour, else
    /// to every neighbour but `except`.
    fn carry_ble(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peers: &PeerBook,
        env: &Envelope,
        except: Option<PeerId>,
    ) -> Result<Vec<OutboundRequestId>, String> {
        let frame = env.encode();
        let b = swarm.behaviour_mut();
        if peers.has_ble(&env.to) {
            return Ok(vec![
                b.dm_ble.inner_mut().send_request(&env.to, DmFrame(frame)),
            ]);
        }
        let reqs: Vec<OutboundRequestId> = peers
            .ble_neighbours()
            .into_iter()
            .filter(|p| Some(*p) != except)
            .map(|p| {
                b.dm_ble
                    .inner_mut()
                    .send_request(&p, DmFrame(frame.clone()))
            })
            .collect();
        if reqs.is_empty() {
            return Err("no BLE neighbour in range".into());
        }
        Ok(reqs)
    }

    /// An event of one of the two direct-message behaviours.
    pub(super) fn on_event(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        link: Link,
        ev: request_response::Event<DmFrame, DmFrame>,
    ) {
        match exchange("dm", ev) {
            Some(Exchange::Request {
                peer,
                frame,
                channel,
            }) => {
                let ack = self.on_envelope(swarm, ctx, peers, peer, link, &frame);
                let b = swarm.behaviour_mut();
                let sent = match link {
                    Link::Internet => {
                        b.dm.inner_mut()
                            .send_response(channel, DmFrame(ack.encode()))
                    }
                    Link::Ble => b
                        .dm_ble
                        .inner_mut()
                        .send_response(channel, DmFrame(ack.encode())),
                };
                if sent.is_err() {
                    tracing::debug!(%peer, "dm ack not sent: the stream closed");
                }
            }
            Some(Exchange::Answer {
                peer,
                request_id,
                result,
            }) => self.answered(peer, request_id, result),
            None => {}
        }
    }

    /// What to do with an envelope a peer handed over, and the ack.
    fn on_envelope(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        from: PeerId,
        link: Link,
        frame: &[u8],
    ) -> Ack {
        if !self.charge(from) {
            return Ack::Refused(Refusal::Busy);
        }
        let env = match Envelope::decode(frame) {
            Ok(env) => env,
            Err(e) => {
                tracing::debug!(%from, "malformed envelope: {e}");
                return Ack::Refused(Refusal::Malformed);
            }
        };
        match relay(&mut self.seen, &self.me, &env, now_ms()) {
            Relay::Deliver => {
                if self.offer(Input::Envelope {
                    env,
                    via: link.route(),
                }) {
                    Ack::Accepted
                } else {
                    Ack::Refused(Refusal::Busy)
                }
            }
            // Already carried: the copy that came first is on its way.
            Relay::Drop("duplicate") => Ack::Accepted,
            Relay::Drop(_) => Ack::Refused(Refusal::NoRoute),
            Relay::Forward { ttl } => {
                let gateway = ctx.route_up(Route::Internet) && ctx.route_up(Route::Ble);
                // Only BLE traffic is relayed, and internet traffic only
                // by a gateway: an internet node is no open relay.
                if link == Link::Internet && !gateway {
                    return Ack::Refused(Refusal::NoRoute);
                }
                if self.requests.len() >= MAX_IN_FLIGHT {
                    return Ack::Refused(Refusal::Busy);
                }
                let onward = Envelope { ttl, ..env };
                match self.forward(swarm, ctx, peers, &onward, from, link) {
                    0 => Ack::Refused(Refusal::NoRoute),
                    _ => Ack::Accepted,
                }
            }
        }
    }

    /// Carries an envelope for someone else one step on; returns the
    /// number of copies sent.
    fn forward(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        env: &Envelope,
        from: PeerId,
        link: Link,
    ) -> usize {
        let mut reqs = Vec::new();
        let ble = ctx.route_up(Route::Ble);
        let internet = ctx.route_up(Route::Internet);
        if ble && peers.has_ble(&env.to) {
            reqs.extend(
                self.carry_ble(swarm, peers, env, Some(from))
                    .unwrap_or_default(),
            );
        } else if internet && peers.has_internet(&env.to) {
            reqs.extend(
                self.carry_internet(swarm, peers, env, false)
                    .unwrap_or_default(),
            );
        } else {
            if ble {
                reqs.extend(
                    self.carry_ble(swarm, peers, env, Some(from))
                        .unwrap_or_default(),
                );
            }
            // A gateway also tries the recipient on the internet (it may
            // be known from the peer table or Kademlia), and hands the
            // envelope to the other gateways it is connected to: the
            // recipient may be on another BLE island. They flood it into
            // their islands only (what comes over the internet is not
            // passed on to further gateways), so this is one hop wide.
            if internet && ble && link == Link::Ble {
                let frame = env.encode();
                let b = swarm.behaviour_mut();
                reqs.push(
                    b.dm.inner_mut()
                        .send_request(&env.to, DmFrame(frame.clone())),
                );
                for g in peers.gateways().into_iter().take(MAX_GATEWAYS) {
                    if g != from && g != env.to {
                        reqs.push(b.dm.inner_mut().send_request(&g, DmFrame(frame.clone())));
                    }
                }
            }
        }
        let n = reqs.len();
        ctx.metrics.dm_envelopes_sent.inc_by(n as u64);
        ctx.metrics.dm_envelopes_relayed.inc_by(n as u64);
        for r in reqs {
            self.requests.insert(r, Carried::Other);
        }
        n
    }

    fn answered(
        &mut self,
        peer: PeerId,
        request_id: OutboundRequestId,
        result: Result<Vec<u8>, String>,
    ) {
        let Some(carried) = self.requests.remove(&request_id) else {
            return;
        };
        let Carried::Attempt(id, n) = carried else {
            if let Err(e) = &result {
                tracing::debug!(%peer, "relayed direct message not taken: {e}");
            }
            return;
        };
        let Some(fan) = self.fans.get_mut(&(id, n)) else {
            return;
        };
        fan.outstanding = fan.outstanding.saturating_sub(1);
        let accepted = match result.map(|f| Ack::decode(&f)) {
            Ok(Ok(Ack::Accepted)) => true,
            Ok(Ok(Ack::Refused(r))) => {
                fan.errors.push(format!("{peer} refused: {r}"));
                false
            }
            Ok(Err(e)) => {
                fan.errors.push(format!("{peer}: bad ack: {e}"));
                false
            }
            Err(e) => {
                fan.errors.push(format!("{peer}: {e}"));
                false
            }
        };
        let first_accept = accepted && !fan.accepted;
        fan.accepted |= accepted;
        let done = fan.outstanding == 0;
        if first_accept {
            self.offer(Input::Attempt {
                id,
                n,
                result: AttemptResult::Accepted,
            });
        }
        if done
            && let Some(fan) = self.fans.remove(&(id, n))
            && !fan.accepted
        {
            self.offer(Input::Attempt {
                id,
                n,
                result: AttemptResult::Failed(fan.errors.join("; ")),
            });
        }
    }

    /// Takes one envelope from `peer`'s allowance.
    fn charge(&mut self, peer: PeerId) -> bool {
        self.rates.try_take(peer, 1, Instant::now(), || {
            TokenBucket::new(PEER_RATE, PEER_RATE * 4)
        })
    }
}
