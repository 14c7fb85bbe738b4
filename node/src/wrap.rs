//! A behaviour that is another with its connection handlers wrapped.
//!
//! [`crate::keep_alive::IdleStreams`] and [`crate::negotiation::Floor`]
//! change nothing of the behaviour they wrap but its handlers; [`Wrap`]
//! forwards every call to the inner behaviour and hands each handler it
//! makes to a [`WrapHandler`].

use std::task::{Context, Poll};

use libp2p::PeerId;
use libp2p::core::{Endpoint, Multiaddr, transport::PortUse};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};

/// Wraps the connection handlers of a behaviour; the events between the
/// behaviour and its handlers pass unchanged.
pub trait WrapHandler<H: ConnectionHandler> {
    /// The wrapped handler.
    type Handler: ConnectionHandler<FromBehaviour = H::FromBehaviour, ToBehaviour = H::ToBehaviour>;

    /// Wraps `inner`, a handler of the inner behaviour.
    fn wrap(&self, inner: H) -> Self::Handler;
}

/// Behaviour `B` with its handlers wrapped by `W`. Derefs to `B`.
#[derive(Debug)]
pub struct Wrap<B, W> {
    inner: B,
    wrapper: W,
}

impl<B, W> Wrap<B, W> {
    /// `inner` with its handlers wrapped by `wrapper`.
    pub fn with(inner: B, wrapper: W) -> Self {
        Wrap { inner, wrapper }
    }
}

impl<B, W> std::ops::Deref for Wrap<B, W> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.inner
    }
}

impl<B, W> std::ops::DerefMut for Wrap<B, W> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B, W> NetworkBehaviour for Wrap<B, W>
where
    B: NetworkBehaviour,
    W: WrapHandler<B::ConnectionHandler> + 'static,
{
    type ConnectionHandler = W::Handler;
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
        self.inner
            .handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)
            .map(|h| self.wrapper.wrap(h))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner
            .handle_established_outbound_connection(
                connection_id,
                peer,
                addr,
                role_override,
                port_use,
            )
            .map(|h| self.wrapper.wrap(h))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.inner.on_swarm_event(event)
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner
            .on_connection_handler_event(peer_id, connection_id, event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}
