//! The manifest of a file and its content address, the [`FileId`].
//!
//! A file is cut into chunks of a fixed size (the last one shorter) and the
//! manifest lists the SHA-256 of every chunk. The file id is the SHA-256 of a
//! fixed-width encoding of the manifest's content fields (see [`Manifest::id`]),
//! so whoever knows the id can check a manifest received from anyone, and
//! then every chunk received from anyone against the manifest, one chunk at
//! a time. The optional name is informational and deliberately outside the
//! id: the same bytes published under two names are one file.
//!
//! Manifests travel whole (one response), so their size is bounded: at most
//! [`MAX_CHUNKS`] hashes, which is [`MAX_MANIFEST_SIZE`] encoded. Large
//! files get larger chunks instead ([`chunk_size_for`]): 256 KiB chunks up to
//! 64 GiB, doubling from there up to [`MAX_CHUNK_SIZE`], which covers files
//! up to 4 TiB.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest format this code produces and accepts.
pub const MANIFEST_VERSION: u64 = 1;
/// The default chunk size, used for files up to `MAX_CHUNKS * CHUNK_SIZE` (64 GiB).
pub const CHUNK_SIZE: u32 = 256 * 1024;
/// The smallest chunk size a manifest may use. Smaller chunks would make the
/// per-request overhead dominate; the limit also keeps test manifests honest.
pub const MIN_CHUNK_SIZE: u32 = 1024;
/// The largest chunk size a manifest may use: one chunk is one response, and
/// a receiver holds a whole response in memory.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// The most chunks (hashes) one manifest may list.
pub const MAX_CHUNKS: u64 = 1 << 18;
/// Maximum length of a manifest's name, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 255;
/// Upper bound on an encoded manifest: the hashes plus room for the other
/// fields, the name and the CBOR framing (all well under 1 KiB).
pub const MAX_MANIFEST_SIZE: usize = (MAX_CHUNKS as usize) * 32 + 1024;

/// Domain separation for the id, so a file id can never collide with a
/// SHA-256 computed for another purpose over the same bytes.
const ID_DOMAIN: &[u8] = b"fogmesh/file/manifest";

/// Why a manifest cannot be built or was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManifestError {
    /// The manifest's version is not [`MANIFEST_VERSION`].
    #[error("unsupported manifest version {0} (this node speaks {MANIFEST_VERSION})")]
    UnsupportedVersion(u64),
    /// The chunk size is outside [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`].
    #[error("chunk size {0} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    BadChunkSize(u32),
    /// The file would need more than [`MAX_CHUNKS`] chunks at this chunk size.
    #[error("{0} chunks, more than {MAX_CHUNKS}")]
    TooManyChunks(u64),
    /// The number of hashes does not match the size and chunk size.
    #[error("{got} chunk hashes for a file that has {expected} chunks")]
    HashCount {
        /// Hashes the manifest lists.
        got: u64,
        /// Chunks the size and chunk size imply.
        expected: u64,
    },
    /// The hash list is not a whole number of 32-byte hashes.
    #[error("hash list of {0} bytes is not a multiple of 32")]
    HashListLength(usize),
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("name of {0} bytes, more than {MAX_NAME_LEN}")]
    NameTooLong(usize),
    /// The name is not a plain file name ([`is_plain_name`]).
    #[error(
        "name {0:?} is not a plain file name (empty, `.`, `..`, a separator, NUL or a control character)"
    )]
    BadName(String),
    /// The manifest does not hash to the expected file id.
    #[error("manifest hashes to {actual}, expected {expected}")]
    IdMismatch {
        /// The id asked for.
        expected: FileId,
        /// The id of the manifest received.
        actual: FileId,
    },
}

/// A file's content address: SHA-256 over its manifest's content fields.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FileId(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl FileId {
    /// Lower-case hex, as used in logs, the node's API and the Kademlia key.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileId({})", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Why a string is not a file id.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ParseFileIdError {
    /// Not 64 hex digits.
    #[error("a file id is 64 hex digits: {0}")]
    Hex(#[from] hex::FromHexError),
}

