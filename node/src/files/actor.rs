//! The files actor's state and its dispatch: what it restores at start,
//! how each input and each tick is handled, what it flushes at stop, and
//! the API's calls (get, status, list; sharing is in `share`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fogmesh_protocols::files::{FileId, FileKey, FileLink, Pacer};
use libp2p::PeerId;
use tokio::sync::mpsc;

use super::download::{MAX_DEFERRED_REQUESTS, Transfer};
use super::gate::ServeGate;
use super::serve::{DeferredUpload, MAX_DEFERRED_UPLOADS};
use super::share::{Share, copy_atomically};
use super::store::{DownloadRecord, FileStore, RecordState};
use super::{ApiCall, FileCommand, FileState, FileStatus, FilesConfig, Input, SourceInfo};
use crate::actor::{Actor, Mailbox, ServiceError};
use crate::metrics::NodeMetrics;

/// How often timed work runs while a transfer is under way (a safety net:
/// the downloads' own deadlines usually come sooner).
const TICK: Duration = Duration::from_millis(100);

/// Peers' requests served per pass before the actor looks at its mailbox
/// again.
const SERVE_BATCH: usize = 64;

/// The receiving side of the serving queue.
pub(crate) struct ServeInbox {
    pub(crate) rx: crate::actor::BoundedReceiver<super::ServeJob>,
    pub(crate) woken: Arc<AtomicBool>,
    pub(crate) queued: Arc<AtomicUsize>,
    pub(crate) gate: ServeGate,
}

/// Every share and download of the node, and the file tables.
pub(crate) struct FilesActor {
    pub(super) local: PeerId,
    pub(super) store: FileStore,
    net: mpsc::Sender<FileCommand>,
    pub(super) metrics: NodeMetrics,
    pub(super) cfg: FilesConfig,
    pub(super) shares: HashMap<FileId, Share>,
    pub(super) downloads: HashMap<FileId, Transfer>,
    /// Chunk responses held back by the upload limit.
    pub(super) uploads: Pacer<DeferredUpload>,
    /// Chunk requests held back by the download limit: file, peer, chunk.
    pub(super) requests: Pacer<(FileId, PeerId, u64)>,
    pub(super) connected: HashSet<PeerId>,
    /// For the hashing threads' results.
    pub(super) self_handle: Mailbox<Input>,
    /// When timed work last ran.
    last_tick: Instant,
    /// Peers' requests, and the serving limits.
    pub(super) serving: ServeInbox,
}

impl FilesActor {
    pub(super) fn new(
        local: PeerId,
        store: FileStore,
        net: mpsc::Sender<FileCommand>,
        metrics: NodeMetrics,
        cfg: FilesConfig,
        self_handle: Mailbox<Input>,
        serving: ServeInbox,
    ) -> Self {
        FilesActor {
            local,
            store,
            net,
            metrics,
            uploads: Pacer::new(
                FilesConfig::bucket(cfg.max_upload_rate),
                MAX_DEFERRED_UPLOADS,
            ),
            requests: Pacer::new(
                FilesConfig::bucket(cfg.max_download_rate),
                MAX_DEFERRED_REQUESTS,
            ),
            cfg,
            shares: HashMap::new(),
            downloads: HashMap::new(),
            connected: HashSet::new(),
            self_handle,
            last_tick: Instant::now(),
            serving,
        }
    }

    pub(super) fn net_send(&self, cmd: FileCommand) {
        if self.net.blocking_send(cmd).is_err() {
            tracing::debug!("swarm loop gone; dropping a file command");
        }
    }

