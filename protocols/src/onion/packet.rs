//! Packets: building them (forward, SURB replies, cover), processing one
//! at a relay, and the final hop's [`Piece`].
//!
//! Every packet is exactly [`PACKET_SIZE`] bytes: the Sphinx header (348
//! bytes: the group element, the routing information for up to 5 layers,
//! its MAC) and a 2065-byte payload that carries 2048 bytes of plaintext
//! under one Lioness layer per hop. A relay, for each of its keys (the
//! current epoch's, then the previous one's during its grace): derives the
//! shared secret, checks the header MAC (a tampered header fails for every
//! key: dropped), then checks the replay tag in that epoch's
//! [`ReplayFilter`] (seen: dropped), then peels one layer. A tampered
//! payload is not detectable before the end: the wide-block cipher garbles
//! it, and the recipient's padding check refuses it.

use std::collections::HashMap;

use libp2p_identity::PeerId;
use rand_core::Rng;
use serde::{Deserialize, Serialize};
use sphinx_packet::header::delays::Delay;
use sphinx_packet::payload::Payload;
use sphinx_packet::route::{Destination, DestinationAddressBytes, Node, NodeAddressBytes};
use sphinx_packet::surb::{SURB, SURBMaterial, SurbReplyRecovery};
use sphinx_packet::version::SINGLE_SEED_SURB_VERSION;
use sphinx_packet::{ProcessedPacketData, SphinxPacket, SphinxPacketBuilder};
use x25519_dalek::PublicKey;

use super::fragment::{CHUNK, MAX_FRAGMENTS};
use super::keys::MixKeys;
use super::replay::ReplayFilter;
use super::{MAX_DELAY_MS, PACKET_SIZE, PAYLOAD_SIZE, PLAINTEXT_SIZE, address_of, peer_of};
use crate::frame::{WireError, decode, encode};

/// Version of the piece frame.
pub const VERSION: u64 = 1;
/// Largest encoded SURB: a header, the first hop, one payload key seed.
pub const MAX_SURB: usize = sphinx_packet::header::HEADER_SIZE + 32 + 16;
/// Largest body of a reply (the receipt's envelope).
pub const MAX_REPLY: usize = 1800;

/// What the final hop finds in a packet (the plaintext, CBOR in the
/// versioned frame, at most [`PLAINTEXT_SIZE`] bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Piece {
    /// One fragment of a message; the first carries the reply block.
    #[serde(rename = "f")]
    Fragment {
        /// The message's fragment id (random per attempt).
        #[serde(rename = "m", with = "serde_bytes")]
        id: [u8; 16],
        /// Index of this fragment.
        #[serde(rename = "i")]
        index: u16,
        /// Fragments of the message.
        #[serde(rename = "n")]
        count: u16,
        /// The chunk.
        #[serde(rename = "d", with = "serde_bytes")]
        chunk: Vec<u8>,
        /// A single-use reply block for the acknowledgement.
        #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
        surb: Option<serde_bytes::ByteBuf>,
        /// Whose reply block it is (the letter inside names its author
        /// anyway): the recipient answers that peer's receipt through it.
        #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<PeerId>,
    },
    /// The answer through a reply block: the recipient's receipt envelope.
    #[serde(rename = "r")]
    Reply {
        /// The encoded envelope.
        #[serde(rename = "d", with = "serde_bytes")]
        body: Vec<u8>,
    },
    /// Loop cover traffic: the sender is also the recipient.
    #[serde(rename = "c")]
    Cover {
        /// A nonce the sender recognises.
        #[serde(rename = "k", with = "serde_bytes")]
        nonce: [u8; 16],
    },
}

impl Piece {
    /// The frame.
    pub fn encode(&self) -> Vec<u8> {
        encode(VERSION, self)
    }

    /// Decodes a frame of at most [`PLAINTEXT_SIZE`] bytes and checks its
    /// limits.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let p: Piece = decode(bytes, PLAINTEXT_SIZE, VERSION)?;
        let ok = match &p {
            Piece::Fragment {
                index,
                count,
                chunk,
                surb,
                ..
            } => {
                index < count
                    && usize::from(*count) <= MAX_FRAGMENTS
                    && chunk.len() <= CHUNK
                    && surb.as_ref().is_none_or(|s| s.len() <= MAX_SURB)
            }
            Piece::Reply { body } => body.len() <= MAX_REPLY,
            Piece::Cover { .. } => true,
        };
        if !ok {
            return Err(WireError::Malformed("piece out of limits".into()));
        }
        Ok(p)
    }
}