impl std::str::FromStr for FileId {
    type Err = ParseFileIdError;

    /// Parses 64 hex digits, either case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut id = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut id)?;
        Ok(FileId(id))
    }
}

/// The chunk size for a file of `size` bytes: [`CHUNK_SIZE`], or the
/// smallest larger power of two that keeps the file within [`MAX_CHUNKS`]
/// chunks, capped at [`MAX_CHUNK_SIZE`] (files over 4 TiB cannot be
/// described, and [`ManifestBuilder::finish`] says so).
pub fn chunk_size_for(size: u64) -> u32 {
    // Bytes each chunk must hold for the file to fit in MAX_CHUNKS chunks;
    // at most 2^46 for u64::MAX, so next_power_of_two cannot overflow.
    let needed = size.div_ceil(MAX_CHUNKS).max(u64::from(CHUNK_SIZE));
    let size = needed.next_power_of_two().min(u64::from(MAX_CHUNK_SIZE));
    // Capped at MAX_CHUNK_SIZE just above, so this always fits.
    u32::try_from(size).unwrap_or(MAX_CHUNK_SIZE)
}

/// Number of chunks of a file, in 64-bit arithmetic (`chunk_size` > 0).
fn chunks_of(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size.max(1)))
}

/// The description of a file: its size, chunking and chunk hashes.
///
/// Fields are private so every `Manifest` in memory is valid: built by
/// [`ManifestBuilder`] or checked when decoded. Deserializing validates
/// everything except the id, which the receiver checks with
/// [`verify`](Manifest::verify).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawManifest", into = "RawManifest")]
pub struct Manifest {
    size: u64,
    chunk_size: u32,
    chunk_hashes: Vec<[u8; 32]>,
    name: Option<String>,
}

/// The encoded form. The hashes travel as one byte string (32 bytes each),
/// which is both the most compact CBOR and what the id hashes.
#[derive(Serialize, Deserialize)]
struct RawManifest {
    v: u64,
    size: u64,
    chunk_size: u32,
    #[serde(with = "serde_bytes")]
    hashes: Vec<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

impl TryFrom<RawManifest> for Manifest {
    type Error = ManifestError;

    fn try_from(raw: RawManifest) -> Result<Self, ManifestError> {
        if raw.v != MANIFEST_VERSION {
            return Err(ManifestError::UnsupportedVersion(raw.v));
        }
        check_chunk_size(raw.chunk_size)?;
        let expected = chunks_of(raw.size, raw.chunk_size);
        if expected > MAX_CHUNKS {
            return Err(ManifestError::TooManyChunks(expected));
        }
        if !raw.hashes.len().is_multiple_of(32) {
            return Err(ManifestError::HashListLength(raw.hashes.len()));
        }
        let got = (raw.hashes.len() / 32) as u64;
        if got != expected {
            return Err(ManifestError::HashCount { got, expected });
        }
        if let Some(name) = &raw.name
            && name.len() > MAX_NAME_LEN
        {
            return Err(ManifestError::NameTooLong(name.len()));
        }
        // The name is informational and outside the id: one that is not a
        // plain file name (a path, `..`, control characters) is dropped.
        let name = raw.name.filter(|n| is_plain_name(n));
        let chunk_hashes = raw
            .hashes
            .chunks_exact(32)
            .map(|h| {
                let mut a = [0u8; 32];
                a.copy_from_slice(h);
                a
            })
            .collect();
        Ok(Manifest {
            size: raw.size,
            chunk_size: raw.chunk_size,
            chunk_hashes,
            name,
        })
    }
}

impl From<Manifest> for RawManifest {
    fn from(m: Manifest) -> Self {
        RawManifest {
            v: MANIFEST_VERSION,
            size: m.size,
            chunk_size: m.chunk_size,
            hashes: m.chunk_hashes.concat(),
            name: m.name,
        }
    }
}

fn check_chunk_size(chunk_size: u32) -> Result<(), ManifestError> {
    if (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        Ok(())
    } else {
        Err(ManifestError::BadChunkSize(chunk_size))
    }
}

fn check_name(name: &str) -> Result<(), ManifestError> {
    if name.len() > MAX_NAME_LEN {
        return Err(ManifestError::NameTooLong(name.len()));
    }
    if !is_plain_name(name) {
        return Err(ManifestError::BadName(name.escape_debug().to_string()));
    }
    Ok(())
}

/// Whether `name` can be a file's name as it is, in any directory, and
/// printed to a terminal: not empty, not `.` or `..`, no `/` or `\`, no
/// NUL or other control character. A manifest's name (chosen by whoever
/// published it) must be one; receivers check this when decoding.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control())
}

