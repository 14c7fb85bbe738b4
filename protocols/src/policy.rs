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

use std::fmt;

/// A way of reaching a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// What the sender asks of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirements {
    /// The user's explicit route choice.
    pub preference: Preference,
    /// Hide who talks to whom: only onion routes qualify.
    pub private: bool,
    /// Broadcast or unicast.
    pub delivery: Delivery,
}

impl Requirements {
    /// A unicast message with no special requirement.
    pub fn unicast() -> Self {
        Requirements {
            preference: Preference::Auto,
            private: false,
            delivery: Delivery::Unicast,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Reachability = Reachability {
        internet: true,
        ble: true,
        onion: true,
    };

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
    fn route_names_round_trip() {
        for r in Route::BY_SPEED {
            assert_eq!(r.as_str().parse::<Route>().ok(), Some(r));
        }
        assert!("carrier-pigeon".parse::<Route>().is_err());
    }
}
