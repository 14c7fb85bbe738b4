//! The download state machine for one file: which chunk to ask which peer
//! for, and when.
//!
//! Sans-IO in the quinn-proto sense: the node tells the [`Scheduler`] about
//! sources (peers that provide the file, and which chunks they hold), asks
//! it for requests to send with [`next_requests`](Scheduler::next_requests),
//! and feeds back what happened: a chunk ([`on_chunk`](Scheduler::on_chunk)),
//! an error ([`on_failure`](Scheduler::on_failure)), or nothing for too long
//! ([`expired`](Scheduler::expired)). Time is always a parameter.
//!
//! What makes it fast with several sources, following BitTorrent:
//! - **Pipelining.** Each source has its own window of requests in flight,
//!   starting at [`SchedulerConfig::initial_window`] and growing while the
//!   measured throughput grows, up to [`SchedulerConfig::max_window`], but
//!   never beyond twice the bandwidth-delay product estimated from the
//!   source's rate and its fastest round trip, nor beyond
//!   [`SchedulerConfig::max_in_flight_bytes`].
//! - **Rarest first.** Among the missing chunks a source holds, it is asked
//!   for those the fewest sources hold, so partial sources are drained of
//!   what only they have while they are still around.
//! - **No duplicates, except in end-game.** A chunk is requested from one
//!   source at a time until every missing chunk that any source holds is in
//!   flight; then sources with nothing in flight also request the chunks in
//!   flight the longest (at most [`SchedulerConfig::endgame_copies`] copies
//!   of each), so a slow or stalled source cannot hold up the last chunks.
//!   When one copy arrives, the others are reported for cancellation.
//! - **Verification.** Every chunk is checked against the manifest before
//!   it counts. A corrupt chunk is requested again elsewhere and earns its
//!   source a strike; with [`SchedulerConfig::ban_on_corrupt`] (the
//!   default) one strike bans it.
//! - **Timeouts from rates.** A request expires after a per-source timeout
//!   derived from its measured rate and window, never below
//!   [`SchedulerConfig::min_timeout`] (raise it for BLE). Failures and
//!   timeouts halve the source's window and back it off exponentially.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use libp2p_identity::PeerId;

use super::bitfield::Bitfield;
use super::manifest::Manifest;

/// The shortest span over which a throughput sample is taken: deliveries
/// closer together are accumulated, so bursts do not read as infinite rates.
const RATE_SAMPLE_MIN: Duration = Duration::from_millis(50);
/// Weight of a new throughput sample in the moving average.
const RATE_ALPHA: f64 = 0.25;
/// Throughput must beat the previous sample by this factor for the window
/// to grow again: growth is only worth it while it pays.
const GROWTH_THRESHOLD: f64 = 1.05;

/// Tunables of a [`Scheduler`].
///
/// Defaults: `initial_window` 4, `max_window` 64, `max_in_flight_bytes`
/// 32 MiB, `min_timeout` 10 s, `initial_timeout` 30 s, `max_timeout` 120 s,
/// `max_strikes` 3, `ban_on_corrupt` true, `backoff` 1 s, `max_backoff`
/// 60 s, `endgame_copies` 2, `seed` 0.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SchedulerConfig {
    /// Requests in flight to a new source, before anything is measured.
    pub initial_window: u32,
    /// The most requests in flight to one source.
    pub max_window: u32,
    /// The most bytes of requested chunks in flight to one source; bounds
    /// the memory responses can take when chunks are large.
    pub max_in_flight_bytes: u64,
    /// No request expires sooner than this. Raise it for slow links (BLE).
    pub min_timeout: Duration,
    /// The timeout of requests to a source whose rate is not known yet.
    pub initial_timeout: Duration,
    /// No request waits longer than this (unless `min_timeout` is larger).
    pub max_timeout: Duration,
    /// Corrupt chunks after which a source is banned.
    pub max_strikes: u32,
    /// Ban a source on its first corrupt chunk.
    pub ban_on_corrupt: bool,
    /// The first back-off after a failure; doubles with each consecutive one.
    pub backoff: Duration,
    /// The longest back-off.
    pub max_backoff: Duration,
    /// In end-game, the most sources one chunk is requested from at once.
    pub endgame_copies: u32,
    /// Shuffles the order among equally rare chunks. 0 keeps file order;
    /// the node passes a random value so that many downloaders of one file
    /// do not all start with the same chunks.
    pub seed: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            initial_window: 4,
            max_window: 64,
            max_in_flight_bytes: 32 * 1024 * 1024,
            min_timeout: Duration::from_secs(10),
            initial_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(120),
            max_strikes: 3,
            ban_on_corrupt: true,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            endgame_copies: 2,
            seed: 0,
        }
    }
}

impl SchedulerConfig {
    /// Sets [`initial_window`](Self::initial_window) and [`max_window`](Self::max_window).
    pub fn with_windows(mut self, initial: u32, max: u32) -> Self {
        self.initial_window = initial;
        self.max_window = max;
        self
    }

    /// Sets [`max_in_flight_bytes`](Self::max_in_flight_bytes).
    pub fn with_max_in_flight_bytes(mut self, bytes: u64) -> Self {
        self.max_in_flight_bytes = bytes;
        self
    }

    /// Sets [`min_timeout`](Self::min_timeout), [`initial_timeout`](Self::initial_timeout)
    /// and [`max_timeout`](Self::max_timeout).
    pub fn with_timeouts(mut self, min: Duration, initial: Duration, max: Duration) -> Self {
        self.min_timeout = min;
        self.initial_timeout = initial;
        self.max_timeout = max;
        self
    }

    /// Sets [`max_strikes`](Self::max_strikes) and [`ban_on_corrupt`](Self::ban_on_corrupt).
    pub fn with_strikes(mut self, max_strikes: u32, ban_on_corrupt: bool) -> Self {
        self.max_strikes = max_strikes;
        self.ban_on_corrupt = ban_on_corrupt;
        self
    }

    /// Sets [`backoff`](Self::backoff) and [`max_backoff`](Self::max_backoff).
    pub fn with_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = first;
        self.max_backoff = max;
        self
    }

    /// Sets [`endgame_copies`](Self::endgame_copies).
    pub fn with_endgame_copies(mut self, copies: u32) -> Self {
        self.endgame_copies = copies;
        self
    }

    /// Sets [`seed`](Self::seed).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// Misuse of the scheduler by the node (never caused by a peer alone).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SchedulerError {
    /// A bitfield does not cover exactly the manifest's chunks.
    #[error("bitfield of {got} chunks for a file of {expected}")]
    HaveLength {
        /// The manifest's chunk count.
        expected: u64,
        /// The bitfield's length.
        got: u64,
    },
    /// The peer is not a source of this download.
    #[error("{0} is not a source")]
    UnknownSource(PeerId),
}

/// What became of a received chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
#[non_exhaustive]
pub enum ChunkOutcome {
    /// Verified and new: the node writes it. The same chunk was also
    /// requested from these peers (end-game); their requests are forgotten
    /// and their responses, should they come, will be [`Duplicate`](Self::Duplicate).
    Accepted {
        /// Peers whose outstanding request for this chunk can be cancelled.
        cancel: Vec<PeerId>,
    },
    /// The chunk was already here (not verified again); drop it.
    Duplicate,
    /// The data does not match the manifest; the chunk is requested again.
    Corrupt {
        /// Whether the source was banned for it.
        banned: bool,
    },
    /// From a peer that is not (or no longer) a source, or for an index
    /// past the end: dropped unchecked.
    Unsolicited,
}

