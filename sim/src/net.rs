//! The modelled network: an in-memory libp2p transport whose connections go
//! through a link model (one-way latency per region pair, per-node uplink
//! bandwidth, loss, partitions).
//!
//! Nodes listen on `/memory/<port>`; the simulator knows which node owns
//! which port. Shaping is done on the dialling side for both directions,
//! because only the dialler knows both ends (the memory transport gives the
//! listener an anonymous remote port). Each direction of each connection is
//! a small task that forwards frames when they are due:
//! `start = max(now, uplink free)`, `uplink free = start + len / bandwidth`,
//! `due = uplink free + one-way latency`, so frames stay in order and a
//! busy uplink queues. Loss on a reliable stream shows as a retransmission:
//! a lost frame is delivered one retransmission timeout (200 ms plus the
//! round trip) late, and everything behind it waits (head-of-line blocking),
//! as with TCP. A partition closes the connections that cross it and
//! refuses dials across it until it heals.
//!
//! All model times are multiplied by the time-dilation factor and
//! bandwidths divided by it, so that a slow host can run the model slower
//! than real time; reported times are divided by it again.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::channel::mpsc;
use futures::future::BoxFuture;
use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use libp2p::Multiaddr;
use libp2p::core::Transport;
use libp2p::core::transport::memory::{Channel, MemoryTransport};
use libp2p::core::transport::{DialOpts, ListenerId, TransportError, TransportEvent};
use libp2p::multiaddr::Protocol;
use rand::{RngExt, SeedableRng};
use rw_stream_sink::RwStreamSink;
use tokio::time::Instant;

/// The link model's parameters for every node.
#[derive(Debug)]
pub struct SimNet {
    /// Memory port of each node.
    ports: Vec<u64>,
    node_of_port: HashMap<u64, usize>,
    /// Region of each node.
    region: Vec<usize>,
    /// One-way latency between regions, model ms.
    latency_ms: Vec<Vec<f64>>,
    /// Uplink of each node, bytes per second (model).
    uplink_bps: Vec<f64>,
    /// When each node's uplink is free: one queue for all the node's
    /// connections, both the ones it dialled and the ones it accepted.
    uplink_free: Vec<Mutex<Instant>>,
    /// Probability that a frame is lost (and retransmitted).
    loss: f64,
    /// Time-dilation factor.
    dilation: f64,
    /// Partition side of each node while a partition is active.
    partition: Mutex<Option<Vec<u8>>>,
    /// Bumped at every partition change, so that forwarders check at once
    /// rather than polling.
    changes: tokio::sync::watch::Sender<u64>,
    /// Bytes each node sent.
    sent: Vec<AtomicU64>,
    seed: u64,
}

/// Retransmission timeout floor for a lost frame, model ms.
const RTO_MS: f64 = 200.0;

impl SimNet {
    /// A network of `ports.len()` nodes.
    pub fn new(
        ports: Vec<u64>,
        region: Vec<usize>,
        latency_ms: Vec<Vec<f64>>,
        uplink_bps: Vec<f64>,
        loss: f64,
        dilation: f64,
        seed: u64,
    ) -> Arc<Self> {
        let node_of_port = ports.iter().enumerate().map(|(i, p)| (*p, i)).collect();
        let n = ports.len();
        Arc::new(SimNet {
            ports,
            node_of_port,
            region,
            latency_ms,
            uplink_bps,
            uplink_free: (0..n).map(|_| Mutex::new(Instant::now())).collect(),
            loss,
            dilation,
            partition: Mutex::new(None),
            changes: tokio::sync::watch::Sender::new(0),
            sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
            seed,
        })
    }

    /// The listen address of node `i`.
    pub fn addr(&self, i: usize) -> Multiaddr {
        Multiaddr::empty().with(Protocol::Memory(self.ports[i]))
    }

    /// One-way latency from `a` to `b`, model ms.
    pub fn latency(&self, a: usize, b: usize) -> f64 {
        self.latency_ms[self.region[a]][self.region[b]]
    }

