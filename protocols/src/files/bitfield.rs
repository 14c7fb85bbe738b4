//! Which chunks of a file a node holds: a compact bitfield.
//!
//! Bit `i` is bit `7 - i % 8` of byte `i / 8` (most significant bit first,
//! as in BitTorrent), and the spare bits of the last byte are zero. Encoded
//! as `{ "len": bits, "bits": bytes }`; decoding checks that the byte string
//! is exactly `ceil(len / 8)` bytes, that the spare bits are clear and that
//! `len` is at most [`MAX_CHUNKS`], so a peer
//! cannot hand us a bitfield whose count or iteration lies.

use serde::{Deserialize, Serialize};

use super::manifest::MAX_CHUNKS;

/// Why an encoded bitfield was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BitfieldError {
    /// More bits than a manifest can have chunks.
    #[error("bitfield of {0} bits, more than {MAX_CHUNKS}")]
    TooLong(u64),
    /// The byte string does not have `ceil(len / 8)` bytes.
    #[error("bitfield of {bits} bits carried in {bytes} bytes")]
    LengthMismatch {
        /// The length in bits.
        bits: u64,
        /// The bytes received.
        bytes: usize,
    },
    /// Bits past the end are set.
    #[error("spare bits set after the end of the bitfield")]
    SpareBits,
}

/// A fixed-length set of chunk indices.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawBitfield", into = "RawBitfield")]
pub struct Bitfield {
    len: u64,
    bits: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct RawBitfield {
    len: u64,
    #[serde(with = "serde_bytes")]
    bits: Vec<u8>,
}

impl TryFrom<RawBitfield> for Bitfield {
    type Error = BitfieldError;

    fn try_from(raw: RawBitfield) -> Result<Self, BitfieldError> {
        if raw.len > MAX_CHUNKS {
            return Err(BitfieldError::TooLong(raw.len));
        }
        if raw.bits.len() as u64 != raw.len.div_ceil(8) {
            return Err(BitfieldError::LengthMismatch {
                bits: raw.len,
                bytes: raw.bits.len(),
            });
        }
        let field = Bitfield {
            len: raw.len,
            bits: raw.bits,
        };
        if field.bits.last().copied().unwrap_or(0) & field.spare_mask() != 0 {
            return Err(BitfieldError::SpareBits);
        }
        Ok(field)
    }
}

impl From<Bitfield> for RawBitfield {
    fn from(b: Bitfield) -> Self {
        RawBitfield {
            len: b.len,
            bits: b.bits,
        }
    }
}

impl Bitfield {
    /// An empty set over `len` chunks.
    ///
    /// `len` is a chunk count from a validated manifest (at most
    /// [`MAX_CHUNKS`]); this allocates `len / 8` bytes.
    pub fn new(len: u64) -> Self {
        Bitfield {
            len,
            bits: vec![0; len.div_ceil(8) as usize],
        }
    }

    /// The full set over `len` chunks.
    pub fn full(len: u64) -> Self {
        let mut b = Bitfield {
            len,
            bits: vec![0xff; len.div_ceil(8) as usize],
        };
        let mask = b.spare_mask();
        if let Some(last) = b.bits.last_mut() {
            *last &= !mask;
        }
        b
    }

    /// The bits of the last byte that lie past the end.
    fn spare_mask(&self) -> u8 {
        match self.len % 8 {
            0 => 0,
            used => 0xff >> used,
        }
    }

    /// Byte index and mask of bit `i`, or `None` past the end.
    fn locate(&self, i: u64) -> Option<(usize, u8)> {
        (i < self.len).then(|| ((i / 8) as usize, 0x80 >> (i % 8)))
    }

    /// The number of chunks covered (set or not).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitfield covers no chunk at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether chunk `i` is in the set (`false` past the end).
    pub fn get(&self, i: u64) -> bool {
        self.locate(i)
            .and_then(|(byte, mask)| self.bits.get(byte).map(|b| b & mask != 0))
            .unwrap_or(false)
    }

    /// Adds chunk `i`; returns whether it was newly added (`false` if it was
    /// already there or lies past the end).
    pub fn set(&mut self, i: u64) -> bool {
        let Some((byte, mask)) = self.locate(i) else {
            return false;
        };
        match self.bits.get_mut(byte) {
            Some(b) if *b & mask == 0 => {
                *b |= mask;
                true
            }
            _ => false,
        }
    }

