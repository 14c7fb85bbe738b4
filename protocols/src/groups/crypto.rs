//! Keys, signatures and encryption for groups.
//!
//! - Signatures: Ed25519 through [`Keypair::sign`], verified with
//!   `verify_strict` against the key embedded in the author's [`PeerId`].
//!   Every signed byte string starts with a domain tag, so an op signature
//!   can never be replayed as a message signature.
//! - Sealing an epoch key to one member: HPKE base mode (RFC 9180) with
//!   DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and ChaCha20-Poly1305. The
//!   member's X25519 public key is the Montgomery form of its Ed25519 key;
//!   its X25519 secret is the first half of SHA-512(seed), the scalar Ed25519
//!   itself signs with (the standard conversion, as libsodium's
//!   `crypto_sign_ed25519_sk_to_curve25519`). Using one key for both is
//!   analysed as safe in "On using the same key pair for Ed25519 and an
//!   X25519 based KEM" (eprint 2021/509) and is what lets an admin add a
//!   member knowing only its peer id.
//! - Message content: ChaCha20-Poly1305 under a per-message key
//!   HKDF-SHA256(salt = group id, ikm = epoch key,
//!   info = "fogmesh msg" || sender || seq). The nonce is random (96 bits)
//!   and sent in front of the ciphertext: the key is already unique per
//!   (sender, seq), but a node restored from a backup may reuse a sequence
//!   number, and a random nonce keeps that mistake from reusing a
//!   (key, nonce) pair, which would leak both plaintexts' XOR and the
//!   Poly1305 key. Twelve bytes per message is a cheap insurance.

use std::collections::BTreeMap;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use ed25519_dalek::{Signature, VerifyingKey};
use hkdf::Hkdf;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};
use libp2p_identity::{Keypair, PeerId};
use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroize;

use super::GroupId;

type HpkeAead = hpke::aead::ChaCha20Poly1305;
type HpkeKdf = hpke::kdf::HkdfSha256;
type HpkeKem = X25519HkdfSha256;

/// Domain tag of op signatures.
pub(crate) const SIGN_OP: &[u8] = b"fogmesh-groups/v1 op\0";
/// Domain tag of message envelope signatures.
pub(crate) const SIGN_MSG: &[u8] = b"fogmesh-groups/v1 msg\0";
/// Length of a sealed epoch key's ciphertext: the key and a Poly1305 tag.
pub const SEALED_KEY_LEN: usize = 32 + 16;
/// Bytes a message ciphertext adds to its plaintext: nonce and tag.
pub const MESSAGE_OVERHEAD: usize = 12 + 16;

/// Errors of the cryptographic layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The peer id does not embed an Ed25519 public key (hashed or other key type).
    #[error("peer id {0} does not embed an Ed25519 key")]
    NotEd25519(PeerId),
    /// The local keypair is not Ed25519.
    #[error("the local keypair is not Ed25519")]
    KeypairNotEd25519,
    /// A signature did not verify against the claimed author.
    #[error("bad signature from {0}")]
    BadSignature(PeerId),
    /// Signing failed (only possible for key types we refuse anyway).
    #[error("signing failed")]
    Signing,
    /// Sealing a key with HPKE failed.
    #[error("sealing an epoch key failed: {0:?}")]
    Seal(hpke::HpkeError),
    /// A sealed key did not open: not for us, tampered with, or malformed.
    #[error("a sealed epoch key did not open")]
    Unseal,
    /// A message did not decrypt: tampered with or wrong key.
    #[error("message decryption failed")]
    Decrypt,
}

/// A 32-byte symmetric group key for one epoch; zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct EpochKey([u8; 32]);

impl EpochKey {
    /// A fresh random key.
    pub fn random(rng: &mut impl CryptoRng) -> Self {
        let mut k = [0u8; 32];
        rng.fill_bytes(&mut k);
        EpochKey(k)
    }

    /// The raw key, for persistence by the node.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Restores a key persisted with [`EpochKey::as_bytes`].
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        EpochKey(bytes)
    }
}