    fn on_api(&mut self, call: ApiCall, now: Instant) {
        match call {
            ApiCall::Share {
                path,
                encrypt,
                reply,
            } => self.share(path, encrypt, reply),
            ApiCall::Get {
                file,
                output,
                link,
                reply,
            } => {
                let _ = reply.send(self.get(file, output, link, now));
            }
            ApiCall::Status { file, reply } => {
                let r = self
                    .status(&file, now)
                    .ok_or_else(|| ServiceError::NotFound(format!("no file {file} on this node")));
                let _ = reply.send(r);
            }
            ApiCall::List { reply } => {
                let mut ids: Vec<FileId> = self
                    .shares
                    .keys()
                    .chain(self.downloads.keys())
                    .copied()
                    .collect();
                ids.sort();
                ids.dedup();
                let list = ids.iter().filter_map(|id| self.status(id, now)).collect();
                let _ = reply.send(Ok(list));
            }
            ApiCall::Cancel { file, reply } => {
                let _ = reply.send(self.cancel(file, now));
            }
        }
    }

    fn get(
        &mut self,
        id: FileId,
        output: PathBuf,
        link: Option<FileLink>,
        now: Instant,
    ) -> Result<FileStatus, ServiceError> {
        if let Some(t) = self.downloads.get_mut(&id) {
            // Asked again with a link: its key from now on (a download
            // that failed on a wrong key decrypts again with this one).
            if let Some(l) = link
                && l.key != t.key
                && t.machine.state() != fogmesh_protocols::files::DownloadState::Complete
            {
                let rec = DownloadRecord {
                    output: t.output.display().to_string(),
                    state: RecordState::Downloading,
                    error: None,
                    key: l.key.as_ref().map(|k| hex::encode(k.to_bytes())),
                };
                self.store.put_download(&id, &rec)?;
                t.key = l.key;
            }
            // Asked again: a failed download tries again.
            t.machine.retry(now);
            return self
                .status(&id, now)
                .ok_or_else(|| ServiceError::Internal("download vanished".into()));
        }
        if let Some(share) = self.shares.get(&id).filter(|s| !s.stale) {
            // Already here: copy it out rather than fetch it.
            if share.path != output {
                copy_atomically(&share.path, &output).map_err(|e| {
                    ServiceError::BadRequest(format!("cannot write {}: {e}", output.display()))
                })?;
            }
            let mut st = self
                .status(&id, now)
                .ok_or_else(|| ServiceError::Internal("share vanished".into()))?;
            st.state = FileState::Complete;
            st.path = Some(output.display().to_string());
            return Ok(st);
        }
        if !output.parent().is_some_and(|p| p.is_dir()) {
            return Err(ServiceError::BadRequest(format!(
                "directory of {} does not exist",
                output.display()
            )));
        }
        let out_str = output
            .to_str()
            .ok_or_else(|| ServiceError::BadRequest("output path is not valid UTF-8".into()))?
            .to_owned();
        let key = match link {
            Some(l) => l.key,
            None => self.received_key(&id)?,
        };
        self.store.put_download(
            &id,
            &DownloadRecord {
                output: out_str,
                state: RecordState::Downloading,
                error: None,
                key: key.as_ref().map(|k| hex::encode(k.to_bytes())),
            },
        )?;
        let mut t = Transfer::new(id, output, self.download_config(), self.local, now);
        t.key = key;
        tracing::info!(file = %id, encrypted = t.key.is_some(), "download started");
        let actions = t.machine.search(&self.connected, now);
        self.downloads.insert(id, t);
        self.apply(id, actions, now);
        self.status(&id, now)
            .ok_or_else(|| ServiceError::Internal("download vanished".into()))
    }

    /// Forgets a download (removing its partial file and its records) or a
    /// share (withdrawing its provider record; the file stays).
    fn cancel(&mut self, id: FileId, now: Instant) -> Result<FileStatus, ServiceError> {
        let status = self
            .status(&id, now)
            .ok_or_else(|| ServiceError::NotFound(format!("no file {id} on this node")))?;
        // Records first: a crash after this leaves at most a stray file.
        self.store.forget(&id)?;
        if let Some(mut t) = self.downloads.remove(&id) {
            t.file = None;
            self.requests.retain(|(f, _, _)| *f != id);
            if t.machine.state() != fogmesh_protocols::files::DownloadState::Complete {
                let mut dec = t.output.clone().into_os_string();
                dec.push(".fogmesh-dec");
                for p in [t.part.clone(), PathBuf::from(dec)] {
                    if let Err(e) = std::fs::remove_file(&p)
                        && e.kind() != std::io::ErrorKind::NotFound
                    {
                        tracing::warn!("cannot remove {}: {e}", p.display());
                    }
                }
            }
        }
        if self.shares.remove(&id).is_some() {
            self.net_send(FileCommand::StopProviding(id));
        }
        tracing::info!(file = %id, "cancelled");
        Ok(status)
    }

