//! The simulated radio medium: devices at positions in a plane, links
//! between devices within range, each link shaped by a [`LinkModel`].

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, SinkExt, Stream, StreamExt};
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::addr::DeviceAddr;
use crate::advert::Advert;
use crate::framing::PacketIo;
use crate::radio::{DataPath, Incoming, Link, LinkLimits, Neighbour, Radio};

/// How links behave. Every field has a default that is typical of a phone
/// to phone BLE 5 link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkModel {
    /// Devices closer than this (metres) hear each other and can link.
    pub range_m: f64,
    /// Largest payload per radio packet, bytes.
    pub mtu: usize,
    /// Payload throughput of one link, bytes per second, shared by its two
    /// directions (the radio is half-duplex).
    pub bandwidth: u64,
    /// One-way latency of a packet, milliseconds.
    pub latency_ms: f64,
    /// Probability that a packet must be sent again (the link layer is
    /// reliable, so loss costs airtime and delay, not data).
    pub loss: f64,
    /// Mean seconds between random link drops (none when absent).
    pub drop_mean_secs: Option<f64>,
    /// Most simultaneous links per device (phones keep 6 to 8).
    pub max_links: usize,
    /// Seed of the loss and drop draws.
    pub seed: u64,
}

impl Default for LinkModel {
    fn default() -> Self {
        LinkModel {
            range_m: 30.0,
            mtu: 244,
            bandwidth: 20_000,
            latency_ms: 15.0,
            loss: 0.0,
            drop_mean_secs: None,
            max_links: 8,
            seed: 0,
        }
    }
}

impl LinkModel {
    /// The limits a radio on this medium reports.
    pub fn limits(&self) -> LinkLimits {
        LinkLimits {
            mtu: self.mtu,
            bandwidth: self.bandwidth,
            latency: Duration::from_secs_f64(self.latency_ms.max(0.0) / 1000.0),
        }
    }

    /// Checks the figures, so a bad scenario or flag gets a clear error.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.range_m.is_finite() && self.range_m > 0.0) {
            return Err(format!("range must be positive, not {}", self.range_m));
        }
        if !(20..=65_535).contains(&self.mtu) {
            return Err(format!("mtu must be 20 to 65535 bytes, not {}", self.mtu));
        }
        if self.bandwidth < 100 {
            return Err(format!(
                "bandwidth must be at least 100 B/s, not {}",
                self.bandwidth
            ));
        }
        if !(self.latency_ms.is_finite() && (0.0..=10_000.0).contains(&self.latency_ms)) {
            return Err(format!(
                "latency must be 0 to 10000 ms, not {}",
                self.latency_ms
            ));
        }
        if !(0.0..0.95).contains(&self.loss) {
            return Err(format!("loss must be in [0, 0.95), not {}", self.loss));
        }
        if self.max_links == 0 {
            return Err("max_links must be at least 1".into());
        }
        Ok(())
    }
}

/// A point in the plane, metres.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Position {
    /// East.
    pub x: f64,
    /// North.
    pub y: f64,
}

impl Position {
    /// Distance to another point.
    pub fn distance(&self, o: &Position) -> f64 {
        ((self.x - o.x).powi(2) + (self.y - o.y).powi(2)).sqrt()
    }
}

impl std::str::FromStr for Position {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (x, y) = s
            .split_once(',')
            .ok_or_else(|| format!("position {s:?} is not X,Y"))?;
        let p = |v: &str| {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| format!("position {s:?} is not two numbers X,Y"))
        };
        Ok(Position { x: p(x)?, y: p(y)? })
    }
}

/// A device as the medium sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Its address.
    pub device: DeviceAddr,
    /// Where it is.
    pub position: Position,
    /// Whether it advertises (listens for links).
    pub advertising: bool,
    /// Devices it has links with.
    pub links: Vec<DeviceAddr>,
}

struct Dev {
    pos: Position,
    /// Bytes this device has sent over all its links.
    sent: Arc<AtomicU64>,
    advert: Option<Advert>,
    acceptor: Option<mpsc::Sender<io::Result<Link>>>,
    scanners: Vec<mpsc::UnboundedSender<Neighbour>>,
}

struct LinkRec {
    a: DeviceAddr,
    b: DeviceAddr,
    kill: CancellationToken,
}

