//! The messages actor's side of mailboxes: when a message has waited for
//! its recipient long enough it is sealed once more (attempt
//! [`MAILBOX_ATTEMPT`]) and deposited with holders; mail picked up from
//! holders is delivered exactly as a direct envelope is, then the
//! holder's copy is deleted and the receipt is deposited for the sender
//! too (who may be offline now); a receipt for a deposited message
//! deletes its copies.

use fogmesh_protocols::mailbox::wire::Id;
use fogmesh_protocols::messages::{
    self, DEFAULT_TTL, Envelope, Letter, MessageId, Payload, Receipt,
};
use fogmesh_protocols::policy::Route;
use libp2p::PeerId;
use tokio::sync::mpsc;

use super::MessagesActor;
use crate::mailbox::{Command, MAILBOX_ATTEMPT, REDEPOSIT_MS, RETRY_MS};
use crate::messages::store::OutRecord;
use crate::types::NodeEvent;

impl MessagesActor {
    pub(in crate::messages) fn set_mailbox(&mut self, tx: Option<mpsc::Sender<Command>>) {
        self.mailbox = tx;
    }

    fn mailbox_send(&self, cmd: Command) {
        if let Some(tx) = &self.mailbox
            && tx.blocking_send(cmd).is_err()
        {
            tracing::debug!("swarm loop gone; dropping a mailbox command");
        }
    }

    /// When `rec` is due for a deposit, if ever.
    fn deposit_due(&self, rec: &OutRecord) -> Option<u64> {
        if self.mailbox.is_none() || rec.out.is_final() || !may_deposit(rec) {
            return None;
        }
        let after = u64::try_from(self.cfg.mailbox_after?.as_millis()).unwrap_or(u64::MAX);
        let first = rec.timestamp.saturating_add(after);
        let next = rec.mailbox.next_ms.unwrap_or(first);
        if self.deposited_run.contains(&rec.id) {
            Some(next)
        } else {
            // Deposited before a restart: the duty of re-checking its
            // holders was lost with the old process; deposit it anew.
            Some(next.min(first))
        }
    }

    /// The next deposit due.
    pub(super) fn mailbox_deadline(&self) -> Option<u64> {
        self.pending
            .values()
            .filter_map(|r| self.deposit_due(r))
            .min()
    }

    /// Deposits every message that has waited long enough.
    pub(super) fn mailbox_poll(&mut self, now: u64) {
        let due: Vec<MessageId> = self
            .pending
            .values()
            .filter(|r| self.deposit_due(r).is_some_and(|d| d <= now))
            .map(|r| r.id)
            .collect();
        for id in &due {
            self.deposit(*id, now);
        }
        self.save(&due);
    }

    /// The node is about to stop: every waiting message without a holder
    /// is deposited now. Returns the deposits still unanswered.
    pub(super) fn mailbox_flush(&mut self, now: u64) -> usize {
        if self.mailbox.is_none() {
            return 0;
        }
        if self.cfg.mailbox_after.is_none() {
            return self.receipts_depositing;
        }
        let due: Vec<MessageId> = self
            .pending
            .values()
            .filter(|r| {
                !r.out.is_final()
                    && may_deposit(r)
                    && r.mailbox.holders.is_empty()
                    && !self.depositing.contains(&r.id)
            })
            .map(|r| r.id)
            .collect();
        for id in &due {
            self.deposit(*id, now);
        }
        self.save(&due);
        self.depositing.len() + self.receipts_depositing
    }

    /// Seals message `id` once more for its holders and hands it to the
    /// network's mailbox side.
    fn deposit(&mut self, id: MessageId, now: u64) {
        let Some(rec) = self.pending.get(&id) else {
            return;
        };
        let to = rec.to;
        let floor = self
            .pending
            .values()
            .filter(|r| r.to == to)
            .map(|r| r.seq)
            .min()
            .unwrap_or(rec.seq);
        let letter = Letter {
            id,
            seq: rec.seq,
            floor,
            attempt: MAILBOX_ATTEMPT,
            sent_at_ms: rec.timestamp,
            text: rec.text.clone(),
        };
        let sealed = messages::seal(
            &mut rand::rng(),
            &self.keypair,
            &to,
            &Payload::Letter(letter),
        );
        let Some(rec) = self.pending.get_mut(&id) else {
            return;
        };
        // Until its answer comes: if it never does, try again then.
        rec.mailbox.next_ms = Some(now.saturating_add(RETRY_MS));
        let body = match sealed {
            Ok(body) => body,
            Err(e) => {
                rec.mailbox.note = Some(format!("cannot seal: {e}"));
                return;
            }
        };
        self.depositing.insert(id);
        self.deposited_run.insert(id);
        self.mailbox_send(Command::Deposit {
            id: Some(id),
            env: Envelope {
                to,
                ttl: DEFAULT_TTL,
                body,
            },
        });
    }

