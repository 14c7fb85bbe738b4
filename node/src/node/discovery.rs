//! Discovery: Kademlia's routing table and mDNS. Peers found either way
//! are reported as events and handed back to the loop, which dials them
//! while the node is short of peers.
//!
//! The node, not Kademlia, puts peers in the routing table
//! (`BucketInserts::Manual`), through [`kad_add`]: a new peer goes in only
//! while its bucket has room. libp2p-kad answers a full bucket by dialling
//! its least recently seen disconnected entry to check that it is alive;
//! with idle connections closed (`crate::keep_alive`) most entries are
//! disconnected, so every new peer brought an old one back, whose own
//! table then brought back another. A dead entry leaves the table instead
//! when a lookup fails to reach it.
//!
//! A BLE address must never be handed to internet peers in answers, so it
//! never stays in the routing table.

use std::collections::HashMap;

use libp2p::{Multiaddr, PeerId, Swarm, kad, mdns};

use super::event_loop::Ctx;
use crate::behaviour::Behaviour;
use crate::types::{DiscoveredVia, NodeEvent};

/// Adds `addr` as an address of `peer` in Kademlia's routing table: to its
/// entry, or as a new entry while the bucket holds fewer than
/// `bucket_size` (see the module docs).
pub(super) fn kad_add(
    swarm: &mut Swarm<Behaviour>,
    bucket_size: usize,
    peer: &PeerId,
    addr: Multiaddr,
) {
    let kad = &mut swarm.behaviour_mut().kad;
    let room = kad.kbucket(*peer).is_some_and(|b| {
        b.num_entries() < bucket_size || b.iter().any(|e| e.node.key.preimage() == peer)
    });
    if room {
        kad.add_address(peer, addr);
    }
}

/// A Kademlia event (other than provider lookups, which the files side
/// takes); returns a peer new to the routing table, with its addresses.
/// A peer that answered on a connection this node dialled goes into the
/// table if there is room (Kademlia only proposes it).
pub(super) fn on_kad(
    swarm: &mut Swarm<Behaviour>,
    ctx: &Ctx,
    ev: kad::Event,
) -> Option<(PeerId, Vec<Multiaddr>)> {
    if let kad::Event::RoutablePeer { peer, address } = ev {
        if !fogmesh_ble::is_ble(&address) {
            kad_add(swarm, ctx.kad_bucket_size, &peer, address);
        }
        return None;
    }
    let kad::Event::RoutingUpdated {
        peer,
        is_new_peer,
        addresses,
        ..
    } = ev
    else {
        return None;
    };
    if addresses.iter().any(fogmesh_ble::is_ble) {
        // (`remove_address` matches addresses with a /p2p suffix only,
        // which kad does not store for dialled ones: take the peer out,
        // put the rest back.)
        let kad = &mut swarm.behaviour_mut().kad;
        kad.remove_peer(&peer);
        for a in addresses.iter().filter(|a| !fogmesh_ble::is_ble(a)) {
            kad.add_address(&peer, a.clone());
        }
    }
    if !is_new_peer {
        return None;
    }
    let addrs: Vec<Multiaddr> = addresses.into_vec();
    discovered(ctx, peer, &addrs, DiscoveredVia::Kad);
    Some((peer, addrs))
}

/// An mDNS event: peers on the LAN go into Kademlia's routing table;
/// returns them with their addresses.
pub(super) fn on_mdns(
    swarm: &mut Swarm<Behaviour>,
    ctx: &Ctx,
    ev: mdns::Event,
) -> Vec<(PeerId, Vec<Multiaddr>)> {
    let mdns::Event::Discovered(list) = ev else {
        return Vec::new();
    };
    let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
    for (peer, addr) in list {
        by_peer.entry(peer).or_default().push(addr);
    }
    for (peer, addrs) in &by_peer {
        for a in addrs {
            kad_add(swarm, ctx.kad_bucket_size, peer, a.clone());
        }
        discovered(ctx, *peer, addrs, DiscoveredVia::Mdns);
    }
    by_peer.into_iter().collect()
}

/// Walks of the DHT a node short of peers makes, backing off while a walk
/// leaves it short.
///
/// A walk is a lookup of the node's own key: the peers closest to it, and
/// those met on the way (about fifty in a network of a hundred). It used
/// to be a whole Kademlia bootstrap (that lookup, then one of a random
/// key in each farther bucket: nine lookups at 300 nodes), which met
/// most of a network of a few hundred nodes over and again, each request
/// on a connection of its own; libp2p-kad makes that bootstrap itself
/// while its table holds fewer than 20 peers and every 5 minutes, which
/// keeps the buckets fresh. Those connections close once idle, and the
/// peers met are only held if the node keeps them (bootstrap lines,
/// `connect`, gossip meshes), so a node with fewer such peers than
/// `min_peers` is short again at the next tick. Walking again every tick
/// found nothing new and made every node a dialler of the whole network
/// four times a minute; so while the node stays short, its walks come 1,
/// 2, 4, ... ticks apart, at most [`MAX_WALK_TICKS`]; once it is not
/// short, the next shortage walks at once.
#[derive(Debug, Default)]
pub(super) struct Walks {
    /// Walks made since the node was last not short.
    made: u32,
    /// Ticks to let pass before the next walk.
    wait: u32,
}

