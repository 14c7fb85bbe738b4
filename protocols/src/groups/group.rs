//! [`Group`]: one member's view of one group, tying the membership log,
//! the keys and causal delivery together.
//!
//! Checks on a received message, cheapest first: duplicate id, group,
//! structure, the sender's signature, then (if the epoch is known) the
//! sender's membership in that epoch and our key for it, then decryption.
//! A message of an epoch newer than our log is held until the op opening
//! that epoch arrives; a message of a known epoch whose key we were never
//! given is refused, since it never will be.

use std::collections::{BTreeMap, VecDeque};

use rand_core::CryptoRng;

use super::causal::{CausalBuffer, CausalError, Inserted, MAX_DEPS, MessageId};
use super::crypto::{
    self, CryptoError, EpochKey, GroupKeys, MESSAGE_OVERHEAD, MemberSecret, MessageContext,
};
use super::membership::{Applied, MembershipError, MembershipLog, Op, OpBody, OpKind};
use super::sync::{MAX_SUMMARY_SENDERS, Summary};
use super::wire::{EnvelopeBody, MAX_TEXT, SignedEnvelope};
use super::{GroupId, Keypair, PeerId};

/// Maximum ops held while waiting for earlier ones.
pub const MAX_PENDING_OPS: usize = 256;
/// Maximum messages held while waiting for the op that opens their epoch.
pub const MAX_AWAITING_EPOCH: usize = 256;

/// A decrypted message waiting in or released by the causal buffer:
/// `(epoch, timestamp_ms, text)`.
pub type Plain = (u64, u64, String);

/// The causal buffer of a [`Group`].
pub type MessageBuffer = CausalBuffer<Plain>;

/// Errors of [`Group`] operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// A membership op was refused.
    #[error(transparent)]
    Membership(#[from] MembershipError),
    /// A cryptographic operation failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The causal layer refused the message.
    #[error(transparent)]
    Causal(#[from] CausalError),
    /// The message's signature does not match its claimed sender.
    #[error("forged sender {0}")]
    ForgedSender(PeerId),
    /// The sender was not a member during the message's epoch.
    #[error("{sender} was not a member in epoch {epoch}")]
    NotMember {
        /// The sender.
        sender: PeerId,
        /// The message's epoch.
        epoch: u64,
    },
    /// The sender is not a member of the message's epoch as far as this
    /// log goes, but an op this node has not received yet may add it (the
    /// epoch is the current one or later): not the relay's fault; catch up
    /// and the message comes again.
    #[error("{sender} is not a member of epoch {epoch} yet, as far as this node knows")]
    NotMemberYet {
        /// The sender.
        sender: PeerId,
        /// The message's epoch.
        epoch: u64,
    },
    /// The sender was removed (or left) before writing this message: its
    /// sequence number is past the last one the `Remove` (or `LeaveAt`)
    /// recorded.
    #[error("{sender} wrote message {seq} after it was removed or left")]
    AfterRemoval {
        /// The sender.
        sender: PeerId,
        /// The message's sequence number.
        seq: u64,
    },
    /// The local member is not (or no longer) a member.
    #[error("the local peer is not a member of the group")]
    NotAMember,
    /// The operation is reserved to the admin.
    #[error("only the admin may do this")]
    NotAdmin,
    /// We were not given the key of this epoch (it began before we joined or after we left).
    #[error("no key for epoch {0}")]
    NoKeyForEpoch(u64),
    /// The message belongs to another group.
    #[error("message for another group")]
    WrongGroup,
    /// The text exceeds [`MAX_TEXT`].
    #[error("text of {0} bytes exceeds {MAX_TEXT}")]
    TextTooLarge(usize),
    /// The decrypted text is not UTF-8.
    #[error("text is not UTF-8")]
    NotUtf8,
}

/// A message released to the application, in causal order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Its id.
    pub id: MessageId,
    /// Its (verified) sender.
    pub sender: PeerId,
    /// The sender's sequence number.
    pub seq: u64,
    /// The epoch it was encrypted in.
    pub epoch: u64,
    /// The text.
    pub text: String,
    /// The sender's clock when sending (informational).
    pub timestamp_ms: u64,
    /// Its causal dependencies.
    pub deps: Vec<MessageId>,
}

/// What receiving an op did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct OpReceived {
    /// Ops applied, in order: this one and buffered ones it unblocked.
    pub applied: Vec<Applied>,
    /// Messages released because a new epoch key arrived.
    pub delivered: Vec<Delivered>,
    /// The op was buffered until the ops before it arrive; fetch them from
    /// [`MembershipLog::len`].
    pub buffered: bool,
    /// We are the admin and a member left: call [`Group::rotate`].
    pub must_rotate: bool,
}

/// Keeps at most [`MAX_SUMMARY_SENDERS`] of `per_sender` (sorted by
/// sender), those for which `first` holds first.
pub(crate) fn cap_senders(
    mut per_sender: Vec<(PeerId, u64)>,
    first: impl Fn(&PeerId) -> bool,
) -> Vec<(PeerId, u64)> {
    if per_sender.len() > MAX_SUMMARY_SENDERS {
        per_sender.sort_by_key(|(p, _)| !first(p));
        per_sender.truncate(MAX_SUMMARY_SENDERS);
        per_sender.sort();
    }
    per_sender
}

