//! The BlueZ backend: a [`Radio`] over BlueZ's D-Bus API, through `bluer`.
//!
//! - Advertising: one legacy advertisement whose service data under
//!   [`crate::SERVICE_UUID`] is the node's [`Advert`]. The service data
//!   element already names the UUID; a separate UUID list is left out
//!   because flags (3 bytes), the UUID list (18) and the service data (28)
//!   would not fit in 31 bytes.
//! - Discovery: an LE discovery session; a device is a fogmesh node when its
//!   service data under [`crate::SERVICE_UUID`] decodes as an [`Advert`].
//!   (BlueZ's UUID discovery filter only matches advertised UUID lists, not
//!   service data, so the filtering is done here.)
//! - GATT: every node that listens or dials serves the service
//!   [`crate::SERVICE_UUID`] with two characteristics: [`INFO_CHAR_UUID`]
//!   (read: the advert bytes) and [`DATA_CHAR_UUID`] (write, write without
//!   response: the data path).
//! - Data path: an L2CAP connection-oriented channel when the advert carries
//!   a PSM and this host has Bluetooth sockets; otherwise framed GATT writes
//!   ([`frame`]) to the DATA characteristic of the other side, in both
//!   directions, so both ends act as GATT server and as GATT client.
//!   Writes use write-with-response, one at a time per link: order holds,
//!   and a slow receiver slows the sender down.
//!
//! A GATT link opens with an OPEN write (refused with an ATT error when the
//! other side is not listening) and ends once each side has sent CLOSE,
//! which the reader sees as the end of the stream; a failed write, a
//! receiver that stalls for 10 s or the device disconnecting fails
//! it with an error. The GATT application stays registered while the
//! listener or any GATT link is alive.

pub use crate::gatt as frame;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bluer::adv::{Advertisement, AdvertisementHandle, Type as AdvType};
use bluer::gatt::WriteOp;
use bluer::gatt::local::{
    Application, ApplicationHandle, Characteristic, CharacteristicRead, CharacteristicWrite,
    CharacteristicWriteMethod, ReqError, ReqResult, Service,
};
use bluer::gatt::remote;
use bluer::{AdapterEvent, Address, AddressType, DeviceEvent, DeviceProperty};
use bytes::Bytes;
use futures::channel::mpsc;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, SinkExt, Stream, StreamExt};
use tokio::task::JoinHandle;
use tokio_util::compat::TokioAsyncReadCompatExt;
use uuid::Uuid;

use crate::addr::DeviceAddr;
use crate::advert::Advert;
use crate::framing::PacketIo;
use crate::radio::{DataPath, Incoming, Link, LinkLimits, Neighbour, Radio};
use frame::{Frame, Kind};

/// The characteristic that returns the node's advertisement bytes
/// ([`Advert::encode`]) when read.
pub const INFO_CHAR_UUID: &str = "6d0f0a41-5b7e-4c8e-9d3f-66f0676d6573";
/// The characteristic that peers write [`frame`]s to.
pub const DATA_CHAR_UUID: &str = "6d0f0a42-5b7e-4c8e-9d3f-66f0676d6573";

const fn parse_uuid(s: &str) -> Uuid {
    match Uuid::try_parse(s) {
        Ok(u) => u,
        Err(_) => panic!("invalid UUID constant"),
    }
}

const SERVICE: Uuid = parse_uuid(crate::SERVICE_UUID);
const INFO: Uuid = parse_uuid(INFO_CHAR_UUID);
const DATA: Uuid = parse_uuid(DATA_CHAR_UUID);

/// How long opening the adapter may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Radio::connect`] may take (below the transport's dial
/// timeout, so the caller sees our clearer error).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one GATT write may take before the link is declared dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an incoming write may wait for room in a link's receive queue
/// (the reader is stalled); past it the link fails rather than hold up the
/// peer's ATT transaction, which BlueZ aborts after 30 s.
const RECV_STALL: Duration = Duration::from_secs(10);
/// Packets queued from a link's writer towards its GATT writer task.
const SEND_QUEUE: usize = 4;
/// Packets received and not yet read, per link.
const RECV_QUEUE: usize = 256;
/// Links accepted and not yet taken from the [`Incoming`] stream.
const ACCEPT_QUEUE: usize = 16;
/// Pause before discovery is started again after it stopped or failed;
/// doubled after each failure up to [`RESCAN_MAX_DELAY`].
const RESCAN_DELAY: Duration = Duration::from_secs(2);
/// Longest pause between attempts to start discovery.
const RESCAN_MAX_DELAY: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here leaves the state half-updated across a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn bt_err(what: impl fmt::Display, e: bluer::Error) -> io::Error {
    let kind = io::Error::from(e.clone()).kind();
    io::Error::new(kind, format!("{what}: {e}"))
}

