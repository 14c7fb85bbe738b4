//! The membership log: a hash-chained sequence of signed ops.
//!
//! Op 0 (`Create`) names the admin and the first members; every later op
//! carries the group id, its index and the hash of the previous op, and is
//! signed by the admin, except `Leave`, signed by the member leaving. The
//! log is self-contained: a member that was offline verifies the ops it
//! fetches from anyone and learns it was added, and with which key.
//!
//! Epochs: `Create` opens epoch 0; `Remove` and `Rotate` open the next epoch
//! and seal its key to every remaining member; `Add` and `Leave` keep the
//! epoch (`Add` seals the current key to the new member). After a `Leave`
//! the leaver still knows the key, so the admin is expected to `Rotate`
//! ([`MembershipLog::rotation_pending`]).
//!
//! The log also remembers each member's tenure in epochs, which decides
//! whether a message of a given epoch may come from a given sender.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::crypto::{self, CryptoError, SEALED_KEY_LEN, SealedKey};
use super::wire::{cbor, encode_op};
use super::{GroupId, Keypair, PeerId};

/// Maximum group name, in bytes of UTF-8.
pub const MAX_NAME: usize = 64;
/// Maximum group description, in bytes of UTF-8.
pub const MAX_DESCRIPTION: usize = 512;
/// Maximum number of members, the admin included.
pub const MAX_MEMBERS: usize = 1000;

/// What an op does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum OpKind {
    /// Genesis: founds the group, opens epoch 0.
    Create {
        /// Group name, at most [`MAX_NAME`] bytes.
        name: String,
        /// Description, at most [`MAX_DESCRIPTION`] bytes.
        description: String,
        /// The admin; also the author of the op and a member.
        admin: PeerId,
        /// All first members, the admin included, without duplicates.
        members: Vec<PeerId>,
        /// Random bytes: make every group unique and bind sealed keys to it.
        #[serde(with = "serde_bytes")]
        nonce: [u8; 32],
    },
    /// The admin adds a member, who receives the current epoch key.
    Add {
        /// The new member.
        member: PeerId,
    },
    /// The admin removes a member and opens a new epoch.
    Remove {
        /// The member removed.
        member: PeerId,
        /// The member's last sequence number as the admin saw it: its
        /// messages with a higher one are refused (they were written after
        /// the removal, with a key it still holds). Absent only in ops
        /// written before this field existed (no limit then); omitted from
        /// the encoding when absent, so those ops keep their signatures.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_seq: Option<u64>,
    },
    /// The author (not the admin) leaves the group. Written before
    /// [`OpKind::LeaveAt`] existed; no limit on the leaver's sequence numbers.
    Leave,
    /// The admin opens a new epoch for the current members.
    Rotate,
    /// The author (not the admin) leaves the group after its message
    /// `last_seq`: later ones in the epochs it belonged to are refused.
    LeaveAt {
        /// The leaver's last sequence number.
        last_seq: u64,
    },
}

/// The signed part of an op.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpBody {
    /// The group; absent only in the genesis op, whose hash defines it.
    pub group_id: Option<GroupId>,
    /// Position in the log, from 0.
    pub index: u64,
    /// Hash of the previous op (zeros for the genesis op).
    #[serde(with = "serde_bytes")]
    pub prev: [u8; 32],
    /// The signer.
    pub author: PeerId,
    /// What the op does.
    pub kind: OpKind,
    /// The epoch in force after this op.
    pub epoch: u64,
    /// Epoch keys sealed to the members who must receive them.
    pub epoch_keys: Vec<SealedKey>,
    /// Author's clock, informational only.
    pub timestamp_ms: u64,
}

