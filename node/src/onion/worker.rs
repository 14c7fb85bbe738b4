//! The Sphinx thread: owns the mix keys and the replay filters, processes
//! every packet that arrives and builds every packet and reply block the
//! node sends. One thread, fed by a bounded queue (readers drop packets
//! when it is full), so Sphinx work never runs on an async task.

use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use fogmesh_protocols::messages::MessageId;
use fogmesh_protocols::onion::ReplyBlock;
use fogmesh_protocols::onion::packet::{self, Hop, Mixer, PacketError, Piece, Processed};
use libp2p::PeerId;
use tokio::sync::mpsc;

use super::MixOrigin;
use crate::actor::{BoundedReceiver as Receiver, BoundedSender as SyncSender};
use crate::messages::now_ms;

/// Jobs queued for the thread; beyond, packets from peers are dropped.
pub(super) const WORK_QUEUE: usize = 4096;

/// One packet of a message to build: its piece, its route (mix hops, then
/// the recipient) and one delay per node.
#[derive(Debug)]
pub(super) struct Leg {
    pub(super) piece: Piece,
    pub(super) route: Vec<Hop>,
    pub(super) delays: Vec<u64>,
}

/// A job.
#[derive(Debug)]
pub(super) enum WorkIn {
    /// A packet from a neighbour.
    Packet { from: PeerId, bytes: Vec<u8> },
    /// Build attempt `n` of message `id`: a reply block along `surb` (mix
    /// hops, then this node) goes into the first fragment.
    Build {
        id: MessageId,
        n: u32,
        legs: Vec<Leg>,
        surb: (Vec<Hop>, Vec<u64>),
        reply_to: PeerId,
    },
    /// Answer through a reply block.
    Reply { surb: Vec<u8>, piece: Piece },
    /// A loop cover packet.
    Cover { leg: Leg },
}

/// What the thread hands back to the onion task.
#[derive(Debug)]
pub(super) enum WorkOut {
    /// Relay `packet` to `next` after `delay_ms`.
    Forward {
        from: PeerId,
        next: PeerId,
        delay_ms: u64,
        packet: Vec<u8>,
        /// The arriving packet's hash, when mix packets are traced.
        packet_in: Option<String>,
    },
    /// A piece for this node.
    Deliver { piece: Piece },
    /// A reply through one of this node's reply blocks (still sealed).
    Reply { id: [u8; 16], payload: Vec<u8> },
    /// A packet refused (why).
    Dropped { from: PeerId, error: PacketError },
    /// Attempt `n` of message `id` is built: packets to first hops, and
    /// the reply block to remember.
    Built {
        id: MessageId,
        n: u32,
        packets: Vec<(PeerId, Vec<u8>)>,
        block: ReplyBlock,
    },
    /// Attempt `n` of message `id` could not be built.
    BuildFailed { id: MessageId, n: u32, why: String },
    /// Packets to send now (a reply, cover).
    Send {
        to: PeerId,
        packet: Vec<u8>,
        origin: MixOrigin,
    },
    /// The mix key changed: the new epoch, public key and validity.
    NewKey {
        epoch: u64,
        key: [u8; 32],
        valid: (u64, u64),
    },
}

/// Starts the thread over `mixer`; `trace`: hash arriving packets for
/// the mix trace.
pub(super) fn spawn(
    mut mixer: Mixer,
    trace: bool,
    rx: Receiver<WorkIn>,
    out: mpsc::Sender<WorkOut>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("fogmesh-mix".into())
        .spawn(move || {
            loop {
                let job = match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                };
                if mixer.rotate(now_ms()) {
                    let (epoch, key) = mixer.keys().current();
                    let valid = mixer.keys().validity();
                    if out
                        .blocking_send(WorkOut::NewKey { epoch, key, valid })
                        .is_err()
                    {
                        break;
                    }
                }
                let Some(job) = job else { continue };
                for o in run(&mut mixer, job, trace) {
                    if out.blocking_send(o).is_err() {
                        return;
                    }
                }
            }
        })
}

fn run(mixer: &mut Mixer, job: WorkIn, trace: bool) -> Vec<WorkOut> {
    match job {
        WorkIn::Packet { from, bytes } => vec![match mixer.process(&bytes) {
            Ok(Processed::Forward {
                next,
                delay_ms,
                packet,
            }) => WorkOut::Forward {
                from,
                next,
                delay_ms,
                packet,
                packet_in: trace.then(|| super::packet_hash(&bytes)),
            },
            Ok(Processed::Deliver(piece)) => WorkOut::Deliver { piece },
            Ok(Processed::Reply { id, payload }) => WorkOut::Reply { id, payload },
            Err(error) => WorkOut::Dropped { from, error },
        }],
        WorkIn::Build {
            id,
            n,
            legs,
            surb,
            reply_to,
        } => vec![match build(legs, surb, reply_to) {
            Ok((packets, block)) => WorkOut::Built {
                id,
                n,
                packets,
                block,
            },
            Err(e) => WorkOut::BuildFailed {
                id,
                n,
                why: e.to_string(),
            },
        }],
        WorkIn::Reply { surb, piece } => match packet::use_surb(&surb, &piece) {
            Ok((to, packet)) => vec![WorkOut::Send {
                to,
                packet,
                origin: MixOrigin::Reply,
            }],
            Err(e) => {
                tracing::debug!("cannot use a reply block: {e}");
                Vec::new()
            }
        },
        WorkIn::Cover { leg } => {
            let Some(first) = leg.route.first().map(|h| h.peer) else {
                return Vec::new();
            };
            match packet::build(&leg.piece, &leg.route, &leg.delays) {
                Ok(packet) => vec![WorkOut::Send {
                    to: first,
                    packet,
                    origin: MixOrigin::Cover,
                }],
                Err(e) => {
                    tracing::debug!("cannot build a cover packet: {e}");
                    Vec::new()
                }
            }
        }
    }
}

type Built = (Vec<(PeerId, Vec<u8>)>, ReplyBlock);

fn build(
    legs: Vec<Leg>,
    surb: (Vec<Hop>, Vec<u64>),
    reply_to: PeerId,
) -> Result<Built, PacketError> {
    let block = packet::make_surb(&surb.0, &surb.1, &mut rand::rng())?;
    let mut packets = Vec::with_capacity(legs.len());
    for (i, mut leg) in legs.into_iter().enumerate() {
        if i == 0
            && let Piece::Fragment {
                surb: s,
                reply_to: r,
                ..
            } = &mut leg.piece
        {
            *s = Some(serde_bytes::ByteBuf::from(block.surb.clone()));
            *r = Some(reply_to);
        }
        let first = leg
            .route
            .first()
            .map(|h| h.peer)
            .ok_or(PacketError::Sphinx("empty route".into()))?;
        packets.push((first, packet::build(&leg.piece, &leg.route, &leg.delays)?));
    }
    Ok((packets, block))
}

/// The queue the readers and the onion task feed.
pub(super) fn queue() -> (SyncSender<WorkIn>, Receiver<WorkIn>) {
    crate::actor::bounded(WORK_QUEUE)
}
