//! What a holder accepts, keeps and hands out: the quotas and the
//! bookkeeping of what it holds, as pure code (the node keeps the
//! envelopes themselves in redb and rebuilds this [`Ledger`] at start).
//!
//! Rules:
//! - a deposit is refused when it is larger than [`super::MAX_DEPOSIT`]
//!   (`TooLarge`), when the holder's total would exceed its quota
//!   (`Full`), or when the depositor or the recipient would exceed its
//!   share, in envelopes or in bytes (`OverQuota`); a deposit of an
//!   envelope already held is accepted again and counted once;
//! - an envelope is kept until its recipient deletes it, its depositor
//!   deletes it, or its lifetime ends;
//! - a fetch lists only envelopes addressed to the asking peer, oldest
//!   first; a delete removes only envelopes addressed to, or deposited by,
//!   the asking peer.

use std::collections::{BTreeSet, HashMap};

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use super::wire::{Id, Refusal};

/// A holder's limits. [`Quotas::from_total`] derives the shares from the
/// total; every field can be set on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Bytes held for others in all (`--mailbox-quota`; 64 MiB by default).
    pub total_bytes: u64,
    /// Bytes one depositor may have held here (a quarter of the total).
    pub per_depositor_bytes: u64,
    /// Envelopes one depositor may have held here (100).
    pub per_depositor_envelopes: u64,
    /// Bytes held for one recipient (half of the total).
    pub per_recipient_bytes: u64,
    /// Envelopes held for one recipient (500).
    pub per_recipient_envelopes: u64,
    /// How long an envelope is kept, ms (7 days).
    pub lifetime_ms: u64,
}

impl Quotas {
    /// The default shares of a total of `total_bytes`.
    pub fn from_total(total_bytes: u64) -> Self {
        Quotas {
            total_bytes,
            per_depositor_bytes: total_bytes / 4,
            per_depositor_envelopes: 100,
            per_recipient_bytes: total_bytes / 2,
            per_recipient_envelopes: 500,
            lifetime_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas::from_total(64 * 1024 * 1024)
    }
}

/// What the holder knows of one held envelope (beside its bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// The envelope's id.
    pub id: Id,
    /// Who handed it over (the authenticated peer).
    pub depositor: PeerId,
    /// Its recipient (the envelope's `to`).
    pub recipient: PeerId,
    /// The envelope frame's length.
    pub size: u64,
    /// When it was deposited, ms since the Unix epoch.
    pub held_at_ms: u64,
    /// When it is dropped, ms since the Unix epoch.
    pub expires_at_ms: u64,
}

/// The answer to a deposit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Store it (with this record).
    Store(Stored),
    /// Already held: answer `Deposited`, store nothing.
    Duplicate,
    /// Refuse.
    Refuse(Refusal),
}

#[derive(Debug, Default, Clone, Copy)]
struct Count {
    envelopes: u64,
    bytes: u64,
}

impl Count {
    fn add(&mut self, size: u64) {
        self.envelopes += 1;
        self.bytes += size;
    }
    fn sub(&mut self, size: u64) {
        self.envelopes = self.envelopes.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(size);
    }
}

/// Everything a holder holds, by id, with the counts its quotas need.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    quotas: Quotas,
    held: HashMap<Id, Stored>,
    by_recipient: HashMap<PeerId, BTreeSet<(u64, Id)>>,
    /// Every held id, in order (a holder's passes walk it).
    order: BTreeSet<Id>,
    depositors: HashMap<PeerId, Count>,
    recipients: HashMap<PeerId, Count>,
    total: Count,
}

impl Ledger {
    /// An empty ledger with these quotas.
    pub fn new(quotas: Quotas) -> Self {
        Ledger {
            quotas,
            ..Ledger::default()
        }
    }

    /// The quotas.
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// Envelopes and bytes held.
    pub fn totals(&self) -> (u64, u64) {
        (self.total.envelopes, self.total.bytes)
    }

    /// Whether `id` is held.
    pub fn contains(&self, id: &Id) -> bool {
        self.held.contains_key(id)
    }

