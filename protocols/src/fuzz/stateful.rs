//! Targets for the stateful cores: the membership log inside a group
//! (arbitrary signed op sequences from a few fixed keys, delivered in any
//! order), the causal buffer (exactly-once, causal, bounded), and the chunk
//! scheduler (no duplicate requests outside end-game, `have` only grows).
//! The input is a little program: each byte picks the next step.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::files::{Bitfield, ChunkOutcome, Manifest, Scheduler, SchedulerConfig};
use crate::groups::causal::{CausalBuffer, CausalOrder, MAX_DEPS, MessageId};
use crate::groups::membership::MAX_MEMBERS;
use crate::groups::{Applied, Group, MembershipLog, Op, OpBody, OpKind, PeerId};

use super::FuzzRng;
use super::fixtures::{self, ADMIN, keypair, peer, sample};

/// Reads the program: bytes, then zeros forever.
struct Program<'a>(&'a [u8]);

impl Program<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

// ---- membership ---------------------------------------------------------

/// The most ops one run generates (each costs a signature and sealing).
const MAX_OPS: usize = 24;

/// A change to an honest op; re-signed by the op's author (a fork the
/// author really signed) or by another fixed key (refused).
fn forge(op: &Op, how: u8, who: u8) -> Option<Op> {
    let mut body: OpBody = op.body.clone();
    match how % 7 {
        0 => body.index = body.index.wrapping_add(1),
        1 => body.index = body.index.wrapping_sub(1),
        2 => body.epoch = body.epoch.wrapping_add(1),
        3 => body.timestamp_ms ^= 1,
        4 => body.prev[0] ^= 1,
        5 => {
            body.kind = OpKind::Add {
                member: peer(2 + who % 4),
            }
        }
        _ => body.epoch_keys.clear(),
    }
    let signer = if who & 0x80 == 0 {
        // The author's own key: a valid signature over a different op.
        (1..=5u8).find(|n| peer(*n) == op.body.author)?
    } else {
        1 + who % 5
    };
    Op::sign(&keypair(signer), body).ok()
}

/// What every log satisfies, after any input.
fn check_log(log: &MembershipLog, genesis: &Op) {
    assert!(log.is_member(&log.admin()), "the admin left the members");
    assert!(log.members().len() <= MAX_MEMBERS);
    let ops = log.ops_since(0);
    assert_eq!(ops.len() as u64, log.len());
    assert_eq!(ops.first(), Some(genesis));
    // The log is a function of its ops: replaying them gives the same state.
    let Ok(mut again) = MembershipLog::from_genesis(genesis.clone()) else {
        panic!("genesis refused on replay")
    };
    for op in &ops[1..] {
        assert!(op.verify().is_ok(), "an op in the log does not verify");
        if op.body.author != log.admin() {
            assert_eq!(op.body.kind, OpKind::Leave, "a member did an admin's op");
        }
        if let Err(e) = again.apply(op.clone()) {
            panic!("replaying the log refused op {}: {e}", op.body.index)
        }
    }
    assert_eq!(again.last_hash(), log.last_hash());
    assert_eq!(again.members(), log.members());
    assert_eq!(again.epoch(), log.epoch());
}

/// Feeds `ops` to `g` in `order`, twice; checks monotony after each.
fn deliver(g: &mut Group, ops: &[Op], order: &[usize], genesis: &Op) {
    for _ in 0..2 {
        for &i in order {
            let before_len = g.membership().len();
            let before_epoch = g.membership().epoch();
            let prefix: Vec<Op> = g.membership().ops_since(0).to_vec();
            let received = g.receive_op(ops[i].clone());
            let log = g.membership();
            assert!(log.len() >= before_len && log.epoch() >= before_epoch);
            assert_eq!(
                &log.ops_since(0)[..prefix.len()],
                &prefix[..],
                "history changed"
            );
            if let Ok(r) = received {
                let new = r
                    .applied
                    .iter()
                    .filter(|a| **a != Applied::Duplicate)
                    .count();
                assert_eq!(log.len(), before_len + new as u64);
            }
        }
    }
    check_log(g.membership(), genesis);
}