    /// The holders of a deposit answered.
    pub(super) fn on_deposited(
        &mut self,
        id: Option<MessageId>,
        env_id: Id,
        holders: Vec<PeerId>,
        errors: Vec<String>,
        now: u64,
    ) {
        let Some(id) = id else {
            self.receipts_depositing = self.receipts_depositing.saturating_sub(1);
            if holders.is_empty() {
                tracing::debug!("a receipt found no mailbox holder: {}", errors.join("; "));
            }
            return;
        };
        self.depositing.remove(&id);
        let Some(rec) = self.pending.get_mut(&id) else {
            // Delivered meanwhile: the new copies are not needed.
            self.mailbox_send(Command::Delivered {
                id: Some(id),
                holders,
                ids: vec![env_id],
            });
            return;
        };
        if holders.is_empty() {
            rec.mailbox.note = Some(if errors.is_empty() {
                "no mailbox holder accepted it".into()
            } else {
                errors.join("; ")
            });
            rec.mailbox.next_ms = Some(now.saturating_add(RETRY_MS));
        } else {
            let new: Vec<String> = holders
                .iter()
                .filter(|h| !rec.mailbox.holders.contains(h))
                .map(|h| h.to_string())
                .collect();
            // A later report of the same envelope (a courier met later, a
            // re-check of the holders) keeps the envelope's time.
            let again = rec.mailbox.ids.contains(&env_id);
            rec.mailbox.accepted(&holders, env_id, now);
            if !again {
                rec.mailbox.next_ms = Some(now.saturating_add(REDEPOSIT_MS));
            }
            if !new.is_empty() {
                let ev = NodeEvent::MailDeposited {
                    id: id.to_string(),
                    to: rec.to.to_string(),
                    holders: new,
                };
                self.emit(ev);
            }
        }
        self.save(&[id]);
    }

    /// An envelope picked up at `holder`: delivered like a direct one;
    /// once it is committed (or worthless), the holder's copy goes.
    pub(super) fn on_picked(&mut self, env: Envelope, holder: PeerId, now: u64) {
        let env_id = Id::of(&env);
        let opened = match messages::open(&self.secret, &self.me, &env.body) {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(%holder, "picked-up mail does not open: {e}");
                self.mailbox_send(Command::Picked { holder, id: env_id });
                return;
            }
        };
        let from = opened.from;
        match opened.payload {
            Payload::Letter(letter) => {
                let (seq, lid, attempt) = (letter.seq, letter.id, letter.attempt);
                let via = if self.reach.internet {
                    Route::Internet
                } else {
                    Route::Ble
                };
                self.on_letter(from, letter, via, now);
                let committed = self
                    .inboxes
                    .get(&from)
                    .is_some_and(|i| i.through >= seq || i.held.contains(&seq));
                if !committed {
                    // Not acknowledged (rate, full queue): the holder keeps
                    // it for the next pickup.
                    return;
                }
                self.mailbox_send(Command::Picked { holder, id: env_id });
                // The sender may be offline now: its mailbox gets the
                // receipt too.
                self.deposit_receipt(from, vec![(lid, attempt)]);
            }
            Payload::Receipt(r) => {
                self.on_receipt(from, r);
                self.mailbox_send(Command::Picked { holder, id: env_id });
            }
        }
    }

    fn deposit_receipt(&mut self, to: PeerId, ids: Vec<(MessageId, u32)>) {
        match messages::seal(
            &mut rand::rng(),
            &self.keypair,
            &to,
            &Payload::Receipt(Receipt { ids }),
        ) {
            Ok(body) => {
                self.receipts_depositing += 1;
                self.mailbox_send(Command::Deposit {
                    id: None,
                    env: Envelope {
                        to,
                        ttl: DEFAULT_TTL,
                        body,
                    },
                });
            }
            Err(e) => tracing::warn!("cannot seal a receipt: {e}"),
        }
    }

    /// Messages `done` were just delivered (`ids`: the receipt's): their
    /// copies at holders are deleted, and one delivered by its mailbox
    /// copy says so.
    pub(super) fn mailbox_delivered(&mut self, done: &[MessageId], ids: &[(MessageId, u32)]) {
        let mut deletes = Vec::new();
        for id in done {
            let Some(rec) = self.pending.get_mut(id) else {
                continue;
            };
            if ids.iter().any(|(i, n)| i == id && *n == MAILBOX_ATTEMPT) {
                rec.mailbox.delivered = true;
            }
            if self.deposited_run.remove(id) || !rec.mailbox.holders.is_empty() {
                // Ends the deposit duty too.
                deletes.push(Command::Delivered {
                    id: Some(*id),
                    holders: rec.mailbox.holders.clone(),
                    ids: rec.mailbox.ids.clone(),
                });
            }
        }
        for cmd in deletes {
            self.mailbox_send(cmd);
        }
    }
}

/// Whether a message may go to mailbox holders at all: only one whose
/// plan has a non-private route. A private message (or one sent with
/// `--route onion`) never does: a holder would learn that its depositor
/// writes to its recipient, which is what the onion route hides.
fn may_deposit(rec: &OutRecord) -> bool {
    (rec.out.plan.iter()).any(|r| *r != fogmesh_protocols::policy::Route::Onion)
}
