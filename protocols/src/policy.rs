//! The routing policy: for each outbound message, which route to try, in
//! which order.
//!
//! This is a sans-IO decision function. The node asks it for a [`RoutePlan`]
//! before sending anything to a peer, tries the routes in the plan's order
//! (failover), and falls back to store-and-forward when the plan says no
//! route is up. Nothing here does I/O or reads the clock, so the simulator and
//! tests can drive it directly.
//!
//! The order of precedence is the product's, and the same for every kind of
//! traffic:
//! 1. the user's explicit choice ([`Preference::Only`]), if that route is up;
//! 2. reachability: with no internet, only BLE can work;
//! 3. privacy: a private message goes through onion relays or not at all;
//! 4. broadcast (group gossip) versus unicast (requests to one peer);
//! 5. otherwise the fastest route that is up.
//!
//! Only [`Route::Internet`] is implemented by the node today; the other
//! routes are part of the type so that new transports slot in here rather
//! than in each protocol.
//!
//! Within the internet route, a peer may be reachable only through a
//! circuit relay (both behind NATs, before hole punching succeeded). A
//! relay resets a circuit after [`CIRCUIT_MAX_BYTES`] or
//! [`CIRCUIT_MAX_DURATION_SECS`], and rust-libp2p has no "limited
//! connection" gate of its own, so [`Policy::over_link`] decides per
//! message what may use such a link: [`Volume::Small`] traffic (gossip,
//! sync summaries, small fetches, have-maps) goes over it, [`Volume::Bulk`]
//! traffic (file chunks and manifests, large sync fetches) waits for a
//! direct connection.

use std::fmt;

/// A way of reaching a peer.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Route {
    /// A direct libp2p connection over TCP or QUIC.
    Internet,
    /// A libp2p connection over a Bluetooth Low Energy link, possibly
    /// multi-hop through gossip.
    Ble,
    /// Sphinx packets through onion relays.
    Onion,
}

impl Route {
    /// Every route, fastest first. This order is the tie-breaker of the
    /// policy when nothing else decides.
    pub const BY_SPEED: [Route; 3] = [Route::Internet, Route::Ble, Route::Onion];

    /// A short lowercase name, as used in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Internet => "internet",
            Route::Ble => "ble",
            Route::Onion => "onion",
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Route {
    type Err = UnknownRoute;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "internet" => Ok(Route::Internet),
            "ble" => Ok(Route::Ble),
            "onion" => Ok(Route::Onion),
            other => Err(UnknownRoute(other.to_owned())),
        }
    }
}

/// A route name that is not one of `internet`, `ble`, `onion`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown route {0:?} (expected one of: internet, ble, onion)")]
pub struct UnknownRoute(pub String);

/// What the user asked for, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preference {
    /// No explicit choice: the policy decides.
    #[default]
    Auto,
    /// Use this route and no other.
    Only(Route),
}

/// The shape of the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// To every member of a group (gossip).
    Broadcast,
    /// To one peer.
    Unicast,
}

/// How much a message (and the answer it asks for) may carry, as far as
/// a relayed link cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Volume {
    /// A few KiB at most: fits many times in a circuit's byte budget.
    #[default]
    Small,
    /// Bulk data (file chunks, manifests, large sync fetches): would
    /// exhaust a circuit's budget or outlive it.
    Bulk,
}

/// What the node knows of its link to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerLink {
    /// At least one direct connection (TCP, QUIC, BLE).
    Direct,
    /// Connected, but only through circuit relays.
    RelayedOnly,
    /// Not connected: sending dials the peer.
    NotConnected,
}

/// The policy's answer for one message over one peer's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkDecision {
    /// Send it now.
    Send,
    /// Do not send it over the relayed connection: fail fast and retry
    /// once a direct connection exists (hole punching may bring one).
    WaitForDirect,
}

