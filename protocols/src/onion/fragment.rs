//! Messages above one packet: split into fragments, reassembled at the
//! recipient.
//!
//! A message (the encoded envelope) is cut into chunks of at most
//! [`CHUNK`] bytes, each sent as a [`super::Piece::Fragment`] `{message id,
//! index, count, chunk}` in a packet of its own, over a path of its own.
//! The recipient keeps partial messages in bounded memory
//! ([`MAX_PARTIAL`] messages, [`MAX_PARTIAL_BYTES`] bytes, each for at most
//! [`REASSEMBLY_MS`]) and returns a message once every chunk is in.

use std::collections::{HashMap, VecDeque};

use libp2p_identity::PeerId;

/// Largest chunk of one fragment: leaves room in the 2048-byte plaintext
/// for the fragment's framing and a reply block.
pub const CHUNK: usize = 1400;
/// Most fragments of one message.
pub const MAX_FRAGMENTS: usize = 64;
/// Largest message, bytes.
pub const MAX_MESSAGE: usize = CHUNK * MAX_FRAGMENTS;
/// Partial messages kept at once; beyond, the oldest is dropped.
pub const MAX_PARTIAL: usize = 256;
/// Bytes of partial messages kept at once; beyond, the oldest is dropped.
pub const MAX_PARTIAL_BYTES: usize = 8 * 1024 * 1024;
/// How long a partial message waits for its other fragments, ms.
pub const REASSEMBLY_MS: u64 = 120_000;
/// Completed message ids remembered (late duplicates ignored).
const DONE_KEPT: usize = 1024;

/// The message is larger than [`MAX_MESSAGE`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("message of {0} bytes exceeds the onion route's limit of {MAX_MESSAGE}")]
pub struct TooLarge(pub usize);

/// Splits `data` into at most [`MAX_FRAGMENTS`] chunks (at least one).
pub fn split(data: &[u8]) -> Result<Vec<&[u8]>, TooLarge> {
    if data.len() > MAX_MESSAGE {
        return Err(TooLarge(data.len()));
    }
    if data.is_empty() {
        return Ok(vec![data]);
    }
    Ok(data.chunks(CHUNK).collect())
}

/// A reply block and the peer it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    /// The SURB's bytes.
    pub surb: Vec<u8>,
    /// Whose it is.
    pub peer: PeerId,
}

/// A reassembled message and the reply block its first fragment carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Complete {
    /// The message.
    pub data: Vec<u8>,
    /// The SURB for the acknowledgement, if any.
    pub surb: Option<ReplyTo>,
}

#[derive(Debug)]
struct Partial {
    chunks: Vec<Option<Vec<u8>>>,
    surb: Option<ReplyTo>,
    bytes: usize,
    since_ms: u64,
}

/// Partial messages by id.
#[derive(Debug, Default)]
pub struct Reassembler {
    partial: HashMap<[u8; 16], Partial>,
    order: VecDeque<[u8; 16]>,
    bytes: usize,
    done: VecDeque<[u8; 16]>,
}

impl Reassembler {
    /// Adds fragment `index` of `count` of message `id`; returns the whole
    /// message when this was its last missing fragment. Inconsistent or
    /// out-of-range fragments are ignored.
    pub fn insert(
        &mut self,
        id: [u8; 16],
        index: u16,
        count: u16,
        chunk: Vec<u8>,
        surb: Option<ReplyTo>,
        now_ms: u64,
    ) -> Option<Complete> {
        let (i, n) = (usize::from(index), usize::from(count));
        if n == 0 || n > MAX_FRAGMENTS || i >= n || chunk.len() > CHUNK {
            return None;
        }
        if self.done.contains(&id) {
            return None;
        }
        self.expire(now_ms);
        if n == 1 {
            self.finished(id);
            return Some(Complete { data: chunk, surb });
        }
        if !self.partial.contains_key(&id) {
            while self.partial.len() >= MAX_PARTIAL || self.bytes + chunk.len() > MAX_PARTIAL_BYTES
            {
                let Some(old) = self.order.pop_front() else {
                    break;
                };
                if let Some(p) = self.partial.remove(&old) {
                    self.bytes -= p.bytes;
                }
            }
            self.partial.insert(
                id,
                Partial {
                    chunks: vec![None; n],
                    surb: None,
                    bytes: 0,
                    since_ms: now_ms,
                },
            );
            self.order.push_back(id);
        }
        let p = self.partial.get_mut(&id)?;
        if p.chunks.len() != n || p.chunks[i].is_some() {
            return None;
        }
        // Every chunk but the last is full: anything else is not ours.
        if i + 1 < n && chunk.len() != CHUNK {
            return None;
        }
        p.bytes += chunk.len();
        self.bytes += chunk.len();
        p.chunks[i] = Some(chunk);
        if surb.is_some() && p.surb.is_none() {
            p.surb = surb;
        }
        if p.chunks.iter().any(Option::is_none) {
            return None;
        }
        let p = self.partial.remove(&id)?;
        self.bytes -= p.bytes;
        self.order.retain(|x| *x != id);
        self.finished(id);
        Some(Complete {
            data: p.chunks.into_iter().flatten().flatten().collect(),
            surb: p.surb,
        })
    }