    /// Decides a deposit of an envelope of `size` bytes with id `id` for
    /// `recipient` by `depositor` at `now`.
    pub fn admit(
        &self,
        depositor: PeerId,
        recipient: PeerId,
        id: Id,
        size: u64,
        now: u64,
    ) -> Admit {
        if size > super::MAX_DEPOSIT as u64 {
            return Admit::Refuse(Refusal::TooLarge);
        }
        if self.held.contains_key(&id) {
            return Admit::Duplicate;
        }
        let q = &self.quotas;
        if self.total.bytes.saturating_add(size) > q.total_bytes {
            return Admit::Refuse(Refusal::Full);
        }
        let d = self.depositors.get(&depositor).copied().unwrap_or_default();
        let r = self.recipients.get(&recipient).copied().unwrap_or_default();
        if d.envelopes >= q.per_depositor_envelopes
            || d.bytes.saturating_add(size) > q.per_depositor_bytes
            || r.envelopes >= q.per_recipient_envelopes
            || r.bytes.saturating_add(size) > q.per_recipient_bytes
        {
            return Admit::Refuse(Refusal::OverQuota);
        }
        Admit::Store(Stored {
            id,
            depositor,
            recipient,
            size,
            held_at_ms: now,
            expires_at_ms: now.saturating_add(q.lifetime_ms),
        })
    }

    /// Records a held envelope (after it was stored, or at start).
    pub fn insert(&mut self, s: Stored) {
        if self.held.contains_key(&s.id) {
            return;
        }
        self.total.add(s.size);
        self.depositors.entry(s.depositor).or_default().add(s.size);
        self.recipients.entry(s.recipient).or_default().add(s.size);
        self.by_recipient
            .entry(s.recipient)
            .or_default()
            .insert((s.held_at_ms, s.id));
        self.order.insert(s.id);
        self.held.insert(s.id, s);
    }

    /// Forgets a held envelope (after it was removed from storage).
    pub fn remove(&mut self, id: &Id) -> Option<Stored> {
        let s = self.held.remove(id)?;
        self.order.remove(id);
        self.total.sub(s.size);
        for (map, peer) in [
            (&mut self.depositors, s.depositor),
            (&mut self.recipients, s.recipient),
        ] {
            if let Some(c) = map.get_mut(&peer) {
                c.sub(s.size);
                if c.envelopes == 0 {
                    map.remove(&peer);
                }
            }
        }
        if let Some(set) = self.by_recipient.get_mut(&s.recipient) {
            set.remove(&(s.held_at_ms, s.id));
            if set.is_empty() {
                self.by_recipient.remove(&s.recipient);
            }
        }
        Some(s)
    }

    /// The envelopes for `requester`, oldest first, at most `max`, and
    /// whether more are held.
    pub fn fetch(&self, requester: &PeerId, max: usize) -> (Vec<Id>, bool) {
        let Some(set) = self.by_recipient.get(requester) else {
            return (Vec::new(), false);
        };
        let ids = set.iter().take(max).map(|(_, id)| *id).collect();
        (ids, set.len() > max)
    }