/// One member's state for one group.
///
/// Persistence is the node's: it stores the ops and the envelopes (its own
/// included) and rebuilds a `Group` with [`Group::join`],
/// [`Group::receive_op`] and [`Group::receive_message`]; replaying its own
/// envelopes restores its sequence number. Delivered messages are kept as
/// ids and dependencies only (a few hundred bytes each), not as text.
#[derive(Debug)]
pub struct Group {
    keypair: Keypair,
    local: PeerId,
    secret: MemberSecret,
    log: MembershipLog,
    keys: GroupKeys,
    causal: MessageBuffer,
    pending_ops: BTreeMap<u64, Op>,
    awaiting_epoch: VecDeque<(MessageId, SignedEnvelope)>,
    evicted: Vec<MessageId>,
}

impl Group {
    /// Founds a group with the local peer as admin; `members` need not
    /// include it. Returns the genesis op to publish.
    pub fn create(
        keypair: Keypair,
        name: &str,
        description: &str,
        members: &[PeerId],
        rng: &mut impl CryptoRng,
        now_ms: u64,
    ) -> Result<(Group, Vec<Op>), GroupError> {
        let admin = keypair.public().to_peer_id();
        let mut all = vec![admin];
        for m in members {
            if !all.contains(m) {
                all.push(*m);
            }
        }
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let key = EpochKey::random(rng);
        let epoch_keys = all
            .iter()
            .map(|m| crypto::seal_key(rng, &nonce, 0, &key, m))
            .collect::<Result<Vec<_>, _>>()?;
        let body = OpBody {
            group_id: None,
            index: 0,
            prev: [0; 32],
            author: admin,
            kind: OpKind::Create {
                name: name.to_owned(),
                description: description.to_owned(),
                admin,
                members: all,
                nonce,
            },
            epoch: 0,
            epoch_keys,
            timestamp_ms: now_ms,
        };
        let op = Op::sign(&keypair, body)?;
        let group = Group::join(keypair, op.clone())?;
        Ok((group, vec![op]))
    }

    /// Starts following a group from its genesis op (fetched from anyone; it
    /// is verified). Later ops are fed with [`Group::receive_op`].
    pub fn join(keypair: Keypair, genesis: Op) -> Result<Group, GroupError> {
        let secret = MemberSecret::from_keypair(&keypair)?;
        let log = MembershipLog::from_genesis(genesis.clone())?;
        let mut group = Group {
            local: keypair.public().to_peer_id(),
            keypair,
            secret,
            log,
            keys: GroupKeys::default(),
            causal: CausalBuffer::default(),
            pending_ops: BTreeMap::new(),
            awaiting_epoch: VecDeque::new(),
            evicted: Vec::new(),
        };
        group.take_key(&genesis);
        Ok(group)
    }

    /// The group id.
    pub fn id(&self) -> GroupId {
        self.log.id()
    }

    /// The gossipsub topic.
    pub fn topic(&self) -> String {
        super::topic(&self.log.id())
    }

    /// The local peer.
    pub fn local_peer(&self) -> PeerId {
        self.local
    }

    /// The membership log.
    pub fn membership(&self) -> &MembershipLog {
        &self.log
    }

    /// The epoch keys held.
    pub fn keys(&self) -> &GroupKeys {
        &self.keys
    }

    /// The causal state (heads, missing ids, comparisons).
    pub fn causal(&self) -> &MessageBuffer {
        &self.causal
    }

    /// What this member has, for catch-up.
    ///
    /// `per_sender` holds at most [`MAX_SUMMARY_SENDERS`] entries, current
    /// members first, so that a summary always fits a sync request however
    /// many members came and went (a peer treats a sender left out as one
    /// we have nothing of, and sends its messages again: wasteful, never
    /// wrong).
    pub fn summary(&self) -> Summary {
        Summary {
            membership_len: self.log.len(),
            heads_hash: self.causal.heads_hash(),
            per_sender: cap_senders(self.causal.per_sender(), |p| self.log.is_member(p)),
        }
    }

    /// Ids evicted from the bounded buffers since the last call: fetch them again later.
    pub fn take_evicted(&mut self) -> Vec<MessageId> {
        std::mem::take(&mut self.evicted)
    }

    fn admin_op(
        &mut self,
        kind: OpKind,
        epoch: u64,
        key_to: &[PeerId],
        key: &EpochKey,
        rng: &mut impl CryptoRng,
        now_ms: u64,
    ) -> Result<Op, GroupError> {
        if self.log.admin() != self.local {
            return Err(GroupError::NotAdmin);
        }
        let nonce = *self.log.nonce();
        let epoch_keys = key_to
            .iter()
            .map(|m| crypto::seal_key(rng, &nonce, epoch, key, m))
            .collect::<Result<Vec<_>, _>>()?;
        self.sign_and_apply(kind, epoch, epoch_keys, now_ms)
    }

