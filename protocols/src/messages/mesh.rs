//! What a node does with an envelope it receives: keep it (it is the
//! recipient), carry it further, or drop it. This is BitChat's directed
//! flooding: a hop limit ([`super::DEFAULT_TTL`] hops), duplicate
//! suppression by envelope id for [`SEEN_TTL_MS`], never back to the peer
//! it came from; straight to the recipient when it is a neighbour.
//!
//! The node applies [`relay`] to every envelope; [`Relay::Forward`] lists
//! where it may go, and the node picks the links (BLE neighbours, or the
//! recipient's internet connection when it is a gateway).

use std::collections::{HashMap, VecDeque};

use libp2p_identity::PeerId;

use super::wire::{Envelope, EnvelopeId};

/// How long an envelope id is remembered.
pub const SEEN_TTL_MS: u64 = 10 * 60 * 1000;
/// Most envelope ids remembered (older ones are forgotten first).
pub const SEEN_CAPACITY: usize = 8192;

/// Recently seen envelope ids, bounded in number and age.
#[derive(Debug, Default)]
pub struct SeenSet {
    at: HashMap<EnvelopeId, u64>,
    order: VecDeque<(EnvelopeId, u64)>,
}

impl SeenSet {
    /// Records `id` at `now`; true if it was not seen within
    /// [`SEEN_TTL_MS`].
    pub fn insert(&mut self, id: EnvelopeId, now: u64) -> bool {
        self.expire(now);
        if self.at.contains_key(&id) {
            return false;
        }
        if self.order.len() >= SEEN_CAPACITY
            && let Some((old, _)) = self.order.pop_front()
        {
            self.at.remove(&old);
        }
        self.at.insert(id, now);
        self.order.push_back((id, now));
        true
    }

    /// Number of ids remembered.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    fn expire(&mut self, now: u64) {
        while let Some(&(id, t)) = self.order.front() {
            if now.saturating_sub(t) < SEEN_TTL_MS {
                break;
            }
            self.order.pop_front();
            self.at.remove(&id);
        }
    }
}

/// The decision for one envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relay {
    /// This node is the recipient: open it.
    Deliver,
    /// Carry it on with this hop limit, not back to `from`.
    Forward {
        /// The hop limit of the copies sent on.
        ttl: u8,
    },
    /// Nothing to do (why).
    Drop(&'static str),
}

/// Decides what to do with `env`, received at `now` from a peer, at node
/// `me`.
pub fn relay(seen: &mut SeenSet, me: &PeerId, env: &Envelope, now: u64) -> Relay {
    if !seen.insert(env.id(), now) {
        return Relay::Drop("duplicate");
    }
    if env.to == *me {
        return Relay::Deliver;
    }
    if env.ttl <= 1 {
        return Relay::Drop("hop limit reached");
    }
    Relay::Forward { ttl: env.ttl - 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(to: PeerId, ttl: u8, b: u8) -> Envelope {
        Envelope {
            to,
            ttl,
            body: vec![b; 64],
        }
    }

    #[test]
    fn delivers_to_the_recipient_once() {
        let me = PeerId::random();
        let mut seen = SeenSet::default();
        let e = env(me, 3, 1);
        assert_eq!(relay(&mut seen, &me, &e, 0), Relay::Deliver);
        assert_eq!(relay(&mut seen, &me, &e, 1), Relay::Drop("duplicate"));
    }

    #[test]
    fn forwards_with_one_hop_less_until_the_limit() {
        let me = PeerId::random();
        let other = PeerId::random();
        let mut seen = SeenSet::default();
        assert_eq!(
            relay(&mut seen, &me, &env(other, 7, 1), 0),
            Relay::Forward { ttl: 6 }
        );
        assert_eq!(
            relay(&mut seen, &me, &env(other, 1, 2), 0),
            Relay::Drop("hop limit reached")
        );
        // The same body with a different hop limit is a duplicate.
        assert_eq!(
            relay(&mut seen, &me, &env(other, 5, 1), 0),
            Relay::Drop("duplicate")
        );
    }

    #[test]
    fn seen_ids_are_bounded_and_expire() {
        let mut seen = SeenSet::default();
        for i in 0..(SEEN_CAPACITY as u32 + 100) {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            assert!(seen.insert(EnvelopeId(id), 0));
        }
        assert_eq!(seen.len(), SEEN_CAPACITY);
        let id = EnvelopeId([0xee; 16]);
        assert!(seen.insert(id, 0));
        assert!(!seen.insert(id, SEEN_TTL_MS - 1));
        assert!(seen.insert(id, 2 * SEEN_TTL_MS));
    }
}
