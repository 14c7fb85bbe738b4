//! The simulated medium across processes, over a unix socket.
//!
//! `fogmesh radio serve SOCKET` runs a [`Medium`] and [`serve`]s it; each
//! daemon started with `--ble sim:SOCKET` joins it through a
//! [`SocketRadio`]. The medium process does all the modelling (range,
//! pacing, latency, drops); clients are thin.
//!
//! Protocol: every connection starts with one JSON line.
//! - `{"hello":{"position":{"x":..,"y":..}}}` opens a control session: the
//!   server answers `{"welcome":{"device":..,"model":{..}}}` and from then on
//!   both sides exchange JSON lines (requests carry a `req` number that the
//!   answer repeats; the server pushes `found`, `lost` and `incoming`).
//! - `{"attach":{"link":N,"token":T}}` turns the connection into the byte
//!   pipe of link N (announced to its owner by `connected` or `incoming`,
//!   with the token, which proves it is the owner).
//! - `{"admin":{..}}` asks one question (`list`, `move`, `drop`) and gets
//!   one JSON answer.
//!
//!   A radio that rejoins adds `"device":ADDR` to keep its address; the
//!   server answers `{"failed":{"req":0,..}}` and closes if a device holds
//!   it.
//!
//! A [`SocketRadio`] whose connection to the medium breaks (the medium
//! restarted) reports every neighbour lost, fails the requests in flight,
//! and rejoins with back-off (250 ms doubling to 5 s), keeping its address,
//! its position, its scanners and its listener (it advertises again): the
//! node above sees neighbours leave and come back, as when walking out of
//! range and back.
//!
//! Lines are capped at [`MAX_LINE`] bytes.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::channel::{mpsc, oneshot};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use super::medium::{LinkModel, Medium, Position};
use crate::addr::DeviceAddr;
use crate::advert::Advert;
use crate::radio::{DataPath, Incoming, Link, LinkLimits, Neighbour, Radio};

/// Longest JSON line either side accepts.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Opening {
    Hello {
        position: Position,
        /// The address a rejoining radio asks to keep (it had it before the
        /// medium restarted or the connection broke).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
    },
    Attach {
        link: u64,
        token: u64,
    },
    Admin(AdminRequest),
}

