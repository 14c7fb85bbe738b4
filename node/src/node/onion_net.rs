//! The event loop's side of the onion route: hands private attempts and
//! their receipts to the onion task (`crate::onion`) and tells it about
//! connections. Nothing here touches Sphinx: the task and its worker
//! thread do.

use fogmesh_protocols::messages::{Envelope, MessageId};
use libp2p::PeerId;

use crate::messages::AttemptResult;
use crate::onion::{Command, OnionHandle};

/// The onion task's handle, when the node has the route.
#[derive(Debug, Default)]
pub(super) struct OnionNet {
    handle: Option<OnionHandle>,
}

impl OnionNet {
    pub(super) fn new(handle: OnionHandle) -> Self {
        OnionNet {
            handle: Some(handle),
        }
    }

    /// Attempt `n` of message `id` over the onion route. `Err` is the
    /// attempt's immediate answer; otherwise the task answers the actor.
    pub(super) fn send(&self, id: MessageId, n: u32, env: Envelope) -> Result<(), AttemptResult> {
        let Some(h) = &self.handle else {
            return Err(AttemptResult::Unavailable(
                "the onion route is off on this node".into(),
            ));
        };
        if h.offer(Command::Send { id, n, env }) {
            Ok(())
        } else {
            Err(AttemptResult::Failed("the onion task is busy".into()))
        }
    }

    /// A receipt of a letter that came by the onion route: through the
    /// sender's reply block or not at all (a receipt over another route
    /// would tie the sender to the recipient).
    pub(super) fn receipt(&self, env: Envelope) {
        if let Some(h) = &self.handle
            && !h.offer(Command::Receipt { env })
        {
            tracing::debug!("onion task busy: receipt dropped, the sender will retry");
        }
    }

    /// A connection to `peer` came up over the internet.
    pub(super) fn connected(&self, peer: PeerId) {
        if let Some(h) = &self.handle {
            h.connected(peer);
        }
    }

    /// The last connection to `peer` closed.
    pub(super) fn closed(&self, peer: PeerId) {
        if let Some(h) = &self.handle {
            h.closed(peer);
        }
    }
}
