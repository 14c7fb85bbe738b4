//! The I/O of downloads: the node's side of
//! `fogmesh_protocols::files::Download`.
//!
//! The state machine decides; this carries out its actions: requests go to
//! the swarm loop (chunk requests through the download limit), chunks are
//! written into the partial file with positioned writes, progress is
//! committed to redb after an `fdatasync`, and a complete file is synced,
//! decrypted if it is a group file, renamed over the output and served as
//! a share. Restoring downloads at start, including finding the chunks of
//! the partial file written after the last commit, is here too.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fogmesh_protocols::files::download::Action;
use fogmesh_protocols::files::wire::{Request, encode_request};
use fogmesh_protocols::files::{
    Asked, Bitfield, Download, DownloadConfig, FileId, FileKey, KeyScheme, Manifest,
};
use libp2p::PeerId;

use super::actor::FilesActor;
use super::share::{Share, stamp_of};
use super::store::{DownloadRecord, RecordState};
use super::{FileCommand, PART_SUFFIX};
use crate::storage::StoreError;

/// Chunk requests held back by the download limit; beyond that a request
/// is dropped (the scheduler times it out and asks again). The scheduler's
/// windows keep the queue far shorter.
pub(super) const MAX_DEFERRED_REQUESTS: usize = 1 << 16;

/// A download: its state machine and its files.
pub(super) struct Transfer {
    pub(super) machine: Download,
    /// For a group file: decrypt with this key once complete.
    pub(super) key: Option<FileKey>,
    pub(super) output: PathBuf,
    pub(super) part: PathBuf,
    /// The partial file, once the manifest is known.
    pub(super) file: Option<File>,
}

impl Transfer {
    pub(super) fn new(
        id: FileId,
        output: PathBuf,
        cfg: DownloadConfig,
        local: PeerId,
        now: Instant,
    ) -> Self {
        let mut part = output.clone().into_os_string();
        part.push(PART_SUFFIX);
        Transfer {
            machine: Download::new(id, local, cfg, now),
            key: None,
            output,
            part: PathBuf::from(part),
            file: None,
        }
    }

    fn fail(&mut self, reason: String) {
        tracing::warn!("download failed: {reason}");
        self.machine.fail(reason);
    }
}

impl FilesActor {
    /// A download's settings: the node's, with a seed of its own.
    pub(super) fn download_config(&self) -> DownloadConfig {
        let mut sched = self.cfg.scheduler.clone();
        sched.seed = rand::random();
        DownloadConfig::default()
            .with_intervals(self.cfg.search_interval, self.cfg.persist_interval)
            .with_scheduler(sched)
    }

    /// Restores shares (announcing them again) and unfinished downloads.
    pub(super) fn restore(&mut self, now: Instant) -> Result<(), StoreError> {
        for (id, path, stamp) in self.store.shares()? {
            let Some(manifest) = self.store.manifest(&id)? else {
                continue;
            };
            let key = self.store.share_key(&id)?;
            self.shares
                .insert(id, Share::new(PathBuf::from(path), key, manifest, stamp));
            self.net_send(FileCommand::StartProviding(id));
        }
        for (id, rec) in self.store.downloads()? {
            if rec.state != RecordState::Downloading {
                continue;
            }
            let mut t = Transfer::new(
                id,
                PathBuf::from(&rec.output),
                self.download_config(),
                self.local,
                now,
            );
            // Records before link version 2 have no key of their own.
            t.key = match rec.file_key() {
                Some(k) => Some(k),
                None => self.store.legacy_key(&id)?,
            };
            let resume = match self.store.manifest(&id)? {
                Some(m) => Some((m, self.store.have(&id)?)),
                None => None,
            };
            tracing::info!(file = %id, "resuming download");
            self.downloads.insert(id, t);
            if let Some((m, have)) = resume {
                let actions = self.open(id, m, have, now);
                self.apply(id, actions, now);
            }
        }
        Ok(())
    }

