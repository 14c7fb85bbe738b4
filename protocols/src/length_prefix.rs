//! The framing of the node's request-response protocols (group sync,
//! files), sans-IO: one frame each way, an unsigned-varint length then that
//! many bytes, as libp2p's own protocols frame their messages.
//!
//! The node's codec (`node/src/codec.rs`) reads the prefix byte by byte
//! through [`parse_prefix`], checks the length against its limit before
//! allocating anything, then reads the body; it writes with
//! [`encode_prefix`]. The fuzz target `rr_frame` runs the same functions.
//!
//! The varint is LEB128 as in the `unsigned-varint` crate: at most
//! [`MAX_PREFIX_LEN`] bytes, minimal (no trailing zero byte), no bits
//! beyond 64.

/// The longest a length prefix is (a 64-bit varint).
pub const MAX_PREFIX_LEN: usize = 10;

/// Why a length prefix was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PrefixError {
    /// The announced length is over the limit (refused before allocating).
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLong {
        /// The announced length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The varint does not fit 64 bits.
    #[error("length prefix overflows 64 bits")]
    Overflow,
    /// The varint ends in a zero byte (it has a shorter encoding).
    #[error("length prefix is not minimal")]
    NotMinimal,
}

/// Parses the length prefix at the start of `bytes`, for frames of at most
/// `max` bytes: `Ok(None)` while it is incomplete, else the length and how
/// many bytes the prefix took.
pub fn parse_prefix(bytes: &[u8], max: usize) -> Result<Option<(usize, usize)>, PrefixError> {
    let mut n: u64 = 0;
    for (i, b) in bytes.iter().copied().enumerate() {
        if i >= MAX_PREFIX_LEN {
            return Err(PrefixError::Overflow);
        }
        let k = u64::from(b & 0x7f);
        // The tenth byte holds bit 63 only.
        if i == MAX_PREFIX_LEN - 1 && k > 1 {
            return Err(PrefixError::Overflow);
        }
        n |= k << (i * 7);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                return Err(PrefixError::NotMinimal);
            }
            return match usize::try_from(n) {
                Ok(len) if len <= max => Ok(Some((len, i + 1))),
                _ => Err(PrefixError::TooLong { len: n, max }),
            };
        }
    }
    if bytes.len() >= MAX_PREFIX_LEN {
        return Err(PrefixError::Overflow);
    }
    Ok(None)
}

/// Writes the prefix of a frame of `len` bytes into `buf`; returns the
/// bytes written.
pub fn encode_prefix(len: usize, buf: &mut [u8; MAX_PREFIX_LEN]) -> &[u8] {
    let mut n = len as u64;
    let mut i = 0;
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            buf[i] = b;
            return &buf[..=i];
        }
        buf[i] = b | 0x80;
        i += 1;
    }
}

/// A frame's body and the bytes after it.
pub type Split<'a> = (&'a [u8], &'a [u8]);

/// One whole frame at the start of `bytes`: its body and what follows, or
/// `Ok(None)` when `bytes` holds less than a whole frame.
pub fn split_frame(bytes: &[u8], max: usize) -> Result<Option<Split<'_>>, PrefixError> {
    let Some((len, at)) = parse_prefix(bytes, max)? else {
        return Ok(None);
    };
    let rest = &bytes[at..];
    if rest.len() < len {
        return Ok(None);
    }
    Ok(Some(rest.split_at(len)))
}

/// `body` framed (prefix and body), or an error when it is over `max`.
pub fn frame(body: &[u8], max: usize) -> Result<Vec<u8>, PrefixError> {
    if body.len() > max {
        return Err(PrefixError::TooLong {
            len: body.len() as u64,
            max,
        });
    }
    let mut buf = [0; MAX_PREFIX_LEN];
    let prefix = encode_prefix(body.len(), &mut buf);
    let mut out = Vec::with_capacity(prefix.len() + body.len());
    out.extend_from_slice(prefix);
    out.extend_from_slice(body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_round_trip_and_refuse_what_they_must() {
        for len in [0usize, 1, 127, 128, 300, 16_383, 16_384, 1 << 30] {
            let mut buf = [0; MAX_PREFIX_LEN];
            let p = encode_prefix(len, &mut buf).to_vec();
            assert_eq!(parse_prefix(&p, usize::MAX), Ok(Some((len, p.len()))));
            // Incomplete until its last byte.
            assert_eq!(parse_prefix(&p[..p.len() - 1], usize::MAX), Ok(None));
        }
        let mut buf = [0; MAX_PREFIX_LEN];
        assert_eq!(encode_prefix(300, &mut buf), [0xac, 0x02]);
        assert_eq!(
            parse_prefix(&[0x81, 0x00], 1 << 20),
            Err(PrefixError::NotMinimal)
        );
        assert_eq!(
            parse_prefix(&[0xff; 10], usize::MAX),
            Err(PrefixError::Overflow)
        );
        assert_eq!(
            parse_prefix(
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
                usize::MAX
            ),
            Err(PrefixError::Overflow)
        );
        assert_eq!(
            parse_prefix(&[0x05], 4),
            Err(PrefixError::TooLong { len: 5, max: 4 })
        );
        assert_eq!(split_frame(b"\x05hel", 16), Ok(None));
        assert_eq!(
            split_frame(b"\x05hello!", 16),
            Ok(Some((&b"hello"[..], &b"!"[..])))
        );
        assert_eq!(frame(b"hello", 16).ok(), Some(b"\x05hello".to_vec()));
        assert!(frame(&[0; 17], 16).is_err());
    }
}
