//! Direct-message benchmarks: send-to-delivered latency per route with
//! real nodes in one process (each assembled by `NodeBuilder`, as the
//! daemon assembles its own), each beside its physical limit, and the
//! failover time from losing the internet link to delivery over BLE.
//!
//! Run with `cargo bench -p fogmesh --bench messages`. Measured, in one run:
//! 1. **internet**: two nodes on loopback TCP (Noise, Yamux), connected;
//!    `MSGS` messages one after the other, each timed from the call to
//!    `MessagesHandle::send` to the recipient's `DirectMessage` event (and
//!    to the sender's `delivered` event: the signed receipt is back). The
//!    physical limit: half the median round trip of an envelope-sized
//!    frame over a plain loopback TCP connection;
//! 2. **BLE at 1, 2 and 4 hops**: five offline nodes in a line 10 m apart
//!    on an in-process simulated radio (range 12 m, so each hears only its
//!    neighbours; otherwise `LinkModel::default()`), node 0 sending to the
//!    nodes 1, 2 and 4 hops away, `MSGS` each. The physical limit: hops x
//!    (the model's one-way latency + the encoded envelope at the link's
//!    bandwidth), the envelope being store-and-forwarded whole at each hop;
//! 3. **failover**: two nodes with both the internet (loopback TCP through
//!    a switch this benchmark can cut) and radios 5 m apart. The link is
//!    cut, a message sent at once, and the time from the cut to its
//!    delivery measured, for two kinds of loss: *reset* (both ends' sockets
//!    shut down, so the connection closes at once and redials fail) and
//!    *silent* (bytes vanish, nothing closes: a dead Wi-Fi). The physical
//!    limit is the one-hop BLE limit of part 2 (detecting the loss costs
//!    nothing in the model).

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use fogmesh::behaviour::BehaviourConfig;
use fogmesh::builder::{Internet, NodeBuilder, RawStream};
use fogmesh::node::NodeHandle;
use fogmesh::storage::Store;
use fogmesh::types::{NodeEvent, SendDirect};
use fogmesh_ble::Radio;
use fogmesh_ble::sim::{LinkModel, Medium, Position};
use fogmesh_protocols::messages::Envelope;
use fogmesh_protocols::messages::letter::{PAD_SIZES, SEAL_OVERHEAD};
use futures::{AsyncRead, AsyncWrite};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Messages timed per route.
const MSGS: usize = 10;
/// Rounds of each kind of failover.
const FAILOVERS: usize = 3;
/// The text of every timed message: short, so its envelope is of the
/// smallest padded size.
const TEXT: &str = "a direct message of the benchmark";
/// Longest wait for one delivery.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(90);
/// Longest wait for the radios to link up (the first message over them).
const WARMUP_DEADLINE: Duration = Duration::from_secs(120);
/// Nodes in the BLE line of part 2, metres between two, radio range.
const LINE: usize = 5;
const SPACING_M: f64 = 10.0;
const RANGE_M: f64 = 12.0;

fn main() {
    let t_all = Instant::now();
    println!("# fogmesh direct-message benchmark\n");
    println!("Command: `cargo bench -p fogmesh --bench messages`\n");
    machine();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let envelope = envelope_size();
    let model = radio_model();
    let hop_ms = model.latency_ms + 1000.0 * envelope as f64 / model.bandwidth as f64;
    println!(
        "\nEnvelope of a {}-byte text: {} bytes encoded (padded plaintext {} B + seal {} B + \
         header). Radio model: `LinkModel::default()` with range {} m: latency {} ms, {} B/s, MTU {} B; \
         one BLE hop's limit {:.1} ms (latency + envelope / bandwidth; Noise and Yamux framing \
         and the ack not counted).\n",
        TEXT.len(),
        envelope,
        PAD_SIZES[0],
        SEAL_OVERHEAD,
        RANGE_M,
        model.latency_ms,
        model.bandwidth,
        model.mtu,
        hop_ms,
    );
    let mut rows = Vec::new();

    let t = Instant::now();
    let limit = rt.block_on(loopback_one_way(envelope));
    let internet = rt.block_on(internet_route());
    rows.push(row(
        "internet (loopback TCP)",
        &internet,
        limit.as_secs_f64() * 1000.0,
    ));
    eprintln!("part 1 took {:.1} s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    for (hops, samples) in rt.block_on(ble_hops()) {
        let name = format!("BLE, {hops} hop{}", if hops == 1 { "" } else { "s" });
        rows.push(row(&name, &samples, hops as f64 * hop_ms));
    }
    eprintln!("part 2 took {:.1} s", t.elapsed().as_secs_f64());

    println!("## Send to delivered, per route\n");
    print_rows(&rows, "send to delivered");

    let t = Instant::now();
    let failover = rt.block_on(failover());
    eprintln!("part 3 took {:.1} s", t.elapsed().as_secs_f64());
    println!("\n## Failover: internet link lost, delivered over BLE\n");
    let rows: Vec<Row> = (failover.into_iter())
        .map(|(kind, samples)| row(&format!("loss: {kind}"), &samples, hop_ms))
        .collect();
    print_rows(&rows, "cut to delivered");
    println!(
        "\nWhole benchmark: {:.1} s (after the build)",
        t_all.elapsed().as_secs_f64()
    );
}