/// A one-shot question to the medium, as `fogmesh radio` asks it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    /// Every device, its position and links.
    List,
    /// Move a device.
    Move {
        /// Which.
        device: String,
        /// Where to.
        position: Position,
    },
    /// Drop every link of a device.
    Drop {
        /// Which.
        device: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum ClientMsg {
    Listen { req: u64, advert: String },
    Connect { req: u64, to: String },
    Move { position: Position },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum ServerMsg {
    Welcome { device: String, model: LinkModel },
    Ok { req: u64 },
    Failed { req: u64, error: String },
    Connected { req: u64, link: u64, token: u64 },
    Incoming { link: u64, token: u64, from: String },
    Found { device: String, advert: String },
    Lost { device: String },
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn to_line<T: Serialize>(v: &T) -> String {
    // Serialising these plain types cannot fail.
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

type Pending = Arc<Mutex<HashMap<u64, (u64, Link)>>>;

/// Serves `medium` on `listener` until `shutdown`.
pub async fn serve(listener: UnixListener, medium: Medium, shutdown: CancellationToken) {
    let pending: Pending = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = listener.accept() => match c {
                Ok((c, _)) => c,
                Err(e) => {
                    tracing::warn!("radio medium: accept failed: {e}");
                    continue;
                }
            },
        };
        let (medium, pending, next, shutdown) = (
            medium.clone(),
            pending.clone(),
            next.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = handle(conn, medium, pending, next, shutdown).await {
                tracing::debug!("radio medium: client: {e}");
            }
        });
    }
}

/// The lines of a client's socket, as read.
type Lines = FramedRead<tokio::net::unix::OwnedReadHalf, LinesCodec>;

async fn handle(
    conn: UnixStream,
    medium: Medium,
    pending: Pending,
    next: Arc<std::sync::atomic::AtomicU64>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let (rd, mut wr) = conn.into_split();
    let mut lines = FramedRead::new(rd, LinesCodec::new_with_max_length(MAX_LINE));
    let first = lines
        .next()
        .await
        .ok_or_else(|| bad("closed before its first line"))?
        .map_err(|e| bad(e.to_string()))?;
    let opening: Opening =
        serde_json::from_str(&first).map_err(|e| bad(format!("bad opening line: {e}")))?;
    match opening {
        Opening::Admin(req) => {
            let answer = admin_answer(&medium, req);
            wr.write_all(format!("{answer}\n").as_bytes()).await?;
            wr.shutdown().await
        }
        Opening::Attach { link, token } => serve_attach(lines, wr, &pending, link, token).await,
        Opening::Hello { position, device } => {
            let radio = match device {
                None => medium.join(position),
                Some(d) => {
                    let claimed = d
                        .parse::<DeviceAddr>()
                        .ok()
                        .and_then(|d| medium.join_as(d, position));
                    let Some(radio) = claimed else {
                        // Taken (its old session may not have left yet) or
                        // malformed: the client tries again later.
                        let no = ServerMsg::Failed {
                            req: 0,
                            error: format!("device {d} is not free on this medium"),
                        };
                        wr.write_all(format!("{}\n", to_line(&no)).as_bytes())
                            .await?;
                        return wr.shutdown().await;
                    };
                    radio
                }
            };
            let session = Served {
                medium,
                radio,
                pending,
                next,
                out: None,
                token: CancellationToken::new(),
            };
            session.run(lines, wr, shutdown).await
        }
    }
}

/// A client takes over link `link` (registered for it, `token` proving
/// it): the socket carries the link's bytes both ways from then on.
async fn serve_attach(
    lines: Lines,
    wr: tokio::net::unix::OwnedWriteHalf,
    pending: &Pending,
    link: u64,
    token: u64,
) -> io::Result<()> {
    let found = {
        let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
        match p.get(&link) {
            Some((t, _)) if *t == token => p.remove(&link).map(|(_, l)| l),
            _ => None,
        }
    };
    let Some(l) = found else {
        return Err(bad("attach to an unknown link"));
    };
    // Whatever the client sent after its line is already buffered.
    let buffered = lines.read_buffer().clone();
    let rd = lines.into_inner();
    let mut conn = rd.reunite(wr).map_err(|_| bad("socket halves"))?;
    let mut link = l.io.compat();
    if !buffered.is_empty() {
        tokio::io::AsyncWriteExt::write_all(&mut link, &buffered).await?;
    }
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut link).await;
    Ok(())
}

/// A client's radio on the medium, for as long as its socket is open:
/// what the radio finds and the links it is offered go to the client,
/// and the client's requests (move, listen, connect) are served.
struct Served {
    medium: Medium,
    radio: super::medium::SimRadio,
    pending: Pending,
    next: Arc<std::sync::atomic::AtomicU64>,
    /// The lines to the client (set when the session runs).
    out: Option<mpsc::UnboundedSender<String>>,
    /// Cancelled when the session ends: its tasks stop.
    token: CancellationToken,
}

impl Served {
    async fn run(
        mut self,
        mut lines: Lines,
        wr: tokio::net::unix::OwnedWriteHalf,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        let (out_tx, out_rx) = mpsc::unbounded::<String>();
        self.out = Some(out_tx.clone());
        self.send(ServerMsg::Welcome {
            device: self.radio.address().to_string(),
            model: self.medium.model().clone(),
        });
        let writer = write_lines(wr, out_rx);
        let _guard = self.token.clone().drop_guard();
        // Scanning on behalf of the client, for the whole session.
        tokio::spawn(forward_scan(self.radio.scan(), out_tx, self.token.clone()));
        let reader = async {
            while let Some(line) = lines.next().await {
                let line = line.map_err(|e| bad(e.to_string()))?;
                match serde_json::from_str::<ClientMsg>(&line) {
                    Ok(msg) => self.on_request(msg).await,
                    Err(e) => tracing::debug!("radio medium: bad client line: {e}"),
                }
            }
            Ok::<(), io::Error>(())
        };
        tokio::select! {
            _ = shutdown.cancelled() => Ok(()),
            r = reader => r,
            _ = writer => Ok(()),
        }
    }