/// A signed membership op.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// The signed content.
    pub body: OpBody,
    /// Ed25519 signature by `body.author` over the domain tag and the CBOR of `body`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl Op {
    /// Signs an op body.
    pub fn sign(keypair: &Keypair, body: OpBody) -> Result<Self, CryptoError> {
        let signature = crypto::sign(keypair, crypto::SIGN_OP, &cbor(&body))?;
        Ok(Op { body, signature })
    }

    /// Checks the signature against the author's peer id.
    pub fn verify(&self) -> Result<(), CryptoError> {
        crypto::verify(
            &self.body.author,
            crypto::SIGN_OP,
            &cbor(&self.body),
            &self.signature,
        )
    }

    /// SHA-256 of the encoded op: the next op's `prev`, and for op 0 the group id.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(encode_op(self)).into()
    }
}

/// Why an op was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MembershipError {
    /// The signature or the author's key is invalid.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A different op is already at this index; the first one seen is kept.
    #[error("conflicting op at index {index}: the group's history forked")]
    Fork {
        /// The contested index.
        index: u64,
    },
    /// Ops before this one are missing (catch up from `expected`).
    #[error("op {got} arrived but the log expects {expected}")]
    Gap {
        /// Next index the log can apply.
        expected: u64,
        /// The op's index.
        got: u64,
    },
    /// `prev` does not match the hash of the previous op.
    #[error("op {0} does not chain to the previous op")]
    BadPrev(u64),
    /// The op names another group, or a genesis op is not at index 0.
    #[error("op does not belong to this group")]
    WrongGroup,
    /// The author may not issue this op.
    #[error("{0} may not issue this op")]
    NotAllowed(PeerId),
    /// The op's epoch is not the one its kind implies.
    #[error("op declares epoch {got}, expected {expected}")]
    BadEpoch {
        /// The epoch the op must declare.
        expected: u64,
        /// The epoch it declared.
        got: u64,
    },
    /// Sealed keys are missing, duplicated, addressed to the wrong peers or malformed.
    #[error("epoch keys are not sealed to exactly the right members")]
    BadKeys,
    /// A size limit was exceeded.
    #[error("limit exceeded: {0}")]
    Limit(&'static str),
    /// The op is inconsistent with the group's state.
    #[error("invalid op: {0}")]
    Invalid(&'static str),
}

/// What applying an op changed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Applied {
    /// The op was already in the log.
    Duplicate,
    /// A member joined.
    Added(PeerId),
    /// A member was removed; a new epoch began.
    Removed(PeerId),
    /// A member left; the admin should rotate.
    Left(PeerId),
    /// A new epoch began for the current members.
    Rotated(u64),
}

/// The membership state of one group, built from its ops.
#[derive(Debug, Clone)]
pub struct MembershipLog {
    id: GroupId,
    ops: Vec<Op>,
    last_hash: [u8; 32],
    name: String,
    description: String,
    admin: PeerId,
    nonce: [u8; 32],
    members: BTreeSet<PeerId>,
    /// Each member's tenures, oldest first.
    tenure: BTreeMap<PeerId, Vec<Tenure>>,
    epoch: u64,
    rotation_pending: bool,
}

/// One stretch of membership: the epochs `[from, until)` (`until =
/// u64::MAX` while a member) and, once it ended by a `Remove` or a
/// `LeaveAt`, the last sequence number the member may have written in them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tenure {
    from: u64,
    until: u64,
    last_seq: Option<u64>,
}

impl Tenure {
    fn open(from: u64) -> Self {
        Tenure {
            from,
            until: u64::MAX,
            last_seq: None,
        }
    }
}

/// Checks that `keys` are sealed to exactly `expected`, once each, and well-formed.
fn check_keys(keys: &[SealedKey], expected: &BTreeSet<PeerId>) -> Result<(), MembershipError> {
    let recipients: BTreeSet<PeerId> = keys.iter().map(|k| k.recipient).collect();
    if keys.len() != expected.len()
        || recipients != *expected
        || keys.iter().any(|k| k.ciphertext.len() != SEALED_KEY_LEN)
    {
        return Err(MembershipError::BadKeys);
    }
    Ok(())
}