    /// The key to decrypt `id` with when it is fetched by id alone: the one
    /// key received in group links to it, none when there is none; several
    /// different keys (a member may post a link with someone else's file
    /// id and a key of its own) need the link to choose.
    fn received_key(&self, id: &FileId) -> Result<Option<FileKey>, ServiceError> {
        let received = self.store.link_keys(id)?;
        let mut keys: Vec<&FileKey> = received.iter().map(|r| &r.key).collect();
        keys.sort_by_key(|k| k.to_bytes());
        keys.dedup();
        match keys.as_slice() {
            [] => Ok(None),
            [k] => Ok(Some((*k).clone())),
            _ => {
                let senders: Vec<&str> = received.iter().map(|r| r.sender.as_str()).collect();
                Err(ServiceError::BadRequest(format!(
                    "links with different keys to file {id} were posted (by {}): fetch it with the link of the message you mean (fogmesh file get 'fogmesh-file:...')",
                    senders.join(", ")
                )))
            }
        }
    }

    pub(super) fn status(&self, id: &FileId, now: Instant) -> Option<FileStatus> {
        if let Some(t) = self.downloads.get(id) {
            return Some(download_status(id, t, now));
        }
        let share = self.shares.get(id)?;
        let m = &share.manifest;
        Some(FileStatus {
            file_id: id.to_hex(),
            name: m.name().map(str::to_owned),
            state: if share.stale {
                FileState::Stale
            } else {
                FileState::Sharing
            },
            path: Some(share.path.display().to_string()),
            bytes_total: m.size(),
            bytes_have: m.size(),
            chunks_total: m.chunk_count(),
            chunks_have: m.chunk_count(),
            sources: 0,
            source_stats: Vec::new(),
            rate_bps: 0,
            error: share
                .stale
                .then(|| "the file changed on disk since it was shared".to_owned()),
            link: None,
        })
    }

    /// Serves peers' requests from the serving queue, a batch at a time;
    /// wakes itself again for the rest, behind what its mailbox holds.
    fn serve_queued(&mut self, now: Instant) {
        for _ in 0..SERVE_BATCH {
            let Ok(job) = self.serving.rx.try_recv() else {
                return;
            };
            self.serving.queued.fetch_sub(1, Ordering::SeqCst);
            self.on_request(job, now);
        }
        if self.serving.queued.load(Ordering::SeqCst) > 0
            && !self.serving.woken.swap(true, Ordering::SeqCst)
            && self.self_handle.offer(Input::Serve).is_err()
        {
            self.serving.woken.store(false, Ordering::SeqCst);
        }
    }

    fn on_peer_connected(&mut self, peer: PeerId, now: Instant) {
        self.connected.insert(peer);
        let ids: Vec<FileId> = self.downloads.keys().copied().collect();
        for id in ids {
            if let Some(t) = self.downloads.get_mut(&id) {
                let actions = t.machine.on_peer_connected(peer);
                self.apply(id, actions, now);
            }
        }
    }

    fn on_peer_disconnected(&mut self, peer: PeerId) {
        self.connected.remove(&peer);
        // Answers waiting for the upload limit would go nowhere and spend
        // the limit for others.
        self.uploads.retain(|u| u.peer != peer);
        for t in self.downloads.values_mut() {
            t.machine.on_peer_disconnected(&peer);
        }
    }
}

impl Actor for FilesActor {
    type Input = Input;

    fn start(&mut self, now: Instant) {
        self.last_tick = now;
        if let Err(e) = self.restore(now) {
            tracing::error!("cannot restore shares and downloads: {e}");
        }
    }