/// Byte budget of one relayed circuit (circuit relay v2's default, which
/// the node's own relay server keeps).
pub const CIRCUIT_MAX_BYTES: u64 = 128 * 1024;
/// Lifetime of one relayed circuit, seconds (relay v2's default).
pub const CIRCUIT_MAX_DURATION_SECS: u64 = 120;
/// Largest message treated as [`Volume::Small`] by
/// [`Requirements::for_size`]: an eighth of a circuit's budget.
pub const SMALL_MESSAGE_MAX: u64 = CIRCUIT_MAX_BYTES / 8;

/// What the sender asks of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirements {
    /// The user's explicit route choice.
    pub preference: Preference,
    /// Hide who talks to whom: only onion routes qualify.
    pub private: bool,
    /// Broadcast or unicast.
    pub delivery: Delivery,
    /// Small or bulk (what a relayed link may carry).
    pub volume: Volume,
}

impl Requirements {
    /// A unicast message with no special requirement.
    pub fn unicast() -> Self {
        Requirements {
            preference: Preference::Auto,
            private: false,
            delivery: Delivery::Unicast,
            volume: Volume::Small,
        }
    }

    /// A unicast exchange of bulk data (file chunks, large fetches).
    pub fn bulk() -> Self {
        Requirements {
            volume: Volume::Bulk,
            ..Self::unicast()
        }
    }

    /// A unicast message whose exchange is expected to move `bytes`:
    /// small up to [`SMALL_MESSAGE_MAX`], bulk above.
    pub fn for_size(bytes: u64) -> Self {
        if bytes <= SMALL_MESSAGE_MAX {
            Self::unicast()
        } else {
            Self::bulk()
        }
    }

    /// A broadcast message with no special requirement.
    pub fn broadcast() -> Self {
        Requirements {
            delivery: Delivery::Broadcast,
            ..Self::unicast()
        }
    }
}

/// What the node knows about its own connectivity right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reachability {
    /// An IP transport is enabled (the node was not started with
    /// `--no-internet`).
    pub internet: bool,
    /// A BLE radio is enabled.
    pub ble: bool,
    /// Enough onion relays are known to build a path.
    pub onion: bool,
}

impl Reachability {
    fn is_up(&self, route: Route) -> bool {
        match route {
            Route::Internet => self.internet,
            Route::Ble => self.ble,
            Route::Onion => self.onion,
        }
    }
}

/// The policy's answer: routes to try in order, then what to do when all of
/// them fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// Routes to try, first to last. Empty when none is up.
    pub routes: Vec<Route>,
    /// Keep the message and retry when a route comes up, rather than
    /// failing, once `routes` are exhausted.
    pub store_and_forward: bool,
}

impl RoutePlan {
    /// The first route to try, if any.
    pub fn first(&self) -> Option<Route> {
        self.routes.first().copied()
    }
}

/// Chooses routes for outbound traffic. See the module documentation for the
/// order of precedence.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Whether messages that cannot be sent now are kept for later.
    /// Store-and-forward is the default for broadcasts (group messages are
    /// durable); unicast requests fail fast unless this is set.
    pub store_unicast: bool,
}

impl Policy {
    /// Decides the routes for one message.
    pub fn plan(&self, req: &Requirements, reach: &Reachability) -> RoutePlan {
        let store_and_forward = match req.delivery {
            Delivery::Broadcast => true,
            Delivery::Unicast => self.store_unicast,
        };
        let routes: Vec<Route> = match req.preference {
            // 1. An explicit choice overrides everything, but only if up.
            Preference::Only(route) => {
                if reach.is_up(route) {
                    vec![route]
                } else {
                    Vec::new()
                }
            }
            Preference::Auto => {
                let candidates: &[Route] = if req.private {
                    // 3. Privacy: nothing but onion relays.
                    &[Route::Onion]
                } else {
                    match req.delivery {
                        // 4. Gossip has no onion variant: broadcast goes over
                        // whatever carries the mesh, fastest first.
                        Delivery::Broadcast => &[Route::Internet, Route::Ble],
                        Delivery::Unicast => &Route::BY_SPEED,
                    }
                };
                // 2 and 5: reachable routes only, fastest first; with no
                // internet this leaves BLE.
                candidates
                    .iter()
                    .copied()
                    .filter(|r| reach.is_up(*r))
                    .collect()
            }
        };
        RoutePlan {
            routes,
            store_and_forward,
        }
    }

