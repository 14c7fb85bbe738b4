//! File-sharing state in the node's redb database.
//!
//! - `file_manifests`: file id to its manifest, as the wire frame
//!   (`Response::Manifest`), so what is stored is exactly what is served;
//! - `file_shares`: file id to the path of a complete copy this node serves;
//! - `file_downloads`: file id to a [`DownloadRecord`] (JSON);
//! - `file_have`: file id to the chunks held of an unfinished download, as a
//!   `Response::Have` frame. It is written at most every second; chunks
//!   written to the partial file after the last write are found again at
//!   restart by hashing them (see `files::download`);
//! - `file_share_keys`: file id to the content key of a group file this
//!   node shares (made when it shared the file, or the key its download
//!   used). Written by this node's own actions only, never from a message;
//! - `file_link_keys`: (file id, group, sender) to the key of a link that
//!   sender posted in that group. Keys from different senders never
//!   overwrite each other; a download uses the key of the link fetched.
//!   At most [`MAX_LINK_KEYS_PER_SENDER`] per (group, sender) and
//!   [`MAX_LINK_KEYS_PER_GROUP`] per group, oldest dropped, tracked in
//!   `file_link_keys_order`, `file_link_keys_by_sender` and
//!   `file_link_keys_count` (keys recorded before these existed are
//!   outside the count and never dropped).
//!
//! `file_keys` (file id to a key, written from any group message) is the
//! table before link version 2: a peer could overwrite a sharer's key in
//! it. It is only read, for shares and downloads recorded before.

use fogmesh_protocols::files::wire::{Response, decode_response_with_limit, encode_response};
use fogmesh_protocols::files::{Bitfield, FileId, FileKey, MAX_MANIFEST_SIZE, Manifest};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::storage::{Store, StoreError};

const MANIFESTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("file_manifests");
const SHARES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("file_shares");
const DOWNLOADS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("file_downloads");
const HAVE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("file_have");
/// The table before link version 2 (file id to a key from any message):
/// read only.
const LEGACY_KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("file_keys");
/// File id to the key of a group file this node shares.
const SHARE_KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("file_share_keys");
/// (file id, group id, sender) to the key of the link the sender posted.
type LinkKey<'a> = (&'a [u8], &'a [u8], &'a str);
const LINK_KEYS: TableDefinition<LinkKey, &[u8]> = TableDefinition::new("file_link_keys");

/// Received link keys kept per (group, sender): beyond it, that sender's
/// oldest is dropped (a member flooding links only cycles its own).
pub(crate) const MAX_LINK_KEYS_PER_SENDER: u64 = 256;
/// Received link keys kept per group, all senders together: beyond it, the
/// group's oldest is dropped.
pub(crate) const MAX_LINK_KEYS_PER_GROUP: u64 = 4096;

/// (group, order) to (file id, sender): the group's received keys, oldest
/// first.
type OrderKey<'a> = (&'a [u8], u64);
type OrderValue<'a> = (&'a [u8], &'a str);
const LINK_ORDER: TableDefinition<OrderKey, OrderValue> =
    TableDefinition::new("file_link_keys_order");
/// (group, sender, order) to file id: one sender's received keys in a
/// group, oldest first.
const LINK_BY_SENDER: TableDefinition<(&[u8], &str, u64), &[u8]> =
    TableDefinition::new("file_link_keys_by_sender");
/// Group to how many received keys it holds.
const LINK_COUNT: TableDefinition<&[u8], u64> = TableDefinition::new("file_link_keys_count");