impl Drop for EpochKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EpochKey(..)")
    }
}

/// An epoch key sealed to one recipient with HPKE.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedKey {
    /// Who can open it.
    #[serde(rename = "r")]
    pub recipient: PeerId,
    /// HPKE encapsulated key (the sender's ephemeral X25519 public key).
    #[serde(rename = "e", with = "serde_bytes")]
    pub enc: [u8; 32],
    /// HPKE ciphertext of the 32-byte epoch key ([`SEALED_KEY_LEN`] bytes).
    #[serde(rename = "c", with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

/// A member's X25519 secret for opening sealed keys, derived from its Ed25519 key.
pub struct MemberSecret(<HpkeKem as Kem>::PrivateKey);

impl std::fmt::Debug for MemberSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemberSecret(..)")
    }
}

impl MemberSecret {
    /// Derives the X25519 secret of an Ed25519 keypair.
    pub fn from_keypair(keypair: &Keypair) -> Result<Self, CryptoError> {
        let ed = keypair
            .clone()
            .try_into_ed25519()
            .map_err(|_| CryptoError::KeypairNotEd25519)?;
        let mut seed: [u8; 32] = ed
            .secret()
            .as_ref()
            .try_into()
            .map_err(|_| CryptoError::KeypairNotEd25519)?;
        let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
        seed.zeroize();
        let mut scalar = signing.to_scalar_bytes();
        // HPKE's DeserializePrivateKey clamps, completing the standard conversion.
        let sk = <HpkeKem as Kem>::PrivateKey::from_bytes(&scalar)
            .map_err(|_| CryptoError::KeypairNotEd25519);
        scalar.zeroize();
        Ok(MemberSecret(sk?))
    }
}

/// The Ed25519 key embedded in a peer id.
///
/// Ed25519 peer ids are identity multihashes (code 0x00, length 36) of the
/// protobuf-encoded public key; hashed peer ids (RSA) carry no key and are
/// refused.
pub fn ed25519_key(peer: &PeerId) -> Result<VerifyingKey, CryptoError> {
    let bytes = peer.to_bytes();
    let err = || CryptoError::NotEd25519(*peer);
    // Identity code, then a one-byte varint length covering the rest.
    match bytes.as_slice() {
        [0x00, len, rest @ ..] if usize::from(*len) == rest.len() => {
            let pk = libp2p_identity::PublicKey::try_decode_protobuf(rest).map_err(|_| err())?;
            let ed = pk.try_into_ed25519().map_err(|_| err())?;
            VerifyingKey::from_bytes(&ed.to_bytes()).map_err(|_| err())
        }
        _ => Err(err()),
    }
}

/// Signs `domain || payload` with the local keypair.
pub(crate) fn sign(
    keypair: &Keypair,
    domain: &[u8],
    payload: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut msg = Vec::with_capacity(domain.len() + payload.len());
    msg.extend_from_slice(domain);
    msg.extend_from_slice(payload);
    keypair.sign(&msg).map_err(|_| CryptoError::Signing)
}

/// Verifies a signature by `author` over `domain || payload`.
pub(crate) fn verify(
    author: &PeerId,
    domain: &[u8],
    payload: &[u8],
    sig: &[u8],
) -> Result<(), CryptoError> {
    let key = ed25519_key(author)?;
    let sig = Signature::from_slice(sig).map_err(|_| CryptoError::BadSignature(*author))?;
    let mut msg = Vec::with_capacity(domain.len() + payload.len());
    msg.extend_from_slice(domain);
    msg.extend_from_slice(payload);
    // Strict: rejects small-order keys and non-canonical signatures, so a
    // message has exactly one valid encoding and thus one id.
    key.verify_strict(&msg, &sig)
        .map_err(|_| CryptoError::BadSignature(*author))
}

