//! The messages actor's handle: one typed async method per API call, and
//! the event loop's way in. Peer ids, message ids and route names are
//! parsed here, before anything is queued. Every method is cancel-safe: a
//! cancelled call's answer is dropped (a `send` that was queued still
//! happens).

use fogmesh_protocols::messages::MessageId;
use fogmesh_protocols::policy::{Preference, Route};
use libp2p::PeerId;

use super::Input;
use crate::actor::{Mailbox, MailboxError, Reply, ServiceError, parse_peer};
use crate::types::{DirectAck, DirectMessage, SendDirect};

/// The API's and the event loop's handle on the messages actor. Cloneable.
#[derive(Debug, Clone)]
pub struct MessagesHandle {
    mailbox: Mailbox<Input>,
}

/// A call from the API, with its arguments parsed.
#[derive(Debug)]
pub(crate) enum ApiCall {
    Send {
        to: PeerId,
        text: String,
        preference: Preference,
        private: bool,
        reply: Reply<DirectAck>,
    },
    List {
        peer: Option<PeerId>,
        limit: Option<usize>,
        reply: Reply<Vec<DirectMessage>>,
    },
    Get {
        id: MessageId,
        reply: Reply<DirectMessage>,
    },
    Outbox {
        reply: Reply<Vec<DirectMessage>>,
    },
    /// The node is stopping: deposit what was never deposited; answers
    /// how many deposits are still unanswered.
    MailboxFlush {
        reply: Reply<usize>,
    },
}

impl MessagesHandle {
    pub(super) fn new(mailbox: Mailbox<Input>) -> Self {
        MessagesHandle { mailbox }
    }

    /// Queues a network input without waiting (for the event loop).
    pub(crate) fn offer(&self, input: Input) -> Result<(), MailboxError> {
        self.mailbox.offer(input)
    }

    /// Sends a message: answers once it is durable here, with its id and
    /// route plan, whether or not the peer is reachable now.
    pub async fn send(&self, req: SendDirect) -> Result<DirectAck, ServiceError> {
        let to = parse_peer(&req.to)?;
        let preference = match req.route.as_deref() {
            None | Some("auto") => Preference::Auto,
            Some(name) => Preference::Only(
                name.parse::<Route>()
                    .map_err(|e| ServiceError::BadRequest(e.to_string()))?,
            ),
        };
        if req.private
            && let Preference::Only(r) = preference
            && r != Route::Onion
        {
            return Err(ServiceError::BadRequest(format!(
                "--private asks for a privacy route; route {r} is not one"
            )));
        }
        self.mailbox
            .call(|reply| ApiCall::Send {
                to,
                text: req.text,
                preference,
                private: req.private,
                reply,
            })
            .await
    }

    /// The conversation with `peer` (all conversations with `None`), the
    /// last `limit` messages, oldest first.
    pub async fn list(
        &self,
        peer: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<DirectMessage>, ServiceError> {
        let peer = peer.map(parse_peer).transpose()?;
        self.mailbox
            .call(|reply| ApiCall::List { peer, limit, reply })
            .await
    }

    /// One message by id.
    pub async fn get(&self, id: &str) -> Result<DirectMessage, ServiceError> {
        let id: MessageId = id
            .parse()
            .map_err(|e| ServiceError::BadRequest(format!("{id:?}: {e}")))?;
        self.mailbox.call(|reply| ApiCall::Get { id, reply }).await
    }

    /// Outgoing messages not yet delivered (nor expired).
    pub async fn outbox(&self) -> Result<Vec<DirectMessage>, ServiceError> {
        self.mailbox.call(|reply| ApiCall::Outbox { reply }).await
    }

    /// Deposits every waiting message that has no mailbox holder yet (the
    /// node is about to stop); answers how many deposits are unanswered.
    pub async fn mailbox_flush(&self) -> Result<usize, ServiceError> {
        self.mailbox
            .call(|reply| ApiCall::MailboxFlush { reply })
            .await
    }
}
