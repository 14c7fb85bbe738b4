//! What an envelope's body holds: a [`Payload`] (a [`Letter`] or a
//! [`Receipt`]) signed by its author and sealed to its recipient.
//!
//! Sealing, outermost first:
//! - body = `enc (32 bytes) || HPKE ciphertext`, HPKE base mode with
//!   DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305 (the suite
//!   groups use to seal epoch keys), to the X25519 form of the recipient's
//!   Ed25519 key, `info` = [`SEAL_INFO`], `aad` = the recipient's peer id;
//! - the plaintext is padded: a 4-byte big-endian length, the signed
//!   payload, zeros up to the smallest of [`PAD_SIZES`] that fits, so a
//!   relay learns one of five sizes, not the text's length;
//! - the signed payload is CBOR `{from, to, p, s}`: `p` the CBOR of the
//!   [`Payload`], `s` the author's Ed25519 signature over
//!   [`SIGN_DOMAIN`] || to || p (strict verification, key from the
//!   author's peer id).
//!
//! A fresh HPKE encapsulation per seal makes every attempt a different
//! body; the letter's [`MessageId`] stays the same.

use libp2p_identity::{Keypair, PeerId};
use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};

use super::{MAX_TEXT, MessageId};
use crate::frame::cbor;
use crate::groups::crypto::{self, CryptoError, MemberSecret};

/// HPKE `info` of direct-message bodies.
pub const SEAL_INFO: &[u8] = b"fogmesh-dm/1 body";
/// Domain tag of payload signatures.
pub const SIGN_DOMAIN: &[u8] = b"fogmesh-dm/1 payload\0";
/// The padded plaintext sizes.
pub const PAD_SIZES: [usize; 5] = [512, 2048, 8192, 32 * 1024, 68 * 1024];
/// HPKE's additions: the encapsulated key and the AEAD tag.
pub const SEAL_OVERHEAD: usize = 32 + 16;
/// Largest sealed body.
pub const MAX_BODY: usize = PAD_SIZES[PAD_SIZES.len() - 1] + SEAL_OVERHEAD;
/// Most message ids one receipt acknowledges.
pub const MAX_RECEIPT_IDS: usize = 64;

/// One direct message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Letter {
    /// The message's id (the same on every attempt).
    #[serde(rename = "i")]
    pub id: MessageId,
    /// The sender's sequence number towards this recipient, from 1.
    #[serde(rename = "q")]
    pub seq: u64,
    /// Every sequence number below this one is delivered or given up by
    /// the sender: the recipient need not wait for them.
    #[serde(rename = "f")]
    pub floor: u64,
    /// Which attempt this copy is (echoed by the receipt, so the sender
    /// knows which route delivered).
    #[serde(rename = "a")]
    pub attempt: u32,
    /// When the user sent it, milliseconds since the Unix epoch (the
    /// sender's clock).
    #[serde(rename = "w")]
    pub sent_at_ms: u64,
    /// The text.
    #[serde(rename = "x")]
    pub text: String,
}

/// The recipient's proof that it holds messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The messages and the attempt of each that arrived first.
    #[serde(rename = "r")]
    pub ids: Vec<(MessageId, u32)>,
}

/// What a body carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// A message.
    Letter(Letter),
    /// An acknowledgement of messages.
    Receipt(Receipt),
}

#[derive(Serialize, Deserialize)]
struct Signed {
    #[serde(rename = "f")]
    from: PeerId,
    #[serde(rename = "t")]
    to: PeerId,
    #[serde(rename = "p", with = "serde_bytes")]
    payload: Vec<u8>,
    #[serde(rename = "s", with = "serde_bytes")]
    sig: Vec<u8>,
}

/// A body opened and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The author (its signature verified).
    pub from: PeerId,
    /// What it sent.
    pub payload: Payload,
}

