//! Files shared with a group: encrypted so that only members can read them.
//!
//! A group file is served and transferred as ciphertext; the manifest and
//! the file id are over the ciphertext, so chunks are verified exactly as
//! for any file. The key and the id travel together in a [`FileLink`] inside
//! an end-to-end encrypted, signed group message.
//!
//! Two schemes ([`KeyScheme`]):
//! - **Sealed** (link version 2, `fogmesh-file:<id>#v2:<key>`, what the node
//!   makes): each chunk of the plaintext is sealed with ChaCha20-Poly1305
//!   under the file's key, the chunk's index as the nonce; a ciphertext
//!   chunk is the plaintext chunk plus a 16-byte tag, and the manifest's
//!   chunk size is the plaintext's plus 16 ([`sealed_chunk_size`]). Opening
//!   a chunk with any other key fails, so a wrong key (say, a link a member
//!   forged with someone else's file id) is an error, never garbage.
//! - **Stream** (link version 1, `fogmesh-file:<id>#<key>`, still read): the
//!   plaintext XORed with the ChaCha20 keystream (the original variant,
//!   64-bit block counter) under the key. No integrity of its own: a wrong
//!   key decrypts to garbage.
//!
//! The sharer seals (or XORs) each chunk as it serves it; the plaintext
//! stays where it is. The downloader decrypts into a new file once every
//! ciphertext chunk has verified.

use std::fmt;
use std::str::FromStr;

use chacha20::ChaCha20Legacy;
use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};

use super::manifest::{
    FileId, MAX_CHUNK_SIZE, MAX_CHUNKS, MIN_CHUNK_SIZE, Manifest, chunk_size_for,
};

/// The link scheme: `fogmesh-file:<64 hex id>`, or with a key,
/// `fogmesh-file:<64 hex id>#v2:<64 hex key>` (sealed) or
/// `fogmesh-file:<64 hex id>#<64 hex key>` (stream, version 1).
pub const LINK_PREFIX: &str = "fogmesh-file:";
/// What follows `#` before a sealed (version 2) key.
const SEALED_TAG: &str = "v2:";
/// Bytes a sealed chunk adds to its plaintext: the Poly1305 tag.
pub const TAG_LEN: u32 = 16;
/// Associated data of every sealed chunk.
const SEAL_AAD: &[u8] = b"fogmesh/file/sealed-chunk";

/// How a group file is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyScheme {
    /// Link version 1: the ChaCha20 keystream, no integrity of its own.
    Stream,
    /// Link version 2: ChaCha20-Poly1305 per chunk.
    Sealed,
}

/// A file's content key and its scheme.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct FileKey {
    /// The key.
    pub bytes: [u8; 32],
    /// How it is used.
    pub scheme: KeyScheme,
}

impl fmt::Debug for FileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material into logs.
        write!(f, "FileKey({:?}, ..)", self.scheme)
    }
}

/// A chunk did not open: the key is not the file's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("chunk {0} does not open with this key: the link's key is not this file's")]
pub struct WrongKey(pub u64);

impl FileKey {
    /// A fresh random key of the current scheme ([`KeyScheme::Sealed`]).
    pub fn generate(rng: &mut impl rand_core::CryptoRng) -> Self {
        let mut k = [0u8; 32];
        rng.fill_bytes(&mut k);
        FileKey {
            bytes: k,
            scheme: KeyScheme::Sealed,
        }
    }

    /// A key of the stream scheme (link version 1).
    pub fn stream(bytes: [u8; 32]) -> Self {
        FileKey {
            bytes,
            scheme: KeyScheme::Stream,
        }
    }

    /// A key of the sealed scheme (link version 2).
    pub fn sealed(bytes: [u8; 32]) -> Self {
        FileKey {
            bytes,
            scheme: KeyScheme::Sealed,
        }
    }

    /// Stream scheme: encrypts or decrypts (the same operation) `buf`,
    /// which sits at `offset` in the file.
    pub fn apply(&self, offset: u64, buf: &mut [u8]) {
        let mut c = ChaCha20Legacy::new(&self.bytes.into(), &[0u8; 8].into());
        c.seek(offset);
        c.apply_keystream(buf);
    }

    fn aead(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(&self.bytes.into())
    }

    /// Sealed scheme: chunk `index` of the ciphertext from its plaintext.
    pub fn seal_chunk(&self, index: u64, plain: &[u8]) -> Vec<u8> {
        // Encrypting into a Vec only fails for inputs beyond 256 GiB.
        self.aead()
            .encrypt(
                &nonce(index),
                Payload {
                    msg: plain,
                    aad: SEAL_AAD,
                },
            )
            .unwrap_or_default()
    }

    /// Sealed scheme: the plaintext of ciphertext chunk `index`.
    pub fn open_chunk(&self, index: u64, sealed: &[u8]) -> Result<Vec<u8>, WrongKey> {
        self.aead()
            .decrypt(
                &nonce(index),
                Payload {
                    msg: sealed,
                    aad: SEAL_AAD,
                },
            )
            .map_err(|_| WrongKey(index))
    }

