//! Causal delivery of group messages.
//!
//! Every message names its causal dependencies by id (at most [`MAX_DEPS`]
//! of the heads its sender had delivered, always including the sender's
//! previous message) and carries a per-sender sequence number. The
//! [`CausalBuffer`] accepts messages in any order, any number of times, and
//! releases each exactly once, after all its dependencies and after the
//! sender's previous message. Messages it cannot release yet wait in a
//! bounded pending set; when full, the oldest is evicted and reported, so the
//! sync layer fetches it again later. [`CausalBuffer::missing`] and
//! [`CausalBuffer::gaps`] say what to fetch.
//!
//! The buffer is generic over the payload it releases, and knows nothing of
//! encryption or signatures: [`Group`](super::Group) checks those first.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::PeerId;
use super::sync::MAX_RANGE_LEN;

/// Maximum number of dependencies of one message.
pub const MAX_DEPS: usize = 16;
/// Default bound on messages waiting for their dependencies.
pub const DEFAULT_MAX_PENDING: usize = 512;

/// A message id: SHA-256 of the encoded signed envelope.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl std::fmt::Debug for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MessageId({})", hex::encode(&self.0[..8]))
    }
}

/// How two delivered messages relate in happens-before order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CausalOrder {
    /// The first happened before the second (it is among its ancestors).
    Before,
    /// The first happened after the second.
    After,
    /// Neither is an ancestor of the other.
    Concurrent,
    /// They are the same message.
    Equal,
}

/// Why a message was refused outright.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CausalError {
    /// Sequence numbers start at 1.
    #[error("sequence number 0")]
    ZeroSeq,
    /// More than [`MAX_DEPS`] dependencies.
    #[error("{0} dependencies, more than {MAX_DEPS}")]
    TooManyDeps(usize),
    /// The same dependency is listed twice.
    #[error("duplicate dependency")]
    DuplicateDep,
    /// The sender's previous message is not among the dependencies.
    #[error("message does not depend on its sender's previous message")]
    MissingPrevious,
    /// The sender already has a different message with this sequence number.
    #[error("{sender} sent two different messages with sequence number {seq}")]
    Equivocation {
        /// The sender.
        sender: PeerId,
        /// The reused sequence number.
        seq: u64,
    },
}

/// A message released in causal order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released<T> {
    /// Its id.
    pub id: MessageId,
    /// Its sender.
    pub sender: PeerId,
    /// The sender's sequence number.
    pub seq: u64,
    /// Its dependencies.
    pub deps: Vec<MessageId>,
    /// The payload given to [`CausalBuffer::insert`].
    pub item: T,
}

/// What one [`CausalBuffer::insert`] did.
#[derive(Debug)]
pub struct Inserted<T> {
    /// Messages now delivered, in causal order (possibly none, possibly many).
    pub delivered: Vec<Released<T>>,
    /// Pending messages evicted to respect the bound: fetch them again later.
    pub evicted: Vec<MessageId>,
    /// Pending messages dropped as invalid once their context was known
    /// (equivocation, or not depending on the sender's previous message).
    pub rejected: Vec<MessageId>,
    /// The message had been seen before (delivered or pending).
    pub duplicate: bool,
}

#[derive(Debug, Clone)]
struct Meta {
    sender: PeerId,
    deps: Vec<MessageId>,
    /// Position in delivery order; ancestors always have smaller positions.
    order: u64,
}

#[derive(Debug)]
struct Pending<T> {
    sender: PeerId,
    seq: u64,
    deps: Vec<MessageId>,
    item: T,
    arrival: u64,
}

#[derive(Debug, Clone, Copy)]
struct SenderState {
    max_seq: u64,
    last: MessageId,
}

