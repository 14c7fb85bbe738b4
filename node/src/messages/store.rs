//! The direct-message tables.
//!
//! - `dm_out`: every message this node sent, by id, with its route state
//!   (the outbox is the rows that are not final);
//! - `dm_log`: both directions in delivery order (outgoing when sent,
//!   incoming when delivered), by a node-wide counter;
//! - `dm_index`: message id to its place in the log;
//! - `dm_seq`: the last sequence number used towards each peer;
//! - `dm_in`: per sender, the sequence number delivered through;
//! - `dm_held`: letters that arrived before their predecessors.
//!
//! Each change is one write transaction, committed before it is
//! acknowledged (`send` returns, a receipt goes out), so `kill -9` loses
//! nothing acknowledged and a letter is never delivered twice.

use fogmesh_protocols::messages::{Inbox, MessageId, Outgoing};
use libp2p::PeerId;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::storage::{Store, StoreError};
use crate::types::DirectMessage;

const OUT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dm_out");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("dm_log");
const INDEX: TableDefinition<&[u8], u64> = TableDefinition::new("dm_index");
const SEQ: TableDefinition<&[u8], u64> = TableDefinition::new("dm_seq");
const IN: TableDefinition<&[u8], u64> = TableDefinition::new("dm_in");
const HELD: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("dm_held");

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// An outgoing message and its route state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OutRecord {
    pub(crate) id: MessageId,
    pub(crate) to: PeerId,
    pub(crate) text: String,
    /// When the user sent it, ms since the epoch.
    pub(crate) timestamp: u64,
    /// Its number towards `to`.
    pub(crate) seq: u64,
    pub(crate) out: Outgoing,
    /// Its copies at mailbox holders (none until it waited long enough).
    #[serde(default)]
    pub(crate) mailbox: crate::mailbox::Deposits,
}

impl OutRecord {
    pub(crate) fn to_api(&self, me: &PeerId) -> DirectMessage {
        let live = !self.out.is_final();
        DirectMessage {
            id: self.id.to_string(),
            from: me.to_string(),
            to: self.to.to_string(),
            text: self.text.clone(),
            timestamp: self.timestamp,
            direction: "out".into(),
            state: Some(self.out.state.as_str().into()),
            route: self
                .out
                .delivered_by
                .map(|r| r.as_str().into())
                .or_else(|| self.mailbox.delivered.then(|| "mailbox".into())),
            route_plan: Some(self.out.plan.iter().map(|r| r.as_str().into()).collect()),
            attempts: Some(self.out.attempts.clone()),
            waiting: if live { self.out.waiting.clone() } else { None },
            next_attempt: (live && !self.out.plan.is_empty()).then_some(self.out.retry_at_ms),
            expires_at: live.then_some(self.out.expires_at_ms),
            mailbox: self.mailbox.to_api(),
        }
    }
}

/// A received letter, held or delivered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct InLetter {
    pub(crate) id: MessageId,
    pub(crate) from: PeerId,
    pub(crate) text: String,
    pub(crate) timestamp: u64,
}

impl InLetter {
    pub(crate) fn to_api(&self, me: &PeerId) -> DirectMessage {
        DirectMessage {
            id: self.id.to_string(),
            from: self.from.to_string(),
            to: me.to_string(),
            text: self.text.clone(),
            timestamp: self.timestamp,
            direction: "in".into(),
            state: None,
            route: None,
            route_plan: None,
            attempts: None,
            waiting: None,
            next_attempt: None,
            expires_at: None,
            mailbox: None,
        }
    }
}

/// One line of the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum LogEntry {
    /// Sent by this node: the record is in `dm_out`.
    Out { id: MessageId, to: PeerId },
    /// Received.
    In(InLetter),
}

/// The direct-message tables of the node's database.
#[derive(Debug, Clone)]
pub(crate) struct DmStore {
    store: Store,
}

impl DmStore {
    pub(crate) fn open(store: Store) -> Result<Self, StoreError> {
        let tx = store.db().begin_write().map_err(db_err)?;
        tx.open_table(OUT).map_err(db_err)?;
        tx.open_table(LOG).map_err(db_err)?;
        tx.open_table(INDEX).map_err(db_err)?;
        tx.open_table(SEQ).map_err(db_err)?;
        tx.open_table(IN).map_err(db_err)?;
        tx.open_table(HELD).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(DmStore { store })
    }