    fn send(&self, m: ServerMsg) {
        if let Some(out) = &self.out {
            let _ = out.unbounded_send(to_line(&m));
        }
    }

    async fn on_request(&self, msg: ClientMsg) {
        match msg {
            ClientMsg::Move { position } => {
                self.medium.set_position(self.radio.address(), position);
            }
            ClientMsg::Listen { req, advert } => {
                let parsed = hex::decode(&advert)
                    .ok()
                    .and_then(|b| Advert::decode(&b).ok());
                let Some(advert) = parsed else {
                    self.send(ServerMsg::Failed {
                        req,
                        error: "bad advertisement".into(),
                    });
                    return;
                };
                match self.radio.listen(advert).await {
                    Ok(incoming) => {
                        self.send(ServerMsg::Ok { req });
                        tokio::spawn(forward_incoming(
                            incoming,
                            self.out.clone(),
                            self.token.clone(),
                            self.pending.clone(),
                            self.next.clone(),
                        ));
                    }
                    Err(e) => self.send(ServerMsg::Failed {
                        req,
                        error: e.to_string(),
                    }),
                }
            }
            ClientMsg::Connect { req, to } => {
                let Ok(to) = to.parse::<DeviceAddr>() else {
                    self.send(ServerMsg::Failed {
                        req,
                        error: "bad device address".into(),
                    });
                    return;
                };
                let fut = self.radio.connect(to);
                let out = self.out.clone();
                let (pending, next) = (self.pending.clone(), self.next.clone());
                tokio::spawn(async move {
                    let m = match fut.await {
                        Ok(l) => {
                            let (link, token) = register(&pending, &next, l);
                            ServerMsg::Connected { req, link, token }
                        }
                        Err(e) => ServerMsg::Failed {
                            req,
                            error: e.to_string(),
                        },
                    };
                    if let Some(out) = out {
                        let _ = out.unbounded_send(to_line(&m));
                    }
                });
            }
        }
    }
}

/// What the radio finds and loses, to the client, until the session ends.
async fn forward_scan(
    mut scan: BoxStream<'static, Neighbour>,
    out: mpsc::UnboundedSender<String>,
    session: CancellationToken,
) {
    loop {
        let n = tokio::select! {
            _ = session.cancelled() => return,
            n = scan.next() => match n { Some(n) => n, None => return },
        };
        let m = match n {
            Neighbour::Found { device, advert, .. } => ServerMsg::Found {
                device: device.to_string(),
                advert: hex::encode(advert.encode()),
            },
            Neighbour::Lost { device } => ServerMsg::Lost {
                device: device.to_string(),
            },
        };
        if out.unbounded_send(to_line(&m)).is_err() {
            return;
        }
    }
}

/// Links offered to a listening radio, registered for the client to
/// attach, until the session ends.
async fn forward_incoming(
    mut incoming: Incoming,
    out: Option<mpsc::UnboundedSender<String>>,
    session: CancellationToken,
    pending: Pending,
    next: Arc<std::sync::atomic::AtomicU64>,
) {
    let Some(out) = out else { return };
    loop {
        let l = tokio::select! {
            _ = session.cancelled() => return,
            l = incoming.next() => match l {
                Some(Ok(l)) => l,
                _ => return,
            },
        };
        let from = l.remote.to_string();
        let (id, token) = register(&pending, &next, l);
        let m = ServerMsg::Incoming {
            link: id,
            token,
            from,
        };
        if out.unbounded_send(to_line(&m)).is_err() {
            return;
        }
    }
}

