//! The envelope relays see, and the per-hop answer.
//!
//! An [`Envelope`] is `{to, ttl, body}` in the versioned CBOR frame: the
//! recipient's peer id (in clear, so that BLE relays and gateways can
//! steer it), a hop limit, and the sealed body ([`super::letter`]), padded
//! to one of a few sizes. Relays suppress duplicates by [`EnvelopeId`], a
//! hash of the recipient and the body: every attempt of a message is
//! sealed afresh, so a retry is a new envelope to relays and the same
//! message (by its inner id) to the recipient.
//!
//! Each hop answers with an [`Ack`]: accepted (stored, forwarded or
//! delivered; not yet a receipt) or refused with a reason.

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::frame::WireError;
use crate::frame::{decode, encode};

use super::letter::MAX_BODY;

/// Version of the envelope and ack frames.
pub const VERSION: u64 = 1;
/// Largest encoded envelope: the largest body and a little framing.
pub const MAX_ENVELOPE: usize = MAX_BODY + 128;
/// Largest encoded ack.
pub const MAX_ACK: usize = 64;

/// What travels hop by hop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The recipient.
    #[serde(rename = "t")]
    pub to: PeerId,
    /// Hops left: a relay forwards only while it is above 1, decreasing it.
    #[serde(rename = "h")]
    pub ttl: u8,
    /// The sealed, padded [`super::Payload`].
    #[serde(rename = "b", with = "serde_bytes")]
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("to", &self.to)
            .field("ttl", &self.ttl)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// The duplicate-suppression key of an envelope.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct EnvelopeId(pub [u8; 16]);

impl Envelope {
    /// Its id: the first 16 bytes of SHA-256(to || body). The hop limit is
    /// not part of it, so a copy that took a shorter path is still a
    /// duplicate.
    pub fn id(&self) -> EnvelopeId {
        let mut h = Sha256::new();
        h.update(self.to.to_bytes());
        h.update(&self.body);
        let d = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&d[..16]);
        EnvelopeId(id)
    }

    /// The frame.
    pub fn encode(&self) -> Vec<u8> {
        encode(VERSION, self)
    }

    /// Decodes a frame of at most [`MAX_ENVELOPE`] bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let env: Envelope = decode(bytes, MAX_ENVELOPE, VERSION)?;
        if env.body.len() > MAX_BODY {
            return Err(WireError::TooLarge {
                len: env.body.len(),
                max: MAX_BODY,
            });
        }
        Ok(env)
    }
}

/// Why a hop refused an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Refusal {
    /// Too much from this peer right now: try again later.
    Busy,
    /// The envelope did not decode or open.
    Malformed,
    /// Not for this node, and it cannot carry it further (hop limit,
    /// no neighbours, no route).
    NoRoute,
    /// The recipient holds too many undelivered messages from the sender.
    Full,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Busy => "busy",
            Refusal::Malformed => "malformed",
            Refusal::NoRoute => "no route",
            Refusal::Full => "recipient's queue for this sender is full",
        })
    }
}

/// A hop's answer to an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ack {
    /// Taken: delivered to the recipient, or forwarded.
    Accepted,
    /// Not taken, and why.
    Refused(Refusal),
}

impl Ack {
    /// The frame.
    pub fn encode(&self) -> Vec<u8> {
        encode(VERSION, self)
    }

    /// Decodes a frame of at most [`MAX_ACK`] bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        decode(bytes, MAX_ACK, VERSION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_and_its_id_ignores_the_hop_limit() {
        let env = Envelope {
            to: PeerId::random(),
            ttl: 7,
            body: vec![1; 300],
        };
        let back = Envelope::decode(&env.encode()).expect("decodes");
        assert_eq!(back, env);
        let mut hop = env.clone();
        hop.ttl = 3;
        assert_eq!(hop.id(), env.id());
        let mut other = env.clone();
        other.body[0] = 2;
        assert_ne!(other.id(), env.id());
    }

    #[test]
    fn oversized_and_garbage_envelopes_are_refused() {
        let env = Envelope {
            to: PeerId::random(),
            ttl: 7,
            body: vec![0; MAX_BODY + 1],
        };
        assert!(matches!(
            Envelope::decode(&env.encode()),
            Err(WireError::TooLarge { .. })
        ));
        assert!(Envelope::decode(&[0xff; 40]).is_err());
        assert!(Envelope::decode(&[]).is_err());
    }

    #[test]
    fn acks_round_trip() {
        for ack in [
            Ack::Accepted,
            Ack::Refused(Refusal::Busy),
            Ack::Refused(Refusal::Full),
        ] {
            assert_eq!(Ack::decode(&ack.encode()).expect("decodes"), ack);
        }
    }
}