impl MembershipLog {
    /// Starts a log from a genesis op, checking it fully.
    pub fn from_genesis(op: Op) -> Result<Self, MembershipError> {
        let b = &op.body;
        let OpKind::Create {
            name,
            description,
            admin,
            members,
            nonce,
        } = &b.kind
        else {
            return Err(MembershipError::WrongGroup);
        };
        if b.index != 0 || b.group_id.is_some() || b.prev != [0; 32] {
            return Err(MembershipError::WrongGroup);
        }
        if name.len() > MAX_NAME {
            return Err(MembershipError::Limit("name"));
        }
        if description.len() > MAX_DESCRIPTION {
            return Err(MembershipError::Limit("description"));
        }
        if members.len() > MAX_MEMBERS {
            return Err(MembershipError::Limit("members"));
        }
        let set: BTreeSet<PeerId> = members.iter().copied().collect();
        if set.len() != members.len() {
            return Err(MembershipError::Invalid("duplicate member"));
        }
        if b.author != *admin || !set.contains(admin) {
            return Err(MembershipError::NotAllowed(b.author));
        }
        if b.epoch != 0 {
            return Err(MembershipError::BadEpoch {
                expected: 0,
                got: b.epoch,
            });
        }
        // Every member must carry a usable key, or it could never be sent one.
        for m in &set {
            crypto::ed25519_key(m)?;
        }
        check_keys(&b.epoch_keys, &set)?;
        op.verify()?;
        let hash = op.hash();
        Ok(MembershipLog {
            id: GroupId(hash),
            last_hash: hash,
            name: name.clone(),
            description: description.clone(),
            admin: *admin,
            nonce: *nonce,
            tenure: set.iter().map(|m| (*m, vec![Tenure::open(0)])).collect(),
            members: set,
            epoch: 0,
            rotation_pending: false,
            ops: vec![op],
        })
    }

    /// Validates and appends the next op.
    ///
    /// An op already in the log returns [`Applied::Duplicate`]; a different op
    /// at an existing index is a [`MembershipError::Fork`] and is dropped.
    pub fn apply(&mut self, op: Op) -> Result<Applied, MembershipError> {
        if let Some(duplicate) = self.check_place(&op)? {
            return Ok(duplicate);
        }
        let b = &op.body;
        if b.epoch_keys.len() > MAX_MEMBERS {
            return Err(MembershipError::Limit("epoch keys"));
        }
        // Validate everything before verifying the signature (cheap checks
        // first), and before mutating anything.
        let mut members = self.members.clone();
        let (epoch, applied) = self.check_kind(b, &mut members)?;
        if b.epoch != epoch {
            return Err(MembershipError::BadEpoch {
                expected: epoch,
                got: b.epoch,
            });
        }
        op.verify()?;
        self.commit(op, &applied, members, epoch);
        Ok(applied)
    }

    /// Whether `op` is the next op of this group's log: `Some` if it is
    /// already in it (gossip redelivers ops, the genesis op included),
    /// `None` if it comes next; an error for another group's op, a
    /// different op at an existing index (a fork), a gap, or a wrong `prev`.
    fn check_place(&self, op: &Op) -> Result<Option<Applied>, MembershipError> {
        let b = &op.body;
        let len = self.len();
        if b.index < len {
            let existing = usize::try_from(b.index).ok().and_then(|i| self.ops.get(i));
            return match existing {
                Some(e) if e == op => Ok(Some(Applied::Duplicate)),
                _ if b.group_id != Some(self.id) => Err(MembershipError::WrongGroup),
                _ => Err(MembershipError::Fork { index: b.index }),
            };
        }
        if b.group_id != Some(self.id) {
            return Err(MembershipError::WrongGroup);
        }
        if b.index > len {
            return Err(MembershipError::Gap {
                expected: len,
                got: b.index,
            });
        }
        if b.prev != self.last_hash {
            return Err(MembershipError::BadPrev(b.index));
        }
        Ok(None)
    }