/// How long a link waits for its owner to attach before it is dropped.
const ATTACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Writes each line from `lines` to `wr`, until the channel closes or the
/// socket fails.
async fn write_lines(
    mut wr: tokio::net::unix::OwnedWriteHalf,
    mut lines: mpsc::UnboundedReceiver<String>,
) {
    while let Some(line) = lines.next().await {
        if wr.write_all(format!("{line}\n").as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Keeps a link until its owner attaches to it (or drops it after
/// [`ATTACH_TIMEOUT`], so a client that never attaches leaks nothing).
fn register(pending: &Pending, next: &std::sync::atomic::AtomicU64, l: Link) -> (u64, u64) {
    let id = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let token: u64 = rand::random();
    pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, (token, l));
    let pending = pending.clone();
    tokio::spawn(async move {
        tokio::time::sleep(ATTACH_TIMEOUT).await;
        pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    });
    (id, token)
}

fn admin_answer(medium: &Medium, req: AdminRequest) -> serde_json::Value {
    let dev = |s: &str| s.parse::<DeviceAddr>().map_err(|e| e.to_string());
    let r: Result<serde_json::Value, String> = match req {
        AdminRequest::List => Ok(serde_json::json!({
            "model": medium.model(),
            "devices": medium.devices(),
        })),
        AdminRequest::Move { device, position } => dev(&device).and_then(|d| {
            if medium.set_position(d, position) {
                Ok(serde_json::json!({ "moved": d.to_string() }))
            } else {
                Err(format!("no device {d} on this medium"))
            }
        }),
        AdminRequest::Drop { device } => {
            dev(&device).map(|d| serde_json::json!({ "dropped_links": medium.drop_links(d) }))
        }
    };
    match r {
        Ok(v) => serde_json::json!({ "ok": v }),
        Err(e) => serde_json::json!({ "error": e }),
    }
}

/// Asks a medium one admin question.
pub async fn admin(socket: &Path, req: AdminRequest) -> io::Result<serde_json::Value> {
    let conn = UnixStream::connect(socket).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot reach the radio medium at {}: {e}", socket.display()),
        )
    })?;
    let (rd, mut wr) = conn.into_split();
    wr.write_all(format!("{}\n", to_line(&Opening::Admin(req))).as_bytes())
        .await?;
    let mut lines = FramedRead::new(rd, LinesCodec::new_with_max_length(16 * MAX_LINE));
    let line = lines
        .next()
        .await
        .ok_or_else(|| bad("the medium closed without answering"))?
        .map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(io::Error::other(e.to_owned()));
    }
    Ok(v.get("ok").cloned().unwrap_or(serde_json::Value::Null))
}

/// The answer to a request: a link id and token for `connect`, nothing for
/// `listen`, or the medium's error.
type Answer = Result<Option<(u64, u64)>, String>;

struct ClientState {
    next_req: u64,
    waiting: HashMap<u64, oneshot::Sender<Answer>>,
    incoming: Option<mpsc::Sender<io::Result<Link>>>,
    scanners: Vec<mpsc::UnboundedSender<Neighbour>>,
    heard: HashMap<DeviceAddr, Advert>,
    /// The lines to the medium, while connected; `None` while rejoining.
    out: Option<mpsc::UnboundedSender<String>>,
    /// Where the radio is (sent again on rejoining).
    position: Position,
    /// What it advertises, once listening (advertised again on
    /// rejoining).
    advert: Option<Advert>,
}

/// First back-off before rejoining a medium, doubled per failed attempt.
const REJOIN_FIRST: std::time::Duration = std::time::Duration::from_millis(250);
/// Longest back-off between attempts to rejoin a medium.
const REJOIN_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// A radio on a medium served by another process.
pub struct SocketRadio {
    addr: DeviceAddr,
    limits: LinkLimits,
    socket: PathBuf,
    state: Arc<Mutex<ClientState>>,
    _session: tokio_util::sync::DropGuard,
}

impl std::fmt::Debug for SocketRadio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketRadio")
            .field("addr", &self.addr)
            .field("socket", &self.socket)
            .finish()
    }
}