/// A source's standing, for logs, the API and tests.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SourceStats {
    /// The peer.
    pub peer: PeerId,
    /// Moving average of its throughput in bytes per second (0 until measured).
    pub rate_bps: u64,
    /// Requests in flight to it.
    pub in_flight: usize,
    /// Its current window (the most requests it may have in flight).
    pub window: u32,
    /// Verified chunks received from it, new or duplicate.
    pub chunks_received: u64,
    /// Corrupt chunks received from it.
    pub strikes: u32,
    /// Consecutive failures and timeouts (reset by a delivery).
    pub failures: u32,
}

/// How far the download is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// The file's size.
    pub bytes_total: u64,
    /// Bytes of the chunks held.
    pub bytes_have: u64,
    /// The file's chunk count.
    pub chunks_total: u64,
    /// Chunks held.
    pub chunks_have: u64,
}

/// Which chunks a source holds, as far as we know.
#[derive(Debug, Clone)]
enum Holds {
    /// Nothing reported yet: the source is not asked for anything.
    Unknown,
    /// The whole file.
    All,
    /// These chunks.
    Some(Bitfield),
}

impl Holds {
    fn has(&self, chunk: u64) -> bool {
        match self {
            Holds::Unknown => false,
            Holds::All => true,
            Holds::Some(bits) => bits.get(chunk),
        }
    }
}

#[derive(Debug)]
struct Source {
    holds: Holds,
    /// Chunk -> when it was requested.
    in_flight: BTreeMap<u64, Instant>,
    window: u32,
    /// Moving average of throughput, bytes/s.
    rate: Option<f64>,
    /// The previous throughput sample's average, for the growth rule.
    prev_rate: f64,
    /// Start of the current throughput measurement, shifted forward over
    /// idle spans so that only busy time counts.
    meter_start: Option<Instant>,
    meter_bytes: u64,
    idle_since: Option<Instant>,
    /// The fastest request round trip seen: round-trip time plus one
    /// chunk's transfer, the basis of the bandwidth-delay estimate.
    min_latency: Option<Duration>,
    chunks_received: u64,
    strikes: u32,
    failures: u32,
    backoff_until: Option<Instant>,
}

impl Source {
    fn new(cfg: &SchedulerConfig) -> Self {
        Source {
            holds: Holds::Unknown,
            in_flight: BTreeMap::new(),
            window: cfg.initial_window.clamp(1, cfg.max_window.max(1)),
            rate: None,
            prev_rate: 0.0,
            meter_start: None,
            meter_bytes: 0,
            idle_since: None,
            min_latency: None,
            chunks_received: 0,
            strikes: 0,
            failures: 0,
            backoff_until: None,
        }
    }

    fn ready(&self, now: Instant) -> bool {
        !matches!(self.holds, Holds::Unknown) && self.backoff_until.is_none_or(|t| now >= t)
    }

    fn on_send(&mut self, chunk: u64, now: Instant) {
        if self.in_flight.is_empty() {
            // Resume the throughput meter, skipping the idle span so that
            // waiting for us to ask does not read as a slow link.
            self.meter_start = match (self.meter_start, self.idle_since) {
                (Some(start), Some(idle)) => start
                    .checked_add(now.saturating_duration_since(idle))
                    .or(Some(now)),
                (Some(start), None) => Some(start),
                (None, _) => Some(now),
            };
            self.idle_since = None;
        }
        self.in_flight.insert(chunk, now);
    }

    /// Forgets a request; returns when it was sent, if it was in flight.
    fn finish(&mut self, chunk: u64, now: Instant) -> Option<Instant> {
        let sent = self.in_flight.remove(&chunk);
        if sent.is_some() && self.in_flight.is_empty() {
            self.idle_since = Some(now);
        }
        sent
    }

    /// Accounts for a verified chunk of `len` bytes and adapts the window.
    fn on_delivery(
        &mut self,
        len: u64,
        sent: Option<Instant>,
        now: Instant,
        cfg: &SchedulerConfig,
        chunk_size: u32,
    ) {
        self.chunks_received += 1;
        self.failures = 0;
        let Some(sent) = sent else {
            // A late answer to a request we gave up on: useful data, but no
            // basis for a measurement.
            return;
        };
        let latency = now.saturating_duration_since(sent);
        self.min_latency = Some(self.min_latency.map_or(latency, |m| m.min(latency)));
        self.meter_bytes += len;
        let Some(start) = self.meter_start else {
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < RATE_SAMPLE_MIN {
            return;
        }
        let sample = self.meter_bytes as f64 / elapsed.as_secs_f64();
        let rate = self.rate.map_or(sample, |r| r + RATE_ALPHA * (sample - r));
        self.rate = Some(rate);
        self.meter_start = Some(now);
        self.meter_bytes = 0;
        self.adapt_window(rate, cfg, chunk_size);
    }

    fn adapt_window(&mut self, rate: f64, cfg: &SchedulerConfig, chunk_size: u32) {
        let max = cfg.max_window.max(1);
        // Grow by half while throughput keeps growing: the window, not the
        // link, is then what limits it.
        if rate > self.prev_rate * GROWTH_THRESHOLD {
            self.window = self.window.saturating_add((self.window / 2).max(1));
        }
        self.prev_rate = rate;
        // Never beyond twice the bandwidth-delay product: more would only
        // queue at the source and delay the end-game. The factor 2 leaves
        // room to discover that the link is faster than measured so far.
        if let Some(lat) = self.min_latency {
            let bdp = (rate * lat.as_secs_f64() / f64::from(chunk_size.max(1))).ceil();
            // Float-to-int casts saturate (NaN becomes 0), so this is safe.
            let needed = (bdp as u32).saturating_add(1);
            // The fastest round trip understates the pipeline's depth when
            // the link is fast (loopback, LAN): every hop through the two
            // nodes' tasks adds queueing the minimum never shows. Keep at
            // least twice the initial window.
            let floor = cfg.initial_window.saturating_mul(2).max(2);
            self.window = self.window.min(needed.saturating_mul(2).max(floor));
        }
        self.window = self.window.clamp(1, max);
    }

    /// A failure or timeout: halve the window and back off exponentially.
    fn penalize(&mut self, now: Instant, cfg: &SchedulerConfig) {
        self.failures = self.failures.saturating_add(1);
        self.window = (self.window / 2).max(1);
        let exp = self.failures.saturating_sub(1).min(20);
        let backoff = cfg.backoff.saturating_mul(1 << exp).min(cfg.max_backoff);
        self.backoff_until = now.checked_add(backoff);
    }

    fn timeout(&self, cfg: &SchedulerConfig, chunk_size: u32) -> Duration {
        let t = match self.rate {
            Some(rate) if rate > 0.0 => {
                // Time to drain a full window, four times over, plus two
                // round trips: generous enough that queueing behind our own
                // requests never looks like a failure.
                let per_chunk = f64::from(chunk_size) / rate;
                let rtt = self.min_latency.unwrap_or_default().as_secs_f64();
                let secs = 4.0 * f64::from(self.window) * per_chunk + 2.0 * rtt;
                Duration::try_from_secs_f64(secs)
                    .unwrap_or(cfg.max_timeout)
                    .min(cfg.max_timeout)
            }
            _ => cfg.initial_timeout,
        };
        t.max(cfg.min_timeout)
    }
}

/// The download state machine for one file. See the [module docs](self).
#[derive(Debug)]
pub struct Scheduler {
    manifest: Manifest,
    cfg: SchedulerConfig,
    have: Bitfield,
    bytes_have: u64,
    sources: BTreeMap<PeerId, Source>,
    banned: BTreeSet<PeerId>,
    /// Per chunk, how many sources hold it.
    availability: Vec<u32>,
    /// Missing chunks not in flight, rarest first: (availability, order
    /// key, chunk).
    pending: BTreeSet<(u32, u64, u64)>,
    /// Chunk -> the sources it is requested from (several in end-game).
    in_flight: BTreeMap<u64, Vec<PeerId>>,
}

/// A bijective mix of 64 bits (splitmix64's finalizer): a stable,
/// seed-dependent shuffle of chunk indices without storing a permutation.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Scheduler {
    /// Starts (or resumes) the download of `manifest`, holding the chunks
    /// in `have` already (verified by the node, e.g. after a restart).
    pub fn new(
        manifest: Manifest,
        have: Bitfield,
        cfg: SchedulerConfig,
    ) -> Result<Self, SchedulerError> {
        let count = manifest.chunk_count();
        if have.len() != count {
            return Err(SchedulerError::HaveLength {
                expected: count,
                got: have.len(),
            });
        }
        let bytes_have = have
            .iter_set()
            .filter_map(|i| manifest.chunk_len(i))
            .map(u64::from)
            .sum();
        let mut s = Scheduler {
            availability: vec![0; count as usize],
            pending: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            sources: BTreeMap::new(),
            banned: BTreeSet::new(),
            bytes_have,
            have,
            manifest,
            cfg,
        };
        let missing: Vec<u64> = s.have.iter_missing().collect();
        for chunk in missing {
            s.pending.insert((0, s.order_key(chunk), chunk));
        }
        Ok(s)
    }

