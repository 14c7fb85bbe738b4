//! Group state in the node's redb database.
//!
//! What is stored is what the protocol needs to rebuild a group and what the
//! user reads back:
//! - `group_ops`: every membership op, by (group, index);
//! - `group_envelopes`: every valid message envelope received or sent
//!   (ciphertext, as on the wire), by (group, message id);
//! - `group_history`: delivered messages in delivery order, by (group,
//!   delivery index), as the JSON the API returns (plaintext);
//! - `group_delivered`: (group, message id) to delivery index, to find
//!   history entries and to avoid delivering twice;
//! - `group_outbox`: gossip frames not yet handed to gossipsub;
//! - `group_invites`: pending invitations, by group, as the JSON the API
//!   returns (nothing else of a group is stored before it is accepted);
//! - `group_declined`: declined groups, by group, with when (bounded).
//!
//! At start, rows of groups this node does not hold (no genesis op, or a
//! log that does not restore) are collected.
//!
//! Every change that follows one input (a received op, a local send) is one
//! write transaction, committed before anything is acknowledged, so `kill
//! -9` at any point loses nothing acknowledged. Received messages that
//! arrive together are committed together ([`GroupStore::commit_many`]:
//! one transaction, one fsync), and nothing of them is acknowledged (the
//! gossip verdict that forwards them, the event) before that commit.

use fogmesh_protocols::groups::wire;
use fogmesh_protocols::groups::{GroupId, MessageId, Op};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use std::collections::{BTreeSet, HashSet};

use super::MAX_DECLINED;
use crate::storage::{Store, StoreError};
use crate::types::{GroupInvite, GroupMessage};

type GroupIndexKey<'a> = (&'a [u8], u64);
type GroupIdKey<'a> = (&'a [u8], &'a [u8]);

const OPS: TableDefinition<GroupIndexKey, &[u8]> = TableDefinition::new("group_ops");
const ENVELOPES: TableDefinition<GroupIdKey, &[u8]> = TableDefinition::new("group_envelopes");
const HISTORY: TableDefinition<GroupIndexKey, &[u8]> = TableDefinition::new("group_history");
const DELIVERED: TableDefinition<GroupIdKey, u64> = TableDefinition::new("group_delivered");
const OUTBOX: TableDefinition<GroupIdKey, &[u8]> = TableDefinition::new("group_outbox");
const INVITES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("group_invites");
const DECLINED: TableDefinition<&[u8], u64> = TableDefinition::new("group_declined");

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// One write transaction's worth of group changes.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) ops: Vec<(u64, Vec<u8>)>,
    pub(crate) envelopes: Vec<(MessageId, Vec<u8>)>,
    /// Delivered messages; their delivery index is assigned on commit.
    pub(crate) delivered: Vec<GroupMessage>,
    pub(crate) outbox_add: Vec<(MessageId, Vec<u8>)>,
}

impl Batch {
    /// A batch of consecutive ops, the first at log index `first`.
    pub(crate) fn of_ops(first: u64, ops: &[Op]) -> Self {
        Batch {
            ops: ops
                .iter()
                .enumerate()
                .map(|(i, op)| (first + i as u64, wire::encode_op(op)))
                .collect(),
            ..Batch::default()
        }
    }

    /// Appends `other` (applied after what is in `self`).
    pub(crate) fn extend(&mut self, other: Batch) {
        self.ops.extend(other.ops);
        self.envelopes.extend(other.envelopes);
        self.delivered.extend(other.delivered);
        self.outbox_add.extend(other.outbox_add);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ops.is_empty()
            && self.envelopes.is_empty()
            && self.delivered.is_empty()
            && self.outbox_add.is_empty()
    }
}