    fn finished(&mut self, id: [u8; 16]) {
        if self.done.len() >= DONE_KEPT {
            self.done.pop_front();
        }
        self.done.push_back(id);
    }

    /// Drops partial messages older than [`REASSEMBLY_MS`].
    pub fn expire(&mut self, now_ms: u64) {
        while let Some(id) = self.order.front().copied() {
            let old = self
                .partial
                .get(&id)
                .is_none_or(|p| now_ms.saturating_sub(p.since_ms) >= REASSEMBLY_MS);
            if !old {
                break;
            }
            self.order.pop_front();
            if let Some(p) = self.partial.remove(&id) {
                self.bytes -= p.bytes;
            }
        }
    }

    /// Partial messages held.
    pub fn len(&self) -> usize {
        self.partial.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_message_is_split_and_reassembled_in_any_order_once() {
        let data: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let parts = split(&data).expect("fits");
        assert_eq!(parts.len(), 70_000usize.div_ceil(CHUNK));
        let n = parts.len() as u16;
        let mut r = Reassembler::default();
        let mut out = None;
        for (i, c) in parts.iter().enumerate().rev() {
            let surb = (i == 0).then(|| ReplyTo {
                surb: vec![9; 10],
                peer: PeerId::random(),
            });
            let got = r.insert([1; 16], i as u16, n, c.to_vec(), surb, 5);
            if i > 0 {
                assert!(got.is_none());
                // A duplicate fragment changes nothing.
                assert!(
                    r.insert([1; 16], i as u16, n, c.to_vec(), None, 5)
                        .is_none()
                );
            } else {
                out = got;
            }
        }
        let out = out.expect("complete");
        assert_eq!(out.data, data);
        assert_eq!(out.surb.map(|s| s.surb), Some(vec![9; 10]));
        assert!(r.is_empty() && r.bytes() == 0);
        // A late duplicate of a finished message is ignored.
        assert!(
            r.insert([1; 16], 0, n, parts[0].to_vec(), None, 6)
                .is_none()
        );
        assert!(r.is_empty());
    }

    #[test]
    fn limits_hold() {
        assert_eq!(
            split(&vec![0; MAX_MESSAGE + 1]),
            Err(TooLarge(MAX_MESSAGE + 1))
        );
        assert_eq!(split(&[]).expect("empty").len(), 1);
        let mut r = Reassembler::default();
        assert!(r.insert([2; 16], 3, 3, vec![0; 10], None, 0).is_none());
        assert!(r.insert([2; 16], 0, 0, vec![0; 10], None, 0).is_none());
        assert!(r.insert([2; 16], 0, 65, vec![0; 10], None, 0).is_none());
        assert!(
            r.insert([2; 16], 0, 2, vec![0; CHUNK + 1], None, 0)
                .is_none()
        );
        assert!(r.is_empty());
        // Partial messages are bounded in number and expire.
        for i in 0..(MAX_PARTIAL + 10) {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            r.insert(id, 0, 2, vec![0; CHUNK], None, 10);
        }
        assert_eq!(r.len(), MAX_PARTIAL);
        r.expire(10 + REASSEMBLY_MS);
        assert!(r.is_empty() && r.bytes() == 0);
    }
}
