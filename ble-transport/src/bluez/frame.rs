//! The framing of the GATT data path.
//!
//! Every write to a peer's DATA characteristic (`DATA_CHAR_UUID` of the BlueZ backend)
//! carries one frame:
//!
//! ```text
//! 0      kind: bits 0..7 = OPEN (1), DATA (2) or CLOSE (3);
//!        bit 7 (0x80) = sent by the side that accepted the link
//! 1..5   link id, u32 big-endian, chosen by the side that opened the link
//! 5..    payload (DATA only; ignored in OPEN and CLOSE)
//! ```
//!
//! A link is named by (remote device, which side opened it, link id), so the
//! ids that the two sides of a pair of devices choose for their own dials
//! never collide. The whole value is at most [`MAX_VALUE`] bytes (the ATT
//! limit of an attribute value), so a DATA frame carries at most
//! `MAX_VALUE - HEADER_LEN` bytes.

/// Bytes before the payload.
pub const HEADER_LEN: usize = 5;
/// Largest value of one write (ATT's limit on an attribute value).
pub const MAX_VALUE: usize = 512;
/// Value size assumed when the ATT MTU is unknown: what fits in one LE
/// data packet with Data Length Extension.
pub const DEFAULT_VALUE: usize = 244;
/// Bit of the kind byte set by the side that accepted the link.
pub const FROM_ACCEPTOR: u8 = 0x80;

/// What a frame does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Opens a link (sent by the dialer only).
    Open,
    /// Carries bytes of a link.
    Data,
    /// The sender will send no more bytes on this link.
    Close,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Open => 1,
            Kind::Data => 2,
            Kind::Close => 3,
        }
    }
}

/// One frame, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What it does.
    pub kind: Kind,
    /// Whether the sender is the side that accepted the link.
    pub from_acceptor: bool,
    /// The link, numbered by the side that opened it.
    pub link: u32,
    /// The bytes carried (DATA).
    pub payload: &'a [u8],
}

/// Bytes that are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than the header.
    #[error("GATT frame too short ({0} bytes, need {HEADER_LEN})")]
    TooShort(usize),
    /// Longer than an attribute value can be.
    #[error("GATT frame too long ({0} bytes, at most {MAX_VALUE})")]
    TooLong(usize),
    /// An unknown kind.
    #[error("unknown GATT frame kind {0:#04x}")]
    Kind(u8),
    /// OPEN from the accepting side, which is meaningless.
    #[error("OPEN frame sent by the accepting side")]
    OpenFromAcceptor,
}

impl Frame<'_> {
    /// The bytes of the write.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN + self.payload.len());
        let dir = if self.from_acceptor { FROM_ACCEPTOR } else { 0 };
        v.push(self.kind.code() | dir);
        v.extend_from_slice(&self.link.to_be_bytes());
        v.extend_from_slice(self.payload);
        v
    }

    /// Parses the value of a write. Never panics, whatever the bytes.
    pub fn decode(b: &[u8]) -> Result<Frame<'_>, FrameError> {
        if b.len() < HEADER_LEN {
            return Err(FrameError::TooShort(b.len()));
        }
        if b.len() > MAX_VALUE {
            return Err(FrameError::TooLong(b.len()));
        }
        let kind = match b[0] & !FROM_ACCEPTOR {
            1 => Kind::Open,
            2 => Kind::Data,
            3 => Kind::Close,
            _ => return Err(FrameError::Kind(b[0])),
        };
        let from_acceptor = b[0] & FROM_ACCEPTOR != 0;
        if kind == Kind::Open && from_acceptor {
            return Err(FrameError::OpenFromAcceptor);
        }
        let link = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
        let payload = match kind {
            Kind::Data => &b[HEADER_LEN..],
            Kind::Open | Kind::Close => &[],
        };
        Ok(Frame {
            kind,
            from_acceptor,
            link,
            payload,
        })
    }
}

/// The largest DATA payload for writes of at most `value_len` bytes (the
/// usable attribute value size of the connection, when known): never more
/// than `MAX_VALUE - HEADER_LEN`, and `DEFAULT_VALUE - HEADER_LEN` when
/// unknown or implausibly small.
pub fn max_payload(value_len: Option<usize>) -> usize {
    let v = value_len
        .filter(|v| *v >= 20 + HEADER_LEN)
        .unwrap_or(DEFAULT_VALUE)
        .min(MAX_VALUE);
    v - HEADER_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for kind in [Kind::Open, Kind::Data, Kind::Close] {
            for from_acceptor in [false, true] {
                if kind == Kind::Open && from_acceptor {
                    continue;
                }
                let payload: &[u8] = if kind == Kind::Data { b"hello" } else { b"" };
                let f = Frame {
                    kind,
                    from_acceptor,
                    link: 0xdead_beef,
                    payload,
                };
                let bytes = f.encode();
                assert_eq!(bytes.len(), HEADER_LEN + payload.len());
                assert_eq!(Frame::decode(&bytes), Ok(f));
            }
        }
        assert_eq!(
            Frame {
                kind: Kind::Data,
                from_acceptor: true,
                link: 7,
                payload: b"x",
            }
            .encode(),
            vec![0x82, 0, 0, 0, 7, b'x']
        );
    }

    #[test]
    fn garbage_never_panics() {
        assert_eq!(Frame::decode(&[]), Err(FrameError::TooShort(0)));
        assert_eq!(Frame::decode(&[2, 0, 0]), Err(FrameError::TooShort(3)));
        assert_eq!(Frame::decode(&[0, 0, 0, 0, 1]), Err(FrameError::Kind(0)));
        assert_eq!(
            Frame::decode(&[0x7f, 0, 0, 0, 1]),
            Err(FrameError::Kind(0x7f))
        );
        assert_eq!(
            Frame::decode(&[0x81, 0, 0, 0, 1]),
            Err(FrameError::OpenFromAcceptor)
        );
        assert_eq!(
            Frame::decode(&[2; MAX_VALUE + 1]),
            Err(FrameError::TooLong(MAX_VALUE + 1))
        );
        // OPEN and CLOSE ignore trailing bytes (room for later versions).
        let f = Frame::decode(&[1, 0, 0, 0, 9, 1, 2, 3]).expect("an OPEN");
        assert_eq!((f.kind, f.link, f.payload), (Kind::Open, 9, &[][..]));
        // Pseudo-random bytes of every length up to past the limit.
        let mut x: u32 = 0x1234_5678;
        for len in 0..600usize {
            for _ in 0..8 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        (x >> 24) as u8
                    })
                    .collect();
                if let Ok(f) = Frame::decode(&bytes) {
                    assert!(f.payload.len() <= MAX_VALUE - HEADER_LEN);
                    if f.kind == Kind::Data {
                        assert_eq!(f.encode(), bytes);
                    }
                }
            }
        }
    }

    #[test]
    fn payload_limits() {
        assert_eq!(max_payload(None), DEFAULT_VALUE - HEADER_LEN);
        assert_eq!(max_payload(Some(0)), DEFAULT_VALUE - HEADER_LEN);
        assert_eq!(max_payload(Some(3)), DEFAULT_VALUE - HEADER_LEN);
        assert_eq!(max_payload(Some(100)), 100 - HEADER_LEN);
        assert_eq!(max_payload(Some(507)), 507 - HEADER_LEN);
        assert_eq!(max_payload(Some(65_535)), MAX_VALUE - HEADER_LEN);
    }
}
