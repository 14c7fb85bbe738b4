//! Durable state in one redb database (`fogmesh.redb` in the data
//! directory).
//!
//! redb commits are durable when `commit` returns (fsync), so anything the
//! node acknowledged after a commit survives `kill -9`. redb also locks the
//! file: a second daemon on the same data directory gets
//! [`StoreError::InUse`].
//!
//! Tables are declared here, one per kind of record, each with its own small
//! API. Values are JSON: records are small and a human can inspect them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use libp2p::{Multiaddr, PeerId};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// The database file's name inside the data directory.
pub const DB_FILE: &str = "fogmesh.redb";

/// Peers learned from the network: peer id (base58) to [`PeerRecord`].
const PEERS: TableDefinition<&str, &[u8]> = TableDefinition::new("peers");

/// At most this many addresses are kept per peer (newest first).
pub const MAX_ADDRS_PER_PEER: usize = 8;
/// At most this many peers are kept; the least recently seen go first.
pub const MAX_PEERS: usize = 4096;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process holds the database open.
    #[error(
        "data directory {0} is in use by another fogmesh daemon (stop it first, or pass another --data-dir)"
    )]
    InUse(PathBuf),
    /// Any other database error.
    #[error("database error: {0}")]
    Db(String),
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// What the node remembers of a peer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerRecord {
    /// Addresses the peer was reached at or announced, newest first.
    pub addrs: Vec<Multiaddr>,
    /// Unix time (seconds) the peer was last connected.
    pub last_seen: u64,
    /// The peer's agent version, from identify.
    pub agent: Option<String>,
}

/// The node's database. Cheap to clone; every method blocks on disk I/O, so
/// async code calls it from `spawn_blocking` or a dedicated task.
#[derive(Clone, Debug)]
pub struct Store {
    db: Arc<Database>,
}

impl Store {
    /// Opens (or creates) the database in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(data_dir, None)
    }

    /// Like [`open`](Self::open), with a page cache of at most
    /// `cache_bytes` (redb's default when `None`): the simulator runs a
    /// thousand nodes in one process and keeps their caches small.
    pub fn open_with_cache(
        data_dir: &Path,
        cache_bytes: Option<usize>,
    ) -> Result<Self, StoreError> {
        let path = data_dir.join(DB_FILE);
        let mut builder = redb::Builder::new();
        if let Some(bytes) = cache_bytes {
            builder.set_cache_size(bytes);
        }
        let db = match builder.create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::InUse(data_dir.to_path_buf()));
            }
            Err(e) => return Err(db_err(e)),
        };
        // The database holds the plaintext history: private whatever the
        // umask was when it was created.
        crate::fsutil::restrict_to_owner(&path, false).map_err(db_err)?;
        // Create the tables up front so that readers never see them missing.
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(PEERS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Store { db: Arc::new(db) })
    }

    /// The underlying database, for protocol modules that declare their own
    /// tables.
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// Records that `peer` is reachable at `addrs` (merged with what is
    /// known, newest first) and was seen now.
    pub fn upsert_peer(
        &self,
        peer: &PeerId,
        addrs: &[Multiaddr],
        agent: Option<&str>,
    ) -> Result<(), StoreError> {
        self.upsert_peers([(peer, addrs, agent)])
    }

    /// [`Store::upsert_peer`] for each of `seen` in order, in one
    /// transaction (one commit for a burst of connections).
    pub fn upsert_peers<'a>(
        &self,
        seen: impl IntoIterator<Item = (&'a PeerId, &'a [Multiaddr], Option<&'a str>)>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = tx.open_table(PEERS).map_err(db_err)?;
            for (peer, addrs, agent) in seen {
                let key = peer.to_base58();
                let mut rec: PeerRecord = match table.get(key.as_str()).map_err(db_err)? {
                    Some(v) => serde_json::from_slice(v.value()).unwrap_or_default(),
                    None => PeerRecord::default(),
                };
                for a in addrs.iter().rev() {
                    let a = strip_p2p(a);
                    rec.addrs.retain(|x| x != &a);
                    rec.addrs.insert(0, a);
                }
                rec.addrs.truncate(MAX_ADDRS_PER_PEER);
                rec.last_seen = unix_now();
                if let Some(agent) = agent {
                    rec.agent = Some(agent.chars().take(128).collect());
                }
                let bytes = serde_json::to_vec(&rec).map_err(db_err)?;
                table
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    /// Every remembered peer, most recently seen first. Records that do not
    /// decode are skipped.
    pub fn peers(&self) -> Result<Vec<(PeerId, PeerRecord)>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(PEERS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            let (Ok(peer), Ok(rec)) = (
                k.value().parse::<PeerId>(),
                serde_json::from_slice::<PeerRecord>(v.value()),
            ) else {
                tracing::warn!(key = k.value(), "skipping an unreadable peer record");
                continue;
            };
            out.push((peer, rec));
        }
        out.sort_by_key(|p| std::cmp::Reverse(p.1.last_seen));
        Ok(out)
    }

    /// Keeps only the `MAX_PEERS` most recently seen peers.
    pub fn prune_peers(&self) -> Result<usize, StoreError> {
        let peers = self.peers()?;
        if peers.len() <= MAX_PEERS {
            return Ok(0);
        }
        let tx = self.db.begin_write().map_err(db_err)?;
        let mut removed = 0;
        {
            let mut table = tx.open_table(PEERS).map_err(db_err)?;
            for (peer, _) in &peers[MAX_PEERS..] {
                table.remove(peer.to_base58().as_str()).map_err(db_err)?;
                removed += 1;
            }
        }
        tx.commit().map_err(db_err)?;
        Ok(removed)
    }
}

