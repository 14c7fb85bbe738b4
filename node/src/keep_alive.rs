//! Which connections stay open when idle.
//!
//! libp2p closes a connection after the idle timeout once no handler asks
//! to keep it and no stream is open on it. Gossipsub keeps a stream open
//! with every peer that speaks it, in its mesh or not, so every connection
//! between two fogmesh nodes stayed open for good (rust-libp2p issue 5190):
//! each peer a Kademlia lookup dialled stayed connected. Two pieces put
//! that right:
//!
//! - [`IdleStreams`] wraps a behaviour so that its streams do not keep a
//!   connection open ([`Stream::ignore_for_keep_alive`]); the wrapped
//!   handler's own answer still counts (gossipsub's: "this peer is in a
//!   mesh of mine").
//! - [`Keep`] holds open the connections the node wants whatever they
//!   carry: to the peers the operator asked for (bootstrap lines,
//!   `connect`) and every BLE link (a mesh hop, found again only by
//!   scanning).
//!
//! Keeping alive is one-sided: the other end closes a connection it has no
//! use for after its own idle timeout.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::task::{Context, Poll, Waker};

use libp2p::PeerId;
use libp2p::core::upgrade::{DeniedUpgrade, InboundUpgrade, OutboundUpgrade, UpgradeInfo};
use libp2p::core::{Endpoint, Multiaddr, transport::PortUse};
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
    InboundUpgradeSend, ListenUpgradeError, OutboundUpgradeSend, UpgradeInfoSend,
};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, NotifyHandler, Stream, SubstreamProtocol, ToSwarm,
};

use crate::wrap::{Wrap, WrapHandler};

/// A behaviour whose streams do not keep connections open (see the module
/// docs). Derefs to the wrapped behaviour.
pub type IdleStreams<B> = Wrap<B, Idle>;

impl<B> IdleStreams<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Wrap::with(inner, Idle)
    }
}

/// Marks the streams of the handlers it wraps (see [`IdleStreams`]).
#[derive(Debug, Clone, Copy)]
pub struct Idle;

impl<H: ConnectionHandler> WrapHandler<H> for Idle {
    type Handler = IdleStreamsHandler<H>;

    fn wrap(&self, inner: H) -> IdleStreamsHandler<H> {
        IdleStreamsHandler(inner)
    }
}

/// The handler of [`IdleStreams`]: the wrapped one, its streams marked.
#[derive(Debug)]
pub struct IdleStreamsHandler<H>(H);

impl<H: ConnectionHandler> ConnectionHandler for IdleStreamsHandler<H> {
    type FromBehaviour = H::FromBehaviour;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = IdleUpgrade<H::InboundProtocol>;
    type OutboundProtocol = IdleUpgrade<H::OutboundProtocol>;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.0.listen_protocol().map_upgrade(IdleUpgrade)
    }

    fn connection_keep_alive(&self) -> bool {
        self.0.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        self.0.poll(cx).map(|e| e.map_protocol(IdleUpgrade))
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.0.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.0.on_behaviour_event(event)
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        let inner = match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol, info }) => {
                ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol, info })
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol,
                info,
            }) => {
                ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound { protocol, info })
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { info, error }) => {
                ConnectionEvent::DialUpgradeError(DialUpgradeError { info, error })
            }
            ConnectionEvent::ListenUpgradeError(ListenUpgradeError { info, error }) => {
                ConnectionEvent::ListenUpgradeError(ListenUpgradeError { info, error })
            }
            ConnectionEvent::AddressChange(c) => ConnectionEvent::AddressChange(c),
            ConnectionEvent::LocalProtocolsChange(c) => ConnectionEvent::LocalProtocolsChange(c),
            ConnectionEvent::RemoteProtocolsChange(c) => ConnectionEvent::RemoteProtocolsChange(c),
            // A kind of event added after libp2p-swarm 0.48.
            _ => return,
        };
        self.0.on_connection_event(inner)
    }
}

