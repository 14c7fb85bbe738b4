//! Direct messages: one peer to another, sealed end to end, over whichever
//! route the policy picks for each message, delivered once and in order.
//!
//! The pieces, all sans-IO (no clock, no sockets: every call takes `now`):
//! - [`wire`]: the [`Envelope`] that relays see (recipient, hop limit,
//!   a padded sealed body) and the per-hop [`Ack`].
//! - [`letter`]: what is inside the body: a [`Letter`] or a [`Receipt`],
//!   signed by its author and sealed (HPKE) to its recipient, padded to a
//!   few fixed sizes.
//! - [`inbox`]: the recipient's per-sender order: duplicates dropped, gaps
//!   held, released in sequence order.
//! - [`outbox`]: one outgoing message's route state machine: attempts,
//!   per-route timeouts, failover to the next route of its plan, back-off
//!   when no route works, expiry.
//! - [`mesh`]: what a node does with an envelope that reaches it over BLE
//!   or through a gateway: deliver, forward (hop limit, duplicate
//!   suppression) or drop.
//!
//! See docs/protocols/messages.md for the formats, limits and what relays
//! learn.

pub mod inbox;
pub mod letter;
pub mod mesh;
pub mod outbox;
pub mod wire;

pub use inbox::{Arrival, Inbox};
pub use letter::{Letter, Opened, Payload, Receipt, SealError, open, seal};
pub use mesh::{Relay, SeenSet};
pub use outbox::{Attempt, OutState, Outcome, Outgoing, Step, Timeouts};
pub use wire::{Ack, Envelope, EnvelopeId, Refusal, WireError};

use serde::{Deserialize, Serialize};

/// Protocol name of direct messages over internet connections.
pub const PROTOCOL: &str = "/fogmesh/dm/1";
/// Protocol name of direct messages over BLE connections (same frames; a
/// separate name so that each lives only on its own kind of connection).
pub const BLE_PROTOCOL: &str = "/fogmesh/dm-ble/1";
/// Listed (through identify) only by nodes that have both internet and BLE:
/// they carry envelopes between the two (gateways).
pub const GATEWAY_PROTOCOL: &str = "/fogmesh/dm-gateway/1";

/// Largest message text, bytes of UTF-8.
pub const MAX_TEXT: usize = 64 * 1024;
/// Hop limit of a new envelope (BitChat's TTL).
pub const DEFAULT_TTL: u8 = 7;

/// A direct message's id: 16 random bytes chosen by the sender, the same
/// on every route and every attempt.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(#[serde(with = "serde_bytes")] pub [u8; 16]);

impl MessageId {
    /// A fresh random id.
    pub fn random(rng: &mut impl rand_core::CryptoRng) -> Self {
        let mut b = [0u8; 16];
        rng.fill_bytes(&mut b);
        MessageId(b)
    }
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl std::str::FromStr for MessageId {
    type Err = BadMessageId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut b = [0u8; 16];
        hex::decode_to_slice(s, &mut b).map_err(|_| BadMessageId)?;
        Ok(MessageId(b))
    }
}

/// A message id that is not 32 hex digits.
#[derive(Debug, Clone, thiserror::Error)]
#[error("a message id is 32 hex digits")]
pub struct BadMessageId;
