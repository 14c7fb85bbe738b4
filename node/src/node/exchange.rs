//! What an event of one of our request-response protocols (group sync,
//! files) means for the actor behind it: a peer's request to answer, or
//! the answer (or failure) of a request the node sent. Both protocols'
//! glue reads their events through [`exchange`], so the two cannot drift.

use libp2p::PeerId;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};

use crate::codec::Frame;

/// A request-response event, as the actor needs it.
pub(super) enum Exchange<F> {
    /// A peer's request; the actor answers through `channel`.
    Request {
        peer: PeerId,
        frame: Vec<u8>,
        channel: ResponseChannel<F>,
    },
    /// What became of a request this node sent: the response frame, or why
    /// there is none.
    Answer {
        peer: PeerId,
        request_id: OutboundRequestId,
        result: Result<Vec<u8>, String>,
    },
}

/// Reads one event of `protocol`; `None` for events that need nothing
/// from the actor (a failed inbound exchange is logged).
pub(super) fn exchange<F: Frame>(
    protocol: &str,
    ev: request_response::Event<F, F>,
) -> Option<Exchange<F>> {
    match ev {
        request_response::Event::Message { peer, message, .. } => Some(match message {
            request_response::Message::Request {
                request, channel, ..
            } => Exchange::Request {
                peer,
                frame: request.into_bytes(),
                channel,
            },
            request_response::Message::Response {
                request_id,
                response,
            } => Exchange::Answer {
                peer,
                request_id,
                result: Ok(response.into_bytes()),
            },
        }),
        request_response::Event::OutboundFailure {
            peer,
            request_id,
            error,
            ..
        } => Some(Exchange::Answer {
            peer,
            request_id,
            result: Err(error.to_string()),
        }),
        request_response::Event::InboundFailure { peer, error, .. } => {
            tracing::debug!(%peer, "{protocol} response failed: {error}");
            None
        }
        request_response::Event::ResponseSent { .. } => None,
    }
}