    /// Decides whether one message may go over the link the node has to
    /// its peer now. Bulk traffic never goes over a relayed-only link: the
    /// relay would cut the circuit mid-transfer (128 KiB, 2 minutes), so
    /// it waits for a direct connection instead. Everything else goes; a
    /// peer not connected is dialled (which may bring a direct link).
    pub fn over_link(&self, req: &Requirements, link: PeerLink) -> LinkDecision {
        match (link, req.volume) {
            (PeerLink::RelayedOnly, Volume::Bulk) => LinkDecision::WaitForDirect,
            _ => LinkDecision::Send,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Reachability = Reachability {
        internet: true,
        ble: true,
        onion: true,
    };

    /// The precedence of the design, one row each: (what is up, what the
    /// message asks, the plan).
    #[test]
    fn routing_table() {
        use Route::{Ble, Internet, Onion};
        let up = |internet, ble, onion| Reachability {
            internet,
            ble,
            onion,
        };
        let req = |preference, private, delivery| Requirements {
            preference,
            private,
            delivery,
            volume: Volume::Small,
        };
        let auto = Preference::Auto;
        let uni = Delivery::Unicast;
        let bcast = Delivery::Broadcast;
        let rows: Vec<(&str, Reachability, Requirements, Vec<Route>)> = vec![
            // 1. The user's explicit route, alone, if up...
            (
                "explicit",
                up(true, true, true),
                req(Preference::Only(Ble), false, uni),
                vec![Ble],
            ),
            (
                "explicit beats private",
                up(true, true, true),
                req(Preference::Only(Internet), true, uni),
                vec![Internet],
            ),
            // ...and nothing else when it is down: the message waits for it.
            (
                "explicit but down",
                up(true, false, false),
                req(Preference::Only(Ble), false, uni),
                vec![],
            ),
            // 2. Offline means BLE.
            (
                "offline",
                up(false, true, false),
                req(auto, false, uni),
                vec![Ble],
            ),
            (
                "offline broadcast",
                up(false, true, false),
                req(auto, false, bcast),
                vec![Ble],
            ),
            // 3. Private: onion only, or nothing.
            (
                "private",
                up(true, true, true),
                req(auto, true, uni),
                vec![Onion],
            ),
            (
                "private, no onion",
                up(true, true, false),
                req(auto, true, uni),
                vec![],
            ),
            // 4. Broadcast never goes by onion; unicast may.
            (
                "broadcast",
                up(true, true, true),
                req(auto, false, bcast),
                vec![Internet, Ble],
            ),
            (
                "unicast",
                up(true, true, true),
                req(auto, false, uni),
                vec![Internet, Ble, Onion],
            ),
            // 5. Otherwise the fastest up first, the rest as failover.
            (
                "fastest",
                up(true, true, false),
                req(auto, false, uni),
                vec![Internet, Ble],
            ),
            (
                "internet only",
                up(true, false, false),
                req(auto, false, uni),
                vec![Internet],
            ),
            // Nothing up: nothing to try (broadcast is stored, unicast fails).
            (
                "nothing up",
                up(false, false, false),
                req(auto, false, uni),
                vec![],
            ),
        ];
        for (name, reach, r, want) in rows {
            assert_eq!(
                Policy::default().plan(&r, &reach).routes,
                want,
                "row {name}"
            );
        }
        let none = up(false, false, false);
        assert!(
            Policy::default()
                .plan(&Requirements::broadcast(), &none)
                .store_and_forward
        );
        assert!(
            !Policy::default()
                .plan(&Requirements::unicast(), &none)
                .store_and_forward
        );
    }

    #[test]
    fn explicit_choice_wins_when_up() {
        let req = Requirements {
            preference: Preference::Only(Route::Ble),
            ..Requirements::unicast()
        };
        assert_eq!(Policy::default().plan(&req, &ALL).routes, vec![Route::Ble]);
    }

    #[test]
    fn explicit_choice_that_is_down_gives_no_route() {
        let req = Requirements {
            preference: Preference::Only(Route::Onion),
            ..Requirements::unicast()
        };
        let reach = Reachability {
            onion: false,
            ..ALL
        };
        let plan = Policy::default().plan(&req, &reach);
        assert!(plan.routes.is_empty());
        assert!(!plan.store_and_forward);
    }

    #[test]
    fn offline_means_ble() {
        let reach = Reachability {
            internet: false,
            ble: true,
            onion: false,
        };
        let plan = Policy::default().plan(&Requirements::unicast(), &reach);
        assert_eq!(plan.routes, vec![Route::Ble]);
    }

    #[test]
    fn private_goes_through_onion_only() {
        let req = Requirements {
            private: true,
            ..Requirements::unicast()
        };
        assert_eq!(
            Policy::default().plan(&req, &ALL).routes,
            vec![Route::Onion]
        );
        let no_onion = Reachability {
            onion: false,
            ..ALL
        };
        assert!(Policy::default().plan(&req, &no_onion).routes.is_empty());
    }

    #[test]
    fn fastest_first_with_failover() {
        let plan = Policy::default().plan(&Requirements::unicast(), &ALL);
        assert_eq!(plan.routes, vec![Route::Internet, Route::Ble, Route::Onion]);
    }

    #[test]
    fn broadcast_is_stored_when_nothing_is_up() {
        let plan = Policy::default().plan(&Requirements::broadcast(), &Reachability::default());
        assert!(plan.routes.is_empty());
        assert!(plan.store_and_forward);
        assert_eq!(plan.first(), None);
    }

    #[test]
    fn bulk_waits_for_a_direct_link() {
        let p = Policy::default();
        assert_eq!(
            p.over_link(&Requirements::bulk(), PeerLink::RelayedOnly),
            LinkDecision::WaitForDirect
        );
        assert_eq!(
            p.over_link(&Requirements::bulk(), PeerLink::Direct),
            LinkDecision::Send
        );
        assert_eq!(
            p.over_link(&Requirements::bulk(), PeerLink::NotConnected),
            LinkDecision::Send
        );
    }

    #[test]
    fn small_things_use_a_relayed_link() {
        let p = Policy::default();
        for req in [Requirements::unicast(), Requirements::broadcast()] {
            assert_eq!(p.over_link(&req, PeerLink::RelayedOnly), LinkDecision::Send);
        }
    }

    #[test]
    fn size_decides_the_volume() {
        assert_eq!(Requirements::for_size(1024).volume, Volume::Small);
        assert_eq!(
            Requirements::for_size(SMALL_MESSAGE_MAX).volume,
            Volume::Small
        );
        assert_eq!(
            Requirements::for_size(SMALL_MESSAGE_MAX + 1).volume,
            Volume::Bulk
        );
        // A chunk-sized exchange can never fit a circuit.
        assert_eq!(
            Requirements::for_size(CIRCUIT_MAX_BYTES).volume,
            Volume::Bulk
        );
    }

    #[test]
    fn volume_does_not_change_routes() {
        let p = Policy::default();
        assert_eq!(
            p.plan(&Requirements::bulk(), &ALL).routes,
            p.plan(&Requirements::unicast(), &ALL).routes
        );
    }

    #[test]
    fn route_names_round_trip() {
        for r in Route::BY_SPEED {
            assert_eq!(r.as_str().parse::<Route>().ok(), Some(r));
        }
        assert!("carrier-pigeon".parse::<Route>().is_err());
    }
}