fn machine() {
    let out = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "?".into())
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "?".into());
    println!("| machine | |");
    println!("|---|---|");
    println!("| `nproc` | {} |", out("nproc", &[]));
    println!("| `uname -srm` | {} |", out("uname", &["-srm"]));
    println!("| CPU | {cpu} |");
}

// ---------------------------------------------------------------- results

/// One timed message: send to the recipient's event, send to the
/// sender's receipt, the route that delivered it.
#[derive(Debug, Clone)]
struct Sample {
    delivered: Duration,
    receipt: Option<Duration>,
    route: String,
}

struct Row {
    name: String,
    samples: Vec<Sample>,
    limit_ms: f64,
}

fn row(name: &str, samples: &[Sample], limit_ms: f64) -> Row {
    Row {
        name: name.to_owned(),
        samples: samples.to_vec(),
        limit_ms,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: usize) -> f64 {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied().unwrap_or(f64::NAN)
}

fn print_rows(rows: &[Row], what: &str) {
    println!(
        "| route | n | {what}: median ms | min – max ms | physical limit ms | median / limit | \
         send to receipt: median ms | delivered by |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let mut d: Vec<f64> = r.samples.iter().map(|s| ms(s.delivered)).collect();
        d.sort_by(f64::total_cmp);
        let mut rc: Vec<f64> = (r.samples.iter())
            .filter_map(|s| s.receipt.map(ms))
            .collect();
        rc.sort_by(f64::total_cmp);
        let mut routes: HashMap<&str, usize> = HashMap::new();
        for s in &r.samples {
            *routes.entry(s.route.as_str()).or_default() += 1;
        }
        let mut routes: Vec<String> = routes.iter().map(|(k, v)| format!("{k} x{v}")).collect();
        routes.sort();
        let med = pct(&d, 50);
        println!(
            "| {} | {} | {:.1} | {:.1} – {:.1} | {:.2} | {:.1} | {} | {} |",
            r.name,
            d.len(),
            med,
            d.first().copied().unwrap_or(f64::NAN),
            d.last().copied().unwrap_or(f64::NAN),
            r.limit_ms,
            med / r.limit_ms,
            if rc.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.1}", pct(&rc, 50))
            },
            routes.join(", "),
        );
    }
}

// ---------------------------------------------------------------- nodes

/// The radio model of parts 2 and 3.
fn radio_model() -> LinkModel {
    LinkModel {
        range_m: RANGE_M,
        ..LinkModel::default()
    }
}

/// The encoded size of the envelope of [`TEXT`] (the smallest padded size).
fn envelope_size() -> usize {
    let env = Envelope {
        to: PeerId::random(),
        ttl: fogmesh_protocols::messages::DEFAULT_TTL,
        body: vec![0; PAD_SIZES[0] + SEAL_OVERHEAD],
    };
    env.encode().len()
}

/// A running node of the benchmark.
struct Node {
    handle: NodeHandle,
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(internet: Internet, radio: Option<Arc<dyn Radio>>) -> Node {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_with_cache(dir.path(), Some(1 << 20)).expect("store");
        let listen = match internet {
            Internet::Off => Vec::new(),
            _ => vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        };
        let stop = CancellationToken::new();
        let built = NodeBuilder::new(key, store)
            .internet(internet)
            .radio(radio)
            .listen(listen)
            .behaviour(BehaviourConfig {
                mdns: false,
                kad_bootstrap_interval: None,
                ..BehaviourConfig::default()
            })
            .start(stop.clone())
            .await
            .expect("start node");
        let running = built.running;
        Node {
            handle: running.handle,
            peer,
            addrs: running.listen_addrs,
            stop,
            task: running.task,
            _dir: dir,
        }
    }