/// Why a body could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The text is over [`MAX_TEXT`] bytes.
    #[error("message of {0} bytes exceeds the limit of {MAX_TEXT}")]
    TooLong(usize),
    /// A receipt lists more than [`MAX_RECEIPT_IDS`] messages.
    #[error("a receipt lists at most {MAX_RECEIPT_IDS} messages")]
    ReceiptTooLong,
    /// Keys, signature or HPKE.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The body is not a sealed payload for this node.
    #[error("malformed body: {0}")]
    Malformed(&'static str),
    /// The payload was sealed for another node.
    #[error("sealed for {0}, not for this node")]
    NotForUs(PeerId),
}

fn check(payload: &Payload) -> Result<(), SealError> {
    match payload {
        Payload::Letter(l) if l.text.len() > MAX_TEXT => Err(SealError::TooLong(l.text.len())),
        Payload::Receipt(r) if r.ids.len() > MAX_RECEIPT_IDS => Err(SealError::ReceiptTooLong),
        _ => Ok(()),
    }
}

/// Signs `payload` with `keypair` and seals it to `to`.
pub fn seal(
    rng: &mut impl CryptoRng,
    keypair: &Keypair,
    to: &PeerId,
    payload: &Payload,
) -> Result<Vec<u8>, SealError> {
    check(payload)?;
    let p = cbor(payload);
    let to_bytes = to.to_bytes();
    let mut signed_bytes = to_bytes.clone();
    signed_bytes.extend_from_slice(&p);
    let sig = crypto::sign(keypair, SIGN_DOMAIN, &signed_bytes)?;
    let inner = cbor(&Signed {
        from: keypair.public().to_peer_id(),
        to: *to,
        payload: p,
        sig,
    });
    let padded = pad(&inner).ok_or(SealError::TooLong(inner.len()))?;
    let (enc, ct) = crypto::seal_to_peer(rng, to, SEAL_INFO, &to_bytes, &padded)?;
    let mut body = Vec::with_capacity(enc.len() + ct.len());
    body.extend_from_slice(&enc);
    body.extend_from_slice(&ct);
    Ok(body)
}

/// Opens a body sealed to `me` (whose secret is `secret`) and checks its
/// author's signature.
pub fn open(secret: &MemberSecret, me: &PeerId, body: &[u8]) -> Result<Opened, SealError> {
    if body.len() > MAX_BODY || body.len() < SEAL_OVERHEAD {
        return Err(SealError::Malformed("body size"));
    }
    let (enc, ct) = body.split_at(32);
    let enc: [u8; 32] = enc
        .try_into()
        .map_err(|_| SealError::Malformed("body size"))?;
    let padded = crypto::open_from_peer(secret, SEAL_INFO, &me.to_bytes(), &enc, ct)?;
    open_padded(me, &padded)
}

/// The part of [`open`] after decryption: the padding, the signed payload,
/// its recipient and signature, the payload and its limits. (Separate so
/// that it can be fuzzed without a key agreement per input.)
pub(crate) fn open_padded(me: &PeerId, padded: &[u8]) -> Result<Opened, SealError> {
    if padded.len() > MAX_BODY {
        return Err(SealError::Malformed("body size"));
    }
    let inner = unpad(padded).ok_or(SealError::Malformed("padding"))?;
    let signed: Signed =
        ciborium::from_reader(inner).map_err(|_| SealError::Malformed("signed payload"))?;
    if signed.to != *me {
        return Err(SealError::NotForUs(signed.to));
    }
    let mut signed_bytes = signed.to.to_bytes();
    signed_bytes.extend_from_slice(&signed.payload);
    crypto::verify(&signed.from, SIGN_DOMAIN, &signed_bytes, &signed.sig)?;
    let payload: Payload = ciborium::from_reader(signed.payload.as_slice())
        .map_err(|_| SealError::Malformed("payload"))?;
    check(&payload)?;
    Ok(Opened {
        from: signed.from,
        payload,
    })
}

