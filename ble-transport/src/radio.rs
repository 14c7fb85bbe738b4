//! The radio: everything the transport needs from a BLE stack, behind one
//! trait, so that BlueZ and the simulated radio are interchangeable.

use std::fmt;
use std::io;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::io::{AsyncRead, AsyncWrite};
use futures::stream::BoxStream;

use crate::addr::DeviceAddr;
use crate::advert::Advert;

/// A byte pipe to a neighbour: what libp2p's upgrade (Noise, Yamux) runs on.
pub trait LinkIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> LinkIo for T {}

/// How the bytes of a link travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// An L2CAP connection-oriented channel (stream semantics, credit-based
    /// flow control in the controller).
    L2cap,
    /// GATT writes to the peer's data characteristic, framed (the fallback
    /// when no L2CAP channel can be opened).
    Gatt,
    /// The simulated radio.
    Simulated,
}

/// An open link to a neighbour.
pub struct Link {
    /// The device at the other end.
    pub remote: DeviceAddr,
    /// How its bytes travel.
    pub path: DataPath,
    /// The byte pipe.
    pub io: Box<dyn LinkIo>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("remote", &self.remote)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A change in what the radio hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Neighbour {
    /// A fogmesh node is advertising within range (repeated when its
    /// advertisement changes).
    Found {
        /// Its device address.
        device: DeviceAddr,
        /// Its advertisement.
        advert: Advert,
        /// Received signal strength, when the radio reports it.
        rssi: Option<i16>,
    },
    /// It is no longer heard.
    Lost {
        /// Its device address.
        device: DeviceAddr,
    },
}

/// What a radio's links can carry, for timeouts and limits above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkLimits {
    /// Largest payload of one radio packet.
    pub mtu: usize,
    /// Expected throughput of one link, bytes per second.
    pub bandwidth: u64,
    /// Expected one-way latency.
    pub latency: Duration,
}

impl LinkLimits {
    /// How long `bytes` should take to cross one link, with a safety
    /// factor of 3 and a floor of 10 s: what request timeouts over BLE
    /// are scaled by.
    pub fn timeout_for(&self, bytes: u64) -> Duration {
        let secs = bytes as f64 / self.bandwidth.max(1) as f64;
        Duration::from_secs_f64(secs * 3.0 + 10.0) + self.latency * 4
    }
}

/// Incoming links, once listening.
pub type Incoming = BoxStream<'static, io::Result<Link>>;

/// A BLE radio.
///
/// Implementations: [`crate::sim::SimRadio`] (in-process medium),
/// [`crate::sim::SocketRadio`] (a medium in another process, over a unix
/// socket) and, with the `bluez` feature, `crate::bluez::BluezRadio`.
pub trait Radio: Send + Sync + fmt::Debug + 'static {
    /// This radio's own device address.
    fn address(&self) -> DeviceAddr;

    /// What one link carries.
    fn limits(&self) -> LinkLimits;

    /// Starts advertising `advert` (the backend fills in the PSM it opened,
    /// if any) and accepting links. Called once per listener; links arrive
    /// on the returned stream until it is dropped, which stops advertising.
    fn listen(&self, advert: Advert) -> BoxFuture<'static, io::Result<Incoming>>;

    /// Starts scanning for fogmesh nodes. Every call gets its own stream,
    /// which first reports the nodes already in range.
    fn scan(&self) -> BoxStream<'static, Neighbour>;

    /// Opens a link to a device in range.
    fn connect(&self, to: DeviceAddr) -> BoxFuture<'static, io::Result<Link>>;
}
