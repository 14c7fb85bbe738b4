//! Content-addressed, chunked, multi-source file transfer: the sans-IO core.
//!
//! Nothing here touches the network, the clock or the disk. The node wires
//! it to libp2p request-response ([`wire::PROTOCOL`]), to Kademlia (one
//! provider record per file, keyed by the [`FileId`], never one per chunk)
//! and to files on disk; the simulator drives the same state machines. The
//! format is specified in docs/protocols/files.md at the top of the
//! workspace.
//!
//! # How a transfer goes
//!
//! 1. The publisher streams the file through a [`ManifestBuilder`] (chunk
//!    size from [`chunk_size_for`]), keeps the [`Manifest`] and announces
//!    its [`FileId`] as a provider record.
//! 2. A downloader finds providers, asks one for the manifest
//!    ([`Request::GetManifest`]) and checks it with [`Manifest::verify`].
//! 3. It creates a [`Scheduler`] (with the chunks it already has, to
//!    resume), adds providers as sources, asks each which chunks it holds
//!    ([`Request::GetHave`]) unless it knows the source is complete, and
//!    then loops: send what [`Scheduler::next_requests`] returns as
//!    [`Request::GetChunk`], feed answers to [`Scheduler::on_chunk`] /
//!    [`Scheduler::on_failure`], write accepted chunks, and call
//!    [`Scheduler::expired`] at [`Scheduler::next_deadline`].
//! 4. A downloader serves the chunks it has while it downloads, so it can
//!    announce itself as a (partial) provider too.
//!
//! Bandwidth limits are parsed and enforced with [`rate`].
//!
//! Deviations from the original brief, and why:
//! - [`ManifestBuilder::new`] and [`ManifestBuilder::finish`] return
//!   `Result`: the chunk size must be in range, and a file may need more
//!   than [`MAX_CHUNKS`] chunks or get a name over 255 bytes.
//! - [`Manifest`]'s fields are private (read through accessors), so every
//!   manifest in memory is valid and the scheduler can rely on it.
//! - Chunk sizes stop growing at [`MAX_CHUNK_SIZE`] (16 MiB), a response
//!   the receiver must hold in memory: files over 4 TiB are refused.
//! - [`ChunkOutcome`] carries data: `Accepted { cancel }` (end-game
//!   cancellations), `Corrupt { banned }`, and a fourth case,
//!   `Unsolicited`, for chunks from non-sources.
//! - [`Scheduler::expired`] applies the failure itself (the node need not
//!   call `on_failure` for those); [`Scheduler::source_lacks`] (for
//!   `NoSuchChunk`), [`Scheduler::next_deadline`] and
//!   [`Scheduler::request_timeout`] were added for the node's event loop.

pub mod bitfield;
pub mod crypt;
pub mod manifest;
pub mod rate;
pub mod scheduler;
pub mod wire;

pub use bitfield::{Bitfield, BitfieldError};
pub use crypt::{FileKey, FileLink, find_links};
pub use libp2p_identity::PeerId;
pub use manifest::{
    CHUNK_SIZE, FileId, MAX_CHUNK_SIZE, MAX_CHUNKS, MAX_MANIFEST_SIZE, Manifest, ManifestBuilder,
    ManifestError, ParseFileIdError, chunk_size_for,
};
pub use rate::{RateError, TokenBucket, parse_rate};
pub use scheduler::{
    ChunkOutcome, Progress, Scheduler, SchedulerConfig, SchedulerError, SourceStats,
};
pub use wire::{
    ErrorCode, MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE, PROTOCOL, Request, Response, WireError,
};
