//! File sharing in the node: the files actor, its handle and what the API
//! reports.
//!
//! The transfer logic is the sans-IO core in `fogmesh_protocols::files`
//! (manifests, the download lifecycle and its multi-source scheduler, the
//! wire format, rate limits); this module gives it a disk and a network.
//! One actor thread ([`crate::actor`]) owns every share and download and
//! the file tables of the database; it reads and writes chunks with
//! positioned I/O (`pread`/`pwrite`), so memory does not grow with file
//! size. It talks to the swarm loop with [`FileCommand`]s (requests,
//! responses, provider records and lookups) and gets back [`Input`]s; the
//! API calls it through a [`FilesHandle`]. Hashing a file to share it runs
//! on a thread of its own, so a large share does not stall transfers.
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
//!
//! The actor's code is split by concern: [`actor`] (its state, inputs and
//! the API's calls), `share` (hashing and shares), `serve` (answering
//! peers, the upload limit), `download` (the I/O of downloads).

mod actor;
mod download;
pub(crate) mod gate;
mod serve;
mod share;
pub(crate) mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use fogmesh_protocols::files::{
    FileId, FileKey, FileLink, Manifest, SchedulerConfig, TokenBucket, chunk_size_for,
};
use libp2p::PeerId;
use libp2p::request_response::{InboundRequestId, ResponseChannel};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::actor::{Channel, Mailbox, MailboxError, Reply, ServiceError};
use crate::behaviour::FileFrame;
use crate::metrics::NodeMetrics;
use crate::storage::{Store, StoreError};
use store::{FileStore, Stamp};

pub(crate) use fogmesh_protocols::files::Asked;

/// Inputs waiting for the actor.
const INPUT_QUEUE: usize = 8192;
/// Suffix of partial files, next to the output.
pub const PART_SUFFIX: &str = ".fogmesh-part";

/// Where a share or download is, as the API reports it (serialised as the
/// lower-case name: `"sharing"`, `"complete"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileState {
    /// Shared: served from its path.
    Sharing,
    /// Shared, but the file changed on disk since: no longer served.
    Stale,
    /// Downloading, the manifest not known yet.
    Searching,
    /// Downloading chunks.
    Downloading,
    /// Downloaded (or copied out of a share) to its path.
    Complete,
    /// The download stopped on an error; asking again resumes it.
    Failed,
}

impl FileState {
    /// The name the API uses.
    pub fn as_str(&self) -> &'static str {
        match self {
            FileState::Sharing => "sharing",
            FileState::Stale => "stale",
            FileState::Searching => "searching",
            FileState::Downloading => "downloading",
            FileState::Complete => "complete",
            FileState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for FileState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, so that widths in format strings apply.
        f.pad(self.as_str())
    }
}

/// A share or download, as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileStatus {
    /// The file id (hex).
    pub file_id: String,
    /// The manifest's name, if any.
    pub name: Option<String>,
    /// Where it is.
    pub state: FileState,
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

/// A call from the API, with where its answer goes.
#[derive(Debug)]
pub(crate) enum ApiCall {
    /// Share the file at this absolute path; encrypted under a new key if
    /// asked (for a group: the status then carries the link with the key).
    Share {
        path: PathBuf,
        encrypt: bool,
        reply: Reply<FileStatus>,
    },
    /// Start (or continue, or retry) downloading a file to this absolute
    /// path; with a link, decrypting with the link's key.
    Get {
        file: FileId,
        output: PathBuf,
        link: Option<FileLink>,
        reply: Reply<FileStatus>,
    },
    /// One file's status.
    Status {
        file: FileId,
        reply: Reply<FileStatus>,
    },
    /// Every share and download.
    List { reply: Reply<Vec<FileStatus>> },
    /// Stop a download (removing its partial data and its record) or a
    /// share (no longer served; the file stays); answers the last status.
    Cancel {
        file: FileId,
        reply: Reply<FileStatus>,
    },
}

impl From<ApiCall> for Input {
    fn from(call: ApiCall) -> Self {
        Input::Api(call)
    }
}

