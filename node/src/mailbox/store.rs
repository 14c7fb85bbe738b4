//! The holder's tables: `mb_env` (envelope id to the envelope frame, as
//! deposited: sealed, nothing readable beyond its recipient) and
//! `mb_meta` (envelope id to who deposited it, for whom, its size and
//! lifetime). A deposit is committed before it is acknowledged, so a
//! holder killed with `kill -9` still delivers what it accepted.

use fogmesh_protocols::mailbox::Stored;
use fogmesh_protocols::mailbox::wire::Id;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::storage::{Store, StoreError};

const ENV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("mb_env");
const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("mb_meta");

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// The holder's tables in the node's database.
#[derive(Debug, Clone)]
pub(crate) struct HolderStore {
    store: Store,
}

impl HolderStore {
    pub(crate) fn open(store: Store) -> Result<Self, StoreError> {
        let tx = store.db().begin_write().map_err(db_err)?;
        tx.open_table(ENV).map_err(db_err)?;
        tx.open_table(META).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(HolderStore { store })
    }

    /// Every held envelope's record (the ledger is rebuilt from them).
    pub(crate) fn all(&self) -> Result<Vec<Stored>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let meta = tx.open_table(META).map_err(db_err)?;
        let mut out = Vec::new();
        for row in meta.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            match serde_json::from_slice::<Stored>(v.value()) {
                Ok(s) => out.push(s),
                Err(e) => tracing::warn!("unreadable mailbox record skipped: {e}"),
            }
        }
        Ok(out)
    }

    /// Stores one envelope and its record.
    pub(crate) fn put(&self, s: &Stored, envelope: &[u8]) -> Result<(), StoreError> {
        let json = serde_json::to_vec(s).map_err(db_err)?;
        let tx = self.store.db().begin_write().map_err(db_err)?;
        {
            tx.open_table(ENV)
                .map_err(db_err)?
                .insert(s.id.0.as_slice(), envelope)
                .map_err(db_err)?;
            tx.open_table(META)
                .map_err(db_err)?
                .insert(s.id.0.as_slice(), json.as_slice())
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// The envelope frames of `ids` (those still stored).
    pub(crate) fn get(&self, ids: &[Id]) -> Result<Vec<(Id, Vec<u8>)>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let env = tx.open_table(ENV).map_err(db_err)?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(v) = env.get(id.0.as_slice()).map_err(db_err)? {
                out.push((*id, v.value().to_vec()));
            }
        }
        Ok(out)
    }

    /// Removes `ids`.
    pub(crate) fn remove(&self, ids: &[Id]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let tx = self.store.db().begin_write().map_err(db_err)?;
        {
            let mut env = tx.open_table(ENV).map_err(db_err)?;
            let mut meta = tx.open_table(META).map_err(db_err)?;
            for id in ids {
                env.remove(id.0.as_slice()).map_err(db_err)?;
                meta.remove(id.0.as_slice()).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }
}