/// The group tables of a [`Store`].
#[derive(Debug, Clone)]
pub(crate) struct GroupStore {
    store: Store,
    commits: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Writes one group's batch into `tx`; returns the delivered messages with
/// their delivery index set, skipping any already delivered (in an earlier
/// transaction or earlier in this one).
fn write_batch(
    tx: &redb::WriteTransaction,
    group: &GroupId,
    batch: Batch,
) -> Result<Vec<GroupMessage>, StoreError> {
    let g: &[u8] = &group.0;
    let mut delivered = Vec::with_capacity(batch.delivered.len());
    let mut ops = tx.open_table(OPS).map_err(db_err)?;
    for (index, bytes) in &batch.ops {
        ops.insert((g, *index), bytes.as_slice()).map_err(db_err)?;
    }
    let mut envs = tx.open_table(ENVELOPES).map_err(db_err)?;
    for (id, bytes) in &batch.envelopes {
        envs.insert((g, id.0.as_slice()), bytes.as_slice())
            .map_err(db_err)?;
    }
    let mut history = tx.open_table(HISTORY).map_err(db_err)?;
    let mut seen = tx.open_table(DELIVERED).map_err(db_err)?;
    let mut next = match history
        .range((g, 0)..=(g, u64::MAX))
        .map_err(db_err)?
        .next_back()
    {
        Some(entry) => entry.map_err(db_err)?.0.value().1 + 1,
        None => 0,
    };
    for mut msg in batch.delivered {
        let id = hex_id(&msg.id)?;
        if seen.get((g, id.as_slice())).map_err(db_err)?.is_some() {
            continue;
        }
        msg.index = next;
        let json = serde_json::to_vec(&msg).map_err(db_err)?;
        history.insert((g, next), json.as_slice()).map_err(db_err)?;
        seen.insert((g, id.as_slice()), next).map_err(db_err)?;
        next += 1;
        delivered.push(msg);
    }
    // File links with keys in delivered messages, kept per (file, group,
    // sender): how a member later fetches and decrypts a file shared with
    // the group (see files::store).
    for msg in &delivered {
        crate::files::store::record_link_keys(tx, g, &msg.sender, &msg.text)?;
    }
    let mut outbox = tx.open_table(OUTBOX).map_err(db_err)?;
    for (id, frame) in &batch.outbox_add {
        outbox
            .insert((g, id.0.as_slice()), frame.as_slice())
            .map_err(db_err)?;
    }
    Ok(delivered)
}

impl GroupStore {
    pub(crate) fn open(store: Store) -> Result<Self, StoreError> {
        let tx = store.db().begin_write().map_err(db_err)?;
        tx.open_table(OPS).map_err(db_err)?;
        tx.open_table(ENVELOPES).map_err(db_err)?;
        tx.open_table(HISTORY).map_err(db_err)?;
        tx.open_table(DELIVERED).map_err(db_err)?;
        tx.open_table(OUTBOX).map_err(db_err)?;
        tx.open_table(INVITES).map_err(db_err)?;
        tx.open_table(DECLINED).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(GroupStore {
            store,
            commits: Default::default(),
        })
    }

    /// Commits `batch` for `group`; returns the delivered messages with
    /// their delivery index set, skipping any already delivered.
    pub(crate) fn commit(
        &self,
        group: &GroupId,
        batch: Batch,
    ) -> Result<Vec<GroupMessage>, StoreError> {
        let mut out = self.commit_many(vec![(*group, batch)])?;
        Ok(out.pop().map(|(_, d)| d).unwrap_or_default())
    }

    /// Commits several groups' batches in one write transaction (one
    /// fsync for a burst of received messages); returns each group's
    /// delivered messages as [`commit`](Self::commit) does, in order.
    pub(crate) fn commit_many(
        &self,
        batches: Vec<(GroupId, Batch)>,
    ) -> Result<Vec<(GroupId, Vec<GroupMessage>)>, StoreError> {
        let tx = self.store.db().begin_write().map_err(db_err)?;
        let mut out = Vec::with_capacity(batches.len());
        for (group, batch) in batches {
            let delivered = write_batch(&tx, &group, batch)?;
            out.push((group, delivered));
        }
        tx.commit().map_err(db_err)?;
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(out)
    }

    /// Write transactions committed by [`commit_many`](Self::commit_many)
    /// since the store was opened (for tests and benchmarks).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` with a lookup of `group`'s stored envelopes, all read in
    /// one read transaction (redb serves readers alongside the writer: the
    /// sync worker answers peers while the actor commits).
    pub(crate) fn with_envelopes<R>(
        &self,
        group: &GroupId,
        f: impl FnOnce(&mut dyn FnMut(&MessageId) -> Option<Vec<u8>>) -> R,
    ) -> Result<R, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let envs = tx.open_table(ENVELOPES).map_err(db_err)?;
        let g: &[u8] = &group.0;
        let mut lookup = |id: &MessageId| {
            envs.get((g, id.0.as_slice()))
                .ok()
                .flatten()
                .map(|v| v.value().to_vec())
        };
        Ok(f(&mut lookup))
    }