    /// Checks what the op does against the rules (who may, to whom, the
    /// epoch keys it must carry) and applies it to `members`, a copy;
    /// returns the epoch after it and what it does.
    fn check_kind(
        &self,
        b: &OpBody,
        members: &mut BTreeSet<PeerId>,
    ) -> Result<(u64, Applied), MembershipError> {
        let is_admin = b.author == self.admin;
        let next_epoch = self.epoch + 1;
        let admin_only = || {
            if is_admin {
                Ok(())
            } else {
                Err(MembershipError::NotAllowed(b.author))
            }
        };
        match &b.kind {
            OpKind::Create { .. } => Err(MembershipError::WrongGroup),
            OpKind::Add { member } => {
                admin_only()?;
                if members.contains(member) {
                    return Err(MembershipError::Invalid("already a member"));
                }
                if members.len() >= MAX_MEMBERS {
                    return Err(MembershipError::Limit("members"));
                }
                crypto::ed25519_key(member)?;
                check_keys(&b.epoch_keys, &BTreeSet::from([*member]))?;
                members.insert(*member);
                Ok((self.epoch, Applied::Added(*member)))
            }
            OpKind::Remove { member, .. } => {
                admin_only()?;
                if *member == self.admin || !members.remove(member) {
                    return Err(MembershipError::Invalid("not a removable member"));
                }
                check_keys(&b.epoch_keys, members)?;
                Ok((next_epoch, Applied::Removed(*member)))
            }
            OpKind::Leave | OpKind::LeaveAt { .. } => {
                if is_admin || !members.remove(&b.author) {
                    return Err(MembershipError::NotAllowed(b.author));
                }
                check_keys(&b.epoch_keys, &BTreeSet::new())?;
                Ok((self.epoch, Applied::Left(b.author)))
            }
            OpKind::Rotate => {
                admin_only()?;
                check_keys(&b.epoch_keys, members)?;
                Ok((next_epoch, Applied::Rotated(next_epoch)))
            }
        }
    }

    /// Appends a checked op: the new members and epoch, and the tenures.
    /// A removed member may still have written in the epoch it knew, up
    /// to its last sequence number; a leaver keeps the current key until
    /// the admin rotates.
    fn commit(&mut self, op: Op, applied: &Applied, members: BTreeSet<PeerId>, epoch: u64) {
        let next_epoch = self.epoch + 1;
        let last_seq = match &op.body.kind {
            OpKind::Remove { last_seq, .. } => *last_seq,
            OpKind::LeaveAt { last_seq } => Some(*last_seq),
            _ => None,
        };
        match applied {
            Applied::Added(m) => self
                .tenure
                .entry(*m)
                .or_default()
                .push(Tenure::open(self.epoch)),
            Applied::Removed(m) => self.end_tenure(m, next_epoch, last_seq),
            Applied::Left(m) => {
                self.end_tenure(m, next_epoch, last_seq);
                self.rotation_pending = true;
            }
            _ => {}
        }
        if epoch != self.epoch {
            self.rotation_pending = false;
        }
        self.members = members;
        self.epoch = epoch;
        self.last_hash = op.hash();
        self.ops.push(op);
    }

    fn end_tenure(&mut self, member: &PeerId, until: u64, last_seq: Option<u64>) {
        if let Some(last) = self.tenure.get_mut(member).and_then(|t| t.last_mut()) {
            last.until = until;
            last.last_seq = last_seq;
        }
    }

    /// The group id.
    pub fn id(&self) -> GroupId {
        self.id
    }

    /// Number of ops in the log (the next op's index).
    pub fn len(&self) -> u64 {
        self.ops.len() as u64
    }

    /// Always false: a log holds at least its genesis op.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Current members, the admin included.
    pub fn members(&self) -> &BTreeSet<PeerId> {
        &self.members
    }

    /// Whether `peer` is a current member.
    pub fn is_member(&self, peer: &PeerId) -> bool {
        self.members.contains(peer)
    }

