//! The request-response messages of `/fogmesh/file/2`, in CBOR, with size
//! limits and versioning.
//!
//! Every message is a CBOR map `{ "v": 1, "m": <message> }`, like the groups
//! wire format. Decoding first reads only `v`, so a message from a newer
//! version is refused with [`WireError::UnsupportedVersion`] rather than a
//! confusing field error, then decodes the whole frame. Every decoder checks
//! an explicit maximum input size first, rejects trailing bytes, and never
//! panics on garbage: ciborium bounds nesting depth, serde bounds
//! preallocation by the input, and the manifest and bitfield check their own
//! structure while they are decoded.
//!
//! Requests are tiny ([`MAX_REQUEST_SIZE`]); bulk data only travels in
//! responses, one chunk per response, so many requests can be in flight to
//! one peer and a lost or slow response costs one chunk.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::bitfield::Bitfield;
use super::manifest::{FileId, MAX_CHUNK_SIZE, MAX_MANIFEST_SIZE, Manifest};

/// The libp2p protocol name.
pub const PROTOCOL: &str = "/fogmesh/file/2";
/// The wire version this code speaks.
pub const WIRE_VERSION: u64 = 1;
/// Maximum encoded request. The largest, `GetChunk`, is under 80 bytes.
pub const MAX_REQUEST_SIZE: usize = 1024;
/// Room in a response for everything but the chunk data or the manifest:
/// framing, field names, the index.
pub const RESPONSE_OVERHEAD: usize = 1024;
/// Maximum length of an error message, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 256;
/// Maximum encoded response: the larger of a maximal chunk and a maximal
/// manifest, plus overhead. The node sets its request-response codec's
/// response limit to this (libp2p's default of 10 MiB is too small).
pub const MAX_RESPONSE_SIZE: usize =
    max(MAX_CHUNK_SIZE as usize, MAX_MANIFEST_SIZE) + RESPONSE_OVERHEAD;

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

/// The largest encoded response carrying a chunk of `chunk_size` bytes: a
/// node that knows a file's chunk size can use this tighter limit.
pub const fn max_chunk_response_size(chunk_size: u32) -> usize {
    chunk_size as usize + RESPONSE_OVERHEAD
}

pub use crate::frame::WireError;

/// What a downloader asks a provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// Send the manifest of `file`.
    GetManifest {
        /// The file.
        file: FileId,
    },
    /// Send which chunks of `file` you hold.
    GetHave {
        /// The file.
        file: FileId,
    },
    /// Send chunk `index` of `file`.
    GetChunk {
        /// The file.
        file: FileId,
        /// The chunk, from 0.
        index: u64,
    },
}

impl Request {
    /// The file the request is about.
    pub fn file(&self) -> &FileId {
        match self {
            Request::GetManifest { file }
            | Request::GetHave { file }
            | Request::GetChunk { file, .. } => file,
        }
    }
}

/// Why a provider could not answer.
///
/// Encoded as a number so that a code added by a later version decodes as
/// [`ErrorCode::Unknown`] instead of failing the whole response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The provider does not have this file (or its manifest).
    NotFound,
    /// The provider has the file's manifest but not this chunk, or the
    /// index is past the end.
    NoSuchChunk,
    /// The provider is overloaded; retry later or elsewhere.
    Busy,
    /// The provider failed (a disk error, say).
    Internal,
    /// A code this version does not know.
    Unknown(u16),
}

