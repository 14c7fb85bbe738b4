//! A floor on every stream's protocol negotiation time.
//!
//! libp2p gives a stream 10 s to agree on its protocol unless the protocol
//! asks for another time (`SubstreamProtocol::with_timeout`); most of ours
//! (Kademlia, identify, request-response, relay, the mix streams) do not.
//! An outbound negotiation takes a round trip (multistream-select `V1`),
//! behind whatever the connection already has queued. That is plenty on a
//! real network; in the simulator's slowed time it is not: at dilation 30
//! the fixed 10 s are a third of a model second, less than a round trip
//! between the world model's farthest regions, so group syncs, Kademlia
//! queries and pings to far or busy peers failed for no reason but the
//! host, and were retried.
//!
//! [`Floor`] wraps the whole composed behaviour of a node, so every
//! stream, inbound or outbound, gets at least the floor; a protocol that
//! asks for longer keeps its own. The builder stretches the floor with the
//! time dilation; a daemon keeps libp2p's 10 s, and as none of the
//! protocols it runs asks for less (libp2p 0.57), a daemon's negotiations
//! are exactly libp2p's.

use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{ConnectionHandler, ConnectionHandlerEvent, SubstreamProtocol};

use crate::wrap::{Wrap, WrapHandler};

/// libp2p's default time for a stream's protocol negotiation.
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);

/// A behaviour whose streams' negotiations may take at least a given time
/// (see the module docs). Derefs to the wrapped behaviour.
pub type Floor<B> = Wrap<B, NegotiationFloor>;

impl<B> Floor<B> {
    /// Wraps `inner`; its negotiations may take at least `floor`.
    pub fn new(inner: B, floor: Duration) -> Self {
        Wrap::with(inner, NegotiationFloor(floor))
    }
}

/// Gives the handlers it wraps a floor on their streams' negotiation time
/// (see [`Floor`]).
#[derive(Debug, Clone, Copy)]
pub struct NegotiationFloor(Duration);

impl<H: ConnectionHandler> WrapHandler<H> for NegotiationFloor {
    type Handler = FloorHandler<H>;

    fn wrap(&self, inner: H) -> FloorHandler<H> {
        FloorHandler {
            inner,
            floor: self.0,
        }
    }
}

/// `p` with its timeout at least `floor`.
fn floored<U, I>(p: SubstreamProtocol<U, I>, floor: Duration) -> SubstreamProtocol<U, I> {
    let timeout = (*p.timeout()).max(floor);
    p.with_timeout(timeout)
}

/// The handler of [`Floor`]: the wrapped one, its streams' negotiation
/// time at least `floor`.
#[derive(Debug)]
pub struct FloorHandler<H> {
    inner: H,
    floor: Duration,
}

impl<H: ConnectionHandler> ConnectionHandler for FloorHandler<H> {
    type FromBehaviour = H::FromBehaviour;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = H::InboundProtocol;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        floored(self.inner.listen_protocol(), self.floor)
    }

    fn connection_keep_alive(&self) -> bool {
        self.inner.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        let floor = self.floor;
        self.inner.poll(cx).map(|e| match e {
            ConnectionHandlerEvent::OutboundSubstreamRequest { protocol } => {
                ConnectionHandlerEvent::OutboundSubstreamRequest {
                    protocol: floored(protocol, floor),
                }
            }
            e => e,
        })
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.inner.on_behaviour_event(event)
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
        self.inner.on_connection_event(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::core::upgrade::DeniedUpgrade;

    #[test]
    fn a_negotiation_may_take_at_least_the_floor() {
        let p = SubstreamProtocol::new(DeniedUpgrade, ());
        assert_eq!(*p.timeout(), NEGOTIATION_TIMEOUT);
        // Stretched (the simulator's dilation): the floor wins.
        let long = Duration::from_secs(100);
        assert_eq!(*floored(p, long).timeout(), long);
        // A protocol that asks for longer keeps its own.
        let own = SubstreamProtocol::new(DeniedUpgrade, ()).with_timeout(Duration::from_secs(60));
        assert_eq!(
            *floored(own, NEGOTIATION_TIMEOUT).timeout(),
            Duration::from_secs(60)
        );
    }

    /// A handler that asks for one outbound stream, with libp2p's default
    /// negotiation time.
    struct AsksOnce(bool);

    impl ConnectionHandler for AsksOnce {
        type FromBehaviour = std::convert::Infallible;
        type ToBehaviour = std::convert::Infallible;
        type InboundProtocol = DeniedUpgrade;
        type OutboundProtocol = DeniedUpgrade;
        type InboundOpenInfo = ();
        type OutboundOpenInfo = ();

        fn listen_protocol(&self) -> SubstreamProtocol<DeniedUpgrade, ()> {
            SubstreamProtocol::new(DeniedUpgrade, ())
        }

        fn poll(
            &mut self,
            _: &mut Context<'_>,
        ) -> Poll<ConnectionHandlerEvent<DeniedUpgrade, (), Self::ToBehaviour>> {
            if std::mem::replace(&mut self.0, true) {
                return Poll::Pending;
            }
            Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(DeniedUpgrade, ()),
            })
        }

        fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
            match event {}
        }

        fn on_connection_event(&mut self, _: ConnectionEvent<DeniedUpgrade, DeniedUpgrade>) {}
    }

    #[test]
    fn the_handler_floors_inbound_and_outbound_streams() {
        let floor = Duration::from_secs(300);
        let mut h = FloorHandler {
            inner: AsksOnce(false),
            floor,
        };
        assert_eq!(*h.listen_protocol().timeout(), floor);
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        match h.poll(&mut cx) {
            Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest { protocol }) => {
                assert_eq!(*protocol.timeout(), floor)
            }
            other => panic!("expected a stream request, got {other:?}"),
        }
        assert!(h.poll(&mut cx).is_pending());
    }
}