/// Releases messages in causal order; see the module docs.
#[derive(Debug)]
pub struct CausalBuffer<T> {
    max_pending: usize,
    delivered: HashMap<MessageId, Meta>,
    by_seq: HashMap<(PeerId, u64), MessageId>,
    senders: HashMap<PeerId, SenderState>,
    /// Delivered messages no delivered message depends on, by delivery order.
    heads: BTreeMap<u64, MessageId>,
    pending: HashMap<MessageId, Pending<T>>,
    /// Pending ids by arrival, for evicting the oldest.
    arrivals: BTreeMap<u64, MessageId>,
    /// Undelivered dependency -> pending messages waiting for it.
    waiting_dep: HashMap<MessageId, Vec<MessageId>>,
    /// (sender, seq) -> pending messages with that sender and seq.
    waiting_seq: HashMap<(PeerId, u64), Vec<MessageId>>,
    next_order: u64,
    next_arrival: u64,
}

impl<T> Default for CausalBuffer<T> {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_PENDING)
    }
}

impl<T> CausalBuffer<T> {
    /// An empty buffer holding at most `max_pending` undeliverable messages.
    pub fn new(max_pending: usize) -> Self {
        CausalBuffer {
            max_pending: max_pending.max(1),
            delivered: HashMap::new(),
            by_seq: HashMap::new(),
            senders: HashMap::new(),
            heads: BTreeMap::new(),
            pending: HashMap::new(),
            arrivals: BTreeMap::new(),
            waiting_dep: HashMap::new(),
            waiting_seq: HashMap::new(),
            next_order: 0,
            next_arrival: 0,
        }
    }

    /// Whether `id` was delivered or is pending.
    pub fn contains(&self, id: &MessageId) -> bool {
        self.delivered.contains_key(id) || self.pending.contains_key(id)
    }

    /// Whether `id` was delivered.
    pub fn is_delivered(&self, id: &MessageId) -> bool {
        self.delivered.contains_key(id)
    }

    /// Number of messages waiting for dependencies.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Highest sequence number delivered from `sender` (0 if none); delivery
    /// is per-sender contiguous, so this is also the contiguous maximum.
    pub fn max_seq(&self, sender: &PeerId) -> u64 {
        self.senders.get(sender).map_or(0, |s| s.max_seq)
    }

    /// The delivered message of `sender` with sequence number `seq`, for serving catch-up.
    pub fn id_of(&self, sender: &PeerId, seq: u64) -> Option<MessageId> {
        self.by_seq.get(&(*sender, seq)).copied()
    }

    /// Per-sender contiguous maxima, sorted by sender.
    pub fn per_sender(&self) -> Vec<(PeerId, u64)> {
        let mut v: Vec<_> = self.senders.iter().map(|(p, s)| (*p, s.max_seq)).collect();
        v.sort();
        v
    }

    /// Current causal heads, oldest delivered first.
    pub fn heads(&self) -> Vec<MessageId> {
        self.heads.values().copied().collect()
    }

    /// Dependencies for the next message of `sender`: its previous message,
    /// then the oldest other heads, at most [`MAX_DEPS`] in all. Oldest first
    /// so that, with more concurrent heads than fit, every head is
    /// eventually referenced and stops being a head.
    pub fn deps_for_send(&self, sender: &PeerId) -> Vec<MessageId> {
        let own = self.senders.get(sender).map(|s| s.last);
        let others = self.heads.values().filter(|h| Some(**h) != own).copied();
        own.into_iter().chain(others).take(MAX_DEPS).collect()
    }

    /// Dependencies of pending messages that are neither delivered nor
    /// pending: the ids the sync layer should fetch.
    pub fn missing(&self) -> Vec<MessageId> {
        let mut v: Vec<_> = self
            .waiting_dep
            .keys()
            .filter(|d| !self.pending.contains_key(*d))
            .copied()
            .collect();
        v.sort();
        v
    }

    /// Per-sender sequence ranges `(sender, from, to)`, inclusive, that
    /// pending messages need but nobody has supplied; each at most
    /// [`MAX_RANGE_LEN`] long (a sender may claim any sequence number).
    pub fn gaps(&self) -> Vec<(PeerId, u64, u64)> {
        let mut lowest: BTreeMap<PeerId, u64> = BTreeMap::new();
        for p in self.pending.values() {
            let e = lowest.entry(p.sender).or_insert(p.seq);
            *e = (*e).min(p.seq);
        }
        lowest
            .into_iter()
            .filter_map(|(sender, low)| {
                let next = self.max_seq(&sender).saturating_add(1);
                let to = (low - 1).min(next.saturating_add(MAX_RANGE_LEN - 1));
                (low > next).then_some((sender, next, to))
            })
            .collect()
    }

