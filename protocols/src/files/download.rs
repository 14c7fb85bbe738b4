//! The lifecycle of one download, sans-IO: from searching for sources to a
//! complete file.
//!
//! A [`Download`] decides everything a download does except I/O. The node
//! feeds it events (providers found, peers connected and gone, the answer
//! to each request, chunks written, timers) with the `now` to act on, and
//! carries out the [`Action`]s it returns, in order: send a request, write a
//! chunk, record progress, finish the file. It never reads the clock, the
//! disk or the network, so tests and the simulator drive it with any `now`.
//!
//! The course of a download:
//! 1. **Searching.** Every connected peer and every provider found is asked
//!    for the manifest ([`Asked::Manifest`]), at most
//!    [`DownloadConfig::max_probes`] peers at a time (the others wait their
//!    turn, so providers found late are asked too), a search round every
//!    [`DownloadConfig::search_interval`].
//! 2. The first manifest that matches the file id is handed to the node
//!    ([`Action::Open`]); a manifest that does not match is refused. The
//!    node stores it, prepares the partial file, finds the chunks it already
//!    holds (after a restart) and calls [`Download::opened`].
//! 3. **Downloading.** Every peer asked before is now asked which chunks it
//!    holds ([`Asked::Have`]); those that answer become sources of the
//!    [`Scheduler`], whose requests go out as [`Asked::Chunk`]. An accepted
//!    chunk is written by the node ([`Action::Write`], then
//!    [`Download::written`]); what is held is recorded every
//!    [`DownloadConfig::persist_interval`] ([`Action::Persist`]).
//! 4. **Complete** once every chunk is held and written
//!    ([`Action::Complete`]: the node syncs and moves the file into place),
//!    or **Failed** when the node reports an I/O error
//!    ([`Download::fail`]); asking again ([`Download::retry`]) resumes.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use libp2p_identity::PeerId;

use super::bitfield::Bitfield;
use super::manifest::{FileId, MAX_MANIFEST_SIZE, Manifest};
use super::scheduler::{ChunkOutcome, Progress, Scheduler, SchedulerConfig, SourceStats};
use super::wire::{
    ErrorCode, MAX_RESPONSE_SIZE, Request, Response, decode_response_with_limit,
    max_chunk_response_size,
};

/// How long received bytes count towards [`Download::rate_bps`].
const RATE_WINDOW: Duration = Duration::from_secs(2);
/// Peers waiting for a probe slot, at most (beyond: dropped; a later
/// search finds them again).
pub const MAX_WAITING: usize = 1024;

/// What a request to a peer asked for. The node keeps it with the request
/// and hands it back with the answer ([`Download::on_response`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Asked {
    /// The manifest ([`Request::GetManifest`]).
    Manifest,
    /// Which chunks the peer holds ([`Request::GetHave`]).
    Have,
    /// This chunk ([`Request::GetChunk`]).
    Chunk(u64),
}

/// Where a download is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DownloadState {
    /// Looking for a peer that has the manifest.
    Searching,
    /// Fetching chunks.
    Downloading,
    /// Every chunk is held and the file is in place.
    Complete,
    /// Stopped by an error ([`Download::error`]); [`Download::retry`] resumes.
    Failed,
}

/// Settings of a [`Download`].
///
/// Defaults: `search_interval` 3 s, `persist_interval` 1 s, `max_probes`
/// 32, the [`SchedulerConfig`] defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DownloadConfig {
    /// How often a download looks for more sources.
    pub search_interval: Duration,
    /// How often the chunks held are recorded.
    pub persist_interval: Duration,
    /// Peers asked at once for the manifest or their chunks (answers not
    /// in yet); more wait their turn.
    pub max_probes: usize,
    /// The chunk scheduler's settings (its seed included).
    pub scheduler: SchedulerConfig,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            search_interval: Duration::from_secs(3),
            persist_interval: Duration::from_secs(1),
            max_probes: 32,
            scheduler: SchedulerConfig::default(),
        }
    }
}

impl DownloadConfig {
    /// Sets the search and persist intervals.
    pub fn with_intervals(mut self, search: Duration, persist: Duration) -> Self {
        self.search_interval = search;
        self.persist_interval = persist;
        self
    }

    /// Sets the scheduler's settings.
    pub fn with_scheduler(mut self, scheduler: SchedulerConfig) -> Self {
        self.scheduler = scheduler;
        self
    }
}

