//! File sharing in the node: the files actor.
//!
//! The transfer logic is the sans-IO core in `fogmesh_protocols::files`
//! (manifests, the multi-source scheduler, the wire format, rate limits);
//! this module gives it a disk and a network. One actor thread owns every
//! share and download and the file tables of the database; it reads and
//! writes chunks with positioned I/O (`pread`/`pwrite`), so memory does not
//! grow with file size. It talks to the swarm loop with [`FileCommand`]s
//! (requests, responses, provider records and lookups) and gets back
//! [`Input`]s. Hashing a file to share it runs on a thread of its own, so a
//! large share does not stall transfers.
//!
//! Sources of a download: providers found through Kademlia (one provider
//! record per file) and every connected peer, asked which chunks it holds.
//! A downloader serves the chunks it already has, so partial holders help.
//!
//! Durability: the partial file is written in place (`<output>.fogmesh-part`)
//! and renamed over the output once complete and synced. Which chunks are
//! held is committed to redb at most every second; at restart, chunks of
//! the partial file not marked held are hashed and kept when they verify,
//! so after `kill -9` only requests in flight are sent again.

pub(crate) mod store;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use fogmesh_protocols::files::wire::{
    ErrorCode, MAX_RESPONSE_SIZE, Request, Response, decode_request, decode_response_with_limit,
    encode_request, encode_response, max_chunk_response_size,
};
use fogmesh_protocols::files::{
    Bitfield, ChunkOutcome, FileId, FileKey, FileLink, MAX_MANIFEST_SIZE, Manifest,
    ManifestBuilder, Scheduler, SchedulerConfig, TokenBucket, chunk_size_for,
};
use libp2p::PeerId;
use libp2p::request_response::ResponseChannel;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::actor::{Mailbox, Reply, ServiceError};
use crate::behaviour::FileFrame;
use crate::metrics::NodeMetrics;
use crate::storage::{Store, StoreError};
use store::{DownloadRecord, FileStore, Stamp};

/// Inputs waiting for the actor.
const INPUT_QUEUE: usize = 8192;
/// Responses held back by the upload rate limit; beyond that, `Busy`.
const MAX_DEFERRED_UPLOADS: usize = 1024;
/// Peers asked at once whether they hold a file.
const MAX_PROBES: usize = 32;
/// How long the actor sleeps when nothing is due.
const TICK: Duration = Duration::from_millis(100);
/// How long it sleeps when it has no transfer at all.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// Suffix of partial files, next to the output.
pub const PART_SUFFIX: &str = ".fogmesh-part";

/// A call from the API.
#[derive(Debug)]
pub enum ApiCall {
    /// Share the file at this absolute path; with `true`, encrypted under a
    /// new key (for a group: the status then carries the link with the key).
    Share(PathBuf, bool, Reply<FileStatus>),
    /// Start (or continue) downloading a file to this absolute path.
    Get(String, PathBuf, Reply<FileStatus>),
    /// One file's status.
    Status(String, Reply<FileStatus>),
    /// Every share and download.
    List(Reply<Vec<FileStatus>>),
}

/// A share or download, as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileStatus {
    /// The file id (hex).
    pub file_id: String,
    /// The manifest's name, if any.
    pub name: Option<String>,
    /// `sharing`, `searching` (no manifest yet), `downloading`, `complete`
    /// or `failed`.
    pub state: String,
    /// Where the file is (shares) or goes (downloads).
    pub path: Option<String>,
    /// The size, once the manifest is known.
    pub bytes_total: u64,
    /// Bytes held.
    pub bytes_have: u64,
    /// Chunks in the file.
    pub chunks_total: u64,
    /// Chunks held.
    pub chunks_have: u64,
    /// Sources in use.
    pub sources: usize,
    /// Per source: peer, rate, chunks received, corrupt chunks.
    pub source_stats: Vec<SourceInfo>,
    /// Current aggregate download rate, bytes per second.
    pub rate_bps: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// The file's link (`fogmesh-file:<id>[#<key>]`), in the answer to a
    /// share only: for an encrypted file it holds the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// One source of a download.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceInfo {
    /// The peer.
    pub peer_id: String,
    /// Its measured rate, bytes per second.
    pub rate_bps: u64,
    /// Verified chunks received from it.
    pub chunks_received: u64,
    /// Corrupt chunks received from it.
    pub strikes: u32,
}

/// What a request to a peer was for (kept by the swarm loop with the
/// request id, handed back with the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)] // Transitional: crate-private again once the handle is a newtype.
pub enum Asked {
    Manifest,
    Have,
    Chunk(u64),
}

impl From<ApiCall> for Input {
    fn from(call: ApiCall) -> Self {
        Input::Api(call)
    }
}

/// An input of the actor.
#[derive(Debug)]
#[allow(missing_docs)] // Transitional: crate-private again once the handle is a newtype.
pub enum Input {
    Api(ApiCall),
    Request {
        peer: PeerId,
        frame: Vec<u8>,
        channel: ResponseChannel<FileFrame>,
    },
    Response {
        peer: PeerId,
        file: FileId,
        asked: Asked,
        result: Result<Vec<u8>, String>,
    },
    Providers {
        file: FileId,
        peers: Vec<PeerId>,
    },
    Hashed {
        path: PathBuf,
        key: Option<FileKey>,
        result: Result<(Manifest, Stamp), String>,
        reply: Reply<FileStatus>,
    },
    PeerConnected(PeerId),
    PeerDisconnected(PeerId),
}