    fn order_key(&self, chunk: u64) -> u64 {
        if self.cfg.seed == 0 {
            chunk
        } else {
            mix(chunk ^ self.cfg.seed)
        }
    }

    fn avail(&self, chunk: u64) -> u32 {
        self.availability.get(chunk as usize).copied().unwrap_or(0)
    }

    /// Changes a chunk's availability by +1 or -1, keeping `pending` sorted.
    fn shift_availability(&mut self, chunk: u64, up: bool) {
        let key = self.order_key(chunk);
        let Some(a) = self.availability.get_mut(chunk as usize) else {
            return;
        };
        let old = *a;
        *a = if up {
            old.saturating_add(1)
        } else {
            old.saturating_sub(1)
        };
        let new = *a;
        if self.pending.remove(&(old, key, chunk)) {
            self.pending.insert((new, key, chunk));
        }
    }

    /// Puts a chunk back among the pending ones if it is still missing and
    /// no request for it is outstanding.
    fn make_pending(&mut self, chunk: u64) {
        if !self.have.get(chunk) && !self.in_flight.contains_key(&chunk) {
            self.pending
                .insert((self.avail(chunk), self.order_key(chunk), chunk));
        }
    }

    /// Removes `peer` from the requesters of `chunk`; returns whether the
    /// chunk is now requested from nobody.
    fn unlink(&mut self, chunk: u64, peer: &PeerId) -> bool {
        let Some(peers) = self.in_flight.get_mut(&chunk) else {
            return true;
        };
        peers.retain(|p| p != peer);
        if peers.is_empty() {
            self.in_flight.remove(&chunk);
            true
        } else {
            false
        }
    }

    /// Replaces what a source holds, updating availability.
    fn set_holds(&mut self, peer: &PeerId, holds: Holds) -> Result<(), SchedulerError> {
        let count = self.manifest.chunk_count();
        if let Holds::Some(bits) = &holds
            && bits.len() != count
        {
            return Err(SchedulerError::HaveLength {
                expected: count,
                got: bits.len(),
            });
        }
        let Some(src) = self.sources.get_mut(peer) else {
            return Err(SchedulerError::UnknownSource(*peer));
        };
        let old = std::mem::replace(&mut src.holds, holds.clone());
        for chunk in 0..count {
            match (old.has(chunk), holds.has(chunk)) {
                (false, true) => self.shift_availability(chunk, true),
                (true, false) => self.shift_availability(chunk, false),
                _ => {}
            }
        }
        Ok(())
    }

    /// Adds a provider of the file. It is asked for nothing until the node
    /// reports what it holds ([`source_have`](Self::source_have) or
    /// [`source_complete`](Self::source_complete)). Returns `false` if the
    /// peer is already a source or is banned.
    pub fn add_source(&mut self, peer: PeerId) -> bool {
        if self.banned.contains(&peer) || self.sources.contains_key(&peer) {
            return false;
        }
        self.sources.insert(peer, Source::new(&self.cfg));
        true
    }

    /// Removes a source (disconnected, or no longer providing). Its
    /// outstanding chunks are requested elsewhere. Returns whether it was a
    /// source.
    pub fn remove_source(&mut self, peer: &PeerId) -> bool {
        if self.set_holds(peer, Holds::Unknown).is_err() {
            return false;
        }
        let Some(src) = self.sources.remove(peer) else {
            return false;
        };
        for &chunk in src.in_flight.keys() {
            if self.unlink(chunk, peer) {
                self.make_pending(chunk);
            }
        }
        true
    }

    /// Records which chunks a source holds (its answer to `GetHave`, which
    /// the node may ask again as the source itself downloads). A full
    /// bitfield is the same as [`source_complete`](Self::source_complete).
    pub fn source_have(&mut self, peer: &PeerId, bits: Bitfield) -> Result<(), SchedulerError> {
        let holds = if bits.len() == self.manifest.chunk_count() && bits.is_full() {
            Holds::All
        } else {
            Holds::Some(bits)
        };
        self.set_holds(peer, holds)
    }

    /// Records that a source holds the whole file (e.g. it is the publisher).
    pub fn source_complete(&mut self, peer: &PeerId) -> Result<(), SchedulerError> {
        self.set_holds(peer, Holds::All)
    }

    /// Records that a source answered `NoSuchChunk` for `chunk`, so it is
    /// not asked for it again until a new have report says otherwise. Its
    /// request is released at once, without penalty.
    pub fn source_lacks(
        &mut self,
        peer: &PeerId,
        chunk: u64,
        now: Instant,
    ) -> Result<(), SchedulerError> {
        // Its request for the chunk (if any) is over: released at once,
        // without penalty, so the chunk goes elsewhere now rather than at
        // the request's timeout.
        self.release(peer, chunk, now);
        let count = self.manifest.chunk_count();
        let mut bits = match self.sources.get(peer).map(|s| &s.holds) {
            None => return Err(SchedulerError::UnknownSource(*peer)),
            // Nothing is asked of it anyway until it reports.
            Some(Holds::Unknown) => return Ok(()),
            Some(Holds::All) => Bitfield::full(count),
            Some(Holds::Some(bits)) => bits.clone(),
        };
        if bits.clear(chunk) {
            self.set_holds(peer, Holds::Some(bits))?;
        }
        Ok(())
    }

    /// The most requests `src` may have in flight now.
    fn window_limit(&self, src: &Source) -> usize {
        let by_bytes = self.cfg.max_in_flight_bytes / u64::from(self.manifest.chunk_size().max(1));
        (u64::from(src.window).min(by_bytes.max(1))) as usize
    }

