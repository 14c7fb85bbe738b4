//! Reachability and NAT traversal: what AutoNAT found out, the Kademlia
//! mode that follows from it, reservations on circuit relays (the ones the
//! user named with `--relay` and, when the node is private, ones found
//! among its peers), the relay server switched on only while the node is
//! public, and hole punching (DCUtR) results.
//!
//! Rules this module keeps:
//! - Kademlia is a server only where others can dial it: `--kad-mode
//!   auto` follows AutoNAT (see [`KadMode`]).
//! - The relay server is on only while AutoNAT confirms a public address
//!   that is not relayed (AutoNAT never probes `/p2p-circuit` addresses);
//!   a public node holds no reservation itself, so every address its
//!   relay advertises is its own.
//! - A private node keeps [`WANTED_RELAYS`] reservations; a relay that
//!   goes away (connection closed, listener closed) is replaced at once by
//!   another peer that offers the hop protocol, and tried again itself
//!   after the next maintenance tick.
//! - Reachability is re-checked when the network changes: a new or
//!   expired listen address, an expired external address, or peers
//!   observing the node at an IP they had not seen it at. AutoNAT v1
//!   re-probes on its own only every 15 minutes once confident, and a
//!   status it is confident of takes three contrary probes to flip, so
//!   the node makes it doubt: a public status is dropped (its address is
//!   expired, which makes AutoNAT probe at once), a private or unknown
//!   one loses its confidence (a candidate address per point of
//!   confidence), so the next probe decides.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, Swarm, autonat, dcutr, kad, relay};

use crate::behaviour::{Behaviour, KadMode, NatConfig};
use crate::types::NatReachability;

/// Reservations a private node keeps.
pub(super) const WANTED_RELAYS: usize = 2;

/// How long after a network change every probe may flip the status.
const RECHECK_FOR: Duration = Duration::from_secs(180);

/// At most one re-dial of every connection in this time.
const REBIND_EVERY: Duration = Duration::from_secs(2);

/// IPs peers observed the node at, remembered to notice a new one.
const MAX_OBSERVED_IPS: usize = 16;

/// One reservation (asked for or accepted): a listener on
/// `<relay>/p2p-circuit`. The relay client renews it on its own.
struct Reservation {
    listener: ListenerId,
}

/// The NAT concern's state.
pub(super) struct NatNet {
    kad_mode: KadMode,
    nat: NatConfig,
    reach: NatReachability,
    /// `--relay` addresses, each ending in `/p2p/<relay>`.
    configured: Vec<(PeerId, Multiaddr)>,
    reservations: HashMap<PeerId, Reservation>,
    /// Peers whose identify lists the relay hop protocol, with their
    /// direct addresses.
    candidates: HashMap<PeerId, Vec<Multiaddr>>,
    /// Relays that failed us; not picked again until the next maintenance
    /// tick (or until identify shows them offering relaying again).
    failed: HashSet<PeerId>,
    /// A peer connected from an address AutoNAT would judge: the node is
    /// on the internet (or a test internet), not on a LAN alone.
    internet_evidence: bool,
    applied_kad: Option<kad::Mode>,
    relay_server_on: bool,
    /// The node's direct (IP, not relayed, not loopback) listen addresses.
    listen: HashSet<Multiaddr>,
    /// IPs peers observed the node at.
    observed_ips: HashSet<IpAddr>,
    /// AutoNAT has concluded once: a network change after that makes it
    /// re-check (before, it is probing anyway).
    settled: bool,
    /// Until when the node re-checks after a network change: AutoNAT's
    /// confidence is kept at zero after every probe (a probe that still
    /// went over a connection from before the change must not make it
    /// sure of the old answer again), so the first probe that disagrees
    /// flips the status.
    recheck_until: Option<Instant>,
    /// When the connections were last re-made after an address expired
    /// (an interface going away expires its TCP and QUIC addresses at once:
    /// one re-dial is enough).
    last_rebind: Option<Instant>,
}

impl NatNet {
    pub(super) fn new(kad_mode: KadMode, nat: NatConfig, relays: Vec<Multiaddr>) -> Self {
        let configured = relays
            .into_iter()
            .filter_map(|a| match crate::storage::last_peer(&a) {
                Some(p) => Some((p, a)),
                None => {
                    tracing::warn!(addr = %a, "--relay address has no /p2p/<peer id>: ignored");
                    None
                }
            })
            .collect();
        NatNet {
            kad_mode,
            nat,
            reach: NatReachability::Unknown,
            configured,
            reservations: HashMap::new(),
            candidates: HashMap::new(),
            failed: HashSet::new(),
            internet_evidence: false,
            applied_kad: None,
            relay_server_on: false,
            listen: HashSet::new(),
            observed_ips: HashSet::new(),
            settled: false,
            last_rebind: None,
            recheck_until: None,
        }
    }