    /// Its TCP address (a node with a radio also listens on BLE).
    fn dial_addr(&self) -> Multiaddr {
        let addr = (self.addrs.iter())
            .find(|a| a.to_string().contains("/tcp/"))
            .expect("a TCP listen address")
            .clone();
        addr.with_p2p(self.peer).unwrap_or_else(|a| a)
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Sends [`TEXT`] from `from` to `to` (route forced when `route` is
/// given) and waits for the recipient's event and the sender's receipt
/// (a missing receipt is `None`).
async fn timed_send(
    from: &Node,
    from_events: &mut broadcast::Receiver<NodeEvent>,
    to: &Node,
    to_events: &mut broadcast::Receiver<NodeEvent>,
    route: Option<&str>,
    t0: Instant,
    deadline: Duration,
) -> Option<Sample> {
    let ack = from
        .handle
        .messages()
        .send(SendDirect {
            to: to.peer.to_base58(),
            text: TEXT.to_owned(),
            route: route.map(str::to_owned),
            private: false,
        })
        .await
        .expect("send");
    let id = ack.message_id;
    let delivered = tokio::time::timeout(deadline, async {
        loop {
            match to_events.recv().await {
                Ok(NodeEvent::DirectMessage { id: got, .. }) if got == id => {
                    return t0.elapsed();
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    })
    .await
    .ok();
    let Some(delivered) = delivered else {
        eprintln!("  message {id} not delivered within {deadline:?}");
        return None;
    };
    let receipt = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match from_events.recv().await {
                Ok(NodeEvent::DirectMessageState {
                    id: got,
                    state,
                    route,
                    ..
                }) if got == id && state == "delivered" => return (t0.elapsed(), route),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    })
    .await
    .ok();
    let route = match (&receipt, from.handle.messages().get(&id).await) {
        (Some((_, Some(r))), _) => r.clone(),
        (_, Ok(m)) => m.route.unwrap_or_else(|| "?".into()),
        _ => "?".into(),
    };
    Some(Sample {
        delivered,
        receipt: receipt.map(|r| r.0),
        route,
    })
}

/// `MSGS` timed messages, one after the other.
async fn series(a: &Node, b: &Node, route: Option<&str>) -> Vec<Sample> {
    let (mut ea, mut eb) = (a.handle.subscribe(), b.handle.subscribe());
    let mut out = Vec::new();
    for _ in 0..MSGS {
        let t0 = Instant::now();
        if let Some(s) = timed_send(a, &mut ea, b, &mut eb, route, t0, DELIVERY_DEADLINE).await {
            out.push(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    out
}

// ---------------------------------------------------------------- part 1

/// Half the median round trip of an `n`-byte frame over loopback TCP.
async fn loopback_one_way(n: usize) -> Duration {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let echo = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut buf = vec![0u8; n];
        while s.read_exact(&mut buf).await.is_ok() {
            if s.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let (out, mut back) = (vec![7u8; n], vec![0u8; n]);
    let mut rtts = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        c.write_all(&out).await.expect("write");
        c.read_exact(&mut back).await.expect("read");
        rtts.push(t.elapsed());
    }
    drop(c);
    let _ = echo.await;
    rtts.sort();
    rtts[rtts.len() / 2] / 2
}

async fn internet_route() -> Vec<Sample> {
    let a = Node::start(Internet::Host, None).await;
    let b = Node::start(Internet::Host, None).await;
    a.handle.connect(b.dial_addr()).await.expect("connect");
    // One untimed message first: streams and caches warm.
    let _ = series_one(&a, &b, None).await;
    let samples = series(&a, &b, None).await;
    a.stop().await;
    b.stop().await;
    samples
}

async fn series_one(a: &Node, b: &Node, route: Option<&str>) -> Option<Sample> {
    let (mut ea, mut eb) = (a.handle.subscribe(), b.handle.subscribe());
    let t0 = Instant::now();
    timed_send(a, &mut ea, b, &mut eb, route, t0, WARMUP_DEADLINE).await
}

// ---------------------------------------------------------------- part 2

async fn ble_hops() -> Vec<(usize, Vec<Sample>)> {
    let medium = Medium::new(radio_model());
    let mut nodes = Vec::new();
    for i in 0..LINE {
        let radio: Arc<dyn Radio> = Arc::new(medium.join(Position {
            x: i as f64 * SPACING_M,
            y: 0.0,
        }));
        nodes.push(Node::start(Internet::Off, Some(radio)).await);
    }
    // Every link up: a first message to the far end.
    let t = Instant::now();
    let warm = series_one(&nodes[0], &nodes[LINE - 1], None).await;
    eprintln!(
        "  BLE line warm after {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        if warm.is_some() {
            "ok"
        } else {
            "NOT delivered"
        }
    );
    let mut out = Vec::new();
    for hops in [1, 2, 4] {
        let samples = series(&nodes[0], &nodes[hops], None).await;
        eprintln!("  {hops} hops: {} delivered", samples.len());
        out.push((hops, samples));
    }
    for n in nodes {
        n.stop().await;
    }
    out
}

// ---------------------------------------------------------------- part 3

/// Open, or how the internet link is lost.
const OPEN: u8 = 0;
const SILENT: u8 = 1;
const RESET: u8 = 2;

/// The internet link of part 3: every TCP connection of the two nodes
/// passes through it.
#[derive(Default)]
struct Switch {
    state: AtomicU8,
    /// A second handle on every socket, to shut them down on a reset.
    sockets: Mutex<Vec<std::net::TcpStream>>,
}

impl Switch {
    fn cut(&self, how: u8) {
        self.state.store(how, Ordering::SeqCst);
        if how == RESET
            && let Ok(mut s) = self.sockets.lock()
        {
            for sock in s.drain(..) {
                let _ = sock.shutdown(Shutdown::Both);
            }
        }
    }

    /// Closes whatever connection survived the cut (a silent cut leaves
    /// connections whose streams lost bytes) and opens the link.
    fn restore(&self) {
        self.cut(RESET);
        self.state.store(OPEN, Ordering::SeqCst);
    }

    fn state(&self) -> u8 {
        self.state.load(Ordering::SeqCst)
    }
}

/// A TCP stream through the switch: while it is cut silently, writes
/// vanish and reads never complete.
struct Switched {
    inner: libp2p::tcp::tokio::TcpStream,
    switch: Arc<Switch>,
}

impl AsyncRead for Switched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.switch.state() == SILENT {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Switched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.switch.state() == SILENT {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.switch.state() == SILENT {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.switch.state() == SILENT {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// Loopback TCP through `switch`: while it is cut, new connections fail.
fn switched_tcp(switch: Arc<Switch>) -> Internet {
    let tcp = libp2p::tcp::tokio::Transport::new(libp2p::tcp::Config::default().nodelay(true));
    let transport = tcp
        .and_then(move |stream, _| {
            let switch = switch.clone();
            async move {
                if switch.state() != OPEN {
                    return Err(io::Error::other("the link is cut"));
                }
                let second = stream.0.as_fd().try_clone_to_owned()?;
                if let Ok(mut s) = switch.sockets.lock() {
                    s.push(std::net::TcpStream::from(second));
                }
                Ok(Box::new(Switched {
                    inner: stream,
                    switch,
                }) as Box<dyn RawStream>)
            }
        })
        .boxed();
    Internet::Custom(transport)
}

async fn failover() -> Vec<(&'static str, Vec<Sample>)> {
    let mut out = Vec::new();
    for (kind, how) in [("reset", RESET), ("silent", SILENT)] {
        let mut samples = Vec::new();
        for round in 0..FAILOVERS {
            match failover_round(how).await {
                Ok(s) => {
                    eprintln!(
                        "  {kind} round {}: {:.1} ms by {}",
                        round + 1,
                        ms(s.delivered),
                        s.route
                    );
                    samples.push(s);
                }
                Err(why) => eprintln!("  {kind} round {}: skipped: {why}", round + 1),
            }
        }
        out.push((kind, samples));
    }
    out
}

/// One failover on a fresh pair: connected over TCP, the radios linked by
/// a first message forced onto BLE, a second one by the policy's choice
/// (the internet), then the cut and the timed message.
async fn failover_round(how: u8) -> Result<Sample, String> {
    let medium = Medium::new(radio_model());
    let switch = Arc::new(Switch::default());
    let radio_a = Arc::new(medium.join(Position { x: 0.0, y: 0.0 }));
    let radio_b = Arc::new(medium.join(Position { x: 5.0, y: 0.0 }));
    let a = Node::start(switched_tcp(switch.clone()), Some(radio_a)).await;
    let b = Node::start(switched_tcp(switch.clone()), Some(radio_b)).await;
    let result = async {
        a.handle
            .connect(b.dial_addr())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // The radio link up: one message forced onto BLE; then one by the
        // policy's choice, which must be the internet.
        series_one(&a, &b, Some("ble"))
            .await
            .ok_or("BLE never came up")?;
        let before = series_one(&a, &b, None).await.map(|s| s.route);
        if before.as_deref() != Some("internet") {
            return Err(format!("before the cut, delivered by {before:?}"));
        }
        let (mut ea, mut eb) = (a.handle.subscribe(), b.handle.subscribe());
        let t0 = Instant::now();
        switch.cut(how);
        timed_send(&a, &mut ea, &b, &mut eb, None, t0, DELIVERY_DEADLINE)
            .await
            .ok_or_else(|| "not delivered".to_owned())
    }
    .await;
    switch.restore();
    a.stop().await;
    b.stop().await;
    result
}
