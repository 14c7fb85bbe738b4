//! A libp2p transport over Bluetooth Low Energy.
//!
//! Not built yet: this crate reserves its place in the workspace. The plan
//! (see docs/architecture.md) is a `Transport` whose data path is an L2CAP
//! connection-oriented channel (GATT writes as the fallback), with the radio
//! behind one trait and two backends: BlueZ through `bluer` (cargo feature
//! `bluez`) and a simulated radio for tests and the simulator.
#![warn(missing_docs)]

/// The GATT service UUID fogmesh nodes will advertise, so that neighbours
/// can tell them apart from other BLE devices.
pub const SERVICE_UUID: &str = "6d0f0a40-5b7e-4c8e-9d3f-66f0676d6573";