/// HPKE `info`: binds a sealed key to its group (by the genesis nonce) and epoch.
fn seal_info(group_nonce: &[u8; 32], epoch: u64) -> Vec<u8> {
    let mut info = b"fogmesh-groups/v1 epoch-key\0".to_vec();
    info.extend_from_slice(group_nonce);
    info.extend_from_slice(&epoch.to_be_bytes());
    info
}

/// Seals an epoch key to `recipient`, who opens it with its peer's secret.
pub fn seal_key(
    rng: &mut impl CryptoRng,
    group_nonce: &[u8; 32],
    epoch: u64,
    key: &EpochKey,
    recipient: &PeerId,
) -> Result<SealedKey, CryptoError> {
    let x_pub = ed25519_key(recipient)?.to_montgomery().to_bytes();
    let pk = <HpkeKem as Kem>::PublicKey::from_bytes(&x_pub).map_err(CryptoError::Seal)?;
    let aad = recipient.to_bytes();
    let (enc, ciphertext) = hpke::single_shot_seal_with_rng::<HpkeAead, HpkeKdf, HpkeKem>(
        &OpModeS::Base,
        &pk,
        &seal_info(group_nonce, epoch),
        &key.0,
        &aad,
        rng,
    )
    .map_err(CryptoError::Seal)?;
    let mut enc_bytes = [0u8; 32];
    enc_bytes.copy_from_slice(&enc.to_bytes());
    Ok(SealedKey {
        recipient: *recipient,
        enc: enc_bytes,
        ciphertext,
    })
}

/// Opens a key sealed to the holder of `secret`.
pub fn open_key(
    secret: &MemberSecret,
    group_nonce: &[u8; 32],
    epoch: u64,
    sealed: &SealedKey,
) -> Result<EpochKey, CryptoError> {
    let enc =
        <HpkeKem as Kem>::EncappedKey::from_bytes(&sealed.enc).map_err(|_| CryptoError::Unseal)?;
    let mut plain = hpke::single_shot_open::<HpkeAead, HpkeKdf, HpkeKem>(
        &OpModeR::Base,
        &secret.0,
        &enc,
        &seal_info(group_nonce, epoch),
        &sealed.ciphertext,
        &sealed.recipient.to_bytes(),
    )
    .map_err(|_| CryptoError::Unseal)?;
    let key = <[u8; 32]>::try_from(plain.as_slice()).map_err(|_| CryptoError::Unseal);
    plain.zeroize();
    Ok(EpochKey(key?))
}

/// What a message ciphertext is bound to (all of it also signed in the envelope).
#[derive(Debug, Clone, Copy)]
pub struct MessageContext<'a> {
    /// The group.
    pub group_id: &'a GroupId,
    /// The epoch whose key encrypts.
    pub epoch: u64,
    /// The sender.
    pub sender: &'a PeerId,
    /// The sender's sequence number.
    pub seq: u64,
}

impl MessageContext<'_> {
    fn cipher(&self, key: &EpochKey) -> Result<ChaCha20Poly1305, CryptoError> {
        let mut info = b"fogmesh msg".to_vec();
        info.extend_from_slice(&self.sender.to_bytes());
        info.extend_from_slice(&self.seq.to_be_bytes());
        let mut okm = [0u8; 32];
        Hkdf::<Sha256>::new(Some(&self.group_id.0), &key.0)
            .expand(&info, &mut okm)
            .map_err(|_| CryptoError::Decrypt)?;
        let cipher = ChaCha20Poly1305::new_from_slice(&okm).map_err(|_| CryptoError::Decrypt);
        okm.zeroize();
        cipher
    }

    fn aad(&self) -> Vec<u8> {
        let mut aad = b"fogmesh-groups/v1 msg\0".to_vec();
        aad.extend_from_slice(&self.group_id.0);
        aad.extend_from_slice(&self.epoch.to_be_bytes());
        aad.extend_from_slice(&self.seq.to_be_bytes());
        aad.extend_from_slice(&self.sender.to_bytes());
        aad
    }
}