    /// Accepts a message; returns what became deliverable.
    pub fn insert(
        &mut self,
        id: MessageId,
        sender: PeerId,
        seq: u64,
        deps: Vec<MessageId>,
        item: T,
    ) -> Result<Inserted<T>, CausalError> {
        let mut out = Inserted {
            delivered: vec![],
            evicted: vec![],
            rejected: vec![],
            duplicate: false,
        };
        if self.contains(&id) {
            out.duplicate = true;
            return Ok(out);
        }
        if seq == 0 {
            return Err(CausalError::ZeroSeq);
        }
        if deps.len() > MAX_DEPS {
            return Err(CausalError::TooManyDeps(deps.len()));
        }
        if deps.iter().collect::<HashSet<_>>().len() != deps.len() {
            return Err(CausalError::DuplicateDep);
        }
        if seq <= self.max_seq(&sender) {
            return Err(CausalError::Equivocation { sender, seq });
        }
        if seq > 1 && deps.is_empty() {
            return Err(CausalError::MissingPrevious);
        }
        // The previous message is known: check now rather than at delivery.
        if let Some(s) = self.senders.get(&sender)
            && seq == s.max_seq.saturating_add(1)
            && !deps.contains(&s.last)
        {
            return Err(CausalError::MissingPrevious);
        }
        for d in &deps {
            if !self.delivered.contains_key(d) {
                self.waiting_dep.entry(*d).or_default().push(id);
            }
        }
        self.waiting_seq.entry((sender, seq)).or_default().push(id);
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.arrivals.insert(arrival, id);
        self.pending.insert(
            id,
            Pending {
                sender,
                seq,
                deps,
                item,
                arrival,
            },
        );

        self.release_from(id, &mut out);
        while self.pending.len() > self.max_pending {
            let Some((_, oldest)) = self.arrivals.pop_first() else {
                break;
            };
            self.unpend(&oldest);
            out.evicted.push(oldest);
        }
        Ok(out)
    }

    fn is_ready(&self, p: &Pending<T>) -> bool {
        p.seq == self.max_seq(&p.sender).saturating_add(1)
            && p.deps.iter().all(|d| self.delivered.contains_key(d))
    }

    /// Delivers `start` if ready, then everything that becomes ready in turn.
    fn release_from(&mut self, start: MessageId, out: &mut Inserted<T>) {
        let mut work = vec![start];
        while let Some(id) = work.pop() {
            let ready = self.pending.get(&id).is_some_and(|p| self.is_ready(p));
            if !ready {
                continue;
            }
            let Some(p) = self.unpend(&id) else { continue };
            // Checked here for messages that arrived before their predecessor.
            if let Some(prev) = self.senders.get(&p.sender)
                && !p.deps.contains(&prev.last)
            {
                out.rejected.push(id);
                continue;
            }
            // Deliver.
            for d in &p.deps {
                self.heads.retain(|_, h| h != d);
            }
            let order = self.next_order;
            self.next_order += 1;
            self.heads.insert(order, id);
            self.senders.insert(
                p.sender,
                SenderState {
                    max_seq: p.seq,
                    last: id,
                },
            );
            self.by_seq.insert((p.sender, p.seq), id);
            self.delivered.insert(
                id,
                Meta {
                    sender: p.sender,
                    deps: p.deps.clone(),
                    order,
                },
            );
            // Other pending messages with the same (sender, seq) lost the race.
            if let Some(rivals) = self.waiting_seq.remove(&(p.sender, p.seq)) {
                for r in rivals {
                    if self.unpend(&r).is_some() {
                        out.rejected.push(r);
                    }
                }
            }
            // Candidates: dependents of this message and the sender's next.
            work.extend(self.waiting_dep.remove(&id).unwrap_or_default());
            if let Some(next) = self.waiting_seq.get(&(p.sender, p.seq + 1)) {
                work.extend(next.iter().copied());
            }
            out.delivered.push(Released {
                id,
                sender: p.sender,
                seq: p.seq,
                deps: p.deps,
                item: p.item,
            });
        }
    }