/// A group history driven by the input: the admin (key 1) adds, removes and
/// rotates; members (keys 2 to 5) leave; forgeries alter honest ops. Two
/// replicas of member 2 receive every op, one in order and one in an order
/// the input picks; without forgeries they must end with the admin's log
/// and hold the current key exactly when they are members.
pub(super) fn groups_membership(data: &[u8]) {
    let genesis = sample().ops[0].clone();
    let mut p = Program(data);
    let mut rng = FuzzRng::new(u64::from(p.byte()));
    let Ok(mut truth) = Group::join(keypair(ADMIN), genesis.clone()) else {
        panic!("admin join")
    };
    let mut pool: Vec<Op> = Vec::new();
    let mut forged = false;
    let mut t = 10;
    while !p.done() && pool.len() < MAX_OPS {
        let (cmd, arg) = (p.byte(), p.byte());
        let who = peer(2 + arg % 4);
        t += 1;
        let op = match cmd % 6 {
            0 => truth.add(who, &mut rng, t).ok(),
            1 => truth.remove(who, &mut rng, t).ok(),
            2 => truth.rotate(&mut rng, t).ok(),
            3 => {
                let log = truth.membership();
                if !log.is_member(&who) {
                    continue;
                }
                let body = OpBody {
                    group_id: Some(log.id()),
                    index: log.len(),
                    prev: log.last_hash(),
                    author: who,
                    kind: OpKind::Leave,
                    epoch: log.epoch(),
                    epoch_keys: vec![],
                    timestamp_ms: t,
                };
                let op = Op::sign(&keypair(2 + arg % 4), body).ok();
                if let Some(op) = &op {
                    assert!(
                        truth.receive_op(op.clone()).is_ok(),
                        "an honest leave refused"
                    );
                }
                op
            }
            4 if !pool.is_empty() => {
                let base = pool[usize::from(arg) % pool.len()].clone();
                let f = forge(&base, arg / 7, p.byte());
                forged |= f.is_some();
                f
            }
            _ => None,
        };
        pool.extend(op);
    }
    let honest_len = truth.membership().len();
    let in_order: Vec<usize> = (0..pool.len()).collect();
    let mut shuffled = in_order.clone();
    for i in (1..shuffled.len()).rev() {
        let j = usize::from(p.byte()) % (i + 1);
        shuffled.swap(i, j);
    }
    let me = peer(2);
    let mut replicas = Vec::new();
    for order in [&in_order, &shuffled] {
        let Ok(mut g) = Group::join(keypair(2), genesis.clone()) else {
            panic!("member join")
        };
        deliver(&mut g, &pool, order, &genesis);
        replicas.push(g);
    }
    check_log(truth.membership(), &genesis);
    if !forged {
        for g in &replicas {
            let log = g.membership();
            assert_eq!(log.len(), honest_len, "a replica missed honest ops");
            assert_eq!(log.last_hash(), truth.membership().last_hash());
            // Members hold the current key; others only while the admin
            // has not yet rotated after their leaving.
            let has_key = g.keys().get(log.epoch()).is_some();
            if log.is_member(&me) {
                assert!(has_key, "a member without the current key");
            } else if !log.rotation_pending() {
                assert!(!has_key, "a former member holds the current key");
            }
        }
    }
}

pub(super) fn groups_membership_seeds() -> Vec<Vec<u8>> {
    vec![
        vec![1, 0, 0, 1, 1, 2, 0, 0, 2, 4, 9, 1],
        vec![2, 0, 3, 3, 0, 2, 0, 1, 2],
        vec![3, 0, 1, 4, 0, 0x80, 3, 1, 0, 2, 5, 4, 1],
    ]
}

// ---- causal buffer ------------------------------------------------------

struct Msg {
    id: MessageId,
    sender: PeerId,
    seq: u64,
    deps: Vec<MessageId>,
    /// Not an honest message: may be refused or make honest ones refused.
    evil: bool,
}