    /// Removes a published frame from the outbox.
    pub(crate) fn outbox_done(&self, group: &GroupId, id: &MessageId) -> Result<(), StoreError> {
        let tx = self.store.db().begin_write().map_err(db_err)?;
        tx.open_table(OUTBOX)
            .map_err(db_err)?
            .remove((group.0.as_slice(), id.0.as_slice()))
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Every frame waiting in the outbox.
    pub(crate) fn outbox(&self) -> Result<Vec<(GroupId, MessageId, Vec<u8>)>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let table = tx.open_table(OUTBOX).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let (g, id) = k.value();
            if let (Ok(g), Ok(id)) = (<[u8; 32]>::try_from(g), <[u8; 32]>::try_from(id)) {
                out.push((GroupId(g), MessageId(id), v.value().to_vec()));
            }
        }
        Ok(out)
    }

    /// The ids of every stored group.
    pub(crate) fn groups(&self) -> Result<Vec<GroupId>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let table = tx.open_table(OPS).map_err(db_err)?;
        let mut out: Vec<GroupId> = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (k, _) = entry.map_err(db_err)?;
            let (g, index) = k.value();
            if index == 0
                && let Ok(g) = <[u8; 32]>::try_from(g)
            {
                out.push(GroupId(g));
            }
        }
        Ok(out)
    }

    /// A group's ops, in index order.
    pub(crate) fn ops(&self, group: &GroupId) -> Result<Vec<Vec<u8>>, StoreError> {
        let g: &[u8] = &group.0;
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let table = tx.open_table(OPS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.range((g, 0)..=(g, u64::MAX)).map_err(db_err)? {
            out.push(entry.map_err(db_err)?.1.value().to_vec());
        }
        Ok(out)
    }

    /// A group's stored envelopes: first the delivered ones in delivery
    /// order, then the rest (held back, waiting for dependencies).
    pub(crate) fn envelopes_for_replay(&self, group: &GroupId) -> Result<Vec<Vec<u8>>, StoreError> {
        let g: &[u8] = &group.0;
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let envs = tx.open_table(ENVELOPES).map_err(db_err)?;
        let history = tx.open_table(HISTORY).map_err(db_err)?;
        let mut out = Vec::new();
        let mut done = std::collections::HashSet::new();
        for entry in history.range((g, 0)..=(g, u64::MAX)).map_err(db_err)? {
            let (_, v) = entry.map_err(db_err)?;
            let Ok(msg) = serde_json::from_slice::<GroupMessage>(v.value()) else {
                continue;
            };
            let id = hex_id(&msg.id)?;
            if let Some(env) = envs.get((g, id.as_slice())).map_err(db_err)? {
                out.push(env.value().to_vec());
                done.insert(id);
            }
        }
        let (lo, hi): (&[u8], &[u8]) = (&[], &[0xff; 33]);
        for entry in envs.range((g, lo)..(g, hi)).map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            if !done.contains(k.value().1) {
                out.push(v.value().to_vec());
            }
        }
        Ok(out)
    }

    /// The last `limit` delivered messages (all with `None`), oldest first.
    pub(crate) fn history(
        &self,
        group: &GroupId,
        limit: Option<usize>,
    ) -> Result<Vec<GroupMessage>, StoreError> {
        let g: &[u8] = &group.0;
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let table = tx.open_table(HISTORY).map_err(db_err)?;
        let mut out = Vec::new();
        let mut iter = table.range((g, 0)..=(g, u64::MAX)).map_err(db_err)?;
        let limit = limit.unwrap_or(usize::MAX);
        while out.len() < limit {
            let Some(entry) = iter.next_back() else { break };
            let (_, v) = entry.map_err(db_err)?;
            if let Ok(m) = serde_json::from_slice::<GroupMessage>(v.value()) {
                out.push(m);
            }
        }
        out.reverse();
        Ok(out)
    }
}

