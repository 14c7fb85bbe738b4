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
//!
//! A descriptor new to a node goes on to [`RELAY_FANOUT`] of its other
//! neighbours, drawn at random ([`relay_targets`]), not to all of them:
//! passing each one to every neighbour costs every node a copy from each
//! of its connections, and while a network starts (or a node walks the
//! DHT) a node has a hundred or more. Pushed to 12 random neighbours,
//! each node passing it on once, a descriptor still reaches every node of
//! a random network of 1000 with 50 connections each in all but about 1
//! case in 40 (one node missed); the greeting of every later connection
//! and the lists asked of new neighbours bring it to the few it missed.

use std::collections::{HashMap, VecDeque};

use libp2p_identity::PeerId;
use rand_core::Rng;

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

/// Neighbours a node passes a descriptor new to it on to, at most.
pub const RELAY_FANOUT: usize = 12;

/// The neighbours to pass descriptors new to this node on to: every one
/// but `from` (who sent them) when they are at most [`RELAY_FANOUT`], else
/// [`RELAY_FANOUT`] of them drawn uniformly at random.
pub fn relay_targets(
    neighbours: impl IntoIterator<Item = PeerId>,
    from: &PeerId,
    rng: &mut impl Rng,
) -> Vec<PeerId> {
    let mut pool: Vec<PeerId> = neighbours.into_iter().filter(|p| p != from).collect();
    super::path::sample_tail(&mut pool, 0, RELAY_FANOUT, rng);
    pool
}

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
    use std::collections::HashSet;

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
    fn new_descriptors_go_to_a_bounded_random_set_of_other_neighbours() {
        let mut rng = rand::rng();
        let from = PeerId::random();
        let few: Vec<PeerId> = (0..RELAY_FANOUT).map(|_| PeerId::random()).collect();
        let mut to = relay_targets(few.iter().copied().chain([from]), &from, &mut rng);
        to.sort();
        let mut all = few.clone();
        all.sort();
        assert_eq!(to, all, "with few neighbours, every one but the sender");

        let many: Vec<PeerId> = (0..200).map(|_| PeerId::random()).collect();
        let mut chosen = HashSet::new();
        for _ in 0..50 {
            let to = relay_targets(many.iter().copied().chain([from]), &from, &mut rng);
            assert_eq!(to.len(), RELAY_FANOUT);
            assert!(!to.contains(&from));
            assert_eq!(to.iter().collect::<HashSet<_>>().len(), RELAY_FANOUT);
            chosen.extend(to);
        }
        // Drawn anew each time: 50 draws of 12 among 200 cover most.
        assert!(chosen.len() > 150, "{} of 200 ever chosen", chosen.len());
    }

    /// What the fan-out is chosen for: on a random network of 1000 nodes
    /// with about 50 connections each (a node's count while the network
    /// starts), a descriptor passed on by each node once, to
    /// `relay_targets`, reaches nearly every node, for about a quarter of
    /// the copies a flood to every neighbour costs.
    #[test]
    fn a_bounded_relay_reaches_nearly_every_node_of_a_large_network() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = 1000;
        let ids: Vec<PeerId> = (0..n).map(|_| PeerId::random()).collect();
        let index: HashMap<PeerId, usize> = ids.iter().enumerate().map(|(i, p)| (*p, i)).collect();
        let mut adj = vec![HashSet::new(); n];
        for i in 0..n {
            while adj[i].len() < 40 {
                let j = rng.random_range(0..n);
                if j != i {
                    adj[i].insert(j);
                    adj[j].insert(i);
                }
            }
        }
        let (mut missed, mut copies, mut flood) = (0, 0, 0);
        for origin in 0..40 {
            let mut seen = HashSet::from([origin]);
            let mut frontier = vec![(origin, origin)];
            while let Some((node, from)) = frontier.pop() {
                flood += adj[node].len();
                let to = relay_targets(adj[node].iter().map(|j| ids[*j]), &ids[from], &mut rng);
                copies += to.len();
                for p in to {
                    let j = index[&p];
                    if seen.insert(j) {
                        frontier.push((j, node));
                    }
                }
            }
            missed += n - seen.len();
        }
        assert!(missed <= 10, "{missed} nodes missed over 40 descriptors");
        assert!(
            copies * 4 < flood,
            "{copies} copies against {flood} flooded"
        );
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