    fn sign_and_apply(
        &mut self,
        kind: OpKind,
        epoch: u64,
        epoch_keys: Vec<crypto::SealedKey>,
        now_ms: u64,
    ) -> Result<Op, GroupError> {
        let body = OpBody {
            group_id: Some(self.log.id()),
            index: self.log.len(),
            prev: self.log.last_hash(),
            author: self.local,
            kind,
            epoch,
            epoch_keys,
            timestamp_ms: now_ms,
        };
        let op = Op::sign(&self.keypair, body)?;
        self.log.apply(op.clone())?;
        self.take_key(&op);
        Ok(op)
    }

    /// Admin: adds a member, sealing the current key to it. Returns the op to publish.
    pub fn add(
        &mut self,
        member: PeerId,
        rng: &mut impl CryptoRng,
        now_ms: u64,
    ) -> Result<Op, GroupError> {
        let epoch = self.log.epoch();
        let key = self
            .keys
            .get(epoch)
            .cloned()
            .ok_or(GroupError::NoKeyForEpoch(epoch))?;
        self.admin_op(OpKind::Add { member }, epoch, &[member], &key, rng, now_ms)
    }

    /// Admin: removes a member and opens a new epoch whose key the removed
    /// member never receives. Returns the op to publish.
    pub fn remove(
        &mut self,
        member: PeerId,
        rng: &mut impl CryptoRng,
        now_ms: u64,
    ) -> Result<Op, GroupError> {
        let remaining: Vec<PeerId> = self
            .log
            .members()
            .iter()
            .filter(|m| **m != member)
            .copied()
            .collect();
        let key = EpochKey::random(rng);
        // Its messages up to what we delivered stay valid; anything it
        // signs later with the key it keeps is refused by every member.
        let last_seq = Some(self.causal.max_seq(&member));
        self.admin_op(
            OpKind::Remove { member, last_seq },
            self.log.epoch() + 1,
            &remaining,
            &key,
            rng,
            now_ms,
        )
    }

    /// Admin: opens a new epoch for the current members (after a `Leave`).
    pub fn rotate(&mut self, rng: &mut impl CryptoRng, now_ms: u64) -> Result<Op, GroupError> {
        let members: Vec<PeerId> = self.log.members().iter().copied().collect();
        let key = EpochKey::random(rng);
        self.admin_op(
            OpKind::Rotate,
            self.log.epoch() + 1,
            &members,
            &key,
            rng,
            now_ms,
        )
    }

    /// Leaves the group (not for the admin). Returns the op to publish.
    pub fn leave(&mut self, now_ms: u64) -> Result<Op, GroupError> {
        if !self.log.is_member(&self.local) {
            return Err(GroupError::NotAMember);
        }
        let last_seq = self.causal.max_seq(&self.local);
        self.sign_and_apply(
            OpKind::LeaveAt { last_seq },
            self.log.epoch(),
            vec![],
            now_ms,
        )
    }

    /// Opens the epoch key sealed to us in `op`, if any.
    fn take_key(&mut self, op: &Op) {
        let Some(sealed) = op
            .body
            .epoch_keys
            .iter()
            .find(|k| k.recipient == self.local)
        else {
            return;
        };
        match crypto::open_key(&self.secret, self.log.nonce(), op.body.epoch, sealed) {
            Ok(key) => self.keys.insert(op.body.epoch, key),
            // The op is valid and signed by the admin, so this is the
            // admin's fault; the epoch stays unreadable for us.
            Err(e) => {
                tracing::warn!(group = %self.log.id(), epoch = op.body.epoch, error = %e, "sealed key did not open")
            }
        }
    }

    /// Feeds a membership op (from gossip or catch-up).
    ///
    /// Ops may arrive out of order: one ahead of the log is buffered (up to
    /// [`MAX_PENDING_OPS`]) and applied once the gap is filled.
    pub fn receive_op(&mut self, op: Op) -> Result<OpReceived, GroupError> {
        let mut out = OpReceived::default();
        if op.body.index > self.log.len() {
            if op.body.group_id != Some(self.log.id()) {
                return Err(MembershipError::WrongGroup.into());
            }
            // Its chain cannot be checked until its predecessors arrive, but
            // its signature can: only ops signed by the admin or a current
            // member are held, so a forged op cannot take the slot of the
            // real one. Keep the lowest indices when full.
            op.verify()?;
            let author = op.body.author;
            if author != self.log.admin() && !self.log.is_member(&author) {
                return Err(MembershipError::NotAllowed(author).into());
            }
            self.pending_ops.entry(op.body.index).or_insert(op);
            if self.pending_ops.len() > MAX_PENDING_OPS {
                self.pending_ops.pop_last();
            }
            out.buffered = true;
            return Ok(out);
        }
        let applied = self.log.apply(op.clone())?;
        let new = applied != Applied::Duplicate;
        out.applied.push(applied);
        if new {
            self.take_key(&op);
            while let Some(next) = self.pending_ops.remove(&self.log.len()) {
                match self.log.apply(next.clone()) {
                    Ok(a) => {
                        self.take_key(&next);
                        out.applied.push(a);
                    }
                    Err(e) => tracing::debug!(error = %e, "buffered op refused"),
                }
            }
            self.pending_ops.retain(|i, _| *i > self.log.len());
            out.delivered = self.retry_awaiting();
        }
        out.must_rotate = self.log.rotation_pending() && self.log.admin() == self.local;
        Ok(out)
    }