/// What the node does for a [`Download`]. Carry them out in order; those
/// that say so are answered by calling back before the next event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Send `request` to `peer` and hand the answer (or the failure) to
    /// [`Download::on_response`] with `asked`.
    Send {
        /// Whom to ask.
        peer: PeerId,
        /// What for, to give back with the answer.
        asked: Asked,
        /// The request.
        request: Request,
    },
    /// Look up providers of the file; hand them to [`Download::on_providers`].
    FindProviders,
    /// The manifest is known and verified: store it, prepare the partial
    /// file, then call [`Download::opened`] with the chunks already held
    /// (or [`Download::fail`]).
    Open(Manifest),
    /// Write a verified chunk at `offset` of the partial file, then call
    /// [`Download::written`] (or [`Download::fail`]).
    Write {
        /// The chunk.
        index: u64,
        /// Where it goes in the file.
        offset: u64,
        /// Its bytes.
        data: Vec<u8>,
    },
    /// A chunk did not match the manifest and is asked again elsewhere (for
    /// metrics and logs).
    Corrupt {
        /// Who sent it.
        peer: PeerId,
        /// The chunk.
        index: u64,
        /// Whether the peer was banned for it.
        banned: bool,
    },
    /// Make the chunks written durable and record [`Download::have`], then
    /// call [`Download::persisted`] (if that fails, it is asked again a
    /// persist interval later).
    Persist,
    /// Every chunk is held and written: finish the file (sync it, move it
    /// into place). The download counts as complete; on an error call
    /// [`Download::fail`].
    Complete,
    /// The download failed, for this reason.
    Fail(String),
}

/// One file's download: its state, the peers asked, its [`Scheduler`] once
/// the manifest is known. See the module docs.
#[derive(Debug)]
pub struct Download {
    file: FileId,
    /// This node: never asked.
    local: PeerId,
    cfg: DownloadConfig,
    state: DownloadState,
    error: Option<String>,
    sched: Option<Scheduler>,
    /// Peers asked (or being asked) for the manifest or their chunks.
    probed: BTreeSet<PeerId>,
    /// Peers being asked (their answer not in yet): at most `max_probes`.
    probing: BTreeSet<PeerId>,
    /// Peers to ask once a probe slot is free (providers and peers found
    /// while `max_probes` were being asked), at most [`MAX_WAITING`].
    waiting: VecDeque<PeerId>,
    /// When the next search round is due.
    next_search: Instant,
    /// When progress was last recorded (or its recording asked for).
    last_persist: Instant,
    /// Chunks written since progress was last recorded.
    dirty: bool,
    /// Writes handed to the node and not yet confirmed: the download is not
    /// complete before they are.
    unwritten: usize,
    /// Recent bytes written, for the rate shown to users.
    recent: VecDeque<(Instant, u64)>,
}

impl Download {
    /// A download of `file` for the node `local`, searching from now on.
    pub fn new(file: FileId, local: PeerId, cfg: DownloadConfig, now: Instant) -> Self {
        Download {
            file,
            local,
            cfg,
            state: DownloadState::Searching,
            error: None,
            sched: None,
            probed: BTreeSet::new(),
            probing: BTreeSet::new(),
            waiting: VecDeque::new(),
            next_search: now,
            last_persist: now,
            dirty: false,
            unwritten: 0,
            recent: VecDeque::new(),
        }
    }

    /// The file downloaded.
    pub fn file(&self) -> &FileId {
        &self.file
    }

    /// Where the download is.
    pub fn state(&self) -> DownloadState {
        self.state
    }

    /// Why it failed.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Whether it is still searching or downloading.
    pub fn is_active(&self) -> bool {
        matches!(
            self.state,
            DownloadState::Searching | DownloadState::Downloading
        )
    }