fn msg_id(sender: u8, seq: u64, salt: u8, deps: &[MessageId]) -> MessageId {
    let mut h = Sha256::new();
    h.update([sender, salt]);
    h.update(seq.to_be_bytes());
    for d in deps {
        h.update(d.0);
    }
    MessageId(h.finalize().into())
}

fn senders() -> &'static [PeerId; 3] {
    static S: OnceLock<[PeerId; 3]> = OnceLock::new();
    S.get_or_init(|| [peer(1), peer(2), peer(3)])
}

/// Builds a history: honest messages (each names its sender's previous one
/// and some earlier messages) and, when the input says so, bad ones.
fn history(p: &mut Program<'_>) -> Vec<Msg> {
    let mut msgs: Vec<Msg> = Vec::new();
    let mut last: [(u64, Option<MessageId>); 3] = [(0, None); 3];
    while !p.done() && msgs.len() < 40 {
        let (a, b) = (p.byte(), p.byte());
        let s = usize::from(a % 3);
        let (seq, prev) = last[s];
        let mut deps: Vec<MessageId> = prev.into_iter().collect();
        for k in 0..8usize {
            if b & (1 << k) != 0 && k < msgs.len() {
                let d = msgs[msgs.len() - 1 - k].id;
                if !deps.contains(&d) && deps.len() < MAX_DEPS {
                    deps.push(d);
                }
            }
        }
        let sender = senders()[s];
        let (seq, evil) = match a / 3 % 8 {
            // Equivocation: a second message with a used sequence number.
            0 if seq > 0 => (1 + u64::from(b) % seq, true),
            // Not naming the previous message.
            1 if seq > 0 => {
                deps.retain(|d| Some(*d) != prev);
                (seq + 1, true)
            }
            // Depending on a message nobody will ever send.
            2 => {
                deps.truncate(MAX_DEPS - 1);
                deps.push(MessageId([b; 32]));
                (seq + 1, true)
            }
            // Refused outright: sequence 0, duplicate deps, too many deps.
            3 if b % 4 == 0 => (0, true),
            3 if b % 4 == 1 && !deps.is_empty() => {
                deps.push(deps[0]);
                (seq + 1, true)
            }
            3 if b % 4 == 2 => {
                deps.extend((0..=MAX_DEPS as u8).map(|i| MessageId([i; 32])));
                (seq + 1, true)
            }
            _ => (seq + 1, false),
        };
        let id = msg_id(a % 3, seq, if evil { b | 1 } else { 0 }, &deps);
        if !evil {
            last[s] = (seq, Some(id));
        }
        msgs.push(Msg {
            id,
            sender,
            seq,
            deps,
            evil,
        });
    }
    msgs
}

/// The model of what a buffer has delivered.
#[derive(Default)]
struct Delivered {
    ids: HashSet<MessageId>,
    last: HashMap<PeerId, (u64, MessageId)>,
    deps_of: HashMap<MessageId, Vec<MessageId>>,
}

fn insert_checked(
    buf: &mut CausalBuffer<u8>,
    model: &mut Delivered,
    m: &Msg,
    max_pending: usize,
    any_evil: bool,
) {
    let was = buf.contains(&m.id);
    let r = buf.insert(m.id, m.sender, m.seq, m.deps.clone(), 0);
    let Ok(ins) = r else {
        assert!(
            any_evil,
            "an honest message refused without any bad one: {r:?}"
        );
        return;
    };
    assert_eq!(ins.duplicate, was);
    for d in &ins.delivered {
        assert!(model.ids.insert(d.id), "delivered twice");
        for dep in &d.deps {
            assert!(
                model.ids.contains(dep) && *dep != d.id,
                "delivered before a dependency"
            );
        }
        let (seq, prev) = model.last.get(&d.sender).copied().unwrap_or((0, d.id));
        assert_eq!(d.seq, seq + 1, "a sender's messages out of order");
        if seq > 0 {
            assert!(
                d.deps.contains(&prev),
                "delivered without its previous message"
            );
        }
        model.last.insert(d.sender, (d.seq, d.id));
        model.deps_of.insert(d.id, d.deps.clone());
        assert!(buf.is_delivered(&d.id));
    }
    for e in &ins.evicted {
        assert!(!buf.contains(e));
    }
    assert!(buf.pending_len() <= max_pending, "pending over its bound");
    for (s, (seq, _)) in &model.last {
        assert_eq!(buf.max_seq(s), *seq);
    }
}