    /// Whether `peer` may have written a message of `epoch`: it was a member
    /// at some point of that epoch, and a member removed when epoch `e`
    /// began is accepted only for epochs before `e`.
    pub fn was_member(&self, peer: &PeerId, epoch: u64) -> bool {
        self.tenure
            .get(peer)
            .is_some_and(|t| t.iter().any(|t| t.from <= epoch && epoch < t.until))
    }

    /// Whether `peer` may have written its message `seq` in `epoch`: it
    /// was a member in that epoch and, if that membership ended with a
    /// `Remove` or a `LeaveAt`, `seq` is not past the last sequence number
    /// the op recorded. (Sequence numbers run on across a member's epochs,
    /// so a higher one was written after the membership ended.)
    pub fn may_have_written(&self, peer: &PeerId, epoch: u64, seq: u64) -> bool {
        self.tenure.get(peer).is_some_and(|t| {
            t.iter().any(|t| {
                t.from <= epoch && epoch < t.until && t.last_seq.is_none_or(|last| seq <= last)
            })
        })
    }

    /// Whether `peer` was ever a member, as far as this log goes.
    pub fn ever_member(&self, peer: &PeerId) -> bool {
        self.tenure.contains_key(peer)
    }

    /// The admin.
    pub fn admin(&self) -> PeerId {
        self.admin
    }

    /// The group name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group description.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The genesis nonce, which binds sealed keys to this group.
    pub fn nonce(&self) -> &[u8; 32] {
        &self.nonce
    }

    /// Hash of the last op (the next op's `prev`).
    pub fn last_hash(&self) -> [u8; 32] {
        self.last_hash
    }

    /// True after a `Leave` until the admin opens a new epoch.
    pub fn rotation_pending(&self) -> bool {
        self.rotation_pending
    }