/// One control session's socket, once welcomed.
struct Session {
    device: DeviceAddr,
    model: LinkModel,
    lines: FramedRead<tokio::net::unix::OwnedReadHalf, LinesCodec>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

/// Opens a control session with the medium at `socket`: for a new radio
/// (`device` `None`), or for one that rejoins with its address.
async fn open(
    socket: &Path,
    position: Position,
    device: Option<DeviceAddr>,
) -> io::Result<Session> {
    let conn = UnixStream::connect(socket).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot reach the radio medium at {} (is `fogmesh radio serve` running?): {e}",
                socket.display()
            ),
        )
    })?;
    let (rd, mut wr) = conn.into_split();
    let hello = Opening::Hello {
        position,
        device: device.map(|d| d.to_string()),
    };
    wr.write_all(format!("{}\n", to_line(&hello)).as_bytes())
        .await?;
    let mut lines = FramedRead::new(rd, LinesCodec::new_with_max_length(MAX_LINE));
    let first = lines
        .next()
        .await
        .ok_or_else(|| bad("the medium closed the connection"))?
        .map_err(|e| bad(e.to_string()))?;
    match serde_json::from_str(&first) {
        Ok(ServerMsg::Welcome { device, model }) => Ok(Session {
            device: device
                .parse::<DeviceAddr>()
                .map_err(|e| bad(e.to_string()))?,
            model,
            lines,
            wr,
        }),
        Ok(ServerMsg::Failed { error, .. }) => Err(bad(format!("the medium refused us: {error}"))),
        _ => Err(bad("the medium did not welcome us")),
    }
}

impl SocketRadio {
    /// Joins the medium at `socket`, at `position`. If the connection
    /// breaks later (the medium restarted), the radio rejoins by itself.
    pub async fn connect(socket: &Path, position: Position) -> io::Result<SocketRadio> {
        let session = open(socket, position, None).await?;
        let addr = session.device;
        let limits = session.model.limits();
        let state = Arc::new(Mutex::new(ClientState {
            next_req: 0,
            waiting: HashMap::new(),
            incoming: None,
            scanners: Vec::new(),
            heard: HashMap::new(),
            out: None,
            position,
            advert: None,
        }));
        let stop = CancellationToken::new();
        let lines = start(&state, session);
        tokio::spawn(supervise(
            state.clone(),
            socket.to_path_buf(),
            addr,
            lines,
            stop.clone(),
        ));
        Ok(SocketRadio {
            addr,
            limits,
            socket: socket.to_path_buf(),
            state,
            _session: stop.drop_guard(),
        })
    }

    /// Moves this radio.
    pub fn set_position(&self, position: Position) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        g.position = position;
        if let Some(out) = &g.out {
            let _ = out.unbounded_send(to_line(&ClientMsg::Move { position }));
        }
    }

    fn request(&self, make: impl FnOnce(u64) -> ClientMsg) -> oneshot::Receiver<Answer> {
        let (tx, rx) = oneshot::channel();
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(out) = g.out.clone() else {
            let _ = tx.send(Err("the radio medium closed (rejoining)".into()));
            return rx;
        };
        g.next_req += 1;
        let req = g.next_req;
        g.waiting.insert(req, tx);
        let _ = out.unbounded_send(to_line(&make(req)));
        rx
    }
}

/// Puts a welcomed session to use: its writer task, and the radio's
/// advertisement again if it listens. Returns the session's lines, which
/// the caller reads.
fn start(
    state: &Arc<Mutex<ClientState>>,
    session: Session,
) -> FramedRead<tokio::net::unix::OwnedReadHalf, LinesCodec> {
    let (out, out_rx) = mpsc::unbounded::<String>();
    let mut g = state.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(advert) = g.advert {
        // No one waits for this answer: a failure is only logged.
        g.next_req += 1;
        let req = g.next_req;
        let _ = out.unbounded_send(to_line(&ClientMsg::Listen {
            req,
            advert: hex::encode(advert.encode()),
        }));
    }
    g.out = Some(out);
    drop(g);
    // The writer ends when the sender (in the state) is dropped or
    // replaced, or the socket fails.
    tokio::spawn(write_lines(session.wr, out_rx));
    session.lines
}