    /// The manifest, once opened.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.sched.as_ref().map(Scheduler::manifest)
    }

    /// The chunks held, once opened (what this node serves of the file
    /// while it downloads).
    pub fn have(&self) -> Option<&Bitfield> {
        self.sched.as_ref().map(Scheduler::have)
    }

    /// How far it is, once opened.
    pub fn progress(&self) -> Option<Progress> {
        self.sched.as_ref().map(Scheduler::progress)
    }

    /// Every source's standing.
    pub fn sources(&self) -> Vec<SourceStats> {
        self.sched
            .as_ref()
            .map_or_else(Vec::new, Scheduler::sources)
    }

    /// Bytes written per second over the last two seconds.
    pub fn rate_bps(&self, now: Instant) -> u64 {
        let recent: u64 = self
            .recent
            .iter()
            .filter(|(t, _)| now.saturating_duration_since(*t) <= RATE_WINDOW)
            .map(|(_, n)| n)
            .sum();
        recent / RATE_WINDOW.as_secs()
    }

    /// When [`on_timer`](Self::on_timer) is next due: a request timing out,
    /// a back-off ending, the next search, progress to record. `None` when
    /// the download is not active.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.is_active() {
            return None;
        }
        let search = Some(self.next_search);
        let persist = self
            .dirty
            .then(|| self.last_persist + self.cfg.persist_interval);
        let sched = self.sched.as_ref().and_then(Scheduler::next_deadline);
        [search, persist, sched].into_iter().flatten().min()
    }

    /// Whether chunks were written since progress was last recorded (call
    /// before stopping: then carry out [`Action::Persist`]).
    pub fn needs_persist(&self) -> bool {
        self.dirty && self.state == DownloadState::Downloading && self.sched.is_some()
    }

    /// Looks for sources now: asks for providers and asks every `connected`
    /// peer (up to the probe limit).
    pub fn search<'a>(
        &mut self,
        connected: impl IntoIterator<Item = &'a PeerId>,
        now: Instant,
    ) -> Vec<Action> {
        self.next_search = now + self.cfg.search_interval;
        let mut out = vec![Action::FindProviders];
        for peer in connected {
            out.extend(self.probe(*peer));
        }
        out
    }

    /// Providers found for the file: each is asked.
    pub fn on_providers(&mut self, peers: impl IntoIterator<Item = PeerId>) -> Vec<Action> {
        peers.into_iter().filter_map(|p| self.probe(p)).collect()
    }

    /// A peer connected: it is asked too.
    pub fn on_peer_connected(&mut self, peer: PeerId) -> Vec<Action> {
        self.probe(peer).into_iter().collect()
    }

    /// A peer disconnected: it is no longer a source, and may be asked
    /// again when it comes back.
    pub fn on_peer_disconnected(&mut self, peer: &PeerId) {
        self.probed.remove(peer);
        self.probing.remove(peer);
        self.waiting.retain(|p| p != peer);
        if let Some(s) = self.sched.as_mut() {
            s.remove_source(peer);
        }
    }

    /// Asks `peer` for the manifest (while it is unknown) or for which
    /// chunks it holds, unless it was asked already; while `max_probes`
    /// peers are being asked, it waits its turn.
    fn probe(&mut self, peer: PeerId) -> Option<Action> {
        if peer == self.local || !self.is_active() || self.probed.contains(&peer) {
            return None;
        }
        if self.probing.len() >= self.cfg.max_probes {
            if self.waiting.len() < MAX_WAITING && !self.waiting.contains(&peer) {
                self.waiting.push_back(peer);
            }
            return None;
        }
        self.probed.insert(peer);
        self.probing.insert(peer);
        let file = self.file;
        let (asked, request) = if self.sched.is_some() {
            (Asked::Have, Request::GetHave { file })
        } else {
            (Asked::Manifest, Request::GetManifest { file })
        };
        Some(Action::Send {
            peer,
            asked,
            request,
        })
    }

    /// Peers waiting for a probe slot, asked now that slots are free.
    fn next_probes(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while self.probing.len() < self.cfg.max_probes {
            let Some(peer) = self.waiting.pop_front() else {
                break;
            };
            out.extend(self.probe(peer));
        }
        out
    }

    /// The answer to a request: the response frame, or why the request
    /// failed (the stream broke, the peer went away, nothing came in time).
    pub fn on_response(
        &mut self,
        peer: PeerId,
        asked: Asked,
        result: Result<Vec<u8>, String>,
        now: Instant,
    ) -> Vec<Action> {
        if matches!(asked, Asked::Chunk(_)) {
            return self.on_answer(peer, asked, result, now);
        }
        // A probe's answer (or failure): its slot goes to a waiting peer.
        self.probing.remove(&peer);
        let mut out = self.on_answer(peer, asked, result, now);
        out.extend(self.next_probes());
        out
    }

    fn on_answer(
        &mut self,
        peer: PeerId,
        asked: Asked,
        result: Result<Vec<u8>, String>,
        now: Instant,
    ) -> Vec<Action> {
        if self.state == DownloadState::Complete {
            return Vec::new();
        }
        // A chunk answer is held to the file's chunk size once it is known.
        let limit = match (&self.sched, asked) {
            (Some(s), Asked::Chunk(_)) => max_chunk_response_size(s.manifest().chunk_size()),
            _ => MAX_RESPONSE_SIZE.max(MAX_MANIFEST_SIZE + 1024),
        };
        let decoded = result.and_then(|frame| {
            decode_response_with_limit(&frame, limit).map_err(|e| format!("garbage from peer: {e}"))
        });
        let response = match decoded {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%peer, file = %self.file, "file request failed: {e}");
                match asked {
                    Asked::Chunk(i) => self.chunk_failed(&peer, i, now),
                    // Let a later search ask again.
                    Asked::Manifest | Asked::Have => {
                        self.probed.remove(&peer);
                    }
                }
                return self.pump(now);
            }
        };
        match (asked, response) {
            (Asked::Manifest, Response::Manifest(m)) => return self.on_manifest(peer, m),
            (Asked::Have, Response::Have { bits }) => self.on_have(peer, bits),
            (Asked::Chunk(i), Response::Chunk { index, data }) if index == i => {
                if let Some(write) = self.on_chunk(peer, i, data, now) {
                    // The next requests go out once the node has written it.
                    return write;
                }
            }
            (Asked::Chunk(i), Response::Error { code, message }) => {
                tracing::debug!(%peer, chunk = i, "chunk refused: {message}");
                self.chunk_refused(peer, i, code, now);
            }
            // The wrong chunk or the wrong kind of answer: a fault.
            (Asked::Chunk(i), _) => self.chunk_failed(&peer, i, now),
            (_, Response::Error { .. }) => {}
            _ => tracing::debug!(%peer, file = %self.file, "unexpected file response"),
        }
        self.pump(now)
    }

    fn on_manifest(&mut self, peer: PeerId, m: Manifest) -> Vec<Action> {
        if self.sched.is_some() {
            // Another provider answered first: ask this one for its chunks.
            self.probed.remove(&peer);
            return self.probe(peer).into_iter().collect();
        }
        if m.verify(&self.file).is_err() {
            tracing::warn!(%peer, file = %self.file, "peer sent a manifest that does not match the id");
            return Vec::new();
        }
        vec![Action::Open(m)]
    }

    fn on_have(&mut self, peer: PeerId, bits: Bitfield) {
        if let Some(s) = self.sched.as_mut() {
            s.add_source(peer);
            if let Err(e) = s.source_have(&peer, bits) {
                tracing::debug!(%peer, "bad have report: {e}");
                s.remove_source(&peer);
            }
        }
    }

    /// A chunk as asked: verified by the scheduler; a new one is to be
    /// written (returned), anything else is dropped.
    fn on_chunk(
        &mut self,
        peer: PeerId,
        index: u64,
        data: Vec<u8>,
        now: Instant,
    ) -> Option<Vec<Action>> {
        let sched = self.sched.as_mut()?;
        match sched.on_chunk(&peer, index, &data, now) {
            ChunkOutcome::Accepted { .. } => {
                let offset = sched.manifest().chunk_offset(index).unwrap_or(0);
                self.unwritten += 1;
                Some(vec![Action::Write {
                    index,
                    offset,
                    data,
                }])
            }
            ChunkOutcome::Corrupt { banned } => Some(
                [Action::Corrupt {
                    peer,
                    index,
                    banned,
                }]
                .into_iter()
                .chain(self.pump(now))
                .collect(),
            ),
            _ => None,
        }
    }

    fn chunk_refused(&mut self, peer: PeerId, index: u64, code: ErrorCode, now: Instant) {
        let Some(s) = self.sched.as_mut() else {
            return;
        };
        match code {
            // It has the file, not this chunk: not asked for it again until
            // it reports otherwise.
            ErrorCode::NoSuchChunk => {
                let _ = s.source_lacks(&peer, index, now);
            }
            // It has no (current) copy at all: no longer a source, and may
            // be asked again by a later search.
            ErrorCode::NotFound => {
                s.remove_source(&peer);
                self.probed.remove(&peer);
            }
            _ => s.on_failure(&peer, index, now),
        }
    }

    fn chunk_failed(&mut self, peer: &PeerId, index: u64, now: Instant) {
        if let Some(s) = self.sched.as_mut() {
            s.on_failure(peer, index, now);
        }
    }

    /// The manifest was stored and the partial file prepared; `have` is
    /// what it already holds (after a restart: recorded progress and any
    /// chunk found to verify). Starts fetching chunks: every peer asked
    /// for the manifest is now asked for its chunks. Also used to resume a
    /// download whose manifest was known before a restart.
    pub fn opened(&mut self, manifest: Manifest, have: Bitfield, now: Instant) -> Vec<Action> {
        let sched = match Scheduler::new(manifest, have, self.cfg.scheduler.clone()) {
            Ok(s) => s,
            Err(e) => {
                self.fail(e.to_string());
                return vec![Action::Fail(e.to_string())];
            }
        };
        self.sched = Some(sched);
        self.state = DownloadState::Downloading;
        self.dirty = true;
        // Everyone asked for the manifest is a candidate source.
        let asked_before = std::mem::take(&mut self.probed);
        self.probing.clear();
        let mut out: Vec<Action> = asked_before
            .into_iter()
            .filter_map(|p| self.probe(p))
            .collect();
        out.extend(self.pump(now));
        out
    }

    /// A chunk of `bytes` bytes from [`Action::Write`] is on disk.
    pub fn written(&mut self, bytes: u64, now: Instant) -> Vec<Action> {
        self.unwritten = self.unwritten.saturating_sub(1);
        self.dirty = true;
        self.recent.push_back((now, bytes));
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > RATE_WINDOW)
        {
            self.recent.pop_front();
        }
        self.pump(now)
    }

    /// The progress asked for by [`Action::Persist`] is recorded. (Until
    /// it is, the next attempt comes a persist interval after the last.)
    pub fn persisted(&mut self) {
        self.dirty = false;
    }

    /// The node could not carry out an action (or finish the file): the
    /// download stops until [`retry`](Self::retry).
    pub fn fail(&mut self, reason: impl Into<String>) {
        self.state = DownloadState::Failed;
        self.error = Some(reason.into());
        self.unwritten = 0;
    }

    /// Asked for again after it failed: resume, searching at once.
    pub fn retry(&mut self, now: Instant) {
        if self.state != DownloadState::Failed {
            return;
        }
        self.state = if self.sched.is_some() {
            DownloadState::Downloading
        } else {
            DownloadState::Searching
        };
        self.error = None;
        self.next_search = now;
    }

    /// Timed work due at `now`: requests that timed out are asked again,
    /// a search round when one is due (asking everybody again while there
    /// is no source: providers may have come online), requests the
    /// scheduler now allows, and progress to record.
    pub fn on_timer<'a>(
        &mut self,
        connected: impl IntoIterator<Item = &'a PeerId>,
        now: Instant,
    ) -> Vec<Action> {
        if !self.is_active() {
            return Vec::new();
        }
        if let Some(s) = self.sched.as_mut() {
            // The scheduler reschedules what expired by itself.
            let _ = s.expired(now);
        }
        let mut out = Vec::new();
        if now >= self.next_search {
            if self.sched.as_ref().is_none_or(|s| s.sources().is_empty()) {
                self.probed.clear();
                self.probing.clear();
            }
            out.extend(self.next_probes());
            out.extend(self.search(connected, now));
        }
        out.extend(self.pump(now));
        if self.needs_persist()
            && now.saturating_duration_since(self.last_persist) >= self.cfg.persist_interval
        {
            self.last_persist = now;
            out.push(Action::Persist);
        }
        out
    }

    /// The requests the scheduler wants now, or [`Action::Complete`] once
    /// every chunk is held and written.
    fn pump(&mut self, now: Instant) -> Vec<Action> {
        if self.state != DownloadState::Downloading {
            return Vec::new();
        }
        let Some(sched) = self.sched.as_mut() else {
            return Vec::new();
        };
        if sched.is_complete() {
            if self.unwritten > 0 {
                return Vec::new();
            }
            self.state = DownloadState::Complete;
            return vec![Action::Complete];
        }
        let file = self.file;
        sched
            .next_requests(now)
            .into_iter()
            .map(|(peer, index)| Action::Send {
                peer,
                asked: Asked::Chunk(index),
                request: Request::GetChunk { file, index },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