struct State {
    devices: HashMap<DeviceAddr, Dev>,
    links: HashMap<u64, LinkRec>,
    next_link: u64,
    next_device: u32,
    rng: rand::rngs::StdRng,
}

struct Inner {
    model: LinkModel,
    state: Mutex<State>,
}

/// The shared medium. Cheap to clone; every clone is the same world.
#[derive(Clone)]
pub struct Medium {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Medium {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Medium")
            .field("model", &self.inner.model)
            .finish_non_exhaustive()
    }
}

/// Packets queued towards the pacer of one direction.
const SEND_QUEUE: usize = 4;
/// Packets that may be in flight or waiting for the reader.
const RECV_QUEUE: usize = 256;

impl Medium {
    /// A new, empty world.
    pub fn new(model: LinkModel) -> Self {
        let rng = rand::rngs::StdRng::seed_from_u64(model.seed);
        Medium {
            inner: Arc::new(Inner {
                model,
                state: Mutex::new(State {
                    devices: HashMap::new(),
                    links: HashMap::new(),
                    next_link: 1,
                    next_device: 1,
                    rng,
                }),
            }),
        }
    }

    /// Its link model.
    pub fn model(&self) -> &LinkModel {
        &self.inner.model
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way that matters more than stopping; recover the data.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Adds a device at `pos`, with the next free address.
    pub fn join(&self, pos: Position) -> SimRadio {
        self.join_counted(pos, Arc::default())
    }

    /// Like [`join`](Self::join), adding every byte the device sends over
    /// its links to `sent` (the simulator keeps one counter per node
    /// across restarts).
    pub fn join_counted(&self, pos: Position, sent: Arc<AtomicU64>) -> SimRadio {
        let mut st = self.state();
        // The next address no device holds (one may have asked for its
        // own with `join_as`).
        let addr = loop {
            let n = st.next_device;
            st.next_device = st.next_device.wrapping_add(1);
            let b = n.to_be_bytes();
            // A "random static" address: the two top bits set.
            let addr = DeviceAddr([0xc0, 0x00, b[0], b[1], b[2], b[3]]);
            if !st.devices.contains_key(&addr) {
                break addr;
            }
        };
        Self::add_locked(&mut st, addr, pos, sent);
        drop(st);
        SimRadio {
            medium: self.clone(),
            addr,
        }
    }

    /// Adds a device at `pos` with the address `addr` (a radio that
    /// rejoins a medium keeps its address); `None` when a device on the
    /// medium holds it.
    pub fn join_as(&self, addr: DeviceAddr, pos: Position) -> Option<SimRadio> {
        let mut st = self.state();
        if st.devices.contains_key(&addr) {
            return None;
        }
        Self::add_locked(&mut st, addr, pos, Arc::default());
        drop(st);
        Some(SimRadio {
            medium: self.clone(),
            addr,
        })
    }

    fn add_locked(st: &mut State, addr: DeviceAddr, pos: Position, sent: Arc<AtomicU64>) {
        st.devices.insert(
            addr,
            Dev {
                pos,
                sent,
                advert: None,
                acceptor: None,
                scanners: Vec::new(),
            },
        );
    }

    /// Every device, with its position and links.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        let st = self.state();
        let mut out: Vec<DeviceInfo> = st
            .devices
            .iter()
            .map(|(a, d)| {
                let mut links: Vec<DeviceAddr> = st
                    .links
                    .values()
                    .filter_map(|l| {
                        if l.a == *a {
                            Some(l.b)
                        } else if l.b == *a {
                            Some(l.a)
                        } else {
                            None
                        }
                    })
                    .collect();
                links.sort();
                DeviceInfo {
                    device: *a,
                    position: d.pos,
                    advertising: d.advert.is_some(),
                    links,
                }
            })
            .collect();
        out.sort_by_key(|d| d.device);
        out
    }

    /// Moves a device. Links to devices now out of range drop; neighbours
    /// are told who appeared and who was lost. `false` for an unknown
    /// device.
    pub fn set_position(&self, dev: DeviceAddr, pos: Position) -> bool {
        let mut st = self.state();
        let range = self.inner.model.range_m;
        let Some(old) = st.devices.get(&dev).map(|d| d.pos) else {
            return false;
        };
        let others: Vec<DeviceAddr> = st.devices.keys().filter(|a| **a != dev).copied().collect();
        if let Some(d) = st.devices.get_mut(&dev) {
            d.pos = pos;
        }
        for o in others {
            let opos = st.devices[&o].pos;
            let was = old.distance(&opos) <= range;
            let now = pos.distance(&opos) <= range;
            if was == now {
                continue;
            }
            notify_pair(&mut st, dev, o, now);
            if !now {
                kill_links_between(&mut st, dev, o);
            }
        }
        true
    }

