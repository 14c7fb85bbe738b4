//! Files shared with a group: encrypted so that only members can read them.
//!
//! A group file is served and transferred as ciphertext: the plaintext XORed
//! with the ChaCha20 keystream (the original variant, 64-bit block counter,
//! so any offset of any file size is reachable) under a random key used for
//! this file only, with a zero nonce. The manifest and the file id are over
//! the ciphertext, so chunks are verified exactly as for any file; the key
//! and the id travel together in a [`FileLink`] inside an end-to-end
//! encrypted, signed group message. Integrity of the plaintext follows: the
//! signed message fixes the id, the id fixes every ciphertext chunk, and the
//! key maps them to exactly one plaintext.
//!
//! The keystream is seekable, so the sharer encrypts on the fly when it
//! serves a chunk (the plaintext stays where it is) and the downloader
//! decrypts into a new file once every chunk has verified.

use std::fmt;
use std::str::FromStr;

use chacha20::ChaCha20Legacy;
use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};

use super::manifest::FileId;

/// The link scheme: `fogmesh-file:<64 hex id>` or with the key,
/// `fogmesh-file:<64 hex id>#<64 hex key>`.
pub const LINK_PREFIX: &str = "fogmesh-file:";

/// A file's content key.
#[derive(Clone, PartialEq, Eq)]
pub struct FileKey(pub [u8; 32]);

impl fmt::Debug for FileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material into logs.
        f.write_str("FileKey(..)")
    }
}

impl FileKey {
    /// A fresh random key.
    pub fn generate(rng: &mut impl rand_core::CryptoRng) -> Self {
        let mut k = [0u8; 32];
        rng.fill_bytes(&mut k);
        FileKey(k)
    }

    /// Encrypts or decrypts (the same operation) `buf`, which sits at
    /// `offset` in the file.
    pub fn apply(&self, offset: u64, buf: &mut [u8]) {
        let mut c = ChaCha20Legacy::new(&self.0.into(), &[0u8; 8].into());
        c.seek(offset);
        c.apply_keystream(buf);
    }
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
        if let Some(k) = &self.key {
            write!(f, "#{}", hex::encode(k.0))?;
        }
        Ok(())
    }
}

/// Why a link did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// It does not start with `fogmesh-file:`.
    #[error("not a fogmesh file link (expected {LINK_PREFIX}<id>[#<key>])")]
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
                hex::decode(k)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .map(FileKey)
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
        let key = FileKey([7; 32]);
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
            key: Some(FileKey([0xcd; 32])),
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
        assert!(format!("{:?}", FileKey([9; 32])).contains(".."));
    }
}