/// An upgrade that marks its stream as not keeping the connection open,
/// then runs `U`.
#[derive(Debug, Clone)]
pub struct IdleUpgrade<U>(U);

impl<U: UpgradeInfoSend> UpgradeInfo for IdleUpgrade<U> {
    type Info = U::Info;
    type InfoIter = U::InfoIter;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.protocol_info()
    }
}

impl<U: InboundUpgradeSend> InboundUpgrade<Stream> for IdleUpgrade<U> {
    type Output = U::Output;
    type Error = U::Error;
    type Future = U::Future;

    fn upgrade_inbound(self, mut stream: Stream, info: Self::Info) -> Self::Future {
        stream.ignore_for_keep_alive();
        self.0.upgrade_inbound(stream, info)
    }
}

impl<U: OutboundUpgradeSend> OutboundUpgrade<Stream> for IdleUpgrade<U> {
    type Output = U::Output;
    type Error = U::Error;
    type Future = U::Future;

    fn upgrade_outbound(self, mut stream: Stream, info: Self::Info) -> Self::Future {
        stream.ignore_for_keep_alive();
        self.0.upgrade_outbound(stream, info)
    }
}

/// Holds open the connections to chosen peers and every BLE link (see the
/// module docs). Speaks no protocol.
#[derive(Debug, Default)]
pub struct Keep {
    peers: HashSet<PeerId>,
    connections: HashMap<PeerId, Vec<ConnectionId>>,
    /// Handlers to tell that their peer is now kept.
    notify: VecDeque<(PeerId, ConnectionId)>,
    waker: Option<Waker>,
}

impl Keep {
    /// Keeps every connection to `peer` open, now and later.
    pub fn insert(&mut self, peer: PeerId) {
        if self.peers.insert(peer) {
            for c in self.connections.get(&peer).into_iter().flatten() {
                self.notify.push_back((peer, *c));
            }
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }

    fn handler(&self, peer: PeerId, remote: &Multiaddr) -> KeepHandler {
        KeepHandler(self.peers.contains(&peer) || fogmesh_ble::is_ble(remote))
    }
}

impl NetworkBehaviour for Keep {
    type ConnectionHandler = KeepHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _id: ConnectionId,
        peer: PeerId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<KeepHandler, ConnectionDenied> {
        Ok(self.handler(peer, remote_addr))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<KeepHandler, ConnectionDenied> {
        Ok(self.handler(peer, addr))
    }

    // Connections are counted from the swarm's events, not when a handler
    // is made: a connection another behaviour denies gets no
    // `ConnectionClosed`, and would stay counted.
    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(c) => {
                (self.connections.entry(c.peer_id).or_default()).push(c.connection_id);
            }
            FromSwarm::ConnectionClosed(c) => {
                if let Some(conns) = self.connections.get_mut(&c.peer_id) {
                    conns.retain(|id| *id != c.connection_id);
                    if conns.is_empty() {
                        self.connections.remove(&c.peer_id);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, ev: Infallible) {
        match ev {}
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Infallible, bool>> {
        match self.notify.pop_front() {
            Some((peer_id, c)) => Poll::Ready(ToSwarm::NotifyHandler {
                peer_id,
                handler: NotifyHandler::One(c),
                event: true,
            }),
            None => {
                self.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// The handler of [`Keep`]: whether to hold its connection open.
#[derive(Debug)]
pub struct KeepHandler(bool);

impl ConnectionHandler for KeepHandler {
    type FromBehaviour = bool;
    type ToBehaviour = Infallible;
    type InboundProtocol = DeniedUpgrade;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<DeniedUpgrade, ()> {
        SubstreamProtocol::new(DeniedUpgrade, ())
    }

    fn connection_keep_alive(&self) -> bool {
        self.0
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<DeniedUpgrade, (), Infallible>> {
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, keep: bool) {
        self.0 = keep;
    }

    fn on_connection_event(&mut self, _: ConnectionEvent<DeniedUpgrade, DeniedUpgrade>) {}
}
