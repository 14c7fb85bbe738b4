//! CBOR encoding of everything groups put on the wire, with size limits and versioning.
//!
//! Every top-level message is a CBOR map `{ "v": 1, "m": <message> }`.
//! Decoding first reads only `v`, so a message from a newer version is
//! refused with [`WireError::UnsupportedVersion`] instead of a confusing
//! field error, then decodes the whole frame. Every decoder takes an explicit
//! maximum input size, rejects trailing bytes, and never panics on garbage
//! (ciborium limits nesting depth, and serde caps preallocation by the input).
//! Ids and hashes are computed over our own re-encoding of a decoded value,
//! so a peer cannot make one message appear under two ids by re-encoding it.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::causal::MessageId;
use super::crypto::{self, CryptoError, MESSAGE_OVERHEAD};
use super::membership::Op;
use super::sync::{Summary, SyncRequest, SyncResponse};
use super::{GroupId, Keypair, PeerId};

/// The wire version this code speaks.
pub const WIRE_VERSION: u64 = 1;
/// Maximum plaintext of one message, in bytes.
pub const MAX_TEXT: usize = 64 * 1024;
/// Maximum encoded message envelope: text, AEAD overhead, and room for the
/// header (16 deps of 34 bytes, sender, signature, field names).
pub const MAX_ENVELOPE_SIZE: usize = MAX_TEXT + MESSAGE_OVERHEAD + 2048;
/// Maximum encoded op. A genesis op with 1000 members and 1000 sealed keys
/// is about 172 KB. Note: above gossipsub's default 64 KiB transmit limit.
pub const MAX_OP_SIZE: usize = 256 * 1024;
/// Maximum encoded summary.
pub const MAX_SUMMARY_SIZE: usize = 128 * 1024;
/// Maximum encoded sync request (it may carry a summary).
pub const MAX_SYNC_REQUEST_SIZE: usize = MAX_SUMMARY_SIZE + 4096;
/// Maximum encoded sync response.
pub const MAX_SYNC_RESPONSE_SIZE: usize = 4 * 1024 * 1024;

pub use crate::frame::WireError;

/// The signed part of a message envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeBody {
    /// The group the message belongs to.
    pub group_id: GroupId,
    /// The epoch whose key encrypted it.
    pub epoch: u64,
    /// The author.
    pub sender: PeerId,
    /// The author's sequence number, from 1, without gaps.
    pub seq: u64,
    /// Causal heads the sender had delivered, at most
    /// [`MAX_DEPS`](super::causal::MAX_DEPS); includes the sender's previous message.
    pub deps: Vec<MessageId>,
    /// Sender's clock, informational only (never used for ordering).
    pub timestamp_ms: u64,
    /// `nonce || ciphertext || tag` (see [`crypto`]).
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

/// A message envelope with the sender's signature over its body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEnvelope {
    /// The signed content.
    pub body: EnvelopeBody,
    /// Ed25519 signature by `body.sender` over the domain tag and the CBOR of `body`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl SignedEnvelope {
    /// Signs a body with the sender's keypair.
    pub fn sign(keypair: &Keypair, body: EnvelopeBody) -> Result<Self, CryptoError> {
        let signature = crypto::sign(keypair, crypto::SIGN_MSG, &cbor(&body))?;
        Ok(SignedEnvelope { body, signature })
    }

    /// Checks the signature against the sender's peer id.
    pub fn verify(&self) -> Result<(), CryptoError> {
        crypto::verify(
            &self.body.sender,
            crypto::SIGN_MSG,
            &cbor(&self.body),
            &self.signature,
        )
    }

    /// The message id: SHA-256 of the encoded envelope.
    pub fn id(&self) -> MessageId {
        MessageId(Sha256::digest(encode_envelope(self)).into())
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    crate::frame::encode(WIRE_VERSION, value)
}

fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, WireError> {
    crate::frame::decode(bytes, max, WIRE_VERSION)
}

pub(crate) use crate::frame::cbor;

/// Encodes a membership op.
pub fn encode_op(op: &Op) -> Vec<u8> {
    encode(op)
}

/// Decodes a membership op of at most [`MAX_OP_SIZE`] bytes.
pub fn decode_op(bytes: &[u8]) -> Result<Op, WireError> {
    decode(bytes, MAX_OP_SIZE)
}

/// Encodes a message envelope.
pub fn encode_envelope(env: &SignedEnvelope) -> Vec<u8> {
    encode(env)
}

/// Decodes a message envelope of at most [`MAX_ENVELOPE_SIZE`] bytes.
pub fn decode_envelope(bytes: &[u8]) -> Result<SignedEnvelope, WireError> {
    decode(bytes, MAX_ENVELOPE_SIZE)
}

/// Encodes a sync summary.
pub fn encode_summary(summary: &Summary) -> Vec<u8> {
    encode(summary)
}

/// Decodes a sync summary of at most [`MAX_SUMMARY_SIZE`] bytes.
pub fn decode_summary(bytes: &[u8]) -> Result<Summary, WireError> {
    decode(bytes, MAX_SUMMARY_SIZE)
}

/// Encodes a sync request.
pub fn encode_sync_request(req: &SyncRequest) -> Vec<u8> {
    encode(req)
}

/// Decodes a sync request of at most [`MAX_SYNC_REQUEST_SIZE`] bytes.
pub fn decode_sync_request(bytes: &[u8]) -> Result<SyncRequest, WireError> {
    decode(bytes, MAX_SYNC_REQUEST_SIZE)
}

/// Encodes a sync response.
pub fn encode_sync_response(resp: &SyncResponse) -> Vec<u8> {
    encode(resp)
}

