//! Where one envelope goes: candidates in order of preference (the peers
//! closest to the mailbox key, or BLE neighbours), asked until `want` of
//! them hold it or the candidates (or the allowance of asks) run out. A
//! refusal or a failure is replaced by the next candidate; peers already
//! known to hold the envelope count without being asked.
//!
//! Pure bookkeeping: the node sends the deposits [`Placement::to_ask`]
//! names and reports each answer with [`Placement::answered`].

use std::collections::{HashSet, VecDeque};

use libp2p_identity::PeerId;

/// Most peers one placement asks (the candidates beyond are not used).
pub const MAX_ASKS: usize = 8;

/// The placement of one envelope.
#[derive(Debug, Clone)]
pub struct Placement {
    want: usize,
    max_asks: usize,
    candidates: VecDeque<PeerId>,
    seen: HashSet<PeerId>,
    asked: usize,
    outstanding: HashSet<PeerId>,
    held: Vec<PeerId>,
    accepted: Vec<PeerId>,
    failed: Vec<(PeerId, String)>,
}

impl Placement {
    /// A placement that wants `want` holders and asks at most `max_asks`
    /// peers.
    pub fn new(want: usize, max_asks: usize) -> Self {
        Placement {
            want,
            max_asks,
            candidates: VecDeque::new(),
            seen: HashSet::new(),
            asked: 0,
            outstanding: HashSet::new(),
            held: Vec::new(),
            accepted: Vec::new(),
            failed: Vec::new(),
        }
    }

    /// `peer` is known to hold the envelope already: it counts toward
    /// `want` and is not asked.
    pub fn already_held(&mut self, peer: PeerId) {
        if self.seen.insert(peer) {
            self.held.push(peer);
        }
    }

    /// Adds candidates, best first (peers seen before are skipped).
    pub fn add_candidates(&mut self, peers: impl IntoIterator<Item = PeerId>) {
        for p in peers {
            if self.seen.insert(p) {
                self.candidates.push_back(p);
            }
        }
    }

    /// The peers to ask now: the next candidates, as many as are missing
    /// to reach `want` with those already asked and unanswered.
    pub fn to_ask(&mut self) -> Vec<PeerId> {
        let mut out = Vec::new();
        while self.held.len() + self.accepted.len() + self.outstanding.len() < self.want
            && self.asked < self.max_asks
        {
            let Some(p) = self.candidates.pop_front() else {
                break;
            };
            self.asked += 1;
            self.outstanding.insert(p);
            out.push(p);
        }
        out
    }

    /// `peer`'s answer: `Ok` if it holds the envelope now, or why not.
    /// Answers of peers not asked are ignored.
    pub fn answered(&mut self, peer: PeerId, result: Result<(), String>) {
        if !self.outstanding.remove(&peer) {
            return;
        }
        match result {
            Ok(()) => self.accepted.push(peer),
            Err(e) => self.failed.push((peer, e)),
        }
    }

    /// No answer is awaited and nobody is left to ask (or enough hold it).
    pub fn done(&self) -> bool {
        self.outstanding.is_empty()
            && (self.held.len() + self.accepted.len() >= self.want
                || self.candidates.is_empty()
                || self.asked >= self.max_asks)
    }

    /// The peers that accepted it (in this placement).
    pub fn accepted(&self) -> &[PeerId] {
        &self.accepted
    }

    /// The peers that refused or failed, and why.
    pub fn failed(&self) -> &[(PeerId, String)] {
        &self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_replaced_by_the_next_closest_until_enough_hold_it() {
        let peers: Vec<PeerId> = (0..6).map(|_| PeerId::random()).collect();
        let mut p = Placement::new(3, MAX_ASKS);
        p.add_candidates(peers.iter().copied());
        assert_eq!(p.to_ask(), peers[..3].to_vec());
        assert!(p.to_ask().is_empty(), "three are asked and unanswered");
        p.answered(peers[0], Ok(()));
        p.answered(peers[1], Err("full".into()));
        // The refusal is replaced by the fourth closest.
        assert_eq!(p.to_ask(), vec![peers[3]]);
        p.answered(peers[2], Err("gone".into()));
        p.answered(peers[3], Ok(()));
        assert_eq!(p.to_ask(), vec![peers[4]]);
        assert!(!p.done());
        p.answered(peers[4], Ok(()));
        assert!(p.to_ask().is_empty());
        assert!(p.done());
        assert_eq!(p.accepted(), &[peers[0], peers[3], peers[4]]);
        assert_eq!(p.failed().len(), 2);
        // An answer from a peer never asked changes nothing.
        p.answered(peers[5], Ok(()));
        assert_eq!(p.accepted().len(), 3);
    }

    #[test]
    fn it_stops_when_candidates_or_asks_run_out_and_counts_known_holders() {
        let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let mut p = Placement::new(3, 2);
        p.add_candidates(peers.iter().copied());
        assert_eq!(p.to_ask().len(), 2);
        p.answered(peers[0], Err("no".into()));
        p.answered(peers[1], Err("no".into()));
        assert!(p.to_ask().is_empty(), "the allowance of asks is used up");
        assert!(p.done());

        let mut p = Placement::new(3, MAX_ASKS);
        p.already_held(peers[0]);
        p.already_held(peers[1]);
        p.add_candidates(peers.iter().copied());
        assert_eq!(p.to_ask(), vec![peers[2]], "two already hold it");
        p.answered(peers[2], Err("no".into()));
        assert_eq!(p.to_ask(), vec![peers[3]]);
        p.answered(peers[3], Err("no".into()));
        assert_eq!(p.to_ask(), vec![peers[4]]);
        p.answered(peers[4], Err("no".into()));
        assert!(p.to_ask().is_empty());
        assert!(p.done(), "no candidate is left");
        assert!(p.accepted().is_empty());

        let mut empty = Placement::new(3, MAX_ASKS);
        assert!(empty.to_ask().is_empty());
        assert!(empty.done());
    }
}