impl Manifest {
    /// The manifest format version, always [`MANIFEST_VERSION`].
    pub fn version(&self) -> u64 {
        MANIFEST_VERSION
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The size of every chunk but the last.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The SHA-256 of each chunk, in order.
    pub fn chunk_hashes(&self) -> &[[u8; 32]] {
        &self.chunk_hashes
    }

    /// The informational name, if any (not covered by the id).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The same manifest under another name (the id does not change).
    pub fn with_name(mut self, name: Option<String>) -> Result<Self, ManifestError> {
        if let Some(n) = &name {
            check_name(n)?;
        }
        self.name = name;
        Ok(self)
    }

    /// The number of chunks (0 for an empty file).
    pub fn chunk_count(&self) -> u64 {
        self.chunk_hashes.len() as u64
    }

    /// The length of chunk `index`, or `None` past the end.
    pub fn chunk_len(&self, index: u64) -> Option<u32> {
        chunk_len(self.size, self.chunk_size, index)
    }

    /// The byte offset of chunk `index` in the file, or `None` past the end.
    pub fn chunk_offset(&self, index: u64) -> Option<u64> {
        (index < self.chunk_count()).then(|| index * u64::from(self.chunk_size))
    }

    /// The file id: SHA-256 over `"fogmesh/file/manifest" || version (u64 BE)
    /// || size (u64 BE) || chunk_size (u32 BE) || chunk hashes`.
    ///
    /// Every field has a fixed width (the hash count follows from size and
    /// chunk size), so the encoding is unambiguous and independent of CBOR.
    /// Costs one pass over the hashes (8 MiB at most): callers keep the id
    /// rather than recompute it.
    pub fn id(&self) -> FileId {
        let mut h = Sha256::new();
        h.update(ID_DOMAIN);
        h.update(MANIFEST_VERSION.to_be_bytes());
        h.update(self.size.to_be_bytes());
        h.update(self.chunk_size.to_be_bytes());
        for chunk in &self.chunk_hashes {
            h.update(chunk);
        }
        FileId(h.finalize().into())
    }

    /// Checks that this manifest is the one `id` names.
    pub fn verify(&self, id: &FileId) -> Result<(), ManifestError> {
        let actual = self.id();
        if actual == *id {
            Ok(())
        } else {
            Err(ManifestError::IdMismatch {
                expected: *id,
                actual,
            })
        }
    }

    /// Whether `data` is exactly chunk `index` of this file.
    pub fn verify_chunk(&self, index: u64, data: &[u8]) -> bool {
        let (Some(len), Some(expected)) = (
            self.chunk_len(index),
            usize::try_from(index)
                .ok()
                .and_then(|i| self.chunk_hashes.get(i)),
        ) else {
            return false;
        };
        // The length check first: it is free and rejects truncations early.
        data.len() as u64 == u64::from(len) && Sha256::digest(data)[..] == expected[..]
    }
}

impl std::fmt::Debug for Manifest {
    // The hash list can be 8 MiB: print its length, not its content.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifest")
            .field("size", &self.size)
            .field("chunk_size", &self.chunk_size)
            .field("chunks", &self.chunk_hashes.len())
            .field("name", &self.name)
            .finish()
    }
}