/// Decodes a sync response of at most [`MAX_SYNC_RESPONSE_SIZE`] bytes.
pub fn decode_sync_response(bytes: &[u8]) -> Result<SyncResponse, WireError> {
    decode(bytes, MAX_SYNC_RESPONSE_SIZE)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, RngExt, SeedableRng};

    use super::super::Group;
    use super::super::sync::Want;
    use super::*;

    fn sample() -> (Op, SignedEnvelope) {
        let mut rng = StdRng::seed_from_u64(5);
        let admin = Keypair::ed25519_from_bytes([1; 32]).ok();
        let Some(admin) = admin else {
            panic!("keypair")
        };
        let bob = Keypair::ed25519_from_bytes([2; 32])
            .map(|k| k.public().to_peer_id())
            .ok();
        let members: Vec<PeerId> = bob.into_iter().collect();
        let created = Group::create(admin, "name", "desc", &members, &mut rng, 1);
        let Ok((mut group, ops)) = created else {
            panic!("create")
        };
        let composed = group.compose(&mut rng, "hello", 2);
        let (Some(op), Ok((env, _))) = (ops.into_iter().next(), composed) else {
            panic!("compose")
        };
        (op, env)
    }

    #[test]
    fn roundtrips() {
        let (op, env) = sample();
        assert_eq!(decode_op(&encode_op(&op)).ok(), Some(op.clone()));
        assert_eq!(
            decode_envelope(&encode_envelope(&env)).ok(),
            Some(env.clone())
        );
        let summary = Summary {
            membership_len: 3,
            heads_hash: [1; 32],
            per_sender: vec![(env.body.sender, 4)],
        };
        assert_eq!(
            decode_summary(&encode_summary(&summary)).ok(),
            Some(summary.clone())
        );
        assert!(encode_summary(&summary.brief()).len() < 100);
        // The largest legal envelope fits the limit.
        let mut max = env.clone();
        max.body.ciphertext = vec![0; MAX_TEXT + MESSAGE_OVERHEAD];
        max.body.deps = (0..16).map(|i| MessageId([i; 32])).collect();
        max.body.seq = u64::MAX;
        max.body.epoch = u64::MAX;
        max.body.timestamp_ms = u64::MAX;
        assert!(decode_envelope(&encode_envelope(&max)).is_ok());
        let req = SyncRequest::Fetch {
            group_id: GroupId([3; 32]),
            want: Want {
                membership_from: Some(1),
                ranges: vec![(env.body.sender, 1, 5)],
                need_full_summary: false,
            },
        };
        assert_eq!(
            decode_sync_request(&encode_sync_request(&req)).ok(),
            Some(req)
        );
        let resp = SyncResponse {
            group_id: GroupId([3; 32]),
            summary: Some(summary),
            ops: vec![op],
            messages: vec![env],
        };
        assert_eq!(
            decode_sync_response(&encode_sync_response(&resp)).ok(),
            Some(resp)
        );
    }

    #[test]
    fn unknown_version_oversize_and_trailing_bytes_are_rejected() {
        let (_, env) = sample();
        let v2 = crate::frame::encode(2, &env);
        assert!(matches!(
            decode_envelope(&v2),
            Err(WireError::UnsupportedVersion(2))
        ));
        let mut trailing = encode_envelope(&env);
        trailing.push(0);
        assert!(matches!(
            decode_envelope(&trailing),
            Err(WireError::TrailingBytes)
        ));
        let big = vec![0u8; MAX_ENVELOPE_SIZE + 1];
        assert!(matches!(
            decode_envelope(&big),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_and_truncations_never_panic() {
        let (op, env) = sample();
        let valid = [encode_op(&op), encode_envelope(&env)];
        let mut rng = StdRng::seed_from_u64(6);
        for _ in 0..2000 {
            let len = rng.random_range(0..300);
            let mut junk = vec![0u8; len];
            rng.fill_bytes(&mut junk);
            // Random bytes, and random bytes behind a valid-looking frame head.
            let mut framed = vec![0xa2, 0x61, b'v', 0x01, 0x61, b'm'];
            framed.extend_from_slice(&junk);
            for input in [&junk, &framed] {
                assert!(decode_op(input).is_err());
                assert!(decode_envelope(input).is_err());
                let _ = decode_summary(input);
                let _ = decode_sync_request(input);
                let _ = decode_sync_response(input);
            }
        }
        // Deep nesting must hit ciborium's recursion limit, not the stack.
        let mut deep = vec![0xa2, 0x61, b'v', 0x01, 0x61, b'm'];
        deep.extend(std::iter::repeat_n(0x81, 60_000));
        assert!(decode_envelope(&deep).is_err());
        assert!(decode_sync_response(&deep).is_err());
        // A byte string claiming 4 GiB in a short input.
        let huge = [
            0xa2, 0x61, b'v', 0x01, 0x61, b'm', 0x5a, 0xff, 0xff, 0xff, 0xff, 0,
        ];
        assert!(decode_op(&huge).is_err());
        for bytes in &valid {
            for cut in 0..bytes.len() {
                assert!(decode_op(&bytes[..cut]).is_err());
                assert!(decode_envelope(&bytes[..cut]).is_err());
            }
            // Single-byte corruptions decode to an error or to a value that
            // no longer verifies; either way, no panic.
            for _ in 0..500 {
                let mut c = bytes.clone();
                let i = rng.random_range(0..c.len());
                c[i] ^= 1 << rng.random_range(0..8);
                if let Ok(e) = decode_envelope(&c) {
                    assert!(e == env || e.verify().is_err());
                }
                let _ = decode_op(&c);
            }
        }
    }
}
