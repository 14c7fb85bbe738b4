//! The onion task: descriptors, paths, the per-hop delay queue, reply
//! blocks, reassembly, and the exchange with the messages actor.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fogmesh_protocols::messages::{Envelope, MessageId};
use fogmesh_protocols::onion::descriptor::{Descriptor, Role, SignedDescriptor};
use fogmesh_protocols::onion::fragment::{self, ReplyTo};
use fogmesh_protocols::onion::links::{AfterFailure, Links};
use fogmesh_protocols::onion::packet::{self, Hop, MAX_REPLY, Mixer, PacketError, Piece};
use fogmesh_protocols::onion::sharing::{SHARE_MAX, Sharing, relay_targets};
use fogmesh_protocols::onion::{
    MixKeys, PathError, Reassembler, ReplyBlock, choose_path, sample_delays,
};
use fogmesh_protocols::policy::Route;
use fogmesh_protocols::rate::RateTable;
use futures::StreamExt;
use libp2p::PeerId;
use libp2p::identity::Keypair;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::wire::{self, ReaderCtx, StreamEvent};
use super::worker::{self, Leg, WorkIn, WorkOut};
use super::{Command, Linked, MixOrigin, MixTrace, OnionConfig, OnionMetrics};
use crate::messages::{AttemptResult, Input, MessagesHandle, now_ms};

/// Descriptors kept (verified, newest per peer); beyond, new peers' are
/// ignored until old ones expire.
const MAX_DESCRIPTORS: usize = 4096;
/// Packets waiting out their delay at once; beyond, new ones are dropped.
const MAX_DELAYED: usize = 8192;
/// How long a reply block of ours waits for its reply, ms.
const REPLY_WAIT_MS: u64 = 15 * 60_000;
/// Reply blocks of ours outstanding at once.
const MAX_RECOVERIES: usize = 4096;
/// Reply blocks kept per sender at the recipient, and senders.
const SURBS_PER_SENDER: usize = 8;
const MAX_SENDERS: usize = 1024;
/// How long a sender's reply block is kept at the recipient, ms.
const SURB_KEEP_MS: u64 = 10 * 60_000;
/// Loop cover nonces outstanding.
const MAX_COVER: usize = 1024;
/// Housekeeping period.
const TICK: Duration = Duration::from_secs(5);
/// The messages actor is woken for new descriptors at most this often.
const WAKE_EVERY: Duration = Duration::from_millis(500);
/// How long after our packets were queued for a first hop a failure of
/// that hop's stream fails their attempt at once (the writer gives up on
/// opening a stream within `OnionConfig::open_timeout`), ms.
const HANDED_MS: u64 = 30_000;
/// How long after a connected neighbour's stream failed a new one is
/// opened: long enough for the connection that failed to be gone (a
/// stream opens over any of a peer's connections, and the loser of a
/// peer's simultaneous TCP and QUIC dials closes just after it came up).
const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// Starts the worker thread and the task; returns the thread (the task
/// ends with `shutdown` and stops the thread by closing its queue) and
/// the set of connected peers the node keeps for the task's writers.
pub(super) fn spawn(
    key: Keypair,
    mut control: libp2p_stream::Control,
    actor: MessagesHandle,
    metrics: Arc<OnionMetrics>,
    cfg: OnionConfig,
    commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
) -> anyhow::Result<(std::thread::JoinHandle<()>, Linked)> {
    let now = now_ms();
    let linked = Linked::default();
    let mixer = Mixer::new(MixKeys::new(cfg.epoch_ms, now));
    let (epoch, mix_key) = mixer.keys().current();
    let valid = mixer.keys().validity();
    let (work_tx, work_rx) = worker::queue();
    let (out_tx, out_rx) = mpsc::channel(worker::WORK_QUEUE);
    let thread = worker::spawn(mixer, cfg.trace.is_some(), work_rx, out_tx)?;
    let incoming = control
        .accept(wire::PROTOCOL)
        .map_err(|e| anyhow::anyhow!("cannot accept mix streams: {e}"))?;
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let me = key.public().to_peer_id();
    let readers = ReaderCtx {
        work: work_tx.clone(),
        events: ev_tx.clone(),
        rates: Arc::new(Mutex::new(RateTable::new(4096))),
        peer_rate: cfg.peer_rate,
        metrics: metrics.clone(),
        readers: Arc::new(AtomicUsize::new(0)),
    };
    let mut svc = Service {
        me,
        key,
        cfg,
        actor,
        metrics,
        control,
        linked: linked.clone(),
        own: None,
        descriptors: HashMap::new(),
        links: Links::default(),
        sharing: Sharing::default(),
        writers: HashMap::new(),
        handed: HashMap::new(),
        work: work_tx,
        events: ev_tx,
        delayed: BinaryHeap::new(),
        delayed_packets: HashMap::new(),
        seq: 0,
        recoveries: HashMap::new(),
        surbs: HashMap::new(),
        reassembler: Reassembler::default(),
        cover: HashMap::new(),
        woken: None,
        wake_pending: false,
    };
    svc.new_key(epoch, mix_key, valid);
    tokio::spawn(svc.run(commands, out_rx, ev_rx, incoming, readers, shutdown));
    Ok((thread, linked))
}