    /// A listener has a new address: a new direct one is a network change.
    pub(super) fn on_new_listen_addr(&mut self, swarm: &mut Swarm<Behaviour>, addr: &Multiaddr) {
        if is_network_addr(addr) && self.listen.insert(addr.clone()) {
            self.network_changed(swarm, "new listen address");
        }
    }

    /// A listen address expired; `true` when it was a direct one and the
    /// connections were not re-made just now (those made from it are
    /// likely dead: the caller re-dials).
    pub(super) fn on_expired_listen_addr(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        addr: &Multiaddr,
    ) -> bool {
        if is_network_addr(addr) && self.listen.remove(addr) {
            self.network_changed(swarm, "listen address expired");
            let now = Instant::now();
            if self
                .last_rebind
                .is_none_or(|t| now.duration_since(t) > REBIND_EVERY)
            {
                self.last_rebind = Some(now);
                return true;
            }
        }
        false
    }

    /// An external address expired. When it was the one AutoNAT's public
    /// status rests on, AutoNAT drops the status and probes at once by
    /// itself (so also when the node withdrew it in
    /// [`Self::network_changed`]); another one expiring while the node is
    /// public is a change worth a re-check.
    pub(super) fn on_external_addr_expired(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        addr: &Multiaddr,
    ) {
        let still_public = swarm
            .behaviour()
            .autonat
            .as_ref()
            .is_some_and(|a| a.nat_status().is_public());
        if !is_relayed(addr) && still_public {
            self.network_changed(swarm, "external address expired");
        }
    }

    /// Identify told us where a peer sees us: a new IP means the way out
    /// changed (another NAT, another uplink).
    fn on_observed(&mut self, swarm: &mut Swarm<Behaviour>, observed: &Multiaddr) {
        if is_relayed(observed) || self.observed_ips.len() >= MAX_OBSERVED_IPS {
            return;
        }
        let ip = match observed.iter().next() {
            Some(Protocol::Ip4(ip)) if !ip.is_loopback() => IpAddr::V4(ip),
            Some(Protocol::Ip6(ip)) if !ip.is_loopback() => IpAddr::V6(ip),
            _ => return,
        };
        let first = self.observed_ips.is_empty();
        if self.observed_ips.insert(ip) && !first {
            self.network_changed(swarm, "peers see the node at a new IP");
        }
    }

    /// Makes AutoNAT re-check now rather than at its next refresh, and
    /// flip on the first probe that disagrees.
    fn network_changed(&mut self, swarm: &mut Swarm<Behaviour>, why: &str) {
        if !self.settled {
            return;
        }
        let candidates: Vec<Multiaddr> = self.listen.iter().cloned().collect();
        let Some(autonat) = swarm.behaviour_mut().autonat.as_mut() else {
            return;
        };
        tracing::info!(why, reachability = %self.reach, "network changed: re-checking reachability");
        self.recheck_until = Some(Instant::now() + RECHECK_FOR);
        match autonat.nat_status() {
            autonat::NatStatus::Public(addr) => {
                // AutoNAT forgets a public status whose address expires,
                // and probes at once.
                swarm.remove_external_address(&addr);
            }
            _ => doubt(autonat, candidates.first()),
        }
    }

    /// After a probe, while re-checking: AutoNAT's confidence back to zero.
    fn keep_doubting(&mut self, swarm: &mut Swarm<Behaviour>) {
        if self.recheck_until.is_none_or(|t| Instant::now() > t) {
            self.recheck_until = None;
            return;
        }
        let candidate = self.listen.iter().next().cloned();
        if let Some(autonat) = swarm.behaviour_mut().autonat.as_mut()
            && !autonat.nat_status().is_public()
            && autonat.confidence() > 0
        {
            doubt(autonat, candidate.as_ref());
        }
    }

    /// At start: the Kademlia mode, and reservations on the named relays.
    pub(super) fn start(&mut self, swarm: &mut Swarm<Behaviour>) {
        self.apply(swarm);
    }

    /// AutoNAT's reachability now.
    pub(super) fn reachability(&self) -> NatReachability {
        self.reach
    }