    /// Drops every link of a device at once (as when its radio resets).
    pub fn drop_links(&self, dev: DeviceAddr) -> usize {
        drop_links_locked(&mut self.state(), dev)
    }

    fn leave(&self, dev: DeviceAddr) {
        let mut st = self.state();
        self.stop_advertising_locked(&mut st, dev);
        st.devices.remove(&dev);
        drop_links_locked(&mut st, dev);
    }

    fn in_range(&self, st: &State, a: DeviceAddr, b: DeviceAddr) -> bool {
        match (st.devices.get(&a), st.devices.get(&b)) {
            (Some(x), Some(y)) => x.pos.distance(&y.pos) <= self.inner.model.range_m,
            _ => false,
        }
    }

    fn advertise(&self, dev: DeviceAddr, advert: Advert) -> io::Result<Incoming> {
        let (tx, rx) = mpsc::channel(16);
        let mut st = self.state();
        let Some(d) = st.devices.get_mut(&dev) else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "radio left the medium",
            ));
        };
        if d.acceptor.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "this radio is already listening",
            ));
        }
        d.advert = Some(advert);
        d.acceptor = Some(tx);
        let others: Vec<DeviceAddr> = st.devices.keys().filter(|a| **a != dev).copied().collect();
        for o in others {
            if self.in_range(&st, dev, o) {
                tell(
                    &mut st,
                    o,
                    Neighbour::Found {
                        device: dev,
                        advert,
                        rssi: None,
                    },
                );
            }
        }
        Ok(Box::pin(AcceptStream {
            rx,
            medium: self.clone(),
            dev,
        }))
    }

    fn stop_advertising_locked(&self, st: &mut State, dev: DeviceAddr) {
        let Some(d) = st.devices.get_mut(&dev) else {
            return;
        };
        if d.advert.take().is_none() {
            return;
        }
        d.acceptor = None;
        let others: Vec<DeviceAddr> = st.devices.keys().filter(|a| **a != dev).copied().collect();
        for o in others {
            if self.in_range(st, dev, o) {
                tell(st, o, Neighbour::Lost { device: dev });
            }
        }
    }

    fn scan(&self, dev: DeviceAddr) -> BoxStream<'static, Neighbour> {
        let (tx, rx) = mpsc::unbounded();
        let mut st = self.state();
        let heard: Vec<Neighbour> = st
            .devices
            .iter()
            .filter(|(a, _)| **a != dev)
            .filter_map(|(a, d)| {
                let advert = d.advert?;
                self.in_range(&st, dev, *a).then_some(Neighbour::Found {
                    device: *a,
                    advert,
                    rssi: None,
                })
            })
            .collect();
        for n in heard {
            let _ = tx.unbounded_send(n);
        }
        if let Some(d) = st.devices.get_mut(&dev) {
            d.scanners.push(tx);
        }
        rx.boxed()
    }

    fn connect(&self, from: DeviceAddr, to: DeviceAddr) -> io::Result<Link> {
        let model = &self.inner.model;
        let mut st = self.state();
        if !st.devices.contains_key(&from) {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "radio left the medium",
            ));
        }
        if !self.in_range(&st, from, to) {
            return Err(io::Error::new(
                io::ErrorKind::HostUnreachable,
                format!("{to} is not in range"),
            ));
        }
        let count =
            |st: &State, d: DeviceAddr| st.links.values().filter(|l| l.a == d || l.b == d).count();
        if count(&st, from) >= model.max_links || count(&st, to) >= model.max_links {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "too many links on this radio or the remote one",
            ));
        }
        let seed: u64 = st.rng.random();
        let id = st.next_link;
        st.next_link += 1;
        let kill = CancellationToken::new();
        let counters = (st.devices[&from].sent.clone(), st.devices[&to].sent.clone());
        let (here, there) = link_pair(model, kill.clone(), seed, counters);
        let Some(acceptor) = st.devices.get_mut(&to).and_then(|d| d.acceptor.as_mut()) else {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{to} does not accept links"),
            ));
        };
        acceptor
            .try_send(Ok(Link {
                remote: from,
                path: DataPath::Simulated,
                io: Box::new(there),
            }))
            .map_err(|_| {
                io::Error::new(io::ErrorKind::ConnectionRefused, format!("{to} is busy"))
            })?;
        if let Some(mean) = model.drop_mean_secs.filter(|m| *m > 0.0) {
            let u: f64 = st.rng.random::<f64>().max(1e-9);
            let after = Duration::from_secs_f64(-mean * u.ln());
            let k = kill.clone();
            let medium = self.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = k.cancelled() => {}
                    _ = tokio::time::sleep(after) => {
                        tracing::debug!(link = id, "simulated link drop");
                        medium.state().links.remove(&id);
                        k.cancel();
                    }
                }
            });
        }
        st.links.insert(
            id,
            LinkRec {
                a: from,
                b: to,
                kill,
            },
        );
        Ok(Link {
            remote: to,
            path: DataPath::Simulated,
            io: Box::new(here),
        })
    }

    /// Forgets links whose ends both closed.
    fn reap(&self) {
        self.state().links.retain(|_, l| !l.kill.is_cancelled());
    }
}

