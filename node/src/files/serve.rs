//! Answering peers: manifests, have-maps and chunks of complete shares and
//! of downloads under way, within the upload limit.
//!
//! A chunk is read with a positioned read. A share is served only while
//! its file is the one hashed (checked with an fstat per chunk); a share
//! that changed on disk goes stale and its provider record is withdrawn.
//! Chunk responses wait in a [`Pacer`](fogmesh_protocols::files::Pacer)
//! for the upload limit's bytes, in order; a full queue answers `Busy`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use fogmesh_protocols::files::crypt::sealed_plain_range;
use fogmesh_protocols::files::wire::{
    ErrorCode, Request, Response, decode_request, encode_response,
};
use fogmesh_protocols::files::{Bitfield, FileId, FileKey, KeyScheme, Manifest};
use libp2p::PeerId;
use libp2p::request_response::ResponseChannel;

use super::actor::FilesActor;
use super::share::stamp_of;
use super::{FileCommand, ServeJob};
use crate::behaviour::FileFrame;

/// Responses held back by the upload limit; beyond that, `Busy`.
pub(super) const MAX_DEFERRED_UPLOADS: usize = 1024;

/// A chunk response waiting for the upload limit.
#[derive(Debug)]
pub(super) struct DeferredUpload {
    /// The requester (its answers are dropped when it goes away).
    pub(super) peer: PeerId,
    channel: ResponseChannel<FileFrame>,
    frame: Vec<u8>,
    /// The chunk's bytes, counted as uploaded once sent.
    bytes: u64,
}

impl FilesActor {
    /// A peer's request: answered at once, or (a chunk) once the upload
    /// limit allows; `Busy` when the response's bytes would go over the
    /// serving limits (checked before anything is read).
    pub(super) fn on_request(&mut self, job: ServeJob, now: Instant) {
        let ServeJob {
            peer,
            id,
            frame,
            channel,
        } = job;
        let resp = match decode_request(&frame) {
            Ok(req) if !self.serving.gate.reserve(id, self.response_size(&req)) => {
                tracing::debug!(%peer, "serving limits reached; busy");
                Response::error(ErrorCode::Busy, "too much is waiting for you; retry later")
            }
            Ok(req) => self.serve(&req),
            Err(e) => {
                tracing::debug!(%peer, "bad file request: {e}");
                Response::error(ErrorCode::Internal, format!("malformed request: {e}"))
            }
        };
        let bytes = match &resp {
            Response::Chunk { data, .. } => data.len() as u64,
            _ => 0,
        };
        let frame = encode_response(&resp);
        if bytes == 0 {
            self.net_send(FileCommand::Respond { channel, frame });
            return;
        }
        let upload = DeferredUpload {
            peer,
            channel,
            frame,
            bytes,
        };
        if let Err(refused) = self.uploads.push(upload, bytes) {
            let busy = encode_response(&Response::error(ErrorCode::Busy, "upload queue full"));
            self.net_send(FileCommand::Respond {
                channel: refused.channel,
                frame: busy,
            });
            return;
        }
        self.send_uploads(now);
    }

    /// Sends the chunk responses the upload limit allows now, in order.
    pub(super) fn send_uploads(&mut self, now: Instant) {
        while let Some(u) = self.uploads.pop_ready(now) {
            self.metrics.file_bytes_uploaded.inc_by(u.bytes);
            self.net_send(FileCommand::Respond {
                channel: u.channel,
                frame: u.frame,
            });
        }
    }