    /// The ids among `ids` that `requester` may delete: held, and addressed
    /// to it or deposited by it.
    pub fn deletable(&self, requester: &PeerId, ids: &[Id]) -> Vec<Id> {
        let mut out: Vec<Id> = ids
            .iter()
            .filter(|id| {
                self.held
                    .get(id)
                    .is_some_and(|s| s.recipient == *requester || s.depositor == *requester)
            })
            .copied()
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The envelopes whose lifetime has ended at `now`.
    pub fn expired(&self, now: u64) -> Vec<Id> {
        self.held
            .values()
            .filter(|s| s.expires_at_ms <= now)
            .map(|s| s.id)
            .collect()
    }

    /// When the next envelope expires.
    pub fn next_expiry(&self) -> Option<u64> {
        self.held.values().map(|s| s.expires_at_ms).min()
    }

    /// Up to `max` held envelopes in id order, starting after `cursor`
    /// (from the first when `None`), and the cursor to go on from
    /// (`None` once the end is reached).
    pub fn walk(&self, cursor: Option<Id>, max: usize) -> (Vec<&Stored>, Option<Id>) {
        let range = match cursor {
            Some(c) => self
                .order
                .range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded)),
            None => self.order.range(..),
        };
        let out: Vec<&Stored> = range.take(max).filter_map(|id| self.held.get(id)).collect();
        let next = if out.len() < max {
            None
        } else {
            out.last().map(|s| s.id)
        };
        (out, next)
    }

    /// Which recipients have envelopes held here.
    pub fn holds_for(&self, recipient: &PeerId) -> bool {
        self.by_recipient.contains_key(recipient)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Id {
        Id([n; 16])
    }

    fn store(l: &mut Ledger, d: PeerId, r: PeerId, n: u8, size: u64, now: u64) -> Admit {
        let a = l.admit(d, r, id(n), size, now);
        if let Admit::Store(s) = &a {
            l.insert(s.clone());
        }
        a
    }

    #[test]
    fn a_depositor_over_its_share_is_refused_while_others_are_served() {
        let mut l = Ledger::new(Quotas::from_total(4000));
        let (d1, d2, r) = (PeerId::random(), PeerId::random(), PeerId::random());
        assert!(matches!(store(&mut l, d1, r, 1, 600, 0), Admit::Store(_)));
        // d1's share is 1000 bytes.
        assert_eq!(
            store(&mut l, d1, r, 2, 600, 0),
            Admit::Refuse(Refusal::OverQuota)
        );
        assert!(matches!(store(&mut l, d2, r, 3, 600, 0), Admit::Store(_)));
        assert_eq!(store(&mut l, d2, r, 3, 600, 0), Admit::Duplicate);
        assert_eq!(l.totals(), (2, 1200));
        // Removing frees the share.
        l.remove(&id(1));
        assert!(matches!(store(&mut l, d1, r, 2, 600, 0), Admit::Store(_)));
    }

    #[test]
    fn full_too_large_and_per_recipient_limits() {
        let mut q = Quotas::from_total(2000);
        q.per_depositor_bytes = 2000;
        q.per_recipient_envelopes = 2;
        let mut l = Ledger::new(q);
        let (d, r, r2) = (PeerId::random(), PeerId::random(), PeerId::random());
        assert_eq!(
            l.admit(d, r, id(9), super::super::MAX_DEPOSIT as u64 + 1, 0),
            Admit::Refuse(Refusal::TooLarge)
        );
        assert!(matches!(store(&mut l, d, r, 1, 500, 0), Admit::Store(_)));
        assert!(matches!(store(&mut l, d, r, 2, 500, 0), Admit::Store(_)));
        assert_eq!(
            store(&mut l, d, r, 3, 500, 0),
            Admit::Refuse(Refusal::OverQuota)
        );
        assert!(matches!(store(&mut l, d, r2, 4, 900, 0), Admit::Store(_)));
        assert_eq!(
            store(&mut l, d, r2, 5, 200, 0),
            Admit::Refuse(Refusal::Full)
        );
    }

    #[test]
    fn only_the_recipient_fetches_and_only_it_or_the_depositor_deletes() {
        let mut l = Ledger::new(Quotas::default());
        let (d, r, m) = (PeerId::random(), PeerId::random(), PeerId::random());
        store(&mut l, d, r, 1, 600, 10);
        store(&mut l, d, r, 2, 600, 5);
        assert_eq!(l.fetch(&m, 16), (vec![], false));
        assert_eq!(l.fetch(&r, 16), (vec![id(2), id(1)], false));
        assert_eq!(l.fetch(&r, 1), (vec![id(2)], true));
        assert!(l.deletable(&m, &[id(1), id(2)]).is_empty());
        assert_eq!(l.deletable(&r, &[id(1), id(1), id(7)]), vec![id(1)]);
        assert_eq!(l.deletable(&d, &[id(2)]), vec![id(2)]);
    }

    #[test]
    fn a_walk_visits_every_held_envelope_once_in_bounded_steps() {
        let mut l = Ledger::new(Quotas::default());
        let (d, r) = (PeerId::random(), PeerId::random());
        for n in 1..=5 {
            store(&mut l, d, r, n, 600, 0);
        }
        l.remove(&id(3));
        let (a, next) = l.walk(None, 2);
        assert_eq!(
            a.iter().map(|s| s.id).collect::<Vec<_>>(),
            vec![id(1), id(2)]
        );
        let (b, next) = l.walk(next, 2);
        assert_eq!(
            b.iter().map(|s| s.id).collect::<Vec<_>>(),
            vec![id(4), id(5)]
        );
        let (c, next) = l.walk(next, 2);
        assert!(c.is_empty());
        assert_eq!(next, None);
    }

    #[test]
    fn envelopes_expire_after_their_lifetime() {
        let mut l = Ledger::new(Quotas::default());
        let (d, r) = (PeerId::random(), PeerId::random());
        store(&mut l, d, r, 1, 600, 0);
        let life = l.quotas().lifetime_ms;
        assert_eq!(l.next_expiry(), Some(life));
        assert!(l.expired(life - 1).is_empty());
        assert_eq!(l.expired(life), vec![id(1)]);
    }
}
