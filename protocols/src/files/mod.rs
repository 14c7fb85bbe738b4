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
//! Steps 2 and 3 are one state machine, [`Download`]: the node feeds it the
//! answers to its requests and carries out the [`Action`]s it returns
//! (send, write, record progress, complete, fail).
//!
//! Bandwidth limits are parsed and enforced with [`crate::rate`]; sends
//! held back by a limit wait in a [`Pacer`].
//!
//! Design choices that differ from the first design are explained in
//! docs/design-notes.md.

pub mod bitfield;
pub mod crypt;
pub mod download;
pub mod manifest;
pub mod pacer;
pub mod scheduler;
pub mod wire;

pub use crate::rate::{RateError, TokenBucket, parse_rate};
pub use bitfield::{Bitfield, BitfieldError};
pub use crypt::{FileKey, FileLink, KeyScheme, WrongKey, find_links};
pub use download::{Asked, Download, DownloadConfig, DownloadState};
pub use libp2p_identity::PeerId;
pub use manifest::{
    CHUNK_SIZE, FileId, MAX_CHUNK_SIZE, MAX_CHUNKS, MAX_MANIFEST_SIZE, Manifest, ManifestBuilder,
    ManifestError, ParseFileIdError, chunk_size_for,
};
pub use pacer::Pacer;
pub use scheduler::{
    ChunkOutcome, Progress, Scheduler, SchedulerConfig, SchedulerError, SourceStats,
};
pub use wire::{
    ErrorCode, MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE, PROTOCOL, Request, Response, WireError,
};