    /// Removes a pending message and its index entries.
    fn unpend(&mut self, id: &MessageId) -> Option<Pending<T>> {
        let p = self.pending.remove(id)?;
        self.arrivals.remove(&p.arrival);
        for d in &p.deps {
            if let Some(w) = self.waiting_dep.get_mut(d) {
                w.retain(|x| x != id);
                if w.is_empty() {
                    self.waiting_dep.remove(d);
                }
            }
        }
        if let Some(w) = self.waiting_seq.get_mut(&(p.sender, p.seq)) {
            w.retain(|x| x != id);
            if w.is_empty() {
                self.waiting_seq.remove(&(p.sender, p.seq));
            }
        }
        Some(p)
    }

    /// Happens-before relation of two delivered messages (`None` if either
    /// was not delivered).
    ///
    /// Delivery order is a linear extension of happens-before, so only the
    /// later-delivered message can descend from the earlier one, and the
    /// search from the later one stops at anything delivered before the
    /// earlier one. Cost: O(m · d) time and O(m) memory, where m is the
    /// number of messages delivered between the two and d ≤ [`MAX_DEPS`];
    /// cheap for recent messages, linear in history for old ones.
    pub fn compare(&self, a: &MessageId, b: &MessageId) -> Option<CausalOrder> {
        let (ma, mb) = (self.delivered.get(a)?, self.delivered.get(b)?);
        if a == b {
            return Some(CausalOrder::Equal);
        }
        let (early, late, early_first) = if ma.order < mb.order {
            (a, b, CausalOrder::Before)
        } else {
            (b, a, CausalOrder::After)
        };
        let floor = ma.order.min(mb.order);
        let mut stack = vec![*late];
        let mut seen = HashSet::new();
        while let Some(x) = stack.pop() {
            let Some(m) = self.delivered.get(&x) else {
                continue;
            };
            for d in &m.deps {
                if d == early {
                    return Some(early_first);
                }
                let above_floor = self.delivered.get(d).is_some_and(|dm| dm.order > floor);
                if above_floor && seen.insert(*d) {
                    stack.push(*d);
                }
            }
        }
        Some(CausalOrder::Concurrent)
    }

    /// Hash of the sorted current heads: equal exactly when two members have
    /// delivered the same set of messages (the heads determine the set).
    pub fn heads_hash(&self) -> [u8; 32] {
        let mut heads = self.heads();
        heads.sort();
        let mut h = Sha256::new();
        h.update(b"fogmesh-groups/v1 heads\0");
        for id in heads {
            h.update(id.0);
        }
        h.finalize().into()
    }

    /// The sender of a delivered message.
    pub fn sender_of(&self, id: &MessageId) -> Option<PeerId> {
        self.delivered.get(id).map(|m| m.sender)
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::*;

    fn id(n: u32) -> MessageId {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&n.to_be_bytes());
        MessageId(b)
    }

    struct Msg {
        id: MessageId,
        sender: PeerId,
        seq: u64,
        deps: Vec<MessageId>,
    }