fn tell(st: &mut State, to: DeviceAddr, n: Neighbour) {
    if let Some(d) = st.devices.get_mut(&to) {
        d.scanners.retain(|s| s.unbounded_send(n.clone()).is_ok());
    }
}

fn notify_pair(st: &mut State, a: DeviceAddr, b: DeviceAddr, in_range: bool) {
    for (x, y) in [(a, b), (b, a)] {
        let Some(advert) = st.devices.get(&y).and_then(|d| d.advert) else {
            continue;
        };
        let n = if in_range {
            Neighbour::Found {
                device: y,
                advert,
                rssi: None,
            }
        } else {
            Neighbour::Lost { device: y }
        };
        tell(st, x, n);
    }
}

/// Drops every link of `dev`; how many there were.
fn drop_links_locked(st: &mut State, dev: DeviceAddr) -> usize {
    let before = st.links.len();
    st.links.retain(|_, l| {
        let hit = l.a == dev || l.b == dev;
        if hit {
            l.kill.cancel();
        }
        !hit
    });
    before - st.links.len()
}

fn kill_links_between(st: &mut State, a: DeviceAddr, b: DeviceAddr) {
    st.links.retain(|_, l| {
        let hit = (l.a == a && l.b == b) || (l.a == b && l.b == a);
        if hit {
            l.kill.cancel();
        }
        !hit
    });
}

/// Builds the two ends of a link and the tasks that carry its packets.
fn link_pair(
    model: &LinkModel,
    kill: CancellationToken,
    seed: u64,
    (a_sent, b_sent): (Arc<AtomicU64>, Arc<AtomicU64>),
) -> (PacketIo, PacketIo) {
    let air = Arc::new(Mutex::new(Instant::now()));
    let (a_tx, a_out) = mpsc::channel::<Bytes>(SEND_QUEUE);
    let (b_in, b_rx) = mpsc::channel::<io::Result<Bytes>>(RECV_QUEUE);
    let (b_tx, b_out) = mpsc::channel::<Bytes>(SEND_QUEUE);
    let (a_in, a_rx) = mpsc::channel::<io::Result<Bytes>>(RECV_QUEUE);
    let ab = carry(
        a_out,
        b_in,
        air.clone(),
        model.clone(),
        kill.clone(),
        seed,
        a_sent,
    );
    let ba = carry(
        b_out,
        a_in,
        air,
        model.clone(),
        kill.clone(),
        seed.rotate_left(17) ^ 1,
        b_sent,
    );
    tokio::spawn(async move {
        futures::join!(ab, ba);
        // Both directions ended: the link is gone (reaped on the next dial).
        kill.cancel();
    });
    (
        PacketIo::new(a_tx, a_rx, model.mtu),
        PacketIo::new(b_tx, b_rx, model.mtu),
    )
}

