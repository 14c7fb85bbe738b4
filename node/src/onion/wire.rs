//! The tasks that read and write `/fogmesh/mix/1` streams.
//!
//! A stream carries frames in one direction (each side opens its own
//! stream to write); their format is `fogmesh_protocols::onion::stream`.
//! Headers are checked before anything is read into memory; anything else
//! ends the stream.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fogmesh_protocols::onion::stream::{HEADER, Head, PACKET, split_batch};
use fogmesh_protocols::rate::{RateTable, TokenBucket};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::mpsc;

use super::OnionMetrics;
use super::worker::WorkIn;

/// The protocol.
pub(super) const PROTOCOL: StreamProtocol = StreamProtocol::new(fogmesh_protocols::onion::PROTOCOL);
pub(super) use fogmesh_protocols::onion::stream::{descriptors_frame, packet_frame, want_frame};
/// Frames queued for one neighbour; beyond, packets are dropped.
pub(super) const WRITER_QUEUE: usize = 512;
/// Inbound streams read at once (all peers).
const MAX_READERS: usize = 1024;

/// What a reader or writer tells the onion task.
#[derive(Debug)]
pub(super) enum StreamEvent {
    /// Descriptors a neighbour sent.
    Descriptors { from: PeerId, list: Vec<Vec<u8>> },
    /// A neighbour asked for the descriptors we know.
    Want { from: PeerId },
    /// The stream to a neighbour could not be opened or broke.
    WriterDown { peer: PeerId, why: String },
    /// A neighbour whose stream failed while it stayed connected gets a
    /// new one now (the onion task sends this to itself a moment after
    /// the failure).
    Reopen { peer: PeerId },
}

/// Writes `rx`'s frames to `peer` on one stream, opened at the first
/// frame (dialling if need be for a packet; descriptors for a peer
/// `linked` has no connection to are dropped instead). Ends when the queue closes, the stream
/// breaks, or nothing came to write for `idle`: then the queue is closed
/// (the onion task opens a new writer for the next frame) and what it
/// still held is written before the stream is closed.
///
/// Only packets hold a connection open: a stream opened for descriptors
/// is left out of the connection's keep-alive (as the reader leaves out
/// a stream whose first frame is descriptors), and the first packet after
/// them goes on a new stream that counts. Otherwise every connection,
/// down to each one a Kademlia lookup opened, was held for `idle` after
/// each batch of descriptors word of mouth passed along it.
pub(super) async fn writer(
    mut control: libp2p_stream::Control,
    linked: super::Linked,
    peer: PeerId,
    mut rx: mpsc::Receiver<Vec<u8>>,
    events: mpsc::Sender<StreamEvent>,
    idle: Duration,
    open_timeout: Duration,
) {
    let down = |why: String| {
        let _ = events.try_send(StreamEvent::WriterDown { peer, why });
    };
    // The open stream and whether it holds the connection open.
    let mut current: Option<(Stream, bool)> = None;
    loop {
        let f = match tokio::time::timeout(idle, rx.recv()).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(_) => {
                rx.close();
                match rx.try_recv() {
                    Ok(f) => f,
                    Err(_) => break,
                }
            }
        };
        let holds = f.first() == Some(&PACKET);
        if holds
            && current.as_ref().is_some_and(|(_, h)| !h)
            && let Some((mut old, _)) = current.take()
        {
            let _ = old.close().await;
        }
        let stream = match &mut current {
            Some((s, _)) => s,
            None if !holds && !linked.contains(&peer) => {
                // Descriptors are for a neighbour: opening a stream to a
                // peer with no connection would dial it (and the new
                // connection's descriptors would go the same way).
                tracing::trace!(%peer, "descriptors dropped: no connection");
                continue;
            }
            None => {
                let opened =
                    tokio::time::timeout(open_timeout, control.open_stream(peer, PROTOCOL)).await;
                let mut s = match opened {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return down(e.to_string()),
                    Err(_) => return down("timed out opening the mix stream".into()),
                };
                if !holds {
                    s.ignore_for_keep_alive();
                }
                &mut current.insert((s, holds)).0
            }
        };
        let sent = async {
            stream.write_all(&f).await?;
            stream.flush().await
        };
        if let Err(e) = sent.await {
            return down(e.to_string());
        }
    }
    if let Some((mut s, _)) = current {
        let _ = s.close().await;
    }
}