/// Reads the medium's lines; when the connection breaks, reports the
/// neighbours lost and rejoins with back-off, until `stop`.
async fn supervise(
    state: Arc<Mutex<ClientState>>,
    socket: PathBuf,
    addr: DeviceAddr,
    mut lines: FramedRead<tokio::net::unix::OwnedReadHalf, LinesCodec>,
    stop: CancellationToken,
) {
    loop {
        loop {
            let line = tokio::select! {
                _ = stop.cancelled() => return,
                l = lines.next() => match l { Some(Ok(l)) => l, _ => break },
            };
            match serde_json::from_str::<ServerMsg>(&line) {
                Ok(m) => on_server_msg(&state, &socket, m),
                Err(e) => tracing::debug!("radio medium sent a bad line: {e}"),
            }
        }
        lost(&state);
        tracing::warn!("lost the connection to the radio medium; rejoining");
        let mut wait = REJOIN_FIRST;
        let session = loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let position = state.lock().unwrap_or_else(|e| e.into_inner()).position;
            match open(&socket, position, Some(addr)).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::debug!("cannot rejoin the radio medium yet: {e}");
                    wait = (wait * 2).min(REJOIN_MAX);
                }
            }
        };
        tracing::info!(device = %addr, "rejoined the radio medium");
        lines = start(&state, session);
    }
}

/// The medium is gone: every neighbour with it, every request in flight
/// fails; scanners and the listener stay for the next session.
fn lost(state: &Arc<Mutex<ClientState>>) {
    let mut g = state.lock().unwrap_or_else(|e| e.into_inner());
    g.out = None;
    let heard: Vec<DeviceAddr> = g.heard.drain().map(|(d, _)| d).collect();
    for d in heard {
        g.scanners
            .retain(|tx| tx.unbounded_send(Neighbour::Lost { device: d }).is_ok());
    }
    for (_, w) in g.waiting.drain() {
        let _ = w.send(Err("the radio medium closed".into()));
    }
}

fn on_server_msg(st: &Arc<Mutex<ClientState>>, socket: &Path, m: ServerMsg) {
    let mut g = st.lock().unwrap_or_else(|e| e.into_inner());
    match m {
        ServerMsg::Welcome { .. } => {}
        ServerMsg::Ok { req } => {
            if let Some(w) = g.waiting.remove(&req) {
                let _ = w.send(Ok(None));
            }
        }
        ServerMsg::Failed { req, error } => {
            if let Some(w) = g.waiting.remove(&req) {
                let _ = w.send(Err(error));
            }
        }
        ServerMsg::Connected { req, link, token } => {
            if let Some(w) = g.waiting.remove(&req) {
                let _ = w.send(Ok(Some((link, token))));
            }
        }
        ServerMsg::Incoming { link, token, from } => {
            let (Some(tx), Ok(from)) = (g.incoming.clone(), from.parse::<DeviceAddr>()) else {
                return;
            };
            let socket = socket.to_path_buf();
            tokio::spawn(async move {
                let r = attach(&socket, link, token).await.map(|io| Link {
                    remote: from,
                    path: DataPath::Simulated,
                    io: Box::new(io),
                });
                let mut tx = tx;
                let _ = tx.send(r).await;
            });
        }
        ServerMsg::Found { device, advert } => {
            let (Ok(device), Some(advert)) = (
                device.parse::<DeviceAddr>(),
                hex::decode(&advert)
                    .ok()
                    .and_then(|b| Advert::decode(&b).ok()),
            ) else {
                return;
            };
            g.heard.insert(device, advert);
            g.scanners.retain(|tx| {
                tx.unbounded_send(Neighbour::Found {
                    device,
                    advert,
                    rssi: None,
                })
                .is_ok()
            });
        }
        ServerMsg::Lost { device } => {
            let Ok(device) = device.parse::<DeviceAddr>() else {
                return;
            };
            g.heard.remove(&device);
            g.scanners
                .retain(|tx| tx.unbounded_send(Neighbour::Lost { device }).is_ok());
        }
    }
}

async fn attach(
    socket: &Path,
    link: u64,
    token: u64,
) -> io::Result<tokio_util::compat::Compat<UnixStream>> {
    let mut conn = UnixStream::connect(socket).await?;
    conn.write_all(format!("{}\n", to_line(&Opening::Attach { link, token })).as_bytes())
        .await?;
    Ok(conn.compat())
}

impl Radio for SocketRadio {
    fn address(&self) -> DeviceAddr {
        self.addr
    }

    fn limits(&self) -> LinkLimits {
        self.limits
    }

