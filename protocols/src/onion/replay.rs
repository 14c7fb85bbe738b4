//! The replay filter: a relay refuses a packet whose replay tag it has
//! seen in the same key epoch.
//!
//! A Bloom filter over the 32-byte tags Sphinx derives from each hop's
//! shared secret (pseudorandom, so slices of the tag serve as the hash
//! functions). One filter per key epoch: a packet built for another key
//! has another tag, and the filter is dropped with its key. Memory is
//! fixed (2 MiB); false positives (a fresh packet taken for a replay and
//! dropped, recovered by the sender's retry) stay below 0.1 % up to
//! [`CAPACITY`] packets per epoch, and grow beyond.

/// Bits of one filter (2 MiB).
pub const BITS: usize = 1 << 24;
/// Hash functions (slices of the tag).
const K: usize = 7;
/// Packets per epoch the false positive rate is sized for.
pub const CAPACITY: usize = 1_000_000;

/// One epoch's filter.
#[derive(Clone)]
pub struct ReplayFilter {
    bits: Vec<u64>,
    inserted: usize,
}

impl std::fmt::Debug for ReplayFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayFilter")
            .field("inserted", &self.inserted)
            .finish()
    }
}

impl Default for ReplayFilter {
    fn default() -> Self {
        ReplayFilter {
            bits: vec![0; BITS / 64],
            inserted: 0,
        }
    }
}

impl ReplayFilter {
    fn positions(tag: &[u8; 32]) -> [usize; K] {
        let mut out = [0usize; K];
        for (i, p) in out.iter_mut().enumerate() {
            // Overlapping 4-byte windows of the tag, masked to the size.
            let w = [tag[i * 4], tag[i * 4 + 1], tag[i * 4 + 2], tag[i * 4 + 3]];
            *p = (u32::from_le_bytes(w) as usize) & (BITS - 1);
        }
        out
    }

    /// Records `tag`; false when it was (probably) seen before: a replay.
    pub fn insert(&mut self, tag: &[u8; 32]) -> bool {
        let pos = Self::positions(tag);
        let seen = pos
            .iter()
            .all(|p| self.bits[p / 64] & (1u64 << (p % 64)) != 0);
        if seen {
            return false;
        }
        for p in pos {
            self.bits[p / 64] |= 1u64 << (p % 64);
        }
        self.inserted += 1;
        true
    }

    /// Tags recorded.
    pub fn len(&self) -> usize {
        self.inserted
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.inserted == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn a_tag_is_fresh_once() {
        let mut f = ReplayFilter::default();
        let mut false_positives = 0;
        for i in 0u32..20_000 {
            let mut t = [0u8; 32];
            t.copy_from_slice(&Sha256::digest(i.to_le_bytes()));
            if !f.insert(&t) {
                false_positives += 1;
            }
            assert!(!f.insert(&t), "a replayed tag is caught");
        }
        assert_eq!(false_positives, 0);
        assert_eq!(f.len(), 20_000);
    }
}