    /// The key as stored: a scheme byte (1 stream, 2 sealed) and the key.
    pub fn to_bytes(&self) -> [u8; 33] {
        let mut out = [0u8; 33];
        out[0] = match self.scheme {
            KeyScheme::Stream => 1,
            KeyScheme::Sealed => 2,
        };
        out[1..].copy_from_slice(&self.bytes);
        out
    }

    /// A key stored with [`to_bytes`](Self::to_bytes); 32 bytes alone are
    /// a stream key (as stored before link version 2).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let key = |s: &[u8]| <[u8; 32]>::try_from(s).ok();
        match b.len() {
            32 => key(b).map(FileKey::stream),
            33 if b[0] == 1 => key(&b[1..]).map(FileKey::stream),
            33 if b[0] == 2 => key(&b[1..]).map(FileKey::sealed),
            _ => None,
        }
    }
}

fn nonce(index: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&index.to_be_bytes());
    Nonce::from(n)
}

/// The ciphertext chunk size of a sealed file of `plain_size` bytes: the
/// usual chunk size, doubled while the file would need more than
/// [`MAX_CHUNKS`] chunks; `None` when no chunk size fits.
pub fn sealed_chunk_size(plain_size: u64) -> Option<u32> {
    let mut c = chunk_size_for(plain_size).max(MIN_CHUNK_SIZE);
    loop {
        let plain = u64::from(c - TAG_LEN);
        if plain_size.div_ceil(plain) <= MAX_CHUNKS {
            return Some(c);
        }
        if c >= MAX_CHUNK_SIZE {
            return None;
        }
        c = c.saturating_mul(2).min(MAX_CHUNK_SIZE);
    }
}

/// Where chunk `index` of a sealed file's plaintext is: its offset and
/// length in the plaintext, from the manifest of the ciphertext; `None`
/// past the end or for a chunk too short to hold a tag.
pub fn sealed_plain_range(m: &Manifest, index: u64) -> Option<(u64, u32)> {
    let len = m.chunk_len(index)?.checked_sub(TAG_LEN)?;
    let plain_chunk = u64::from(m.chunk_size().checked_sub(TAG_LEN)?);
    Some((index * plain_chunk, len))
}

/// A reference to a file, as posted in a group message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLink {
    /// The file (of the ciphertext, for an encrypted file).
    pub id: FileId,
    /// The content key, for an encrypted file.
    pub key: Option<FileKey>,
}

impl fmt::Display for FileLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{LINK_PREFIX}{}", self.id.to_hex())?;
        match &self.key {
            Some(k) if k.scheme == KeyScheme::Sealed => {
                write!(f, "#{SEALED_TAG}{}", hex::encode(k.bytes))
            }
            Some(k) => write!(f, "#{}", hex::encode(k.bytes)),
            None => Ok(()),
        }
    }
}

/// Why a link did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// It does not start with `fogmesh-file:`.
    #[error("not a fogmesh file link (expected {LINK_PREFIX}<id>[#v2:<key>])")]
    Prefix,
    /// The id is not 64 hex characters.
    #[error("the link's file id is not 64 hex characters")]
    Id,
    /// The key is not 64 hex characters.
    #[error("the link's key is not 64 hex characters")]
    Key,
}

impl FromStr for FileLink {
    type Err = LinkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix(LINK_PREFIX).ok_or(LinkError::Prefix)?;
        let (id, key) = match rest.split_once('#') {
            Some((id, key)) => (id, Some(key)),
            None => (rest, None),
        };
        let id = id.parse::<FileId>().map_err(|_| LinkError::Id)?;
        let key = key
            .map(|k| {
                let (hex_key, make): (&str, fn([u8; 32]) -> FileKey) =
                    match k.strip_prefix(SEALED_TAG) {
                        Some(h) => (h, FileKey::sealed),
                        None => (k, FileKey::stream),
                    };
                hex::decode(hex_key)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .map(make)
                    .ok_or(LinkError::Key)
            })
            .transpose()?;
        Ok(FileLink { id, key })
    }
}