/// Why a packet could not be built or was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PacketError {
    /// Not [`PACKET_SIZE`] bytes.
    #[error("packet of {0} bytes, expected {PACKET_SIZE}")]
    Size(usize),
    /// The header MAC fails under every key this node holds.
    #[error("tampered packet (header MAC)")]
    Tampered,
    /// The replay tag was seen in this epoch.
    #[error("replayed packet")]
    Replay,
    /// A node on the path is not an Ed25519 peer, or a hop address is not one.
    #[error("bad node address")]
    BadAddress,
    /// Sphinx refused the route, the payload or the packet.
    #[error("sphinx: {0}")]
    Sphinx(String),
    /// The plaintext did not decode.
    #[error("payload: {0}")]
    Payload(String),
}

fn sphinx(e: sphinx_packet::Error) -> PacketError {
    PacketError::Sphinx(e.to_string())
}

/// One node of a path: its peer id and its current mix key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// The node.
    pub peer: PeerId,
    /// Its X25519 mix key (from its verified descriptor).
    pub key: [u8; 32],
}

impl Hop {
    fn node(&self) -> Result<Node, PacketError> {
        let a = address_of(&self.peer).ok_or(PacketError::BadAddress)?;
        Ok(Node::new(
            NodeAddressBytes::from_bytes(a),
            PublicKey::from(self.key),
        ))
    }
}

fn delays(ms: &[u64]) -> Vec<Delay> {
    ms.iter()
        .map(|d| Delay::new_from_millis((*d).min(MAX_DELAY_MS)))
        .collect()
}

fn nodes(route: &[Hop]) -> Result<(Vec<Node>, DestinationAddressBytes), PacketError> {
    let nodes = route.iter().map(Hop::node).collect::<Result<Vec<_>, _>>()?;
    let last = route
        .last()
        .ok_or(PacketError::Sphinx("empty route".into()))?;
    let dest = address_of(&last.peer).ok_or(PacketError::BadAddress)?;
    Ok((nodes, DestinationAddressBytes::from_bytes(dest)))
}

/// Builds a packet carrying `piece` along `route` (mix hops, then the
/// recipient), with one delay per node (the last one's is ignored);
/// returns its bytes, to be sent to `route[0]`.
pub fn build(piece: &Piece, route: &[Hop], delays_ms: &[u64]) -> Result<Vec<u8>, PacketError> {
    let (nodes, dest) = nodes(route)?;
    // Identifier zero marks a forward packet; replies carry their SURB's.
    let destination = Destination::new(dest, [0; 16]);
    let packet = SphinxPacketBuilder::new()
        .with_payload_size(PAYLOAD_SIZE)
        .build_packet(piece.encode(), &nodes, &destination, &delays(delays_ms))
        .map_err(sphinx)?;
    Ok(packet.to_bytes())
}

/// A reply block made by the sender: the SURB to hand out, the identifier
/// its reply will carry, and what only the sender keeps to read it.
#[derive(Debug)]
pub struct ReplyBlock {
    /// The SURB's bytes (at most [`MAX_SURB`]).
    pub surb: Vec<u8>,
    /// The identifier the reply arrives with.
    pub id: [u8; 16],
    /// The recovery material.
    pub recovery: SurbReplyRecovery,
}

/// Makes a single-use reply block along `route` (mix hops, then this
/// node).
pub fn make_surb(
    route: &[Hop],
    delays_ms: &[u64],
    rng: &mut impl Rng,
) -> Result<ReplyBlock, PacketError> {
    let (nodes, dest) = nodes(route)?;
    let mut id = [0u8; 16];
    while id == [0; 16] {
        rng.fill_bytes(&mut id);
    }
    let material = SURBMaterial::new(
        nodes,
        delays(delays_ms),
        Destination::new(dest, id),
        SINGLE_SEED_SURB_VERSION,
    );
    let (surb, recovery) = material.construct_recoverable_SURB().map_err(sphinx)?;
    Ok(ReplyBlock {
        surb: surb.to_bytes(),
        id,
        recovery,
    })
}

