//! A libp2p transport over Bluetooth Low Energy.
//!
//! - [`BleTransport`]: a libp2p `Transport` whose connections are byte pipes
//!   over BLE links; the node upgrades them with Noise and Yamux like any
//!   other connection.
//! - [`Radio`]: everything the transport needs from a BLE stack. Backends:
//!   [`sim::SimRadio`] and [`sim::SocketRadio`] (the simulated medium, in
//!   process or over a unix socket) and, with the `bluez` feature,
//!   `bluez::BluezRadio` (BlueZ over D-Bus through `bluer`).
//! - [`addr`]: the address scheme (`/ip6zone/ble-<device>`), [`advert`]: what
//!   a node advertises.
//!
//! The wire format is specified in docs/protocols/ble.md.
#![warn(missing_docs)]

pub mod addr;
pub mod advert;
pub mod framing;
#[doc(hidden)]
pub mod fuzz;
// The GATT framing is the BlueZ backend's, built without the feature so
// that it is tested and fuzzed everywhere.
#[path = "bluez/frame.rs"]
pub mod gatt;
pub mod neighbours;
pub mod radio;
pub mod sim;
mod transport;

#[cfg(feature = "bluez")]
pub mod bluez;

pub use addr::{DeviceAddr, device_multiaddr, is_ble, listen_addr};
pub use advert::{Advert, peer_hint};
pub use neighbours::{DialRules, Links, Neighbours};
pub use radio::{DataPath, Link, LinkIo, LinkLimits, Neighbour, Radio};
pub use transport::{BleStream, BleTransport, DIAL_TIMEOUT};

/// The GATT service UUID fogmesh nodes advertise, so that neighbours can
/// tell them apart from other BLE devices.
pub const SERVICE_UUID: &str = "6d0f0a40-5b7e-4c8e-9d3f-66f0676d6573";
