//! [`OnlyOn`]: a behaviour that lives only on some of a peer's connections.
//!
//! A peer may be connected over the internet and over BLE at the same time,
//! and `request_response::Behaviour::send_request` picks one of its
//! connections round-robin. Direct messages need "over BLE only" or "over
//! the internet only", so each route gets its own behaviour wrapped in an
//! `OnlyOn` whose predicate picks the connections it may use, e.g.
//! `OnlyOn::new(dm_ble, fogmesh_ble::is_ble)` and
//! `OnlyOn::new(dm_internet, |a| !fogmesh_ble::is_ble(a))`.
//!
//! The predicate is applied once, when a connection is established: to the
//! remote address of an inbound connection (`send_back_addr`) and to the
//! dialled address of an outbound one. An accepted connection gets the
//! inner behaviour's handler; any other gets a dummy handler that denies
//! the inner's protocols, and the inner never hears of it: it sees the
//! swarm as if only accepted connections existed (`other_established` and
//! `remaining_established` count accepted connections only). An address
//! change does not move a connection from one side to the other.
//!
//! # Requests to a peer without an accepted connection
//!
//! `send_request` to a peer the inner has no connection to makes the inner
//! ask for a dial and hold the request until a connection comes up. A
//! connection that is not accepted never reaches the inner, so the request
//! would wait for ever. `OnlyOn` fails such requests instead, by telling the
//! inner that its dial failed (`DialError::Denied` with a [`NotAccepted`]
//! cause; request-response reports `OutboundFailure::DialFailure`):
//!
//! - at once, without dialling, when the peer is connected but over refused
//!   connections only (the swarm would not dial a connected peer anyway);
//! - when a connection to a peer the inner is waiting for is established
//!   and refused while the peer still has no accepted connection (so a
//!   concurrent dial that would have come up on an accepted transport later
//!   is not waited for).
//!
//! A dial to an unconnected peer does go out, and succeeds when it lands on
//! an accepted transport. Callers that mean "this route only if it is up
//! now" should check for an accepted connection first
//! ([`OnlyOn::is_connected`]) rather than rely on the failure.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::task::{Context, Poll};

use either::Either;
use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::behaviour::{ConnectionClosed, ConnectionEstablished, DialFailure, FromSwarm};
use libp2p::swarm::{
    CloseConnection, ConnectionDenied, ConnectionId, DialError, NetworkBehaviour, NotifyHandler,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};

/// Why [`OnlyOn`] failed a dial on its inner behaviour's behalf (the cause
/// inside the `DialError::Denied` the inner sees).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotAccepted {
    /// The peer is connected, but over no connection this behaviour uses.
    #[error("the peer is connected only over transports this behaviour does not use")]
    OnlyRefusedConnections,
    /// A connection to the peer came up on a transport this behaviour does
    /// not use, and there is no other connection it does use.
    #[error("the peer was reached over a transport this behaviour does not use")]
    RefusedConnection,
}

/// Established connections to one peer, as this wrapper sorted them.
#[derive(Debug, Default)]
struct PeerConns {
    /// Connections the inner behaviour lives on.
    accepted: Vec<ConnectionId>,
    /// How many connections the inner does not see.
    refused: usize,
}

/// A [`NetworkBehaviour`] that runs `B` only on the connections whose
/// address `accept` returns true for (see the module docs).
pub struct OnlyOn<B: NetworkBehaviour> {
    /// The wrapped behaviour.
    inner: B,
    /// Which connections `inner` lives on, by address.
    accept: fn(&Multiaddr) -> bool,
    /// Connections given the inner's handler (from the handler's creation
    /// until the connection closes or is denied).
    accepted: HashSet<ConnectionId>,
    /// Connections given a dummy handler, same lifetime.
    refused: HashSet<ConnectionId>,
    /// Established connections per peer.
    peers: HashMap<PeerId, PeerConns>,
    /// Peers the inner asked to dial that have no accepted connection yet:
    /// the inner may be holding requests for them.
    waiting: HashSet<PeerId>,
    /// Commands for the swarm waiting to be returned from `poll`.
    pending: VecDeque<ToSwarm<B::ToSwarm, THandlerInEvent<Self>>>,
}