/// Records the key of every file link in a group message `text` from
/// `sender` in `group`, under (file, group, sender): part of the groups'
/// transaction that delivers the message. A new key beyond
/// [`MAX_LINK_KEYS_PER_SENDER`] or [`MAX_LINK_KEYS_PER_GROUP`] drops the
/// sender's (or the group's) oldest; a key for a (file, group, sender)
/// already held replaces it in place.
pub(crate) fn record_link_keys(
    tx: &redb::WriteTransaction,
    group: &[u8],
    sender: &str,
    text: &str,
) -> Result<(), StoreError> {
    let links = fogmesh_protocols::files::find_links(text);
    if links.iter().all(|l| l.key.is_none()) {
        return Ok(());
    }
    let mut t = LinkTables::open(tx)?;
    for link in links {
        let Some(k) = link.key else { continue };
        if !t.add(group, sender, link.id.0.as_slice(), &k.to_bytes())? {
            continue;
        }
        // The sender's oldest, then the group's.
        if t.of_sender(group, sender)? > MAX_LINK_KEYS_PER_SENDER
            && let Some((at, file)) = t.senders_oldest(group, sender)?
        {
            t.remove_key(group, at, &file, sender)?;
        }
        if t.of_group(group)? > MAX_LINK_KEYS_PER_GROUP
            && let Some((at, file, s)) = t.groups_oldest(group)?
        {
            t.remove_key(group, at, &file, &s)?;
        }
    }
    Ok(())
}

/// The received keys' table and its three indexes, open in one write
/// transaction.
struct LinkTables<'t> {
    keys: redb::Table<'t, LinkKey<'static>, &'static [u8]>,
    order: redb::Table<'t, OrderKey<'static>, OrderValue<'static>>,
    by_sender: redb::Table<'t, (&'static [u8], &'static str, u64), &'static [u8]>,
    count: redb::Table<'t, &'static [u8], u64>,
}

impl<'t> LinkTables<'t> {
    fn open(tx: &'t redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            keys: tx.open_table(LINK_KEYS).map_err(db_err)?,
            order: tx.open_table(LINK_ORDER).map_err(db_err)?,
            by_sender: tx.open_table(LINK_BY_SENDER).map_err(db_err)?,
            count: tx.open_table(LINK_COUNT).map_err(db_err)?,
        })
    }

    /// Records `key` for (file, group, sender); returns whether it is new
    /// (a key already held is replaced in place, its order kept).
    fn add(
        &mut self,
        group: &[u8],
        sender: &str,
        file: &[u8],
        key: &[u8],
    ) -> Result<bool, StoreError> {
        let old = self
            .keys
            .insert((file, group, sender), key)
            .map_err(db_err)?
            .is_some();
        if old {
            return Ok(false);
        }
        let next = match self
            .order
            .range((group, 0)..=(group, u64::MAX))
            .map_err(db_err)?
            .next_back()
        {
            Some(e) => e.map_err(db_err)?.0.value().1 + 1,
            None => 0,
        };
        self.order
            .insert((group, next), (file, sender))
            .map_err(db_err)?;
        self.by_sender
            .insert((group, sender, next), file)
            .map_err(db_err)?;
        let n = self.of_group(group)? + 1;
        self.count.insert(group, n).map_err(db_err)?;
        Ok(true)
    }

    /// Keys held from `sender` in `group`.
    fn of_sender(&self, group: &[u8], sender: &str) -> Result<u64, StoreError> {
        Ok(self
            .by_sender
            .range((group, sender, 0)..=(group, sender, u64::MAX))
            .map_err(db_err)?
            .count() as u64)
    }

    /// Keys held in `group`.
    fn of_group(&self, group: &[u8]) -> Result<u64, StoreError> {
        Ok(self
            .count
            .get(group)
            .map_err(db_err)?
            .map_or(0, |v| v.value()))
    }

    /// The oldest key from `sender` in `group`: its order and file.
    fn senders_oldest(
        &self,
        group: &[u8],
        sender: &str,
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .by_sender
            .range((group, sender, 0)..=(group, sender, u64::MAX))
            .map_err(db_err)?
            .next()
            .transpose()
            .map_err(db_err)?
            .map(|(k, v)| (k.value().2, v.value().to_vec())))
    }

    /// The oldest key in `group`: its order, file and sender.
    fn groups_oldest(&self, group: &[u8]) -> Result<Option<(u64, Vec<u8>, String)>, StoreError> {
        Ok(self
            .order
            .range((group, 0)..=(group, u64::MAX))
            .map_err(db_err)?
            .next()
            .transpose()
            .map_err(db_err)?
            .map(|(k, v)| {
                let (f, s) = v.value();
                (k.value().1, f.to_vec(), s.to_owned())
            }))
    }

    /// Forgets one received key (its row and its two index entries).
    fn remove_key(
        &mut self,
        group: &[u8],
        at: u64,
        file: &[u8],
        sender: &str,
    ) -> Result<(), StoreError> {
        self.keys.remove((file, group, sender)).map_err(db_err)?;
        self.order.remove((group, at)).map_err(db_err)?;
        self.by_sender.remove((group, sender, at)).map_err(db_err)?;
        let n = self.of_group(group)?;
        self.count
            .insert(group, n.saturating_sub(1))
            .map_err(db_err)?;
        Ok(())
    }
}