fn to_bt(a: DeviceAddr) -> Address {
    Address(a.0)
}

fn from_bt(a: Address) -> DeviceAddr {
    DeviceAddr(a.0)
}

/// A link as both sides name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct LinkKey {
    remote: DeviceAddr,
    /// Whether this side opened it.
    dialed: bool,
    id: u32,
}

struct LinkEntry {
    /// Where received packets go; `None` once the peer sent CLOSE.
    rx: Option<mpsc::Sender<io::Result<Bytes>>>,
    /// Whether this side has sent CLOSE.
    closed_here: bool,
    /// The GATT application stays registered while a link may still
    /// receive, even after this side closed its half.
    _app: Arc<AppGuard>,
}

#[derive(Default)]
struct State {
    /// What INFO returns, while listening.
    advert: Option<Advert>,
    /// Where accepted links go, while listening.
    acceptor: Option<tokio::sync::mpsc::Sender<io::Result<Link>>>,
    /// Open GATT links.
    links: HashMap<LinkKey, LinkEntry>,
    /// The last advert heard from each device.
    seen: HashMap<DeviceAddr, Advert>,
}

/// Keeps the GATT application registered; shared by the listener and the
/// GATT links, and unregistered when the last of them is gone.
struct AppGuard {
    _handle: ApplicationHandle,
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A peer's DATA characteristic, as a GATT client.
struct Peer {
    data: remote::Characteristic,
    /// Largest DATA payload per write to it.
    max_payload: usize,
    _watch: AbortOnDrop,
}

impl Peer {
    async fn write(&self, value: &[u8]) -> io::Result<()> {
        let req = remote::CharacteristicWriteRequest {
            op_type: WriteOp::Request,
            ..Default::default()
        };
        match tokio::time::timeout(WRITE_TIMEOUT, self.data.write_ext(value, &req)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(bt_err("GATT write failed", e)),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "GATT write timed out",
            )),
        }
    }
}

type PeerCell = Arc<tokio::sync::OnceCell<Arc<Peer>>>;

struct Inner {
    _session: bluer::Session,
    adapter: bluer::Adapter,
    addr: DeviceAddr,
    addr_type: AddressType,
    /// Whether this host can open Bluetooth sockets (L2CAP).
    l2cap: bool,
    state: Mutex<State>,
    app: Mutex<Weak<AppGuard>>,
    app_register: tokio::sync::Mutex<()>,
    peers: Mutex<HashMap<DeviceAddr, PeerCell>>,
    next_link: AtomicU32,
}

/// A radio on a BlueZ adapter, over D-Bus.
///
/// Cheap to share behind an `Arc`; links, listeners and scans keep what
/// they need alive on their own.
pub struct BluezRadio {
    inner: Arc<Inner>,
}

impl fmt::Debug for BluezRadio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BluezRadio")
            .field("adapter", &self.inner.adapter.name())
            .field("address", &self.inner.addr)
            .field("l2cap", &self.inner.l2cap)
            .finish_non_exhaustive()
    }
}

/// Turns the errors of the first D-Bus calls into messages that say what
/// is missing.
fn open_err(adapter: Option<&str>, e: bluer::Error) -> io::Error {
    let bus = std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
        .unwrap_or_else(|_| "the default system bus".to_string());
    match &e.kind {
        bluer::ErrorKind::Internal(bluer::InternalErrorKind::DBus(name))
            if name.ends_with("ServiceUnknown") || name.ends_with("NameHasNoOwner") =>
        {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("bluetoothd is not running: nothing owns org.bluez on {bus} ({e})"),
            )
        }
        bluer::ErrorKind::NotFound => io::Error::new(
            io::ErrorKind::NotFound,
            match adapter {
                Some(a) => format!("no Bluetooth adapter named {a}"),
                None => "no Bluetooth adapter".to_string(),
            },
        ),
        _ => bt_err("BlueZ did not answer as expected", e),
    }
}