    fn on_input(&mut self, input: Input, now: Instant) {
        match input {
            Input::Api(call) => self.on_api(call, now),
            Input::Serve => {
                self.serving.woken.store(false, Ordering::SeqCst);
                self.serve_queued(now);
            }
            Input::Response {
                peer,
                file,
                asked,
                result,
            } => {
                if let Some(t) = self.downloads.get_mut(&file) {
                    let actions = t.machine.on_response(peer, asked, result, now);
                    self.apply(file, actions, now);
                }
            }
            Input::Providers { file, peers } => {
                if let Some(t) = self.downloads.get_mut(&file) {
                    let actions = t.machine.on_providers(peers);
                    self.apply(file, actions, now);
                }
            }
            Input::Hashed {
                path,
                key,
                result,
                reply,
            } => {
                let _ = reply.send(self.finish_share(path, key, result, now));
            }
            Input::PeerConnected(p) => self.on_peer_connected(p, now),
            Input::PeerDisconnected(p) => self.on_peer_disconnected(p),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        // Idle (nothing to download, nothing held back): nothing is due; an
        // input wakes the actor anyway.
        let active = self.downloads.values().any(|t| t.machine.is_active())
            || self.serving.queued.load(Ordering::SeqCst) > 0;
        if !active && self.uploads.is_empty() && self.requests.is_empty() {
            return None;
        }
        let own = self
            .downloads
            .values()
            .filter_map(|t| t.machine.next_deadline());
        Some(own.fold(self.last_tick + TICK, Instant::min))
    }

    fn on_deadline(&mut self, now: Instant) {
        self.last_tick = now;
        self.serve_queued(now);
        self.send_uploads(now);
        self.send_requests(now);
        let ids: Vec<FileId> = self.downloads.keys().copied().collect();
        for id in ids {
            if let Some(t) = self.downloads.get_mut(&id) {
                let actions = t.machine.on_timer(&self.connected, now);
                self.apply(id, actions, now);
            }
        }
    }

    fn stop(&mut self, _now: Instant) {
        // Commit what is held before stopping.
        let ids: Vec<FileId> = self.downloads.keys().copied().collect();
        for id in ids {
            if self
                .downloads
                .get(&id)
                .is_some_and(|t| t.machine.needs_persist())
            {
                self.persist(id);
            }
        }
        tracing::debug!("files actor stopped");
    }
}

/// A download's status, from its state machine and where it goes.
fn download_status(id: &FileId, t: &Transfer, now: Instant) -> FileStatus {
    use fogmesh_protocols::files::{DownloadState, Manifest};
    let dl = &t.machine;
    let manifest = dl.manifest();
    let progress = dl.progress();
    let sources = dl.sources();
    let complete = dl.state() == DownloadState::Complete;
    // Without a scheduler's progress, a complete file is all there.
    let whole = |of: fn(&Manifest) -> u64| {
        if complete { manifest.map_or(0, of) } else { 0 }
    };
    FileStatus {
        file_id: id.to_hex(),
        name: manifest.and_then(|m| m.name().map(str::to_owned)),
        state: match dl.state() {
            DownloadState::Searching => FileState::Searching,
            DownloadState::Downloading => FileState::Downloading,
            DownloadState::Complete => FileState::Complete,
            DownloadState::Failed => FileState::Failed,
        },
        path: Some(t.output.display().to_string()),
        bytes_total: manifest.map_or(0, Manifest::size),
        bytes_have: progress.map_or_else(|| whole(Manifest::size), |p| p.bytes_have),
        chunks_total: manifest.map_or(0, Manifest::chunk_count),
        chunks_have: progress.map_or_else(|| whole(Manifest::chunk_count), |p| p.chunks_have),
        sources: sources.len(),
        source_stats: sources
            .iter()
            .map(|s| SourceInfo {
                peer_id: s.peer.to_base58(),
                rate_bps: s.rate_bps,
                chunks_received: s.chunks_received,
                strikes: s.strikes,
            })
            .collect(),
        rate_bps: dl.rate_bps(now),
        error: dl.error().map(str::to_owned),
        link: None,
    }
}