    /// Stores a new outgoing message, numbering it towards its recipient.
    /// `make` gets the sequence number and returns the record.
    pub(crate) fn queue(
        &self,
        to: &PeerId,
        make: impl FnOnce(u64) -> OutRecord,
    ) -> Result<OutRecord, StoreError> {
        let tx = self.store.db().begin_write().map_err(db_err)?;
        let rec;
        {
            let peer = to.to_bytes();
            let mut seqs = tx.open_table(SEQ).map_err(db_err)?;
            let seq = seqs
                .get(peer.as_slice())
                .map_err(db_err)?
                .map(|v| v.value())
                .unwrap_or(0)
                + 1;
            seqs.insert(peer.as_slice(), seq).map_err(db_err)?;
            rec = make(seq);
            let json = serde_json::to_vec(&rec).map_err(db_err)?;
            tx.open_table(OUT)
                .map_err(db_err)?
                .insert(rec.id.0.as_slice(), json.as_slice())
                .map_err(db_err)?;
            append(
                &tx,
                &rec.id,
                &LogEntry::Out {
                    id: rec.id,
                    to: *to,
                },
            )?;
        }
        tx.commit().map_err(db_err)?;
        Ok(rec)
    }

    /// Saves the route state of outgoing messages.
    pub(crate) fn save_out<'a>(
        &self,
        recs: impl IntoIterator<Item = &'a OutRecord>,
    ) -> Result<(), StoreError> {
        let tx = self.store.db().begin_write().map_err(db_err)?;
        {
            let mut out = tx.open_table(OUT).map_err(db_err)?;
            for rec in recs {
                let json = serde_json::to_vec(rec).map_err(db_err)?;
                out.insert(rec.id.0.as_slice(), json.as_slice())
                    .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    /// Outgoing messages that are neither delivered nor expired.
    pub(crate) fn pending(&self) -> Result<Vec<OutRecord>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let table = tx.open_table(OUT).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (_, v) = entry.map_err(db_err)?;
            match serde_json::from_slice::<OutRecord>(v.value()) {
                Ok(rec) if !rec.out.is_final() => out.push(rec),
                Ok(_) => {}
                Err(e) => tracing::warn!("unreadable outgoing message record: {e}"),
            }
        }
        Ok(out)
    }

    /// One sender's order state.
    pub(crate) fn inbox(&self, from: &PeerId) -> Result<Inbox, StoreError> {
        let peer = from.to_bytes();
        let p = peer.as_slice();
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let through = tx
            .open_table(IN)
            .map_err(db_err)?
            .get(p)
            .map_err(db_err)?
            .map(|v| v.value())
            .unwrap_or(0);
        let held_table = tx.open_table(HELD).map_err(db_err)?;
        let mut held = Vec::new();
        for entry in held_table.range((p, 0)..=(p, u64::MAX)).map_err(db_err)? {
            held.push(entry.map_err(db_err)?.0.value().1);
        }
        Ok(Inbox::new(through, held))
    }

    /// Keeps a letter that arrived before its predecessors.
    pub(crate) fn hold(&self, seq: u64, letter: &InLetter) -> Result<(), StoreError> {
        let peer = letter.from.to_bytes();
        let json = serde_json::to_vec(letter).map_err(db_err)?;
        let tx = self.store.db().begin_write().map_err(db_err)?;
        tx.open_table(HELD)
            .map_err(db_err)?
            .insert((peer.as_slice(), seq), json.as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Delivers `seqs` of `from`, in order: `new` is the letter that just
    /// arrived (if its number is among them), the others come out of the
    /// held table. Records `through`. Returns the delivered letters.
    pub(crate) fn deliver(
        &self,
        from: &PeerId,
        seqs: &[u64],
        new: Option<(u64, InLetter)>,
        through: u64,
    ) -> Result<Vec<InLetter>, StoreError> {
        let peer = from.to_bytes();
        let p = peer.as_slice();
        let tx = self.store.db().begin_write().map_err(db_err)?;
        let mut delivered = Vec::with_capacity(seqs.len());
        {
            let mut held = tx.open_table(HELD).map_err(db_err)?;
            for &seq in seqs {
                let letter = match &new {
                    Some((s, l)) if *s == seq => Some(l.clone()),
                    _ => held
                        .remove((p, seq))
                        .map_err(db_err)?
                        .and_then(|v| serde_json::from_slice::<InLetter>(v.value()).ok()),
                };
                if let Some(l) = letter {
                    append(&tx, &l.id, &LogEntry::In(l.clone()))?;
                    delivered.push(l);
                }
            }
            // Held letters the sender's floor passed are delivered above;
            // anything older left behind is dropped.
            let stale: Vec<u64> = held
                .range((p, 0)..=(p, through))
                .map_err(db_err)?
                .filter_map(|e| e.ok().map(|(k, _)| k.value().1))
                .collect();
            for s in stale {
                held.remove((p, s)).map_err(db_err)?;
            }
            tx.open_table(IN)
                .map_err(db_err)?
                .insert(p, through)
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(delivered)
    }

    /// The last `limit` messages (all with `None`), oldest first, with
    /// `peer` only when given.
    pub(crate) fn list(
        &self,
        me: &PeerId,
        peer: Option<&PeerId>,
        limit: Option<usize>,
    ) -> Result<Vec<DirectMessage>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let log = tx.open_table(LOG).map_err(db_err)?;
        let out = tx.open_table(OUT).map_err(db_err)?;
        let mut found = Vec::new();
        for entry in log.iter().map_err(db_err)?.rev() {
            if limit.is_some_and(|l| found.len() >= l) {
                break;
            }
            let (_, v) = entry.map_err(db_err)?;
            let Ok(line) = serde_json::from_slice::<LogEntry>(v.value()) else {
                continue;
            };
            let msg = match line {
                LogEntry::Out { id, to } => {
                    if peer.is_some_and(|p| *p != to) {
                        continue;
                    }
                    match out.get(id.0.as_slice()).map_err(db_err)? {
                        Some(v) => match serde_json::from_slice::<OutRecord>(v.value()) {
                            Ok(rec) => rec.to_api(me),
                            Err(_) => continue,
                        },
                        None => continue,
                    }
                }
                LogEntry::In(l) => {
                    if peer.is_some_and(|p| *p != l.from) {
                        continue;
                    }
                    l.to_api(me)
                }
            };
            found.push(msg);
        }
        found.reverse();
        Ok(found)
    }

    /// One message by id, either direction.
    pub(crate) fn get(
        &self,
        me: &PeerId,
        id: &MessageId,
    ) -> Result<Option<DirectMessage>, StoreError> {
        let tx = self.store.db().begin_read().map_err(db_err)?;
        let Some(order) = tx
            .open_table(INDEX)
            .map_err(db_err)?
            .get(id.0.as_slice())
            .map_err(db_err)?
            .map(|v| v.value())
        else {
            return Ok(None);
        };
        let Some(v) = tx
            .open_table(LOG)
            .map_err(db_err)?
            .get(order)
            .map_err(db_err)?
        else {
            return Ok(None);
        };
        Ok(
            match serde_json::from_slice::<LogEntry>(v.value()).map_err(db_err)? {
                LogEntry::In(l) => Some(l.to_api(me)),
                LogEntry::Out { id, .. } => tx
                    .open_table(OUT)
                    .map_err(db_err)?
                    .get(id.0.as_slice())
                    .map_err(db_err)?
                    .and_then(|v| serde_json::from_slice::<OutRecord>(v.value()).ok())
                    .map(|r| r.to_api(me)),
            },
        )
    }
}

/// Appends a line to the log and indexes it.
fn append(tx: &redb::WriteTransaction, id: &MessageId, line: &LogEntry) -> Result<(), StoreError> {
    let mut log = tx.open_table(LOG).map_err(db_err)?;
    let next = match log.last().map_err(db_err)? {
        Some((k, _)) => k.value() + 1,
        None => 0,
    };
    let json = serde_json::to_vec(line).map_err(db_err)?;
    log.insert(next, json.as_slice()).map_err(db_err)?;
    tx.open_table(INDEX)
        .map_err(db_err)?
        .insert(id.0.as_slice(), next)
        .map_err(db_err)?;
    Ok(())
}