/// What every reader shares.
#[derive(Clone)]
pub(super) struct ReaderCtx {
    pub(super) work: crate::actor::BoundedSender<WorkIn>,
    pub(super) events: mpsc::Sender<StreamEvent>,
    pub(super) rates: Arc<Mutex<RateTable<PeerId>>>,
    pub(super) peer_rate: u64,
    pub(super) metrics: Arc<OnionMetrics>,
    pub(super) readers: Arc<AtomicUsize>,
}

/// Reads one inbound stream until it ends or misbehaves.
pub(super) async fn reader(ctx: ReaderCtx, peer: PeerId, mut stream: Stream) {
    if ctx.readers.fetch_add(1, Ordering::Relaxed) >= MAX_READERS {
        ctx.readers.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let why = read_frames(&ctx, peer, &mut stream).await;
    tracing::debug!(%peer, "mix stream ended: {why}");
    ctx.readers.fetch_sub(1, Ordering::Relaxed);
}

async fn read_frames(ctx: &ReaderCtx, peer: PeerId, stream: &mut Stream) -> String {
    let mut head = [0u8; HEADER];
    let mut first = true;
    loop {
        if let Err(e) = stream.read_exact(&mut head).await {
            return e.to_string();
        }
        // A stream that starts with descriptors or a request for them does
        // not hold the connection open (see `writer`).
        if std::mem::take(&mut first) && head[0] != PACKET {
            stream.ignore_for_keep_alive();
        }
        let head = match Head::parse(head) {
            Ok(h) => h,
            Err(e) => return e.to_string(),
        };
        let mut body = vec![0u8; head.body_len()];
        if let Err(e) = stream.read_exact(&mut body).await {
            return e.to_string();
        }
        match head {
            Head::Packet => {
                ctx.metrics.packets_received.inc();
                if !charge(ctx, peer) {
                    ctx.metrics.packets_dropped.inc();
                    continue;
                }
                match ctx.work.try_send(WorkIn::Packet {
                    from: peer,
                    bytes: body,
                }) {
                    Ok(()) => {}
                    Err(std::sync::mpsc::TrySendError::Full(_)) => {
                        ctx.metrics.packets_dropped.inc();
                    }
                    Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                        return "the worker stopped".into();
                    }
                }
            }
            Head::Descriptors(_) => {
                let Some(list) = split_batch(&body) else {
                    return "malformed descriptor batch".into();
                };
                if ctx
                    .events
                    .try_send(StreamEvent::Descriptors { from: peer, list })
                    .is_err()
                {
                    tracing::debug!(%peer, "descriptor batch dropped: the onion task is busy");
                }
            }
            Head::Want => {
                if ctx
                    .events
                    .try_send(StreamEvent::Want { from: peer })
                    .is_err()
                {
                    tracing::debug!(%peer, "descriptor request dropped: the onion task is busy");
                }
            }
        }
    }
}

fn charge(ctx: &ReaderCtx, peer: PeerId) -> bool {
    let Ok(mut rates) = ctx.rates.lock() else {
        return false;
    };
    let rate = ctx.peer_rate.max(1);
    rates.try_take(peer, 1, Instant::now(), || TokenBucket::new(rate, rate * 4))
}

#[cfg(test)]
mod tests {
    use std::task::{Context, Poll};

    use fogmesh_protocols::onion::PACKET_SIZE;
    use futures::StreamExt;
    use libp2p::core::transport::{MemoryTransport, PortUse};
    use libp2p::core::{Endpoint, Multiaddr, Transport, upgrade};
    use libp2p::swarm::{
        ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, SwarmEvent, THandlerInEvent,
        THandlerOutEvent, ToSwarm, dummy,
    };
    use libp2p::{Swarm, SwarmBuilder, noise, yamux};

    use super::*;
    use crate::onion::Linked;

    /// Knows one peer's address, as Kademlia or identify would in a
    /// node, so that a dial for it is attempted rather than refused.
    struct Book(PeerId, Multiaddr);

    impl NetworkBehaviour for Book {
        type ConnectionHandler = dummy::ConnectionHandler;
        type ToSwarm = std::convert::Infallible;

        fn handle_established_inbound_connection(
            &mut self,
            _: ConnectionId,
            _: PeerId,
            _: &Multiaddr,
            _: &Multiaddr,
        ) -> Result<Self::ConnectionHandler, ConnectionDenied> {
            Ok(dummy::ConnectionHandler)
        }