/// An input of the actor: from the API, from the swarm loop, or from its
/// own hashing threads.
#[derive(Debug)]
pub(crate) enum Input {
    Api(ApiCall),
    /// Peers' requests wait in the serving queue ([`gate::SERVE_QUEUE`]):
    /// serve them.
    Serve,
    /// The answer to one of our requests (or why there is none).
    Response {
        peer: PeerId,
        file: FileId,
        asked: Asked,
        result: Result<Vec<u8>, String>,
    },
    /// Providers found for a file.
    Providers {
        file: FileId,
        peers: Vec<PeerId>,
    },
    /// A file to share, hashed.
    Hashed {
        path: PathBuf,
        key: Option<FileKey>,
        result: Result<(Manifest, Stamp), String>,
        reply: Reply<FileStatus>,
    },
    PeerConnected(PeerId),
    PeerDisconnected(PeerId),
}

/// What the actor asks of the swarm loop.
#[derive(Debug)]
pub(crate) enum FileCommand {
    /// Send a request; its answer comes back as [`Input::Response`] with
    /// `file` and `asked`.
    Request {
        peer: PeerId,
        file: FileId,
        asked: Asked,
        frame: Vec<u8>,
    },
    /// Answer a peer's request.
    Respond {
        channel: ResponseChannel<FileFrame>,
        frame: Vec<u8>,
    },
    StartProviding(FileId),
    StopProviding(FileId),
    /// Look up providers; they come back as [`Input::Providers`].
    FindProviders(FileId),
}

/// A peer's request, waiting in the serving queue.
#[derive(Debug)]
pub(crate) struct ServeJob {
    pub(crate) peer: PeerId,
    pub(crate) id: InboundRequestId,
    pub(crate) frame: Vec<u8>,
    pub(crate) channel: ResponseChannel<FileFrame>,
}

/// The sending side of the serving queue: peers' requests wait here, apart
/// from the actor's mailbox, so a flood of them never delays the API or
/// the answers to the node's own requests; one [`Input::Serve`] at a time
/// in the mailbox wakes the actor for them.
#[derive(Debug, Clone)]
struct ServeQueue {
    tx: crate::actor::BoundedSender<ServeJob>,
    /// An [`Input::Serve`] is in the mailbox.
    woken: Arc<AtomicBool>,
    /// Jobs queued.
    queued: Arc<AtomicUsize>,
}

/// The API's and the event loop's handle on the files actor. Cloneable.
///
/// Every method is cancel-safe: a cancelled call's answer is dropped (the
/// work, such as a share being hashed, goes on).
#[derive(Debug, Clone)]
pub struct FilesHandle {
    mailbox: Mailbox<Input>,
    serving: ServeQueue,
    gate: gate::ServeGate,
}

impl FilesHandle {
    /// Queues a network input without waiting (the event loop).
    pub(crate) fn offer(&self, input: Input) -> Result<(), MailboxError> {
        self.mailbox.offer(input)
    }