    fn listen(&self, advert: Advert) -> BoxFuture<'static, io::Result<Incoming>> {
        let (tx, rx) = mpsc::channel(16);
        {
            let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
            g.incoming = Some(tx);
            g.advert = Some(advert);
        }
        let answer = self.request(|req| ClientMsg::Listen {
            req,
            advert: hex::encode(advert.encode()),
        });
        async move {
            match answer.await {
                Ok(Ok(_)) => Ok(rx.boxed()),
                Ok(Err(e)) => Err(io::Error::other(e)),
                Err(_) => Err(io::Error::other("the radio medium closed")),
            }
        }
        .boxed()
    }

    fn scan(&self) -> BoxStream<'static, Neighbour> {
        let (tx, rx) = mpsc::unbounded();
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for (device, advert) in &g.heard {
            let _ = tx.unbounded_send(Neighbour::Found {
                device: *device,
                advert: *advert,
                rssi: None,
            });
        }
        g.scanners.push(tx);
        rx.boxed()
    }

    fn connect(&self, to: DeviceAddr) -> BoxFuture<'static, io::Result<Link>> {
        let answer = self.request(|req| ClientMsg::Connect {
            req,
            to: to.to_string(),
        });
        let socket = self.socket.clone();
        async move {
            let (link, token) = match answer.await {
                Ok(Ok(Some(lt))) => lt,
                Ok(Ok(None)) => return Err(bad("the medium answered a connect without a link")),
                Ok(Err(e)) => return Err(io::Error::new(io::ErrorKind::ConnectionRefused, e)),
                Err(_) => return Err(io::Error::other("the radio medium closed")),
            };
            let io = attach(&socket, link, token).await?;
            Ok(Link {
                remote: to,
                path: DataPath::Simulated,
                io: Box::new(io),
            })
        }
        .boxed()
    }
}

/// Fuzz target body (see `crate::fuzz`): one line as the medium and its
/// clients read it. Whatever parses must re-serialise to a line that parses
/// to the same thing, and the fields the server acts on (hex adverts,
/// device addresses) parse as they would in a session.
#[doc(hidden)]
pub fn fuzz_line(data: &[u8]) {
    // LinesCodec hands over UTF-8 lines of at most MAX_LINE bytes.
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if line.len() > MAX_LINE || line.contains('\n') {
        return;
    }
    fn stable<T: Serialize + serde::de::DeserializeOwned>(line: &str) -> Option<T> {
        let v: T = serde_json::from_str(line).ok()?;
        let again = to_line(&v);
        match serde_json::from_str::<T>(&again) {
            Ok(w) => assert_eq!(to_line(&w), again, "re-serialised line is not stable"),
            Err(e) => panic!("a parsed line re-serialises to {again:?}, which fails: {e}"),
        }
        Some(v)
    }
    let _ = stable::<Opening>(line);
    if let Some(req) = stable::<AdminRequest>(line) {
        let medium = Medium::new(LinkModel::default());
        let _ = admin_answer(&medium, req);
    }
    match stable::<ClientMsg>(line) {
        Some(ClientMsg::Listen { advert, .. }) => {
            if let Some(a) = hex::decode(&advert)
                .ok()
                .and_then(|b| Advert::decode(&b).ok())
            {
                assert_eq!(Advert::decode(&a.encode()), Ok(a));
            }
        }
        Some(ClientMsg::Connect { to, .. }) => {
            if let Ok(d) = to.parse::<DeviceAddr>() {
                assert_eq!(d.to_string().parse::<DeviceAddr>().ok(), Some(d));
            }
        }
        _ => {}
    }
    if let Some(msg) = stable::<ServerMsg>(line) {
        match msg {
            ServerMsg::Welcome { device, model } => {
                let _ = device.parse::<DeviceAddr>();
                let _ = model.validate();
            }
            ServerMsg::Found { device, advert } => {
                let _ = device.parse::<DeviceAddr>();
                if let Some(a) = hex::decode(&advert)
                    .ok()
                    .and_then(|b| Advert::decode(&b).ok())
                {
                    assert_eq!(Advert::decode(&a.encode()), Ok(a));
                }
            }
            _ => {}
        }
    }
}
