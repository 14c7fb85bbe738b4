//! The versioned CBOR frame every fogmesh wire format uses:
//! `{ "v": <version>, "m": <message> }`. Decoding checks the size before
//! parsing, reads the version alone before the message (so an unknown
//! version is reported as such, not as garbage), and refuses trailing
//! bytes.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Why a frame did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The input exceeds the limit for its message type.
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Input length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame's version is not one this code speaks.
    #[error("unsupported wire version {0}")]
    UnsupportedVersion(u64),
    /// The input is not a valid encoding of the expected message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Bytes follow the message.
    #[error("trailing bytes after the message")]
    TrailingBytes,
}

#[derive(Serialize)]
struct FrameRef<'a, T> {
    v: u64,
    m: &'a T,
}

#[derive(Deserialize)]
struct Frame<T> {
    #[allow(dead_code)] // checked through `Probe` first
    v: u64,
    m: T,
}

/// Reads only the version; serde skips the other fields.
#[derive(Deserialize)]
struct Probe {
    v: u64,
}

/// Canonical CBOR of a value (also what is signed and hashed).
pub(crate) fn cbor<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail, and none of our types' Serialize impls
    // return custom errors, so this is infallible; the `if let` keeps that
    // assumption from ever becoming a panic.
    if let Err(e) = ciborium::into_writer(value, &mut out) {
        tracing::error!(error = %e, "CBOR encoding failed");
        out.clear();
    }
    out
}

/// Encodes `value` in a frame of `version`.
pub(crate) fn encode<T: Serialize>(version: u64, value: &T) -> Vec<u8> {
    cbor(&FrameRef {
        v: version,
        m: value,
    })
}

/// Decodes a frame of `version` holding a `T`, of at most `max` bytes.
pub(crate) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    max: usize,
    version: u64,
) -> Result<T, WireError> {
    if bytes.len() > max {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    let probe: Probe =
        ciborium::from_reader(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    if probe.v != version {
        return Err(WireError::UnsupportedVersion(probe.v));
    }
    let mut reader = bytes;
    let frame: Frame<T> =
        ciborium::from_reader(&mut reader).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !reader.is_empty() {
        return Err(WireError::TrailingBytes);
    }
    Ok(frame.m)
}