/// Length of chunk `index` of a file of `size` bytes, in 64-bit arithmetic.
pub fn chunk_len(size: u64, chunk_size: u32, index: u64) -> Option<u32> {
    if chunk_size == 0 || index >= chunks_of(size, chunk_size) {
        return None;
    }
    // index < count, so index * chunk_size < size and this cannot overflow.
    let start = index * u64::from(chunk_size);
    let len = (size - start).min(u64::from(chunk_size));
    u32::try_from(len).ok()
}

/// Builds a manifest from a stream of bytes, in slices of any size.
///
/// Only the current chunk's hasher and the hashes so far are kept, so the
/// node can hash a file of any size while reading it once.
#[derive(Debug, Clone)]
pub struct ManifestBuilder {
    chunk_size: u32,
    size: u64,
    /// Bytes of the current (unfinished) chunk fed to `hasher`.
    in_chunk: u32,
    hasher: Sha256,
    hashes: Vec<[u8; 32]>,
}

impl ManifestBuilder {
    /// Starts a manifest with the given chunk size; use
    /// [`chunk_size_for`]`(file size)` unless there is a reason not to.
    pub fn new(chunk_size: u32) -> Result<Self, ManifestError> {
        check_chunk_size(chunk_size)?;
        Ok(ManifestBuilder {
            chunk_size,
            size: 0,
            in_chunk: 0,
            hasher: Sha256::new(),
            hashes: Vec::new(),
        })
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Whether no byte has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Feeds the next bytes of the file.
    pub fn update(&mut self, mut data: &[u8]) {
        self.size = self.size.saturating_add(data.len() as u64);
        while !data.is_empty() {
            let room = (self.chunk_size - self.in_chunk) as usize;
            let take = room.min(data.len());
            let (head, tail) = data.split_at(take);
            self.hasher.update(head);
            // take <= room <= chunk_size, a u32.
            self.in_chunk += take as u32;
            data = tail;
            if self.in_chunk == self.chunk_size {
                self.hashes.push(self.hasher.finalize_reset().into());
                self.in_chunk = 0;
            }
        }
    }

    /// Ends the file and returns its manifest.
    ///
    /// Fails if the file has more than [`MAX_CHUNKS`] chunks at this chunk
    /// size or the name is longer than [`MAX_NAME_LEN`] bytes.
    pub fn finish(mut self, name: Option<String>) -> Result<Manifest, ManifestError> {
        if self.in_chunk > 0 {
            self.hashes.push(self.hasher.finalize().into());
        }
        let count = self.hashes.len() as u64;
        if count > MAX_CHUNKS {
            return Err(ManifestError::TooManyChunks(count));
        }
        if let Some(n) = &name {
            check_name(n)?;
        }
        Ok(Manifest {
            size: self.size,
            chunk_size: self.chunk_size,
            chunk_hashes: self.hashes,
            name,
        })
    }
}

/// Builds the manifest of an in-memory file with [`chunk_size_for`] its size.
pub fn manifest_of(data: &[u8], name: Option<String>) -> Result<Manifest, ManifestError> {
    let mut b = ManifestBuilder::new(chunk_size_for(data.len() as u64))?;
    b.update(data);
    b.finish(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const GIB: u64 = 1024 * MIB;

    fn build(data: &[u8], chunk_size: u32, step: usize) -> Manifest {
        let Ok(mut b) = ManifestBuilder::new(chunk_size) else {
            panic!("chunk size {chunk_size}")
        };
        for piece in data.chunks(step.max(1)) {
            b.update(piece);
        }
        b.finish(Some("a.bin".into()))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + i / 977) as u8).collect()
    }