    fn insert(buf: &mut CausalBuffer<u32>, m: &Msg, tag: u32) -> Vec<MessageId> {
        match buf.insert(m.id, m.sender, m.seq, m.deps.clone(), tag) {
            Ok(i) => i.delivered.into_iter().map(|r| r.id).collect(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn reply_never_before_parent_and_per_sender_order() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let parent = Msg {
            id: id(1),
            sender: a,
            seq: 1,
            deps: vec![],
        };
        let a2 = Msg {
            id: id(2),
            sender: a,
            seq: 2,
            deps: vec![id(1)],
        };
        let reply = Msg {
            id: id(3),
            sender: b,
            seq: 1,
            deps: vec![id(1)],
        };
        let mut buf = CausalBuffer::default();
        assert!(insert(&mut buf, &reply, 0).is_empty());
        assert!(insert(&mut buf, &a2, 0).is_empty());
        assert_eq!(buf.missing(), vec![id(1)]);
        let out = insert(&mut buf, &parent, 0);
        assert_eq!(out[0], id(1));
        assert_eq!(out.len(), 3);
        assert_eq!(buf.max_seq(&a), 2);
        assert!(buf.missing().is_empty() && buf.pending_len() == 0);
        assert_eq!(buf.id_of(&b, 1), Some(id(3)));
    }

    #[test]
    fn duplicates_are_delivered_once() {
        let a = PeerId::random();
        let m = Msg {
            id: id(1),
            sender: a,
            seq: 1,
            deps: vec![],
        };
        let mut buf = CausalBuffer::default();
        assert_eq!(insert(&mut buf, &m, 0).len(), 1);
        let again = buf.insert(m.id, a, 1, vec![], 0).ok();
        assert!(again.is_some_and(|i| i.duplicate && i.delivered.is_empty()));
    }

    #[test]
    fn invalid_messages_are_refused() {
        let a = PeerId::random();
        let mut buf: CausalBuffer<u32> = CausalBuffer::default();
        assert_eq!(
            buf.insert(id(1), a, 0, vec![], 0).err(),
            Some(CausalError::ZeroSeq)
        );
        let many: Vec<_> = (10..27).map(id).collect();
        assert_eq!(
            buf.insert(id(1), a, 1, many, 0).err(),
            Some(CausalError::TooManyDeps(17))
        );
        assert_eq!(
            buf.insert(id(1), a, 1, vec![id(9), id(9)], 0).err(),
            Some(CausalError::DuplicateDep)
        );
        assert_eq!(
            buf.insert(id(1), a, 2, vec![], 0).err(),
            Some(CausalError::MissingPrevious)
        );
        assert!(buf.insert(id(1), a, 1, vec![], 0).is_ok());
        // Another seq 1 from the same sender: equivocation.
        assert!(matches!(
            buf.insert(id(2), a, 1, vec![], 0),
            Err(CausalError::Equivocation { .. })
        ));
        // seq 2 not naming seq 1.
        let b = PeerId::random();
        assert!(buf.insert(id(3), b, 1, vec![], 0).is_ok());
        assert_eq!(
            buf.insert(id(4), a, 2, vec![id(3)], 0).err(),
            Some(CausalError::MissingPrevious)
        );
        // The same, discovered only at delivery time, is rejected then.
        let c = PeerId::random();
        let early = buf.insert(id(6), c, 2, vec![id(3)], 0).ok();
        assert!(early.is_some_and(|i| i.delivered.is_empty()));
        let late = buf.insert(id(5), c, 1, vec![], 0).ok();
        assert!(late.is_some_and(|i| i.delivered.len() == 1 && i.rejected == vec![id(6)]));
    }

    #[test]
    fn eviction_is_bounded_and_reported_and_gaps_are_found() {
        let a = PeerId::random();
        let mut buf: CausalBuffer<u32> = CausalBuffer::new(3);
        for seq in 2..=5u32 {
            let r = buf
                .insert(id(seq), a, u64::from(seq), vec![id(seq - 1)], 0)
                .ok();
            let evicted = r.map(|i| i.evicted).unwrap_or_default();
            assert_eq!(evicted, if seq == 5 { vec![id(2)] } else { vec![] });
        }
        assert_eq!(buf.pending_len(), 3);
        assert_eq!(buf.gaps(), vec![(a, 1, 2)]);
        assert!(buf.missing().contains(&id(2)));
        // A claimed huge sequence number yields a bounded range.
        let b = PeerId::random();
        assert!(buf.insert(id(99), b, u64::MAX, vec![id(98)], 0).is_ok());
        assert!(
            buf.gaps().contains(&(b, 1, MAX_RANGE_LEN)),
            "{:?}",
            buf.gaps()
        );
    }

    #[test]
    fn heads_deps_and_concurrency() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut buf = CausalBuffer::default();
        let root = Msg {
            id: id(1),
            sender: a,
            seq: 1,
            deps: vec![],
        };
        let x = Msg {
            id: id(2),
            sender: a,
            seq: 2,
            deps: vec![id(1)],
        };
        let y = Msg {
            id: id(3),
            sender: b,
            seq: 1,
            deps: vec![id(1)],
        };
        for m in [&root, &x, &y] {
            insert(&mut buf, m, 0);
        }
        assert_eq!(buf.heads(), vec![id(2), id(3)]);
        assert_eq!(buf.deps_for_send(&b), vec![id(3), id(2)]);
        assert_eq!(buf.compare(&id(2), &id(3)), Some(CausalOrder::Concurrent));
        assert_eq!(buf.compare(&id(1), &id(3)), Some(CausalOrder::Before));
        assert_eq!(buf.compare(&id(3), &id(1)), Some(CausalOrder::After));
        assert_eq!(buf.compare(&id(2), &id(2)), Some(CausalOrder::Equal));
        assert_eq!(buf.compare(&id(2), &id(99)), None);
        let z = Msg {
            id: id(4),
            sender: b,
            seq: 2,
            deps: buf.deps_for_send(&b),
        };
        insert(&mut buf, &z, 0);
        assert_eq!(buf.heads(), vec![id(4)]);
        assert_eq!(buf.compare(&id(2), &id(4)), Some(CausalOrder::Before));
        assert_eq!(buf.compare(&id(4), &id(1)), Some(CausalOrder::After));
    }

    /// A random DAG: each message depends on its sender's previous and up to
    /// three earlier messages.
    fn random_dag(rng: &mut StdRng, senders: &[PeerId], n: u32) -> Vec<Msg> {
        let mut msgs: Vec<Msg> = vec![];
        let mut last: HashMap<PeerId, (u64, MessageId)> = HashMap::new();
        for i in 0..n {
            let sender = senders[rng.random_range(0..senders.len())];
            let (seq, mut deps) = match last.get(&sender) {
                Some((s, prev)) => (s + 1, vec![*prev]),
                None => (1, vec![]),
            };
            for _ in 0..rng.random_range(0..4) {
                if !msgs.is_empty() {
                    let d = msgs[rng.random_range(0..msgs.len())].id;
                    if !deps.contains(&d) {
                        deps.push(d);
                    }
                }
            }
            let m = Msg {
                id: id(i + 1),
                sender,
                seq,
                deps,
            };
            last.insert(sender, (seq, m.id));
            msgs.push(m);
        }
        msgs
    }

    #[test]
    fn random_permutations_deliver_in_a_valid_order() {
        let senders: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        for seed in 0..30 {
            let mut rng = StdRng::seed_from_u64(seed);
            let dag = random_dag(&mut rng, &senders, 60);
            // Shuffle (Fisher-Yates) with some duplicates mixed in.
            let mut order: Vec<usize> = (0..dag.len())
                .chain((0..10).map(|_| rng.random_range(0..dag.len())))
                .collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
            let mut buf = CausalBuffer::default();
            let mut delivered = vec![];
            for &i in &order {
                delivered.extend(insert(&mut buf, &dag[i], 0));
            }
            assert_eq!(delivered.len(), dag.len(), "seed {seed}");
            let pos: HashMap<MessageId, usize> =
                delivered.iter().enumerate().map(|(i, m)| (*m, i)).collect();
            assert_eq!(pos.len(), dag.len(), "each exactly once");
            for m in &dag {
                for d in &m.deps {
                    assert!(pos[d] < pos[&m.id], "seed {seed}: dep after dependent");
                }
            }
            // Happens-before agrees with the DAG's reachability.
            let (a, b) = (&dag[5], &dag[50]);
            let reach = reaches(&dag, b.id, a.id);
            let got = buf.compare(&a.id, &b.id);
            assert_eq!(
                got,
                Some(if reach {
                    CausalOrder::Before
                } else {
                    CausalOrder::Concurrent
                })
            );
        }
    }

    fn reaches(dag: &[Msg], from: MessageId, to: MessageId) -> bool {
        let by_id: HashMap<_, _> = dag.iter().map(|m| (m.id, m)).collect();
        let mut stack = vec![from];
        let mut seen = HashSet::new();
        while let Some(x) = stack.pop() {
            for d in &by_id[&x].deps {
                if *d == to {
                    return true;
                }
                if seen.insert(*d) {
                    stack.push(*d);
                }
            }
        }
        false
    }
}
