//! Targets for the onion route's decoders of peer bytes: descriptors,
//! the final hop's pieces, SURBs, whole packets through a relay, and the
//! frames of a mix stream.

use std::sync::OnceLock;

use x25519_dalek::StaticSecret;

use crate::onion::descriptor::{Descriptor, MAX_DESCRIPTOR, Role, SignedDescriptor};
use crate::onion::keys::{DEFAULT_EPOCH_MS, MixKeys};
use crate::onion::packet::{self, Hop, MAX_SURB, Mixer, PacketError, Piece, Processed};
use crate::onion::{PACKET_SIZE, PLAINTEXT_SIZE};

use super::FuzzRng;
use super::fixtures::{keypair, peer};

/// The relay of the packet target: key 20, mix secret `[20; 32]`.
fn relay() -> Mixer {
    Mixer::new(MixKeys::with_source(
        DEFAULT_EPOCH_MS,
        0,
        Box::new(|| StaticSecret::from([20; 32])),
    ))
}

fn hop(n: u8) -> Hop {
    Hop {
        peer: peer(n),
        key: x25519_dalek::PublicKey::from(&StaticSecret::from([n; 32])).to_bytes(),
    }
}

pub(super) fn onion_descriptor(data: &[u8]) {
    let claimed = SignedDescriptor::claimed_peer(data);
    let Ok(d) = SignedDescriptor::decode_unchecked_time(data) else {
        return;
    };
    // What verifies names the peer it claims.
    assert_eq!(claimed, Some(d.descriptor.peer));
    assert!(data.len() <= MAX_DESCRIPTOR);
    // What verifies keeps its bytes, and they verify again.
    assert_eq!(d.bytes, data);
    let again = SignedDescriptor::decode_unchecked_time(&d.bytes).ok();
    assert_eq!(again.as_ref(), Some(&d));
}

pub(super) fn onion_descriptor_seeds() -> Vec<Vec<u8>> {
    let k = keypair(21);
    [Role::Mix, Role::Endpoint]
        .into_iter()
        .filter_map(|role| {
            Descriptor {
                peer: peer(21),
                mix_key: [21; 32],
                epoch: 7,
                valid_from_ms: 1_000,
                valid_until_ms: 3_600_000,
                role,
            }
            .sign(&k)
            .ok()
        })
        .map(|s| s.bytes)
        .collect()
}

pub(super) fn onion_piece(data: &[u8]) {
    if let Some(p) = super::decoders::stable_pub(data, Piece::decode, Piece::encode, PLAINTEXT_SIZE)
        && let Piece::Fragment { index, count, .. } = p
    {
        assert!(index < count);
    }
}

pub(super) fn onion_piece_seeds() -> Vec<Vec<u8>> {
    vec![
        Piece::Fragment {
            id: [1; 16],
            index: 0,
            count: 2,
            chunk: vec![5; 100],
            surb: Some(serde_bytes::ByteBuf::from(vec![0; 64])),
            reply_to: Some(peer(5)),
        }
        .encode(),
        Piece::Reply { body: vec![3; 40] }.encode(),
        Piece::Cover { nonce: [9; 16] }.encode(),
    ]
}

pub(super) fn onion_surb(data: &[u8]) {
    let reply = Piece::Reply { body: vec![1; 8] };
    if let Ok((_, p)) = packet::use_surb(data, &reply) {
        assert!(data.len() <= MAX_SURB);
        assert_eq!(p.len(), PACKET_SIZE);
    }
}

pub(super) fn onion_surb_seeds() -> Vec<Vec<u8>> {
    let mut rng = FuzzRng::new(3);
    packet::make_surb(&[hop(20), hop(22)], &[0, 0], &mut rng)
        .map(|rb| vec![rb.surb])
        .unwrap_or_default()
}

pub(super) fn onion_packet(data: &[u8]) {
    let mut m = relay();
    let first = m.process(data);
    if let Ok(Processed::Forward { packet, .. }) = &first {
        assert_eq!(packet.len(), PACKET_SIZE, "packets keep their size");
    }
    // Whatever passed the MAC is a replay the second time; whatever did
    // not fails the same way again.
    let second = m.process(data);
    match first {
        Err(PacketError::Size(n)) => assert_eq!(second.err(), Some(PacketError::Size(n))),
        Err(PacketError::Tampered) => assert_eq!(second.err(), Some(PacketError::Tampered)),
        Err(PacketError::Sphinx(_)) if data.len() == PACKET_SIZE => {
            assert!(second.is_err())
        }
        _ => assert_eq!(second.err(), Some(PacketError::Replay)),
    }
}

pub(super) fn onion_packet_seeds() -> Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS
        .get_or_init(|| {
            let cover = Piece::Cover { nonce: [4; 16] };
            let frag = Piece::Fragment {
                id: [2; 16],
                index: 0,
                count: 1,
                chunk: vec![7; 300],
                surb: None,
                reply_to: None,
            };
            [
                packet::build(&cover, &[hop(20), hop(22)], &[3, 0]),
                packet::build(&frag, &[hop(20)], &[0]),
            ]
            .into_iter()
            .filter_map(Result::ok)
            .collect()
        })
        .clone()
}

/// A mix stream's bytes, read as a reader does: header, then body, frame
/// after frame. What passes re-encodes to the same bytes.
pub(super) fn onion_mix_frames(mut data: &[u8]) {
    use crate::onion::stream::{
        HEADER, Head, descriptors_frame, packet_frame, split_batch, want_frame,
    };
    while data.len() >= HEADER {
        let Ok(head) = Head::parse(data[..HEADER].try_into().expect("a header")) else {
            return;
        };
        let n = head.body_len();
        let Some(frame) = data.get(..HEADER + n) else {
            return;
        };
        let body = &frame[HEADER..];
        let again = match head {
            Head::Packet => packet_frame(body),
            Head::Want => want_frame(),
            Head::Descriptors(_) => {
                let Some(list) = split_batch(body) else {
                    return;
                };
                assert!(list.iter().all(|d| d.len() <= MAX_DESCRIPTOR));
                descriptors_frame(list.iter().map(Vec::as_slice))
            }
        };
        assert_eq!(again, frame);
        data = &data[HEADER + n..];
    }
}

pub(super) fn onion_mix_frames_seeds() -> Vec<Vec<u8>> {
    use crate::onion::stream::{descriptors_frame, packet_frame, want_frame};
    let d = onion_descriptor_seeds();
    let batch = descriptors_frame(d.iter().map(Vec::as_slice));
    let mut stream = want_frame();
    stream.extend_from_slice(&batch);
    stream.extend_from_slice(&packet_frame(&[7; PACKET_SIZE]));
    vec![want_frame(), batch, stream]
}
