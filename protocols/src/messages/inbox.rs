//! The recipient's order of one sender's messages.
//!
//! Each sender numbers its messages to a recipient 1, 2, 3, ... and says in
//! every letter which numbers below it need no waiting for (the *floor*:
//! delivered, or given up after expiry). The recipient delivers in number
//! order: a letter whose predecessors are missing is held (durably, by the
//! node) until they arrive or the floor passes them; a number already
//! delivered or held is a duplicate (answered with a receipt again, never
//! shown twice). At most [`MAX_HELD`] letters are held per sender; beyond
//! that new out-of-order letters are refused and the sender retries.

use std::collections::BTreeSet;

/// Most out-of-order letters held per sender.
pub const MAX_HELD: usize = 256;

/// What became of an arriving letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// Already delivered or held: acknowledge again, show nothing.
    Duplicate,
    /// Kept until the letters before it arrive.
    Held,
    /// These sequence numbers (possibly including held ones and the new
    /// one) are now deliverable, in this order.
    Deliver(Vec<u64>),
    /// Too many held letters from this sender: not kept, not acknowledged.
    Full,
}

/// One sender's state at the recipient.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inbox {
    /// Every number up to this one is delivered (or given up by the sender).
    pub through: u64,
    /// Numbers held, all above `through + 1`.
    pub held: BTreeSet<u64>,
}

impl Inbox {
    /// Restores the state the node persisted.
    pub fn new(through: u64, held: impl IntoIterator<Item = u64>) -> Self {
        Inbox {
            through,
            held: held.into_iter().filter(|s| *s > through).collect(),
        }
    }

    /// A letter numbered `seq` with the sender's `floor` arrives.
    pub fn arrive(&mut self, seq: u64, floor: u64) -> Arrival {
        if seq == 0 || seq <= self.through || self.held.contains(&seq) {
            return Arrival::Duplicate;
        }
        // A floor above the letter itself is a sender's mistake: it cannot
        // have given up a number it is sending now.
        let floor = floor.min(seq);
        let mut out = Vec::new();
        // The sender gave up everything below its floor: deliver what is
        // held there, in order, and stop waiting for the rest.
        if floor > self.through + 1 {
            while let Some(&s) = self.held.first() {
                if s >= floor {
                    break;
                }
                self.held.pop_first();
                out.push(s);
            }
            self.through = floor - 1;
        }
        if seq != self.through + 1 && self.held.len() >= MAX_HELD {
            return if out.is_empty() {
                Arrival::Full
            } else {
                Arrival::Deliver(out)
            };
        }
        self.held.insert(seq);
        while self.held.first() == Some(&(self.through + 1)) {
            self.held.pop_first();
            self.through += 1;
            out.push(self.through);
        }
        if out.is_empty() {
            Arrival::Held
        } else {
            Arrival::Deliver(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_letters_are_delivered_at_once() {
        let mut i = Inbox::default();
        assert_eq!(i.arrive(1, 1), Arrival::Deliver(vec![1]));
        assert_eq!(i.arrive(2, 1), Arrival::Deliver(vec![2]));
        assert_eq!(i.through, 2);
    }

    #[test]
    fn a_gap_holds_later_letters_until_it_fills() {
        let mut i = Inbox::default();
        assert_eq!(i.arrive(2, 1), Arrival::Held);
        assert_eq!(i.arrive(3, 1), Arrival::Held);
        assert_eq!(i.arrive(1, 1), Arrival::Deliver(vec![1, 2, 3]));
        assert!(i.held.is_empty());
    }

    #[test]
    fn duplicates_are_never_delivered_twice() {
        let mut i = Inbox::default();
        assert_eq!(i.arrive(1, 1), Arrival::Deliver(vec![1]));
        assert_eq!(i.arrive(1, 1), Arrival::Duplicate);
        assert_eq!(i.arrive(3, 1), Arrival::Held);
        assert_eq!(i.arrive(3, 1), Arrival::Duplicate);
        assert_eq!(i.arrive(0, 0), Arrival::Duplicate);
    }

    #[test]
    fn the_floor_skips_what_the_sender_gave_up() {
        let mut i = Inbox::default();
        assert_eq!(i.arrive(3, 1), Arrival::Held);
        // 1 and 2 expired at the sender; 5 says so (floor 3), which
        // releases 3, while 4 is still on its way.
        assert_eq!(i.arrive(5, 3), Arrival::Deliver(vec![3]));
        assert_eq!(i.through, 3);
        assert_eq!(i.arrive(4, 3), Arrival::Deliver(vec![4, 5]));
        // A floor above the letter is clamped.
        assert_eq!(i.arrive(7, 100), Arrival::Deliver(vec![7]));
    }

    #[test]
    fn held_letters_are_bounded() {
        let mut i = Inbox::default();
        for s in 0..MAX_HELD as u64 {
            assert_eq!(i.arrive(s + 2, 1), Arrival::Held);
        }
        assert_eq!(i.arrive(MAX_HELD as u64 + 10, 1), Arrival::Full);
        // The missing first one still gets in and releases them all.
        match i.arrive(1, 1) {
            Arrival::Deliver(v) => assert_eq!(v.len(), MAX_HELD + 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn restored_state_drops_stale_held_numbers() {
        let i = Inbox::new(5, [3, 7]);
        assert_eq!(i.held.iter().copied().collect::<Vec<_>>(), vec![7]);
    }
}