impl BluezRadio {
    /// Opens a BlueZ adapter (`hci0`, …; the default adapter when `None`)
    /// and powers it on.
    ///
    /// Fails with a message naming the cause when the system D-Bus cannot
    /// be reached, bluetoothd is not on it, or the adapter does not exist.
    pub async fn open(adapter: Option<&str>) -> io::Result<BluezRadio> {
        match tokio::time::timeout(OPEN_TIMEOUT, Self::open_inner(adapter)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "opening the Bluetooth adapter timed out (is bluetoothd answering on D-Bus?)",
            )),
        }
    }

    async fn open_inner(name: Option<&str>) -> io::Result<BluezRadio> {
        let session = bluer::Session::new().await.map_err(|e| {
            let bus = std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
                .unwrap_or_else(|_| "the default system bus".to_string());
            io::Error::new(
                io::ErrorKind::NotConnected,
                format!("cannot connect to the D-Bus system bus ({bus}): {e}"),
            )
        })?;
        let adapter = match name {
            Some(n) => {
                let names = session
                    .adapter_names()
                    .await
                    .map_err(|e| open_err(name, e))?;
                if !names.iter().any(|x| x == n) {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "no Bluetooth adapter named {n} (adapters: {})",
                            if names.is_empty() {
                                "none".to_string()
                            } else {
                                names.join(", ")
                            }
                        ),
                    ));
                }
                session.adapter(n).map_err(|e| open_err(name, e))?
            }
            None => session
                .default_adapter()
                .await
                .map_err(|e| open_err(name, e))?,
        };
        let what = format!("adapter {}", adapter.name());
        if !adapter.is_powered().await.map_err(|e| bt_err(&what, e))? {
            adapter
                .set_powered(true)
                .await
                .map_err(|e| bt_err(format!("cannot power on {what}"), e))?;
        }
        let addr = from_bt(adapter.address().await.map_err(|e| bt_err(&what, e))?);
        let addr_type = adapter
            .address_type()
            .await
            .unwrap_or(AddressType::LePublic);
        // LE only; no UUID filter: BlueZ matches it against advertised UUID
        // lists only, and fogmesh adverts carry their UUID in service data.
        let filter = bluer::DiscoveryFilter {
            transport: bluer::DiscoveryTransport::Le,
            ..Default::default()
        };
        if let Err(e) = adapter.set_discovery_filter(filter).await {
            tracing::debug!(adapter = %adapter.name(), "discovery filter not set: {e}");
        }
        let l2cap = bluer::l2cap::Socket::new_stream().is_ok();
        tracing::debug!(adapter = %adapter.name(), %addr, l2cap, "opened BlueZ adapter");
        Ok(BluezRadio {
            inner: Arc::new(Inner {
                _session: session,
                adapter,
                addr,
                addr_type,
                l2cap,
                state: Mutex::new(State::default()),
                app: Mutex::new(Weak::new()),
                app_register: tokio::sync::Mutex::new(()),
                peers: Mutex::new(HashMap::new()),
                // Link ids differ across restarts, so that a peer that kept
                // a link of our previous run does not confuse it with a new one.
                next_link: AtomicU32::new(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
                        .unwrap_or(1),
                ),
            }),
        })
    }

    /// The adapter's name (`hci0`, …).
    pub fn adapter_name(&self) -> &str {
        self.inner.adapter.name()
    }

    /// Whether L2CAP channels can be used on this host (it has Bluetooth
    /// sockets). Without them every link runs over GATT writes.
    pub fn l2cap_available(&self) -> bool {
        self.inner.l2cap
    }
}

impl Radio for BluezRadio {
    fn address(&self) -> DeviceAddr {
        self.inner.addr
    }

    /// Conservative figures for a real BLE link: 244-byte packets (Data
    /// Length Extension), 20 kB/s and 30 ms one way (about what phones and
    /// Raspberry Pis reach in practice, with room for busy radios).
    fn limits(&self) -> LinkLimits {
        LinkLimits {
            mtu: 244,
            bandwidth: 20_000,
            latency: Duration::from_millis(30),
        }
    }

    fn listen(&self, advert: Advert) -> BoxFuture<'static, io::Result<Incoming>> {
        let inner = self.inner.clone();
        async move { inner.listen(advert).await }.boxed()
    }

    fn scan(&self) -> BoxStream<'static, Neighbour> {
        let inner = self.inner.clone();
        // Started on first poll, inside the caller's runtime.
        futures::stream::once(async move {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(scan_task(inner, tx));
            futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
        })
        .flatten()
        .boxed()
    }

    fn connect(&self, to: DeviceAddr) -> BoxFuture<'static, io::Result<Link>> {
        let inner = self.inner.clone();
        async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, inner.clone().connect(to)).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connecting to {to} over BLE timed out after {} s",
                        CONNECT_TIMEOUT.as_secs()
                    ),
                )),
            }
        }
        .boxed()
    }
}

