//! A node's signed onion descriptor: what a sender needs to put it on a
//! path.
//!
//! `{ peer, mix_key, epoch, valid_from_ms, valid_until_ms, role }` as CBOR,
//! signed with the node's identity key (Ed25519) over
//! `fogmesh-mix/1 descriptor\0 || body`, in the versioned frame
//! `{v: 1, m: {d: body, s: signature}}`. The mix key is an X25519 key of
//! its own, rotated every epoch: the identity key never decrypts packets.
//! Verification checks the size before parsing, the signature against the
//! key in the peer id, and the validity window against `now`.

use libp2p_identity::{Keypair, PeerId};
use serde::{Deserialize, Serialize};

use crate::frame::{WireError, cbor, decode, encode};
use crate::groups::crypto;

/// Version of the descriptor frame.
pub const VERSION: u64 = 1;
/// Largest encoded descriptor frame, checked before parsing.
pub const MAX_DESCRIPTOR: usize = 512;
/// Longest validity window a descriptor may claim, ms (two hours: an
/// epoch and its grace period fit well within).
pub const MAX_VALIDITY_MS: u64 = 2 * 3_600_000;
/// Clock skew tolerated on `valid_from_ms`, ms.
pub const CLOCK_SKEW_MS: u64 = 60_000;

const SIGN_DOMAIN: &[u8] = b"fogmesh-mix/1 descriptor\0";

/// What a node does on the onion route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Relays packets for others (started with `--mix`), and receives.
    Mix,
    /// Only the final hop of paths to itself (and of its own SURBs).
    Endpoint,
}

/// The signed content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// The node.
    #[serde(rename = "p")]
    pub peer: PeerId,
    /// Its X25519 mix key for `epoch`.
    #[serde(rename = "k", with = "serde_bytes")]
    pub mix_key: [u8; 32],
    /// The key's epoch (ms since the Unix epoch divided by the epoch
    /// length).
    #[serde(rename = "e")]
    pub epoch: u64,
    /// Not valid before, ms since the Unix epoch.
    #[serde(rename = "f")]
    pub valid_from_ms: u64,
    /// Not valid after, ms since the Unix epoch.
    #[serde(rename = "u")]
    pub valid_until_ms: u64,
    /// Relay or endpoint only.
    #[serde(rename = "r")]
    pub role: Role,
}

/// Why a descriptor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DescriptorError {
    /// The frame did not decode.
    #[error("descriptor: {0}")]
    Wire(#[from] WireError),
    /// The body did not decode.
    #[error("descriptor body is malformed")]
    Malformed,
    /// The signature is not the peer's.
    #[error("descriptor signature does not verify")]
    BadSignature,
    /// Not valid at this time, or claims too long a window.
    #[error("descriptor not valid now")]
    Expired,
    /// The signing key is not the descriptor's peer.
    #[error("cannot sign a descriptor for another peer")]
    NotOurs,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    #[serde(rename = "d", with = "serde_bytes")]
    body: Vec<u8>,
    #[serde(rename = "s", with = "serde_bytes")]
    sig: Vec<u8>,
}

/// A descriptor and its encoding (kept, so it is re-announced byte for
/// byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedDescriptor {
    /// The verified content.
    pub descriptor: Descriptor,
    /// The frame as it travels.
    pub bytes: Vec<u8>,
}

impl Descriptor {
    /// Signs it with the node's identity key.
    pub fn sign(self, keypair: &Keypair) -> Result<SignedDescriptor, DescriptorError> {
        if keypair.public().to_peer_id() != self.peer {
            return Err(DescriptorError::NotOurs);
        }
        let body = cbor(&self);
        let sig =
            crypto::sign(keypair, SIGN_DOMAIN, &body).map_err(|_| DescriptorError::BadSignature)?;
        let bytes = encode(VERSION, &Wire { body, sig });
        Ok(SignedDescriptor {
            descriptor: self,
            bytes,
        })
    }

    /// Whether it may be used at `now`.
    pub fn valid_at(&self, now_ms: u64) -> bool {
        self.valid_from_ms <= now_ms.saturating_add(CLOCK_SKEW_MS)
            && now_ms < self.valid_until_ms
            && self.valid_until_ms.saturating_sub(self.valid_from_ms) <= MAX_VALIDITY_MS
    }
}

impl SignedDescriptor {
    /// Decodes and verifies a frame of at most [`MAX_DESCRIPTOR`] bytes:
    /// the signature must be the peer's own and the window must hold `now`.
    pub fn verify(bytes: &[u8], now_ms: u64) -> Result<Self, DescriptorError> {
        let descriptor = Self::decode_unchecked_time(bytes)?;
        if !descriptor.descriptor.valid_at(now_ms) {
            return Err(DescriptorError::Expired);
        }
        Ok(descriptor)
    }