/// What the actor asks of the swarm.
#[derive(Debug)]
#[allow(missing_docs)] // Transitional: crate-private again once the handle is a newtype.
pub enum FileCommand {
    Request {
        peer: PeerId,
        file: FileId,
        asked: Asked,
        frame: Vec<u8>,
    },
    Respond {
        channel: ResponseChannel<FileFrame>,
        frame: Vec<u8>,
    },
    StartProviding(FileId),
    StopProviding(FileId),
    FindProviders(FileId),
}

/// The API's and the event loop's handle on the actor.
pub type FilesHandle = Mailbox<Input>;

/// Settings of the actor.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// Upload limit, bytes per second, over all peers.
    pub max_upload_rate: Option<u64>,
    /// Download limit, bytes per second, over all downloads.
    pub max_download_rate: Option<u64>,
    /// How often a download looks for more sources.
    pub search_interval: Duration,
    /// How often held chunks are committed.
    pub persist_interval: Duration,
    /// The scheduler's settings (timeouts, windows).
    pub scheduler: SchedulerConfig,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            max_upload_rate: None,
            max_download_rate: None,
            search_interval: Duration::from_secs(3),
            persist_interval: Duration::from_secs(1),
            scheduler: SchedulerConfig::default(),
        }
    }
}

impl FilesConfig {
    /// Stretches the scheduler's timeouts to a BLE link: a first window of
    /// chunks must cross one link within the initial timeout.
    pub fn scaled_for_ble(self, link: fogmesh_ble::LinkLimits) -> Self {
        let s = &self.scheduler;
        let window = u64::from(chunk_size_for(0)) * s.initial_window as u64;
        let initial = s.initial_timeout.max(link.timeout_for(window));
        let min = s.min_timeout.max(link.timeout_for(0) * 3);
        let max = s.max_timeout.max(initial * 2);
        FilesConfig {
            scheduler: s.clone().with_timeouts(min, initial, max),
            ..self
        }
    }
}