    /// Carries out a download's actions, and those that follow from them.
    pub(super) fn apply(&mut self, id: FileId, actions: Vec<Action>, now: Instant) {
        let mut todo = VecDeque::from(actions);
        while let Some(action) = todo.pop_front() {
            match action {
                Action::Send {
                    peer,
                    asked: Asked::Chunk(index),
                    ..
                } => self.queue_request(id, peer, index),
                Action::Send {
                    peer,
                    asked,
                    request,
                } => self.net_send(FileCommand::Request {
                    peer,
                    file: id,
                    asked,
                    frame: encode_request(&request),
                }),
                Action::FindProviders => self.net_send(FileCommand::FindProviders(id)),
                Action::Open(m) => {
                    if let Err(e) = self.store.put_manifest(&m) {
                        if let Some(t) = self.downloads.get_mut(&id) {
                            t.fail(format!("cannot store the manifest: {e}"));
                        }
                        continue;
                    }
                    todo.extend(self.open(id, m, None, now));
                }
                Action::Write { offset, data, .. } => {
                    todo.extend(self.write_chunk(id, offset, &data, now));
                }
                Action::Corrupt {
                    peer,
                    index,
                    banned,
                } => {
                    self.metrics.file_chunks_corrupt.inc();
                    tracing::warn!(%peer, file = %id, chunk = index, banned, "corrupt chunk discarded");
                }
                Action::Persist => self.persist(id),
                Action::Complete => self.complete(id),
                Action::Fail(reason) => tracing::warn!("download failed: {reason}"),
                other => tracing::debug!("unhandled download action {other:?}"),
            }
        }
        self.send_requests(now);
    }

    /// Sets up the partial file once the manifest is known, keeping the
    /// chunks already held (`have`, then any chunk of the partial file that
    /// verifies), and hands it to the state machine.
    fn open(
        &mut self,
        id: FileId,
        m: Manifest,
        have: Option<Bitfield>,
        now: Instant,
    ) -> Vec<Action> {
        let Some(t) = self.downloads.get_mut(&id) else {
            return Vec::new();
        };
        match open_part(&t.part, &m, have) {
            Ok((file, bits)) => {
                t.file = Some(file);
                t.machine.opened(m, bits, now)
            }
            Err(e) => {
                t.fail(e);
                Vec::new()
            }
        }
    }

    fn write_chunk(&mut self, id: FileId, offset: u64, data: &[u8], now: Instant) -> Vec<Action> {
        let Some(t) = self.downloads.get_mut(&id) else {
            return Vec::new();
        };
        let written = match t.file.as_ref() {
            Some(f) => f.write_all_at(data, offset),
            None => Err(std::io::Error::other("the partial file is not open")),
        };
        if let Err(e) = written {
            t.fail(format!("cannot write {}: {e}", t.part.display()));
            return Vec::new();
        }
        self.metrics.file_bytes_downloaded.inc_by(data.len() as u64);
        t.machine.written(data.len() as u64, now)
    }

    fn queue_request(&mut self, id: FileId, peer: PeerId, index: u64) {
        let len = self
            .downloads
            .get(&id)
            .and_then(|t| t.machine.manifest())
            .and_then(|m| m.chunk_len(index))
            .map_or(0, u64::from);
        if len > 0 && self.requests.push((id, peer, index), len).is_err() {
            tracing::debug!(%peer, file = %id, chunk = index, "too many requests held back; dropped");
        }
    }

    /// Sends the chunk requests the download limit allows now, in order.
    pub(super) fn send_requests(&mut self, now: Instant) {
        while let Some((file, peer, index)) = self.requests.pop_ready(now) {
            self.net_send(FileCommand::Request {
                peer,
                file,
                asked: Asked::Chunk(index),
                frame: encode_request(&Request::GetChunk { file, index }),
            });
        }
    }

    /// Makes the chunks written durable, then records them: data first,
    /// then the record that says it is there.
    pub(super) fn persist(&mut self, id: FileId) {
        let Some(t) = self.downloads.get_mut(&id) else {
            return;
        };
        let (Some(have), Some(file)) = (t.machine.have(), t.file.as_ref()) else {
            return;
        };
        if let Err(e) = file.sync_data() {
            tracing::warn!("cannot sync {}: {e}", t.part.display());
            return;
        }
        match self.store.put_have(&id, have) {
            Ok(()) => t.machine.persisted(),
            Err(e) => tracing::warn!("cannot record download progress: {e}"),
        }
    }