    /// Queues a frame of `len` bytes on node `i`'s uplink, behind whatever
    /// its other connections queued; when it has left.
    fn transmit(&self, i: usize, len: usize) -> Instant {
        let bps = self.uplink_bps[i] / self.dilation;
        let mut free = self.uplink_free[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = Instant::now().max(*free);
        *free = start + Duration::from_secs_f64(len as f64 / bps);
        *free
    }

    /// Splits the network: nodes with different sides cannot talk.
    pub fn partition(&self, sides: Vec<u8>) {
        if let Ok(mut p) = self.partition.lock() {
            *p = Some(sides);
        }
        self.changes.send_modify(|v| *v += 1);
    }

    /// Heals the partition.
    pub fn heal(&self) {
        if let Ok(mut p) = self.partition.lock() {
            *p = None;
        }
        self.changes.send_modify(|v| *v += 1);
    }

    /// Whether `a` and `b` are on different sides of a partition.
    pub fn blocked(&self, a: usize, b: usize) -> bool {
        self.partition
            .lock()
            .ok()
            .and_then(|p| p.as_ref().map(|s| s.get(a) != s.get(b)))
            .unwrap_or(false)
    }

    /// Bytes sent by each node so far.
    pub fn bytes_sent(&self) -> Vec<u64> {
        self.sent
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect()
    }
}

/// The transport of node `node`.
pub struct SimTransport {
    inner: MemoryTransport,
    net: Arc<SimNet>,
    node: usize,
}

impl std::fmt::Debug for SimTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimTransport")
            .field("node", &self.node)
            .finish()
    }
}

impl SimTransport {
    /// The transport of node `node` on `net`.
    pub fn new(net: Arc<SimNet>, node: usize) -> Self {
        SimTransport {
            inner: MemoryTransport::default(),
            net,
            node,
        }
    }
}

/// The dialling side's end of a shaped connection: frames go to and come
/// from the link model's forwarding tasks.
pub struct ShapedChan {
    tx: mpsc::Sender<Vec<u8>>,
    rx: mpsc::Receiver<Vec<u8>>,
}

impl Stream for ShapedChan {
    type Item = io::Result<Vec<u8>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_next_unpin(cx).map(|o| o.map(Ok))
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "link closed")
}

impl Sink<Vec<u8>> for ShapedChan {
    type Error = io::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().tx.poll_ready_unpin(cx).map_err(|_| closed())
    }

    fn start_send(self: Pin<&mut Self>, item: Vec<u8>) -> Result<(), Self::Error> {
        self.get_mut()
            .tx
            .start_send_unpin(item)
            .map_err(|_| closed())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().tx.poll_flush_unpin(cx).map_err(|_| closed())
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().tx.poll_close_unpin(cx).map_err(|_| closed())
    }
}

/// A connection's bytes: direct (the listening side) or through the link
/// model (the dialling side).
pub enum SimStream {
    /// Unshaped.
    Direct(Channel<Vec<u8>>),
    /// Shaped.
    Shaped(RwStreamSink<ShapedChan>),
}

impl AsyncRead for SimStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SimStream::Direct(c) => Pin::new(c).poll_read(cx, buf),
            SimStream::Shaped(c) => Pin::new(c).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SimStream::Direct(c) => Pin::new(c).poll_write(cx, buf),
            SimStream::Shaped(c) => Pin::new(c).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SimStream::Direct(c) => Pin::new(c).poll_flush(cx),
            SimStream::Shaped(c) => Pin::new(c).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SimStream::Direct(c) => Pin::new(c).poll_close(cx),
            SimStream::Shaped(c) => Pin::new(c).poll_close(cx),
        }
    }
}

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The memory transport's own error.
    #[error(transparent)]
    Memory(#[from] libp2p::core::transport::memory::MemoryTransportError),
    /// The two nodes are on different sides of a partition.
    #[error("partitioned")]
    Partitioned,
}