/// Walks back off to one every this many maintenance ticks (20: every 5
/// minutes in the daemon, the period of libp2p-kad's own bootstrap).
pub(super) const MAX_WALK_TICKS: u32 = 20;

impl Walks {
    /// At a maintenance tick: whether to walk now.
    pub(super) fn due(&mut self, short: bool) -> bool {
        if !short {
            *self = Walks::default();
            return false;
        }
        if self.wait > 0 {
            self.wait -= 1;
            return false;
        }
        self.wait = (1u32 << self.made.min(5)).min(MAX_WALK_TICKS) - 1;
        self.made = self.made.saturating_add(1);
        true
    }

    /// The walk could not start (no peer known): the next tick tries.
    fn not_started(&mut self) {
        *self = Walks::default();
    }
}

/// Periodic: walk the DHT when short of peers (backing off, see
/// [`Walks`]) or, private, short of relays (every tick); the walk connects
/// to the peers met on the way. With no peer in the routing table it
/// cannot start, which is fine.
pub(super) fn maintain(
    swarm: &mut Swarm<Behaviour>,
    walks: &mut Walks,
    short_of_peers: bool,
    short_of_relays: bool,
) {
    let peers_due = walks.due(short_of_peers);
    if !peers_due && !short_of_relays {
        return;
    }
    let me = *swarm.local_peer_id();
    let kad = &mut swarm.behaviour_mut().kad;
    if kad.kbuckets().next().is_none() {
        tracing::trace!("no peer to walk the DHT from");
        walks.not_started();
        return;
    }
    kad.get_closest_peers(me);
}

fn discovered(ctx: &Ctx, peer: PeerId, addrs: &[Multiaddr], via: DiscoveredVia) {
    ctx.metrics.peers_discovered.inc();
    ctx.emit(NodeEvent::PeerDiscovered {
        peer_id: peer.to_base58(),
        addrs: addrs.iter().map(|a| a.to_string()).collect(),
        via,
    });
}

/// The peers a closest-peers lookup found, also when it timed out (what it
/// had found by then).
pub(super) fn closest_found(result: kad::GetClosestPeersResult) -> Vec<kad::PeerInfo> {
    match result {
        Ok(ok) => ok.peers,
        Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
    }
}

/// Logs a Kademlia lookup that ended (debug): its kind, requests, answers,
/// failures and duration. A bootstrap reports each of its lookups: its
/// own key, then a key in each farther bucket.
pub(super) fn log_finished(ev: &kad::Event) {
    let kad::Event::OutboundQueryProgressed {
        result,
        stats,
        step,
        ..
    } = ev
    else {
        return;
    };
    if step.last || matches!(result, kad::QueryResult::Bootstrap(_)) {
        tracing::debug!(
            kind = query_kind(result),
            requests = stats.num_requests(),
            answered = stats.num_successes(),
            failed = stats.num_failures(),
            secs = stats.duration().map(|d| d.as_secs_f64()),
            "Kademlia query finished"
        );
    }
}

/// A Kademlia query's kind, for logs.
fn query_kind(result: &kad::QueryResult) -> &'static str {
    match result {
        kad::QueryResult::Bootstrap(_) => "bootstrap",
        kad::QueryResult::GetClosestPeers(_) => "closest peers",
        kad::QueryResult::GetProviders(_) => "providers",
        kad::QueryResult::StartProviding(_) | kad::QueryResult::RepublishProvider(_) => "provide",
        kad::QueryResult::GetRecord(_) => "get record",
        kad::QueryResult::PutRecord(_) | kad::QueryResult::RepublishRecord(_) => "put record",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ticks, of `n`, at which a node short all along walks.
    fn walks_while_short(n: u32) -> Vec<u32> {
        let mut w = Walks::default();
        (0..n).filter(|_| w.due(true)).collect()
    }

    #[test]
    fn a_node_that_stays_short_walks_less_and_less_often() {
        assert_eq!(walks_while_short(64), vec![0, 1, 3, 7, 15, 31, 51]);
        // Then every MAX_WALK_TICKS.
        let late = walks_while_short(200);
        let gaps: Vec<u32> = late.windows(2).map(|p| p[1] - p[0]).collect();
        assert!(gaps.ends_with(&[MAX_WALK_TICKS; 5]), "{gaps:?}");
    }

    #[test]
    fn a_node_short_again_walks_at_once_and_a_node_with_peers_never() {
        let mut w = Walks::default();
        for _ in 0..10 {
            w.due(true);
        }
        assert!(!w.due(false));
        assert!(w.due(true), "short again after having enough peers");
        assert!(w.due(true));
        assert!(!w.due(true));

        let mut w = Walks::default();
        assert!((0..100).all(|_| !w.due(false)));
    }
}
