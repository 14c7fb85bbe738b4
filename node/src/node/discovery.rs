//! Discovery: Kademlia's routing table and mDNS. Peers found either way
//! are reported as events and handed back to the loop, which dials them
//! while the node is short of peers.
//!
//! Kademlia adds the address of every connection it sees; a BLE address
//! must never be handed to internet peers in answers, so it never stays in
//! the routing table.

use std::collections::HashMap;

use libp2p::{Multiaddr, PeerId, Swarm, kad, mdns};

use super::event_loop::Ctx;
use crate::behaviour::Behaviour;
use crate::types::{DiscoveredVia, NodeEvent};

/// A Kademlia event (other than provider lookups, which the files side
/// takes); returns a peer new to the routing table, with its addresses.
pub(super) fn on_kad(
    swarm: &mut Swarm<Behaviour>,
    ctx: &Ctx,
    ev: kad::Event,
) -> Option<(PeerId, Vec<Multiaddr>)> {
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
            swarm.behaviour_mut().kad.add_address(peer, a.clone());
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