/// A key received in a link: the group and the sender it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReceivedKey {
    pub(crate) group: Vec<u8>,
    pub(crate) sender: String,
    pub(crate) key: FileKey,
}

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
    /// The content key it decrypts with (hex of [`FileKey::to_bytes`]);
    /// absent for a plain file (and in records before link version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key: Option<String>,
}

impl DownloadRecord {
    /// The key recorded, if any.
    pub(crate) fn file_key(&self) -> Option<FileKey> {
        self.key
            .as_deref()
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| FileKey::from_bytes(&b))
    }
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
        tx.open_table(LEGACY_KEYS).map_err(db_err)?;
        tx.open_table(SHARE_KEYS).map_err(db_err)?;
        tx.open_table(LINK_KEYS).map_err(db_err)?;
        tx.open_table(LINK_ORDER).map_err(db_err)?;
        tx.open_table(LINK_BY_SENDER).map_err(db_err)?;
        tx.open_table(LINK_COUNT).map_err(db_err)?;
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

    /// Records the key of a group file this node shares (its own share, or
    /// a download it finished with that key).
    pub(crate) fn put_share_key(&self, id: &FileId, key: &FileKey) -> Result<(), StoreError> {
        let tx = self.store.db().begin_write().map_err(db_err)?;
        tx.open_table(SHARE_KEYS)
            .map_err(db_err)?
            .insert(id.0.as_slice(), key.to_bytes().as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// The key of a group file this node shares; for a share recorded
    /// before link version 2, the old table's (serving checks every chunk
    /// against the manifest, so a key overwritten there stops the share
    /// rather than serving garbage).
    pub(crate) fn share_key(&self, id: &FileId) -> Result<Option<FileKey>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let own = tx.open_table(SHARE_KEYS).map_err(db_err)?;
        if let Some(v) = own.get(id.0.as_slice()).map_err(db_err)? {
            return Ok(FileKey::from_bytes(v.value()));
        }
        self.legacy_key(id)
    }

    /// The key in the table before link version 2, for downloads recorded
    /// before it.
    pub(crate) fn legacy_key(&self, id: &FileId) -> Result<Option<FileKey>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let t = tx.open_table(LEGACY_KEYS).map_err(db_err)?;
        Ok(t.get(id.0.as_slice())
            .map_err(db_err)?
            .and_then(|v| FileKey::from_bytes(v.value())))
    }

    /// Every key received in a link to `id`, with its group and sender.
    pub(crate) fn link_keys(&self, id: &FileId) -> Result<Vec<ReceivedKey>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let t = tx.open_table(LINK_KEYS).map_err(db_err)?;
        let f = id.0.as_slice();
        let mut out = Vec::new();
        for e in t.range((f, &[][..], "")..).map_err(db_err)? {
            let (k, v) = e.map_err(db_err)?;
            let (file, group, sender) = k.value();
            if file != f {
                break;
            }
            if let Some(key) = FileKey::from_bytes(v.value()) {
                out.push(ReceivedKey {
                    group: group.to_vec(),
                    sender: sender.to_owned(),
                    key,
                });
            }
        }
        Ok(out)
    }

    /// Removes every record of `id` (manifest, share, download, progress,
    /// the share's key) in one transaction; received link keys stay.
    pub(crate) fn forget(&self, id: &FileId) -> Result<(), StoreError> {
        let k = id.0.as_slice();
        let tx = self.store.db().begin_write().map_err(db_err)?;
        for table in [MANIFESTS, SHARES, DOWNLOADS, HAVE, SHARE_KEYS] {
            tx.open_table(table)
                .map_err(db_err)?
                .remove(k)
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
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

#[cfg(test)]
mod tests {
    use fogmesh_protocols::files::{FileLink, KeyScheme};

    use super::*;

    fn link(i: u32, key: u8) -> String {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&i.to_be_bytes());
        FileLink {
            id: FileId(id),
            key: Some(FileKey {
                bytes: [key; 32],
                scheme: KeyScheme::Sealed,
            }),
        }
        .to_string()
    }

    fn file(i: u32) -> FileId {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&i.to_be_bytes());
        FileId(id)
    }

    fn record(fs: &FileStore, group: &[u8], sender: &str, text: &str) {
        let tx = fs
            .store
            .db()
            .begin_write()
            .unwrap_or_else(|e| panic!("{e}"));
        record_link_keys(&tx, group, sender, text).unwrap_or_else(|e| panic!("{e}"));
        tx.commit().unwrap_or_else(|e| panic!("{e}"));
    }

    fn count(fs: &FileStore, group: &[u8], sender: Option<&str>, files: u32) -> usize {
        (0..files)
            .flat_map(|i| fs.link_keys(&file(i)).unwrap_or_else(|e| panic!("{e}")))
            .filter(|k| k.group == group && sender.is_none_or(|s| k.sender == s))
            .count()
    }

    #[test]
    fn received_link_keys_are_capped_per_sender_and_per_group() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let fs = FileStore::open(Store::open(dir.path()).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
        let g: &[u8] = &[1; 32];
        // An honest member's key, then a flood from another member (16
        // links per message, as many as a message may carry).
        record(&fs, g, "honest", &link(0, 9));
        let flood = MAX_LINK_KEYS_PER_SENDER as u32 + 100;
        for chunk in (1..=flood).collect::<Vec<_>>().chunks(16) {
            let text: Vec<String> = chunk.iter().map(|i| link(*i, 1)).collect();
            record(&fs, g, "flooder", &text.join(" "));
        }
        let files = flood + 1;
        assert_eq!(
            count(&fs, g, Some("flooder"), files),
            MAX_LINK_KEYS_PER_SENDER as usize
        );
        // The flooder's oldest went, its newest and the honest key stayed.
        assert!(fs.link_keys(&file(1)).is_ok_and(|k| k.is_empty()));
        assert_eq!(fs.link_keys(&file(flood)).map(|k| k.len()).ok(), Some(1));
        assert_eq!(count(&fs, g, Some("honest"), 1), 1);
        // Re-posting a held file replaces its key in place.
        record(&fs, g, "flooder", &link(flood, 2));
        assert_eq!(
            count(&fs, g, Some("flooder"), files),
            MAX_LINK_KEYS_PER_SENDER as usize
        );
        // Many senders: the group keeps its newest MAX_LINK_KEYS_PER_GROUP.
        let senders = (MAX_LINK_KEYS_PER_GROUP / MAX_LINK_KEYS_PER_SENDER) as u32 + 2;
        let per = MAX_LINK_KEYS_PER_SENDER as u32;
        let base = files;
        for s in 0..senders {
            let name = format!("member{s}");
            let ids: Vec<u32> = (0..per).map(|i| base + s * per + i).collect();
            for chunk in ids.chunks(16) {
                let text: Vec<String> = chunk.iter().map(|i| link(*i, 3)).collect();
                record(&fs, g, &name, &text.join(" "));
            }
        }
        let all = base + senders * per;
        assert_eq!(count(&fs, g, None, all), MAX_LINK_KEYS_PER_GROUP as usize);
        // The oldest (the honest key among them) went first.
        assert_eq!(count(&fs, g, Some("honest"), 1), 0);
        assert_eq!(fs.link_keys(&file(all - 1)).map(|k| k.len()).ok(), Some(1));
        // Another group is untouched by all this.
        let other: &[u8] = &[2; 32];
        record(&fs, other, "honest", &link(0, 9));
        assert_eq!(count(&fs, other, Some("honest"), 1), 1);
    }
}
