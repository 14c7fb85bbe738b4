//! The gossip frame: what a group's gossipsub topic carries.
//!
//! One byte says what follows, then the frame of [`wire`]:
//! [`TAG_MESSAGE`] for a message envelope, [`TAG_OP`] for a membership op
//! (never the genesis op, which has no group id and travels only through
//! sync). The node publishes and validates these; the event log and the
//! simulator decode them to record wire copies. Every decoder underneath is
//! size-limited, and any other tag is refused.

use super::membership::Op;
use super::wire::{self, SignedEnvelope, WireError};

/// Gossip frame tag of a message envelope.
pub const TAG_MESSAGE: u8 = 1;
/// Gossip frame tag of a membership op.
pub const TAG_OP: u8 = 2;

/// Why a gossip frame did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GossipError {
    /// No bytes at all.
    #[error("empty gossip frame")]
    Empty,
    /// The first byte is not a known tag.
    #[error("unknown gossip frame tag {0}")]
    UnknownTag(u8),
    /// The frame after the tag did not decode.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// A decoded gossip frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GossipFrame {
    /// A message envelope.
    Message(SignedEnvelope),
    /// A membership op.
    Op(Op),
}

/// Encodes a message envelope for gossip.
pub fn encode_gossip_message(env: &SignedEnvelope) -> Vec<u8> {
    let mut out = vec![TAG_MESSAGE];
    out.extend(wire::encode_envelope(env));
    out
}

/// Encodes a membership op for gossip.
pub fn encode_gossip_op(op: &Op) -> Vec<u8> {
    let mut out = vec![TAG_OP];
    out.extend(wire::encode_op(op));
    out
}

/// Decodes a gossip frame.
pub fn decode_gossip(bytes: &[u8]) -> Result<GossipFrame, GossipError> {
    match bytes.split_first() {
        Some((&TAG_MESSAGE, rest)) => Ok(GossipFrame::Message(wire::decode_envelope(rest)?)),
        Some((&TAG_OP, rest)) => Ok(GossipFrame::Op(wire::decode_op(rest)?)),
        Some((&tag, _)) => Err(GossipError::UnknownTag(tag)),
        None => Err(GossipError::Empty),
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::super::{Group, Keypair};
    use super::*;

    #[test]
    fn frames_roundtrip() {
        let mut rng = StdRng::seed_from_u64(3);
        let Ok(admin) = Keypair::ed25519_from_bytes([4; 32]) else {
            panic!("keypair")
        };
        let Ok((mut group, ops)) = Group::create(admin, "g", "", &[], &mut rng, 1) else {
            panic!("create")
        };
        let Ok((env, _)) = group.compose(&mut rng, "hi", 2) else {
            panic!("compose")
        };
        let frame = encode_gossip_message(&env);
        assert_eq!(frame[0], TAG_MESSAGE);
        assert_eq!(decode_gossip(&frame), Ok(GossipFrame::Message(env)));
        let op = ops[0].clone();
        assert_eq!(
            decode_gossip(&encode_gossip_op(&op)),
            Ok(GossipFrame::Op(op))
        );
    }

    #[test]
    fn garbage_is_refused_with_its_reason() {
        assert_eq!(decode_gossip(&[]), Err(GossipError::Empty));
        assert_eq!(decode_gossip(&[9, 1, 2]), Err(GossipError::UnknownTag(9)));
        assert!(matches!(
            decode_gossip(&[TAG_MESSAGE, 0xff, 0x00]),
            Err(GossipError::Wire(_))
        ));
        assert!(matches!(
            decode_gossip(&[TAG_OP]),
            Err(GossipError::Wire(_))
        ));
    }
}