    /// Removes chunk `i`; returns whether it was there.
    pub fn clear(&mut self, i: u64) -> bool {
        let Some((byte, mask)) = self.locate(i) else {
            return false;
        };
        match self.bits.get_mut(byte) {
            Some(b) if *b & mask != 0 => {
                *b &= !mask;
                true
            }
            _ => false,
        }
    }

    /// The number of chunks in the set.
    pub fn count(&self) -> u64 {
        // Spare bits are always zero, so a plain popcount is exact.
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Whether every chunk is in the set.
    pub fn is_full(&self) -> bool {
        self.count() == self.len
    }

    /// The chunks in the set, in increasing order.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter_where(true)
    }

    /// The chunks not in the set, in increasing order.
    pub fn iter_missing(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter_where(false)
    }

    fn iter_where(&self, want: bool) -> impl Iterator<Item = u64> + '_ {
        // Skip whole bytes that cannot contain a match, so iterating the
        // missing chunks of a nearly complete 2^18-chunk file stays cheap.
        let skip = if want { 0x00 } else { 0xff };
        self.bits
            .iter()
            .enumerate()
            .filter(move |&(_, &b)| b != skip)
            .flat_map(move |(byte, &b)| {
                (0..8u64).filter_map(move |bit| {
                    let i = byte as u64 * 8 + bit;
                    let set = b & (0x80 >> bit) != 0;
                    (i < self.len && set == want).then_some(i)
                })
            })
    }

    /// The raw bytes, most significant bit first.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }
}

impl std::fmt::Debug for Bitfield {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bitfield({}/{})", self.count(), self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(b: &Bitfield) -> Result<Bitfield, String> {
        let mut out = Vec::new();
        ciborium::into_writer(b, &mut out).map_err(|e| e.to_string())?;
        ciborium::from_reader(&out[..]).map_err(|e| e.to_string())
    }

    #[test]
    fn set_get_count_and_iterate() {
        let mut b = Bitfield::new(21);
        assert_eq!(b.as_bytes().len(), 3);
        assert!(b.set(0) && b.set(7) && b.set(8) && b.set(20));
        assert!(!b.set(20), "already set");
        assert!(!b.set(21), "past the end");
        assert!(!b.get(21));
        assert!(b.get(7) && !b.get(6));
        assert_eq!(b.count(), 4);
        assert_eq!(b.as_bytes(), &[0x81, 0x80, 0x08]);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![0, 7, 8, 20]);
        assert_eq!(b.iter_missing().count(), 17);
        assert!(!b.iter_missing().any(|i| b.get(i)));
        assert!(b.clear(7) && !b.clear(7));
        assert_eq!(b.count(), 3);
        let full = Bitfield::full(21);
        assert!(full.is_full());
        assert_eq!(full.count(), 21);
        assert_eq!(full.iter_missing().next(), None);
        assert_eq!(full.as_bytes()[2], 0xf8);
        assert!(Bitfield::new(0).is_full() && Bitfield::new(0).is_empty());
    }

    #[test]
    fn encoding_roundtrips_and_is_compact() {
        let mut b = Bitfield::new(MAX_CHUNKS);
        for i in (0..MAX_CHUNKS).step_by(3) {
            b.set(i);
        }
        assert_eq!(roundtrip(&b).ok(), Some(b.clone()));
        let mut out = Vec::new();
        assert!(ciborium::into_writer(&b, &mut out).is_ok());
        assert!(out.len() < (MAX_CHUNKS / 8) as usize + 32);
    }

    #[test]
    fn decoding_checks_length_and_spare_bits() {
        let raw = |len, bits: Vec<u8>| Bitfield::try_from(RawBitfield { len, bits });
        assert!(raw(9, vec![0xff, 0x80]).is_ok());
        assert_eq!(raw(9, vec![0xff, 0x40]), Err(BitfieldError::SpareBits));
        assert_eq!(
            raw(9, vec![0xff]),
            Err(BitfieldError::LengthMismatch { bits: 9, bytes: 1 })
        );
        assert_eq!(
            raw(8, vec![0, 0]),
            Err(BitfieldError::LengthMismatch { bits: 8, bytes: 2 })
        );
        assert_eq!(
            raw(MAX_CHUNKS + 1, vec![]),
            Err(BitfieldError::TooLong(MAX_CHUNKS + 1))
        );
        assert_eq!(raw(0, vec![]).map(|b| b.len()), Ok(0));
    }
}