        fn handle_established_outbound_connection(
            &mut self,
            _: ConnectionId,
            _: PeerId,
            _: &Multiaddr,
            _: Endpoint,
            _: PortUse,
        ) -> Result<Self::ConnectionHandler, ConnectionDenied> {
            Ok(dummy::ConnectionHandler)
        }

        fn handle_pending_outbound_connection(
            &mut self,
            _: ConnectionId,
            peer: Option<PeerId>,
            _: &[Multiaddr],
            _: Endpoint,
        ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
            Ok(if peer == Some(self.0) {
                vec![self.1.clone()]
            } else {
                vec![]
            })
        }

        fn on_swarm_event(&mut self, _: FromSwarm) {}

        fn on_connection_handler_event(
            &mut self,
            _: PeerId,
            _: ConnectionId,
            ev: THandlerOutEvent<Self>,
        ) {
            match ev {}
        }

        fn poll(
            &mut self,
            _: &mut Context<'_>,
        ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
            Poll::Pending
        }
    }

    #[derive(NetworkBehaviour)]
    struct Streams {
        stream: libp2p_stream::Behaviour,
        book: Book,
    }

    /// A swarm of [`Streams`] on the memory transport.
    fn streams(peer: PeerId) -> Swarm<Streams> {
        SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_other_transport(|key| {
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    MemoryTransport::default()
                        .upgrade(upgrade::Version::V1)
                        .authenticate(noise::Config::new(key)?)
                        .multiplex(yamux::Config::default()),
                )
            })
            .expect("memory transport")
            .with_behaviour(|_| Streams {
                stream: libp2p_stream::Behaviour::new(),
                // Nobody listens there: the dial is made, and fails.
                book: Book(peer, "/memory/4242".parse().expect("addr")),
            })
            .expect("behaviour")
            .build()
    }

    /// Runs a writer for `peer` (to which `swarm` has no connection) with
    /// one frame, driving the swarm for a while: whether the swarm tried
    /// to dial `peer`, and what the writer told the onion task.
    async fn write_unconnected(frame: Vec<u8>) -> (bool, Vec<String>) {
        let peer = PeerId::random();
        let mut swarm = streams(peer);
        let (tx, rx) = mpsc::channel(4);
        let (ev_tx, mut ev_rx) = mpsc::channel(4);
        let control = swarm.behaviour().stream.new_control();
        let writer = tokio::spawn(writer(
            control,
            Linked::default(),
            peer,
            rx,
            ev_tx,
            Duration::from_secs(30),
            crate::onion::OPEN_TIMEOUT,
        ));
        tx.send(frame).await.expect("queued");
        drop(tx);
        let mut dialled = false;
        let until = tokio::time::sleep(Duration::from_millis(500));
        tokio::pin!(until);
        loop {
            tokio::select! {
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::Dialing { peer_id, .. }
                    | SwarmEvent::OutgoingConnectionError { peer_id, .. } => {
                        dialled |= peer_id == Some(peer);
                    }
                    _ => {}
                },
                _ = &mut until => break,
            }
        }
        tokio::time::timeout(Duration::from_secs(12), writer)
            .await
            .expect("the writer ends")
            .expect("no panic");
        let mut told = Vec::new();
        while let Ok(StreamEvent::WriterDown { why, .. }) = ev_rx.try_recv() {
            told.push(why);
        }
        (dialled, told)
    }

    /// Descriptors are for neighbours: with no connection to the peer the
    /// writer drops them and opens nothing, since opening a stream dials.
    /// A packet does dial (the next hop may be a mix node not yet
    /// connected), which shows the swarm would have seen the dial.
    #[tokio::test]
    async fn descriptors_never_dial_a_peer_packets_do() {
        let descriptors = descriptors_frame([[7u8; 64].as_slice()].into_iter());
        let (dialled, told) = write_unconnected(descriptors).await;
        assert!(!dialled, "descriptors dialled the peer");
        assert!(told.is_empty(), "{told:?}");

        let (dialled, told) = write_unconnected(packet_frame(&[0u8; PACKET_SIZE])).await;
        assert!(dialled, "a packet did not dial the peer: {told:?}");
        assert_eq!(told.len(), 1, "{told:?}");
    }
}