    /// Retries messages held for an epoch the log has now reached.
    fn retry_awaiting(&mut self) -> Vec<Delivered> {
        let epoch = self.log.epoch();
        let (ready, keep): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.awaiting_epoch)
            .into_iter()
            .partition(|(_, e)| e.body.epoch <= epoch);
        self.awaiting_epoch = keep;
        let mut delivered = vec![];
        for (_, env) in ready {
            match self.receive_message(env) {
                Ok(d) => delivered.extend(d),
                Err(e) => tracing::debug!(error = %e, "held message refused"),
            }
        }
        delivered
    }

    /// Encrypts, signs and locally delivers a message; returns the envelope
    /// to publish and its id.
    pub fn compose(
        &mut self,
        rng: &mut impl CryptoRng,
        text: &str,
        now_ms: u64,
    ) -> Result<(SignedEnvelope, MessageId), GroupError> {
        if text.len() > MAX_TEXT {
            return Err(GroupError::TextTooLarge(text.len()));
        }
        if !self.log.is_member(&self.local) {
            return Err(GroupError::NotAMember);
        }
        let epoch = self.log.epoch();
        let key = self
            .keys
            .get(epoch)
            .ok_or(GroupError::NoKeyForEpoch(epoch))?;
        let group_id = self.log.id();
        let seq = self.causal.max_seq(&self.local) + 1;
        let ctx = MessageContext {
            group_id: &group_id,
            epoch,
            sender: &self.local,
            seq,
        };
        let ciphertext = crypto::encrypt_message(rng, key, &ctx, text.as_bytes())?;
        let body = EnvelopeBody {
            group_id,
            epoch,
            sender: self.local,
            seq,
            deps: self.causal.deps_for_send(&self.local),
            timestamp_ms: now_ms,
            ciphertext,
        };
        let env = SignedEnvelope::sign(&self.keypair, body)?;
        let id = env.id();
        let b = &env.body;
        // Its deps are all delivered, so this delivers at once.
        let inserted = self.causal.insert(
            id,
            b.sender,
            seq,
            b.deps.clone(),
            (epoch, now_ms, text.to_owned()),
        )?;
        self.evicted.extend(inserted.evicted);
        Ok((env, id))
    }

    /// Feeds a message envelope; returns the messages now deliverable, in causal order.
    pub fn receive_message(&mut self, env: SignedEnvelope) -> Result<Vec<Delivered>, GroupError> {
        let id = env.id();
        if self.causal.contains(&id) || self.awaiting_epoch.iter().any(|(i, _)| *i == id) {
            return Ok(vec![]);
        }
        let b = &env.body;
        if b.group_id != self.log.id() {
            return Err(GroupError::WrongGroup);
        }
        if b.ciphertext.len() > MAX_TEXT + MESSAGE_OVERHEAD {
            return Err(GroupError::TextTooLarge(
                b.ciphertext.len().saturating_sub(MESSAGE_OVERHEAD),
            ));
        }
        if b.seq == 0 {
            return Err(CausalError::ZeroSeq.into());
        }
        if b.deps.len() > MAX_DEPS {
            return Err(CausalError::TooManyDeps(b.deps.len()).into());
        }
        env.verify()
            .map_err(|_| GroupError::ForgedSender(b.sender))?;
        if b.epoch > self.log.epoch() {
            // The op opening this epoch has not reached us yet. Only current
            // members' messages are held, so outsiders cannot flush the
            // buffer; a sender added by an op we have not seen yet is
            // ignored for now and accepted when sync brings the message again.
            if !self.log.is_member(&b.sender) {
                return Err(GroupError::NotMemberYet {
                    sender: b.sender,
                    epoch: b.epoch,
                });
            }
            self.awaiting_epoch.push_back((id, env));
            if self.awaiting_epoch.len() > MAX_AWAITING_EPOCH
                && let Some((old, _)) = self.awaiting_epoch.pop_front()
            {
                self.evicted.push(old);
            }
            return Ok(vec![]);
        }
        if !self.log.was_member(&b.sender, b.epoch) {
            // Tenure in past epochs is settled; in the current one an `Add`
            // we have not received yet may still make the sender a member.
            return Err(if b.epoch == self.log.epoch() {
                GroupError::NotMemberYet {
                    sender: b.sender,
                    epoch: b.epoch,
                }
            } else {
                GroupError::NotMember {
                    sender: b.sender,
                    epoch: b.epoch,
                }
            });
        }
        if !self.log.may_have_written(&b.sender, b.epoch, b.seq) {
            return Err(GroupError::AfterRemoval {
                sender: b.sender,
                seq: b.seq,
            });
        }
        let ctx = MessageContext {
            group_id: &b.group_id,
            epoch: b.epoch,
            sender: &b.sender,
            seq: b.seq,
        };
        let key = self
            .keys
            .get(b.epoch)
            .ok_or(GroupError::NoKeyForEpoch(b.epoch))?;
        let plain = crypto::decrypt_message(key, &ctx, &b.ciphertext)?;
        if plain.len() > MAX_TEXT {
            return Err(GroupError::TextTooLarge(plain.len()));
        }
        let text = String::from_utf8(plain).map_err(|_| GroupError::NotUtf8)?;
        let SignedEnvelope { body, .. } = env;
        let inserted = self.causal.insert(
            id,
            body.sender,
            body.seq,
            body.deps,
            (body.epoch, body.timestamp_ms, text),
        )?;
        Ok(self.released(inserted))
    }

    fn released(&mut self, inserted: Inserted<Plain>) -> Vec<Delivered> {
        self.evicted.extend(inserted.evicted);
        for r in &inserted.rejected {
            tracing::debug!(id = ?r, "pending message rejected at delivery");
        }
        inserted
            .delivered
            .into_iter()
            .map(|r| {
                let (epoch, timestamp_ms, text) = r.item;
                Delivered {
                    id: r.id,
                    sender: r.sender,
                    seq: r.seq,
                    epoch,
                    text,
                    timestamp_ms,
                    deps: r.deps,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::super::causal::CausalOrder;
    use super::*;

    fn kp(i: u8) -> Keypair {
        kp_seed([i; 32])
    }

    fn kp_seed(seed: [u8; 32]) -> Keypair {
        let Ok(k) = Keypair::ed25519_from_bytes(seed) else {
            panic!("keypair")
        };
        k
    }

    fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Admin `a` with members `b` and `c`, all joined from the genesis op.
    fn trio(rng: &mut StdRng) -> (Group, Group, Group) {
        let (b, c) = (kp(2), kp(3));
        let members = [b.public().to_peer_id(), c.public().to_peer_id()];
        let (a, ops) = ok(Group::create(kp(1), "friends", "", &members, rng, 0));
        let gb = ok(Group::join(b, ops[0].clone()));
        let gc = ok(Group::join(c, ops[0].clone()));
        (a, gb, gc)
    }

    #[test]
    fn three_members_chat_and_removal_locks_out() {
        let mut rng = StdRng::seed_from_u64(1);
        let (mut a, mut b, mut c) = trio(&mut rng);
        assert_eq!(a.id(), b.id());
        assert_eq!(b.membership().members().len(), 3);

        let (m1, id1) = ok(a.compose(&mut rng, "hi all", 10));
        for g in [&mut b, &mut c] {
            let d = ok(g.receive_message(m1.clone()));
            assert_eq!(d.len(), 1);
            assert_eq!((d[0].id, d[0].text.as_str(), d[0].seq), (id1, "hi all", 1));
        }
        // c replies; b gets the reply first and must wait for nothing (it has the parent).
        let (r1, rid) = ok(c.compose(&mut rng, "hello", 11));
        assert_eq!(r1.body.deps, vec![id1]);
        assert_eq!(ok(b.receive_message(r1.clone())).len(), 1);
        assert_eq!(b.causal().compare(&id1, &rid), Some(CausalOrder::Before));

        // c writes in epoch 0, then a removes c; c receives the op but no new key.
        let (before_removal, _) = ok(c.compose(&mut rng, "bye", 12));
        let before_removal_body = before_removal.body.clone();
        let c_id = c.local_peer();
        // The admin saw both of c's messages before removing it.
        ok(a.receive_message(r1.clone()));
        ok(a.receive_message(before_removal.clone()));
        let rm = ok(a.remove(c_id, &mut rng, 20));
        assert_eq!(rm.body.epoch, 1);
        assert!(ok(b.receive_op(rm.clone())).applied == vec![Applied::Removed(c_id)]);
        // Written in an epoch where c was a member: still accepted late.
        assert_eq!(ok(b.receive_message(before_removal)).len(), 1);
        ok(c.receive_op(rm));
        assert!(c.keys().get(1).is_none() && b.keys().get(1).is_some());
        assert!(matches!(
            c.compose(&mut rng, "still here?", 21),
            Err(GroupError::NotAMember)
        ));

        let (m2, _) = ok(a.compose(&mut rng, "after removal", 22));
        assert_eq!(m2.body.epoch, 1);
        assert_eq!(ok(b.receive_message(m2.clone()))[0].text, "after removal");
        assert!(matches!(
            c.receive_message(m2.clone()),
            Err(GroupError::NoKeyForEpoch(1))
        ));
        // A removed member's message of the new epoch is refused even if the
        // key leaked to it.
        let leaked = a.keys().get(1).cloned();
        let Some(leaked) = leaked else {
            panic!("no key")
        };
        let mut body = before_removal_body.clone();
        body.epoch = 1;
        body.seq = 2;
        body.deps = vec![c.causal().id_of(&c_id, 1).unwrap_or(MessageId([0; 32]))];
        let ctx = MessageContext {
            group_id: &body.group_id,
            epoch: 1,
            sender: &c_id,
            seq: 2,
        };
        body.ciphertext = ok(crypto::encrypt_message(&mut rng, &leaked, &ctx, b"sneaky"));
        let sneaky = ok(SignedEnvelope::sign(&kp(3), body));
        // (Not settled for the current epoch: an `Add` this node has not
        // received could make c a member again, so it is "not yet".)
        assert!(matches!(
            b.receive_message(sneaky),
            Err(GroupError::NotMemberYet { epoch: 1, .. })
        ));
        // Even with the epoch-0 key, the ciphertext does not open for c.
        let ctx = MessageContext {
            group_id: &m2.body.group_id,
            epoch: 0,
            sender: &m2.body.sender,
            seq: m2.body.seq,
        };
        assert!(c.keys().open(&ctx, &m2.body.ciphertext).is_err());
    }

    /// What a removed member (or one who left) can still sign: a message of
    /// its old epoch with its old key, `seq` following its last one.
    fn post_in_old_epoch(
        rng: &mut StdRng,
        g: &Group,
        signer: &Keypair,
        epoch: u64,
        seq: u64,
        text: &[u8],
    ) -> SignedEnvelope {
        let sender = signer.public().to_peer_id();
        let key = g.keys().get(epoch).cloned();
        let Some(key) = key else { panic!("no key") };
        let group_id = g.id();
        let ctx = MessageContext {
            group_id: &group_id,
            epoch,
            sender: &sender,
            seq,
        };
        let body = EnvelopeBody {
            group_id,
            epoch,
            sender,
            seq,
            deps: g.causal().id_of(&sender, seq - 1).into_iter().collect(),
            timestamp_ms: 99,
            ciphertext: ok(crypto::encrypt_message(rng, &key, &ctx, text)),
        };
        ok(SignedEnvelope::sign(signer, body))
    }

    #[test]
    fn removed_member_new_message_in_old_epoch_is_refused() {
        let mut rng = StdRng::seed_from_u64(11);
        let (mut a, mut b, mut c) = trio(&mut rng);
        let c_id = c.local_peer();
        let (m1, _) = ok(c.compose(&mut rng, "before", 1));
        ok(a.receive_message(m1.clone()));
        let rm = ok(a.remove(c_id, &mut rng, 2));
        assert!(matches!(
            &rm.body.kind,
            OpKind::Remove {
                last_seq: Some(1),
                ..
            }
        ));
        ok(b.receive_op(rm.clone()));
        ok(c.receive_op(rm));
        // Its message from before the removal still arrives late.
        assert_eq!(ok(b.receive_message(m1)).len(), 1);
        // After the removal, c still holds the epoch-0 key and signs on.
        let late = post_in_old_epoch(&mut rng, &c, &kp(3), 0, 2, b"still here");
        assert!(matches!(
            b.receive_message(late.clone()),
            Err(GroupError::AfterRemoval { seq: 2, .. })
        ));
        assert!(matches!(
            a.receive_message(late),
            Err(GroupError::AfterRemoval { .. })
        ));
        // The same holds for a member who left: its `LeaveAt` names its last message.
        let (mut a, mut b, mut c) = trio(&mut rng);
        let (m1, _) = ok(c.compose(&mut rng, "bye", 1));
        let leave = ok(c.leave(2));
        assert!(matches!(leave.body.kind, OpKind::LeaveAt { last_seq: 1 }));
        ok(b.receive_message(m1));
        ok(b.receive_op(leave.clone()));
        ok(a.receive_op(leave));
        let late = post_in_old_epoch(&mut rng, &c, &kp(3), 0, 2, b"one more");
        assert!(matches!(
            b.receive_message(late.clone()),
            Err(GroupError::AfterRemoval { .. })
        ));
        assert!(matches!(
            a.receive_message(late),
            Err(GroupError::AfterRemoval { .. })
        ));
    }

    #[test]
    fn message_from_a_member_added_by_an_unseen_op_is_not_yet_refused() {
        let mut rng = StdRng::seed_from_u64(12);
        let (mut a, mut b, _) = trio(&mut rng);
        let d = kp(4);
        let d_id = d.public().to_peer_id();
        let add = ok(a.add(d_id, &mut rng, 1));
        let mut gd = ok(Group::join(d, a.membership().ops_since(0)[0].clone()));
        ok(gd.receive_op(add.clone()));
        let (hello, _) = ok(gd.compose(&mut rng, "hi, I am new", 2));
        // b has not received the `Add` yet: "not yet", not "not a member".
        assert!(matches!(
            b.receive_message(hello.clone()),
            Err(GroupError::NotMemberYet { .. })
        ));
        ok(b.receive_op(add));
        assert_eq!(ok(b.receive_message(hello)).len(), 1);
    }

    #[test]
    fn summaries_of_groups_with_many_past_senders_fit_a_request() {
        // Every sender that ever wrote is in the causal state; past members
        // are not bounded by MAX_MEMBERS. Before the cap, 3000 senders made
        // a summary of about 150 KB, which every peer refused as a request.
        use super::super::sync::SyncRequest;
        use super::super::wire::{MAX_SYNC_REQUEST_SIZE, encode_sync_request};
        let members: Vec<PeerId> = (0..10u32)
            .map(|i| {
                let mut seed = [0u8; 32];
                seed[..4].copy_from_slice(&i.to_be_bytes());
                seed[31] = 0x77;
                kp_seed(seed).public().to_peer_id()
            })
            .collect();
        let per_sender: Vec<(PeerId, u64)> = (0..3000u32)
            .map(|i| {
                let mut seed = [0u8; 32];
                seed[..4].copy_from_slice(&i.to_be_bytes());
                (kp_seed(seed).public().to_peer_id(), u64::MAX)
            })
            .chain(members.iter().map(|m| (*m, u64::MAX)))
            .collect();
        let full = SyncRequest::Summary {
            group_id: GroupId([1; 32]),
            summary: Summary {
                membership_len: u64::MAX,
                heads_hash: [1; 32],
                per_sender: per_sender.clone(),
            },
        };
        assert!(encode_sync_request(&full).len() > MAX_SYNC_REQUEST_SIZE);
        let capped = cap_senders(per_sender, |p| members.contains(p));
        assert_eq!(capped.len(), MAX_SUMMARY_SENDERS);
        assert!(members.iter().all(|m| capped.iter().any(|(p, _)| p == m)));
        assert!(capped.windows(2).all(|w| w[0] < w[1]));
        let req = SyncRequest::Summary {
            group_id: GroupId([1; 32]),
            summary: Summary {
                membership_len: u64::MAX,
                heads_hash: [1; 32],
                per_sender: capped,
            },
        };
        let len = encode_sync_request(&req).len();
        assert!(len <= MAX_SYNC_REQUEST_SIZE, "{len} bytes");
    }

    #[test]
    fn ops_without_the_new_fields_keep_their_encoding() {
        // An op written before `last_seq` existed decodes and re-encodes to
        // the same bytes, so its signature still verifies.
        let mut rng = StdRng::seed_from_u64(13);
        let (mut a, _, c) = trio(&mut rng);
        let mut rm = ok(a.remove(c.local_peer(), &mut rng, 1));
        rm.body.kind = OpKind::Remove {
            member: c.local_peer(),
            last_seq: None,
        };
        let rm = ok(Op::sign(&kp(1), rm.body));
        let bytes = super::super::wire::encode_op(&rm);
        assert!(!bytes.windows(8).any(|w| w == b"last_seq"));
        let back = super::super::wire::decode_op(&bytes);
        assert!(back.is_ok_and(|op| op.verify().is_ok() && op == rm));
    }

    #[test]
    fn non_members_forgeries_and_oversize_are_rejected() {
        let mut rng = StdRng::seed_from_u64(2);
        let (mut a, mut b, _) = trio(&mut rng);
        // An outsider who somehow has the genesis op and forges membership.
        let mut outsider = ok(Group::join(kp(9), a.membership().ops_since(0)[0].clone()));
        assert!(matches!(
            outsider.compose(&mut rng, "let me in", 1),
            Err(GroupError::NotAMember)
        ));
        let (m, _) = ok(a.compose(&mut rng, "x", 1));
        let key = a.keys().get(0).cloned();
        let Some(key) = key else { panic!("no key") };
        let eve = kp(9);
        let eve_id = eve.public().to_peer_id();
        let mut body = m.body.clone();
        body.sender = eve_id;
        body.seq = 1;
        body.deps = vec![];
        let ctx = MessageContext {
            group_id: &body.group_id,
            epoch: 0,
            sender: &eve_id,
            seq: 1,
        };
        body.ciphertext = ok(crypto::encrypt_message(&mut rng, &key, &ctx, b"hi"));
        let from_eve = ok(SignedEnvelope::sign(&eve, body.clone()));
        assert!(matches!(
            b.receive_message(from_eve),
            Err(GroupError::NotMemberYet { .. })
        ));
        // Forged sender: eve signs a body claiming to be a.
        let mut forged = ok(SignedEnvelope::sign(&eve, m.body.clone()));
        forged.body.timestamp_ms += 1;
        assert!(matches!(
            b.receive_message(forged),
            Err(GroupError::ForgedSender(_))
        ));
        let mut tampered = m.clone();
        tampered.body.ciphertext[0] ^= 1;
        assert!(matches!(
            b.receive_message(tampered),
            Err(GroupError::ForgedSender(_))
        ));
        let big = "x".repeat(MAX_TEXT + 1);
        assert!(matches!(
            a.compose(&mut rng, &big, 2),
            Err(GroupError::TextTooLarge(_))
        ));
        assert!(
            ok(a.compose(&mut rng, &"y".repeat(MAX_TEXT), 2))
                .0
                .body
                .ciphertext
                .len()
                == MAX_TEXT + MESSAGE_OVERHEAD
        );
    }

    #[test]
    fn late_member_catches_up_and_held_messages_release_with_the_key() {
        let mut rng = StdRng::seed_from_u64(3);
        let (mut a, mut b, _) = trio(&mut rng);
        let d = kp(4);
        let d_id = d.public().to_peer_id();
        let add = ok(a.add(d_id, &mut rng, 5));
        let rotate_op = ok(a.rotate(&mut rng, 6));
        let (m, _) = ok(a.compose(&mut rng, "welcome", 7));
        // d joins from the genesis op, gets the message before the ops, and
        // the ops in reverse order.
        let mut gd = ok(Group::join(d, a.membership().ops_since(0)[0].clone()));
        assert!(ok(gd.receive_message(m.clone())).is_empty());
        // A forged op cannot take the slot of a real one while buffered.
        let mut forged = rotate_op.clone();
        forged.body.timestamp_ms += 1;
        assert!(gd.receive_op(forged).is_err());
        let mut stranger = rotate_op.clone();
        stranger.body.author = kp(9).public().to_peer_id();
        stranger = ok(Op::sign(&kp(9), stranger.body));
        assert!(matches!(
            gd.receive_op(stranger),
            Err(GroupError::Membership(MembershipError::NotAllowed(_)))
        ));
        assert!(ok(gd.receive_op(rotate_op.clone())).buffered);
        let got = ok(gd.receive_op(add.clone()));
        assert_eq!(got.applied, vec![Applied::Added(d_id), Applied::Rotated(1)]);
        assert_eq!(
            got.delivered
                .iter()
                .map(|d| d.text.as_str())
                .collect::<Vec<_>>(),
            vec!["welcome"]
        );
        assert!(gd.keys().get(0).is_some() && gd.keys().get(1).is_some());
        // b applies the same ops; duplicate ops are harmless.
        ok(b.receive_op(add.clone()));
        ok(b.receive_op(rotate_op));
        assert_eq!(ok(b.receive_op(add)).applied, vec![Applied::Duplicate]);
        let genesis = a.membership().ops_since(0)[0].clone();
        assert_eq!(ok(b.receive_op(genesis)).applied, vec![Applied::Duplicate]);
        // Another group's genesis op is not taken for a fork.
        let other = ok(Group::create(kp(7), "other", "", &[], &mut rng, 0)).1;
        assert!(matches!(
            b.receive_op(other[0].clone()),
            Err(GroupError::Membership(MembershipError::WrongGroup))
        ));
        assert_eq!(b.summary().membership_len, 3);
    }

    #[test]
    fn largest_group_genesis_fits_the_op_limit() {
        let mut rng = StdRng::seed_from_u64(6);
        let members: Vec<PeerId> = (0..crate::groups::membership::MAX_MEMBERS as u32 - 1)
            .map(|i| {
                let mut seed = [0u8; 32];
                seed[..4].copy_from_slice(&i.to_be_bytes());
                seed[31] = 0xee;
                kp_seed(seed).public().to_peer_id()
            })
            .collect();
        let (_, ops) = ok(Group::create(
            kp(1),
            &"n".repeat(64),
            &"d".repeat(512),
            &members,
            &mut rng,
            0,
        ));
        let bytes = crate::groups::wire::encode_op(&ops[0]);
        assert!(
            bytes.len() <= crate::groups::wire::MAX_OP_SIZE,
            "{} bytes",
            bytes.len()
        );
        assert!(crate::groups::wire::decode_op(&bytes).is_ok());
        let mut too_many = members;
        too_many.push(kp(2).public().to_peer_id());
        assert!(matches!(
            Group::create(kp(1), "", "", &too_many, &mut rng, 0),
            Err(GroupError::Membership(MembershipError::Limit("members")))
        ));
    }

    #[test]
    fn leave_triggers_rotation_and_leaver_is_locked_out() {
        let mut rng = StdRng::seed_from_u64(4);
        let (mut a, mut b, mut c) = trio(&mut rng);
        let leave = ok(c.leave(1));
        assert!(!c.membership().is_member(&c.local_peer()));
        let got = ok(a.receive_op(leave.clone()));
        assert!(got.must_rotate);
        assert!(matches!(b.rotate(&mut rng, 2), Err(GroupError::NotAdmin)));
        let rot = ok(a.rotate(&mut rng, 2));
        ok(b.receive_op(leave));
        assert!(!ok(b.receive_op(rot.clone())).must_rotate);
        ok(c.receive_op(rot));
        let (m, _) = ok(b.compose(&mut rng, "c is gone", 3));
        assert_eq!(ok(a.receive_message(m.clone())).len(), 1);
        assert!(matches!(
            c.receive_message(m),
            Err(GroupError::NoKeyForEpoch(1))
        ));
    }

    #[test]
    fn out_of_order_messages_release_in_causal_order_and_summaries_converge() {
        let mut rng = StdRng::seed_from_u64(5);
        let (mut a, mut b, mut c) = trio(&mut rng);
        let (m1, _) = ok(a.compose(&mut rng, "1", 1));
        ok(b.receive_message(m1.clone()));
        let (m2, _) = ok(b.compose(&mut rng, "2 (reply)", 2));
        let (m3, _) = ok(b.compose(&mut rng, "3", 3));
        assert_ne!(c.summary().heads_hash, b.summary().heads_hash);
        assert!(ok(c.receive_message(m3.clone())).is_empty());
        assert!(ok(c.receive_message(m2.clone())).is_empty());
        assert_eq!(c.causal().missing(), vec![m1.id()]);
        let texts: Vec<String> = ok(c.receive_message(m1))
            .into_iter()
            .map(|d| d.text)
            .collect();
        assert_eq!(texts, vec!["1", "2 (reply)", "3"]);
        assert_eq!(c.summary(), b.summary());
        assert!(ok(c.receive_message(m3)).is_empty());
    }
}