/// Invitations, declined groups and orphan collection.
impl GroupStore {
    /// Every stored invitation.
    pub(crate) fn invites(&self) -> Result<Vec<GroupInvite>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let table = tx.open_table(INVITES).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (_, v) = entry.map_err(db_err)?;
            if let Ok(inv) = serde_json::from_slice::<GroupInvite>(v.value()) {
                out.push(inv);
            }
        }
        Ok(out)
    }

    /// Stores (or replaces) an invitation.
    pub(crate) fn put_invite(&self, group: &GroupId, inv: &GroupInvite) -> Result<(), StoreError> {
        let json = serde_json::to_vec(inv).map_err(db_err)?;
        let tx = self.store.db().begin_write().map_err(db_err)?;
        tx.open_table(INVITES)
            .map_err(db_err)?
            .insert(group.0.as_slice(), json.as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Forgets an invitation (accepted and joined, or dropped).
    pub(crate) fn remove_invite(&self, group: &GroupId) -> Result<(), StoreError> {
        let tx = self.store.db().begin_write().map_err(db_err)?;
        tx.open_table(INVITES)
            .map_err(db_err)?
            .remove(group.0.as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Declines an invitation: forgets it and remembers the group as
    /// declined, keeping the newest [`MAX_DECLINED`] declined groups.
    pub(crate) fn decline(&self, group: &GroupId, now_ms: u64) -> Result<(), StoreError> {
        let tx = self.store.db().begin_write().map_err(db_err)?;
        {
            tx.open_table(INVITES)
                .map_err(db_err)?
                .remove(group.0.as_slice())
                .map_err(db_err)?;
            let mut declined = tx.open_table(DECLINED).map_err(db_err)?;
            declined
                .insert(group.0.as_slice(), now_ms)
                .map_err(db_err)?;
            let len = declined.len().map_err(db_err)? as usize;
            if len > MAX_DECLINED {
                let mut all = Vec::with_capacity(len);
                for entry in declined.iter().map_err(db_err)? {
                    let (k, v) = entry.map_err(db_err)?;
                    all.push((v.value(), k.value().to_vec()));
                }
                all.sort();
                for (_, k) in all.into_iter().take(len - MAX_DECLINED) {
                    declined.remove(k.as_slice()).map_err(db_err)?;
                }
            }
        }
        tx.commit().map_err(db_err)
    }

    /// The declined groups.
    pub(crate) fn declined(&self) -> Result<Vec<GroupId>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let table = tx.open_table(DECLINED).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (k, _) = entry.map_err(db_err)?;
            if let Ok(g) = <[u8; 32]>::try_from(k.value()) {
                out.push(GroupId(g));
            }
        }
        Ok(out)
    }

    /// Deletes every row of every group not in `keep` (ops, envelopes,
    /// history, delivery marks, outbox); returns the groups collected.
    pub(crate) fn collect_orphans(
        &self,
        keep: &HashSet<GroupId>,
    ) -> Result<Vec<GroupId>, StoreError> {
        let orphan = |g: &[u8]| {
            <[u8; 32]>::try_from(g)
                .map(|g| !keep.contains(&GroupId(g)))
                .unwrap_or(true)
        };
        let mut found: BTreeSet<Vec<u8>> = BTreeSet::new();
        {
            let tx = self.store.db().begin_read().map_err(db_err)?;
            macro_rules! scan {
                ($def:expr) => {
                    for entry in tx
                        .open_table($def)
                        .map_err(db_err)?
                        .iter()
                        .map_err(db_err)?
                    {
                        let (k, _) = entry.map_err(db_err)?;
                        let g = k.value().0;
                        if orphan(g) {
                            found.insert(g.to_vec());
                        }
                    }
                };
            }
            scan!(OPS);
            scan!(ENVELOPES);
            scan!(HISTORY);
            scan!(DELIVERED);
            scan!(OUTBOX);
        }
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let tx = self.store.db().begin_write().map_err(db_err)?;
        {
            let (lo, hi): (&[u8], &[u8]) = (&[], &[0xff; 33]);
            for g in &found {
                let g: &[u8] = g;
                tx.open_table(OPS)
                    .map_err(db_err)?
                    .retain_in((g, 0)..=(g, u64::MAX), |_, _| false)
                    .map_err(db_err)?;
                tx.open_table(HISTORY)
                    .map_err(db_err)?
                    .retain_in((g, 0)..=(g, u64::MAX), |_, _| false)
                    .map_err(db_err)?;
                tx.open_table(ENVELOPES)
                    .map_err(db_err)?
                    .retain_in((g, lo)..(g, hi), |_, _| false)
                    .map_err(db_err)?;
                tx.open_table(DELIVERED)
                    .map_err(db_err)?
                    .retain_in((g, lo)..(g, hi), |_, _| false)
                    .map_err(db_err)?;
                tx.open_table(OUTBOX)
                    .map_err(db_err)?
                    .retain_in((g, lo)..(g, hi), |_, _| false)
                    .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)?;
        Ok(found
            .into_iter()
            .filter_map(|g| <[u8; 32]>::try_from(g).ok().map(GroupId))
            .collect())
    }
}

fn hex_id(s: &str) -> Result<Vec<u8>, StoreError> {
    hex::decode(s).map_err(|e| StoreError::Db(format!("bad message id {s:?}: {e}")))
}