    /// The `n` rarest pending chunks `src` holds, in one pass over the
    /// pending set. Chunks nobody holds (availability 0) sort first and are
    /// skipped. For a complete source this reads `n` entries; a partial one
    /// may scan the whole set (at most
    /// [`MAX_CHUNKS`](super::manifest::MAX_CHUNKS)).
    fn pick_pending(&self, src: &Source, n: usize) -> Vec<u64> {
        self.pending
            .range((1, 0, 0)..)
            .map(|&(_, _, chunk)| chunk)
            .filter(|&chunk| src.holds.has(chunk))
            .take(n)
            .collect()
    }

    /// The end-game duplicate for `peer`: the chunk it holds that has been
    /// in flight longest elsewhere and has fewer than `endgame_copies` copies.
    fn pick_duplicate(&self, peer: &PeerId, src: &Source) -> Option<u64> {
        let copies = self.cfg.endgame_copies.max(1) as usize;
        self.in_flight
            .iter()
            .filter(|(chunk, peers)| {
                peers.len() < copies && !peers.contains(peer) && src.holds.has(**chunk)
            })
            .filter_map(|(&chunk, peers)| {
                let oldest = peers
                    .iter()
                    .filter_map(|p| self.sources.get(p)?.in_flight.get(&chunk))
                    .min()?;
                Some((*oldest, chunk))
            })
            .min()
            .map(|(_, chunk)| chunk)
    }

    fn assign(&mut self, peer: PeerId, chunk: u64, now: Instant) {
        let key = (self.avail(chunk), self.order_key(chunk), chunk);
        self.pending.remove(&key);
        self.in_flight.entry(chunk).or_default().push(peer);
        if let Some(src) = self.sources.get_mut(&peer) {
            src.on_send(chunk, now);
        }
    }

    /// Sources in the order they are served: fastest first, so that when
    /// chunks are scarce the fast ones get them; unmeasured ones last.
    fn source_order(&self) -> Vec<PeerId> {
        let mut order: Vec<(f64, PeerId)> = self
            .sources
            .iter()
            .map(|(p, s)| (s.rate.unwrap_or(-1.0), *p))
            .collect();
        order.sort_by(|a, b| {
            b.0.partial_cmp(&a.0)
                .unwrap_or(Ordering::Equal)
                .then(a.1.cmp(&b.1))
        });
        order.into_iter().map(|(_, p)| p).collect()
    }

    /// The requests to send now, as `(peer, chunk)`: fills every ready
    /// source's window, and in end-game gives idle sources duplicates.
    ///
    /// Call it after anything that frees a window or adds work: a chunk, a
    /// failure, a new source or have report, [`expired`](Self::expired),
    /// and at [`next_deadline`](Self::next_deadline) (back-offs ending).
    pub fn next_requests(&mut self, now: Instant) -> Vec<(PeerId, u64)> {
        let mut out = Vec::new();
        if self.is_complete() {
            return out;
        }
        self.clear_backoffs(now);
        let order = self.source_order();
        for peer in &order {
            let Some(src) = self.sources.get(peer) else {
                continue;
            };
            let free = self.window_limit(src).saturating_sub(src.in_flight.len());
            if !src.ready(now) || free == 0 {
                continue;
            }
            for chunk in self.pick_pending(src, free) {
                self.assign(*peer, chunk, now);
                out.push((*peer, chunk));
            }
        }
        // End-game: every missing chunk a source holds is in flight.
        if self.pending.range((1, 0, 0)..).next().is_some() {
            return out;
        }
        for peer in &order {
            // Only idle sources take duplicates: a source still working on
            // its own requests would only queue them behind those.
            let idle = self
                .sources
                .get(peer)
                .is_some_and(|s| s.ready(now) && s.in_flight.is_empty());
            if !idle {
                continue;
            }
            while let Some(src) = self.sources.get(peer) {
                if src.in_flight.len() >= self.window_limit(src) {
                    break;
                }
                let Some(chunk) = self.pick_duplicate(peer, src) else {
                    break;
                };
                self.assign(*peer, chunk, now);
                out.push((*peer, chunk));
            }
        }
        out
    }

    /// Forgets back-offs that have ended, so that
    /// [`next_deadline`](Self::next_deadline) does not keep returning them.
    fn clear_backoffs(&mut self, now: Instant) {
        for src in self.sources.values_mut() {
            if src.backoff_until.is_some_and(|t| now >= t) {
                src.backoff_until = None;
            }
        }
    }

    /// Takes a chunk received from `peer`. On [`ChunkOutcome::Accepted`]
    /// the node writes `data` at [`Manifest::chunk_offset`].
    pub fn on_chunk(
        &mut self,
        peer: &PeerId,
        index: u64,
        data: &[u8],
        now: Instant,
    ) -> ChunkOutcome {
        let chunk_size = self.manifest.chunk_size();
        let Some(src) = self.sources.get_mut(peer) else {
            return ChunkOutcome::Unsolicited;
        };
        if index >= self.manifest.chunk_count() {
            return ChunkOutcome::Unsolicited;
        }
        let sent = src.finish(index, now);
        if sent.is_some() {
            self.unlink(index, peer);
        }
        if self.have.get(index) {
            // A copy that lost the end-game race. It crossed the link all
            // the same, so it counts towards the source's throughput.
            if let Some(src) = self.sources.get_mut(peer) {
                src.on_delivery(data.len() as u64, sent, now, &self.cfg, chunk_size);
            }
            return ChunkOutcome::Duplicate;
        }
        if !self.manifest.verify_chunk(index, data) {
            let banned = self.strike(peer);
            // Ask again elsewhere (or from this source, if it survives).
            self.make_pending(index);
            return ChunkOutcome::Corrupt { banned };
        }
        self.have.set(index);
        self.bytes_have += data.len() as u64;
        // It may have been pending again after a timeout: no longer.
        let key = (self.avail(index), self.order_key(index), index);
        self.pending.remove(&key);
        let cancel = self.in_flight.remove(&index).unwrap_or_default();
        for other in &cancel {
            if let Some(s) = self.sources.get_mut(other) {
                s.finish(index, now);
            }
        }
        if let Some(src) = self.sources.get_mut(peer) {
            src.on_delivery(data.len() as u64, sent, now, &self.cfg, chunk_size);
        }
        ChunkOutcome::Accepted { cancel }
    }

    /// Gives `peer` a strike; bans it when it has too many. Returns whether
    /// it was banned.
    fn strike(&mut self, peer: &PeerId) -> bool {
        let Some(src) = self.sources.get_mut(peer) else {
            return false;
        };
        src.strikes = src.strikes.saturating_add(1);
        if self.cfg.ban_on_corrupt || src.strikes >= self.cfg.max_strikes {
            self.remove_source(peer);
            self.banned.insert(*peer);
            true
        } else {
            false
        }
    }

    /// Releases a request without penalty; the chunk goes back to pending
    /// if nobody else is fetching it.
    fn release(&mut self, peer: &PeerId, chunk: u64, now: Instant) -> bool {
        let Some(src) = self.sources.get_mut(peer) else {
            return false;
        };
        if src.finish(chunk, now).is_none() {
            return false;
        }
        if self.unlink(chunk, peer) {
            self.make_pending(chunk);
        }
        true
    }

