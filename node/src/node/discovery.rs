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

/// Periodic: when short of peers, walk the DHT towards our own id, which
/// connects to the peers met on the way (with no known peer it fails,
/// which is fine).
pub(super) fn maintain(swarm: &mut Swarm<Behaviour>, short_of_peers: bool) {
    if !short_of_peers {
        return;
    }
    if let Err(e) = swarm.behaviour_mut().kad.bootstrap() {
        tracing::trace!("kad bootstrap not possible: {e:?}");
    }
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
