//! What a node advertises: the service data under [`crate::SERVICE_UUID`].
//!
//! Ten bytes, so that the flags, the 128-bit service UUID and this data fit
//! in one legacy (31-byte) advertisement:
//!
//! ```text
//! 0      version (1)
//! 1      flags: bit 0 = an L2CAP channel is open on the PSM below
//! 2..4   L2CAP PSM, big-endian (0 when none)
//! 4..10  peer hint: the first 6 bytes of SHA-256(peer id bytes)
//! ```
//!
//! The hint is not the peer id (38 bytes would not fit): it lets a node
//! skip neighbours it is already connected to, and decide which side of a
//! pair dials. Noise authenticates the real peer id once connected.

use libp2p_identity::PeerId;
use sha2::{Digest, Sha256};

/// The advertisement format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Size of the service data.
pub const LEN: usize = 10;

/// A node's advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advert {
    /// The L2CAP PSM on which the node accepts data-path channels, if any;
    /// without one, dialers use GATT writes.
    pub psm: Option<u16>,
    /// A hint of the node's peer id ([`peer_hint`]).
    pub peer_hint: [u8; 6],
}

/// Service data that is not a fogmesh advertisement we understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvertError {
    /// Shorter than [`LEN`].
    #[error("advertisement too short ({0} bytes, need {LEN})")]
    TooShort(usize),
    /// A version this code does not know.
    #[error("unsupported advertisement version {0}")]
    Version(u8),
}

/// The hint of a peer id carried in advertisements.
pub fn peer_hint(peer: &PeerId) -> [u8; 6] {
    let h = Sha256::digest(peer.to_bytes());
    let mut out = [0u8; 6];
    out.copy_from_slice(&h[..6]);
    out
}

impl Advert {
    /// The service data bytes.
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0] = VERSION;
        b[1] = u8::from(self.psm.is_some());
        b[2..4].copy_from_slice(&self.psm.unwrap_or(0).to_be_bytes());
        b[4..10].copy_from_slice(&self.peer_hint);
        b
    }

    /// Parses service data. Longer data is accepted (later versions may
    /// append fields); anything else is an error, never a panic.
    pub fn decode(b: &[u8]) -> Result<Self, AdvertError> {
        if b.len() < LEN {
            return Err(AdvertError::TooShort(b.len()));
        }
        if b[0] != VERSION {
            return Err(AdvertError::Version(b[0]));
        }
        let psm = u16::from_be_bytes([b[2], b[3]]);
        let mut peer_hint = [0u8; 6];
        peer_hint.copy_from_slice(&b[4..10]);
        Ok(Advert {
            psm: (b[1] & 1 == 1).then_some(psm),
            peer_hint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let a = Advert {
            psm: Some(0x0081),
            peer_hint: peer_hint(&PeerId::random()),
        };
        assert_eq!(Advert::decode(&a.encode()), Ok(a));
        let b = Advert { psm: None, ..a };
        assert_eq!(Advert::decode(&b.encode()), Ok(b));
        assert_eq!(Advert::decode(&[1, 2]), Err(AdvertError::TooShort(2)));
        let mut v = a.encode();
        v[0] = 9;
        assert_eq!(Advert::decode(&v), Err(AdvertError::Version(9)));
        for n in 0..64u8 {
            let junk: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(n)).collect();
            let _ = Advert::decode(&junk);
        }
    }
}