/// What [`Radio::listen`] returns: accepted links; dropping it stops
/// advertising and accepting, and releases the GATT application (which
/// is unregistered once no GATT link uses it either).
struct Listening {
    rx: tokio::sync::mpsc::Receiver<io::Result<Link>>,
    inner: Arc<Inner>,
    _adv: AdvertisementHandle,
    _app: Arc<AppGuard>,
    _accept: Option<AbortOnDrop>,
}

impl Stream for Listening {
    type Item = io::Result<Link>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let mut st = lock(&self.inner.state);
        st.acceptor = None;
        st.advert = None;
    }
}

impl Inner {
    async fn listen(self: Arc<Self>, mut advert: Advert) -> io::Result<Incoming> {
        let (tx, rx) = tokio::sync::mpsc::channel(ACCEPT_QUEUE);
        {
            let mut st = lock(&self.state);
            if st.acceptor.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "this radio is already listening",
                ));
            }
            st.acceptor = Some(tx.clone());
        }
        // From here on, errors must clear the acceptor again.
        let result = self.start_listening(&mut advert, tx).await;
        match result {
            Ok((adv, app, accept)) => Ok(Box::pin(Listening {
                rx,
                inner: self,
                _adv: adv,
                _app: app,
                _accept: accept,
            }) as Incoming),
            Err(e) => {
                let mut st = lock(&self.state);
                st.acceptor = None;
                st.advert = None;
                Err(e)
            }
        }
    }

    async fn start_listening(
        self: &Arc<Self>,
        advert: &mut Advert,
        tx: tokio::sync::mpsc::Sender<io::Result<Link>>,
    ) -> io::Result<(AdvertisementHandle, Arc<AppGuard>, Option<AbortOnDrop>)> {
        let mut accept = None;
        advert.psm = None;
        if self.l2cap {
            let sa = bluer::l2cap::SocketAddr::new(to_bt(self.addr), self.addr_type, 0);
            match bluer::l2cap::StreamListener::bind(sa).await {
                Ok(listener) => match listener.as_ref().local_addr() {
                    Ok(local) => {
                        advert.psm = Some(local.psm);
                        accept = Some(AbortOnDrop(tokio::spawn(accept_l2cap(listener, tx))));
                    }
                    Err(e) => tracing::debug!("L2CAP listener has no address: {e}"),
                },
                Err(e) => tracing::debug!("no L2CAP listener, GATT writes only: {e}"),
            }
        }
        lock(&self.state).advert = Some(*advert);
        let app = self.ensure_app().await?;
        let adv = Advertisement {
            advertisement_type: AdvType::Peripheral,
            service_data: [(SERVICE, advert.encode().to_vec())].into_iter().collect(),
            discoverable: Some(true),
            ..Default::default()
        };
        let adv = self
            .adapter
            .advertise(adv)
            .await
            .map_err(|e| bt_err("cannot start advertising", e))?;
        tracing::debug!(adapter = %self.adapter.name(), psm = ?advert.psm, "listening");
        Ok((adv, app, accept))
    }

    /// Registers the GATT application, unless it already is.
    async fn ensure_app(self: &Arc<Self>) -> io::Result<Arc<AppGuard>> {
        let _one_at_a_time = self.app_register.lock().await;
        if let Some(app) = lock(&self.app).upgrade() {
            return Ok(app);
        }
        let weak = Arc::downgrade(self);
        let read_weak = weak.clone();
        let info = Characteristic {
            uuid: INFO,
            read: Some(CharacteristicRead {
                read: true,
                fun: Box::new(move |req| {
                    let inner = read_weak.upgrade();
                    async move {
                        let advert = inner
                            .and_then(|i| lock(&i.state).advert)
                            .ok_or(ReqError::NotPermitted)?;
                        let bytes = advert.encode();
                        let start = usize::from(req.offset);
                        bytes
                            .get(start..)
                            .map(<[u8]>::to_vec)
                            .ok_or(ReqError::InvalidOffset)
                    }
                    .boxed()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let data = Characteristic {
            uuid: DATA,
            write: Some(CharacteristicWrite {
                write: true,
                write_without_response: true,
                method: CharacteristicWriteMethod::Fun(Box::new(move |value, req| {
                    let inner = weak.upgrade();
                    async move {
                        let inner = inner.ok_or(ReqError::Failed)?;
                        let mtu = usize::from(req.mtu);
                        inner
                            .on_write(from_bt(req.device_address), mtu, &value)
                            .await
                    }
                    .boxed()
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let app = Application {
            services: vec![Service {
                uuid: SERVICE,
                primary: true,
                characteristics: vec![info, data],
                ..Default::default()
            }],
            ..Default::default()
        };
        let handle = self
            .adapter
            .serve_gatt_application(app)
            .await
            .map_err(|e| bt_err("cannot register the GATT service", e))?;
        let guard = Arc::new(AppGuard { _handle: handle });
        *lock(&self.app) = Arc::downgrade(&guard);
        Ok(guard)
    }

    /// A write to our DATA characteristic from `remote`.
    async fn on_write(
        self: Arc<Self>,
        remote: DeviceAddr,
        mtu: usize,
        value: &[u8],
    ) -> ReqResult<()> {
        let f = match Frame::decode(value) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(%remote, "bad GATT frame: {e}");
                return Err(ReqError::InvalidValueLength);
            }
        };
        let key = LinkKey {
            remote,
            dialed: f.from_acceptor,
            id: f.link,
        };
        match f.kind {
            Kind::Open => self.on_open(key, mtu),
            Kind::Data => {
                if f.payload.is_empty() {
                    return Ok(());
                }
                let tx = lock(&self.state)
                    .links
                    .get(&key)
                    .map(|e| e.rx.clone())
                    .ok_or(ReqError::Failed)?;
                let Some(mut tx) = tx else {
                    // DATA after the peer's own CLOSE: a broken peer.
                    return Err(ReqError::Failed);
                };
                let packet = Bytes::copy_from_slice(f.payload);
                match tokio::time::timeout(RECV_STALL, tx.send(Ok(packet))).await {
                    // Delivered, or the reader is gone (dropped its half):
                    // either way the bytes are accepted.
                    Ok(_) => Ok(()),
                    Err(_) => {
                        self.fail_link(
                            key,
                            io::Error::new(io::ErrorKind::TimedOut, "BLE link reader stalled"),
                        );
                        Err(ReqError::Failed)
                    }
                }
            }
            Kind::Close => {
                let done = {
                    let mut st = lock(&self.state);
                    match st.links.get_mut(&key) {
                        Some(e) => {
                            // Dropping the sender ends the reader's stream.
                            e.rx = None;
                            let closed_here = e.closed_here;
                            closed_here.then(|| st.links.remove(&key))
                        }
                        None => None,
                    }
                };
                drop(done);
                Ok(())
            }
        }
    }

    fn on_open(self: Arc<Self>, key: LinkKey, mtu: usize) -> ReqResult<()> {
        let Some(app) = lock(&self.app).upgrade() else {
            return Err(ReqError::Failed);
        };
        let (in_tx, in_rx) = mpsc::channel(RECV_QUEUE);
        let (out_tx, out_rx) = mpsc::channel(SEND_QUEUE);
        let max = frame::max_payload((mtu > 3).then(|| mtu - 3));
        let io = PacketIo::new(out_tx, in_rx, max);
        let stale = {
            let mut st = lock(&self.state);
            let Some(acceptor) = st.acceptor.clone() else {
                tracing::debug!(remote = %key.remote, "link refused: not listening");
                return Err(ReqError::NotPermitted);
            };
            let link = Link {
                remote: key.remote,
                path: DataPath::Gatt,
                io: Box::new(io),
            };
            if acceptor.try_send(Ok(link)).is_err() {
                tracing::debug!(remote = %key.remote, "link refused: accept queue full");
                return Err(ReqError::Failed);
            }
            // A peer reuses an id only after it lost the link (it restarted,
            // say): the old one is dead.
            st.links.insert(
                key,
                LinkEntry {
                    rx: Some(in_tx),
                    closed_here: false,
                    _app: app,
                },
            )
        };
        if let Some(mut tx) = stale.and_then(|e| e.rx) {
            let _ = tx.try_send(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the peer opened a new link with the same id",
            )));
        }
        tracing::debug!(remote = %key.remote, id = key.id, "accepted GATT link");
        tokio::spawn(self.write_task(key, None, out_rx));
        Ok(())
    }

    /// Ends a link with an error for its reader.
    fn fail_link(&self, key: LinkKey, err: io::Error) {
        let entry = lock(&self.state).links.remove(&key);
        if let Some(mut tx) = entry.and_then(|e| e.rx) {
            let _ = tx.try_send(Err(err));
        }
    }

    /// The device went away: every GATT link with it fails.
    fn peer_gone(&self, remote: DeviceAddr) {
        lock(&self.peers).remove(&remote);
        let keys: Vec<LinkKey> = lock(&self.state)
            .links
            .keys()
            .filter(|k| k.remote == remote)
            .copied()
            .collect();
        for k in keys {
            self.fail_link(
                k,
                io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!("{remote} disconnected"),
                ),
            );
        }
    }

    /// Sends a link's outgoing packets, in order, each as DATA writes;
    /// then CLOSE. The acceptor side finds the peer's DATA characteristic
    /// first.
    async fn write_task(
        self: Arc<Self>,
        key: LinkKey,
        peer: Option<Arc<Peer>>,
        mut out: mpsc::Receiver<Bytes>,
    ) {
        let peer = match peer {
            Some(p) => p,
            None => match tokio::time::timeout(CONNECT_TIMEOUT, self.peer(key.remote)).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::debug!(remote = %key.remote, "cannot write back: {e}");
                    self.fail_link(key, e);
                    return;
                }
                Err(_) => {
                    self.fail_link(
                        key,
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("connecting back to {} timed out", key.remote),
                        ),
                    );
                    return;
                }
            },
        };
        let from_acceptor = !key.dialed;
        while let Some(packet) = out.next().await {
            for chunk in packet.chunks(peer.max_payload) {
                let value = Frame {
                    kind: Kind::Data,
                    from_acceptor,
                    link: key.id,
                    payload: chunk,
                }
                .encode();
                if let Err(e) = peer.write(&value).await {
                    tracing::debug!(remote = %key.remote, id = key.id, "link failed: {e}");
                    self.forget_peer(key.remote, &peer);
                    self.fail_link(key, e);
                    return;
                }
            }
        }
        let close = Frame {
            kind: Kind::Close,
            from_acceptor,
            link: key.id,
            payload: &[],
        }
        .encode();
        if let Err(e) = peer.write(&close).await {
            tracing::debug!(remote = %key.remote, id = key.id, "CLOSE not delivered: {e}");
        }
        // Forget the link once both sides closed, or once nobody here
        // reads it any more (the whole pipe was dropped).
        let done = {
            let mut st = lock(&self.state);
            match st.links.get_mut(&key) {
                Some(e) => {
                    e.closed_here = true;
                    let done = e.rx.as_ref().is_none_or(|rx| rx.is_closed());
                    done.then(|| st.links.remove(&key))
                }
                None => None,
            }
        };
        // Dropped outside the lock: it may release the GATT application.
        drop(done);
    }

    /// Drops a cached peer after a failed write, so the next link connects
    /// afresh.
    fn forget_peer(&self, remote: DeviceAddr, peer: &Arc<Peer>) {
        let mut peers = lock(&self.peers);
        if peers
            .get(&remote)
            .and_then(|c| c.get())
            .is_some_and(|p| Arc::ptr_eq(p, peer))
        {
            peers.remove(&remote);
        }
    }

    /// The GATT client of a peer's DATA characteristic, connecting to it
    /// when needed.
    async fn peer(self: &Arc<Self>, remote: DeviceAddr) -> io::Result<Arc<Peer>> {
        let cell = lock(&self.peers).entry(remote).or_default().clone();
        cell.get_or_try_init(|| self.connect_gatt(remote))
            .await
            .cloned()
    }

    /// A device BlueZ knows (has heard or is connected to), and whether it
    /// is connected.
    async fn known_device(&self, remote: DeviceAddr) -> io::Result<(bluer::Device, bool)> {
        let device = self
            .adapter
            .device(to_bt(remote))
            .map_err(|e| bt_err(format!("device {remote}"), e))?;
        let connected = device.is_connected().await.map_err(|e| match e.kind {
            bluer::ErrorKind::NotFound => io::Error::new(
                io::ErrorKind::HostUnreachable,
                format!("{remote} is unknown to BlueZ (not discovered yet?)"),
            ),
            _ => bt_err(format!("device {remote}"), e),
        })?;
        Ok((device, connected))
    }

    async fn connect_gatt(self: &Arc<Self>, remote: DeviceAddr) -> io::Result<Arc<Peer>> {
        let (device, connected) = self.known_device(remote).await?;
        let mut data = None;
        if connected {
            // Already connected (it connected to us, or an earlier link):
            // its services may be known already.
            data = find_data(&device).await.ok().flatten();
        }
        if data.is_none() {
            match device.connect().await {
                Ok(()) => {}
                Err(e) if e.kind == bluer::ErrorKind::AlreadyConnected => {}
                Err(e) => return Err(bt_err(format!("cannot connect to {remote}"), e)),
            }
            for attempt in 0..10 {
                if let Some(c) = find_data(&device)
                    .await
                    .map_err(|e| bt_err(format!("GATT services of {remote}"), e))?
                {
                    data = Some(c);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
            }
        }
        let Some(data) = data else {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{remote} does not serve the fogmesh GATT service"),
            ));
        };
        let max_payload = frame::max_payload(data.mtu().await.ok());
        let weak = Arc::downgrade(self);
        let watch = tokio::spawn(async move {
            let Ok(mut events) = device.events().await else {
                return;
            };
            while let Some(ev) = events.next().await {
                if let DeviceEvent::PropertyChanged(DeviceProperty::Connected(false)) = ev {
                    if let Some(inner) = weak.upgrade() {
                        tracing::debug!(%remote, "device disconnected");
                        inner.peer_gone(remote);
                    }
                    return;
                }
            }
        });
        tracing::debug!(%remote, max_payload, "GATT client ready");
        Ok(Arc::new(Peer {
            data,
            max_payload,
            _watch: AbortOnDrop(watch),
        }))
    }

    async fn connect(self: Arc<Self>, to: DeviceAddr) -> io::Result<Link> {
        if to == self.addr {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot connect to our own adapter",
            ));
        }
        let known = lock(&self.state).seen.get(&to).copied();
        let advert = match known {
            Some(a) => Some(a),
            None => self.read_advert(to).await,
        };
        if let Some(psm) = advert.and_then(|a| a.psm).filter(|_| self.l2cap) {
            match self.connect_l2cap(to, psm).await {
                Ok(link) => return Ok(link),
                Err(e) => tracing::debug!(%to, psm, "L2CAP failed, trying GATT: {e}"),
            }
        }
        // Fail fast for a device BlueZ never heard of.
        self.known_device(to).await?;
        // The peer answers by writing to our DATA characteristic, which must
        // exist before we connect (so that its GATT client finds it).
        let app = self.ensure_app().await?;
        let cached = lock(&self.peers).get(&to).is_some_and(|c| c.initialized());
        let mut peer = self.peer(to).await?;
        let id = self.next_link.fetch_add(1, Ordering::Relaxed);
        let key = LinkKey {
            remote: to,
            dialed: true,
            id,
        };
        let (in_tx, in_rx) = mpsc::channel(RECV_QUEUE);
        let (out_tx, out_rx) = mpsc::channel(SEND_QUEUE);
        lock(&self.state).links.insert(
            key,
            LinkEntry {
                rx: Some(in_tx),
                closed_here: false,
                _app: app,
            },
        );
        let open = Frame {
            kind: Kind::Open,
            from_acceptor: false,
            link: id,
            payload: &[],
        }
        .encode();
        let mut retried = false;
        while let Err(e) = peer.write(&open).await {
            self.forget_peer(to, &peer);
            // A client kept from an earlier link may be stale (the peer
            // registered its service again): retry once with a fresh one.
            if cached && !retried {
                retried = true;
                match self.peer(to).await {
                    Ok(p) => {
                        peer = p;
                        continue;
                    }
                    Err(e) => tracing::debug!(%to, "reconnecting failed: {e}"),
                }
            }
            lock(&self.state).links.remove(&key);
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{to} refused the link: {e}"),
            ));
        }
        let max = peer.max_payload;
        tracing::debug!(%to, id, max, "opened GATT link");
        tokio::spawn(self.write_task(key, Some(peer), out_rx));
        Ok(Link {
            remote: to,
            path: DataPath::Gatt,
            io: Box::new(PacketIo::new(out_tx, in_rx, max)),
        })
    }

    async fn read_advert(&self, to: DeviceAddr) -> Option<Advert> {
        let device = self.adapter.device(to_bt(to)).ok()?;
        let sd = device.service_data().await.ok().flatten()?;
        Advert::decode(sd.get(&SERVICE)?).ok()
    }

    async fn connect_l2cap(&self, to: DeviceAddr, psm: u16) -> io::Result<Link> {
        let device = self
            .adapter
            .device(to_bt(to))
            .map_err(|e| bt_err(format!("device {to}"), e))?;
        let addr_type = device
            .address_type()
            .await
            .map_err(|e| bt_err(format!("device {to}"), e))?;
        let sa = bluer::l2cap::SocketAddr::new(to_bt(to), addr_type, psm);
        let stream = bluer::l2cap::Stream::connect(sa).await?;
        Ok(Link {
            remote: to,
            path: DataPath::L2cap,
            io: Box::new(stream.compat()),
        })
    }
}

