//! Sends held back by a bandwidth limit, in order: the node paces chunk
//! responses (its upload limit) and chunk requests (its download limit)
//! through a [`Pacer`] each.
//!
//! Sans-IO: the pacer holds the items and a [`TokenBucket`]; the caller
//! pushes what it would send, with its size in bytes, and sends what
//! [`pop_ready`](Pacer::pop_ready) gives back, at once and again on a timer.
//! Items leave in the order they came, so a large item is not overtaken
//! forever by small ones; without a limit every item is ready at once.

use std::collections::VecDeque;
use std::time::Instant;

use crate::rate::TokenBucket;

/// A bounded FIFO of items waiting for the bytes a [`TokenBucket`] allows.
#[derive(Debug)]
pub struct Pacer<T> {
    bucket: Option<TokenBucket>,
    queue: VecDeque<(T, u64)>,
    capacity: usize,
}

impl<T> Pacer<T> {
    /// A pacer holding at most `capacity` items, limited by `bucket`
    /// (`None`: no limit).
    pub fn new(bucket: Option<TokenBucket>, capacity: usize) -> Self {
        Pacer {
            bucket,
            queue: VecDeque::new(),
            capacity,
        }
    }

    /// Queues `item` of `bytes` bytes behind those already waiting; gives
    /// it back when the pacer is full.
    pub fn push(&mut self, item: T, bytes: u64) -> Result<(), T> {
        if self.queue.len() >= self.capacity {
            return Err(item);
        }
        self.queue.push_back((item, bytes));
        Ok(())
    }

    /// The first item waiting, if the limit lets its bytes go at `now`
    /// (its bytes are then spent).
    pub fn pop_ready(&mut self, now: Instant) -> Option<T> {
        let (_, bytes) = self.queue.front()?;
        if let Some(b) = self.bucket.as_mut()
            && b.try_take(*bytes, now).is_err()
        {
            return None;
        }
        self.queue.pop_front().map(|(item, _)| item)
    }

    /// Keeps only the items `keep` accepts (e.g. drops those for a peer
    /// that went away, so they do not spend the limit for others).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.queue.retain(|(item, _)| keep(item));
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn without_a_limit_everything_is_ready() {
        let now = Instant::now();
        let mut p = Pacer::new(None, 2);
        assert_eq!(p.push('a', 1 << 30), Ok(()));
        assert_eq!(p.push('b', 1), Ok(()));
        assert_eq!(p.push('c', 1), Err('c'));
        assert_eq!(p.pop_ready(now), Some('a'));
        assert_eq!(p.pop_ready(now), Some('b'));
        assert_eq!(p.pop_ready(now), None);
        assert!(p.is_empty());
    }

    #[test]
    fn items_leave_in_order_as_the_limit_allows() {
        let t0 = Instant::now();
        // 1000 B/s, bursts of 1000 B.
        let mut p = Pacer::new(Some(TokenBucket::new(1000, 1000)), 8);
        for (item, bytes) in [(1, 800), (2, 800), (3, 10)] {
            assert_eq!(p.push(item, bytes), Ok(()));
        }
        assert_eq!(p.pop_ready(t0), Some(1));
        // 200 B left: the second waits, and the small third behind it.
        assert_eq!(p.pop_ready(t0), None);
        assert_eq!(p.len(), 2);
        assert_eq!(p.pop_ready(t0 + Duration::from_millis(500)), None);
        assert_eq!(p.pop_ready(t0 + Duration::from_millis(600)), Some(2));
        assert_eq!(p.pop_ready(t0 + Duration::from_millis(610)), Some(3));
    }

    #[test]
    fn retain_drops_items() {
        let mut p = Pacer::new(None, 8);
        for i in 0..4 {
            assert_eq!(p.push(i, 1), Ok(()));
        }
        p.retain(|i| i % 2 == 0);
        assert_eq!(p.pop_ready(Instant::now()), Some(0));
        assert_eq!(p.pop_ready(Instant::now()), Some(2));
        assert!(p.is_empty());
    }
}