    /// Every chunk is written: sync, move into place (decrypting a group
    /// file), record, and serve the file as a share.
    fn complete(&mut self, id: FileId) {
        let Some(t) = self.downloads.get_mut(&id) else {
            return;
        };
        if let Err(e) = finish_file(t) {
            t.fail(e);
            return;
        }
        let output = t.output.display().to_string();
        let Some(manifest) = t.machine.manifest().cloned() else {
            return;
        };
        // The finished copy is served like any share; it was verified chunk
        // by chunk, so its stamp now is its stamp as shared.
        let stamp = File::open(&t.output).ok().as_ref().and_then(stamp_of);
        let share = Share::new(t.output.clone(), t.key.clone(), manifest, stamp);
        let rec = DownloadRecord {
            output: output.clone(),
            state: RecordState::Complete,
            error: None,
            key: None,
        };
        let key_stored = match &t.key {
            Some(k) => self.store.put_share_key(&id, k),
            None => Ok(()),
        };
        if let Err(e) = key_stored
            .and_then(|()| self.store.put_share(&id, &output, stamp))
            .and_then(|()| self.store.put_download(&id, &rec))
        {
            // Not complete until recorded: asking again records it.
            t.fail(format!("cannot record the finished download: {e}"));
            return;
        }
        self.shares.insert(id, share);
        self.net_send(FileCommand::StartProviding(id));
        tracing::info!(file = %id, path = %output, "download complete");
    }
}

/// Opens (or creates, sparse) the partial file at `part` for `m`, and finds
/// the chunks it holds: those in `have`, and after a crash, those written
/// but not yet recorded, found by hashing the chunks that hold data.
///
/// The partial file is never reached through a symbolic link (`O_NOFOLLOW`)
/// and is created only if it does not exist (`O_EXCL`): nothing else's file
/// is sized or written. Before it is sized, the file system must have room
/// for the rest of the file: a peer's made-up manifest of 4 TiB is refused
/// rather than made into a sparse file that fills the disk later.
fn open_part(
    part: &Path,
    m: &Manifest,
    have: Option<Bitfield>,
) -> Result<(File, Bitfield), String> {
    let file = open_no_follow(part)?;
    let md = file
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", part.display()))?;
    if !md.is_file() {
        return Err(format!("{} is not a regular file", part.display()));
    }
    let len = md.len();
    if len != m.size() {
        use std::os::unix::fs::MetadataExt;
        let allocated = md.blocks().saturating_mul(512);
        let needed = m.size().saturating_sub(allocated);
        let free = free_space(&file)
            .map_err(|e| format!("cannot check free space for {}: {e}", part.display()))?;
        if needed > free {
            return Err(format!(
                "not enough space for {}: {needed} bytes needed, {free} free",
                part.display()
            ));
        }
        // Sparse: no space is written until chunks arrive.
        file.set_len(m.size())
            .map_err(|e| format!("cannot size {}: {e}", part.display()))?;
    }
    let mut bits = have
        .filter(|b| b.len() == m.chunk_count())
        .unwrap_or_else(|| Bitfield::new(m.chunk_count()));
    if len > 0 {
        let recovered = recover_chunks(&file, len, m, &mut bits);
        if recovered > 0 {
            tracing::info!(
                chunks = recovered,
                "recovered chunks written before a restart"
            );
        }
    }
    Ok((file, bits))
}

/// Opens the partial file without following a symbolic link, creating it
/// (exclusively) when it does not exist.
fn open_no_follow(part: &Path) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let no_follow = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).custom_flags(no_follow);
    let opened = match opts.open(part) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => opts.create_new(true).open(part),
        other => other,
    };
    opened.map_err(|e| {
        if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
            format!(
                "{} is a symbolic link; not writing through it",
                part.display()
            )
        } else {
            format!("cannot open {}: {e}", part.display())
        }
    })
}