/// A packet waiting out its delay: its successor, its bytes and, when mix
/// packets are traced, its hash as it arrived and when it entered the queue.
type Delayed = (PeerId, Vec<u8>, Option<(String, std::time::Instant)>);

/// One of our reply blocks waiting for its reply.
struct Pending {
    id: MessageId,
    n: u32,
    block: ReplyBlock,
    until_ms: u64,
}

struct Service {
    me: PeerId,
    key: Keypair,
    cfg: OnionConfig,
    actor: MessagesHandle,
    metrics: Arc<OnionMetrics>,
    control: libp2p_stream::Control,
    /// Who the node is connected to (descriptors go only to them).
    linked: Linked,
    /// Our own descriptor.
    own: Option<SignedDescriptor>,
    /// Verified descriptors of others, newest per peer.
    descriptors: HashMap<PeerId, SignedDescriptor>,
    /// Neighbours, and mix nodes left out of paths for a while.
    links: Links,
    /// Whom we asked for their descriptors, and answered.
    sharing: Sharing,
    writers: HashMap<PeerId, mpsc::Sender<Vec<u8>>>,
    /// Our attempts whose packets were queued for a first hop, by that
    /// hop, with when: failed at once if its stream fails.
    handed: HashMap<PeerId, Vec<(MessageId, u32, u64)>>,
    work: crate::actor::BoundedSender<WorkIn>,
    events: mpsc::Sender<StreamEvent>,
    /// Packets waiting out their delay: (due, seq) and by seq.
    delayed: BinaryHeap<Reverse<(Instant, u64)>>,
    /// With, when mix packets are traced, the arriving packet's hash and
    /// when it entered the queue.
    delayed_packets: HashMap<u64, Delayed>,
    seq: u64,
    /// Our reply blocks by identifier.
    recoveries: HashMap<[u8; 16], Pending>,
    /// Senders' reply blocks, newest last, with when they came.
    surbs: HashMap<PeerId, VecDeque<(Vec<u8>, u64)>>,
    reassembler: Reassembler,
    /// Our loop cover nonces outstanding, with when they left.
    cover: HashMap<[u8; 16], u64>,
    /// When the messages actor was last woken for new descriptors, and
    /// whether new ones came since, within [`WAKE_EVERY`] of it (see
    /// `wake_messages`).
    woken: Option<Instant>,
    wake_pending: bool,
}

