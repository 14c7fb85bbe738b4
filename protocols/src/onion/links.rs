//! Which neighbours a node is connected to, and which mix nodes it leaves
//! out of new paths for a while because they could not be reached.
//!
//! A mix node whose last connection closed is left out for [`DOWN_MS`]
//! unless it connects again. A connected one whose mix stream fails is
//! given a second stream (the first may have died with one of two
//! simultaneous connections, which is common while nodes start: the
//! caller waits for that connection to be gone); if that fails too, it is left out for [`REFUSED_MS`] only: the connection is up,
//! so the failure is more likely passing than lasting, and a sender with
//! just enough mix nodes for a path would otherwise wait two minutes.
//!
//! [`Links::expire`] tells when a node comes back, so that messages
//! waiting for mix nodes are tried again then rather than at their next
//! back-off.

use std::collections::{HashMap, HashSet};

use libp2p_identity::PeerId;

/// How long a mix node whose connection closed is left out of new paths,
/// ms, unless it connects again.
pub const DOWN_MS: u64 = 120_000;
/// How long a connected mix node whose stream failed twice in a row is
/// left out of new paths, ms.
pub const REFUSED_MS: u64 = 15_000;

/// What to do after a neighbour's mix stream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Still connected, first failure since it connected: open a new
    /// stream and send again what may have been lost with the old one.
    Reopen,
    /// Left out of new paths until the given time, ms.
    LeftOut(u64),
    /// Nothing: not a mix node we know, and not connected.
    Nothing,
}

/// The node's neighbours and the mix nodes left out of paths.
#[derive(Debug, Default)]
pub struct Links {
    connected: HashSet<PeerId>,
    /// Connected peers whose stream already failed once since they
    /// connected.
    failed_once: HashSet<PeerId>,
    /// Peers left out of paths until then, ms.
    down: HashMap<PeerId, u64>,
}

impl Links {
    /// A connection to `peer` came up. It is no longer left out; returns
    /// whether it is newly connected (its first connection).
    pub fn connected(&mut self, peer: PeerId) -> bool {
        self.down.remove(&peer);
        let first = self.connected.insert(peer);
        if first {
            self.failed_once.remove(&peer);
        }
        first
    }

    /// The last connection to `peer` closed. A mix node we know
    /// (`known_mix`) is left out of paths for [`DOWN_MS`].
    pub fn closed(&mut self, peer: PeerId, known_mix: bool, now_ms: u64) {
        self.connected.remove(&peer);
        self.failed_once.remove(&peer);
        if known_mix {
            self.down.insert(peer, now_ms.saturating_add(DOWN_MS));
        }
    }

    /// Our mix stream to `peer` failed. `known_mix`: we hold its
    /// descriptor.
    pub fn stream_failed(&mut self, peer: PeerId, known_mix: bool, now_ms: u64) -> AfterFailure {
        let connected = self.connected.contains(&peer);
        if connected && self.failed_once.insert(peer) {
            return AfterFailure::Reopen;
        }
        if !known_mix {
            return AfterFailure::Nothing;
        }
        let left_out = if connected { REFUSED_MS } else { DOWN_MS };
        let until = now_ms.saturating_add(left_out);
        // A longer mark already there stays.
        let until = self.down.get(&peer).map_or(until, |t| until.max(*t));
        self.down.insert(peer, until);
        AfterFailure::LeftOut(until)
    }

    /// Whether `peer` is left out of new paths at `now_ms`.
    pub fn is_down(&self, peer: &PeerId, now_ms: u64) -> bool {
        self.down.get(peer).is_some_and(|t| *t > now_ms)
    }

    /// Whether `peer` is connected.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.connected.contains(peer)
    }

    /// The connected neighbours.
    pub fn neighbours(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.connected.iter().copied()
    }

    /// Forgets marks that lapsed; returns whether any did (a node came
    /// back into the pool of paths).
    pub fn expire(&mut self, now_ms: u64) -> bool {
        let before = self.down.len();
        self.down.retain(|_, t| *t > now_ms);
        self.down.len() < before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_mix_node_is_left_out_until_it_reconnects() {
        let mut l = Links::default();
        let p = PeerId::random();
        assert!(l.connected(p));
        assert!(!l.connected(p), "a second connection is not news");
        l.closed(p, true, 1_000);
        assert!(!l.is_connected(&p));
        assert!(l.is_down(&p, 1_000 + DOWN_MS - 1));
        assert!(l.connected(p));
        assert!(!l.is_down(&p, 1_001));
        // A peer without a descriptor is not marked.
        let q = PeerId::random();
        l.connected(q);
        l.closed(q, false, 1_000);
        assert!(!l.is_down(&q, 1_000));
    }

    #[test]
    fn a_connected_mix_node_gets_a_second_stream_then_a_short_leave() {
        let mut l = Links::default();
        let p = PeerId::random();
        l.connected(p);
        assert_eq!(l.stream_failed(p, true, 0), AfterFailure::Reopen);
        assert!(!l.is_down(&p, 0));
        assert_eq!(
            l.stream_failed(p, true, 10),
            AfterFailure::LeftOut(10 + REFUSED_MS)
        );
        assert!(l.is_down(&p, 10 + REFUSED_MS - 1));
        assert!(!l.is_down(&p, 10 + REFUSED_MS));
        // Its lapse is reported once.
        assert!(!l.expire(10 + REFUSED_MS - 1));
        assert!(l.expire(10 + REFUSED_MS));
        assert!(!l.expire(10 + REFUSED_MS + 1));
        // Failing again while connected: left out again, no reopen (it had
        // its second chance since it connected).
        assert_eq!(
            l.stream_failed(p, true, 20_000),
            AfterFailure::LeftOut(20_000 + REFUSED_MS)
        );
        // A new first connection gives it a new second chance.
        l.closed(p, true, 21_000);
        l.connected(p);
        assert_eq!(l.stream_failed(p, true, 22_000), AfterFailure::Reopen);
    }

    #[test]
    fn a_stream_failing_to_an_unconnected_peer_marks_only_mix_nodes() {
        let mut l = Links::default();
        let p = PeerId::random();
        assert_eq!(
            l.stream_failed(p, true, 5),
            AfterFailure::LeftOut(5 + DOWN_MS)
        );
        let q = PeerId::random();
        assert_eq!(l.stream_failed(q, false, 5), AfterFailure::Nothing);
        assert!(!l.is_down(&q, 5));
        // A connected mix node closed then failing keeps the longer mark.
        let r = PeerId::random();
        l.connected(r);
        l.closed(r, true, 0);
        l.connected(r);
        l.stream_failed(r, true, 0);
        l.closed(r, true, 100);
        assert_eq!(
            l.stream_failed(r, true, 200),
            AfterFailure::LeftOut(200 + DOWN_MS)
        );
    }
}