    #[test]
    fn builder_is_independent_of_how_the_stream_is_sliced() {
        let data = pattern(10 * 1024 + 17);
        let whole = build(&data, 1024, data.len());
        for step in [1, 7, 1023, 1024, 1025, 4096] {
            assert_eq!(build(&data, 1024, step), whole, "step {step}");
        }
        assert_eq!(whole.chunk_count(), 11);
        assert_eq!(whole.chunk_len(10), Some(17));
        assert_eq!(whole.chunk_len(11), None);
        assert_eq!(whole.chunk_offset(10), Some(10 * 1024));
        for (i, c) in data.chunks(1024).enumerate() {
            assert!(whole.verify_chunk(i as u64, c));
            let mut bad = c.to_vec();
            bad[0] ^= 1;
            assert!(!whole.verify_chunk(i as u64, &bad));
            assert!(!whole.verify_chunk(i as u64, &c[..c.len() - 1]));
        }
        assert!(!whole.verify_chunk(11, &[]));
        assert!(!whole.verify_chunk(u64::MAX, &[]));
    }

    #[test]
    fn exact_multiple_and_empty_files() {
        let data = pattern(4096);
        let m = build(&data, 1024, 100);
        assert_eq!(m.chunk_count(), 4);
        assert_eq!(m.chunk_len(3), Some(1024));
        let empty = build(&[], 1024, 1);
        assert_eq!(empty.chunk_count(), 0);
        assert_eq!(empty.size(), 0);
        assert_eq!(empty.chunk_len(0), None);
        assert_ne!(empty.id(), m.id());
    }

    #[test]
    fn id_commits_to_content_not_name() {
        let data = pattern(5000);
        let a = build(&data, 1024, 5000);
        let Ok(renamed) = a.clone().with_name(Some("other name".into())) else {
            panic!("rename")
        };
        assert_eq!(a.id(), renamed.id());
        assert!(renamed.verify(&a.id()).is_ok());
        // Same bytes, other chunking: another manifest, another id.
        let b = build(&data, 2048, 5000);
        assert_ne!(a.id(), b.id());
        // One byte changed: another id, and the old id refuses the manifest.
        let mut changed = data.clone();
        changed[4999] ^= 0x80;
        let c = build(&changed, 1024, 5000);
        assert!(matches!(
            c.verify(&a.id()),
            Err(ManifestError::IdMismatch { .. })
        ));
    }