impl<B: NetworkBehaviour> fmt::Debug for OnlyOn<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnlyOn")
            .field("accepted", &self.accepted.len())
            .field("refused", &self.refused.len())
            .field("waiting", &self.waiting.len())
            .finish_non_exhaustive()
    }
}

impl<B: NetworkBehaviour> OnlyOn<B> {
    /// Wraps `inner` so that it only lives on connections whose address
    /// `accept` returns true for.
    pub fn new(inner: B, accept: fn(&Multiaddr) -> bool) -> Self {
        OnlyOn {
            inner,
            accept,
            accepted: HashSet::new(),
            refused: HashSet::new(),
            peers: HashMap::new(),
            waiting: HashSet::new(),
            pending: VecDeque::new(),
        }
    }

    /// The wrapped behaviour.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The wrapped behaviour, e.g. to call `send_request`.
    pub fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// Whether `peer` has an established connection the inner lives on.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|p| !p.accepted.is_empty())
    }

    /// The established connections to `peer` that the inner lives on.
    pub fn connections(&self, peer: &PeerId) -> &[ConnectionId] {
        self.peers
            .get(peer)
            .map(|p| p.accepted.as_slice())
            .unwrap_or_default()
    }

    /// Tells the inner that its dial to `peer` failed because of `why`.
    fn fail_dial(&mut self, peer: PeerId, connection_id: ConnectionId, why: NotAccepted) {
        tracing::debug!(%peer, %why, "failing a dial for the wrapped behaviour");
        let error = DialError::Denied {
            cause: ConnectionDenied::new(why),
        };
        self.inner
            .on_swarm_event(FromSwarm::DialFailure(DialFailure {
                peer_id: Some(peer),
                error: &error,
                connection_id,
            }));
    }

    /// Sorts a newly established connection, and forwards it to the inner
    /// if it is one of its own.
    fn on_established(&mut self, ev: ConnectionEstablished<'_>) {
        let conns = self.peers.entry(ev.peer_id).or_default();
        if self.accepted.contains(&ev.connection_id) {
            let other_established = conns.accepted.len();
            conns.accepted.push(ev.connection_id);
            self.waiting.remove(&ev.peer_id);
            self.inner
                .on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
                    other_established,
                    ..ev
                }));
        } else {
            conns.refused += 1;
            // A connection the swarm handed no handler of ours is treated
            // as refused; it cannot happen, but keeps the counts whole.
            self.refused.insert(ev.connection_id);
            if conns.accepted.is_empty() && self.waiting.remove(&ev.peer_id) {
                self.fail_dial(ev.peer_id, ev.connection_id, NotAccepted::RefusedConnection);
            }
        }
    }

    /// Forgets a closed connection, and tells the inner if it was its own.
    fn on_closed(&mut self, ev: ConnectionClosed<'_>) {
        let was_accepted = self.accepted.remove(&ev.connection_id);
        let was_refused = self.refused.remove(&ev.connection_id);
        let remaining = match self.peers.get_mut(&ev.peer_id) {
            Some(conns) => {
                if was_accepted {
                    conns.accepted.retain(|c| *c != ev.connection_id);
                } else if was_refused {
                    conns.refused = conns.refused.saturating_sub(1);
                }
                let remaining = conns.accepted.len();
                if remaining == 0 && conns.refused == 0 {
                    self.peers.remove(&ev.peer_id);
                }
                remaining
            }
            None => 0,
        };
        if was_accepted {
            self.inner
                .on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
                    remaining_established: remaining,
                    ..ev
                }));
        }
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for OnlyOn<B> {
    type ConnectionHandler = Either<THandler<B>, dummy::ConnectionHandler>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if !(self.accept)(remote_addr) {
            self.refused.insert(connection_id);
            return Ok(Either::Right(dummy::ConnectionHandler));
        }
        let handler = self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )?;
        self.accepted.insert(connection_id);
        Ok(Either::Left(handler))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        let mut extra = self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )?;
        // The inner could only live on a connection to one of these, so it
        // has no business suggesting the others.
        extra.retain(|a| (self.accept)(a));
        Ok(extra)
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if !(self.accept)(addr) {
            self.refused.insert(connection_id);
            return Ok(Either::Right(dummy::ConnectionHandler));
        }
        let handler = self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )?;
        self.accepted.insert(connection_id);
        Ok(Either::Left(handler))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(ev) => self.on_established(ev),
            FromSwarm::ConnectionClosed(ev) => self.on_closed(ev),
            FromSwarm::AddressChange(ev) => {
                if self.accepted.contains(&ev.connection_id) {
                    self.inner.on_swarm_event(FromSwarm::AddressChange(ev));
                }
            }
            FromSwarm::DialFailure(ev) => {
                // A connection denied after its handlers were made (by
                // another behaviour) ends here without ever being
                // established.
                self.accepted.remove(&ev.connection_id);
                self.refused.remove(&ev.connection_id);
                if let Some(peer) = ev.peer_id
                    && !matches!(ev.error, DialError::DialPeerConditionFalse(_))
                {
                    // The inner fails what it held for the peer on any
                    // dial failure; one that found the swarm already
                    // dialling leaves it waiting for that other dial.
                    self.waiting.remove(&peer);
                }
                self.inner.on_swarm_event(FromSwarm::DialFailure(ev));
            }
            FromSwarm::ListenFailure(ev) => {
                self.accepted.remove(&ev.connection_id);
                // The inner never heard of a refused connection.
                if !self.refused.remove(&ev.connection_id) {
                    self.inner.on_swarm_event(FromSwarm::ListenFailure(ev));
                }
            }
            other => self.inner.on_swarm_event(other),
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {
            Either::Left(ev) => {
                if self.accepted.contains(&connection_id) {
                    self.inner
                        .on_connection_handler_event(peer_id, connection_id, ev);
                }
            }
            Either::Right(never) => match never {},
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Poll::Ready(ev);
            }
            let ev = match self.inner.poll(cx) {
                Poll::Ready(ev) => ev,
                Poll::Pending => return Poll::Pending,
            };
            match ev {
                ToSwarm::Dial { opts } => {
                    if let Some(peer) = opts.get_peer_id()
                        && !self.is_connected(&peer)
                    {
                        if self.peers.contains_key(&peer) {
                            // Connected, but only over refused connections:
                            // the swarm would not dial, and the inner would
                            // wait for ever.
                            self.fail_dial(
                                peer,
                                opts.connection_id(),
                                NotAccepted::OnlyRefusedConnections,
                            );
                            continue;
                        }
                        self.waiting.insert(peer);
                    }
                    return Poll::Ready(ToSwarm::Dial { opts });
                }
                ToSwarm::NotifyHandler {
                    peer_id,
                    handler: NotifyHandler::Any,
                    event,
                } => {
                    // The swarm could pick a refused connection, whose
                    // dummy handler cannot take the event: pick ours.
                    match self.connections(&peer_id).first() {
                        Some(&c) => {
                            return Poll::Ready(ToSwarm::NotifyHandler {
                                peer_id,
                                handler: NotifyHandler::One(c),
                                event: Either::Left(event),
                            });
                        }
                        None => {
                            tracing::debug!(%peer_id, "dropping a handler event: no accepted connection");
                        }
                    }
                }
                ToSwarm::CloseConnection {
                    peer_id,
                    connection: CloseConnection::All,
                } => {
                    // "All" to the inner means all of the ones it sees.
                    let ours = self.peers.get(&peer_id).map(|p| p.accepted.iter());
                    for &c in ours.into_iter().flatten() {
                        self.pending.push_back(ToSwarm::CloseConnection {
                            peer_id,
                            connection: CloseConnection::One(c),
                        });
                    }
                }
                other => return Poll::Ready(other.map_in(Either::Left)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use libp2p::core::multiaddr::Protocol;
    use libp2p::core::transport::MemoryTransport;
    use libp2p::core::{Transport, upgrade};
    use libp2p::request_response::{self, OutboundFailure, ProtocolSupport, cbor};
    use libp2p::swarm::SwarmEvent;
    use libp2p::{StreamProtocol, Swarm, SwarmBuilder, noise, tcp, yamux};

    use super::*;

    type Ping = cbor::Behaviour<u32, u32>;
    type Ev = request_response::Event<u32, u32>;

    /// The test predicate: memory connections only.
    fn is_memory(a: &Multiaddr) -> bool {
        matches!(a.iter().next(), Some(Protocol::Memory(_)))
    }

    /// A swarm with TCP and the memory transport, running a ping
    /// request-response behaviour on memory connections only.
    fn node() -> Swarm<OnlyOn<Ping>> {
        SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .expect("tcp")
            .with_other_transport(|key| {
                let noise = noise::Config::new(key)?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    MemoryTransport::default()
                        .upgrade(upgrade::Version::V1)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default()),
                )
            })
            .expect("memory transport")
            .with_behaviour(|_| {
                let ping = Ping::new(
                    [(
                        StreamProtocol::new("/fogmesh/test-ping/1"),
                        ProtocolSupport::Full,
                    )],
                    request_response::Config::default(),
                );
                OnlyOn::new(ping, is_memory)
            })
            .expect("behaviour")
            // The TCP connection carries no protocol at all here: keep it.
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build()
    }

    /// Which swarm an event came from.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Side {
        A,
        B,
    }

    /// What the pair saw, in order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Seen {
        Request(Side, ConnectionId, u32),
        Response(Side, ConnectionId, u32),
        OutboundFailure(Side, String),
        Established(Side, ConnectionId, bool),
        Closed(Side, ConnectionId),
        Listening(Side, Multiaddr),
    }

    /// Two swarms driven together; requests are answered with the request
    /// plus one.
    struct Pair {
        a: Swarm<OnlyOn<Ping>>,
        b: Swarm<OnlyOn<Ping>>,
        seen: Vec<Seen>,
    }

    impl Pair {
        fn new() -> Self {
            Pair {
                a: node(),
                b: node(),
                seen: Vec::new(),
            }
        }

        fn swarm(&mut self, side: Side) -> &mut Swarm<OnlyOn<Ping>> {
            match side {
                Side::A => &mut self.a,
                Side::B => &mut self.b,
            }
        }

        /// Handles one event from either swarm.
        async fn step(&mut self) {
            let (side, ev) = tokio::select! {
                ev = self.a.select_next_some() => (Side::A, ev),
                ev = self.b.select_next_some() => (Side::B, ev),
            };
            self.handle(side, ev);
        }

        fn handle(&mut self, side: Side, ev: SwarmEvent<Ev>) {
            let seen = match ev {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    connection_id,
                    message,
                    ..
                }) => match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let answer = request + 1;
                        let sent = self
                            .swarm(side)
                            .behaviour_mut()
                            .inner_mut()
                            .send_response(channel, answer);
                        assert!(sent.is_ok(), "response channel closed");
                        Seen::Request(side, connection_id, request)
                    }
                    request_response::Message::Response { response, .. } => {
                        Seen::Response(side, connection_id, response)
                    }
                },
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    error, ..
                }) => Seen::OutboundFailure(side, failure_kind(&error)),
                SwarmEvent::ConnectionEstablished {
                    connection_id,
                    endpoint,
                    ..
                } => Seen::Established(
                    side,
                    connection_id,
                    is_memory(endpoint.get_remote_address()),
                ),
                SwarmEvent::ConnectionClosed { connection_id, .. } => {
                    Seen::Closed(side, connection_id)
                }
                SwarmEvent::NewListenAddr { address, .. } => Seen::Listening(side, address),
                _ => return,
            };
            self.seen.push(seen);
        }

        /// Drives both swarms until `done` holds of what was seen.
        async fn until(&mut self, what: &str, done: impl Fn(&[Seen]) -> bool) {
            let run = async {
                while !done(&self.seen) {
                    self.step().await;
                }
            };
            if tokio::time::timeout(Duration::from_secs(10), run)
                .await
                .is_err()
            {
                panic!("timed out waiting for {what}; saw {:?}", self.seen);
            }
        }

        /// Drives both swarms for `d`, whatever happens.
        async fn run_for(&mut self, d: Duration) {
            let _ = tokio::time::timeout(d, async {
                loop {
                    self.step().await;
                }
            })
            .await;
        }

        /// A listens on TCP and memory; returns the two addresses.
        async fn listen(&mut self) -> (Multiaddr, Multiaddr) {
            self.a
                .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("tcp addr"))
                .expect("listen tcp");
            self.a
                .listen_on("/memory/0".parse().expect("memory addr"))
                .expect("listen memory");
            self.until("listen addresses", |s| listening(s).count() == 2)
                .await;
            let tcp = listening(&self.seen).find(|a| !is_memory(a));
            let mem = listening(&self.seen).find(|a| is_memory(a));
            (tcp.expect("tcp").clone(), mem.expect("memory").clone())
        }

        /// B dials `addr`; returns the connection's id on A and on B.
        async fn connect(&mut self, addr: Multiaddr) -> (ConnectionId, ConnectionId) {
            let memory = is_memory(&addr);
            let before = self.seen.len();
            self.b.dial(addr).expect("dial");
            let up = |s: &[Seen], side| {
                s[before..].iter().find_map(|e| match e {
                    Seen::Established(sd, c, m) if *sd == side && *m == memory => Some(*c),
                    _ => None,
                })
            };
            self.until("connection", |s| {
                up(s, Side::A).is_some() && up(s, Side::B).is_some()
            })
            .await;
            (
                up(&self.seen, Side::A).expect("a"),
                up(&self.seen, Side::B).expect("b"),
            )
        }

        /// `from` sends `n` requests numbered from `first` to the other.
        fn send(&mut self, from: Side, first: u32, n: u32) {
            let to = match from {
                Side::A => *self.b.local_peer_id(),
                Side::B => *self.a.local_peer_id(),
            };
            for i in first..first + n {
                self.swarm(from)
                    .behaviour_mut()
                    .inner_mut()
                    .send_request(&to, i);
            }
        }

        fn count(&self, f: impl Fn(&Seen) -> bool) -> usize {
            self.seen.iter().filter(|s| f(s)).count()
        }
    }

    fn listening(seen: &[Seen]) -> impl Iterator<Item = &Multiaddr> {
        seen.iter().filter_map(|s| match s {
            Seen::Listening(Side::A, a) => Some(a),
            _ => None,
        })
    }

    fn failure_kind(e: &OutboundFailure) -> String {
        match e {
            OutboundFailure::DialFailure => "dial".into(),
            other => other.to_string(),
        }
    }

    /// Both swarms connected over TCP first, then over memory.
    async fn connected_twice() -> (Pair, ConnectionId, ConnectionId) {
        let mut p = Pair::new();
        let (tcp, mem) = p.listen().await;
        p.connect(tcp).await;
        let (a_mem, b_mem) = p.connect(mem).await;
        (p, a_mem, b_mem)
    }

    #[tokio::test]
    async fn requests_use_only_the_accepted_connection() {
        let (mut p, a_mem, b_mem) = connected_twice().await;
        let (a, b) = (*p.a.local_peer_id(), *p.b.local_peer_id());
        assert!(p.a.is_connected(&b) && p.b.is_connected(&a));
        assert_eq!(p.a.behaviour().connections(&b), [a_mem]);
        assert_eq!(p.b.behaviour().connections(&a), [b_mem]);

        p.send(Side::B, 0, 50);
        p.send(Side::A, 1000, 50);
        p.until("100 responses", |s| {
            s.iter().filter(|e| matches!(e, Seen::Response(..))).count() == 100
        })
        .await;

        for e in &p.seen {
            match e {
                Seen::Request(Side::A, c, _) | Seen::Response(Side::A, c, _) => {
                    assert_eq!(*c, a_mem, "A used a non-memory connection: {e:?}")
                }
                Seen::Request(Side::B, c, _) | Seen::Response(Side::B, c, _) => {
                    assert_eq!(*c, b_mem, "B used a non-memory connection: {e:?}")
                }
                Seen::OutboundFailure(..) => panic!("unexpected failure: {e:?}"),
                _ => {}
            }
        }
        assert_eq!(p.count(|e| matches!(e, Seen::Request(Side::A, ..))), 50);
        assert_eq!(p.count(|e| matches!(e, Seen::Request(Side::B, ..))), 50);
    }

    #[tokio::test]
    async fn closing_the_accepted_connection_fails_later_requests() {
        let (mut p, a_mem, b_mem) = connected_twice().await;
        let (a, b) = (*p.a.local_peer_id(), *p.b.local_peer_id());
        assert!(p.b.close_connection(b_mem));
        p.until("memory connection closed", |s| {
            s.contains(&Seen::Closed(Side::A, a_mem)) && s.contains(&Seen::Closed(Side::B, b_mem))
        })
        .await;
        // TCP is still up, but the wrapped behaviour no longer has a
        // connection.
        assert!(p.a.is_connected(&b) && p.b.is_connected(&a));
        assert!(!p.a.behaviour().is_connected(&b));
        assert!(!p.b.behaviour().is_connected(&a));

        p.send(Side::B, 0, 3);
        p.send(Side::A, 100, 2);
        p.until("five dial failures", |s| {
            s.iter()
                .filter(|e| matches!(e, Seen::OutboundFailure(_, k) if k == "dial"))
                .count()
                == 5
        })
        .await;
        p.run_for(Duration::from_millis(300)).await;
        assert_eq!(p.count(|e| matches!(e, Seen::Request(..))), 0);
        assert_eq!(p.count(|e| matches!(e, Seen::OutboundFailure(..))), 5);
        assert!(
            p.a.is_connected(&b) && p.b.is_connected(&a),
            "TCP went down"
        );

        // A new memory connection carries requests again.
        let mem = listening(&p.seen)
            .find(|a| is_memory(a))
            .expect("memory")
            .clone();
        let (a_mem, b_mem) = p.connect(mem).await;
        p.send(Side::B, 7, 1);
        p.until("a response", |s| {
            s.contains(&Seen::Response(Side::B, b_mem, 8))
        })
        .await;
        assert!(p.seen.contains(&Seen::Request(Side::A, a_mem, 7)));
    }

    #[tokio::test]
    async fn a_peer_connected_over_tcp_only_gets_a_dial_failure_not_a_hang() {
        let mut p = Pair::new();
        let (tcp, _) = p.listen().await;
        p.connect(tcp).await;
        p.send(Side::B, 0, 1);
        p.send(Side::A, 0, 1);
        p.until("two dial failures", |s| {
            s.iter()
                .filter(|e| matches!(e, Seen::OutboundFailure(_, k) if k == "dial"))
                .count()
                == 2
        })
        .await;
        p.run_for(Duration::from_millis(300)).await;
        assert_eq!(p.count(|e| matches!(e, Seen::Request(..))), 0);
        let (a, b) = (*p.a.local_peer_id(), *p.b.local_peer_id());
        assert!(p.a.is_connected(&b) && p.b.is_connected(&a));
    }

    #[tokio::test]
    async fn a_dial_for_a_request_works_only_when_it_lands_on_an_accepted_transport() {
        let mut p = Pair::new();
        let (tcp, mem) = p.listen().await;
        let a = *p.a.local_peer_id();

        // Not connected; the request's dial comes up over TCP, which the
        // wrapped behaviour does not use: the request fails.
        p.b.behaviour_mut()
            .inner_mut()
            .send_request_with_addresses(&a, 1, vec![tcp]);
        p.until("a dial failure and the connection on both sides", |s| {
            s.contains(&Seen::OutboundFailure(Side::B, "dial".into()))
                && s.iter()
                    .any(|e| matches!(e, Seen::Established(Side::A, _, false)))
        })
        .await;
        assert!(p.b.is_connected(&a), "the TCP dial did not happen");
        assert_eq!(p.count(|e| matches!(e, Seen::Request(..))), 0);

        // Disconnected again, a dial over memory carries the request.
        assert!(p.b.disconnect_peer_id(a).is_ok());
        p.until("disconnected", |s| {
            s.iter().filter(|e| matches!(e, Seen::Closed(..))).count() == 2
        })
        .await;
        p.b.behaviour_mut()
            .inner_mut()
            .send_request_with_addresses(&a, 2, vec![mem]);
        p.until("a response", |s| {
            s.iter().any(|e| matches!(e, Seen::Response(Side::B, _, 3)))
        })
        .await;
        assert_eq!(p.count(|e| matches!(e, Seen::OutboundFailure(..))), 1);
    }
}