/// Messages in an order the input picks (repeats included), then everything
/// twice in history order: every message is delivered at most once, after
/// its dependencies and its sender's previous one; pending stays bounded;
/// without bad messages everything is delivered and the heads equal those
/// of a buffer fed in history order.
pub(super) fn groups_causal(data: &[u8]) {
    let mut p = Program(data);
    let max_pending = 1 + usize::from(p.byte() % 32);
    let split = usize::from(p.byte());
    let (head, tail) = p.0.split_at(split.min(p.0.len()));
    let msgs = history(&mut Program(head));
    let any_evil = msgs.iter().any(|m| m.evil);
    let mut buf = CausalBuffer::new(max_pending);
    let mut model = Delivered::default();
    if !msgs.is_empty() {
        for &b in tail {
            let m = &msgs[usize::from(b) % msgs.len()];
            insert_checked(&mut buf, &mut model, m, max_pending, any_evil);
        }
    }
    for _ in 0..2 {
        for m in &msgs {
            insert_checked(&mut buf, &mut model, m, max_pending, any_evil);
        }
    }
    // Heads: the delivered messages no delivered message depends on.
    let depended: HashSet<MessageId> = model.deps_of.values().flatten().copied().collect();
    let heads: BTreeSet<MessageId> = model.ids.difference(&depended).copied().collect();
    assert_eq!(buf.heads().into_iter().collect::<BTreeSet<_>>(), heads);
    for (id, deps) in model.deps_of.iter().take(8) {
        for d in deps {
            assert_eq!(buf.compare(d, id), Some(CausalOrder::Before));
            assert_eq!(buf.compare(id, d), Some(CausalOrder::After));
        }
    }
    if !any_evil {
        assert!(
            msgs.iter().all(|m| buf.is_delivered(&m.id)),
            "not all delivered"
        );
        let mut reference = CausalBuffer::new(max_pending);
        for m in &msgs {
            let _ = reference.insert(m.id, m.sender, m.seq, m.deps.clone(), 0u8);
        }
        assert_eq!(reference.heads_hash(), buf.heads_hash());
        assert_eq!(reference.per_sender(), buf.per_sender());
    }
}

pub(super) fn groups_causal_seeds() -> Vec<Vec<u8>> {
    vec![
        vec![4, 8, 0, 0, 1, 1, 2, 3, 0, 7, 1, 1, 3, 2, 1, 0, 2],
        vec![0, 6, 3, 0, 1, 0, 4, 1, 0, 1, 2],
        vec![31, 10, 0, 0, 6, 9, 1, 0, 9, 1, 7, 0, 4, 3, 2, 1, 0],
    ]
}

// ---- chunk scheduler ----------------------------------------------------

const CHUNK: u32 = 1024;

fn sources() -> &'static [PeerId; 4] {
    static S: OnceLock<[PeerId; 4]> = OnceLock::new();
    S.get_or_init(|| [peer(1), peer(2), peer(3), peer(4)])
}

fn pattern(len: u64, b: u8) -> Bitfield {
    let mut bits = Bitfield::new(len);
    for i in 0..len {
        if b & (1 << (i % 8)) != 0 {
            bits.set(i);
        }
    }
    bits
}

/// What the node believes a source holds: `None` until it reported.
fn holds(h: Option<&Option<Bitfield>>, chunk: u64) -> bool {
    matches!(h, Some(Some(b)) if b.get(chunk))
}

struct Sched {
    s: Scheduler,
    manifest: Manifest,
    data: Vec<u8>,
    /// Per current source, what it holds (None: not reported yet).
    holds: BTreeMap<PeerId, Option<Bitfield>>,
    /// Requests the node has out: (peer, chunk).
    out: BTreeSet<(PeerId, u64)>,
    copies: u32,
    max_window: u32,
    have: Bitfield,
}

