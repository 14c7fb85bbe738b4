//! The per-recipient mailbox key of a UTC day.
//!
//! `key = SHA-256("fogmesh-mailbox/1" || recipient peer id bytes || day)`,
//! `day` the number of whole UTC days since the Unix epoch as 8 big-endian
//! bytes. Depositors use today's key; a recipient asks the holders of
//! today's and yesterday's keys (a message deposited just before midnight
//! is still found, and one deposited on another day is deposited again by
//! its sender while it waits).

use libp2p_identity::PeerId;
use sha2::{Digest, Sha256};

/// Domain tag of mailbox keys.
pub const KEY_DOMAIN: &[u8] = b"fogmesh-mailbox/1";
/// Milliseconds in a day.
pub const DAY_MS: u64 = 24 * 3600 * 1000;

/// A mailbox key: what Kademlia's closest-peer lookups are asked for.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MailboxKey(pub [u8; 32]);

impl std::fmt::Debug for MailboxKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MailboxKey({})", hex::encode(&self.0[..8]))
    }
}

impl MailboxKey {
    /// The key's bytes, as a Kademlia lookup key.
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.to_vec()
    }
}

/// The UTC day number of `now_ms` (ms since the Unix epoch).
pub fn day(now_ms: u64) -> u64 {
    now_ms / DAY_MS
}

/// The mailbox key of `recipient` on `day`.
pub fn key(recipient: &PeerId, day: u64) -> MailboxKey {
    let mut h = Sha256::new();
    h.update(KEY_DOMAIN);
    h.update(recipient.to_bytes());
    h.update(day.to_be_bytes());
    MailboxKey(h.finalize().into())
}

/// The keys a recipient checks at `now_ms`: today's and yesterday's.
pub fn keys_to_check(recipient: &PeerId, now_ms: u64) -> [MailboxKey; 2] {
    let d = day(now_ms);
    [key(recipient, d), key(recipient, d.saturating_sub(1))]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_recipient_and_day_and_are_stable() {
        let a = PeerId::random();
        let b = PeerId::random();
        assert_eq!(key(&a, 20_000), key(&a, 20_000));
        assert_ne!(key(&a, 20_000), key(&a, 20_001));
        assert_ne!(key(&a, 20_000), key(&b, 20_000));
        let now = 20_000 * DAY_MS + 5;
        assert_eq!(keys_to_check(&a, now), [key(&a, 20_000), key(&a, 19_999)]);
        assert_eq!(day(DAY_MS - 1), 0);
        assert_eq!(day(DAY_MS), 1);
    }
}