    /// Whether the relay server is offered now.
    pub(super) fn relay_server_on(&self) -> bool {
        self.relay_server_on
    }

    /// Kademlia's mode as last applied.
    pub(super) fn kad_mode(&self) -> &'static str {
        match self.applied_kad {
            Some(kad::Mode::Client) => "client",
            _ => "server",
        }
    }

    /// The Kademlia mode `--kad-mode` and reachability call for.
    fn wanted_kad_mode(&self) -> kad::Mode {
        match self.kad_mode {
            KadMode::Server => kad::Mode::Server,
            KadMode::Client => kad::Mode::Client,
            KadMode::Auto => match self.reach {
                NatReachability::Public => kad::Mode::Server,
                NatReachability::Private => kad::Mode::Client,
                // Not known yet: on the internet, unproven means client
                // (a NATed node must not enter routing tables even
                // briefly); on a LAN or loopback, where AutoNAT never
                // concludes, serving is what lets the nodes find each
                // other.
                NatReachability::Unknown if self.judged_network() => kad::Mode::Client,
                NatReachability::Unknown => kad::Mode::Server,
            },
        }
    }

    /// Whether AutoNAT judges this node's network: it was told to accept
    /// private addresses, or a peer connected over a public IP.
    fn judged_network(&self) -> bool {
        self.nat.autonat && (self.nat.autonat_private_addrs || self.internet_evidence)
    }

    /// Applies the Kademlia mode, the relay server's status and the
    /// reservations that follow from what is known now.
    fn apply(&mut self, swarm: &mut Swarm<Behaviour>) {
        let mode = self.wanted_kad_mode();
        if self.applied_kad != Some(mode) {
            tracing::info!(?mode, reachability = %self.reach, "kademlia mode");
            swarm.behaviour_mut().kad.set_mode(Some(mode));
            self.applied_kad = Some(mode);
        }
        let serve = self.nat.relay_server && self.reach == NatReachability::Public;
        if let Some(server) = swarm.behaviour_mut().relay_server.as_mut()
            && serve != self.relay_server_on
        {
            tracing::info!(on = serve, "relay server");
            server.set_status(Some(if serve {
                relay::Status::Enable
            } else {
                relay::Status::Disable
            }));
            self.relay_server_on = serve;
        }
        self.maintain(swarm);
    }

    /// A connection is up: a direct one from a public address is evidence
    /// that the node is on the internet.
    pub(super) fn on_established(&mut self, swarm: &mut Swarm<Behaviour>, remote: &Multiaddr) {
        if !self.internet_evidence && !is_relayed(remote) && is_global_ip(remote) {
            self.internet_evidence = true;
            self.apply(swarm);
        }
    }

    /// The last connection to `peer` closed: a reservation on it is gone.
    pub(super) fn on_disconnected(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId) {
        if let Some(r) = self.reservations.remove(&peer) {
            tracing::info!(relay = %peer, "relay went away; choosing another");
            swarm.remove_listener(r.listener);
            self.failed.insert(peer);
            self.maintain(swarm);
        }
    }

    /// A listener closed: if it held a reservation, the relay is replaced.
    pub(super) fn on_listener_closed(&mut self, swarm: &mut Swarm<Behaviour>, id: ListenerId) {
        let gone: Vec<PeerId> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.listener == id)
            .map(|(p, _)| *p)
            .collect();
        for peer in gone {
            tracing::info!(relay = %peer, "reservation ended");
            self.reservations.remove(&peer);
            self.failed.insert(peer);
        }
        self.maintain(swarm);
    }

    /// Identify told us whether a peer offers relaying (a relay that just
    /// started offering it is tried again at once).
    pub(super) fn on_identify(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        info: &libp2p::identify::Info,
    ) {
        self.on_observed(swarm, &info.observed_addr);
        if info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
            let retry = self.failed.remove(&peer);
            let addrs: Vec<Multiaddr> = info
                .listen_addrs
                .iter()
                .filter(|a| !is_relayed(a) && super::peers::is_dialable(a))
                .filter(|a| !fogmesh_ble::is_ble(a))
                .cloned()
                .collect();
            let known = self.candidates.contains_key(&peer);
            if !addrs.is_empty() {
                self.candidates.insert(peer, addrs);
            }
            if (retry || !known) && !self.reservations.contains_key(&peer) {
                self.maintain(swarm);
            }
        } else {
            self.candidates.remove(&peer);
        }
    }

    /// AutoNAT's events: a status change re-decides everything.
    pub(super) fn on_autonat(&mut self, swarm: &mut Swarm<Behaviour>, ev: autonat::Event) {
        match ev {
            autonat::Event::StatusChanged { old, new } => {
                tracing::info!(?old, ?new, "reachability changed");
                self.reach = match new {
                    autonat::NatStatus::Public(_) => NatReachability::Public,
                    autonat::NatStatus::Private => NatReachability::Private,
                    autonat::NatStatus::Unknown => NatReachability::Unknown,
                };
                self.settled |= self.reach != NatReachability::Unknown;
                self.apply(swarm);
            }
            autonat::Event::OutboundProbe(ev) => {
                tracing::debug!(?ev, "autonat probe");
                if matches!(
                    ev,
                    autonat::OutboundProbeEvent::Response { .. }
                        | autonat::OutboundProbeEvent::Error { .. }
                ) {
                    self.keep_doubting(swarm);
                }
            }
            autonat::Event::InboundProbe(ev) => tracing::debug!(?ev, "autonat dial-back asked"),
        }
    }

    /// The relay client's events.
    pub(super) fn on_relay_client(&mut self, ev: relay::client::Event) {
        match ev {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            } => {
                tracing::info!(relay = %relay_peer_id, renewal, "relay reservation accepted");
            }
            other => tracing::debug!(?other, "relay client"),
        }
    }

    /// The relay server's events (only logged).
    pub(super) fn on_relay_server(&self, ev: relay::Event) {
        tracing::debug!(?ev, "relay server");
    }

    /// A hole punch ended; on success the caller closes the relayed
    /// connections, so that every protocol uses the direct one.
    pub(super) fn on_dcutr(&self, ev: &dcutr::Event) -> Option<PeerId> {
        match &ev.result {
            Ok(_) => {
                tracing::info!(peer = %ev.remote_peer_id, "hole punch succeeded: direct connection");
                Some(ev.remote_peer_id)
            }
            Err(e) => {
                tracing::info!(peer = %ev.remote_peer_id, "hole punch failed: {e}");
                None
            }
        }
    }

    /// A private node short of relays with no untried candidate dials the
    /// peers it discovers whatever its peer count: one may offer relaying.
    pub(super) fn wants_relays(&self) -> bool {
        self.reach == NatReachability::Private
            && self.reservations.len() < WANTED_RELAYS
            && self
                .candidates
                .keys()
                .all(|p| self.reservations.contains_key(p) || self.failed.contains(p))
    }

    /// Periodic: relays that failed get another chance, then
    /// [`Self::maintain`].
    pub(super) fn tick(&mut self, swarm: &mut Swarm<Behaviour>) {
        self.failed.clear();
        self.maintain(swarm);
    }

    /// Keeps the reservations the node needs: on every `--relay` (unless
    /// public), and up to [`WANTED_RELAYS`] in all while private. Relays
    /// that failed wait for the next [`Self::tick`] (or for identify to
    /// show them offering relaying again).
    pub(super) fn maintain(&mut self, swarm: &mut Swarm<Behaviour>) {
        if self.reach == NatReachability::Public {
            // A public node needs no relay, and its own relay server must
            // advertise only its own addresses.
            for (peer, r) in self.reservations.drain() {
                tracing::info!(relay = %peer, "public: reservation released");
                swarm.remove_listener(r.listener);
            }
            return;
        }
        let configured = self.configured.clone();
        for (peer, addr) in configured {
            if !self.reservations.contains_key(&peer) && !self.failed.contains(&peer) {
                self.reserve(swarm, peer, addr);
            }
        }
        if self.reach != NatReachability::Private || self.reservations.len() >= WANTED_RELAYS {
            return;
        }
        let mut picks: Vec<(PeerId, Multiaddr)> = self
            .candidates
            .iter()
            .filter(|(p, _)| !self.reservations.contains_key(p) && !self.failed.contains(p))
            .filter_map(|(p, addrs)| addrs.first().map(|a| (*p, a.clone())))
            .collect();
        // Connected relays first: a reservation on them costs no dial.
        picks.sort_by_key(|(p, _)| !swarm.is_connected(p));
        let need = WANTED_RELAYS - self.reservations.len();
        for (peer, addr) in picks.into_iter().take(need) {
            self.reserve(swarm, peer, addr);
        }
    }

    fn reserve(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, addr: Multiaddr) {
        let mut circuit = addr;
        if !matches!(circuit.iter().last(), Some(Protocol::P2p(_))) {
            circuit.push(Protocol::P2p(peer));
        }
        circuit.push(Protocol::P2pCircuit);
        match swarm.listen_on(circuit.clone()) {
            Ok(listener) => {
                tracing::info!(%circuit, "reserving a relay slot");
                self.reservations.insert(peer, Reservation { listener });
            }
            Err(e) => tracing::warn!(%circuit, "cannot reserve on the relay: {e}"),
        }
    }
}