    /// Ops from `index` on, for a peer catching up.
    pub fn ops_since(&self, index: u64) -> &[Op] {
        let start = usize::try_from(index)
            .unwrap_or(usize::MAX)
            .min(self.ops.len());
        &self.ops[start..]
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::super::crypto::{EpochKey, seal_key};
    use super::*;

    fn kp(i: u8) -> (Keypair, PeerId) {
        let Ok(k) = Keypair::ed25519_from_bytes([i; 32]) else {
            panic!("keypair")
        };
        let id = k.public().to_peer_id();
        (k, id)
    }

    struct Fixture {
        rng: StdRng,
        admin: Keypair,
        log: MembershipLog,
    }

    fn seal_all(rng: &mut StdRng, nonce: &[u8; 32], epoch: u64, to: &[PeerId]) -> Vec<SealedKey> {
        let key = EpochKey::random(rng);
        to.iter()
            .filter_map(|p| seal_key(rng, nonce, epoch, &key, p).ok())
            .collect()
    }

    fn genesis(members: &[PeerId]) -> Fixture {
        let mut rng = StdRng::seed_from_u64(9);
        let (admin, admin_id) = kp(1);
        let mut all = vec![admin_id];
        all.extend_from_slice(members);
        let nonce = [5; 32];
        let body = OpBody {
            group_id: None,
            index: 0,
            prev: [0; 32],
            author: admin_id,
            kind: OpKind::Create {
                name: "g".into(),
                description: String::new(),
                admin: admin_id,
                members: all.clone(),
                nonce,
            },
            epoch: 0,
            epoch_keys: seal_all(&mut rng, &nonce, 0, &all),
            timestamp_ms: 0,
        };
        let Ok(op) = Op::sign(&admin, body) else {
            panic!("sign")
        };
        let Ok(log) = MembershipLog::from_genesis(op) else {
            panic!("genesis")
        };
        Fixture { rng, admin, log }
    }

    impl Fixture {
        fn op(&mut self, signer: &Keypair, kind: OpKind, epoch: u64, keys_to: &[PeerId]) -> Op {
            let epoch_keys = seal_all(&mut self.rng, &self.log.nonce, epoch, keys_to);
            let body = OpBody {
                group_id: Some(self.log.id()),
                index: self.log.len(),
                prev: self.log.last_hash(),
                author: signer.public().to_peer_id(),
                kind,
                epoch,
                epoch_keys,
                timestamp_ms: 1,
            };
            let Ok(op) = Op::sign(signer, body) else {
                panic!("sign")
            };
            op
        }
    }

    #[test]
    fn add_remove_leave_rotate() {
        let ((bob, bob_id), (_, carol)) = (kp(2), kp(3));
        let mut f = genesis(&[bob_id]);
        let admin = f.admin.clone();
        let admin_id = admin.public().to_peer_id();
        assert_eq!(f.log.admin(), admin_id);
        assert_eq!(f.log.name(), "g");
        let op = f.op(&admin, OpKind::Add { member: carol }, 0, &[carol]);
        assert_eq!(f.log.apply(op.clone()).ok(), Some(Applied::Added(carol)));
        assert_eq!(f.log.apply(op).ok(), Some(Applied::Duplicate));
        assert!(f.log.is_member(&carol));

        let op = f.op(&bob, OpKind::Leave, 0, &[]);
        assert_eq!(f.log.apply(op).ok(), Some(Applied::Left(bob_id)));
        assert!(f.log.rotation_pending() && !f.log.is_member(&bob_id));
        let op = f.op(&admin, OpKind::Rotate, 1, &[admin_id, carol]);
        assert_eq!(f.log.apply(op).ok(), Some(Applied::Rotated(1)));
        assert!(!f.log.rotation_pending());

        let op = f.op(
            &admin,
            OpKind::Remove {
                member: carol,
                last_seq: None,
            },
            2,
            &[admin_id],
        );
        assert_eq!(f.log.apply(op).ok(), Some(Applied::Removed(carol)));
        assert_eq!(f.log.epoch(), 2);
        assert_eq!(f.log.members().len(), 1);
        // Tenure: carol wrote legitimately in epochs 0 and 1, not 2.
        assert!(f.log.was_member(&carol, 1) && !f.log.was_member(&carol, 2));
        assert!(f.log.was_member(&bob_id, 0) && !f.log.was_member(&bob_id, 1));
        assert_eq!(f.log.ops_since(3).len(), 2);
        assert!(f.log.ops_since(99).is_empty());
        // A later member catches up by replaying the ops.
        let mut replay = MembershipLog::from_genesis(f.log.ops_since(0)[0].clone()).ok();
        for op in f.log.ops_since(1) {
            replay.as_mut().map(|r| r.apply(op.clone()));
        }
        assert_eq!(
            replay.map(|r| r.members().clone()),
            Some(f.log.members().clone())
        );
    }

    #[test]
    fn rights_chain_forks_and_epochs_are_enforced() {
        let ((bob, bob_id), (_, carol), (dave, dave_id)) = (kp(2), kp(3), kp(4));
        let mut f = genesis(&[bob_id]);
        let admin = f.admin.clone();
        let admin_id = admin.public().to_peer_id();
        // Only the admin adds; outsiders cannot leave.
        let op = f.op(&bob, OpKind::Add { member: carol }, 0, &[carol]);
        assert!(matches!(
            f.log.apply(op),
            Err(MembershipError::NotAllowed(_))
        ));
        let op = f.op(&dave, OpKind::Leave, 0, &[]);
        assert!(matches!(
            f.log.apply(op),
            Err(MembershipError::NotAllowed(_))
        ));
        let op = f.op(&admin, OpKind::Leave, 0, &[]);
        assert!(matches!(
            f.log.apply(op),
            Err(MembershipError::NotAllowed(_))
        ));
        // Wrong epoch, wrong key recipients.
        let op = f.op(
            &admin,
            OpKind::Remove {
                member: bob_id,
                last_seq: Some(0),
            },
            0,
            &[admin_id],
        );
        assert!(matches!(
            f.log.apply(op),
            Err(MembershipError::BadEpoch { .. })
        ));
        let op = f.op(
            &admin,
            OpKind::Remove {
                member: bob_id,
                last_seq: Some(0),
            },
            1,
            &[admin_id, bob_id],
        );
        assert!(matches!(f.log.apply(op), Err(MembershipError::BadKeys)));
        // Forged author: signed by bob, claims the admin.
        let mut op = f.op(&bob, OpKind::Add { member: carol }, 0, &[carol]);
        op.body.author = admin_id;
        assert!(matches!(
            f.log.apply(op),
            Err(MembershipError::Crypto(CryptoError::BadSignature(_)))
        ));
        // Gap and broken chain.
        let mut op = f.op(&admin, OpKind::Add { member: carol }, 0, &[carol]);
        op.body.index = 5;
        assert!(matches!(
            f.log.apply(op),
            Err(MembershipError::Gap {
                expected: 1,
                got: 5
            })
        ));
        let mut op = f.op(&admin, OpKind::Add { member: carol }, 0, &[carol]);
        op.body.prev = [1; 32];
        assert!(matches!(f.log.apply(op), Err(MembershipError::BadPrev(1))));
        // Fork: two different valid ops at index 1, the first wins.
        let first = f.op(&admin, OpKind::Add { member: carol }, 0, &[carol]);
        let second = f.op(&admin, OpKind::Add { member: dave_id }, 0, &[dave_id]);
        assert!(f.log.apply(first).is_ok());
        assert!(matches!(
            f.log.apply(second),
            Err(MembershipError::Fork { index: 1 })
        ));
        assert!(f.log.is_member(&carol) && !f.log.is_member(&dave_id));
        // Wrong group.
        let mut op = f.op(&admin, OpKind::Rotate, 1, &[admin_id, bob_id, carol]);
        op.body.group_id = Some(GroupId([0; 32]));
        assert!(matches!(f.log.apply(op), Err(MembershipError::WrongGroup)));
    }

    #[test]
    fn genesis_limits() {
        let (admin, admin_id) = kp(1);
        let mut rng = StdRng::seed_from_u64(1);
        let make = |name: String, description: String, members: Vec<PeerId>, rng: &mut StdRng| {
            let body = OpBody {
                group_id: None,
                index: 0,
                prev: [0; 32],
                author: admin_id,
                epoch_keys: seal_all(rng, &[0; 32], 0, &members),
                kind: OpKind::Create {
                    name,
                    description,
                    admin: admin_id,
                    members,
                    nonce: [0; 32],
                },
                epoch: 0,
                timestamp_ms: 0,
            };
            Op::sign(&admin, body)
                .map_err(MembershipError::from)
                .and_then(MembershipLog::from_genesis)
        };
        assert!(make("é".repeat(32), "d".repeat(512), vec![admin_id], &mut rng).is_ok());
        assert!(matches!(
            make("x".repeat(65), String::new(), vec![admin_id], &mut rng),
            Err(MembershipError::Limit("name"))
        ));
        assert!(matches!(
            make(String::new(), "d".repeat(513), vec![admin_id], &mut rng),
            Err(MembershipError::Limit("description"))
        ));
        assert!(
            make(
                String::new(),
                String::new(),
                vec![admin_id, admin_id],
                &mut rng
            )
            .is_err()
        );
        // The admin must be a member.
        assert!(make(String::new(), String::new(), vec![kp(2).1], &mut rng).is_err());
        let many: Vec<PeerId> = (0..=MAX_MEMBERS).map(|_| PeerId::random()).collect();
        let body_members = many;
        let body = OpBody {
            group_id: None,
            index: 0,
            prev: [0; 32],
            author: admin_id,
            epoch_keys: vec![],
            kind: OpKind::Create {
                name: String::new(),
                description: String::new(),
                admin: admin_id,
                members: body_members,
                nonce: [0; 32],
            },
            epoch: 0,
            timestamp_ms: 0,
        };
        let op = Op::sign(&admin, body).ok();
        assert!(matches!(
            op.map(MembershipLog::from_genesis),
            Some(Err(MembershipError::Limit("members")))
        ));
    }
}
