//! When a node asks a neighbour for the descriptors it knows, and when it
//! answers such a request.
//!
//! Every new connection carries each side's own descriptor (some 185
//! bytes). The list of what a node knows (up to [`SHARE_MAX`] descriptors,
//! about 24 KB at 128) goes only to a neighbour that asks for it, and a
//! node asks only while it has had fewer than [`WANT_LISTS`] lists in the
//! last [`LIST_FRESH_MS`]: a node starting asks its first few neighbours,
//! then learns new descriptors as they flood. Sending the whole list both
//! ways on every connection (as before) cost a Kademlia walk's hundred
//! short-lived connections a list each, most of it already known.
//!
//! A neighbour that asks is answered at most once per [`ANSWER_EVERY_MS`]:
//! a hostile peer cannot make a node send its list in a loop.

use std::collections::{HashMap, VecDeque};

use libp2p_identity::PeerId;

/// Descriptors in one list.
pub const SHARE_MAX: usize = 128;
/// Lists a node wants within [`LIST_FRESH_MS`].
pub const WANT_LISTS: usize = 3;
/// How long a list received counts, ms.
pub const LIST_FRESH_MS: u64 = 30 * 60_000;
/// How long a request waits for its list before another neighbour is
/// asked, ms.
pub const ASK_WAIT_MS: u64 = 30_000;
/// A neighbour is answered at most once in this long, ms.
pub const ANSWER_EVERY_MS: u64 = 60_000;
/// Neighbours remembered as answered (beyond, requests are refused until
/// the oldest expire).
pub const MAX_ANSWERED: usize = 4096;

/// The state of a node's descriptor requests and answers.
#[derive(Debug, Default)]
pub struct Sharing {
    /// Neighbours asked, with when the request lapses.
    asked: HashMap<PeerId, u64>,
    /// When lists came, oldest first.
    lists: VecDeque<u64>,
    /// Neighbours answered, with when.
    answered: HashMap<PeerId, u64>,
}

impl Sharing {
    /// `peer` just connected: whether to ask it for its list (it is then
    /// counted as asked until its list comes or [`ASK_WAIT_MS`] pass).
    pub fn ask(&mut self, peer: PeerId, now_ms: u64) -> bool {
        self.expire_requests(now_ms);
        if self.asked.contains_key(&peer) || self.asked.len() + self.lists.len() >= WANT_LISTS {
            return false;
        }
        self.asked.insert(peer, now_ms + ASK_WAIT_MS);
        true
    }

    /// A batch of `entries` descriptors came from `peer`. A batch of more
    /// than one from a neighbour asked is its list (every batch starts
    /// with the sender's own descriptor, the greeting of a new connection
    /// is only that; a neighbour that knows no one else answers with the
    /// greeting again, and the request lapses).
    pub fn on_batch(&mut self, peer: &PeerId, entries: usize, now_ms: u64) {
        if entries > 1 && self.asked.remove(peer).is_some() {
            self.lists.push_back(now_ms);
        }
    }

    /// `peer` asked for our list: whether to send it now.
    pub fn answer(&mut self, peer: PeerId, now_ms: u64) -> bool {
        // Each request costs a lookup; the map is swept only when full
        // (and by `expire`), not at every request a peer may repeat.
        if self.answered_lately(&peer, now_ms) {
            return false;
        }
        if self.answered.len() >= MAX_ANSWERED {
            self.expire(now_ms);
            if self.answered.len() >= MAX_ANSWERED {
                return false;
            }
        }
        self.answered.insert(peer, now_ms);
        true
    }

    /// Whether `peer` was sent our list within [`ANSWER_EVERY_MS`] (a
    /// stream that broke may have lost it).
    pub fn answered_lately(&self, peer: &PeerId, now_ms: u64) -> bool {
        self.answered
            .get(peer)
            .is_some_and(|at| now_ms.saturating_sub(*at) < ANSWER_EVERY_MS)
    }

    /// Drops lapsed requests, lists older than [`LIST_FRESH_MS`] and
    /// answers older than [`ANSWER_EVERY_MS`].
    pub fn expire(&mut self, now_ms: u64) {
        self.expire_requests(now_ms);
        self.answered
            .retain(|_, at| now_ms.saturating_sub(*at) < ANSWER_EVERY_MS);
    }

    /// Drops lapsed requests and stale lists (a few entries each).
    fn expire_requests(&mut self, now_ms: u64) {
        self.asked.retain(|_, until| *until > now_ms);
        while self
            .lists
            .front()
            .is_some_and(|at| now_ms.saturating_sub(*at) >= LIST_FRESH_MS)
        {
            self.lists.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_node_asks_its_first_neighbours_only() {
        let mut s = Sharing::default();
        let peers: Vec<PeerId> = (0..10).map(|_| PeerId::random()).collect();
        let asked: Vec<bool> = peers.iter().map(|p| s.ask(*p, 1_000)).collect();
        assert_eq!(asked.iter().filter(|a| **a).count(), WANT_LISTS);
        assert!(asked[..WANT_LISTS].iter().all(|a| *a));
        // Lists come: still no more requests while they are fresh.
        for p in &peers[..WANT_LISTS] {
            s.on_batch(p, 40, 2_000);
        }
        assert!(!s.ask(PeerId::random(), 3_000));
        assert!(!s.ask(PeerId::random(), 2_000 + LIST_FRESH_MS - 1));
        // Once they are old, the next neighbours are asked again.
        assert!(s.ask(PeerId::random(), 2_000 + LIST_FRESH_MS));
    }

    #[test]
    fn a_greeting_is_not_a_list_and_an_unanswered_request_lapses() {
        let mut s = Sharing::default();
        let a = PeerId::random();
        assert!(s.ask(a, 0));
        assert!(!s.ask(a, 1), "one request per neighbour at a time");
        s.on_batch(&a, 1, 10);
        assert!(s.asked.contains_key(&a), "the greeting does not answer");
        for _ in 1..WANT_LISTS {
            assert!(s.ask(PeerId::random(), 20));
        }
        assert!(!s.ask(PeerId::random(), 30));
        // The requests lapse unanswered: others are asked.
        assert!(s.ask(PeerId::random(), ASK_WAIT_MS));
        // A batch from a neighbour not asked counts for nothing.
        let mut s = Sharing::default();
        s.on_batch(&PeerId::random(), 50, 0);
        assert!(s.lists.is_empty());
    }

    #[test]
    fn a_neighbour_is_answered_once_a_minute() {
        let mut s = Sharing::default();
        let a = PeerId::random();
        assert!(s.answer(a, 0));
        assert!(s.answered_lately(&a, 1));
        assert!(!s.answer(a, ANSWER_EVERY_MS - 1));
        assert!(s.answer(PeerId::random(), 5), "others are answered");
        assert!(!s.answered_lately(&a, ANSWER_EVERY_MS));
        assert!(s.answer(a, ANSWER_EVERY_MS));
    }

    #[test]
    fn answers_are_bounded_however_many_ask() {
        let mut s = Sharing::default();
        for i in 0..MAX_ANSWERED as u64 {
            assert!(s.answer(PeerId::random(), i / 100));
        }
        assert!(!s.answer(PeerId::random(), 100));
        assert!(s.answer(PeerId::random(), ANSWER_EVERY_MS + 100));
        assert!(s.answered.len() < 100);
    }
}