/// Every well-formed link in a text (words separated by whitespace), at
/// most 16.
pub fn find_links(text: &str) -> Vec<FileLink> {
    text.split_whitespace()
        .filter(|w| w.starts_with(LINK_PREFIX))
        .filter_map(|w| w.parse().ok())
        .take(16)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keystream_is_seekable_and_an_involution() {
        let key = FileKey::stream([7; 32]);
        let plain: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut whole = plain.clone();
        key.apply(0, &mut whole);
        assert_ne!(whole, plain);
        // Encrypting piecewise at offsets gives the same bytes.
        let mut pieces = plain.clone();
        for (i, c) in pieces.chunks_mut(777).enumerate() {
            key.apply(i as u64 * 777, c);
        }
        assert_eq!(pieces, whole);
        key.apply(0, &mut whole);
        assert_eq!(whole, plain);
        // Offsets far beyond 256 GiB work (64-bit block counter).
        let mut far = [0u8; 64];
        key.apply(5 << 40, &mut far);
        assert_ne!(far, [0u8; 64]);
    }

    #[test]
    fn links_round_trip_and_garbage_is_refused() {
        let link = FileLink {
            id: FileId([0xab; 32]),
            key: Some(FileKey::stream([0xcd; 32])),
        };
        let s = link.to_string();
        assert_eq!(s.parse::<FileLink>(), Ok(link.clone()));
        let bare = FileLink {
            id: FileId([1; 32]),
            key: None,
        };
        assert_eq!(bare.to_string().parse::<FileLink>(), Ok(bare));
        assert_eq!(find_links(&format!("look: {s} (3 bytes)")), vec![link]);
        assert_eq!("x".parse::<FileLink>(), Err(LinkError::Prefix));
        assert_eq!("fogmesh-file:zz".parse::<FileLink>(), Err(LinkError::Id));
        assert_eq!(
            format!("fogmesh-file:{}#12", "ab".repeat(32)).parse::<FileLink>(),
            Err(LinkError::Key)
        );
        assert!(find_links("fogmesh-file: nothing here").is_empty());
        assert!(format!("{:?}", FileKey::sealed([9; 32])).contains(".."));
    }

    #[test]
    fn sealed_chunks_open_only_with_their_key_and_index() {
        let key = FileKey::sealed([1; 32]);
        let plain = vec![0x42u8; 1000];
        let sealed = key.seal_chunk(3, &plain);
        assert_eq!(sealed.len(), plain.len() + TAG_LEN as usize);
        assert_eq!(key.open_chunk(3, &sealed), Ok(plain));
        // Another key (a forged link), another index (chunks swapped) or a
        // flipped bit: an error, never garbage.
        assert_eq!(
            FileKey::sealed([2; 32]).open_chunk(3, &sealed),
            Err(WrongKey(3))
        );
        assert_eq!(key.open_chunk(4, &sealed), Err(WrongKey(4)));
        let mut bad = sealed.clone();
        bad[0] ^= 1;
        assert!(key.open_chunk(3, &bad).is_err());
        assert!(key.open_chunk(3, &[]).is_err());
    }

    #[test]
    fn sealed_geometry_fits_the_manifest_limits() {
        // Small files: the usual chunk size, tag included.
        assert_eq!(sealed_chunk_size(0), Some(256 * 1024));
        assert_eq!(sealed_chunk_size(1 << 30), Some(256 * 1024));
        // At a chunk-count boundary the ciphertext chunk doubles.
        let plain = u64::from(256 * 1024 - TAG_LEN);
        assert_eq!(sealed_chunk_size(plain * MAX_CHUNKS), Some(256 * 1024));
        assert_eq!(sealed_chunk_size(plain * MAX_CHUNKS + 1), Some(512 * 1024));
        assert_eq!(sealed_chunk_size(u64::MAX), None);
        // The plaintext ranges of a sealed manifest tile the plaintext.
        let c = 1024u32;
        let key = FileKey::sealed([5; 32]);
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let p = (c - TAG_LEN) as usize;
        let ct: Vec<u8> = data
            .chunks(p)
            .enumerate()
            .flat_map(|(i, ch)| key.seal_chunk(i as u64, ch))
            .collect();
        let mut b = crate::files::ManifestBuilder::new(c).expect("builder");
        b.update(&ct);
        let m = b.finish(None).expect("manifest");
        assert_eq!(m.size(), ct.len() as u64);
        let mut back = Vec::new();
        for i in 0..m.chunk_count() {
            let (off, len) = sealed_plain_range(&m, i).expect("range");
            assert_eq!(off as usize, back.len());
            let off_ct = m.chunk_offset(i).expect("offset") as usize;
            let chunk = &ct[off_ct..off_ct + m.chunk_len(i).expect("len") as usize];
            let opened = key.open_chunk(i, chunk).expect("opens");
            assert_eq!(opened.len(), len as usize);
            back.extend(opened);
        }
        assert_eq!(back, data);
    }

    #[test]
    fn stored_keys_round_trip_and_old_ones_are_stream_keys() {
        for k in [FileKey::sealed([3; 32]), FileKey::stream([4; 32])] {
            assert_eq!(FileKey::from_bytes(&k.to_bytes()), Some(k));
        }
        assert_eq!(
            FileKey::from_bytes(&[6; 32]),
            Some(FileKey::stream([6; 32]))
        );
        assert_eq!(FileKey::from_bytes(&[9; 33]), None);
        assert_eq!(FileKey::from_bytes(&[]), None);
        let link = FileLink {
            id: FileId([0xab; 32]),
            key: Some(FileKey::sealed([0xcd; 32])),
        };
        let s = link.to_string();
        assert!(s.contains("#v2:"), "{s}");
        assert_eq!(s.parse::<FileLink>(), Ok(link));
    }
}