impl Transport for SimTransport {
    type Output = SimStream;
    type Error = SimError;
    type ListenerUpgrade = BoxFuture<'static, Result<SimStream, SimError>>;
    type Dial = BoxFuture<'static, Result<SimStream, SimError>>;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.inner
            .listen_on(id, addr)
            .map_err(|e| e.map(SimError::Memory))
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let port = match addr.iter().next() {
            Some(Protocol::Memory(p)) => p,
            _ => return Err(TransportError::MultiaddrNotSupported(addr)),
        };
        let Some(&remote) = self.net.node_of_port.get(&port) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        let local = self.node;
        let net = self.net.clone();
        if net.blocked(local, remote) {
            return Ok(async { Err(SimError::Partitioned) }.boxed());
        }
        let dial = self
            .inner
            .dial(addr, opts)
            .map_err(|e| e.map(SimError::Memory))?;
        Ok(async move {
            let channel = dial.await?;
            Ok(shape(channel, net, local, remote))
        }
        .boxed())
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(ev) => Poll::Ready(
                ev.map_upgrade(|up| async move { Ok(SimStream::Direct(up.await?)) }.boxed())
                    .map_err(SimError::Memory),
            ),
        }
    }
}

/// Wraps the dialler's end of a memory channel in the link model.
fn shape(channel: Channel<Vec<u8>>, net: Arc<SimNet>, local: usize, remote: usize) -> SimStream {
    let (mut inner_rd, inner_wr) = channel.split();
    let (app_tx, out_rx) = mpsc::channel::<Vec<u8>>(64);
    let (in_tx, app_rx) = mpsc::channel::<Vec<u8>>(64);
    // Outbound: this node's uplink, latency local -> remote.
    tokio::spawn(forward(
        out_rx,
        Writer(inner_wr),
        net.clone(),
        local,
        remote,
    ));
    // Inbound: bytes from the remote, as frames, through its uplink and the
    // latency remote -> local.
    // One read buffer per connection, reused: allocating it on every poll
    // was most of the simulator's CPU. 16 KiB (a large Noise frame is read
    // in four): thousands of connections share the host's memory.
    let mut buf = vec![0u8; 16 * 1024];
    let frames =
        futures::stream::poll_fn(
            move |cx| match Pin::new(&mut inner_rd).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(None),
                Poll::Ready(Ok(n)) => Poll::Ready(Some(buf[..n].to_vec())),
                Poll::Pending => Poll::Pending,
            },
        );
    tokio::spawn(forward(frames, Frames(in_tx), net, remote, local));
    SimStream::Shaped(RwStreamSink::new(ShapedChan {
        tx: app_tx,
        rx: app_rx,
    }))
}

/// Where a forwarder delivers frames.
trait Deliver {
    async fn deliver(&mut self, frame: Vec<u8>) -> bool;
    async fn finish(&mut self);
}

/// Into the memory channel (towards the listener).
struct Writer(futures::io::WriteHalf<Channel<Vec<u8>>>);

impl Deliver for Writer {
    async fn deliver(&mut self, frame: Vec<u8>) -> bool {
        self.0.write_all(&frame).await.is_ok() && self.0.flush().await.is_ok()
    }
    async fn finish(&mut self) {
        let _ = self.0.close().await;
    }
}

/// To the dialling side's reader.
struct Frames(mpsc::Sender<Vec<u8>>);

impl Deliver for Frames {
    async fn deliver(&mut self, frame: Vec<u8>) -> bool {
        self.0.send(frame).await.is_ok()
    }
    async fn finish(&mut self) {
        self.0.close_channel();
    }
}