/// Uses a reply block: the packet carrying `piece` and the peer to send it
/// to.
pub fn use_surb(surb: &[u8], piece: &Piece) -> Result<(PeerId, Vec<u8>), PacketError> {
    if surb.len() > MAX_SURB {
        return Err(PacketError::Sphinx("SURB too large".into()));
    }
    let surb = SURB::from_bytes(surb).map_err(sphinx)?;
    let (packet, first) = surb
        .use_surb(&piece.encode(), PAYLOAD_SIZE)
        .map_err(sphinx)?;
    let peer = peer_of(first.as_bytes()).ok_or(PacketError::BadAddress)?;
    Ok((peer, packet.to_bytes()))
}

/// Reads a reply that arrived with this node's SURB identifier.
pub fn open_reply(recovery: &SurbReplyRecovery, payload: &[u8]) -> Result<Piece, PacketError> {
    let payload = Payload::from_bytes(payload).map_err(sphinx)?;
    let plain = recovery.recover_plaintext(payload).map_err(sphinx)?;
    Piece::decode(&plain).map_err(|e| PacketError::Payload(e.to_string()))
}

/// What a node does with a packet it processed.
#[derive(Debug)]
pub enum Processed {
    /// Send `packet` to `next` after `delay_ms`.
    Forward {
        /// The successor.
        next: PeerId,
        /// The delay the sender chose for this hop (capped).
        delay_ms: u64,
        /// The re-blinded packet.
        packet: Vec<u8>,
    },
    /// This node is the final hop: a forward packet's piece.
    Deliver(Piece),
    /// This node is the final hop of one of its own SURBs: the reply's
    /// identifier and its still sealed payload (see [`open_reply`]).
    Reply {
        /// The SURB's identifier.
        id: [u8; 16],
        /// The payload as it arrived.
        payload: Vec<u8>,
    },
}

/// A node's Sphinx state: its mix keys and one replay filter per key.
#[derive(Debug)]
pub struct Mixer {
    keys: MixKeys,
    filters: HashMap<u64, ReplayFilter>,
}

impl Mixer {
    /// A mixer over `keys`.
    pub fn new(keys: MixKeys) -> Self {
        Mixer {
            keys,
            filters: HashMap::new(),
        }
    }

    /// The keys (the current one goes into the descriptor).
    pub fn keys(&self) -> &MixKeys {
        &self.keys
    }

    /// Rotates the keys (see [`MixKeys::rotate`]) and drops the filters of
    /// deleted keys. True when the current key changed.
    pub fn rotate(&mut self, now_ms: u64) -> bool {
        let changed = self.keys.rotate(now_ms);
        let live: Vec<u64> = self.keys.secrets().map(|k| k.epoch).collect();
        self.filters.retain(|e, _| live.contains(e));
        changed
    }