    /// About how many bytes the response to `req` holds (what the serving
    /// limits count).
    fn response_size(&self, req: &Request) -> u64 {
        let manifest = self.manifest_of(req.file());
        match req {
            Request::GetChunk { index, .. } => manifest
                .and_then(|m| m.chunk_len(*index))
                .map_or(0, u64::from),
            Request::GetManifest { .. } => manifest.map_or(0, |m| m.chunk_count() * 32 + 1024),
            Request::GetHave { .. } => manifest.map_or(0, |m| m.chunk_count() / 8 + 64),
            _ => 0,
        }
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
                match self.downloads.get(&id).and_then(|t| t.machine.have()) {
                    Some(bits) => Response::Have { bits: bits.clone() },
                    None => Response::error(ErrorCode::NotFound, "no such file here"),
                }
            }
            Request::GetChunk { index, .. } => match self.read_share_chunk(&id, *index) {
                Some(r) => r,
                None => self.read_download_chunk(&id, *index),
            },
            _ => Response::error(ErrorCode::Internal, "unsupported request"),
        }
    }

    fn manifest_of(&self, id: &FileId) -> Option<&Manifest> {
        if let Some(s) = self.shares.get(id).filter(|s| !s.stale) {
            return Some(&s.manifest);
        }
        self.downloads.get(id).and_then(|t| t.machine.manifest())
    }

    /// A chunk of a complete share, if there is one (`None`: not shared).
    fn read_share_chunk(&mut self, id: &FileId, index: u64) -> Option<Response> {
        let share = self.shares.get_mut(id).filter(|s| !s.stale)?;
        if share.manifest.chunk_len(index).is_none() {
            return Some(Response::error(
                ErrorCode::NoSuchChunk,
                format!("chunk {index} is past the end"),
            ));
        }
        if share.file.is_none() {
            share.file = File::open(&share.path).ok();
        }
        // Serve only while the file is the one hashed: a file changed
        // after sharing must not reach anybody as this file. Receivers
        // verify every chunk anyway; for a plain file this check (an fstat
        // of the open file, not a hash, which would cost an eighth of the
        // throughput) keeps an honest sharer from being banned for it.
        let unchanged = share.file.as_ref().is_some_and(|f| {
            share
                .stamp
                .is_none_or(|st| stamp_of(f).is_some_and(|now| now == st))
        });
        let chunk = share
            .file
            .as_ref()
            .filter(|_| unchanged)
            .and_then(|f| read_chunk(f, &share.manifest, share.key.as_ref(), index));
        if let Some(data) = chunk {
            return Some(Response::Chunk { index, data });
        }
        tracing::warn!(file = %id, path = %share.path.display(), "shared file changed on disk, became unreadable or does not encrypt to the file shared; no longer serving it");
        share.stale = true;
        share.file = None;
        self.net_send(FileCommand::StopProviding(*id));
        Some(Response::error(
            ErrorCode::NotFound,
            "this copy changed; ask another provider",
        ))
    }

    /// A chunk of a download under way, if it is held already.
    fn read_download_chunk(&self, id: &FileId, index: u64) -> Response {
        let Some(t) = self.downloads.get(id) else {
            return Response::error(ErrorCode::NotFound, "no such file here");
        };
        let (Some(m), Some(have), Some(file)) =
            (t.machine.manifest(), t.machine.have(), t.file.as_ref())
        else {
            return Response::error(ErrorCode::NotFound, "manifest not known yet");
        };
        let Some(len) = m.chunk_len(index) else {
            return Response::error(
                ErrorCode::NoSuchChunk,
                format!("chunk {index} is past the end"),
            );
        };
        if !have.get(index) {
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
}

/// Chunk `index` of a share as served: read from the file (the plaintext,
/// for a group file, encrypted here with `key`). An encrypted chunk is
/// checked against the manifest before it leaves: a key that is not the
/// one the file was shared with gives `None`, never a chunk.
fn read_chunk(f: &File, m: &Manifest, key: Option<&FileKey>, index: u64) -> Option<Vec<u8>> {
    let offset = m.chunk_offset(index)?;
    let len = m.chunk_len(index)? as usize;
    let Some(key) = key else {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).ok()?;
        return Some(buf);
    };
    let data = match key.scheme {
        KeyScheme::Stream => {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, offset).ok()?;
            key.apply(offset, &mut buf);
            buf
        }
        KeyScheme::Sealed => {
            let (plain_offset, plain_len) = sealed_plain_range(m, index)?;
            let mut buf = vec![0u8; plain_len as usize];
            f.read_exact_at(&mut buf, plain_offset).ok()?;
            key.seal_chunk(index, &buf)
        }
    };
    m.verify_chunk(index, &data).then_some(data)
}
