//! File-sharing state in the node's redb database.
//!
//! - `file_manifests`: file id to its manifest, as the wire frame
//!   (`Response::Manifest`), so what is stored is exactly what is served;
//! - `file_shares`: file id to the path of a complete copy this node serves;
//! - `file_downloads`: file id to a [`DownloadRecord`] (JSON);
//! - `file_have`: file id to the chunks held of an unfinished download, as a
//!   `Response::Have` frame. It is written at most every second; chunks
//!   written to the partial file after the last write are found again at
//!   restart by hashing them (see `files::download`).

use fogmesh_protocols::files::wire::{Response, decode_response_with_limit, encode_response};
use fogmesh_protocols::files::{Bitfield, FileId, FileKey, MAX_MANIFEST_SIZE, Manifest};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::storage::{Store, StoreError};

const MANIFESTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("file_manifests");
const SHARES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("file_shares");
const DOWNLOADS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("file_downloads");
const HAVE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("file_have");
/// File id to the content key of a group file (learned from a group
/// message, or made when sharing with a group).
pub(crate) const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("file_keys");

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// A share as stored: where the file is, and its size and modification
/// time when it was hashed (a file whose stamp differs has changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stamp {
    pub(crate) len: u64,
    pub(crate) mtime_ns: i128,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShareRecord {
    path: String,
    stamp: Option<Stamp>,
}

/// Where a stored download is (stored as `"downloading"` or `"complete"`;
/// a record that is neither is skipped at start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RecordState {
    /// Resumed at start.
    Downloading,
    /// Done: the file is a share now.
    Complete,
}

/// A download as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DownloadRecord {
    /// Where the finished file goes.
    pub(crate) output: String,
    /// Where it is.
    pub(crate) state: RecordState,
    /// Why it failed.
    pub(crate) error: Option<String>,
}

/// The file tables of a [`Store`].
#[derive(Debug, Clone)]
pub(crate) struct FileStore {
    store: Store,
}

impl FileStore {
    pub(crate) fn open(store: Store) -> Result<Self, StoreError> {
        let tx = store.db().begin_write().map_err(db_err)?;
        tx.open_table(MANIFESTS).map_err(db_err)?;
        tx.open_table(SHARES).map_err(db_err)?;
        tx.open_table(DOWNLOADS).map_err(db_err)?;
        tx.open_table(HAVE).map_err(db_err)?;
        tx.open_table(KEYS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(FileStore { store })
    }

    pub(crate) fn put_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        let id = m.id();
        let frame = encode_response(&Response::Manifest(m.clone()));
        let tx = self.store.db().begin_write().map_err(db_err)?;
        tx.open_table(MANIFESTS)
            .map_err(db_err)?
            .insert(id.0.as_slice(), frame.as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    pub(crate) fn manifest(&self, id: &FileId) -> Result<Option<Manifest>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let t = tx.open_table(MANIFESTS).map_err(db_err)?;
        let Some(v) = t.get(id.0.as_slice()).map_err(db_err)? else {
            return Ok(None);
        };
        match decode_response_with_limit(v.value(), MAX_MANIFEST_SIZE + 1024) {
            Ok(Response::Manifest(m)) if m.verify(id).is_ok() => Ok(Some(m)),
            _ => Err(StoreError::Db(format!(
                "stored manifest of {id} is corrupt"
            ))),
        }
    }

    pub(crate) fn put_share(
        &self,
        id: &FileId,
        path: &str,
        stamp: Option<Stamp>,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_vec(&ShareRecord {
            path: path.to_owned(),
            stamp,
        })
        .map_err(db_err)?;
        let tx = self.store.db().begin_write().map_err(db_err)?;
        tx.open_table(SHARES)
            .map_err(db_err)?
            .insert(id.0.as_slice(), json.as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    pub(crate) fn shares(&self) -> Result<Vec<(FileId, String, Option<Stamp>)>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let t = tx.open_table(SHARES).map_err(db_err)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(db_err)? {
            let (k, v) = e.map_err(db_err)?;
            if let (Ok(id), Ok(rec)) = (
                <[u8; 32]>::try_from(k.value()),
                serde_json::from_slice::<ShareRecord>(v.value()),
            ) {
                out.push((FileId(id), rec.path, rec.stamp));
            }
        }
        Ok(out)
    }

    pub(crate) fn put_download(&self, id: &FileId, rec: &DownloadRecord) -> Result<(), StoreError> {
        let json = serde_json::to_vec(rec).map_err(db_err)?;
        let tx = self.store.db().begin_write().map_err(db_err)?;
        {
            tx.open_table(DOWNLOADS)
                .map_err(db_err)?
                .insert(id.0.as_slice(), json.as_slice())
                .map_err(db_err)?;
            if rec.state != RecordState::Downloading {
                tx.open_table(HAVE)
                    .map_err(db_err)?
                    .remove(id.0.as_slice())
                    .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    pub(crate) fn downloads(&self) -> Result<Vec<(FileId, DownloadRecord)>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let t = tx.open_table(DOWNLOADS).map_err(db_err)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(db_err)? {
            let (k, v) = e.map_err(db_err)?;
            if let (Ok(id), Ok(rec)) = (
                <[u8; 32]>::try_from(k.value()),
                serde_json::from_slice::<DownloadRecord>(v.value()),
            ) {
                out.push((FileId(id), rec));
            }
        }
        Ok(out)
    }

    pub(crate) fn put_key(&self, id: &FileId, key: &FileKey) -> Result<(), StoreError> {
        let tx = self.store.db().begin_write().map_err(db_err)?;
        tx.open_table(KEYS)
            .map_err(db_err)?
            .insert(id.0.as_slice(), key.0.as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    pub(crate) fn key(&self, id: &FileId) -> Result<Option<FileKey>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let t = tx.open_table(KEYS).map_err(db_err)?;
        Ok(t.get(id.0.as_slice())
            .map_err(db_err)?
            .and_then(|v| <[u8; 32]>::try_from(v.value()).ok())
            .map(FileKey))
    }

    pub(crate) fn put_have(&self, id: &FileId, bits: &Bitfield) -> Result<(), StoreError> {
        let frame = encode_response(&Response::Have { bits: bits.clone() });
        let tx = self.store.db().begin_write().map_err(db_err)?;
        tx.open_table(HAVE)
            .map_err(db_err)?
            .insert(id.0.as_slice(), frame.as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    pub(crate) fn have(&self, id: &FileId) -> Result<Option<Bitfield>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let t = tx.open_table(HAVE).map_err(db_err)?;
        let Some(v) = t.get(id.0.as_slice()).map_err(db_err)? else {
            return Ok(None);
        };
        match decode_response_with_limit(v.value(), MAX_MANIFEST_SIZE) {
            Ok(Response::Have { bits }) => Ok(Some(bits)),
            _ => Ok(None),
        }
    }
}
