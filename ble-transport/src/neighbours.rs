//! Which BLE neighbours to dial, and when: a sans-IO rule over what the
//! radio hears ([`Neighbour`] events) and the node's links.
//!
//! Two nodes that hear each other must not both dial (two links between the
//! same pair waste one of the few a radio keeps), yet one of them must
//! dial soon. The rule:
//! - never a neighbour we are linked to over BLE, nor one whose peer hint
//!   belongs to a peer we are connected to over any route, nor ourselves
//!   (heard through another radio);
//! - never above [`DialRules::max_links`];
//! - of two neighbours, the one with the lower peer hint dials first; the
//!   other dials too once it has heard the first for
//!   [`DialRules::grace`] without a link coming up;
//! - at most one dial per neighbour every [`DialRules::redial`].
//!
//! Nothing here reads the clock: every call takes `now`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::addr::DeviceAddr;
use crate::advert::Advert;
use crate::radio::Neighbour;

/// The dial rule's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DialRules {
    /// Most BLE links a node keeps (phones keep 6 to 8). Default 7.
    pub max_links: usize,
    /// How long the higher hint waits for the lower one to dial. Default
    /// 8 s.
    pub grace: Duration,
    /// Least time between two dials of one neighbour. Default 5 s.
    pub redial: Duration,
}

impl Default for DialRules {
    fn default() -> Self {
        DialRules {
            max_links: 7,
            grace: Duration::from_secs(8),
            redial: Duration::from_secs(5),
        }
    }
}

/// The node's links, as the rule needs to see them.
#[derive(Debug, Clone, Default)]
pub struct Links {
    /// BLE connections open now.
    pub ble_links: usize,
    /// Devices we have a BLE connection with.
    pub devices: HashSet<DeviceAddr>,
    /// Peer hints of every peer we are connected to, over any route.
    pub peer_hints: HashSet<[u8; 6]>,
}

#[derive(Debug, Clone)]
struct Heard {
    advert: Advert,
    since: Instant,
    last_dial: Option<Instant>,
}

/// The fogmesh nodes heard now, and when each was last dialled.
#[derive(Debug, Clone)]
pub struct Neighbours {
    own_hint: [u8; 6],
    rules: DialRules,
    heard: HashMap<DeviceAddr, Heard>,
}

impl Neighbours {
    /// An empty neighbourhood of the node whose peer hint is `own_hint`.
    pub fn new(own_hint: [u8; 6], rules: DialRules) -> Self {
        Neighbours {
            own_hint,
            rules,
            heard: HashMap::new(),
        }
    }

    /// How many neighbours are heard.
    pub fn len(&self) -> usize {
        self.heard.len()
    }

    /// Whether no neighbour is heard.
    pub fn is_empty(&self) -> bool {
        self.heard.is_empty()
    }

    /// The rule's settings.
    pub fn rules(&self) -> DialRules {
        self.rules
    }

    /// Takes in what the radio heard; returns the device to consider
    /// dialling (with [`Neighbours::dial`]) when one was found.
    pub fn on_event(&mut self, event: Neighbour, now: Instant) -> Option<DeviceAddr> {
        match event {
            Neighbour::Found { device, advert, .. } => {
                self.heard
                    .entry(device)
                    .and_modify(|h| h.advert = advert)
                    .or_insert(Heard {
                        advert,
                        since: now,
                        last_dial: None,
                    });
                Some(device)
            }
            Neighbour::Lost { device } => {
                self.heard.remove(&device);
                None
            }
        }
    }

    /// Whether to dial `device` now; if so, the dial is recorded (the
    /// caller dials).
    pub fn dial(&mut self, device: DeviceAddr, links: &Links, now: Instant) -> bool {
        if links.devices.contains(&device) || links.ble_links >= self.rules.max_links {
            return false;
        }
        let Some(n) = self.heard.get_mut(&device) else {
            return false;
        };
        let theirs = n.advert.peer_hint;
        if theirs == self.own_hint || links.peer_hints.contains(&theirs) {
            return false;
        }
        if self.own_hint > theirs && now.saturating_duration_since(n.since) < self.rules.grace {
            return false; // Their turn to dial.
        }
        if n.last_dial
            .is_some_and(|t| now.saturating_duration_since(t) < self.rules.redial)
        {
            return false;
        }
        n.last_dial = Some(now);
        true
    }

    /// Every neighbour to dial now (the periodic retry); each is recorded
    /// as dialled.
    pub fn due(&mut self, links: &Links, now: Instant) -> Vec<DeviceAddr> {
        let mut devices: Vec<DeviceAddr> = self.heard.keys().copied().collect();
        devices.sort();
        let mut out = Vec::new();
        let mut links = links.clone();
        for d in devices {
            if self.dial(d, &links, now) {
                // A dial in flight counts against the link limit.
                links.ble_links += 1;
                out.push(d);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(n: u8) -> DeviceAddr {
        DeviceAddr([0x02, 0, 0, 0, 0, n])
    }

    fn found(n: u8, hint: u8) -> Neighbour {
        Neighbour::Found {
            device: dev(n),
            advert: Advert {
                psm: None,
                peer_hint: [hint; 6],
            },
            rssi: None,
        }
    }

    #[test]
    fn the_lower_hint_dials_first_the_other_after_the_grace() {
        let t0 = Instant::now();
        let rules = DialRules::default();
        let links = Links::default();
        let mut low = Neighbours::new([1; 6], rules);
        let mut high = Neighbours::new([9; 6], rules);
        assert_eq!(low.on_event(found(9, 9), t0), Some(dev(9)));
        assert_eq!(high.on_event(found(1, 1), t0), Some(dev(1)));
        assert!(low.dial(dev(9), &links, t0));
        assert!(!high.dial(dev(1), &links, t0));
        assert!(!high.dial(dev(1), &links, t0 + rules.grace - Duration::from_millis(1)));
        assert!(high.dial(dev(1), &links, t0 + rules.grace));
    }

    #[test]
    fn redials_wait_and_links_are_never_doubled() {
        let t0 = Instant::now();
        let rules = DialRules::default();
        let mut n = Neighbours::new([1; 6], rules);
        n.on_event(found(5, 5), t0);
        let mut links = Links::default();
        assert!(n.dial(dev(5), &links, t0));
        assert!(!n.dial(dev(5), &links, t0 + rules.redial / 2));
        assert!(n.dial(dev(5), &links, t0 + rules.redial));
        // Linked over BLE, or connected to that node another way: no dial.
        links.devices.insert(dev(5));
        assert!(!n.dial(dev(5), &links, t0 + rules.redial * 3));
        links.devices.clear();
        links.peer_hints.insert([5; 6]);
        assert!(!n.dial(dev(5), &links, t0 + rules.redial * 3));
    }

    #[test]
    fn ourselves_lost_neighbours_and_the_link_limit() {
        let t0 = Instant::now();
        let rules = DialRules {
            max_links: 2,
            ..DialRules::default()
        };
        let mut n = Neighbours::new([1; 6], rules);
        n.on_event(found(1, 1), t0);
        assert!(!n.dial(dev(1), &Links::default(), t0), "our own advert");
        for d in 2..6 {
            n.on_event(found(d, d), t0);
        }
        assert_eq!(n.due(&Links::default(), t0), vec![dev(2), dev(3)]);
        assert_eq!(n.on_event(Neighbour::Lost { device: dev(4) }, t0), None);
        assert_eq!(n.len(), 4);
        let full = Links {
            ble_links: 2,
            ..Links::default()
        };
        assert!(n.due(&full, t0 + rules.redial).is_empty());
    }
}
