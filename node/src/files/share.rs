//! Sharing files: hashing a file into its manifest (on a thread of its
//! own), recording the share, and the stamp (size and modification time)
//! that tells whether a shared file is still the one hashed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fogmesh_protocols::files::crypt::{TAG_LEN, sealed_chunk_size};
use fogmesh_protocols::files::{
    FileKey, FileLink, KeyScheme, Manifest, ManifestBuilder, chunk_size_for,
};

use super::actor::FilesActor;
use super::store::Stamp;
use super::{FileCommand, FileStatus, Input, PART_SUFFIX};
use crate::actor::{Reply, ServiceError};

/// A complete copy of a file that this node serves.
pub(super) struct Share {
    pub(super) path: PathBuf,
    /// For a group file: the plaintext is on disk, chunks are encrypted
    /// with this key when served.
    pub(super) key: Option<FileKey>,
    pub(super) manifest: Manifest,
    /// Opened when first served.
    pub(super) file: Option<File>,
    /// Size and modification time when hashed: a file whose stamp differs
    /// has changed and is no longer served.
    pub(super) stamp: Option<Stamp>,
    /// The file changed on disk since it was shared: no longer served.
    pub(super) stale: bool,
}

impl Share {
    pub(super) fn new(
        path: PathBuf,
        key: Option<FileKey>,
        manifest: Manifest,
        stamp: Option<Stamp>,
    ) -> Self {
        Share {
            path,
            key,
            manifest,
            file: None,
            stamp,
            stale: false,
        }
    }
}

impl FilesActor {
    /// Hashes the file at `path` on a thread of its own (a large file takes
    /// seconds); the result comes back as [`Input::Hashed`] and the caller
    /// is answered then.
    pub(super) fn share(&mut self, path: PathBuf, encrypt: bool, reply: Reply<FileStatus>) {
        let key = encrypt.then(|| FileKey::generate(&mut rand::rng()));
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

    /// Records a hashed file as a share and announces it.
    pub(super) fn finish_share(
        &mut self,
        path: PathBuf,
        key: Option<FileKey>,
        result: Result<(Manifest, Stamp), String>,
        now: Instant,
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
            self.store.put_share_key(&id, k)?;
        }
        self.store.put_share(&id, &path_str, Some(stamp))?;
        let link = FileLink {
            id,
            key: key.clone(),
        }
        .to_string();
        self.shares
            .insert(id, Share::new(path, key, manifest, Some(stamp)));
        self.net_send(FileCommand::StartProviding(id));
        tracing::info!(file = %id, path = %path_str, "sharing");
        let mut st = self
            .status(&id, now)
            .ok_or_else(|| ServiceError::Internal("share vanished".into()))?;
        st.link = Some(link);
        Ok(st)
    }
}

/// Streams a file through the manifest builder (1 MiB at a time); with a
/// key, the manifest is of the encrypted content (sealed chunk by chunk).
pub(super) fn hash_file(path: &Path, key: Option<&FileKey>) -> Result<(Manifest, Stamp), String> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let md = f
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !md.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let before = stamp_of(&f);
    let read_err = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let sealed = key.filter(|k| k.scheme == KeyScheme::Sealed);
    let chunk_size = match sealed {
        Some(_) => sealed_chunk_size(md.len())
            .ok_or_else(|| format!("{} is too large to share with a group", path.display()))?,
        None => chunk_size_for(md.len()),
    };
    let mut b = ManifestBuilder::new(chunk_size).map_err(|e| e.to_string())?;
    if let Some(k) = sealed {
        // One plaintext chunk at a time, sealed with its index.
        let plain = (chunk_size - TAG_LEN) as usize;
        let mut buf = vec![0u8; plain];
        let mut index = 0u64;
        loop {
            let n = read_full(&mut f, &mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            b.update(&k.seal_chunk(index, &buf[..n]));
            index += 1;
            if n < plain {
                break;
            }
        }
    } else {
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            if let Some(k) = key {
                k.apply(offset, &mut buf[..n]);
            }
            offset += n as u64;
            b.update(&buf[..n]);
        }
    }
    // A file that changed while it was read has no one content to share.
    let stamp = match (before, stamp_of(&f)) {
        (Some(a), Some(b)) if a == b && b.len == md.len() => a,
        _ => {
            return Err(format!(
                "{} changed while it was being read; try again",
                path.display()
            ));
        }
    };
    // A group file's name would reveal what members share: it travels in
    // the (encrypted) group message instead.
    let name = match key {
        Some(_) => None,
        None => path
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| n.chars().take(255).collect::<String>())
            .filter(|n| n.len() <= 255 && fogmesh_protocols::files::manifest::is_plain_name(n)),
    };
    b.finish(name)
        .map(|m| (m, stamp))
        .map_err(|e| e.to_string())
}

/// Reads until `buf` is full or the end of the file; the bytes read.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Size and modification time of an open file.
pub(super) fn stamp_of(f: &File) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let md = f.metadata().ok()?;
    Some(Stamp {
        len: md.len(),
        mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
    })
}

/// Copies `src` to `dst` through a temporary file and a rename.
pub(super) fn copy_atomically(src: &Path, dst: &Path) -> std::io::Result<()> {
    let mut tmp = dst.as_os_str().to_owned();
    tmp.push(PART_SUFFIX);
    let tmp = PathBuf::from(tmp);
    std::fs::copy(src, &tmp)?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dst)
}

#[cfg(test)]
mod tests {
    use super::super::download::decrypt_to;
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
        // Stream scheme (link version 1): the keystream over the file.
        let key = FileKey::stream([3; 32]);
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
        decrypt_to(&ctp, &back, &key, &enc).expect("decrypt");
        assert_eq!(std::fs::read(&back).expect("read"), data);
        // Sealed (link version 2): chunk by chunk; another key is refused
        // and leaves no output.
        let key = FileKey::sealed([4; 32]);
        let (sealed, _) = hash_file(&p, Some(&key)).expect("hash");
        assert_eq!(sealed.chunk_size(), 256 * 1024);
        let plain = (sealed.chunk_size() - TAG_LEN) as usize;
        let ct: Vec<u8> = data
            .chunks(plain)
            .enumerate()
            .flat_map(|(i, c)| key.seal_chunk(i as u64, c))
            .collect();
        assert_eq!(sealed.size(), ct.len() as u64);
        for i in 0..sealed.chunk_count() {
            let off = sealed.chunk_offset(i).expect("offset") as usize;
            let len = sealed.chunk_len(i).expect("len") as usize;
            assert!(sealed.verify_chunk(i, &ct[off..off + len]));
        }
        std::fs::write(&ctp, &ct).expect("write");
        let back2 = dir.path().join("back2");
        decrypt_to(&ctp, &back2, &key, &sealed).expect("decrypt");
        assert_eq!(std::fs::read(&back2).expect("read"), data);
        let wrong = dir.path().join("wrong");
        let err = decrypt_to(&ctp, &wrong, &FileKey::sealed([5; 32]), &sealed)
            .expect_err("a wrong key must fail");
        assert!(err.to_string().contains("does not open"), "{err}");
        assert!(!wrong.exists());
    }
}