impl Sched {
    fn chunk(&self, i: u64) -> &[u8] {
        let off = self.manifest.chunk_offset(i).unwrap_or(0) as usize;
        let len = self.manifest.chunk_len(i).unwrap_or(0) as usize;
        &self.data[off..off + len]
    }

    /// Drops what the scheduler no longer knows (removed or banned sources).
    fn sync_sources(&mut self) {
        let now: BTreeSet<PeerId> = self.s.sources().iter().map(|s| s.peer).collect();
        self.holds.retain(|p, _| now.contains(p));
        for p in now {
            self.holds.entry(p).or_insert(None);
        }
        let holds = &self.holds;
        self.out.retain(|(p, _)| holds.contains_key(p));
    }

    fn check_have(&mut self) {
        let have = self.s.have().clone();
        for i in self.have.iter_set() {
            assert!(have.get(i), "chunk {i} left `have`");
        }
        assert_eq!(self.s.progress().chunks_have, have.count());
        assert_eq!(self.s.is_complete(), have.is_full());
        self.have = have;
    }

    fn next_requests(&mut self, now: Instant) {
        let reqs = self.s.next_requests(now);
        if self.s.is_complete() {
            assert!(reqs.is_empty());
        }
        let mut dup = false;
        for &(p, c) in &reqs {
            assert!(
                c < self.manifest.chunk_count() && !self.have.get(c),
                "asked for {c}"
            );
            assert!(
                holds(self.holds.get(&p), c),
                "asked {p} for chunk {c} it lacks"
            );
            assert!(self.out.insert((p, c)), "asked {p} twice for chunk {c}");
            let copies = self.out.iter().filter(|(_, x)| *x == c).count();
            dup |= copies > 1;
            assert!(
                copies as u32 <= self.copies.max(1),
                "chunk {c} in flight {copies} times"
            );
            let mine = self.out.iter().filter(|(q, _)| *q == p).count();
            assert!(
                mine as u32 <= self.max_window.max(1),
                "window of {p} overrun"
            );
        }
        if dup {
            // End-game: every missing chunk a source holds is in flight.
            for c in self.have.iter_missing() {
                let held = self
                    .holds
                    .values()
                    .any(|h| matches!(h, Some(b) if b.get(c)));
                let flying = self.out.iter().any(|(_, x)| *x == c);
                assert!(
                    !held || flying,
                    "duplicate requests outside end-game ({c} idle)"
                );
            }
        }
    }
}

/// A download driven by the input against a model of the node: sources come
/// and go, report what they hold, answer (with good or corrupt chunks),
/// fail or time out.
/// The scheduler the program drives: its file, chunk windows, end-game
/// copies and strikes all come from the program's first bytes.
fn scheduler_under_test(p: &mut Program<'_>) -> (Sched, u64) {
    let count = 1 + u64::from(p.byte() % 24);
    let size = count * u64::from(CHUNK) - u64::from(p.byte()) * 4;
    let content = fixtures::content(size as usize, 7);
    let Ok(mut b) = crate::files::ManifestBuilder::new(CHUNK) else {
        panic!("builder")
    };
    b.update(&content);
    let Ok(manifest) = b.finish(None) else {
        panic!("manifest")
    };
    let count = manifest.chunk_count();
    let initial = pattern(count, p.byte() & p.byte());
    let (w, c, flags) = (p.byte(), p.byte(), p.byte());
    let copies = 1 + u32::from(c % 3);
    let max_window = 1 + u32::from(w % 8);
    let cfg = SchedulerConfig::default()
        .with_windows(1 + u32::from(w / 8 % 4).min(max_window - 1), max_window)
        .with_endgame_copies(copies)
        .with_strikes(2, flags & 1 == 0)
        .with_seed(u64::from(flags >> 1))
        .with_timeouts(
            Duration::from_millis(100),
            Duration::from_millis(500),
            Duration::from_secs(2),
        );
    let Ok(s) = Scheduler::new(manifest.clone(), initial.clone(), cfg) else {
        panic!("scheduler")
    };
    let st = Sched {
        s,
        manifest,
        data: content,
        holds: BTreeMap::new(),
        out: BTreeSet::new(),
        copies,
        max_window,
        have: initial,
    };
    (st, count)
}