/// Encrypts a message: returns `nonce || ciphertext || tag`.
pub fn encrypt_message(
    rng: &mut impl CryptoRng,
    key: &EpochKey,
    ctx: &MessageContext<'_>,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = [0u8; 12];
    rng.fill_bytes(&mut nonce);
    let ct = ctx
        .cipher(key)?
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad: &ctx.aad(),
            },
        )
        .map_err(|_| CryptoError::Decrypt)?;
    let mut out = Vec::with_capacity(12 + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Decrypts what [`encrypt_message`] produced.
pub fn decrypt_message(
    key: &EpochKey,
    ctx: &MessageContext<'_>,
    data: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let (nonce, ct) = data.split_first_chunk::<12>().ok_or(CryptoError::Decrypt)?;
    ctx.cipher(key)?
        .decrypt(
            &Nonce::from(*nonce),
            Payload {
                msg: ct,
                aad: &ctx.aad(),
            },
        )
        .map_err(|_| CryptoError::Decrypt)
}

/// The epoch keys one member holds, opened from the ops it received.
#[derive(Debug, Default, Clone)]
pub struct GroupKeys {
    keys: BTreeMap<u64, EpochKey>,
}

impl GroupKeys {
    /// Records the key of an epoch. The first key recorded for an epoch wins.
    pub fn insert(&mut self, epoch: u64, key: EpochKey) {
        self.keys.entry(epoch).or_insert(key);
    }

    /// The key of `epoch`, if held.
    pub fn get(&self, epoch: u64) -> Option<&EpochKey> {
        self.keys.get(&epoch)
    }

    /// The epochs whose keys are held, in increasing order.
    pub fn epochs(&self) -> impl Iterator<Item = u64> + '_ {
        self.keys.keys().copied()
    }

    /// Decrypts a message of any held epoch.
    pub fn open(&self, ctx: &MessageContext<'_>, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let key = self.keys.get(&ctx.epoch).ok_or(CryptoError::Decrypt)?;
        decrypt_message(key, ctx, data)
    }
}