    /// A request failed (an error response, a dropped stream): the chunk is
    /// requested again, and the source's window halves and it backs off.
    pub fn on_failure(&mut self, peer: &PeerId, index: u64, now: Instant) {
        self.release(peer, index, now);
        if let Some(src) = self.sources.get_mut(peer) {
            src.penalize(now, &self.cfg);
        }
    }

    /// The requests that have waited longer than their source's timeout.
    /// They are treated as failures (one penalty per source, however many
    /// of its requests expired) and their chunks requested again; a late
    /// answer is still accepted. The node forgets these requests.
    pub fn expired(&mut self, now: Instant) -> Vec<(PeerId, u64)> {
        self.clear_backoffs(now);
        let chunk_size = self.manifest.chunk_size();
        let mut out = Vec::new();
        for (peer, src) in &self.sources {
            let timeout = src.timeout(&self.cfg, chunk_size);
            for (&chunk, &sent) in &src.in_flight {
                if now.saturating_duration_since(sent) >= timeout {
                    out.push((*peer, chunk));
                }
            }
        }
        let mut penalized = BTreeSet::new();
        for (peer, chunk) in &out {
            self.release(peer, *chunk, now);
            if penalized.insert(*peer)
                && let Some(src) = self.sources.get_mut(peer)
            {
                src.penalize(now, &self.cfg);
            }
        }
        out
    }

    /// When the node should next call [`expired`](Self::expired) and
    /// [`next_requests`](Self::next_requests): the earliest request
    /// deadline or end of a back-off, if any. May be in the past (then call
    /// them now); calling them clears what has passed.
    pub fn next_deadline(&self) -> Option<Instant> {
        let chunk_size = self.manifest.chunk_size();
        self.sources
            .values()
            .flat_map(|s| {
                let timeout = s.timeout(&self.cfg, chunk_size);
                let deadlines = s
                    .in_flight
                    .values()
                    .filter_map(move |t| t.checked_add(timeout));
                deadlines.chain(s.backoff_until)
            })
            .min()
    }

    /// The current timeout of requests to `peer`, if it is a source.
    pub fn request_timeout(&self, peer: &PeerId) -> Option<Duration> {
        let chunk_size = self.manifest.chunk_size();
        self.sources
            .get(peer)
            .map(|s| s.timeout(&self.cfg, chunk_size))
    }

    /// Every source's standing.
    pub fn sources(&self) -> Vec<SourceStats> {
        self.sources
            .iter()
            .map(|(peer, s)| SourceStats {
                peer: *peer,
                // Saturating float-to-int cast.
                rate_bps: s.rate.unwrap_or(0.0) as u64,
                in_flight: s.in_flight.len(),
                window: s.window,
                chunks_received: s.chunks_received,
                strikes: s.strikes,
                failures: s.failures,
            })
            .collect()
    }

    /// Peers banned for sending corrupt chunks.
    pub fn banned(&self) -> Vec<PeerId> {
        self.banned.iter().copied().collect()
    }

    /// How far the download is.
    pub fn progress(&self) -> Progress {
        Progress {
            bytes_total: self.manifest.size(),
            bytes_have: self.bytes_have,
            chunks_total: self.manifest.chunk_count(),
            chunks_have: self.have.count(),
        }
    }

    /// Whether every chunk is here.
    pub fn is_complete(&self) -> bool {
        self.have.is_full()
    }

    /// The chunks held, e.g. to answer `GetHave` while downloading.
    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    /// The manifest being downloaded.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    use libp2p_identity::Keypair;

    use super::super::manifest::ManifestBuilder;
    use super::*;

    const CHUNK: u32 = 16 * 1024;
    const MS: Duration = Duration::from_millis(1);

    fn peer(n: u8) -> PeerId {
        match Keypair::ed25519_from_bytes([n; 32]) {
            Ok(k) => k.public().to_peer_id(),
            Err(e) => panic!("{e}"),
        }
    }