/// Our service's DATA characteristic on a connected device, if it has one.
async fn find_data(device: &bluer::Device) -> bluer::Result<Option<remote::Characteristic>> {
    for service in device.services().await? {
        if service.uuid().await? != SERVICE {
            continue;
        }
        for c in service.characteristics().await? {
            if c.uuid().await? == DATA {
                return Ok(Some(c));
            }
        }
    }
    Ok(None)
}

async fn accept_l2cap(
    listener: bluer::l2cap::StreamListener,
    tx: tokio::sync::mpsc::Sender<io::Result<Link>>,
) {
    loop {
        tokio::select! {
            () = tx.closed() => return,
            r = listener.accept() => match r {
                Ok((stream, sa)) => {
                    let link = Link {
                        remote: from_bt(sa.addr),
                        path: DataPath::L2cap,
                        io: Box::new(stream.compat()),
                    };
                    if tx.send(Ok(link)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!("L2CAP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
}

/// Runs discovery for one [`Radio::scan`] stream, until it is dropped.
async fn scan_task(inner: Arc<Inner>, tx: tokio::sync::mpsc::UnboundedSender<Neighbour>) {
    let mut reported: HashMap<DeviceAddr, Advert> = HashMap::new();
    let mut delay = RESCAN_DELAY;
    loop {
        match inner.adapter.discover_devices_with_changes().await {
            Ok(events) => {
                delay = RESCAN_DELAY;
                let mut events = std::pin::pin!(events);
                loop {
                    let ev = tokio::select! {
                        () = tx.closed() => return,
                        ev = events.next() => ev,
                    };
                    match ev {
                        Some(AdapterEvent::DeviceAdded(a)) => {
                            let device = from_bt(a);
                            if device == inner.addr {
                                continue;
                            }
                            let Some((advert, rssi)) = inspect(&inner, a).await else {
                                continue;
                            };
                            if reported.get(&device) == Some(&advert) {
                                continue;
                            }
                            reported.insert(device, advert);
                            lock(&inner.state).seen.insert(device, advert);
                            let found = Neighbour::Found {
                                device,
                                advert,
                                rssi,
                            };
                            if tx.send(found).is_err() {
                                return;
                            }
                        }
                        Some(AdapterEvent::DeviceRemoved(a)) => {
                            let device = from_bt(a);
                            if reported.remove(&device).is_some() {
                                lock(&inner.state).seen.remove(&device);
                                if tx.send(Neighbour::Lost { device }).is_err() {
                                    return;
                                }
                            }
                        }
                        Some(AdapterEvent::PropertyChanged(_)) => {}
                        None => break,
                    }
                }
                tracing::debug!(adapter = %inner.adapter.name(), "discovery stopped; restarting");
            }
            Err(e) => {
                tracing::warn!(
                    adapter = %inner.adapter.name(),
                    "cannot start discovery (retrying in {} s): {e}",
                    delay.as_secs()
                );
            }
        }
        tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(RESCAN_MAX_DELAY);
    }
}

/// A device's fogmesh advert, if it has one and is in range now.
async fn inspect(inner: &Inner, a: Address) -> Option<(Advert, Option<i16>)> {
    let device = inner.adapter.device(a).ok()?;
    let sd = device.service_data().await.ok().flatten()?;
    let advert = Advert::decode(sd.get(&SERVICE)?).ok()?;
    // BlueZ keeps devices it heard earlier; RSSI is present only for those
    // heard in this discovery.
    let rssi = device.rssi().await.ok().flatten()?;
    Some((advert, Some(rssi)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_match_their_strings() {
        assert_eq!(SERVICE.to_string(), crate::SERVICE_UUID);
        assert_eq!(INFO.to_string(), INFO_CHAR_UUID);
        assert_eq!(DATA.to_string(), DATA_CHAR_UUID);
    }
}