    /// Processes one packet: tampered and replayed packets are refused.
    pub fn process(&mut self, bytes: &[u8]) -> Result<Processed, PacketError> {
        if bytes.len() != PACKET_SIZE {
            return Err(PacketError::Size(bytes.len()));
        }
        let packet = SphinxPacket::from_bytes(bytes).map_err(sphinx)?;
        let mut found = None;
        for k in self.keys.secrets() {
            let secret = packet.header.compute_expanded_shared_secret(&k.secret);
            if packet.header.ensure_header_integrity(&secret).is_ok() {
                found = Some((k.epoch, secret));
                break;
            }
        }
        let Some((epoch, secret)) = found else {
            return Err(PacketError::Tampered);
        };
        if !self
            .filters
            .entry(epoch)
            .or_default()
            .insert(secret.replay_tag())
        {
            return Err(PacketError::Replay);
        }
        let processed = packet
            .process_with_expanded_secret(&secret)
            .map_err(sphinx)?;
        match processed.data {
            ProcessedPacketData::ForwardHop {
                next_hop_packet,
                next_hop_address,
                delay,
            } => {
                let next = peer_of(next_hop_address.as_bytes()).ok_or(PacketError::BadAddress)?;
                let delay_ms =
                    u64::try_from(delay.to_duration().as_millis()).unwrap_or(MAX_DELAY_MS);
                Ok(Processed::Forward {
                    next,
                    delay_ms: delay_ms.min(MAX_DELAY_MS),
                    packet: next_hop_packet.to_bytes(),
                })
            }
            ProcessedPacketData::FinalHop {
                identifier,
                payload,
                ..
            } => {
                if identifier != [0; 16] {
                    return Ok(Processed::Reply {
                        id: identifier,
                        payload: payload.into_bytes(),
                    });
                }
                let plain = payload.recover_plaintext().map_err(sphinx)?;
                let piece =
                    Piece::decode(&plain).map_err(|e| PacketError::Payload(e.to_string()))?;
                Ok(Processed::Deliver(piece))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onion::keys::DEFAULT_EPOCH_MS;
    use x25519_dalek::StaticSecret;

    struct Node {
        peer: PeerId,
        mixer: Mixer,
    }

    fn node(seed: u8) -> Node {
        let k = libp2p_identity::Keypair::generate_ed25519();
        let keys = MixKeys::with_source(
            DEFAULT_EPOCH_MS,
            0,
            Box::new(move || StaticSecret::from([seed; 32])),
        );
        Node {
            peer: k.public().to_peer_id(),
            mixer: Mixer::new(keys),
        }
    }

    fn hop(n: &Node) -> Hop {
        Hop {
            peer: n.peer,
            key: n.mixer.keys().current().1,
        }
    }

    struct Seq(u64);
    impl rand_core::TryRng for Seq {
        type Error = std::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            Ok(self.try_next_u64()? as u32)
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            Ok(self.0)
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            for b in dst {
                *b = self.try_next_u64()? as u8;
            }
            Ok(())
        }
    }

    /// Runs `packet` from `nodes[first]` until a final hop; returns the
    /// final node's index, its result and the peers each hop sent to.
    fn run(
        nodes: &mut [Node],
        mut at: usize,
        mut packet: Vec<u8>,
    ) -> (usize, Processed, Vec<PeerId>) {
        let mut trail = Vec::new();
        loop {
            let out = nodes[at].mixer.process(&packet).expect("processes");
            match out {
                Processed::Forward {
                    next, packet: p, ..
                } => {
                    assert_eq!(p.len(), PACKET_SIZE, "the size never changes");
                    trail.push(next);
                    at = nodes
                        .iter()
                        .position(|n| n.peer == next)
                        .expect("on the path");
                    packet = p;
                }
                other => return (at, other, trail),
            }
        }
    }

    #[test]
    fn a_fragment_crosses_three_mixes_and_the_surb_brings_the_reply_back() {
        // 0: sender, 1..=3: mixes, 4: recipient, 5..=7: mixes of the way back.
        let mut nodes: Vec<Node> = (1..=8).map(node).collect();
        let mut rng = Seq(7);
        let back: Vec<Hop> = [5, 6, 7, 0].iter().map(|i| hop(&nodes[*i])).collect();
        let rb = make_surb(&back, &[1, 1, 1, 0], &mut rng).expect("surb");
        assert!(rb.surb.len() <= MAX_SURB);
        let piece = Piece::Fragment {
            id: [3; 16],
            index: 0,
            count: 1,
            chunk: vec![42; CHUNK],
            surb: Some(serde_bytes::ByteBuf::from(rb.surb.clone())),
            reply_to: Some(nodes[0].peer),
        };
        assert!(
            piece.encode().len() <= PLAINTEXT_SIZE,
            "{}",
            piece.encode().len()
        );
        let route: Vec<Hop> = [1, 2, 3, 4].iter().map(|i| hop(&nodes[*i])).collect();
        let packet = build(&piece, &route, &[5, 6, 7, 0]).expect("builds");
        assert_eq!(packet.len(), PACKET_SIZE);
        let (at, out, trail) = run(&mut nodes, 1, packet.clone());
        assert_eq!(at, 4);
        assert_eq!(trail, vec![nodes[2].peer, nodes[3].peer, nodes[4].peer]);
        let Processed::Deliver(got) = out else {
            panic!("delivered")
        };
        assert_eq!(got, piece);
        // The first relay refuses the same packet again.
        assert_eq!(
            nodes[1].mixer.process(&packet).err(),
            Some(PacketError::Replay)
        );

        // The recipient answers through the SURB.
        let Piece::Fragment { surb: Some(s), .. } = got else {
            panic!("surb")
        };
        let reply = Piece::Reply { body: vec![1; 600] };
        let (first, p) = use_surb(&s, &reply).expect("uses");
        assert_eq!(first, nodes[5].peer);
        let (at, out, _) = run(&mut nodes, 5, p);
        assert_eq!(at, 0);
        let Processed::Reply { id, payload } = out else {
            panic!("reply")
        };
        assert_eq!(id, rb.id);
        assert_eq!(open_reply(&rb.recovery, &payload).expect("opens"), reply);
    }

    #[test]
    fn tampered_and_misshapen_packets_are_refused_at_the_first_relay() {
        let mut nodes: Vec<Node> = (1..=4).map(node).collect();
        let route: Vec<Hop> = [1, 2, 3].iter().map(|i| hop(&nodes[*i])).collect();
        let piece = Piece::Cover { nonce: [1; 16] };
        let packet = build(&piece, &route, &[0, 0, 0]).expect("builds");
        for at in [40, 100, 340] {
            let mut bad = packet.clone();
            bad[at] ^= 1;
            assert_eq!(
                nodes[1].mixer.process(&bad).err(),
                Some(PacketError::Tampered)
            );
        }
        // A packet for another node's key is tampered to this one.
        assert_eq!(
            nodes[2].mixer.process(&packet).err(),
            Some(PacketError::Tampered)
        );
        assert_eq!(
            nodes[1].mixer.process(&packet[..100]).err(),
            Some(PacketError::Size(100))
        );
        // A tampered payload passes relays but not the recipient's check.
        let mut bad = packet.clone();
        bad[PACKET_SIZE - 10] ^= 1;
        let Ok(Processed::Forward { packet: p, .. }) = nodes[1].mixer.process(&bad) else {
            panic!("forwarded")
        };
        let Ok(Processed::Forward { packet: p, .. }) = nodes[2].mixer.process(&p) else {
            panic!("forwarded")
        };
        assert!(nodes[3].mixer.process(&p).is_err());
    }

    #[test]
    fn the_previous_key_works_during_its_grace_only() {
        let mut nodes: Vec<Node> = (1..=3).map(node).collect();
        let mut n = 0u8;
        nodes[1].mixer = Mixer::new(MixKeys::with_source(
            DEFAULT_EPOCH_MS,
            0,
            Box::new(move || {
                n += 1;
                StaticSecret::from([100 + n; 32])
            }),
        ));
        let route: Vec<Hop> = [1, 2].iter().map(|i| hop(&nodes[*i])).collect();
        let piece = Piece::Cover { nonce: [2; 16] };
        let p1 = build(&piece, &route, &[0, 0]).expect("builds");
        let p2 = build(&piece, &route, &[0, 0]).expect("builds");
        assert!(nodes[1].mixer.rotate(DEFAULT_EPOCH_MS));
        assert!(nodes[1].mixer.process(&p1).is_ok());
        nodes[1]
            .mixer
            .rotate(DEFAULT_EPOCH_MS + crate::onion::keys::GRACE_MS);
        assert_eq!(
            nodes[1].mixer.process(&p2).err(),
            Some(PacketError::Tampered)
        );
    }

    #[test]
    fn pieces_round_trip_and_limits_hold() {
        let f = Piece::Fragment {
            id: [1; 16],
            index: 1,
            count: 2,
            chunk: vec![0; 10],
            surb: None,
            reply_to: None,
        };
        assert_eq!(Piece::decode(&f.encode()).expect("decodes"), f);
        let bad = Piece::Fragment {
            id: [1; 16],
            index: 2,
            count: 2,
            chunk: vec![],
            surb: None,
            reply_to: None,
        };
        assert!(Piece::decode(&bad.encode()).is_err());
        let big = Piece::Reply {
            body: vec![0; MAX_REPLY + 1],
        };
        assert!(Piece::decode(&big.encode()).is_err());
    }
}