    /// A file of `chunks` chunks of [`CHUNK`] bytes, the last one shorter.
    fn file(chunks: u64) -> (Vec<u8>, Manifest) {
        let len = (chunks - 1) * u64::from(CHUNK) + 1000;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4099) as u8).collect();
        let Ok(mut b) = ManifestBuilder::new(CHUNK) else {
            panic!("builder")
        };
        b.update(&data);
        match b.finish(None) {
            Ok(m) => (data, m),
            Err(e) => panic!("{e}"),
        }
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Behaviour {
        Honest,
        /// Flips a bit in every chunk.
        Corrupt,
        /// Answers the first `n` requests, then never again.
        StallAfter(u64),
        /// Never answers the first `n` requests, then behaves.
        DropFirst(u64),
    }

    struct SimPeer {
        id: PeerId,
        /// Bytes per second it serves.
        rate: u64,
        /// One-way latency.
        latency: Duration,
        behaviour: Behaviour,
        /// Chunks it holds (`None`: all).
        holds: Option<Bitfield>,
        busy_until: Instant,
        requests: u64,
    }

    fn sim_peer(n: u8, rate: u64, latency_ms: u64, behaviour: Behaviour) -> SimPeer {
        SimPeer {
            id: peer(n),
            rate,
            latency: Duration::from_millis(latency_ms),
            behaviour,
            holds: None,
            busy_until: Instant::now(),
            requests: 0,
        }
    }

    /// A deterministic network: every peer serves its requests one after
    /// another at its rate, behind its latency. Time is virtual.
    struct Sim {
        t0: Instant,
        now: Instant,
        data: Vec<u8>,
        sched: Scheduler,
        peers: Vec<SimPeer>,
        /// (arrival, sequence, peer index, chunk)
        events: BinaryHeap<Reverse<(Instant, u64, usize, u64)>>,
        seq: u64,
        written: Vec<Option<Vec<u8>>>,
        requested: Vec<(PeerId, u64)>,
        outcomes: Vec<(PeerId, u64, ChunkOutcome)>,
        /// Requests for chunks the peer does not hold: the scheduler's fault.
        wrong_asks: u64,
    }

    impl Sim {
        fn new(peers: Vec<SimPeer>, chunks: u64, have: Bitfield, cfg: SchedulerConfig) -> Sim {
            let (data, manifest) = file(chunks);
            let t0 = Instant::now();
            let written = (0..chunks)
                .map(|i| have.get(i).then(|| chunk_of(&data, &manifest, i)))
                .collect();
            let sched = match Scheduler::new(manifest, have, cfg) {
                Ok(s) => s,
                Err(e) => panic!("{e}"),
            };
            let mut sim = Sim {
                t0,
                now: t0,
                data,
                sched,
                peers,
                events: BinaryHeap::new(),
                seq: 0,
                written,
                requested: Vec::new(),
                outcomes: Vec::new(),
                wrong_asks: 0,
            };
            for i in 0..sim.peers.len() {
                let id = sim.peers[i].id;
                sim.peers[i].busy_until = t0;
                assert!(sim.sched.add_source(id));
                let r = match sim.peers[i].holds.clone() {
                    None => sim.sched.source_complete(&id),
                    Some(bits) => sim.sched.source_have(&id, bits),
                };
                assert_eq!(r, Ok(()));
            }
            sim
        }

        fn with_holds(mut self, holds: Vec<Option<Bitfield>>) -> Sim {
            for (p, h) in self.peers.iter_mut().zip(holds) {
                p.holds = h.clone();
                let r = match h {
                    None => self.sched.source_complete(&p.id),
                    Some(bits) => self.sched.source_have(&p.id, bits),
                };
                assert_eq!(r, Ok(()));
            }
            self
        }

        fn send(&mut self, id: PeerId, chunk: u64) {
            self.requested.push((id, chunk));
            let Some(i) = self.peers.iter().position(|p| p.id == id) else {
                panic!("request to a stranger")
            };
            let now = self.now;
            let p = &mut self.peers[i];
            p.requests += 1;
            if p.holds.as_ref().is_some_and(|h| !h.get(chunk)) {
                self.wrong_asks += 1;
                return;
            }
            match p.behaviour {
                Behaviour::StallAfter(n) if p.requests > n => return,
                Behaviour::DropFirst(n) if p.requests <= n => return,
                _ => {}
            }
            let len = self.sched.manifest().chunk_len(chunk).unwrap_or(0);
            let serve = Duration::from_secs_f64(f64::from(len) / p.rate as f64);
            let start = p.busy_until.max(now + p.latency);
            p.busy_until = start + serve;
            self.seq += 1;
            self.events
                .push(Reverse((p.busy_until + p.latency, self.seq, i, chunk)));
        }

        /// Runs until the download completes or `limit` of virtual time
        /// passes; returns the virtual time taken.
        fn run(&mut self, limit: Duration) -> Option<Duration> {
            let tick = 100 * MS;
            loop {
                for (p, c) in self.sched.expired(self.now) {
                    self.outcomes.push((p, c, ChunkOutcome::Unsolicited));
                }
                for (p, c) in self.sched.next_requests(self.now) {
                    self.send(p, c);
                }
                if self.sched.is_complete() {
                    return Some(self.now - self.t0);
                }
                if self.now - self.t0 > limit {
                    return None;
                }
                let next = self.events.peek().map(|Reverse(e)| e.0);
                match next {
                    Some(t) if t <= self.now + tick => {
                        self.now = self.now.max(t);
                        if let Some(Reverse((_, _, i, chunk))) = self.events.pop() {
                            self.deliver(i, chunk);
                        }
                    }
                    _ => self.now += tick,
                }
            }
        }

        fn deliver(&mut self, i: usize, chunk: u64) {
            let id = self.peers[i].id;
            let mut data = chunk_of(&self.data, self.sched.manifest(), chunk);
            if self.peers[i].behaviour == Behaviour::Corrupt {
                let mid = data.len() / 2;
                data[mid] ^= 0x10;
            }
            let outcome = self.sched.on_chunk(&id, chunk, &data, self.now);
            if matches!(outcome, ChunkOutcome::Accepted { .. }) {
                assert!(self.written[chunk as usize].is_none(), "accepted twice");
                self.written[chunk as usize] = Some(data);
            }
            self.outcomes.push((id, chunk, outcome));
        }

        fn assert_file_intact(&self) {
            let m = self.sched.manifest();
            let mut out = Vec::new();
            for (i, c) in self.written.iter().enumerate() {
                let Some(c) = c else {
                    panic!("chunk {i} missing")
                };
                assert!(m.verify_chunk(i as u64, c));
                out.extend_from_slice(c);
            }
            assert!(out == self.data, "reassembled file differs");
            let p = self.sched.progress();
            assert_eq!(p.bytes_have, p.bytes_total);
            assert_eq!(p.chunks_have, p.chunks_total);
        }

        fn stats(&self, id: &PeerId) -> SourceStats {
            match self.sched.sources().into_iter().find(|s| s.peer == *id) {
                Some(s) => s,
                None => panic!("no stats for {id}"),
            }
        }

        fn count(&self, id: &PeerId, f: impl Fn(&ChunkOutcome) -> bool) -> usize {
            self.outcomes
                .iter()
                .filter(|(p, _, o)| p == id && f(o))
                .count()
        }
    }

    fn chunk_of(data: &[u8], m: &Manifest, i: u64) -> Vec<u8> {
        let start = (i * u64::from(m.chunk_size())) as usize;
        let len = m.chunk_len(i).unwrap_or(0) as usize;
        data[start..start + len].to_vec()
    }

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn completes_with_one_source() {
        let peers = vec![sim_peer(1, MIB, 10, Behaviour::Honest)];
        let mut sim = Sim::new(peers, 64, Bitfield::new(64), SchedulerConfig::default());
        assert!(sim.run(Duration::from_secs(60)).is_some());
        sim.assert_file_intact();
        // One source: no chunk is ever asked for twice.
        assert_eq!(sim.requested.len(), 64);
        let s = sim.stats(&peer(1));
        assert_eq!(s.chunks_received, 64);
        assert_eq!(s.in_flight, 0);
        // Measured within a factor of two of the real rate.
        assert!((MIB / 2..MIB * 2).contains(&s.rate_bps), "{}", s.rate_bps);
        assert!(sim.sched.next_requests(sim.now).is_empty());
    }

    #[test]
    fn faster_sources_get_more_chunks() {
        let peers = vec![
            sim_peer(1, 256 * 1024, 20, Behaviour::Honest),
            sim_peer(2, 4 * MIB, 20, Behaviour::Honest),
            sim_peer(3, MIB, 20, Behaviour::Honest),
        ];
        let mut sim = Sim::new(peers, 256, Bitfield::new(256), SchedulerConfig::default());
        let Some(took) = sim.run(Duration::from_secs(60)) else {
            panic!("did not complete")
        };
        sim.assert_file_intact();
        let [slow, fast, mid] = [1, 2, 3].map(|n| sim.stats(&peer(n)));
        assert!(fast.chunks_received > mid.chunks_received);
        assert!(mid.chunks_received > slow.chunks_received);
        assert!(fast.rate_bps > mid.rate_bps && mid.rate_bps > slow.rate_bps);
        // 4 MiB at the fastest source's 4 MiB/s alone would take 1 s; the
        // three together do better.
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    #[test]
    fn partial_sources_complete_together() {
        let chunks = 40;
        let mut first = Bitfield::new(chunks);
        let mut second = Bitfield::new(chunks);
        for i in 0..chunks {
            if i < chunks / 2 {
                first.set(i);
            } else {
                second.set(i);
            }
        }
        let peers = vec![
            sim_peer(1, MIB, 10, Behaviour::Honest),
            sim_peer(2, MIB, 10, Behaviour::Honest),
        ];
        let mut sim = Sim::new(
            peers,
            chunks,
            Bitfield::new(chunks),
            SchedulerConfig::default(),
        )
        .with_holds(vec![Some(first), Some(second)]);
        assert!(sim.run(Duration::from_secs(60)).is_some());
        sim.assert_file_intact();
        assert_eq!(sim.wrong_asks, 0, "asked a source for a chunk it lacks");
        assert_eq!(sim.stats(&peer(1)).chunks_received, chunks / 2);
        assert_eq!(sim.stats(&peer(2)).chunks_received, chunks / 2);
    }

    #[test]
    fn corrupting_source_is_banned_and_the_honest_one_finishes() {
        // The liar is faster, so it is asked first and often.
        let peers = vec![
            sim_peer(1, 4 * MIB, 5, Behaviour::Corrupt),
            sim_peer(2, MIB, 10, Behaviour::Honest),
        ];
        let mut sim = Sim::new(peers, 32, Bitfield::new(32), SchedulerConfig::default());
        assert!(sim.run(Duration::from_secs(60)).is_some());
        sim.assert_file_intact();
        assert_eq!(sim.sched.banned(), vec![peer(1)]);
        assert_eq!(
            sim.count(&peer(1), |o| *o == ChunkOutcome::Corrupt { banned: true }),
            1
        );
        // Its other answers, arriving after the ban, are dropped unchecked.
        assert_eq!(sim.count(&peer(1), |o| *o == ChunkOutcome::Unsolicited), 3);
        assert_eq!(
            sim.count(&peer(2), |o| matches!(o, ChunkOutcome::Accepted { .. })),
            32
        );
        // A banned peer cannot come back.
        assert!(!sim.sched.add_source(peer(1)));
        assert_eq!(sim.sched.sources().len(), 1);
    }

    #[test]
    fn strikes_accumulate_when_not_banning_on_first_corruption() {
        let cfg = SchedulerConfig::default().with_strikes(3, false);
        let peers = vec![
            sim_peer(1, 4 * MIB, 5, Behaviour::Corrupt),
            sim_peer(2, MIB, 10, Behaviour::Honest),
        ];
        let mut sim = Sim::new(peers, 32, Bitfield::new(32), cfg);
        assert!(sim.run(Duration::from_secs(60)).is_some());
        sim.assert_file_intact();
        assert_eq!(sim.sched.banned(), vec![peer(1)]);
        assert_eq!(
            sim.count(&peer(1), |o| *o == ChunkOutcome::Corrupt { banned: false }),
            2
        );
        assert_eq!(
            sim.count(&peer(1), |o| *o == ChunkOutcome::Corrupt { banned: true }),
            1
        );
    }

    #[test]
    fn end_game_duplicates_the_chunks_of_a_stalled_peer() {
        // Timeouts are an hour: only end-game can finish this in time.
        let hour = Duration::from_secs(3600);
        let cfg = SchedulerConfig::default().with_timeouts(hour, hour, hour);
        let peers = vec![
            sim_peer(1, MIB, 10, Behaviour::Honest),
            sim_peer(2, 2 * MIB, 10, Behaviour::StallAfter(3)),
        ];
        let chunks = 48;
        let mut sim = Sim::new(peers, chunks, Bitfield::new(chunks), cfg);
        let Some(took) = sim.run(Duration::from_secs(60)) else {
            panic!("a stalled peer stalled the download")
        };
        sim.assert_file_intact();
        assert!(took < Duration::from_secs(5), "{took:?}");
        // The stalled peer's outstanding chunks were fetched from peer 1,
        // and each acceptance named peer 2 for cancellation.
        let stalled: Vec<u64> = sim
            .requested
            .iter()
            .filter(|(p, _)| *p == peer(2))
            .map(|(_, c)| *c)
            .skip(3)
            .collect();
        assert!(!stalled.is_empty());
        for c in &stalled {
            assert!(
                sim.outcomes.iter().any(|(p, chunk, o)| *p == peer(1)
                    && chunk == c
                    && *o
                        == ChunkOutcome::Accepted {
                            cancel: vec![peer(2)]
                        }),
                "chunk {c} was not duplicated"
            );
        }
        assert_eq!(sim.stats(&peer(2)).in_flight, 0);
        // Nothing else was ever asked twice.
        assert_eq!(sim.requested.len() as u64, chunks + stalled.len() as u64);
    }

    #[test]
    fn timeouts_reschedule_and_back_off() {
        let second = Duration::from_secs(1);
        let cfg = SchedulerConfig::default()
            .with_timeouts(second, second, 10 * second)
            .with_backoff(100 * MS, second);
        let peers = vec![sim_peer(1, MIB, 10, Behaviour::DropFirst(2))];
        let mut sim = Sim::new(peers, 16, Bitfield::new(16), cfg);
        let Some(took) = sim.run(Duration::from_secs(60)) else {
            panic!("did not recover from lost requests")
        };
        sim.assert_file_intact();
        // The two lost requests expired after the 1 s floor, together.
        assert!(took >= second, "{took:?}");
        let expired: Vec<u64> = sim
            .outcomes
            .iter()
            .filter(|(_, _, o)| *o == ChunkOutcome::Unsolicited)
            .map(|(_, c, _)| *c)
            .collect();
        assert_eq!(expired, vec![0, 1]);
        assert_eq!(sim.requested.len(), 18);
        let s = sim.stats(&peer(1));
        assert_eq!(s.failures, 0, "a delivery resets the failure count");
    }

    #[test]
    fn resume_requests_only_missing_chunks() {
        let chunks = 30;
        let mut have = Bitfield::new(chunks);
        for i in (0..chunks).filter(|i| i % 3 != 0 || *i > 20) {
            have.set(i);
        }
        let before = have.clone();
        let peers = vec![
            sim_peer(1, MIB, 10, Behaviour::Honest),
            sim_peer(2, MIB, 10, Behaviour::Honest),
        ];
        let mut sim = Sim::new(peers, chunks, have, SchedulerConfig::default());
        let p = sim.sched.progress();
        assert_eq!(p.chunks_have, before.count());
        assert_eq!(
            p.bytes_have,
            before.count() * u64::from(CHUNK) - (u64::from(CHUNK) - 1000)
        );
        assert!(sim.run(Duration::from_secs(60)).is_some());
        sim.assert_file_intact();
        assert!(sim.requested.iter().all(|(_, c)| !before.get(*c)));
        let mut asked: Vec<u64> = sim.requested.iter().map(|(_, c)| *c).collect();
        asked.sort_unstable();
        asked.dedup();
        assert_eq!(asked, before.iter_missing().collect::<Vec<_>>());
    }

    #[test]
    fn window_grows_on_a_long_fat_link_only() {
        let peers = vec![
            sim_peer(1, 2 * MIB, 1, Behaviour::Honest),
            sim_peer(2, 2 * MIB, 150, Behaviour::Honest),
            sim_peer(3, 256 * 1024, 150, Behaviour::Honest),
        ];
        // One run per source, so none limits another.
        let mut windows = Vec::new();
        for p in peers {
            let id = p.id;
            let mut sim = Sim::new(vec![p], 512, Bitfield::new(512), SchedulerConfig::default());
            assert!(sim.run(Duration::from_secs(60)).is_some());
            windows.push(sim.stats(&id).window);
        }
        // 2 MiB/s at 1 ms: one chunk takes 8 ms, so a few in flight fill it.
        assert!(windows[0] <= 8, "{windows:?}");
        // 2 MiB/s at 300 ms round trip: about 40 chunks in flight needed.
        assert!(windows[1] >= 24, "{windows:?}");
        assert!(windows[1] <= 64, "{windows:?}");
        // 256 KiB/s at 300 ms round trip: about 6 chunks fill the pipe, and
        // the bandwidth-delay cap keeps the window near twice that.
        assert!((6..=14).contains(&windows[2]), "{windows:?}");
    }

    #[test]
    fn in_flight_bytes_bound_the_window() {
        let cfg = SchedulerConfig::default().with_max_in_flight_bytes(2 * u64::from(CHUNK));
        let (_, m) = file(10);
        let Ok(mut s) = Scheduler::new(m, Bitfield::new(10), cfg) else {
            panic!("new")
        };
        assert!(s.add_source(peer(1)));
        assert_eq!(s.source_complete(&peer(1)), Ok(()));
        assert_eq!(s.next_requests(Instant::now()).len(), 2);
    }

    #[test]
    fn rarest_chunks_first() {
        let (_, m) = file(8);
        let t = Instant::now();
        let Ok(mut s) = Scheduler::new(m, Bitfield::new(8), SchedulerConfig::default()) else {
            panic!("new")
        };
        // Peer 1 holds everything, peer 2 the first half: the second half is
        // rarer, so peer 1 is asked for it first.
        let mut half = Bitfield::new(8);
        (0..4).for_each(|i| {
            half.set(i);
        });
        assert!(s.add_source(peer(1)) && s.add_source(peer(2)));
        // Nothing is asked before anything is known about the sources.
        assert!(s.next_requests(t).is_empty());
        assert_eq!(s.source_complete(&peer(1)), Ok(()));
        assert_eq!(s.source_have(&peer(2), half), Ok(()));
        let reqs = s.next_requests(t);
        let to = |n| -> Vec<u64> {
            reqs.iter()
                .filter(|(p, _)| *p == peer(n))
                .map(|(_, c)| *c)
                .collect()
        };
        assert_eq!(to(1), vec![4, 5, 6, 7]);
        assert_eq!(to(2), vec![0, 1, 2, 3]);
    }

    #[test]
    fn seeded_order_differs_but_still_covers_everything() {
        let (_, m) = file(64);
        let cfg = SchedulerConfig::default()
            .with_seed(42)
            .with_windows(64, 64);
        let Ok(mut s) = Scheduler::new(m, Bitfield::new(64), cfg) else {
            panic!("new")
        };
        assert!(s.add_source(peer(1)));
        assert_eq!(s.source_complete(&peer(1)), Ok(()));
        let mut asked: Vec<u64> = s
            .next_requests(Instant::now())
            .into_iter()
            .map(|(_, c)| c)
            .collect();
        assert_ne!(asked, (0..64).collect::<Vec<_>>());
        asked.sort_unstable();
        assert_eq!(asked, (0..64).collect::<Vec<_>>());
    }

    #[test]
    fn removing_a_source_reschedules_its_chunks() {
        let (data, m) = file(8);
        let t = Instant::now();
        let Ok(mut s) = Scheduler::new(m.clone(), Bitfield::new(8), SchedulerConfig::default())
        else {
            panic!("new")
        };
        assert!(s.add_source(peer(1)));
        assert_eq!(s.source_complete(&peer(1)), Ok(()));
        let first = s.next_requests(t);
        assert_eq!(first.len(), 4);
        assert!(s.remove_source(&peer(1)));
        assert!(!s.remove_source(&peer(1)));
        assert!(s.add_source(peer(2)));
        assert_eq!(s.source_complete(&peer(2)), Ok(()));
        let second = s.next_requests(t);
        let chunks = |r: &[(PeerId, u64)]| r.iter().map(|(_, c)| *c).collect::<Vec<_>>();
        assert_eq!(chunks(&second), chunks(&first));
        // A late answer from the removed source is dropped.
        let c0 = chunk_of(&data, &m, 0);
        assert_eq!(s.on_chunk(&peer(1), 0, &c0, t), ChunkOutcome::Unsolicited);
        assert_eq!(
            s.on_chunk(&peer(2), 0, &c0, t),
            ChunkOutcome::Accepted { cancel: vec![] }
        );
        assert_eq!(s.on_chunk(&peer(2), 0, &c0, t), ChunkOutcome::Duplicate);
        assert_eq!(s.on_chunk(&peer(2), 8, &c0, t), ChunkOutcome::Unsolicited);
    }

    #[test]
    fn failures_back_off_and_lacking_sources_are_not_asked_again() {
        let (data, m) = file(8);
        let t = Instant::now();
        let Ok(mut s) = Scheduler::new(m.clone(), Bitfield::new(8), SchedulerConfig::default())
        else {
            panic!("new")
        };
        assert!(s.add_source(peer(1)));
        assert_eq!(s.source_complete(&peer(1)), Ok(()));
        let reqs = s.next_requests(t);
        assert_eq!(reqs.first(), Some(&(peer(1), 0)));
        // NoSuchChunk for chunk 0: released at once (not at its timeout),
        // never asked again; penalized only when a failure is reported.
        assert_eq!(s.source_lacks(&peer(1), 0, t), Ok(()));
        let st = &s.sources()[0];
        assert_eq!((st.failures, st.window, st.in_flight), (0, 4, 3));
        s.on_failure(&peer(1), 0, t);
        let st = &s.sources()[0];
        assert_eq!((st.failures, st.window, st.in_flight), (1, 2, 3));
        // Backing off for 1 s: nothing new now, something after.
        assert!(s.next_requests(t + 500 * MS).is_empty());
        assert_eq!(s.next_deadline(), Some(t + Duration::from_secs(1)));
        let later = s.next_requests(t + Duration::from_secs(1));
        assert!(later.is_empty(), "window of 2 is still full: {later:?}");
        // Two more failures: the back-off doubles each time (1, 2, 4 s)
        // and the window bottoms out at one request.
        s.on_failure(&peer(1), 1, t);
        s.on_failure(&peer(1), 2, t);
        let st = &s.sources()[0];
        assert_eq!((st.failures, st.window, st.in_flight), (3, 1, 1));
        assert_eq!(s.next_deadline(), Some(t + Duration::from_secs(4)));
        // Chunk 3 arrives: the failure count resets, but the back-off runs.
        let later = t + Duration::from_millis(3900);
        let c3 = chunk_of(&data, &m, 3);
        assert!(matches!(
            s.on_chunk(&peer(1), 3, &c3, later),
            ChunkOutcome::Accepted { .. }
        ));
        assert_eq!(s.sources()[0].failures, 0);
        assert!(s.next_requests(later).is_empty());
        // After it, the source is asked again, never for chunk 0; the
        // first throughput sample grew its window from 1 to 2.
        assert_eq!(s.sources()[0].window, 2);
        let again = s.next_requests(t + Duration::from_secs(4));
        assert_eq!(again, vec![(peer(1), 1), (peer(1), 2)]);
        // The ended back-off is forgotten: the next deadline is a request's.
        assert!(
            s.next_deadline()
                .is_some_and(|d| d > t + Duration::from_secs(4))
        );
    }

    #[test]
    fn misuse_is_reported() {
        let (_, m) = file(8);
        assert_eq!(
            Scheduler::new(m.clone(), Bitfield::new(7), SchedulerConfig::default()).err(),
            Some(SchedulerError::HaveLength {
                expected: 8,
                got: 7
            })
        );
        let Ok(mut s) = Scheduler::new(m, Bitfield::full(8), SchedulerConfig::default()) else {
            panic!("new")
        };
        assert!(s.is_complete());
        assert_eq!(
            s.source_complete(&peer(9)),
            Err(SchedulerError::UnknownSource(peer(9)))
        );
        assert!(s.add_source(peer(1)));
        assert!(!s.add_source(peer(1)));
        assert_eq!(
            s.source_have(&peer(1), Bitfield::new(3)),
            Err(SchedulerError::HaveLength {
                expected: 8,
                got: 3
            })
        );
        assert_eq!(s.source_complete(&peer(1)), Ok(()));
        assert!(s.next_requests(Instant::now()).is_empty());
        assert_eq!(s.request_timeout(&peer(1)), Some(Duration::from_secs(30)));
    }
}