/// Bytes an unprivileged writer may still allocate on `file`'s file system.
fn free_space(file: &File) -> std::io::Result<u64> {
    let st = rustix::fs::fstatvfs(file)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Marks in `bits` the missing chunks of the first `len` bytes of `file`
/// that verify; returns how many. Only chunks holding data are read: holes
/// of the sparse file (never written) are skipped without hashing, so a
/// large, mostly empty partial file costs little at every restart.
fn recover_chunks(file: &File, len: u64, m: &Manifest, bits: &mut Bitfield) -> u64 {
    let mut buf = Vec::new();
    let mut recovered = 0u64;
    let missing: Vec<u64> = bits.iter_missing().collect();
    let mut data_from = 0u64;
    for i in missing {
        let (Some(clen), Some(off)) = (m.chunk_len(i), m.chunk_offset(i)) else {
            continue;
        };
        if off >= len {
            break;
        }
        let end = off + u64::from(clen);
        if data_from < off {
            // Where the next data at or after `off` starts; none: done.
            data_from = match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(off)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break,
                // No SEEK_DATA here: read every chunk.
                Err(_) => off,
            };
        }
        if data_from >= end {
            continue;
        }
        buf.resize(clen as usize, 0);
        if file.read_exact_at(&mut buf, off).is_ok() && m.verify_chunk(i, &buf) {
            bits.set(i);
            recovered += 1;
        }
    }
    recovered
}