/// Starts the actor thread.
pub(crate) fn start(
    local: PeerId,
    store: Store,
    net: mpsc::Sender<FileCommand>,
    metrics: NodeMetrics,
    cfg: FilesConfig,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(FilesHandle, std::thread::JoinHandle<()>), StoreError> {
    let store = FileStore::open(store)?;
    let (tx, rx) = std_mpsc::sync_channel(INPUT_QUEUE);
    let handle = Mailbox::from_sender(tx);
    let bucket = |rate: Option<u64>| {
        // A burst of a quarter second keeps the limit smooth; one default
        // chunk at least, so a slow limit does not split every chunk's
        // wait. (A larger chunk waits for a full bucket and goes into debt,
        // so the long-run rate holds either way.)
        rate.map(|r| {
            TokenBucket::new(
                r,
                (r / 4).max(u64::from(fogmesh_protocols::files::CHUNK_SIZE)),
            )
        })
    };
    let mut actor = Actor {
        local,
        store,
        net,
        metrics,
        upload_bucket: bucket(cfg.max_upload_rate),
        download_bucket: bucket(cfg.max_download_rate),
        cfg,
        shares: HashMap::new(),
        downloads: HashMap::new(),
        deferred_uploads: VecDeque::new(),
        deferred_requests: VecDeque::new(),
        connected: HashSet::new(),
        self_handle: handle.clone(),
        shutdown,
    };
    let thread = std::thread::Builder::new()
        .name("fogmesh-files".into())
        .spawn(move || {
            if let Err(e) = actor.load() {
                tracing::error!("cannot restore shares and downloads: {e}");
            }
            actor.run(rx);
        })
        .map_err(|e| StoreError::Db(format!("cannot start the files thread: {e}")))?;
    Ok((handle, thread))
}

struct Share {
    path: PathBuf,
    /// For a group file: the plaintext is on disk, chunks are encrypted
    /// with this key when served.
    key: Option<FileKey>,
    manifest: Manifest,
    file: Option<File>,
    /// Size and modification time when hashed: a file whose stamp differs
    /// has changed and is no longer served.
    stamp: Option<Stamp>,
    /// The file changed on disk since it was shared: no longer served.
    stale: bool,
}

struct Download {
    /// For a group file: decrypt with this key once complete.
    key: Option<FileKey>,
    output: PathBuf,
    part: PathBuf,
    manifest: Option<Manifest>,
    file: Option<File>,
    sched: Option<Scheduler>,
    state: DlState,
    /// Peers asked (or being asked) for the manifest or their chunks.
    probed: HashSet<PeerId>,
    last_search: Option<Instant>,
    last_persist: Instant,
    dirty: bool,
    /// Recent bytes received, for the rate shown to users.
    window: VecDeque<(Instant, u64)>,
    /// Callers of `Get` waiting for the manifest (answered with status).
    error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DlState {
    Searching,
    Downloading,
    Complete,
    Failed,
}

struct Actor {
    local: PeerId,
    store: FileStore,
    net: mpsc::Sender<FileCommand>,
    metrics: NodeMetrics,
    cfg: FilesConfig,
    upload_bucket: Option<TokenBucket>,
    download_bucket: Option<TokenBucket>,
    shares: HashMap<FileId, Share>,
    downloads: HashMap<FileId, Download>,
    /// Chunk responses held back by the upload limit: requester, channel,
    /// frame, chunk bytes.
    deferred_uploads: VecDeque<(PeerId, ResponseChannel<FileFrame>, Vec<u8>, u64)>,
    deferred_requests: VecDeque<(FileId, PeerId, u64)>,
    connected: HashSet<PeerId>,
    self_handle: FilesHandle,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Actor {
    fn net_send(&self, cmd: FileCommand) {
        if self.net.blocking_send(cmd).is_err() {
            tracing::debug!("swarm loop gone; dropping a file command");
        }
    }

    fn load(&mut self) -> Result<(), StoreError> {
        for (id, path, stamp) in self.store.shares()? {
            let Some(manifest) = self.store.manifest(&id)? else {
                continue;
            };
            let key = self.store.key(&id)?;
            self.shares.insert(
                id,
                Share {
                    path: PathBuf::from(path),
                    key,
                    manifest,
                    file: None,
                    stamp,
                    stale: false,
                },
            );
            self.net_send(FileCommand::StartProviding(id));
        }
        for (id, rec) in self.store.downloads()? {
            if rec.state != "downloading" {
                continue;
            }
            let output = PathBuf::from(&rec.output);
            let mut dl = Download::new(output);
            dl.key = self.store.key(&id)?;
            if let Some(m) = self.store.manifest(&id)? {
                let have = self.store.have(&id)?;
                if let Err(e) = self.open_download(&mut dl, m, have) {
                    dl.fail(e);
                }
            }
            tracing::info!(file = %id, "resuming download");
            self.downloads.insert(id, dl);
        }
        Ok(())
    }

    fn run(&mut self, rx: std_mpsc::Receiver<Input>) {
        while !self.shutdown.is_cancelled() {
            let wait = self.next_wake().saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(input) => {
                    self.on_input(input);
                    // Drain what is queued before doing timed work, so a
                    // burst of responses is handled in one pass.
                    while let Ok(input) = rx.try_recv() {
                        self.on_input(input);
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
            self.on_timers();
        }
        // Commit what is held before stopping.
        let ids: Vec<FileId> = self.downloads.keys().copied().collect();
        for id in ids {
            self.persist(&id, true);
        }
        tracing::debug!("files actor stopped");
    }

    fn next_wake(&self) -> Instant {
        // Idle (nothing to download, nothing held back): sleep longer; an
        // input wakes the actor anyway.
        if self
            .downloads
            .values()
            .all(|d| !matches!(d.state, DlState::Searching | DlState::Downloading))
            && self.deferred_uploads.is_empty()
            && self.deferred_requests.is_empty()
        {
            return Instant::now() + IDLE_TICK;
        }
        let mut next = Instant::now() + TICK;
        for dl in self.downloads.values() {
            if let Some(d) = dl.sched.as_ref().and_then(Scheduler::next_deadline) {
                next = next.min(d);
            }
        }
        next
    }

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Api(call) => self.on_api(call),
            Input::Request {
                peer,
                frame,
                channel,
            } => self.on_request(peer, &frame, channel),
            Input::Response {
                peer,
                file,
                asked,
                result,
            } => self.on_response(peer, file, asked, result),
            Input::Providers { file, peers } => {
                for p in peers {
                    self.probe(file, p);
                }
            }
            Input::Hashed {
                path,
                key,
                result,
                reply,
            } => {
                let _ = reply.send(self.finish_share(path, key, result));
            }
            Input::PeerConnected(p) => {
                self.connected.insert(p);
                let wanted: Vec<FileId> = self
                    .downloads
                    .iter()
                    .filter(|(_, d)| matches!(d.state, DlState::Searching | DlState::Downloading))
                    .map(|(id, _)| *id)
                    .collect();
                for id in wanted {
                    self.probe(id, p);
                }
            }
            Input::PeerDisconnected(p) => {
                self.connected.remove(&p);
                // Answers waiting for the upload limit would go nowhere and
                // spend the limit for others.
                self.deferred_uploads.retain(|(peer, ..)| *peer != p);
                for dl in self.downloads.values_mut() {
                    dl.probed.remove(&p);
                    if let Some(s) = dl.sched.as_mut() {
                        s.remove_source(&p);
                    }
                }
            }
        }
    }

    // ---- API ----

    fn on_api(&mut self, call: ApiCall) {
        match call {
            ApiCall::Share(path, encrypt, reply) => self.share(path, encrypt, reply),
            ApiCall::Get(id, output, reply) => {
                let _ = reply.send(self.get(&id, output));
            }
            ApiCall::Status(id, reply) => {
                let r = parse_id(&id).and_then(|id| {
                    self.status(&id)
                        .ok_or_else(|| ServiceError::NotFound(format!("no file {id} on this node")))
                });
                let _ = reply.send(r);
            }
            ApiCall::List(reply) => {
                let mut ids: Vec<FileId> = self
                    .shares
                    .keys()
                    .chain(self.downloads.keys())
                    .copied()
                    .collect();
                ids.sort();
                ids.dedup();
                let list = ids.iter().filter_map(|id| self.status(id)).collect();
                let _ = reply.send(Ok(list));
            }
        }
    }

    fn share(&mut self, path: PathBuf, encrypt: bool, reply: Reply<FileStatus>) {
        let key = encrypt.then(|| FileKey::generate(&mut rand::rng()));
        // Hashing a large file takes seconds: do it off the actor thread.
        let handle = self.self_handle.clone();
        let spawned = std::thread::Builder::new()
            .name("fogmesh-hash".into())
            .spawn(move || {
                let result = hash_file(&path, key.as_ref());
                let _ = handle.send_blocking(Input::Hashed {
                    path,
                    key,
                    result,
                    reply,
                });
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start a hashing thread: {e}");
        }
    }

    fn finish_share(
        &mut self,
        path: PathBuf,
        key: Option<FileKey>,
        result: Result<(Manifest, Stamp), String>,
    ) -> Result<FileStatus, ServiceError> {
        let (manifest, stamp) = result.map_err(ServiceError::BadRequest)?;
        let id = manifest.id();
        let path_str = path
            .to_str()
            .ok_or_else(|| {
                ServiceError::BadRequest(format!("{} is not valid UTF-8", path.display()))
            })?
            .to_owned();
        self.store.put_manifest(&manifest)?;
        if let Some(k) = &key {
            self.store.put_key(&id, k)?;
        }
        self.store.put_share(&id, &path_str, Some(stamp))?;
        let link = FileLink {
            id,
            key: key.clone(),
        }
        .to_string();
        self.shares.insert(
            id,
            Share {
                path,
                key,
                manifest,
                file: None,
                stamp: Some(stamp),
                stale: false,
            },
        );
        self.net_send(FileCommand::StartProviding(id));
        tracing::info!(file = %id, path = %path_str, "sharing");
        let mut st = self
            .status(&id)
            .ok_or_else(|| ServiceError::Internal("share vanished".into()))?;
        st.link = Some(link);
        Ok(st)
    }

    fn get(&mut self, id: &str, output: PathBuf) -> Result<FileStatus, ServiceError> {
        let id = parse_id(id)?;
        if let Some(dl) = self.downloads.get_mut(&id) {
            if dl.state == DlState::Failed {
                // Asked again: try again.
                dl.state = if dl.sched.is_some() {
                    DlState::Downloading
                } else {
                    DlState::Searching
                };
                dl.error = None;
                dl.last_search = None;
            }
            return self
                .status(&id)
                .ok_or_else(|| ServiceError::Internal("download vanished".into()));
        }
        if self.shares.contains_key(&id) && !self.shares[&id].stale {
            // Already here: copy it out rather than fetch it.
            let src = self.shares[&id].path.clone();
            if src != output {
                copy_atomically(&src, &output).map_err(|e| {
                    ServiceError::BadRequest(format!("cannot write {}: {e}", output.display()))
                })?;
            }
            let mut st = self
                .status(&id)
                .ok_or_else(|| ServiceError::Internal("share vanished".into()))?;
            st.state = "complete".into();
            st.path = Some(output.display().to_string());
            return Ok(st);
        }
        let parent = output.parent().filter(|p| p.is_dir()).ok_or_else(|| {
            ServiceError::BadRequest(format!("directory of {} does not exist", output.display()))
        })?;
        let _ = parent;
        let out_str = output
            .to_str()
            .ok_or_else(|| ServiceError::BadRequest("output path is not valid UTF-8".into()))?
            .to_owned();
        self.store.put_download(
            &id,
            &DownloadRecord {
                output: out_str,
                state: "downloading".into(),
                error: None,
            },
        )?;
        let mut dl = Download::new(output);
        dl.key = self.store.key(&id)?;
        self.downloads.insert(id, dl);
        tracing::info!(file = %id, encrypted = self.downloads[&id].key.is_some(), "download started");
        self.search(id);
        self.status(&id)
            .ok_or_else(|| ServiceError::Internal("download vanished".into()))
    }

    fn status(&self, id: &FileId) -> Option<FileStatus> {
        if let Some(dl) = self.downloads.get(id) {
            let (manifest, progress, sources) = match &dl.sched {
                Some(s) => (Some(s.manifest()), Some(s.progress()), s.sources()),
                None => (dl.manifest.as_ref(), None, Vec::new()),
            };
            let now = Instant::now();
            let recent: u64 = dl
                .window
                .iter()
                .filter(|(t, _)| now.duration_since(*t) <= Duration::from_secs(2))
                .map(|(_, n)| n)
                .sum();
            return Some(FileStatus {
                file_id: id.to_hex(),
                name: manifest.and_then(|m| m.name().map(str::to_owned)),
                state: match dl.state {
                    DlState::Searching => "searching",
                    DlState::Downloading => "downloading",
                    DlState::Complete => "complete",
                    DlState::Failed => "failed",
                }
                .into(),
                path: Some(dl.output.display().to_string()),
                bytes_total: manifest.map_or(0, Manifest::size),
                bytes_have: progress.map_or(
                    if dl.state == DlState::Complete {
                        manifest.map_or(0, Manifest::size)
                    } else {
                        0
                    },
                    |p| p.bytes_have,
                ),
                chunks_total: manifest.map_or(0, Manifest::chunk_count),
                chunks_have: progress.map_or(
                    if dl.state == DlState::Complete {
                        manifest.map_or(0, Manifest::chunk_count)
                    } else {
                        0
                    },
                    |p| p.chunks_have,
                ),
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
                rate_bps: recent / 2,
                error: dl.error.clone(),
                link: None,
            });
        }
        let share = self.shares.get(id)?;
        let m = &share.manifest;
        Some(FileStatus {
            file_id: id.to_hex(),
            name: m.name().map(str::to_owned),
            state: if share.stale { "stale" } else { "sharing" }.into(),
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

    // ---- serving ----

    fn on_request(&mut self, peer: PeerId, frame: &[u8], channel: ResponseChannel<FileFrame>) {
        let resp = match decode_request(frame) {
            Ok(req) => self.serve(&req),
            Err(e) => {
                tracing::debug!(%peer, "bad file request: {e}");
                Response::error(ErrorCode::Internal, format!("malformed request: {e}"))
            }
        };
        let len = match &resp {
            Response::Chunk { data, .. } => data.len() as u64,
            _ => 0,
        };
        let frame = encode_response(&resp);
        if len > 0
            && let Some(bucket) = self.upload_bucket.as_mut()
            && (!self.deferred_uploads.is_empty() || bucket.try_take(len, Instant::now()).is_err())
        {
            if self.deferred_uploads.len() >= MAX_DEFERRED_UPLOADS {
                let busy = encode_response(&Response::error(ErrorCode::Busy, "upload queue full"));
                self.net_send(FileCommand::Respond {
                    channel,
                    frame: busy,
                });
            } else {
                self.deferred_uploads.push_back((peer, channel, frame, len));
            }
            return;
        }
        self.metrics.file_bytes_uploaded.inc_by(len);
        self.net_send(FileCommand::Respond { channel, frame });
    }

    fn serve(&mut self, req: &Request) -> Response {
        let id = *req.file();
        match req {
            Request::GetManifest { .. } => match self.manifest_of(&id) {
                Some(m) => Response::Manifest(m.clone()),
                None => Response::error(ErrorCode::NotFound, "no such file here"),
            },
            Request::GetHave { .. } => {
                if let Some(s) = self.shares.get(&id).filter(|s| !s.stale) {
                    return Response::Have {
                        bits: Bitfield::full(s.manifest.chunk_count()),
                    };
                }
                match self.downloads.get(&id).and_then(|d| d.sched.as_ref()) {
                    Some(s) => Response::Have {
                        bits: s.have().clone(),
                    },
                    None => Response::error(ErrorCode::NotFound, "no such file here"),
                }
            }
            Request::GetChunk { index, .. } => self.read_chunk(&id, *index),
            _ => Response::error(ErrorCode::Internal, "unsupported request"),
        }
    }

    fn manifest_of(&self, id: &FileId) -> Option<&Manifest> {
        if let Some(s) = self.shares.get(id).filter(|s| !s.stale) {
            return Some(&s.manifest);
        }
        self.downloads
            .get(id)
            .and_then(|d| d.sched.as_ref())
            .map(Scheduler::manifest)
    }

    fn read_chunk(&mut self, id: &FileId, index: u64) -> Response {
        // A complete share first, then a download's chunks held so far.
        if let Some(share) = self.shares.get_mut(id).filter(|s| !s.stale) {
            let Some(len) = share.manifest.chunk_len(index) else {
                return Response::error(
                    ErrorCode::NoSuchChunk,
                    format!("chunk {index} is past the end"),
                );
            };
            let offset = share.manifest.chunk_offset(index).unwrap_or(0);
            if share.file.is_none() {
                share.file = File::open(&share.path).ok();
            }
            let mut buf = vec![0u8; len as usize];
            // Serve only while the file is the one hashed: a file changed
            // after sharing must not reach anybody as this file. Receivers
            // verify every chunk anyway; this check (an fstat of the open
            // file, not a hash, which would cost an eighth of the
            // throughput) keeps an honest sharer from being banned for it.
            let ok = share.file.as_ref().is_some_and(|f| {
                share
                    .stamp
                    .is_none_or(|st| stamp_of(f).is_some_and(|now| now == st))
                    && f.read_exact_at(&mut buf, offset).is_ok()
            });
            if let Some(k) = &share.key {
                k.apply(offset, &mut buf);
            }
            if ok {
                return Response::Chunk { index, data: buf };
            }
            tracing::warn!(file = %id, path = %share.path.display(), "shared file changed on disk or became unreadable; no longer serving it");
            share.stale = true;
            share.file = None;
            self.net_send(FileCommand::StopProviding(*id));
            return Response::error(
                ErrorCode::NotFound,
                "this copy changed; ask another provider",
            );
        }
        let Some(dl) = self.downloads.get(id) else {
            return Response::error(ErrorCode::NotFound, "no such file here");
        };
        let (Some(sched), Some(file)) = (dl.sched.as_ref(), dl.file.as_ref()) else {
            return Response::error(ErrorCode::NotFound, "manifest not known yet");
        };
        let m = sched.manifest();
        let Some(len) = m.chunk_len(index) else {
            return Response::error(
                ErrorCode::NoSuchChunk,
                format!("chunk {index} is past the end"),
            );
        };
        if !sched.have().get(index) {
            return Response::error(
                ErrorCode::NoSuchChunk,
                format!("chunk {index} not held yet"),
            );
        }
        let mut buf = vec![0u8; len as usize];
        match file.read_exact_at(&mut buf, m.chunk_offset(index).unwrap_or(0)) {
            Ok(()) if m.verify_chunk(index, &buf) => Response::Chunk { index, data: buf },
            _ => Response::error(ErrorCode::Internal, "cannot read that chunk"),
        }
    }

    // ---- downloading ----

    /// Looks for sources: Kademlia providers and every connected peer.
    fn search(&mut self, id: FileId) {
        if let Some(dl) = self.downloads.get_mut(&id) {
            dl.last_search = Some(Instant::now());
        }
        self.net_send(FileCommand::FindProviders(id));
        let peers: Vec<PeerId> = self.connected.iter().copied().collect();
        for p in peers {
            self.probe(id, p);
        }
    }

    /// Asks `peer` for the manifest (if we lack it) or which chunks it has.
    fn probe(&mut self, id: FileId, peer: PeerId) {
        if peer == self.local {
            return;
        }
        let Some(dl) = self.downloads.get_mut(&id) else {
            return;
        };
        if !matches!(dl.state, DlState::Searching | DlState::Downloading)
            || dl.probed.len() >= MAX_PROBES
            || !dl.probed.insert(peer)
        {
            return;
        }
        let (asked, req) = if dl.sched.is_some() {
            (Asked::Have, Request::GetHave { file: id })
        } else {
            (Asked::Manifest, Request::GetManifest { file: id })
        };
        self.net_send(FileCommand::Request {
            peer,
            file: id,
            asked,
            frame: encode_request(&req),
        });
    }

    fn on_response(
        &mut self,
        peer: PeerId,
        id: FileId,
        asked: Asked,
        result: Result<Vec<u8>, String>,
    ) {
        let Some(dl) = self.downloads.get_mut(&id) else {
            return;
        };
        let limit = match (&dl.sched, asked) {
            (Some(s), Asked::Chunk(_)) => max_chunk_response_size(s.manifest().chunk_size()),
            _ => MAX_RESPONSE_SIZE.max(MAX_MANIFEST_SIZE + 1024),
        };
        let resp = match result.map_err(|e| e.to_string()).and_then(|b| {
            decode_response_with_limit(&b, limit).map_err(|e| format!("garbage from peer: {e}"))
        }) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%peer, file = %id, "file request failed: {e}");
                match asked {
                    Asked::Chunk(i) => {
                        if let Some(s) = dl.sched.as_mut() {
                            s.on_failure(&peer, i, Instant::now());
                        }
                    }
                    // Let a later search ask again.
                    _ => {
                        dl.probed.remove(&peer);
                    }
                }
                self.pump(id);
                return;
            }
        };
        match (asked, resp) {
            (Asked::Manifest, Response::Manifest(m)) => {
                if dl.sched.is_some() {
                    // Another provider answered first.
                    self.probe_after_manifest(id, peer);
                    return;
                }
                if m.verify(&id).is_err() {
                    tracing::warn!(%peer, file = %id, "peer sent a manifest that does not match the id");
                    return;
                }
                if let Err(e) = self.store.put_manifest(&m) {
                    tracing::error!("cannot store a manifest: {e}");
                    return;
                }
                let mut dl = match self.downloads.remove(&id) {
                    Some(d) => d,
                    None => return,
                };
                if let Err(e) = self.open_download(&mut dl, m, None) {
                    dl.fail(e);
                }
                self.downloads.insert(id, dl);
                // Everyone we asked for the manifest is a candidate source.
                let asked_before: Vec<PeerId> = self
                    .downloads
                    .get_mut(&id)
                    .map(|d| d.probed.drain().collect())
                    .unwrap_or_default();
                for p in asked_before {
                    self.probe(id, p);
                }
            }
            (Asked::Have, Response::Have { bits }) => {
                if let Some(s) = dl.sched.as_mut() {
                    s.add_source(peer);
                    if let Err(e) = s.source_have(&peer, bits) {
                        tracing::debug!(%peer, "bad have report: {e}");
                        s.remove_source(&peer);
                    }
                }
            }
            (Asked::Chunk(i), Response::Chunk { index, data }) if index == i => {
                self.on_chunk(id, peer, i, data);
            }
            (Asked::Chunk(i), Response::Error { code, message }) => {
                if let Some(s) = dl.sched.as_mut() {
                    if matches!(code, ErrorCode::NoSuchChunk) {
                        let _ = s.source_lacks(&peer, i);
                    } else if matches!(code, ErrorCode::NotFound) {
                        s.remove_source(&peer);
                        dl.probed.remove(&peer);
                    } else {
                        s.on_failure(&peer, i, Instant::now());
                    }
                }
                tracing::debug!(%peer, chunk = i, "chunk refused: {message}");
            }
            (Asked::Chunk(i), _) => {
                // The wrong chunk or the wrong kind of answer: a fault.
                if let Some(s) = dl.sched.as_mut() {
                    s.on_failure(&peer, i, Instant::now());
                }
            }
            (_, Response::Error { .. }) => {}
            _ => {
                tracing::debug!(%peer, file = %id, "unexpected file response");
            }
        }
        self.pump(id);
    }

    fn probe_after_manifest(&mut self, id: FileId, peer: PeerId) {
        if let Some(dl) = self.downloads.get_mut(&id) {
            dl.probed.remove(&peer);
        }
        self.probe(id, peer);
    }

    /// Sets up the partial file and the scheduler once the manifest is
    /// known, keeping the chunks already held (`have`, then any chunk of the
    /// partial file that verifies).
    fn open_download(
        &mut self,
        dl: &mut Download,
        m: Manifest,
        have: Option<Bitfield>,
    ) -> Result<(), String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&dl.part)
            .map_err(|e| format!("cannot open {}: {e}", dl.part.display()))?;
        let len = file.metadata().map(|md| md.len()).unwrap_or(0);
        if len != m.size() {
            // Sparse: no space is written until chunks arrive.
            file.set_len(m.size())
                .map_err(|e| format!("cannot size {}: {e}", dl.part.display()))?;
        }
        let mut bits = have
            .filter(|b| b.len() == m.chunk_count())
            .unwrap_or_else(|| Bitfield::new(m.chunk_count()));
        if len > 0 {
            // After a crash: chunks written but not yet recorded.
            let mut buf = Vec::new();
            let mut recovered = 0u64;
            let missing: Vec<u64> = bits.iter_missing().collect();
            for i in missing {
                let (Some(clen), Some(off)) = (m.chunk_len(i), m.chunk_offset(i)) else {
                    continue;
                };
                if off >= len {
                    continue;
                }
                buf.resize(clen as usize, 0);
                if file.read_exact_at(&mut buf, off).is_ok() && m.verify_chunk(i, &buf) {
                    bits.set(i);
                    recovered += 1;
                }
            }
            if recovered > 0 {
                tracing::info!(
                    chunks = recovered,
                    "recovered chunks written before a restart"
                );
            }
        }
        let mut cfg = self.cfg.scheduler.clone();
        cfg.seed = rand::random();
        let sched = Scheduler::new(m.clone(), bits, cfg).map_err(|e| e.to_string())?;
        dl.manifest = Some(m);
        dl.file = Some(file);
        dl.sched = Some(sched);
        dl.state = DlState::Downloading;
        dl.dirty = true;
        Ok(())
    }

    fn on_chunk(&mut self, id: FileId, peer: PeerId, index: u64, data: Vec<u8>) {
        let Some(dl) = self.downloads.get_mut(&id) else {
            return;
        };
        let (Some(sched), Some(file)) = (dl.sched.as_mut(), dl.file.as_ref()) else {
            return;
        };
        let now = Instant::now();
        match sched.on_chunk(&peer, index, &data, now) {
            ChunkOutcome::Accepted { .. } => {
                let off = sched.manifest().chunk_offset(index).unwrap_or(0);
                if let Err(e) = file.write_all_at(&data, off) {
                    dl.fail(format!("cannot write {}: {e}", dl.part.display()));
                    return;
                }
                self.metrics.file_bytes_downloaded.inc_by(data.len() as u64);
                dl.window.push_back((now, data.len() as u64));
                while dl
                    .window
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(2))
                {
                    dl.window.pop_front();
                }
                dl.dirty = true;
            }
            ChunkOutcome::Corrupt { banned } => {
                self.metrics.file_chunks_corrupt.inc();
                tracing::warn!(%peer, file = %id, chunk = index, banned, "corrupt chunk discarded");
            }
            _ => {}
        }
    }

    /// Sends what the scheduler wants, within the download rate limit, and
    /// finishes a complete download.
    fn pump(&mut self, id: FileId) {
        let now = Instant::now();
        let Some(dl) = self.downloads.get_mut(&id) else {
            return;
        };
        if dl.state != DlState::Downloading {
            return;
        }
        let Some(sched) = dl.sched.as_mut() else {
            return;
        };
        if sched.is_complete() {
            self.complete(id);
            return;
        }
        for (peer, index) in sched.next_requests(now) {
            self.deferred_requests.push_back((id, peer, index));
        }
        self.send_deferred_requests(now);
    }

    fn send_deferred_requests(&mut self, now: Instant) {
        while let Some((id, peer, index)) = self.deferred_requests.front().copied() {
            let len = self
                .downloads
                .get(&id)
                .and_then(|d| d.sched.as_ref())
                .and_then(|s| s.manifest().chunk_len(index))
                .map_or(0, u64::from);
            if let Some(b) = self.download_bucket.as_mut()
                && len > 0
                && b.try_take(len, now).is_err()
            {
                break;
            }
            self.deferred_requests.pop_front();
            if len == 0 {
                continue;
            }
            self.net_send(FileCommand::Request {
                peer,
                file: id,
                asked: Asked::Chunk(index),
                frame: encode_request(&Request::GetChunk { file: id, index }),
            });
        }
    }

    fn complete(&mut self, id: FileId) {
        let Some(dl) = self.downloads.get_mut(&id) else {
            return;
        };
        let synced = dl.file.as_ref().map(File::sync_all);
        if let Some(Err(e)) = synced {
            dl.fail(format!("cannot sync {}: {e}", dl.part.display()));
            return;
        }
        dl.file = None;
        let moved = match &dl.key {
            // A group file: decrypt into a new file, so a crash half-way
            // leaves the verified ciphertext intact to start again from.
            Some(k) => {
                decrypt_to(&dl.part, &dl.output, k).and_then(|()| std::fs::remove_file(&dl.part))
            }
            None => std::fs::rename(&dl.part, &dl.output),
        };
        if let Err(e) = moved {
            dl.fail(format!(
                "cannot move the file to {}: {e}",
                dl.output.display()
            ));
            return;
        }
        if let Some(parent) = dl.output.parent()
            && let Ok(d) = File::open(parent)
        {
            let _ = d.sync_all();
        }
        dl.state = DlState::Complete;
        let output = dl.output.display().to_string();
        let Some(manifest) = dl.manifest.clone() else {
            return;
        };
        // The finished copy is served like any share; it was verified chunk
        // by chunk, so its stamp now is its stamp as shared.
        let stamp = File::open(&dl.output).ok().as_ref().and_then(stamp_of);
        let rec = DownloadRecord {
            output: output.clone(),
            state: "complete".into(),
            error: None,
        };
        if let Err(e) = self
            .store
            .put_share(&id, &output, stamp)
            .and_then(|()| self.store.put_download(&id, &rec))
        {
            tracing::error!("cannot record a finished download: {e}");
        }
        self.shares.insert(
            id,
            Share {
                path: dl.output.clone(),
                key: dl.key.clone(),
                manifest,
                file: None,
                stamp,
                stale: false,
            },
        );
        self.net_send(FileCommand::StartProviding(id));
        tracing::info!(file = %id, path = %output, "download complete");
    }

    fn persist(&mut self, id: &FileId, force: bool) {
        let Some(dl) = self.downloads.get_mut(id) else {
            return;
        };
        if !dl.dirty || dl.state != DlState::Downloading {
            return;
        }
        if !force && dl.last_persist.elapsed() < self.cfg.persist_interval {
            return;
        }
        let (Some(sched), Some(file)) = (dl.sched.as_ref(), dl.file.as_ref()) else {
            return;
        };
        // Data first, then the record that says it is there.
        if let Err(e) = file.sync_data() {
            tracing::warn!("cannot sync {}: {e}", dl.part.display());
            return;
        }
        match self.store.put_have(id, sched.have()) {
            Ok(()) => {
                dl.dirty = false;
                dl.last_persist = Instant::now();
            }
            Err(e) => tracing::warn!("cannot record download progress: {e}"),
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        // Uploads held back by the rate limit.
        while let Some((_, _, _, len)) = self.deferred_uploads.front() {
            let len = *len;
            if let Some(b) = self.upload_bucket.as_mut()
                && b.try_take(len, now).is_err()
            {
                break;
            }
            if let Some((_, channel, frame, len)) = self.deferred_uploads.pop_front() {
                self.metrics.file_bytes_uploaded.inc_by(len);
                self.net_send(FileCommand::Respond { channel, frame });
            }
        }
        self.send_deferred_requests(now);
        let ids: Vec<FileId> = self.downloads.keys().copied().collect();
        for id in ids {
            let Some(dl) = self.downloads.get_mut(&id) else {
                continue;
            };
            if !matches!(dl.state, DlState::Searching | DlState::Downloading) {
                continue;
            }
            if let Some(s) = dl.sched.as_mut() {
                // Expired requests are rescheduled by the scheduler itself.
                let _ = s.expired(now);
            }
            let few_sources = dl.sched.as_ref().is_none_or(|s| s.sources().is_empty());
            let due = dl
                .last_search
                .is_none_or(|t| now.duration_since(t) >= self.cfg.search_interval);
            if due {
                if few_sources {
                    // Ask everyone again: providers may have come online.
                    dl.probed.clear();
                }
                self.search(id);
            }
            self.pump(id);
            self.persist(&id, false);
        }
    }
}

impl Download {
    fn new(output: PathBuf) -> Self {
        let mut part = output.clone().into_os_string();
        part.push(PART_SUFFIX);
        Download {
            key: None,
            output,
            part: PathBuf::from(part),
            manifest: None,
            file: None,
            sched: None,
            state: DlState::Searching,
            probed: HashSet::new(),
            last_search: None,
            last_persist: Instant::now(),
            dirty: false,
            window: VecDeque::new(),
            error: None,
        }
    }

    fn fail(&mut self, error: String) {
        tracing::warn!("download failed: {error}");
        self.state = DlState::Failed;
        self.error = Some(error);
    }
}

fn parse_id(s: &str) -> Result<FileId, ServiceError> {
    s.parse().map_err(|_| {
        ServiceError::BadRequest(format!("{s:?} is not a file id (64 hex characters)"))
    })
}

/// Streams a file through the manifest builder (1 MiB at a time); with a
/// key, the manifest is of the encrypted content.
fn hash_file(path: &Path, key: Option<&FileKey>) -> Result<(Manifest, Stamp), String> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let md = f
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !md.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let before = stamp_of(&f);
    let mut b = ManifestBuilder::new(chunk_size_for(md.len())).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        if let Some(k) = key {
            k.apply(offset, &mut buf[..n]);
        }
        offset += n as u64;
        b.update(&buf[..n]);
    }
    // A file that changed while it was read has no one content to share.
    let stamp = match (before, stamp_of(&f)) {
        (Some(a), Some(b)) if a == b => a,
        _ => {
            return Err(format!(
                "{} changed while it was being read; try again",
                path.display()
            ));
        }
    };
    // A group file's name would reveal what members share: it travels in
    // the (encrypted) group message instead.
    if key.is_some() {
        return b
            .finish(None)
            .map(|m| (m, stamp))
            .map_err(|e| e.to_string());
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.chars().take(255).collect::<String>())
        .filter(|n| n.len() <= 255);
    b.finish(name)
        .map(|m| (m, stamp))
        .map_err(|e| e.to_string())
}