impl Sched {
    /// An answer from `peer`: to one of its outstanding requests when it
    /// has some, else for `chunk`; `corrupt` flips a byte.
    fn answer(&mut self, peer: PeerId, chunk: u64, arg: u8, corrupt: bool, now: Instant) {
        let mine: Vec<u64> = self
            .out
            .iter()
            .filter(|(q, _)| *q == peer)
            .map(|(_, c)| *c)
            .collect();
        let index = if mine.is_empty() {
            chunk
        } else {
            mine[usize::from(arg / 4) % mine.len()]
        };
        let mut bytes = self.chunk(index).to_vec();
        if corrupt && let Some(x) = bytes.first_mut() {
            *x ^= 1;
        }
        let had = self.have.get(index);
        let outcome = self.s.on_chunk(&peer, index, &bytes, now);
        self.out.remove(&(peer, index));
        match outcome {
            ChunkOutcome::Accepted { cancel } => {
                assert!(!corrupt && !had, "accepted a corrupt or held chunk");
                assert!(self.s.have().get(index));
                for q in cancel {
                    self.out.remove(&(q, index));
                }
            }
            ChunkOutcome::Corrupt { .. } => assert!(corrupt),
            ChunkOutcome::Duplicate => assert!(had),
            ChunkOutcome::Unsolicited => {
                assert!(!self.holds.contains_key(&peer));
            }
        }
    }
}

pub(super) fn files_scheduler(data: &[u8]) {
    let mut p = Program(data);
    let (mut st, count) = scheduler_under_test(&mut p);
    let start = Instant::now();
    let mut now = start;
    let mut steps = 0;
    while !p.done() && steps < 200 {
        steps += 1;
        let (cmd, arg) = (p.byte(), p.byte());
        let peer = sources()[usize::from(arg % 4)];
        let chunk = u64::from(arg / 4) % count;
        match cmd % 10 {
            0 => {
                st.s.add_source(peer);
            }
            1 => {
                st.s.remove_source(&peer);
            }
            2 => {
                let bits = pattern(count, p.byte());
                if st.s.source_have(&peer, bits.clone()).is_ok() {
                    st.holds.insert(peer, Some(bits));
                }
            }
            3 => {
                if st.s.source_complete(&peer).is_ok() {
                    st.holds.insert(peer, Some(Bitfield::full(count)));
                }
            }
            4 => {
                if st.s.source_lacks(&peer, chunk, now).is_ok() {
                    // Its request for that chunk, if any, is released.
                    st.out.remove(&(peer, chunk));
                    if let Some(Some(bits)) = st.holds.get_mut(&peer) {
                        bits.clear(chunk);
                    }
                }
            }
            5 => st.next_requests(now),
            6 | 7 => st.answer(peer, chunk, arg, cmd % 10 == 7, now),
            8 => {
                st.s.on_failure(&peer, chunk, now);
                st.out.remove(&(peer, chunk));
            }
            _ => {
                now += Duration::from_millis(u64::from(arg) * 20);
                for (q, c) in st.s.expired(now) {
                    assert!(st.out.remove(&(q, c)), "expired a request never made");
                }
            }
        }
        st.sync_sources();
        st.check_have();
    }
}

pub(super) fn files_scheduler_seeds() -> Vec<Vec<u8>> {
    vec![
        vec![
            7, 0, 0xff, 0xff, 9, 1, 0, 0, 0, 1, 3, 0, 3, 1, 5, 0, 6, 0, 6, 1, 5, 0, 6, 0,
        ],
        vec![
            3, 10, 0, 0, 15, 2, 0, 0, 0, 1, 2, 0, 0x55, 2, 1, 0xaa, 5, 0, 7, 0, 9, 200, 5, 0,
        ],
        vec![
            1, 0, 0, 0, 2, 0, 0, 2, 0, 0, 1, 3, 2, 3, 1, 5, 0, 8, 0, 5, 0, 6, 1, 6, 2,
        ],
    ]
}