/// Syncs the partial file and moves it to the output (a group file:
/// decrypted into a new file, so a crash half-way leaves the verified
/// ciphertext intact to start again from), then syncs the directory.
fn finish_file(t: &mut Transfer) -> Result<(), String> {
    if let Some(f) = t.file.as_ref()
        && let Err(e) = f.sync_all()
    {
        return Err(format!("cannot sync {}: {e}", t.part.display()));
    }
    t.file = None;
    if !t.part.exists() && t.output.exists() {
        // Moved into place already (recording it failed): nothing to move.
        return Ok(());
    }
    match (&t.key, t.machine.manifest()) {
        (Some(k), Some(m)) => {
            decrypt_to(&t.part, &t.output, k, m)
                .map_err(|e| format!("cannot decrypt into {}: {e}", t.output.display()))?;
            std::fs::remove_file(&t.part)
        }
        _ => std::fs::rename(&t.part, &t.output),
    }
    .map_err(|e| format!("cannot move the file to {}: {e}", t.output.display()))?;
    if let Some(parent) = t.output.parent()
        && let Ok(d) = File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Decrypts `src` (the ciphertext of manifest `m`) into `dst` through a
/// temporary file, synced, then renamed. A sealed chunk that does not open
/// (the key is not the file's) is an error and nothing is written at `dst`.
pub(super) fn decrypt_to(
    src: &Path,
    dst: &Path,
    key: &FileKey,
    m: &Manifest,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut tmp = dst.as_os_str().to_owned();
    tmp.push(".fogmesh-dec");
    let tmp = PathBuf::from(tmp);
    let mut input = File::open(src)?;
    let mut out = std::io::BufWriter::new(File::create(&tmp)?);
    let written = match key.scheme {
        KeyScheme::Stream => (|| {
            let mut buf = vec![0u8; 1 << 20];
            let mut offset = 0u64;
            loop {
                let n = input.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                key.apply(offset, &mut buf[..n]);
                out.write_all(&buf[..n])?;
                offset += n as u64;
            }
        })(),
        KeyScheme::Sealed => (|| {
            let mut buf = Vec::new();
            for i in 0..m.chunk_count() {
                let len = m.chunk_len(i).unwrap_or(0) as usize;
                buf.resize(len, 0);
                input.read_exact_at(&mut buf, m.chunk_offset(i).unwrap_or(0))?;
                let plain = key
                    .open_chunk(i, &buf)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                out.write_all(&plain)?;
            }
            Ok(())
        })(),
    };
    if let Err(e) = written {
        drop(out);
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, dst)
}
#[cfg(test)]
mod tests {
    use super::*;
    use fogmesh_protocols::files::manifest::manifest_of;
    use fogmesh_protocols::files::wire::{Response, decode_response_with_limit};
    use fogmesh_protocols::files::{MAX_CHUNK_SIZE, MAX_CHUNKS, MAX_MANIFEST_SIZE};

    /// A made-up manifest of `size` bytes in chunks of `chunk_size` (all
    /// hashes zero), decoded from its wire form as a peer would send it.
    fn made_up_manifest(size: u64, chunk_size: u32) -> Manifest {
        let count = size.div_ceil(u64::from(chunk_size)) as usize;
        let text = |out: &mut Vec<u8>, s: &str| {
            out.push(0x60 + s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        };
        let mut b = vec![0xa2];
        text(&mut b, "v");
        b.push(0x01);
        text(&mut b, "m");
        b.push(0xa1);
        text(&mut b, "Manifest");
        b.push(0xa4);
        text(&mut b, "v");
        b.push(0x01);
        text(&mut b, "size");
        b.push(0x1b);
        b.extend_from_slice(&size.to_be_bytes());
        text(&mut b, "chunk_size");
        b.push(0x1a);
        b.extend_from_slice(&chunk_size.to_be_bytes());
        text(&mut b, "hashes");
        b.push(0x5a);
        b.extend_from_slice(&((count * 32) as u32).to_be_bytes());
        b.resize(b.len() + count * 32, 0);
        match decode_response_with_limit(&b, MAX_MANIFEST_SIZE + 1024) {
            Ok(Response::Manifest(m)) => m,
            other => panic!("not a manifest: {other:?}"),
        }
    }

    #[test]
    fn a_partial_file_is_never_opened_through_a_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").expect("write");
        let part = dir.path().join("out.fogmesh-part");
        std::os::unix::fs::symlink(&victim, &part).expect("symlink");
        let m = manifest_of(&[7u8; 5000], None).expect("manifest");
        let err = open_part(&part, &m, None).expect_err("must refuse a symlink");
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(&victim).expect("read"), b"precious");
        // A dangling symlink is not created through either.
        let elsewhere = dir.path().join("elsewhere");
        let part2 = dir.path().join("two.fogmesh-part");
        std::os::unix::fs::symlink(&elsewhere, &part2).expect("symlink");
        assert!(open_part(&part2, &m, None).is_err());
        assert!(!elsewhere.exists(), "created through a dangling symlink");
    }

    #[test]
    fn a_made_up_4_tib_manifest_is_refused_before_any_space_is_claimed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let part = dir.path().join("huge.fogmesh-part");
        let m = made_up_manifest(MAX_CHUNKS * u64::from(MAX_CHUNK_SIZE), MAX_CHUNK_SIZE);
        assert_eq!(m.size(), 4 << 40);
        let err = open_part(&part, &m, None).expect_err("4 TiB cannot fit here");
        assert!(err.contains("not enough space"), "{err}");
        let len = std::fs::metadata(&part).map_or(0, |md| md.len());
        assert_eq!(len, 0, "the partial file was sized");
    }

    #[test]
    fn at_restart_chunks_written_are_recovered_and_holes_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let part = dir.path().join("f.fogmesh-part");
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 253) as u8).collect();
        let mut b = fogmesh_protocols::files::ManifestBuilder::new(1024).expect("builder");
        b.update(&data);
        let m = b.finish(None).expect("manifest");
        let (f, bits) = open_part(&part, &m, None).expect("open");
        assert_eq!(bits.count(), 0);
        // Chunks 5 and 63 written, then a crash before they were recorded.
        for i in [5u64, 63] {
            let off = m.chunk_offset(i).expect("offset");
            let len = m.chunk_len(i).expect("len") as usize;
            f.write_all_at(&data[off as usize..off as usize + len], off)
                .expect("write");
        }
        drop(f);
        let (_, bits) = open_part(&part, &m, None).expect("reopen");
        let held: Vec<u64> = bits.iter_set().collect();
        assert_eq!(held, [5, 63]);
    }
}