    #[test]
    fn file_id_hex_roundtrip() {
        let id = build(&pattern(3000), 1024, 3000).id();
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<FileId>(), Ok(id));
        assert_eq!(s.to_uppercase().parse::<FileId>(), Ok(id));
        assert!("abc".parse::<FileId>().is_err());
        assert!(format!("{s}00").parse::<FileId>().is_err());
        assert!(s.replace('a', "g").parse::<FileId>().is_err() || !s.contains('a'));
    }

    #[test]
    fn chunk_arithmetic_beyond_4_gib() {
        let size = 5 * GIB + 3;
        let cs = chunk_size_for(size);
        assert_eq!(cs, CHUNK_SIZE);
        let count = chunks_of(size, cs);
        assert_eq!(count, 5 * 4096 + 1);
        assert_eq!(chunk_len(size, cs, count - 2), Some(CHUNK_SIZE));
        assert_eq!(chunk_len(size, cs, count - 1), Some(3));
        assert_eq!(chunk_len(size, cs, count), None);
        assert_eq!(chunk_len(size, cs, u64::MAX), None);
        // A size whose chunk count does not fit 32 bits.
        let huge = u64::MAX - 5;
        assert_eq!(chunk_len(huge, MIN_CHUNK_SIZE, huge / 1024), Some(1018));
    }

    #[test]
    fn chunk_size_grows_to_keep_manifests_bounded() {
        assert_eq!(chunk_size_for(0), CHUNK_SIZE);
        assert_eq!(chunk_size_for(64 * GIB), CHUNK_SIZE);
        assert_eq!(chunk_size_for(64 * GIB + 1), 2 * CHUNK_SIZE);
        assert_eq!(chunk_size_for(1024 * GIB), 16 * CHUNK_SIZE);
        assert_eq!(chunk_size_for(4096 * GIB), MAX_CHUNK_SIZE);
        assert_eq!(chunk_size_for(u64::MAX), MAX_CHUNK_SIZE);
        for size in [1, 5 * GIB + 3, 64 * GIB + 1, 300 * GIB, 4096 * GIB] {
            assert!(chunks_of(size, chunk_size_for(size)) <= MAX_CHUNKS);
        }
        assert!(chunks_of(4096 * GIB + 1, chunk_size_for(4096 * GIB + 1)) > MAX_CHUNKS);
    }

    #[test]
    fn names_that_are_not_plain_file_names_are_dropped_at_decode() {
        for bad in [
            "",
            ".",
            "..",
            "../../etc/passwd",
            "a/b",
            "a\\b",
            "nul\0",
            "bell\u{7}",
            "esc\u{1b}[2J",
            "\u{9b}31m",
        ] {
            assert!(!is_plain_name(bad), "{bad:?}");
            let raw = RawManifest {
                v: MANIFEST_VERSION,
                size: 1,
                chunk_size: 1024,
                hashes: vec![0; 32],
                name: Some(bad.to_owned()),
            };
            let mut bytes = Vec::new();
            ciborium::into_writer(&raw, &mut bytes).expect("encode");
            let m: Manifest = ciborium::from_reader(bytes.as_slice()).expect("decodes");
            assert_eq!(m.name(), None, "{bad:?} kept");
            // Nobody builds one either.
            assert_eq!(
                m.with_name(Some(bad.to_owned()))
                    .err()
                    .map(|e| matches!(e, ManifestError::BadName(_))),
                Some(true)
            );
        }
        for good in ["a.b", "report..pdf", "été.txt", ".hidden"] {
            assert!(is_plain_name(good), "{good:?}");
        }
    }

    #[test]
    fn builder_rejects_bad_parameters() {
        assert_eq!(
            ManifestBuilder::new(0).err(),
            Some(ManifestError::BadChunkSize(0))
        );
        assert!(ManifestBuilder::new(MAX_CHUNK_SIZE + 1).is_err());
        let Ok(b) = ManifestBuilder::new(1024) else {
            panic!("builder")
        };
        assert_eq!(
            b.finish(Some("x".repeat(256))).err(),
            Some(ManifestError::NameTooLong(256))
        );
        // Too many chunks: MAX_CHUNKS + 1 chunks of 1 KiB (257 MiB of input).
        let Ok(mut b) = ManifestBuilder::new(1024) else {
            panic!("builder")
        };
        let block = vec![0u8; 1024 * 1024];
        for _ in 0..(MAX_CHUNKS / 1024) {
            b.update(&block);
        }
        b.update(&[1]);
        assert_eq!(
            b.finish(None).err(),
            Some(ManifestError::TooManyChunks(MAX_CHUNKS + 1))
        );
    }

    #[test]
    fn decoding_validates_the_structure() {
        let m = build(&pattern(3000), 1024, 3000);
        let mut bytes = Vec::new();
        if ciborium::into_writer(&m, &mut bytes).is_err() {
            panic!("encode");
        }
        let back: Result<Manifest, _> = ciborium::from_reader(&bytes[..]);
        assert_eq!(back.ok(), Some(m.clone()));
        // Compact: 3 hashes of 32 bytes plus under 64 bytes of framing.
        assert!(bytes.len() < 3 * 32 + 64, "{}", bytes.len());
        let raw = |v, size, chunk_size, hashes: usize| RawManifest {
            v,
            size,
            chunk_size,
            hashes: vec![0; hashes],
            name: None,
        };
        let cases = [
            (raw(2, 3000, 1024, 96), ManifestError::UnsupportedVersion(2)),
            (raw(1, 3000, 0, 96), ManifestError::BadChunkSize(0)),
            (raw(1, 3000, 1024, 95), ManifestError::HashListLength(95)),
            (
                raw(1, 3000, 1024, 64),
                ManifestError::HashCount {
                    got: 2,
                    expected: 3,
                },
            ),
            (
                raw(1, u64::MAX, 1024, 0),
                ManifestError::TooManyChunks(u64::MAX.div_ceil(1024)),
            ),
        ];
        for (raw, err) in cases {
            assert_eq!(Manifest::try_from(raw).err(), Some(err));
        }
    }
}
