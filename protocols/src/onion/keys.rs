//! A node's mix secrets, one X25519 key per epoch.
//!
//! The key of the current epoch is the one its descriptor announces; the
//! previous epoch's key is kept for a grace period after the change (for
//! packets built just before it and still on their way), then deleted
//! (zeroized on drop). That, with Noise on each link, is the route's
//! forward secrecy: once an epoch's secret is gone, its packets cannot be
//! opened even with the node's identity key.

use x25519_dalek::{PublicKey, StaticSecret};

/// Epoch length by default, ms (one hour).
pub const DEFAULT_EPOCH_MS: u64 = 3_600_000;
/// How long the previous epoch's secret is kept after the change, ms.
pub const GRACE_MS: u64 = 10 * 60_000;

/// One epoch's key.
pub struct EpochKey {
    /// The epoch.
    pub epoch: u64,
    /// The secret.
    pub secret: StaticSecret,
}

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochKey")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// The current key and, during the grace period, the previous one.
pub struct MixKeys {
    epoch_ms: u64,
    current: EpochKey,
    previous: Option<EpochKey>,
    fresh: Box<dyn FnMut() -> StaticSecret + Send>,
}

impl std::fmt::Debug for MixKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MixKeys")
            .field("epoch_ms", &self.epoch_ms)
            .field("current", &self.current)
            .field("previous", &self.previous)
            .finish_non_exhaustive()
    }
}

impl MixKeys {
    /// Keys with epochs of `epoch_ms` (at least one second), starting at
    /// `now`, fresh secrets drawn from the OS.
    pub fn new(epoch_ms: u64, now_ms: u64) -> Self {
        Self::with_source(epoch_ms, now_ms, Box::new(StaticSecret::random))
    }

    /// As [`Self::new`] with a given source of secrets (tests, the
    /// simulator).
    pub fn with_source(
        epoch_ms: u64,
        now_ms: u64,
        mut fresh: Box<dyn FnMut() -> StaticSecret + Send>,
    ) -> Self {
        let epoch_ms = epoch_ms.max(1_000);
        MixKeys {
            epoch_ms,
            current: EpochKey {
                epoch: now_ms / epoch_ms,
                secret: fresh(),
            },
            previous: None,
            fresh,
        }
    }

    /// Moves to `now`'s epoch if it changed (a new key; the old one kept
    /// for [`GRACE_MS`]) and deletes the previous key once its grace has
    /// passed. Returns true when the current key changed (publish a new
    /// descriptor).
    pub fn rotate(&mut self, now_ms: u64) -> bool {
        let epoch = now_ms / self.epoch_ms;
        let mut changed = false;
        if epoch > self.current.epoch {
            let new = EpochKey {
                epoch,
                secret: (self.fresh)(),
            };
            let old = std::mem::replace(&mut self.current, new);
            // Only the epoch just ended keeps a grace period; anything
            // older is dropped (and zeroized) here.
            self.previous = (old.epoch + 1 == epoch).then_some(old);
            changed = true;
        }
        let start = self.current.epoch.saturating_mul(self.epoch_ms);
        if now_ms >= start.saturating_add(GRACE_MS) {
            self.previous = None;
        }
        changed
    }

    /// The current epoch and its public key.
    pub fn current(&self) -> (u64, [u8; 32]) {
        (
            self.current.epoch,
            PublicKey::from(&self.current.secret).to_bytes(),
        )
    }

    /// The window the current key's descriptor announces: its epoch and
    /// the grace period after it.
    pub fn validity(&self) -> (u64, u64) {
        let start = self.current.epoch.saturating_mul(self.epoch_ms);
        (
            start,
            start.saturating_add(self.epoch_ms).saturating_add(GRACE_MS),
        )
    }

    /// The keys a packet may have been built for, current first.
    pub fn secrets(&self) -> impl Iterator<Item = &EpochKey> {
        std::iter::once(&self.current).chain(self.previous.as_ref())
    }

    /// When the next change is due (epoch change or end of grace), ms.
    pub fn next_change_ms(&self) -> u64 {
        let start = self.current.epoch.saturating_mul(self.epoch_ms);
        let end = start.saturating_add(self.epoch_ms);
        if self.previous.is_some() {
            start.saturating_add(GRACE_MS).min(end)
        } else {
            end
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_rotate_per_epoch_and_old_secrets_are_deleted() {
        let mut n = 0u8;
        let mut k = MixKeys::with_source(
            DEFAULT_EPOCH_MS,
            10,
            Box::new(move || {
                n += 1;
                StaticSecret::from([n; 32])
            }),
        );
        let (e0, p0) = k.current();
        assert_eq!(e0, 0);
        assert!(!k.rotate(1_000));
        assert!(k.rotate(DEFAULT_EPOCH_MS + 5));
        let (e1, p1) = k.current();
        assert_eq!(e1, 1);
        assert_ne!(p0, p1);
        // During the grace period both keys open packets.
        assert_eq!(k.secrets().map(|s| s.epoch).collect::<Vec<_>>(), [1, 0]);
        assert!(!k.rotate(DEFAULT_EPOCH_MS + GRACE_MS));
        assert_eq!(k.secrets().map(|s| s.epoch).collect::<Vec<_>>(), [1]);
        // Skipping epochs keeps no stale key.
        assert!(k.rotate(5 * DEFAULT_EPOCH_MS + 1));
        assert_eq!(k.secrets().map(|s| s.epoch).collect::<Vec<_>>(), [5]);
        let (from, until) = k.validity();
        assert_eq!(from, 5 * DEFAULT_EPOCH_MS);
        assert_eq!(until, 6 * DEFAULT_EPOCH_MS + GRACE_MS);
    }
}