/// Forwards frames from `from` (sent by node `src`) to `to` (towards node
/// `dst`) when the link model says they arrive.
///
/// The link is a pipe: a frame is taken from the sender as soon as its
/// uplink (shared by all of `src`'s connections) is free (a busy uplink
/// holds the sender back, as a full socket buffer does) and is then in
/// flight for one latency while the next ones follow it. Frames arrive in order; a lost frame's retransmission holds
/// back everything behind it.
async fn forward<S, D>(mut from: S, mut to: D, net: Arc<SimNet>, src: usize, dst: usize)
where
    S: Stream<Item = Vec<u8>> + Unpin,
    D: Deliver,
{
    let f = net.dilation;
    let latency = Duration::from_secs_f64(net.latency(src, dst) * f / 1000.0);
    let rtt = Duration::from_secs_f64((net.latency(src, dst) + net.latency(dst, src)) * f / 1000.0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(net.seed ^ ((src as u64) << 32) ^ dst as u64);
    let mut uplink_free = Instant::now();
    let mut last_due = Instant::now();
    let mut in_flight: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut sending = true;
    let mut changes = net.changes.subscribe();
    while sending || !in_flight.is_empty() {
        let head_due = in_flight.front().map(|(due, _)| *due);
        let uplink_busy = uplink_free > Instant::now();
        tokio::select! {
            // Arrivals first: they free the receiver's side.
            _ = sleep_until_some(head_due), if head_due.is_some() => {
                let Some((_, frame)) = in_flight.pop_front() else { continue };
                if !to.deliver(frame).await {
                    break;
                }
            }
            _ = tokio::time::sleep_until(uplink_free), if sending && uplink_busy => {}
            next = from.next(), if sending && !uplink_busy => {
                let Some(frame) = next else {
                    sending = false;
                    continue;
                };
                if net.blocked(src, dst) {
                    break;
                }
                net.sent[src].fetch_add(frame.len() as u64, Ordering::Relaxed);
                uplink_free = net.transmit(src, frame.len());
                let mut due = uplink_free + latency;
                if net.loss > 0.0 && rng.random::<f64>() < net.loss {
                    due += Duration::from_secs_f64(RTO_MS * f / 1000.0) + rtt;
                }
                // In order: nothing overtakes a retransmitted frame.
                due = due.max(last_due);
                last_due = due;
                in_flight.push_back((due, frame));
            }
            r = changes.changed() => {
                if r.is_err() || net.blocked(src, dst) {
                    break;
                }
            }
        }
    }
    to.finish().await;
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames sent together arrive together, one latency later: a link is
    /// a pipe, not one frame per latency (as it was before December 2026).
    #[tokio::test]
    async fn frames_are_in_flight_together() {
        let latency_ms = 100.0;
        let net = SimNet::new(
            vec![1, 2],
            vec![0, 1],
            vec![vec![2.0, latency_ms], vec![latency_ms, 2.0]],
            vec![1e9, 1e9],
            0.0,
            1.0,
            1,
        );
        let (mut tx, rx) = mpsc::channel::<Vec<u8>>(16);
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
        tokio::spawn(forward(rx, Frames(out_tx), net, 0, 1));
        let start = Instant::now();
        for i in 0..10u8 {
            tx.send(vec![i; 100]).await.expect("forwarder runs");
        }
        for i in 0..10u8 {
            assert_eq!(out_rx.next().await, Some(vec![i; 100]), "in order");
        }
        let took = start.elapsed();
        // One latency (100 ms), with room for a loaded host; one frame
        // per latency would be a whole second.
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_millis(600), "{took:?}");
    }

    /// A node's connections share its uplink: two connections sending
    /// at once take twice as long as one.
    #[tokio::test]
    async fn connections_share_their_node_uplink() {
        // 1 MB/s; 2 ms latency; 20 frames of 10 kB per connection: 200 ms
        // of uplink each.
        let net = SimNet::new(
            vec![1, 2, 3],
            vec![0, 0, 0],
            vec![vec![2.0]],
            vec![1e6, 1e9, 1e9],
            0.0,
            1.0,
            1,
        );
        let send_on = |dst: usize| {
            let (mut tx, rx) = mpsc::channel::<Vec<u8>>(64);
            let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(64);
            tokio::spawn(forward(rx, Frames(out_tx), net.clone(), 0, dst));
            tokio::spawn(async move {
                for _ in 0..20 {
                    tx.send(vec![0; 10_000]).await.expect("forwarder runs");
                }
            });
            tokio::spawn(async move {
                for _ in 0..20 {
                    out_rx.next().await.expect("a frame");
                }
            })
        };
        let start = Instant::now();
        send_on(1).await.expect("one connection");
        let one = start.elapsed();
        let start = Instant::now();
        let (a, b) = (send_on(1), send_on(2));
        a.await.expect("first");
        b.await.expect("second");
        let two = start.elapsed();
        assert!(one >= Duration::from_millis(200), "{one:?}");
        assert!(two >= Duration::from_millis(400), "{two:?} (one: {one:?})");
        assert!(two < Duration::from_millis(1500), "{two:?}");
    }
}