impl From<u16> for ErrorCode {
    fn from(code: u16) -> Self {
        match code {
            1 => ErrorCode::NotFound,
            2 => ErrorCode::NoSuchChunk,
            3 => ErrorCode::Busy,
            4 => ErrorCode::Internal,
            other => ErrorCode::Unknown(other),
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> Self {
        match code {
            ErrorCode::NotFound => 1,
            ErrorCode::NoSuchChunk => 2,
            ErrorCode::Busy => 3,
            ErrorCode::Internal => 4,
            ErrorCode::Unknown(other) => other,
        }
    }
}

/// What a provider answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// The manifest asked for. The receiver checks it against the id it
    /// asked for with [`Manifest::verify`]; its structure is already
    /// checked by decoding.
    Manifest(Manifest),
    /// The chunks the provider holds. Its length must equal the manifest's
    /// chunk count; the scheduler refuses it otherwise.
    Have {
        /// One bit per chunk.
        bits: Bitfield,
    },
    /// One chunk. The receiver checks it against the manifest.
    Chunk {
        /// The chunk's index.
        index: u64,
        /// The chunk's bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The request could not be served.
    Error {
        /// Why, for the program.
        code: ErrorCode,
        /// Why, for a human; at most [`MAX_ERROR_MESSAGE`] bytes (longer
        /// messages are cut when encoding).
        message: String,
    },
}

impl Response {
    /// An error response, with the message cut to [`MAX_ERROR_MESSAGE`]
    /// bytes at a character boundary.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut cut = MAX_ERROR_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Response::Error { code, message }
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    crate::frame::encode(WIRE_VERSION, value)
}

fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, WireError> {
    crate::frame::decode(bytes, max, WIRE_VERSION)
}

/// Encodes a request.
pub fn encode_request(req: &Request) -> Vec<u8> {
    encode(req)
}

/// Decodes a request of at most [`MAX_REQUEST_SIZE`] bytes.
pub fn decode_request(bytes: &[u8]) -> Result<Request, WireError> {
    decode(bytes, MAX_REQUEST_SIZE)
}

/// Encodes a response. Error messages are cut to [`MAX_ERROR_MESSAGE`].
pub fn encode_response(resp: &Response) -> Vec<u8> {
    match resp {
        Response::Error { code, message } if message.len() > MAX_ERROR_MESSAGE => {
            encode(&Response::error(*code, message.as_str()))
        }
        _ => encode(resp),
    }
}

/// Decodes a response of at most [`MAX_RESPONSE_SIZE`] bytes.
pub fn decode_response(bytes: &[u8]) -> Result<Response, WireError> {
    decode_response_with_limit(bytes, MAX_RESPONSE_SIZE)
}

/// Decodes a response of at most `max` bytes (e.g.
/// [`max_chunk_response_size`] of the file's chunk size); `max` is itself
/// capped at [`MAX_RESPONSE_SIZE`].
pub fn decode_response_with_limit(bytes: &[u8], max: usize) -> Result<Response, WireError> {
    let resp: Response = decode(bytes, max.min(MAX_RESPONSE_SIZE))?;
    if let Response::Error { message, .. } = &resp
        && message.len() > MAX_ERROR_MESSAGE
    {
        return Err(WireError::Malformed(format!(
            "error message of {} bytes, more than {MAX_ERROR_MESSAGE}",
            message.len()
        )));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, RngExt, SeedableRng};

    use super::super::manifest::{ManifestBuilder, chunk_size_for};
    use super::*;

    fn sample_manifest(len: usize) -> Manifest {
        let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let Ok(mut b) = ManifestBuilder::new(1024) else {
            panic!("builder")
        };
        b.update(&data);
        b.finish(Some("sample.txt".into()))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn samples() -> (Vec<Request>, Vec<Response>) {
        let m = sample_manifest(5000);
        let file = m.id();
        let mut bits = Bitfield::new(m.chunk_count());
        bits.set(1);
        bits.set(4);
        let reqs = vec![
            Request::GetManifest { file },
            Request::GetHave { file },
            Request::GetChunk {
                file,
                index: u64::MAX,
            },
        ];
        let resps = vec![
            Response::Manifest(m),
            Response::Have { bits },
            Response::Chunk {
                index: 3,
                data: vec![7; 1024],
            },
            Response::error(ErrorCode::Busy, "try later"),
        ];
        (reqs, resps)
    }

    #[test]
    fn roundtrips() {
        let (reqs, resps) = samples();
        for r in reqs {
            let bytes = encode_request(&r);
            assert!(bytes.len() < 100, "{} bytes", bytes.len());
            assert_eq!(decode_request(&bytes).ok(), Some(r));
        }
        for r in resps {
            assert_eq!(decode_response(&encode_response(&r)).ok(), Some(r));
        }
    }

    #[test]
    fn largest_legal_responses_fit_the_limits() {
        let chunk = Response::Chunk {
            index: u64::MAX,
            data: vec![0xff; MAX_CHUNK_SIZE as usize],
        };
        let bytes = encode_response(&chunk);
        assert!(bytes.len() <= max_chunk_response_size(MAX_CHUNK_SIZE));
        assert!(decode_response(&bytes).is_ok());
        // A default-size chunk fits the tighter per-file limit, and a chunk
        // one byte over it does not.
        let cs = chunk_size_for(0);
        let ok = encode_response(&Response::Chunk {
            index: 1,
            data: vec![1; cs as usize],
        });
        assert!(decode_response_with_limit(&ok, max_chunk_response_size(cs)).is_ok());
        let big = encode_response(&Response::Chunk {
            index: 1,
            data: vec![1; cs as usize + RESPONSE_OVERHEAD],
        });
        assert!(matches!(
            decode_response_with_limit(&big, max_chunk_response_size(cs)),
            Err(WireError::TooLarge { .. })
        ));
        // A manifest with the most chunks (1 KiB chunks, 256 MiB described),
        // fed in 1 MiB blocks so the test does not hold 256 MiB.
        let Ok(mut b) = ManifestBuilder::new(1024) else {
            panic!("builder")
        };
        let block = vec![3u8; 1024 * 1024];
        for _ in 0..256 {
            b.update(&block);
        }
        let Ok(m) = b.finish(Some("n".repeat(255))) else {
            panic!("finish")
        };
        assert_eq!(m.chunk_count(), crate::files::manifest::MAX_CHUNKS);
        let bytes = encode_response(&Response::Manifest(m.clone()));
        assert!(bytes.len() <= MAX_MANIFEST_SIZE + RESPONSE_OVERHEAD);
        assert_eq!(decode_response(&bytes).ok(), Some(Response::Manifest(m)));
        // Long error messages are cut when encoding, refused when decoding.
        let long = Response::Error {
            code: ErrorCode::Internal,
            message: "é".repeat(200),
        };
        let Ok(Response::Error { message, .. }) = decode_response(&encode_response(&long)) else {
            panic!("error response")
        };
        assert!(message.len() <= MAX_ERROR_MESSAGE && message.len() >= MAX_ERROR_MESSAGE - 1);
        let raw = encode(&long);
        assert!(matches!(
            decode_response(&raw),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn unknown_error_codes_survive() {
        let r = Response::Error {
            code: ErrorCode::Unknown(99),
            message: String::new(),
        };
        assert_eq!(decode_response(&encode_response(&r)).ok(), Some(r));
        assert_eq!(ErrorCode::from(2), ErrorCode::NoSuchChunk);
    }

    #[test]
    fn version_oversize_and_trailing_bytes_are_rejected() {
        let (reqs, _) = samples();
        let v2 = crate::frame::encode(2, &reqs[0]);
        assert!(matches!(
            decode_request(&v2),
            Err(WireError::UnsupportedVersion(2))
        ));
        let mut trailing = encode_request(&reqs[2]);
        trailing.push(0);
        assert!(matches!(
            decode_request(&trailing),
            Err(WireError::TrailingBytes)
        ));
        assert!(matches!(
            decode_request(&[0; MAX_REQUEST_SIZE + 1]),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_and_truncations_never_panic() {
        let (reqs, resps) = samples();
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..3000 {
            let len = rng.random_range(0..400);
            let mut junk = vec![0u8; len];
            rng.fill_bytes(&mut junk);
            // Random bytes, and random bytes behind a valid-looking frame head.
            let mut framed = vec![0xa2, 0x61, b'v', 0x01, 0x61, b'm'];
            framed.extend_from_slice(&junk);
            for input in [&junk, &framed] {
                let _ = decode_request(input);
                let _ = decode_response(input);
            }
        }
        // Deep nesting hits ciborium's recursion limit, not the stack.
        let mut deep = vec![0xa2, 0x61, b'v', 0x01, 0x61, b'm'];
        deep.extend(std::iter::repeat_n(0x81, 60_000));
        assert!(decode_response(&deep).is_err());
        // A byte string claiming 4 GiB in a short input.
        let huge = [
            0xa2, 0x61, b'v', 0x01, 0x61, b'm', 0x5a, 0xff, 0xff, 0xff, 0xff, 0,
        ];
        assert!(decode_response(&huge).is_err());
        let valid: Vec<Vec<u8>> = reqs
            .iter()
            .map(encode_request)
            .chain(resps.iter().map(encode_response))
            .collect();
        for bytes in &valid {
            for cut in 0..bytes.len() {
                assert!(decode_request(&bytes[..cut]).is_err());
                assert!(decode_response(&bytes[..cut]).is_err());
            }
            for _ in 0..300 {
                let mut c = bytes.clone();
                let i = rng.random_range(0..c.len());
                c[i] ^= 1 << rng.random_range(0..8);
                let _ = decode_request(&c);
                // A corrupted manifest or bitfield either fails to decode or
                // is still structurally valid.
                if let Ok(Response::Have { bits }) = decode_response(&c) {
                    assert!(bits.count() <= bits.len());
                }
            }
        }
    }
}