/// Size and modification time of an open file.
fn stamp_of(f: &File) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let md = f.metadata().ok()?;
    Some(Stamp {
        len: md.len(),
        mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
    })
}

/// Decrypts `src` into `dst` through a temporary file, synced, then renamed.
fn decrypt_to(src: &Path, dst: &Path, key: &FileKey) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut tmp = dst.as_os_str().to_owned();
    tmp.push(".fogmesh-dec");
    let tmp = PathBuf::from(tmp);
    let mut input = File::open(src)?;
    let mut out = std::io::BufWriter::new(File::create(&tmp)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        key.apply(offset, &mut buf[..n]);
        out.write_all(&buf[..n])?;
        offset += n as u64;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, dst)
}

/// Copies `src` to `dst` through a temporary file and a rename.
fn copy_atomically(src: &Path, dst: &Path) -> std::io::Result<()> {
    let mut tmp = dst.as_os_str().to_owned();
    tmp.push(PART_SUFFIX);
    let tmp = PathBuf::from(tmp);
    std::fs::copy(src, &tmp)?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_matches_the_in_memory_manifest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f.bin");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).expect("write");
        let (m, _) = hash_file(&p, None).expect("hash");
        let expected = fogmesh_protocols::files::manifest::manifest_of(&data, Some("f.bin".into()))
            .expect("manifest");
        assert_eq!(m.id(), expected.id());
        assert_eq!(m.size(), 3_000_000);
        assert!(hash_file(&dir.path().join("missing"), None).is_err());
        assert!(hash_file(dir.path(), None).is_err());
        // Encrypted: the manifest is of the ciphertext, without a name, and
        // decrypting gives the plaintext back.
        let key = FileKey([3; 32]);
        let mut ct = data.clone();
        key.apply(0, &mut ct);
        let (enc, _) = hash_file(&p, Some(&key)).expect("hash");
        let expected =
            fogmesh_protocols::files::manifest::manifest_of(&ct, None).expect("manifest");
        assert_eq!(enc.id(), expected.id());
        assert_eq!(enc.name(), None);
        let ctp = dir.path().join("ct");
        std::fs::write(&ctp, &ct).expect("write");
        let back = dir.path().join("back");
        decrypt_to(&ctp, &back, &key).expect("decrypt");
        assert_eq!(std::fs::read(&back).expect("read"), data);
    }
}