    /// The peer a frame says it describes, **unverified**: only for finding
    /// the descriptor already held for that peer (a frame equal to it byte
    /// for byte needs no second check). `None` if it does not decode.
    pub fn claimed_peer(bytes: &[u8]) -> Option<PeerId> {
        decode_parts(bytes).ok().map(|(_, d)| d.peer)
    }

    /// [`Self::verify`] without the validity window (the fuzz target and
    /// tests use it); the signature is still checked.
    pub fn decode_unchecked_time(bytes: &[u8]) -> Result<Self, DescriptorError> {
        let (wire, descriptor) = decode_parts(bytes)?;
        crypto::verify(&descriptor.peer, SIGN_DOMAIN, &wire.body, &wire.sig)
            .map_err(|_| DescriptorError::BadSignature)?;
        Ok(SignedDescriptor {
            descriptor,
            bytes: bytes.to_vec(),
        })
    }
}

/// The frame and the body it carries, decoded within [`MAX_DESCRIPTOR`];
/// nothing checked.
fn decode_parts(bytes: &[u8]) -> Result<(Wire, Descriptor), DescriptorError> {
    let wire: Wire = decode(bytes, MAX_DESCRIPTOR, VERSION)?;
    let descriptor: Descriptor =
        ciborium::from_reader(wire.body.as_slice()).map_err(|_| DescriptorError::Malformed)?;
    Ok((wire, descriptor))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(k: &Keypair, now: u64) -> Descriptor {
        Descriptor {
            peer: k.public().to_peer_id(),
            mix_key: [7; 32],
            epoch: 3,
            valid_from_ms: now,
            valid_until_ms: now + 3_600_000,
            role: Role::Mix,
        }
    }

    #[test]
    fn a_signed_descriptor_verifies_and_fits() {
        let k = Keypair::generate_ed25519();
        let s = desc(&k, 1_000).sign(&k).expect("signs");
        assert!(s.bytes.len() <= MAX_DESCRIPTOR, "{}", s.bytes.len());
        let back = SignedDescriptor::verify(&s.bytes, 2_000).expect("verifies");
        assert_eq!(back, s);
    }

    #[test]
    fn the_claimed_peer_is_read_without_checking_the_signature() {
        let k = Keypair::generate_ed25519();
        let s = desc(&k, 1_000).sign(&k).expect("signs");
        let peer = k.public().to_peer_id();
        assert_eq!(SignedDescriptor::claimed_peer(&s.bytes), Some(peer));
        // A forged signature still names the peer: the claim only finds
        // what is held, it proves nothing.
        let mut forged = s.bytes.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert_eq!(SignedDescriptor::claimed_peer(&forged), Some(peer));
        assert!(SignedDescriptor::verify(&forged, 2_000).is_err());
        assert_eq!(SignedDescriptor::claimed_peer(b"not a descriptor"), None);
    }

    #[test]
    fn forged_expired_and_oversized_descriptors_are_refused() {
        let k = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        // Signed by another key than the peer's.
        assert_eq!(
            desc(&k, 0).sign(&other).err(),
            Some(DescriptorError::NotOurs)
        );
        let s = desc(&k, 1_000).sign(&k).expect("signs");
        let mut forged: Wire = decode(&s.bytes, MAX_DESCRIPTOR, VERSION).expect("decodes");
        let mut d = desc(&k, 1_000);
        d.mix_key = [9; 32];
        forged.body = cbor(&d);
        let forged = encode(VERSION, &forged);
        assert_eq!(
            SignedDescriptor::verify(&forged, 2_000).err(),
            Some(DescriptorError::BadSignature)
        );
        assert_eq!(
            SignedDescriptor::verify(&s.bytes, 1_000 + 3_600_000).err(),
            Some(DescriptorError::Expired)
        );
        let mut long = desc(&k, 1_000);
        long.valid_until_ms = 1_000 + MAX_VALIDITY_MS + 1;
        let long = long.sign(&k).expect("signs");
        assert_eq!(
            SignedDescriptor::verify(&long.bytes, 2_000).err(),
            Some(DescriptorError::Expired)
        );
        assert!(matches!(
            SignedDescriptor::verify(&vec![0; MAX_DESCRIPTOR + 1], 0),
            Err(DescriptorError::Wire(WireError::TooLarge { .. }))
        ));
        assert!(SignedDescriptor::verify(&[0xa0], 0).is_err());
    }
}
