//! Limits on serving peers: how many requests each peer may have open and
//! how many response bytes may wait for it, and the same over all peers.
//!
//! A response is held in memory from the moment it is read until the
//! requester has taken it (libp2p request-response reports `ResponseSent`)
//! or the exchange failed (a timeout, a closed connection, an answer never
//! given). A peer that asks and never reads would otherwise pin a whole
//! chunk (up to 16 MiB) per stream, 256 streams per connection. The gate
//! counts both, shared by the network glue (which admits a request, and
//! releases it when the exchange ends) and the files actor (which reserves
//! the response's bytes before it reads them). Over a limit the answer is
//! `Busy`, which costs a few bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use libp2p::PeerId;
use libp2p::request_response::InboundRequestId;

/// Requests one peer may have open (received and not yet fully answered):
/// above a downloader's largest window (64) plus its have-map requests.
pub(crate) const MAX_PEER_REQUESTS: usize = 80;
/// Response bytes that may wait for one peer (one larger response is
/// still served when nothing waits for that peer).
pub(crate) const MAX_PEER_BYTES: u64 = 16 * 1024 * 1024;
/// Requests open over all peers.
pub(crate) const MAX_TOTAL_REQUESTS: usize = 2048;
/// Response bytes waiting over all peers.
pub(crate) const MAX_TOTAL_BYTES: u64 = 64 * 1024 * 1024;
/// Peer requests waiting for the files actor (its queue of its own,
/// apart from the API and the answers to the node's own requests).
pub(crate) const SERVE_QUEUE: usize = 512;

#[derive(Debug, Default)]
struct Load {
    requests: usize,
    bytes: u64,
}

#[derive(Debug)]
struct State<K> {
    peers: HashMap<PeerId, Load>,
    open: HashMap<K, (PeerId, u64)>,
    total: Load,
}

/// The serving limits' counters, by request id `K`. Cloneable (shared).
#[derive(Debug, Clone)]
pub(crate) struct ServeGate<K = InboundRequestId> {
    state: Arc<Mutex<State<K>>>,
}

impl<K> Default for ServeGate<K> {
    fn default() -> Self {
        ServeGate {
            state: Arc::new(Mutex::new(State {
                peers: HashMap::new(),
                open: HashMap::new(),
                total: Load::default(),
            })),
        }
    }
}

impl<K: std::hash::Hash + Eq + Copy> ServeGate<K> {
    fn lock(&self) -> MutexGuard<'_, State<K>> {
        // A panic while holding the lock cannot leave the counters half
        // updated in a way worse than a stale count: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request from `peer` arrived: counted if within the limits (then
    /// [`release`](Self::release) it when its exchange ends).
    pub(crate) fn admit(&self, peer: PeerId, id: K) -> bool {
        let mut s = self.lock();
        let per_peer = s.peers.get(&peer).map_or(0, |l| l.requests);
        if per_peer >= MAX_PEER_REQUESTS || s.total.requests >= MAX_TOTAL_REQUESTS {
            return false;
        }
        s.peers.entry(peer).or_default().requests += 1;
        s.total.requests += 1;
        s.open.insert(id, (peer, 0));
        true
    }

    /// Reserves `bytes` for the response to `id`, before reading them;
    /// `false`: over a limit, answer `Busy`.
    pub(crate) fn reserve(&self, id: K, bytes: u64) -> bool {
        let mut s = self.lock();
        let Some(&(peer, held)) = s.open.get(&id) else {
            // Not admitted (or already over): nothing to account.
            return true;
        };
        let peer_bytes = s.peers.get(&peer).map_or(0, |l| l.bytes);
        let fits_peer = peer_bytes == 0 || peer_bytes + bytes <= MAX_PEER_BYTES;
        if !fits_peer || s.total.bytes + bytes > MAX_TOTAL_BYTES {
            return false;
        }
        if let Some(l) = s.peers.get_mut(&peer) {
            l.bytes += bytes;
        }
        s.total.bytes += bytes;
        s.open.insert(id, (peer, held + bytes));
        true
    }

    /// The exchange of `id` ended (answered, failed or never answered).
    pub(crate) fn release(&self, id: K) {
        let mut s = self.lock();
        let Some((peer, bytes)) = s.open.remove(&id) else {
            return;
        };
        s.total.requests = s.total.requests.saturating_sub(1);
        s.total.bytes = s.total.bytes.saturating_sub(bytes);
        if let Some(l) = s.peers.get_mut(&peer) {
            l.requests = l.requests.saturating_sub(1);
            l.bytes = l.bytes.saturating_sub(bytes);
            if l.requests == 0 {
                s.peers.remove(&peer);
            }
        }
    }

    /// Requests open and response bytes waiting, over all peers.
    #[cfg(test)]
    fn load(&self) -> (usize, u64) {
        let s = self.lock();
        (s.total.requests, s.total.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u64) -> Vec<u64> {
        (0..n).collect()
    }

    #[test]
    fn one_peer_cannot_hold_more_than_its_share() {
        let gate = ServeGate::<u64>::default();
        let hostile = PeerId::random();
        let honest = PeerId::random();
        let ids = ids(MAX_PEER_REQUESTS as u64 + 10);
        let mut admitted = Vec::new();
        for id in &ids[..MAX_PEER_REQUESTS + 5] {
            if gate.admit(hostile, *id) {
                admitted.push(*id);
            }
        }
        assert_eq!(admitted.len(), MAX_PEER_REQUESTS);
        // Bytes: 16 MiB of 256 KiB chunks, then busy.
        let chunk = 256 * 1024;
        let reserved = admitted
            .iter()
            .filter(|id| gate.reserve(**id, chunk))
            .count();
        assert_eq!(reserved as u64, MAX_PEER_BYTES / chunk);
        assert_eq!(gate.load(), (MAX_PEER_REQUESTS, MAX_PEER_BYTES));
        // Another peer is still served, even a chunk larger than the
        // per-peer limit when nothing waits for it.
        let other = ids[MAX_PEER_REQUESTS + 5];
        assert!(gate.admit(honest, other));
        assert!(gate.reserve(other, MAX_PEER_BYTES + 1));
        // Ending the exchanges frees everything.
        for id in admitted.iter().chain([&other]) {
            gate.release(*id);
            gate.release(*id);
        }
        assert_eq!(gate.load(), (0, 0));
        assert!(gate.lock().peers.is_empty());
    }

    #[test]
    fn the_total_is_capped_across_peers() {
        let gate = ServeGate::<u64>::default();
        let ids = ids(64);
        let big = 8 * 1024 * 1024;
        let mut held = 0;
        for id in &ids {
            if gate.admit(PeerId::random(), *id) && gate.reserve(*id, big) {
                held += big;
            }
        }
        assert_eq!(held, MAX_TOTAL_BYTES);
    }
}
