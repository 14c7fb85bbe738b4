//! Encrypted group chat: the sans-IO core.
//!
//! Nothing here touches the network, the clock or the disk. The node feeds
//! received ops and envelopes in (with `now` and a random number generator
//! where they are needed) and publishes what comes back; the simulator drives
//! the same state machines. The wire format is specified in
//! docs/protocols/groups.md at the top of the workspace.
//!
//! # Design
//!
//! - **Identities.** Members are Ed25519 [`PeerId`]s. An Ed25519 peer id
//!   embeds its public key (identity multihash), so ops and messages are
//!   verified from the author's peer id alone, and an admin can add a member
//!   knowing only its peer id: the member's X25519 key for receiving group
//!   keys is the Montgomery form of its Ed25519 key ([`crypto`]).
//! - **Membership** ([`membership`]) is a hash-chained log of ops signed by
//!   the admin (a `Leave` is signed by the leaver). The group id is the
//!   SHA-256 of the encoded genesis op. Forks are refused: the first op seen
//!   at an index wins. There is a single admin, so there is no need for an
//!   ordering service or for merging concurrent commits (the reason MLS is
//!   not used yet).
//! - **Keys.** One random 32-byte key per epoch. The genesis op opens epoch
//!   0; `Remove` and `Rotate` (the admin's answer to a `Leave`) open the next
//!   epoch. Each op that opens an epoch carries the new key sealed with HPKE
//!   (RFC 9180, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305)
//!   to every remaining member; `Add` seals the current key to the new member
//!   only. A removed member never receives a later key, and a new member
//!   cannot read epochs before it joined.
//! - **Messages** are encrypted once with a per-message key derived from the
//!   epoch key, the sender and its sequence number, and signed by the sender
//!   (the epoch key is shared, so only the signature proves who wrote it).
//! - **Causal order** ([`causal`]): each message names up to
//!   [`MAX_DEPS`](causal::MAX_DEPS) causal heads by hash (always the sender's
//!   previous message), like Matrix's event DAG; per-sender sequence numbers
//!   give Secure Scuttlebutt style version vectors for catch-up ([`sync`]).
//! - **On the wire** ([`wire`], [`gossip`]): versioned CBOR frames with size
//!   limits; a group's gossip topic carries tagged frames.
//! - **Catch-up decisions** ([`exchange`]): what a sync responder answers
//!   within a byte budget, what a requester asks next, and whom a member
//!   checks with; the node lends the responder a lookup for stored
//!   envelopes and carries requests and responses.
//! - **Randomness is injected** (`rng` arguments, `rand_core` 0.10, the
//!   version libp2p-identity 0.3 uses) rather than read from the OS, so a
//!   simulation with a seeded generator is reproducible. The node passes
//!   `rand::rng()` (rand 0.10) or any other [`rand_core::CryptoRng`].
//!
//! Design choices that differ from the first design are explained in
//! docs/design-notes.md.

pub mod causal;
pub mod crypto;
pub mod exchange;
pub mod gossip;
pub mod group;
pub mod membership;
pub mod sync;
pub mod wire;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use causal::{CausalBuffer, CausalError, CausalOrder, MessageId};
pub use crypto::{CryptoError, EpochKey, GroupKeys, SealedKey};
pub use exchange::{Answer, Plan, next_request, pick_sync_peer, plan, respond};
pub use gossip::{
    GossipError, GossipFrame, decode_gossip, encode_gossip_message, encode_gossip_op,
};
pub use group::{Delivered, Group, GroupError, OpReceived};
pub use libp2p_identity::{Keypair, PeerId};
pub use membership::{Applied, MembershipError, MembershipLog, Op, OpBody, OpKind};
pub use rand_core;
pub use sync::{Summary, SyncRequest, SyncResponse, Want, diff};
pub use wire::{EnvelopeBody, MAX_TEXT, SignedEnvelope, WireError};

/// A group's identity: the SHA-256 of its encoded, signed genesis op.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupId(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl GroupId {
    /// Lower-case hex, as used in logs and the node's API.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GroupId({})", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The gossipsub topic of a group: `fogmesh/g/1/<hex>`.
///
/// The hex is SHA-256("fogmesh-topic" || group id), so the topic neither
/// reveals the group's name nor, by itself, its id.
pub fn topic(id: &GroupId) -> String {
    let mut h = Sha256::new();
    h.update(b"fogmesh-topic");
    h.update(id.0);
    format!("fogmesh/g/1/{}", hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_is_stable_and_hides_the_id() {
        let id = GroupId([7; 32]);
        let t = topic(&id);
        assert!(t.starts_with("fogmesh/g/1/"));
        assert_eq!(t.len(), "fogmesh/g/1/".len() + 64);
        assert!(!t.contains(&id.to_hex()));
        assert_eq!(t, topic(&GroupId([7; 32])));
        assert_ne!(t, topic(&GroupId([8; 32])));
    }
}
