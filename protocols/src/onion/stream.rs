//! The frames of a `/fogmesh/mix/1` stream: `kind (1 byte) || length (4
//! bytes, big endian) || body`. Kind 1 is one packet (exactly
//! [`PACKET_SIZE`] bytes), kind 2 a batch of descriptors (`length (2
//! bytes) || descriptor` each, at most [`MAX_BATCH`] bytes), kind 3 a
//! request for the descriptors the other side knows (no body). A reader
//! checks the header with [`Head::parse`] before it reads the body into
//! memory; anything else ends the stream.

use super::PACKET_SIZE;
use super::descriptor::MAX_DESCRIPTOR;
use super::sharing::SHARE_MAX;

/// Bytes of a frame header.
pub const HEADER: usize = 5;
/// Frame kind: one packet.
pub const PACKET: u8 = 1;
/// Frame kind: a batch of descriptors.
pub const DESCRIPTORS: u8 = 2;
/// Frame kind: a request for the descriptors the other side knows.
pub const WANT: u8 = 3;
/// Largest descriptor batch body, bytes.
pub const MAX_BATCH: usize = SHARE_MAX * (MAX_DESCRIPTOR + 2);

/// A frame header that passed its checks: what the body is and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// A packet ([`PACKET_SIZE`] bytes follow).
    Packet,
    /// A descriptor batch of this many bytes.
    Descriptors(usize),
    /// A request for descriptors (nothing follows).
    Want,
}

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad frame (kind {kind}, {len} bytes)")]
pub struct BadFrame {
    /// The kind byte.
    pub kind: u8,
    /// The length the header gave.
    pub len: usize,
}

impl Head {
    /// Checks a header: a known kind with a length it allows.
    pub fn parse(head: [u8; HEADER]) -> Result<Head, BadFrame> {
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        match head[0] {
            PACKET if len == PACKET_SIZE => Ok(Head::Packet),
            DESCRIPTORS if len <= MAX_BATCH => Ok(Head::Descriptors(len)),
            WANT if len == 0 => Ok(Head::Want),
            kind => Err(BadFrame { kind, len }),
        }
    }

    /// Bytes of body that follow the header.
    pub fn body_len(self) -> usize {
        match self {
            Head::Packet => PACKET_SIZE,
            Head::Descriptors(n) => n,
            Head::Want => 0,
        }
    }
}

/// A packet frame.
pub fn packet_frame(packet: &[u8]) -> Vec<u8> {
    frame(PACKET, packet)
}

/// A request for the neighbour's descriptors.
pub fn want_frame() -> Vec<u8> {
    frame(WANT, &[])
}

/// A descriptor batch frame (descriptors too large, or beyond the batch's
/// limit, are left out).
pub fn descriptors_frame<'a>(list: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut body = Vec::new();
    for d in list {
        if d.len() > MAX_DESCRIPTOR || body.len() + 2 + d.len() > MAX_BATCH {
            continue;
        }
        body.extend_from_slice(&(d.len() as u16).to_be_bytes());
        body.extend_from_slice(d);
    }
    frame(DESCRIPTORS, &body)
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER + body.len());
    f.push(kind);
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// Splits a descriptor batch body; `None` when it is malformed (an entry
/// longer than [`MAX_DESCRIPTOR`] or cut short).
pub fn split_batch(mut body: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let [a, b, rest @ ..] = body else {
            return None;
        };
        let n = usize::from(u16::from_be_bytes([*a, *b]));
        if n > MAX_DESCRIPTOR || rest.len() < n {
            return None;
        }
        out.push(rest[..n].to_vec());
        body = &rest[n..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(f: &[u8]) -> Result<Head, BadFrame> {
        Head::parse(f[..HEADER].try_into().expect("a header"))
    }

    #[test]
    fn descriptor_batches_round_trip_and_bad_ones_are_refused() {
        let a = vec![1u8; 100];
        let b = vec![2u8; 300];
        let f = descriptors_frame([a.as_slice(), b.as_slice()].into_iter());
        assert_eq!(head(&f), Ok(Head::Descriptors(404)));
        assert_eq!(split_batch(&f[HEADER..]), Some(vec![a, b]));
        assert_eq!(split_batch(&[0, 5, 1]), None);
        assert_eq!(split_batch(&[0xff, 0xff]), None);
        assert_eq!(split_batch(&[]), Some(vec![]));
        // Too large a descriptor is left out, not sent.
        let big = vec![3u8; MAX_DESCRIPTOR + 1];
        let f = descriptors_frame(std::iter::once(big.as_slice()));
        assert_eq!(head(&f), Ok(Head::Descriptors(0)));
    }

    #[test]
    fn headers_are_checked_before_any_body_is_read() {
        assert_eq!(head(&want_frame()), Ok(Head::Want));
        assert_eq!(want_frame().len(), HEADER);
        assert_eq!(head(&packet_frame(&[0; PACKET_SIZE])), Ok(Head::Packet));
        // A packet of another size, a request with a body, a batch too
        // large, an unknown kind.
        assert!(head(&packet_frame(&[0; 10])).is_err());
        assert!(head(&[WANT, 0, 0, 0, 1]).is_err());
        let too_big = ((MAX_BATCH + 1) as u32).to_be_bytes();
        assert!(head(&[DESCRIPTORS, too_big[0], too_big[1], too_big[2], too_big[3]]).is_err());
        assert_eq!(head(&[9, 0, 0, 0, 0]), Err(BadFrame { kind: 9, len: 0 }));
    }
}
