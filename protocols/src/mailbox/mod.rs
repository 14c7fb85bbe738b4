//! Mailboxes and couriers: the network holds a sealed direct message until
//! its recipient appears, so that a sender and a recipient who are never
//! online together still talk.
//!
//! The pieces, all sans-IO:
//! - [`key`]: the per-recipient mailbox key of a UTC day (a hash of a
//!   domain tag, the recipient's peer id and the day number): the k peers
//!   closest to it in Kademlia are the recipient's holders that day. A
//!   watcher of DHT lookups sees only the hash; without the recipient's
//!   identity it cannot tell whose mailbox it is, and the key changes
//!   every day.
//! - [`wire`]: the request-response frames of `/fogmesh/mailbox/1`:
//!   [`Request::Deposit`] (an encoded direct-message envelope, at most
//!   [`MAX_DEPOSIT`] bytes), [`Request::Fetch`], [`Request::Delete`], and
//!   the answers, with typed refusals.
//! - [`holder`]: what a holder accepts and keeps: the quotas (bytes,
//!   envelopes per depositor and per recipient, envelope size, lifetime)
//!   and who may fetch or delete what.
//! - [`placement`]: where one envelope goes: candidates asked in order
//!   until enough hold it, a refusal replaced by the next candidate.
//!
//! A holder learns the recipient's peer id (it is in every envelope's
//! clear header), the depositor's peer id (the Noise-authenticated
//! connection), the padded size and the times; never the text or the
//! sender. See docs/protocols/mailbox.md.

pub mod holder;
pub mod key;
pub mod placement;
pub mod wire;

pub use holder::{Admit, Ledger, Quotas, Stored};
pub use key::{MailboxKey, day, key, keys_to_check};
pub use placement::Placement;
pub use wire::{Item, MAX_DEPOSIT, MAX_REQUEST, MAX_RESPONSE, Refusal, Request, Response};

/// Protocol name of mailbox requests.
pub const PROTOCOL: &str = "/fogmesh/mailbox/1";
/// Holders a message is deposited with (Kademlia's closest peers to the
/// key, or BLE couriers).
pub const HOLDERS: usize = 3;