/// Whether an address goes through a circuit relay.
pub(super) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// Makes AutoNAT (not public) doubt its status: each candidate address
/// costs it a point of confidence and brings its next probe forward to its
/// retry interval; at zero, the next probe that disagrees flips it.
fn doubt(autonat: &mut autonat::Behaviour, candidate: Option<&Multiaddr>) {
    if let Some(c) = candidate {
        for _ in 0..autonat.confidence().max(1) {
            autonat.probe_address(c.clone());
        }
    }
}

/// Whether a listen address is a direct IP one whose coming or going
/// changes the node's reachability (not relayed, not loopback, not
/// unspecified, not BLE).
fn is_network_addr(addr: &Multiaddr) -> bool {
    let ip_ok = match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => !ip.is_loopback() && !ip.is_unspecified(),
        Some(Protocol::Ip6(ip)) => !ip.is_loopback() && !ip.is_unspecified(),
        _ => false,
    };
    ip_ok && !is_relayed(addr) && !fogmesh_ble::is_ble(addr)
}

/// Whether an address starts with a public IP (what AutoNAT v1 judges by
/// default).
fn is_global_ip(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => {
            !(ip.is_private()
                || ip.is_loopback()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || ip.is_documentation()
                // 100.64.0.0/10, carrier-grade NAT.
                || (ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64))
        }
        Some(Protocol::Ip6(ip)) => {
            let seg = ip.segments()[0];
            !(ip.is_loopback()
                || ip.is_unspecified()
                || (seg & 0xfe00) == 0xfc00
                || (seg & 0xffc0) == 0xfe80)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ma(s: &str) -> Multiaddr {
        s.parse().expect("multiaddr")
    }

    #[test]
    fn relayed_addresses() {
        assert!(is_relayed(&ma(
            "/ip4/1.2.3.4/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit"
        )));
        assert!(!is_relayed(&ma("/ip4/1.2.3.4/tcp/1")));
    }

    #[test]
    fn network_addresses() {
        assert!(is_network_addr(&ma("/ip4/10.0.1.2/tcp/4001")));
        assert!(is_network_addr(&ma("/ip6/2001:db9::1/udp/1/quic-v1")));
        assert!(!is_network_addr(&ma("/ip4/127.0.0.1/tcp/4001")));
        assert!(!is_network_addr(&ma("/ip4/0.0.0.0/tcp/4001")));
        assert!(!is_network_addr(&ma(
            "/ip4/1.2.3.4/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit"
        )));
        assert!(!is_network_addr(&ma("/memory/4")));
    }

    #[test]
    fn global_ips() {
        assert!(is_global_ip(&ma("/ip4/1.2.3.4/tcp/1")));
        assert!(!is_global_ip(&ma("/ip4/10.0.0.1/tcp/1")));
        assert!(!is_global_ip(&ma("/ip4/127.0.0.1/tcp/1")));
        assert!(!is_global_ip(&ma("/ip4/100.64.1.1/tcp/1")));
        assert!(!is_global_ip(&ma("/ip6/fd00::1/tcp/1")));
        assert!(is_global_ip(&ma("/ip6/2001:db9::1/tcp/1")));
        assert!(!is_global_ip(&ma("/memory/4")));
    }

    #[test]
    fn unknown_reachability_serves_only_on_unjudged_networks() {
        let mut n = NatNet::new(KadMode::Auto, NatConfig::default(), Vec::new());
        assert_eq!(n.wanted_kad_mode(), kad::Mode::Server);
        n.internet_evidence = true;
        assert_eq!(n.wanted_kad_mode(), kad::Mode::Client);
        n.reach = NatReachability::Public;
        assert_eq!(n.wanted_kad_mode(), kad::Mode::Server);
        let test_net = NatConfig {
            autonat_private_addrs: true,
            ..NatConfig::default()
        };
        let n = NatNet::new(KadMode::Auto, test_net, Vec::new());
        assert_eq!(n.wanted_kad_mode(), kad::Mode::Client);
        let forced = NatNet::new(KadMode::Server, NatConfig::default(), Vec::new());
        assert_eq!(forced.wanted_kad_mode(), kad::Mode::Server);
    }
}