/// Seals `plaintext` to `recipient` with HPKE base mode (the suite above),
/// bound to `info` and `aad`. Returns the encapsulated key and the
/// ciphertext. Shared by every protocol that seals to a peer id (direct
/// messages use it with their own `info`).
pub(crate) fn seal_to_peer(
    rng: &mut impl CryptoRng,
    recipient: &PeerId,
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<([u8; 32], Vec<u8>), CryptoError> {
    let x_pub = ed25519_key(recipient)?.to_montgomery().to_bytes();
    let pk = <HpkeKem as Kem>::PublicKey::from_bytes(&x_pub).map_err(CryptoError::Seal)?;
    let (enc, ciphertext) = hpke::single_shot_seal_with_rng::<HpkeAead, HpkeKdf, HpkeKem>(
        &OpModeS::Base,
        &pk,
        info,
        plaintext,
        aad,
        rng,
    )
    .map_err(CryptoError::Seal)?;
    let mut enc_bytes = [0u8; 32];
    enc_bytes.copy_from_slice(&enc.to_bytes());
    Ok((enc_bytes, ciphertext))
}

/// Opens what [`seal_to_peer`] sealed to the holder of `secret`.
pub(crate) fn open_from_peer(
    secret: &MemberSecret,
    info: &[u8],
    aad: &[u8],
    enc: &[u8; 32],
    ciphertext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let enc = <HpkeKem as Kem>::EncappedKey::from_bytes(enc).map_err(|_| CryptoError::Unseal)?;
    hpke::single_shot_open::<HpkeAead, HpkeKdf, HpkeKem>(
        &OpModeR::Base,
        &secret.0,
        &enc,
        info,
        ciphertext,
        aad,
    )
    .map_err(|_| CryptoError::Unseal)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn kp(i: u8) -> Keypair {
        match Keypair::ed25519_from_bytes([i; 32]) {
            Ok(k) => k,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn key_is_extracted_from_peer_id() {
        let k = kp(1);
        let vk = ed25519_key(&k.public().to_peer_id()).ok();
        let expected = k.public().try_into_ed25519().ok().map(|p| p.to_bytes());
        assert_eq!(vk.map(|v| v.to_bytes()), expected);
        // A hashed peer id (as RSA keys get) embeds no key.
        let hashed = PeerId::random();
        assert!(matches!(
            ed25519_key(&hashed),
            Err(CryptoError::NotEd25519(_))
        ));
    }

    #[test]
    fn signatures_are_domain_separated() {
        let k = kp(2);
        let me = k.public().to_peer_id();
        let sig = sign(&k, SIGN_OP, b"payload").unwrap_or_default();
        assert!(verify(&me, SIGN_OP, b"payload", &sig).is_ok());
        assert!(verify(&me, SIGN_MSG, b"payload", &sig).is_err());
        assert!(verify(&me, SIGN_OP, b"payloaf", &sig).is_err());
        assert!(verify(&kp(3).public().to_peer_id(), SIGN_OP, b"payload", &sig).is_err());
        assert!(verify(&me, SIGN_OP, b"payload", &sig[..10]).is_err());
    }

    #[test]
    fn sealed_key_opens_only_for_recipient_group_and_epoch() {
        let mut rng = StdRng::seed_from_u64(1);
        let (bob, carol) = (kp(4), kp(5));
        let bob_id = bob.public().to_peer_id();
        let key = EpochKey::random(&mut rng);
        let nonce = [9u8; 32];
        let sealed = seal_key(&mut rng, &nonce, 3, &key, &bob_id).ok();
        let Some(sealed) = sealed else {
            panic!("seal failed")
        };
        assert_eq!(sealed.ciphertext.len(), SEALED_KEY_LEN);
        let bob_secret = MemberSecret::from_keypair(&bob).ok();
        let carol_secret = MemberSecret::from_keypair(&carol).ok();
        let (Some(bs), Some(cs)) = (bob_secret, carol_secret) else {
            panic!("derive failed")
        };
        assert_eq!(open_key(&bs, &nonce, 3, &sealed).ok(), Some(key));
        assert!(open_key(&cs, &nonce, 3, &sealed).is_err());
        assert!(open_key(&bs, &nonce, 4, &sealed).is_err());
        assert!(open_key(&bs, &[0; 32], 3, &sealed).is_err());
        // Relabelling the recipient changes the AAD.
        let relabelled = SealedKey {
            recipient: carol.public().to_peer_id(),
            ..sealed
        };
        assert!(open_key(&bs, &nonce, 3, &relabelled).is_err());
    }

    #[test]
    fn message_roundtrip_and_binding() {
        let mut rng = StdRng::seed_from_u64(2);
        let key = EpochKey::random(&mut rng);
        let (gid, alice, bob) = (
            GroupId([1; 32]),
            kp(6).public().to_peer_id(),
            kp(7).public().to_peer_id(),
        );
        let ctx = MessageContext {
            group_id: &gid,
            epoch: 0,
            sender: &alice,
            seq: 1,
        };
        let ct = encrypt_message(&mut rng, &key, &ctx, b"hello").unwrap_or_default();
        assert_eq!(ct.len(), 5 + MESSAGE_OVERHEAD);
        assert_eq!(
            decrypt_message(&key, &ctx, &ct).ok().as_deref(),
            Some(&b"hello"[..])
        );
        for other in [
            MessageContext { seq: 2, ..ctx },
            MessageContext { epoch: 1, ..ctx },
            MessageContext {
                sender: &bob,
                ..ctx
            },
            MessageContext {
                group_id: &GroupId([2; 32]),
                ..ctx
            },
        ] {
            assert!(decrypt_message(&key, &other, &ct).is_err());
        }
        assert!(decrypt_message(&EpochKey::random(&mut rng), &ctx, &ct).is_err());
        assert!(decrypt_message(&key, &ctx, &ct[..11]).is_err());
        let mut keys = GroupKeys::default();
        assert!(keys.open(&ctx, &ct).is_err());
        keys.insert(0, key);
        assert!(keys.open(&ctx, &ct).is_ok());
    }
}