/// Removes a trailing `/p2p/<id>` so that stored addresses are transport
/// addresses only.
pub fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    let mut a = addr.clone();
    if matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
        a.pop();
    }
    a
}

/// The peer id an address ends with (`.../p2p/<id>`), if any.
pub fn last_peer(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => Some(p),
        _ => None,
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_persist_and_merge() {
        let dir = tempfile::tempdir().expect("tempdir");
        let peer = PeerId::random();
        let a1: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("ma");
        let a2: Multiaddr = "/ip4/127.0.0.1/tcp/2".parse().expect("ma");
        {
            let store = Store::open(dir.path()).expect("open");
            store
                .upsert_peer(&peer, std::slice::from_ref(&a1), Some("x"))
                .expect("upsert");
            store
                .upsert_peer(&peer, &[a2.clone(), a1.clone()], None)
                .expect("upsert");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let peers = store.peers().expect("peers");
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].0, peer);
        assert_eq!(peers[0].1.addrs, vec![a2, a1]);
        assert_eq!(peers[0].1.agent.as_deref(), Some("x"));
    }

    /// A batch merges as the same updates one by one would, each peer on
    /// its own record.
    #[test]
    fn a_batch_of_peers_is_one_write_with_the_same_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, q) = (PeerId::random(), PeerId::random());
        let a1: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("ma");
        let a2: Multiaddr = "/ip4/127.0.0.1/tcp/2".parse().expect("ma");
        let store = Store::open(dir.path()).expect("open");
        store
            .upsert_peers([
                (&p, std::slice::from_ref(&a1), Some("x")),
                (&q, std::slice::from_ref(&a2), None),
                (&p, std::slice::from_ref(&a2), None),
            ])
            .expect("upsert");
        let mut peers = store.peers().expect("peers");
        peers.sort_by_key(|(peer, _)| *peer != p);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].0, p);
        assert_eq!(peers[0].1.addrs, vec![a2.clone(), a1]);
        assert_eq!(peers[0].1.agent.as_deref(), Some("x"));
        assert_eq!(peers[1].0, q);
        assert_eq!(peers[1].1.addrs, vec![a2]);
    }

    #[test]
    fn second_open_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Store::open(dir.path()).expect("open");
        match Store::open(dir.path()) {
            Err(StoreError::InUse(_)) => {}
            other => panic!("expected InUse, got {other:?}"),
        }
    }
}
