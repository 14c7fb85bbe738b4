//! The BLE address scheme.
//!
//! rust-multiaddr has a closed list of protocols, so a BLE address has to be
//! spelt with one that exists. We use `ip6zone`, whose value is a free-form
//! string, with a `ble-` prefix and the device address:
//!
//! ```text
//! /ip6zone/ble-aa:bb:cc:dd:ee:ff            a device
//! /ip6zone/ble-aa:bb:cc:dd:ee:ff/p2p/12D3…  a device and the peer behind it
//! /ip6zone/ble                               what a node listens on
//! ```
//!
//! A bare `ip6zone` (without a following `ip6`) is meaningless to every
//! other transport, so TCP, QUIC, DNS and the memory transport all answer
//! `MultiaddrNotSupported` and never touch the network for it. These
//! addresses are only meaningful to nodes within radio range: the node never
//! announces them to internet peers (see docs/protocols/ble.md).

use std::fmt;
use std::str::FromStr;

use libp2p_core::multiaddr::{Multiaddr, Protocol};

/// The prefix of a BLE `ip6zone` value.
const PREFIX: &str = "ble";

/// A 48-bit Bluetooth device address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DeviceAddr(pub [u8; 6]);

impl fmt::Display for DeviceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for DeviceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A device address that is not six colon-separated hex bytes.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid Bluetooth device address {0:?} (expected six hex bytes like aa:bb:cc:dd:ee:ff)")]
pub struct InvalidDeviceAddr(pub String);

impl FromStr for DeviceAddr {
    type Err = InvalidDeviceAddr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidDeviceAddr(s.chars().take(64).collect());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for b in &mut out {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(DeviceAddr(out))
    }
}

impl serde::Serialize for DeviceAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a BLE multiaddr names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BleAddr {
    /// `/ip6zone/ble`: listen on this node's own radio.
    Listen,
    /// `/ip6zone/ble-<device>`: a device in range.
    Device(DeviceAddr),
}

/// The address a node listens on for BLE links.
pub fn listen_addr() -> Multiaddr {
    Multiaddr::empty().with(Protocol::Ip6zone(PREFIX.into()))
}

/// The multiaddr of a device.
pub fn device_multiaddr(device: DeviceAddr) -> Multiaddr {
    Multiaddr::empty().with(Protocol::Ip6zone(format!("{PREFIX}-{device}").into()))
}

/// Parses a BLE multiaddr, accepting a trailing `/p2p/<peer>`. `None` for
/// anything that is not a BLE address (so the transport can answer
/// `MultiaddrNotSupported`).
pub fn parse(addr: &Multiaddr) -> Option<BleAddr> {
    let mut it = addr.iter();
    let Some(Protocol::Ip6zone(zone)) = it.next() else {
        return None;
    };
    match it.next() {
        None | Some(Protocol::P2p(_)) => {}
        Some(_) => return None,
    }
    if it.next().is_some() {
        return None;
    }
    if zone == PREFIX {
        return Some(BleAddr::Listen);
    }
    let dev = zone.strip_prefix(PREFIX)?.strip_prefix('-')?;
    dev.parse().ok().map(BleAddr::Device)
}

/// Whether a multiaddr is a BLE address (never to be told to internet
/// peers).
pub fn is_ble(addr: &Multiaddr) -> bool {
    parse(addr).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let d = DeviceAddr([0xaa, 0xbb, 0xcc, 0x01, 0x02, 0x03]);
        let m = device_multiaddr(d);
        assert_eq!(m.to_string(), "/ip6zone/ble-aa:bb:cc:01:02:03");
        let parsed: Multiaddr = m.to_string().parse().expect("rust-multiaddr parses it");
        assert_eq!(parse(&parsed), Some(BleAddr::Device(d)));
        assert_eq!(parse(&listen_addr()), Some(BleAddr::Listen));
        let peer = libp2p_identity::PeerId::random();
        assert_eq!(
            parse(&m.clone().with(Protocol::P2p(peer))),
            Some(BleAddr::Device(d))
        );
    }

    #[test]
    fn rejects_other_addresses() {
        for s in [
            "/ip4/127.0.0.1/tcp/1",
            "/memory/5",
            "/ip6zone/eth0/ip6/fe80::1/tcp/1",
            "/ip6zone/ble-zz:bb:cc:01:02:03",
            "/ip6zone/ble-aa:bb:cc:01:02",
            "/ip6zone/blex",
            "/ip6zone/ble/tcp/1",
        ] {
            let m: Multiaddr = s.parse().expect("valid multiaddr");
            assert_eq!(parse(&m), None, "{s}");
        }
    }
}