impl Service {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut out: mpsc::Receiver<WorkOut>,
        mut events: mpsc::Receiver<StreamEvent>,
        mut incoming: libp2p_stream::IncomingStreams,
        readers: ReaderCtx,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_cover = self.cover_due();
        loop {
            let next_due = self.delayed.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(cmd) = commands.recv() => self.on_command(cmd),
                Some(o) = out.recv() => self.on_work(o),
                _ = sleep_until(next_due) => self.flush_delayed(),
                Some(ev) = events.recv() => self.on_stream_event(ev),
                Some((peer, stream)) = incoming.next() => {
                    tokio::spawn(wire::reader(readers.clone(), peer, stream));
                }
                _ = sleep_until(next_cover) => {
                    self.send_cover();
                    next_cover = self.cover_due();
                }
                _ = tick.tick() => self.housekeeping(),
                _ = sleep_until(self.wake_due()) => {
                    self.wake_pending = false;
                    self.wake_messages();
                }
            }
        }
        tracing::debug!("onion task stopped");
    }

    /// When the next loop cover packet is due (exponential gaps, Poisson
    /// at `cover_rate`), if cover traffic is on.
    fn cover_due(&self) -> Option<Instant> {
        if self.cfg.cover_rate.is_nan() || self.cfg.cover_rate <= 0.0 {
            return None;
        }
        let mean_ms = (1000.0 / self.cfg.cover_rate).max(1.0) as u64;
        let gap = sample_delays(&mut rand::rng(), 1, mean_ms)
            .first()
            .copied()
            .unwrap_or(mean_ms);
        Some(Instant::now() + Duration::from_millis(gap.max(1)))
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Send { id, n, env } => {
                if let Err(why) = self.send(id, n, env) {
                    self.offer(Input::Attempt {
                        id,
                        n,
                        result: AttemptResult::Unavailable(why),
                    });
                }
            }
            Command::Receipt { env } => self.receipt(env),
            Command::Connected(peer) => {
                let was_down = self.links.is_down(&peer, now_ms());
                if was_down {
                    // Back in the pool of paths: messages waiting for mix
                    // nodes may go now.
                    self.wake_messages();
                }
                if self.links.connected(peer) {
                    // Our own descriptor; the ones we know only if asked,
                    // and we ask while we lack lists (`Sharing`).
                    self.greet(peer);
                    if self.sharing.ask(peer, now_ms()) {
                        self.write(peer, wire::want_frame());
                    }
                }
            }
            Command::Closed(peer) => {
                self.writers.remove(&peer);
                let known = self.descriptors.contains_key(&peer);
                self.links.closed(peer, known, now_ms());
            }
        }
    }

    fn offer(&self, input: Input) {
        if let Err(e) = self.actor.offer(input) {
            tracing::debug!("messages input dropped: {e}");
        }
    }

    /// Sends `peer` our own descriptor, if we have one.
    fn greet(&mut self, peer: PeerId) {
        if let Some(own) = &self.own {
            let frame = wire::descriptors_frame(std::iter::once(own.bytes.as_slice()));
            self.write(peer, frame);
        }
    }

    /// Sends `peer` the descriptors we know.
    fn send_list(&mut self, peer: PeerId) {
        let list = self.share_list();
        self.write(
            peer,
            wire::descriptors_frame(list.iter().map(Vec::as_slice)),
        );
    }

    /// The descriptors we pass on: ours first, then mix nodes', then
    /// endpoints'.
    fn share_list(&self) -> Vec<Vec<u8>> {
        let now = now_ms();
        let mut list: Vec<&SignedDescriptor> = self
            .descriptors
            .values()
            .filter(|d| d.descriptor.valid_at(now))
            .collect();
        list.sort_by_key(|d| {
            (
                d.descriptor.role != Role::Mix,
                Reverse(d.descriptor.valid_from_ms),
            )
        });
        self.own
            .iter()
            .chain(list)
            .take(SHARE_MAX)
            .map(|d| d.bytes.clone())
            .collect()
    }

    /// Queues a frame for `peer`, opening its stream first if need be (or
    /// again, when the last one was closed as idle).
    fn write(&mut self, peer: PeerId, mut frame: Vec<u8>) -> bool {
        if peer == self.me {
            return false;
        }
        for _ in 0..2 {
            let tx = self.writers.entry(peer).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(wire::WRITER_QUEUE);
                tokio::spawn(wire::writer(
                    self.control.clone(),
                    self.linked.clone(),
                    peer,
                    rx,
                    self.events.clone(),
                    self.cfg.stream_idle,
                    self.cfg.open_timeout,
                ));
                tx
            });
            match tx.try_send(frame) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Full(_)) => return false,
                Err(mpsc::error::TrySendError::Closed(f)) => {
                    self.writers.remove(&peer);
                    frame = f;
                }
            }
        }
        false
    }

    fn send_packet(&mut self, to: PeerId, packet: &[u8]) -> bool {
        let ok = self.write(to, wire::packet_frame(packet));
        if ok {
            self.metrics.packets_sent.inc();
        } else {
            self.metrics.packets_dropped.inc();
        }
        ok
    }

    /// Mix nodes usable in a new path: verified, valid, not down.
    fn usable_mixes(&self) -> Vec<&SignedDescriptor> {
        let now = now_ms();
        let mut v: Vec<&SignedDescriptor> = self
            .descriptors
            .values()
            .filter(|d| d.descriptor.role == Role::Mix && d.descriptor.valid_at(now))
            .filter(|d| !self.links.is_down(&d.descriptor.peer, now))
            .collect();
        // A stable order: the choice is uniform over it.
        v.sort_by_key(|d| d.descriptor.peer.to_bytes());
        v
    }

    /// A path of mix hops avoiding `me` and `to`, then `last`. When this
    /// node hands the packet to the first hop (`from_here`; not so for a
    /// reply block, which the recipient uses), that hop is one it is
    /// connected to if it has any.
    fn path(
        &self,
        to: &PeerId,
        last: Hop,
        from_here: bool,
    ) -> Result<(Vec<Hop>, Vec<u64>), String> {
        let mixes = self.usable_mixes();
        let peers: Vec<PeerId> = mixes.iter().map(|d| d.descriptor.peer).collect();
        let entry = |p: &PeerId| from_here && self.links.is_connected(p);
        let idx = choose_path(&peers, &self.me, to, self.cfg.hops, entry, &mut rand::rng())
            .map_err(|e: PathError| e.to_string())?;
        let mut route: Vec<Hop> = idx
            .into_iter()
            .map(|i| Hop {
                peer: mixes[i].descriptor.peer,
                key: mixes[i].descriptor.mix_key,
            })
            .collect();
        route.push(last);
        let delays = sample_delays(&mut rand::rng(), route.len(), self.cfg.mean_delay_ms);
        Ok((route, delays))
    }

    /// Starts attempt `n` of a private message: fragments, a path each, a
    /// reply block in the first; the worker builds them.
    fn send(&mut self, id: MessageId, n: u32, env: Envelope) -> Result<(), String> {
        let now = now_ms();
        // Enough mix nodes first: that is the reason a user can act on.
        let usable = self
            .usable_mixes()
            .iter()
            .filter(|d| d.descriptor.peer != env.to)
            .count();
        if usable < self.cfg.hops {
            return Err(PathError::TooFewMixes {
                known: usable,
                needed: self.cfg.hops,
            }
            .to_string());
        }
        let Some(recipient) = self
            .descriptors
            .get(&env.to)
            .filter(|d| d.descriptor.valid_at(now))
            .map(|d| Hop {
                peer: d.descriptor.peer,
                key: d.descriptor.mix_key,
            })
        else {
            return Err(
                "waiting for the recipient's onion descriptor (it announces one to the peers it connects to)"
                    .into(),
            );
        };
        let Some(own) = self.own.as_ref().map(|d| Hop {
            peer: self.me,
            key: d.descriptor.mix_key,
        }) else {
            return Err("waiting for this node's mix key".into());
        };
        let data = env.encode();
        let chunks = fragment::split(&data).map_err(|e| e.to_string())?;
        let count = u16::try_from(chunks.len()).map_err(|_| "too many fragments".to_owned())?;
        let mut frag_id = [0u8; 16];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut frag_id);
        let mut legs = Vec::with_capacity(chunks.len());
        for (i, c) in chunks.iter().enumerate() {
            let (route, delays) = self.path(&env.to, recipient.clone(), true)?;
            legs.push(Leg {
                piece: Piece::Fragment {
                    id: frag_id,
                    index: i as u16,
                    count,
                    chunk: c.to_vec(),
                    surb: None,
                    reply_to: None,
                },
                route,
                delays,
            });
        }
        let surb = self.path(&env.to, own, false)?;
        if self.recoveries.len() >= MAX_RECOVERIES {
            return Err("too many onion messages waiting for their acknowledgement".into());
        }
        self.work
            .try_send(WorkIn::Build {
                id,
                n,
                legs,
                surb,
                reply_to: self.me,
            })
            .map_err(|_| "the mix worker is busy".to_owned())
    }

    fn on_work(&mut self, o: WorkOut) {
        match o {
            WorkOut::Forward {
                from,
                next,
                delay_ms,
                packet,
                packet_in,
            } => self.queue_forward(from, next, delay_ms, packet, packet_in),
            WorkOut::Deliver { piece } => self.deliver(piece),
            WorkOut::Reply { id, payload } => self.on_reply(id, &payload),
            WorkOut::Dropped { from, error } => {
                match error {
                    PacketError::Replay => self.metrics.replays_dropped.inc(),
                    PacketError::Tampered => self.metrics.tampered_dropped.inc(),
                    _ => self.metrics.packets_dropped.inc(),
                };
                tracing::debug!(%from, "onion packet dropped: {error}");
            }
            WorkOut::Built {
                id,
                n,
                packets,
                block,
            } => self.on_built(id, n, &packets, block),
            WorkOut::BuildFailed { id, n, why } => self.offer(Input::Attempt {
                id,
                n,
                result: AttemptResult::Failed(why),
            }),
            WorkOut::Send { to, packet, origin } => {
                if self.send_packet(to, &packet) {
                    self.trace_sent(origin, &packet);
                }
            }
            WorkOut::NewKey { epoch, key, valid } => self.new_key(epoch, key, valid),
        }
    }

    /// A packet to relay: held for its delay, then sent to `next`.
    fn queue_forward(
        &mut self,
        from: PeerId,
        next: PeerId,
        delay_ms: u64,
        packet: Vec<u8>,
        packet_in: Option<String>,
    ) {
        if !self.cfg.mix {
            // Not a relay: a packet that is not for this node ends here.
            self.metrics.packets_dropped.inc();
            tracing::debug!(%from, "onion packet to relay, but this node is no mix");
            return;
        }
        if self.delayed_packets.len() >= MAX_DELAYED {
            self.metrics.packets_dropped.inc();
            return;
        }
        // What a relay knows of a packet: who handed it over, who gets it
        // next, and the delay.
        tracing::debug!(%from, to = %next, delay_ms, "mix: queued a packet");
        self.seq += 1;
        let due = Instant::now() + Duration::from_millis(delay_ms);
        self.delayed.push(Reverse((due, self.seq)));
        let traced = packet_in.map(|h| (h, std::time::Instant::now()));
        self.delayed_packets
            .insert(self.seq, (next, packet, traced));
    }

    /// Attempt `n` of message `id` is built: its packets go to their
    /// first hops, and the attempt is accepted once all are queued.
    fn on_built(
        &mut self,
        id: MessageId,
        n: u32,
        packets: &[(PeerId, Vec<u8>)],
        block: ReplyBlock,
    ) {
        let test = self.cfg.test_replay_tamper;
        let mut sent = 0;
        for (i, (to, p)) in packets.iter().enumerate() {
            if self.send_packet(*to, p) {
                sent += 1;
                self.trace_sent(MixOrigin::Message(id.to_string()), p);
            }
            if test && i == 0 {
                // The test hook: the same packet again (a replay) and one
                // with a header byte flipped (tampered).
                self.send_packet(*to, p);
                let mut bad = p.clone();
                if let Some(b) = bad.get_mut(40) {
                    *b ^= 1;
                }
                self.send_packet(*to, &bad);
            }
        }
        let result = if sent == packets.len() {
            let now = now_ms();
            let hops: HashSet<PeerId> = packets.iter().map(|(to, _)| *to).collect();
            for hop in hops {
                self.handed.entry(hop).or_default().push((id, n, now));
            }
            self.recoveries.insert(
                block.id,
                Pending {
                    id,
                    n,
                    block,
                    until_ms: now + REPLY_WAIT_MS,
                },
            );
            AttemptResult::Accepted
        } else {
            AttemptResult::Failed(format!(
                "{} of {} packets could not be queued for their first hop",
                packets.len() - sent,
                packets.len()
            ))
        };
        self.offer(Input::Attempt { id, n, result });
    }

    /// Signs and announces a descriptor for the new mix key.
    fn new_key(&mut self, epoch: u64, key: [u8; 32], valid: (u64, u64)) {
        let d = Descriptor {
            peer: self.me,
            mix_key: key,
            epoch,
            valid_from_ms: valid.0,
            valid_until_ms: valid.1,
            role: if self.cfg.mix {
                Role::Mix
            } else {
                Role::Endpoint
            },
        };
        match d.sign(&self.key) {
            Ok(s) => {
                let frame = wire::descriptors_frame(std::iter::once(s.bytes.as_slice()));
                self.own = Some(s);
                let neighbours: Vec<PeerId> = self.links.neighbours().collect();
                for p in neighbours {
                    self.write(p, frame.clone());
                }
            }
            Err(e) => tracing::warn!("cannot sign the onion descriptor: {e}"),
        }
    }

    fn flush_delayed(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, seq))) = self.delayed.peek().copied() {
            if at > now {
                break;
            }
            self.delayed.pop();
            if let Some((next, packet, traced)) = self.delayed_packets.remove(&seq) {
                if self.send_packet(next, &packet) {
                    self.metrics.packets_relayed.inc();
                }
                // It left the pool, sent or dropped.
                if let (Some(t), Some((packet_in, arrived))) = (&self.cfg.trace, traced) {
                    (t.0)(MixTrace::Relayed {
                        packet_in,
                        packet_out: super::packet_hash(&packet),
                        arrived,
                        departed: std::time::Instant::now(),
                    });
                }
            }
        }
    }

    /// Traces a packet this node built and sent, when traces are on.
    fn trace_sent(&self, origin: MixOrigin, packet: &[u8]) {
        if let Some(t) = &self.cfg.trace {
            (t.0)(MixTrace::Sent {
                origin,
                packet: super::packet_hash(packet),
                at: std::time::Instant::now(),
            });
        }
    }

    /// A piece for this node: a fragment (reassembled; a whole envelope
    /// goes to the messages actor), or our own cover coming back.
    fn deliver(&mut self, piece: Piece) {
        match piece {
            Piece::Fragment {
                id,
                index,
                count,
                chunk,
                surb,
                reply_to,
            } => {
                let surb = match (surb, reply_to) {
                    (Some(s), Some(peer)) => Some(ReplyTo {
                        surb: s.into_vec(),
                        peer,
                    }),
                    _ => None,
                };
                let Some(done) = self
                    .reassembler
                    .insert(id, index, count, chunk, surb, now_ms())
                else {
                    return;
                };
                let env = match Envelope::decode(&done.data) {
                    Ok(env) if env.to == self.me => env,
                    Ok(_) => {
                        tracing::debug!("onion message for another node dropped");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!("onion message dropped: {e}");
                        return;
                    }
                };
                if let Some(r) = done.surb {
                    self.keep_surb(r);
                }
                self.metrics.messages_received.inc();
                self.offer(Input::Envelope {
                    env,
                    via: Route::Onion,
                });
            }
            Piece::Cover { nonce } => {
                if self.cover.remove(&nonce).is_some() {
                    self.metrics.cover_returned.inc();
                }
            }
            Piece::Reply { .. } => {
                tracing::debug!("a reply piece in a forward packet: dropped");
            }
        }
    }

    fn keep_surb(&mut self, r: ReplyTo) {
        if !self.surbs.contains_key(&r.peer) && self.surbs.len() >= MAX_SENDERS {
            return;
        }
        let q = self.surbs.entry(r.peer).or_default();
        if q.len() >= SURBS_PER_SENDER {
            q.pop_front();
        }
        q.push_back((r.surb, now_ms()));
    }

    /// A reply through one of our reply blocks: the recipient's receipt.
    fn on_reply(&mut self, id: [u8; 16], payload: &[u8]) {
        let Some(p) = self.recoveries.remove(&id) else {
            tracing::debug!("reply for an unknown or used reply block");
            return;
        };
        match packet::open_reply(&p.block.recovery, payload) {
            Ok(Piece::Reply { body }) => match Envelope::decode(&body) {
                Ok(env) => {
                    self.metrics.acks_received.inc();
                    tracing::debug!(message = %p.id, attempt = p.n, "onion acknowledgement");
                    self.offer(Input::Envelope {
                        env,
                        via: Route::Onion,
                    });
                }
                Err(e) => tracing::debug!("bad acknowledgement: {e}"),
            },
            Ok(_) => tracing::debug!("unexpected piece in a reply"),
            Err(e) => tracing::debug!("cannot open a reply: {e}"),
        }
    }

    /// A receipt for a letter that came by the onion route goes back
    /// through the sender's newest reply block, never another way.
    fn receipt(&mut self, env: Envelope) {
        let surb = self.surbs.get_mut(&env.to).and_then(VecDeque::pop_back);
        let Some((surb, _)) = surb else {
            tracing::debug!("no reply block for this receipt: the sender will retry");
            return;
        };
        let body = env.encode();
        if body.len() > MAX_REPLY {
            tracing::warn!("receipt too large for a reply block");
            return;
        }
        if self
            .work
            .try_send(WorkIn::Reply {
                surb,
                piece: Piece::Reply { body },
            })
            .is_err()
        {
            tracing::debug!("mix worker busy: receipt dropped, the sender will retry");
        }
    }

    fn on_stream_event(&mut self, ev: StreamEvent) {
        match ev {
            StreamEvent::Descriptors { from, list } => self.on_descriptors(from, list),
            StreamEvent::Want { from } => {
                if self.links.is_connected(&from) && self.sharing.answer(from, now_ms()) {
                    self.send_list(from);
                }
            }
            StreamEvent::WriterDown { peer, why } => self.on_writer_down(peer, &why),
            StreamEvent::Reopen { peer } => {
                // Send what may have gone with the lost frames: our
                // descriptor, our list if it asked lately.
                if self.links.is_connected(&peer) {
                    self.greet(peer);
                    if self.sharing.answered_lately(&peer, now_ms()) {
                        self.send_list(peer);
                    }
                }
            }
        }
    }

    /// Our stream to `peer` failed: what was queued on it is lost.
    fn on_writer_down(&mut self, peer: PeerId, why: &str) {
        tracing::debug!(%peer, "mix stream down: {why}");
        self.writers.remove(&peer);
        let now = now_ms();
        // Our attempts handed to it just now fail at once, so that the
        // outbox tries again soon rather than after the route's timeout.
        for (id, n, at) in self.handed.remove(&peer).unwrap_or_default() {
            if now.saturating_sub(at) < HANDED_MS {
                self.offer(Input::Attempt {
                    id,
                    n,
                    result: AttemptResult::Failed(format!(
                        "the first mix hop could not be reached: {why}"
                    )),
                });
            }
        }
        let known = self.descriptors.contains_key(&peer);
        match self.links.stream_failed(peer, known, now) {
            AfterFailure::Reopen => {
                // Still connected (the stream may have died with one of
                // two connections to it): a new stream in a moment, once
                // that connection is gone.
                let events = self.events.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(REOPEN_AFTER).await;
                    let _ = events.send(StreamEvent::Reopen { peer }).await;
                });
            }
            AfterFailure::LeftOut(until) => {
                tracing::debug!(%peer, left_out_ms = until - now, "mix node left out of new paths");
            }
            AfterFailure::Nothing => {}
        }
    }

    /// Verifies descriptors from a neighbour; new ones are kept and passed
    /// on to a few other neighbours (`relay_targets`; the relay ends where
    /// they are known).
    fn on_descriptors(&mut self, from: PeerId, list: Vec<Vec<u8>>) {
        let now = now_ms();
        self.sharing.on_batch(&from, list.len(), now);
        let mut fresh = Vec::new();
        for bytes in list.into_iter().take(SHARE_MAX) {
            // Peers pass on what they hold: most frames are ones already
            // held, found by the peer they name before any signature check.
            let held = SignedDescriptor::claimed_peer(&bytes)
                .and_then(|p| self.descriptors.get(&p))
                .is_some_and(|d| d.bytes == bytes);
            if held {
                continue;
            }
            let d = match SignedDescriptor::verify(&bytes, now) {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(%from, "descriptor refused: {e}");
                    continue;
                }
            };
            let peer = d.descriptor.peer;
            if peer == self.me {
                continue;
            }
            let newer = self.descriptors.get(&peer).is_none_or(|old| {
                d.descriptor.epoch > old.descriptor.epoch
                    || d.descriptor.role != old.descriptor.role
                        && d.descriptor.epoch >= old.descriptor.epoch
            });
            if !newer
                || (!self.descriptors.contains_key(&peer)
                    && self.descriptors.len() >= MAX_DESCRIPTORS)
            {
                continue;
            }
            fresh.push(d.bytes.clone());
            self.descriptors.insert(peer, d);
        }
        if fresh.is_empty() {
            return;
        }
        // On to a few other neighbours, not all (`relay_targets`).
        let frame = wire::descriptors_frame(fresh.iter().map(Vec::as_slice));
        for p in relay_targets(self.links.neighbours(), &from, &mut rand::rng()) {
            self.write(p, frame.clone());
        }
        // Private messages waiting for mix nodes or a recipient's
        // descriptor may go now.
        self.wake_messages();
    }

    /// Wakes the messages actor to retry what waits for descriptors: at
    /// once, unless it was woken less than [`WAKE_EVERY`] ago (then once
    /// that has passed). While a network starts a node hears new
    /// descriptors many times a second; one wake each cost a thread switch.
    fn wake_messages(&mut self) {
        let now = Instant::now();
        match self.woken {
            Some(at) if now < at + WAKE_EVERY => self.wake_pending = true,
            _ => {
                self.woken = Some(now);
                self.offer(Input::Wake(None));
            }
        }
    }

    /// When the messages actor is to be woken for descriptors that came
    /// within [`WAKE_EVERY`] of its last wake, if any did.
    fn wake_due(&self) -> Option<Instant> {
        self.woken
            .filter(|_| self.wake_pending)
            .map(|at| at + WAKE_EVERY)
    }

    fn housekeeping(&mut self) {
        let now = now_ms();
        self.sharing.expire(now);
        self.descriptors.retain(|_, d| d.descriptor.valid_at(now));
        if self.links.expire(now) {
            // A mix node is back in the pool: messages waiting for one
            // may go now rather than at their next back-off.
            self.wake_messages();
        }
        self.handed.retain(|_, v| {
            v.retain(|(_, _, at)| now.saturating_sub(*at) < HANDED_MS);
            !v.is_empty()
        });
        self.recoveries.retain(|_, p| p.until_ms > now);
        self.surbs.retain(|_, q| {
            q.retain(|(_, at)| now.saturating_sub(*at) < SURB_KEEP_MS);
            !q.is_empty()
        });
        self.cover
            .retain(|_, at| now.saturating_sub(*at) < REPLY_WAIT_MS);
        self.reassembler.expire(now);
    }

    /// One loop cover packet: mix hops, then back to this node.
    fn send_cover(&mut self) {
        let Some(own) = self.own.as_ref().map(|d| Hop {
            peer: self.me,
            key: d.descriptor.mix_key,
        }) else {
            return;
        };
        let Ok((route, delays)) = self.path(&self.me.clone(), own, true) else {
            return;
        };
        if self.cover.len() >= MAX_COVER {
            return;
        }
        let mut nonce = [0u8; 16];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut nonce);
        self.cover.insert(nonce, now_ms());
        let leg = Leg {
            piece: Piece::Cover { nonce },
            route,
            delays,
        };
        if self.work.try_send(WorkIn::Cover { leg }).is_ok() {
            self.metrics.cover_sent.inc();
        }
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