    /// Queues a peer's request for serving, within the serving limits;
    /// refused (the channel back, to answer `Busy`) when a limit is
    /// reached or the queue is full.
    pub(crate) fn serve(&self, job: ServeJob) -> Result<(), ResponseChannel<FileFrame>> {
        use std::sync::mpsc::TrySendError;
        let id = job.id;
        if !self.gate.admit(job.peer, id) {
            return Err(job.channel);
        }
        let q = &self.serving;
        q.queued.fetch_add(1, Ordering::SeqCst);
        if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) = q.tx.try_send(job) {
            q.queued.fetch_sub(1, Ordering::SeqCst);
            self.gate.release(id);
            return Err(job.channel);
        }
        if !q.woken.swap(true, Ordering::SeqCst) && self.mailbox.offer(Input::Serve).is_err() {
            // The actor's deadline picks the queue up anyway.
            q.woken.store(false, Ordering::SeqCst);
        }
        Ok(())
    }

    /// The exchange of a peer's request ended: its limits are free again.
    pub(crate) fn served(&self, id: InboundRequestId) {
        self.gate.release(id);
    }

    /// Shares the file at the absolute `path`; with `encrypt`, under a new
    /// key, and the status's `link` carries it (for a group).
    pub async fn share(&self, path: PathBuf, encrypt: bool) -> Result<FileStatus, ServiceError> {
        self.mailbox
            .call(|reply| ApiCall::Share {
                path,
                encrypt,
                reply,
            })
            .await
    }

    /// Starts downloading `file_id` to the absolute path `output` (or
    /// reports the download under way, resuming it if it had failed; a
    /// file shared here is copied out). With `link` (a
    /// `fogmesh-file:<id>#<key>` of the same file), the file is decrypted
    /// with the link's key; without, with the one key received for it in
    /// group links, if there is exactly one.
    pub async fn get(
        &self,
        file_id: &str,
        output: PathBuf,
        link: Option<&str>,
    ) -> Result<FileStatus, ServiceError> {
        let file = parse_id(file_id)?;
        let link = link
            .map(|l| {
                l.trim()
                    .parse::<FileLink>()
                    .map_err(|e| ServiceError::BadRequest(format!("bad link: {e}")))
            })
            .transpose()?;
        if let Some(l) = &link
            && l.id != file
        {
            return Err(ServiceError::BadRequest(format!(
                "the link is to file {}, not {file}",
                l.id
            )));
        }
        self.mailbox
            .call(|reply| ApiCall::Get {
                file,
                output,
                link,
                reply,
            })
            .await
    }

    /// One share's or download's status.
    pub async fn status(&self, file_id: &str) -> Result<FileStatus, ServiceError> {
        let file = parse_id(file_id)?;
        self.mailbox
            .call(|reply| ApiCall::Status { file, reply })
            .await
    }

    /// Every share and download, by file id.
    pub async fn list(&self) -> Result<Vec<FileStatus>, ServiceError> {
        self.mailbox.call(|reply| ApiCall::List { reply }).await
    }

    /// Cancels a download (its partial data and record are removed) or
    /// stops a share (the file stays where it is); the last status.
    pub async fn cancel(&self, file_id: &str) -> Result<FileStatus, ServiceError> {
        let file = parse_id(file_id)?;
        self.mailbox
            .call(|reply| ApiCall::Cancel { file, reply })
            .await
    }
}

fn parse_id(s: &str) -> Result<FileId, ServiceError> {
    s.parse().map_err(|_| {
        ServiceError::BadRequest(format!("{s:?} is not a file id (64 hex characters)"))
    })
}

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

    /// A bucket for a limit of `rate` bytes per second. A burst of a
    /// quarter second keeps the limit smooth; one default chunk at least,
    /// so a slow limit does not split every chunk's wait. (A larger chunk
    /// waits for a full bucket and goes into debt, so the long-run rate
    /// holds either way.)
    fn bucket(rate: Option<u64>) -> Option<TokenBucket> {
        rate.map(|r| {
            TokenBucket::new(
                r,
                (r / 4).max(u64::from(fogmesh_protocols::files::CHUNK_SIZE)),
            )
        })
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
    let channel = Channel::bounded(INPUT_QUEUE);
    let mailbox = channel.mailbox.clone();
    let (tx, rx) = crate::actor::bounded(gate::SERVE_QUEUE);
    let serving = ServeQueue {
        tx,
        woken: Arc::default(),
        queued: Arc::default(),
    };
    let gate = gate::ServeGate::default();
    let queue = actor::ServeInbox {
        rx,
        woken: serving.woken.clone(),
        queued: serving.queued.clone(),
        gate: gate.clone(),
    };
    let actor = actor::FilesActor::new(local, store, net, metrics, cfg, mailbox.clone(), queue);
    let thread = crate::actor::spawn("fogmesh-files", actor, channel, shutdown)
        .map_err(|e| StoreError::Db(format!("cannot start the files thread: {e}")))?;
    Ok((
        FilesHandle {
            mailbox,
            serving,
            gate,
        },
        thread,
    ))
}