/// Length prefix, data, zeros up to the next of [`PAD_SIZES`]; `None` if
/// it fits none.
fn pad(data: &[u8]) -> Option<Vec<u8>> {
    let need = data.len() + 4;
    let size = PAD_SIZES.iter().copied().find(|s| *s >= need)?;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&u32::try_from(data.len()).ok()?.to_be_bytes());
    out.extend_from_slice(data);
    out.resize(size, 0);
    Some(out)
}

fn unpad(padded: &[u8]) -> Option<&[u8]> {
    let (len, rest) = padded.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    rest.get(..len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(text: &str) -> Payload {
        Payload::Letter(Letter {
            id: MessageId([7; 16]),
            seq: 1,
            floor: 1,
            attempt: 0,
            sent_at_ms: 1_700_000_000_000,
            text: text.to_owned(),
        })
    }

    fn parties() -> (Keypair, Keypair) {
        (Keypair::generate_ed25519(), Keypair::generate_ed25519())
    }

    #[test]
    fn a_sealed_letter_opens_for_its_recipient_only() {
        let (alice, bob) = parties();
        let carol = Keypair::generate_ed25519();
        let bob_id = bob.public().to_peer_id();
        let body = seal(&mut rand::rng(), &alice, &bob_id, &letter("hi bob")).expect("seals");
        let opened = open(
            &MemberSecret::from_keypair(&bob).expect("ed25519"),
            &bob_id,
            &body,
        )
        .expect("opens");
        assert_eq!(opened.from, alice.public().to_peer_id());
        assert_eq!(opened.payload, letter("hi bob"));
        // Carol cannot open it, even claiming to be Bob.
        let carol_secret = MemberSecret::from_keypair(&carol).expect("ed25519");
        assert!(open(&carol_secret, &bob_id, &body).is_err());
        assert!(open(&carol_secret, &carol.public().to_peer_id(), &body).is_err());
    }

    #[test]
    fn sizes_are_padded_to_buckets_and_the_text_is_hidden() {
        let (alice, bob) = parties();
        let bob_id = bob.public().to_peer_id();
        let short = seal(&mut rand::rng(), &alice, &bob_id, &letter("a")).expect("seals");
        let longer =
            seal(&mut rand::rng(), &alice, &bob_id, &letter(&"b".repeat(200))).expect("seals");
        assert_eq!(short.len(), PAD_SIZES[0] + SEAL_OVERHEAD);
        assert_eq!(longer.len(), short.len());
        let max = seal(
            &mut rand::rng(),
            &alice,
            &bob_id,
            &letter(&"c".repeat(MAX_TEXT)),
        )
        .expect("the largest text fits");
        assert_eq!(max.len(), MAX_BODY);
        assert!(!short.windows(1).all(|w| w[0] == 0));
        assert!(matches!(
            seal(
                &mut rand::rng(),
                &alice,
                &bob_id,
                &letter(&"c".repeat(MAX_TEXT + 1))
            ),
            Err(SealError::TooLong(_))
        ));
    }

    #[test]
    fn tampered_bodies_are_refused() {
        let (alice, bob) = parties();
        let bob_id = bob.public().to_peer_id();
        let secret = MemberSecret::from_keypair(&bob).expect("ed25519");
        let mut body = seal(&mut rand::rng(), &alice, &bob_id, &letter("x")).expect("seals");
        let last = body.len() - 1;
        body[last] ^= 1;
        assert!(open(&secret, &bob_id, &body).is_err());
        assert!(open(&secret, &bob_id, &body[..10]).is_err());
        assert!(open(&secret, &bob_id, &[]).is_err());
    }

    #[test]
    fn each_seal_is_a_different_body() {
        let (alice, bob) = parties();
        let bob_id = bob.public().to_peer_id();
        let a = seal(&mut rand::rng(), &alice, &bob_id, &letter("x")).expect("seals");
        let b = seal(&mut rand::rng(), &alice, &bob_id, &letter("x")).expect("seals");
        assert_ne!(a, b);
    }
}