/// One direction of a link: takes each packet when the shared airtime
/// allows (so the writer is paced at the link's bandwidth), then delivers it
/// one latency later, in order.
async fn carry(
    mut from: mpsc::Receiver<Bytes>,
    mut to: mpsc::Sender<io::Result<Bytes>>,
    air: Arc<Mutex<Instant>>,
    model: LinkModel,
    kill: CancellationToken,
    seed: u64,
    sent: Arc<AtomicU64>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let latency = model.limits().latency;
    let per_byte = 1.0 / model.bandwidth as f64;
    let (dtx, mut drx) = tokio::sync::mpsc::channel::<(Instant, Bytes)>(RECV_QUEUE);
    let deliver_kill = kill.clone();
    let deliver = async move {
        loop {
            tokio::select! {
                _ = deliver_kill.cancelled() => {
                    let _ = to.try_send(Err(io::ErrorKind::ConnectionReset.into()));
                    return;
                }
                next = drx.recv() => {
                    let Some((at, pkt)) = next else { return };
                    tokio::time::sleep_until(at).await;
                    // Waits while the reader is behind: backpressure.
                    if to.send(Ok(pkt)).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let pace = async move {
        loop {
            // A packet already waiting means the link never went idle: it
            // starts when the previous one ended on the air, however late
            // the timer woke us (tokio's timers have 1 ms resolution, which
            // would otherwise be lost on every packet).
            let (pkt, backlogged) = match from.try_recv() {
                Ok(p) => (p, true),
                Err(mpsc::TryRecvError::Closed) => return,
                Err(_) => tokio::select! {
                    _ = kill.cancelled() => return,
                    p = from.next() => match p {
                        Some(p) => (p, false),
                        None => return,
                    },
                },
            };
            let mut tx_time = pkt.len() as f64 * per_byte;
            while model.loss > 0.0 && rng.random::<f64>() < model.loss {
                tx_time += pkt.len() as f64 * per_byte;
            }
            let done = {
                let mut free = air.lock().unwrap_or_else(|p| p.into_inner());
                let start = if backlogged {
                    *free
                } else {
                    (*free).max(Instant::now())
                };
                *free = start + Duration::from_secs_f64(tx_time);
                *free
            };
            tokio::select! {
                _ = kill.cancelled() => return,
                _ = tokio::time::sleep_until(done) => {}
            }
            sent.fetch_add(pkt.len() as u64, Ordering::Relaxed);
            if dtx.send((done + latency, pkt)).await.is_err() {
                return;
            }
        }
    };
    futures::join!(deliver, pace);
}

struct AcceptStream {
    rx: mpsc::Receiver<io::Result<Link>>,
    medium: Medium,
    dev: DeviceAddr,
}

impl Stream for AcceptStream {
    type Item = io::Result<Link>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.rx).poll_next(cx)
    }
}

impl Drop for AcceptStream {
    fn drop(&mut self) {
        let mut st = self.medium.state();
        self.medium.stop_advertising_locked(&mut st, self.dev);
    }
}

/// A radio on an in-process [`Medium`]. Leaves the medium when dropped.
pub struct SimRadio {
    medium: Medium,
    addr: DeviceAddr,
}

impl std::fmt::Debug for SimRadio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimRadio")
            .field("addr", &self.addr)
            .finish()
    }
}

impl SimRadio {
    /// The medium it is on.
    pub fn medium(&self) -> &Medium {
        &self.medium
    }
}

impl Drop for SimRadio {
    fn drop(&mut self) {
        self.medium.leave(self.addr);
    }
}

impl Radio for SimRadio {
    fn address(&self) -> DeviceAddr {
        self.addr
    }

    fn limits(&self) -> LinkLimits {
        self.medium.model().limits()
    }

    fn listen(&self, advert: Advert) -> BoxFuture<'static, io::Result<Incoming>> {
        let medium = self.medium.clone();
        let addr = self.addr;
        async move { medium.advertise(addr, advert) }.boxed()
    }

    fn scan(&self) -> BoxStream<'static, Neighbour> {
        self.medium.scan(self.addr)
    }

    fn connect(&self, to: DeviceAddr) -> BoxFuture<'static, io::Result<Link>> {
        let medium = self.medium.clone();
        let from = self.addr;
        // Connection set-up costs a few packet exchanges.
        let setup = medium.model().limits().latency * 3;
        async move {
            medium.reap();
            tokio::time::sleep(setup).await;
            medium.connect(from, to)
        }
        .boxed()
    }
}
