//! The onion route: private delivery through Sphinx mix relays.
//!
//! A private message (its sealed [`crate::messages::Envelope`]) is cut into
//! fragments, each carried in one fixed-size Sphinx packet
//! ([`PACKET_SIZE`] bytes, the same for data, acknowledgements and cover)
//! along a path of mix nodes chosen uniformly at random by the sender, the
//! recipient being the final hop. Each relay learns only its predecessor
//! and its successor. The first fragment carries a single-use reply block
//! (SURB) through which the recipient returns its signed receipt without
//! learning the path back.
//!
//! The pieces, all sans-IO (no clock, no sockets: calls take `now`):
//! - [`descriptor`]: a mix node's signed descriptor (its X25519 mix key,
//!   separate from its identity key, the key's epoch, validity and role),
//!   its encoding, size limits and verification.
//! - [`keys`]: a node's per-epoch mix secrets (rotated, old ones deleted).
//! - [`path`]: path choice (uniform, no node twice, the recipient last) and
//!   the per-hop exponential delays.
//! - [`fragment`]: splitting a message into pieces and reassembling them
//!   (bounded memory, expiry).
//! - [`replay`]: the per-epoch filter of replay tags.
//! - [`packet`]: building packets and SURBs, processing one at a relay
//!   (replayed and tampered packets refused), the final-hop [`Piece`].
//! - [`links`]: which neighbours are connected, and which mix nodes are
//!   left out of new paths for a while (unreachable, or refusing streams).
//! - [`sharing`]: when a node asks a neighbour for the descriptors it
//!   knows, and when it answers.
//! - [`stream`]: the frames of a mix stream (packets, descriptor batches,
//!   requests), checked header first.
//!
//! See docs/protocols/onion.md for the formats, limits and what the route
//! does not protect against.

pub mod descriptor;
pub mod fragment;
pub mod keys;
pub mod links;
pub mod packet;
pub mod path;
pub mod replay;
pub mod sharing;
pub mod stream;

pub use descriptor::{Descriptor, DescriptorError, Role, SignedDescriptor};
pub use fragment::{Complete, Reassembler, ReplyTo};
pub use keys::MixKeys;
pub use packet::{Hop, Mixer, PacketError, Piece, Processed, ReplyBlock};
pub use path::{PathError, choose_path, sample_delays};
pub use replay::ReplayFilter;
pub use sharing::{RELAY_FANOUT, Sharing, relay_targets};

use libp2p_identity::PeerId;

/// Protocol name of the packet streams between neighbours (our own: the
/// Vac `/mix/1.0.0` protocol uses another packet format).
pub const PROTOCOL: &str = "/fogmesh/mix/1";
/// Gossipsub topic on which nodes announce their descriptors.
pub const DESCRIPTOR_TOPIC: &str = "fogmesh/mix-descriptors/1";

/// Bytes of plaintext one packet carries (Nym's standard packet).
pub const PLAINTEXT_SIZE: usize = 2048;
/// Bytes of the Sphinx payload: the plaintext and the payload's own
/// overhead (a zero block and a padding marker).
pub const PAYLOAD_SIZE: usize = PLAINTEXT_SIZE + sphinx_packet::payload::PAYLOAD_OVERHEAD_SIZE;
/// Bytes of every packet on the wire: the 348-byte Sphinx header and the
/// payload.
pub const PACKET_SIZE: usize = sphinx_packet::header::HEADER_SIZE + PAYLOAD_SIZE;

/// Mix hops of a path by default (the recipient comes after them).
pub const DEFAULT_HOPS: usize = 3;
/// Most mix hops: Sphinx headers hold 5 layers and the recipient takes one.
pub const MAX_HOPS: usize = sphinx_packet::constants::MAX_PATH_LENGTH - 1;
/// Least mix hops a node may be configured with.
pub const MIN_HOPS: usize = 1;
/// Mean per-hop delay by default, ms (Nym's default).
pub const DEFAULT_DELAY_MS: u64 = 50;
/// Longest delay a sender samples for one hop, and the longest a relay
/// holds a packet whatever its header says, ms.
pub const MAX_DELAY_MS: u64 = 10_000;

/// The 32-byte Sphinx address of a node: its Ed25519 public key, from
/// which its peer id is rebuilt. `None` for a peer id that is not an
/// Ed25519 key.
pub fn address_of(peer: &PeerId) -> Option<[u8; 32]> {
    crate::groups::crypto::ed25519_key(peer)
        .ok()
        .map(|k| k.to_bytes())
}

/// The peer id behind a Sphinx address; `None` when the bytes are not an
/// Ed25519 public key.
pub fn peer_of(address: &[u8; 32]) -> Option<PeerId> {
    let ed = libp2p_identity::ed25519::PublicKey::try_from_bytes(address).ok()?;
    Some(libp2p_identity::PublicKey::from(ed).to_peer_id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_to_peer_ids() {
        let k = libp2p_identity::Keypair::generate_ed25519();
        let peer = k.public().to_peer_id();
        let a = address_of(&peer).expect("ed25519");
        assert_eq!(peer_of(&a), Some(peer));
        assert_eq!(PACKET_SIZE, 2413);
    }
}
