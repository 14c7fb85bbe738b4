//! Gossip validation in the actor, and what every received op or message
//! goes through, whether it came by gossip or by sync: fed to its group,
//! stored if valid, acted on (subscriptions, key rotation).
//!
//! The verdicts (docs/protocols/groups.md, "Validation"): accept a valid
//! frame, reject what the forwarding peer should be penalized for, ignore
//! what is nobody's fault (an unknown group, a missing key, a fork, a
//! sender over its rate).

use std::time::{Duration, Instant};

use fogmesh_protocols::groups::gossip::{GossipFrame, decode_gossip, encode_gossip_op};
use fogmesh_protocols::groups::wire::{self, SignedEnvelope};
use fogmesh_protocols::groups::{GroupError, GroupId, MembershipError, Op};
use libp2p::PeerId;
use libp2p::gossipsub::MessageAcceptance;

use super::NetCommand;
use super::actor::{GroupsActor, MILLI, message_bucket, now_ms, to_message};
use super::store::Batch;
use crate::types::NodeEvent;

impl GroupsActor {
    /// Validates one gossip frame from `source`.
    pub(super) fn on_gossip(
        &mut self,
        source: PeerId,
        data: &[u8],
        now: Instant,
    ) -> MessageAcceptance {
        let frame = match decode_gossip(data) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(%source, "undecodable gossip: {e}");
                return MessageAcceptance::Reject;
            }
        };
        let result = match frame {
            GossipFrame::Message(env) => {
                let gid = env.body.group_id;
                let Some(group) = self.groups.get(&gid) else {
                    return MessageAcceptance::Ignore;
                };
                // The rate is charged to a sender that signed the message
                // and that the group knows, never to a claimed one: a
                // forger cannot exhaust a member's budget, and the table
                // holds members only.
                let sender = env.body.sender;
                if group.causal().contains(&env.id()) {
                    return MessageAcceptance::Accept;
                }
                if env.verify().is_err() {
                    tracing::debug!(%source, "gossip message with a forged sender");
                    return MessageAcceptance::Reject;
                }
                if !group.membership().ever_member(&sender) {
                    // Perhaps added by an op we have not received yet.
                    self.catch_up(source, gid, now);
                    return MessageAcceptance::Ignore;
                }
                if !self.sender_within_rate(sender, now) {
                    self.metrics.group_messages_rate_limited.inc();
                    return MessageAcceptance::Ignore;
                }
                self.receive_envelope(source, gid, env, now)
            }
            GossipFrame::Op(op) => {
                // A genesis op (no group id) never travels by gossip.
                let Some(gid) = op.body.group_id else {
                    return MessageAcceptance::Reject;
                };
                if !self.groups.contains_key(&gid) {
                    return MessageAcceptance::Ignore;
                }
                self.receive_ops(gid, vec![op])
            }
        };
        result.err().unwrap_or(MessageAcceptance::Accept)
    }

    fn sender_within_rate(&mut self, sender: PeerId, now: Instant) -> bool {
        let rate = self.cfg.sender_rate;
        // Only signed messages of senders the groups know get here, so a
        // full table takes more than MAX_RATE_SENDERS members writing within
        // the process's life: starting over costs one burst each.
        self.rates
            .try_take(sender, MILLI, now, || message_bucket(rate))
    }

    /// A message from a sender the group does not know yet: its `Add` is
    /// probably on its way. Ask `peer` (which had it, or it would not have
    /// sent it) for what we lack, at most once a second per group.
    pub(super) fn catch_up(&mut self, peer: PeerId, gid: GroupId, now: Instant) {
        let recent = self
            .caught_up
            .get(&gid)
            .is_some_and(|t| now.saturating_duration_since(*t) < Duration::from_secs(1));
        if recent || !self.connected.contains(&peer) {
            return;
        }
        self.caught_up.insert(gid, now);
        self.send_summary(peer, gid);
    }

    /// Feeds one envelope (from `source`, by gossip or sync) to its group
    /// and stores it if it is valid.
    pub(super) fn receive_envelope(
        &mut self,
        source: PeerId,
        gid: GroupId,
        env: SignedEnvelope,
        now: Instant,
    ) -> Result<(), MessageAcceptance> {
        let Some(group) = self.groups.get(&gid) else {
            return Err(MessageAcceptance::Ignore);
        };
        let mid = env.id();
        if group.causal().contains(&mid) {
            return Ok(());
        }
        let bytes = wire::encode_envelope(&env);
        if let Err(e) = self.check_quota(&gid, bytes.len()) {
            tracing::warn!("message refused: {e}");
            return Err(MessageAcceptance::Ignore);
        }
        let Some(group) = self.groups.get_mut(&gid) else {
            return Err(MessageAcceptance::Ignore);
        };
        match group.receive_message(env) {
            Ok(delivered) => {
                self.count_stored(gid, bytes.len());
                let batch = Batch {
                    envelopes: vec![(mid, bytes)],
                    delivered: delivered.iter().map(to_message).collect(),
                    ..Batch::default()
                };
                // Committed with what arrives with it; acknowledged after.
                self.stage(gid, batch);
                Ok(())
            }
            // Not this peer's fault: we lack the key (we were removed, or
            // the op that gives it has not arrived).
            Err(GroupError::NoKeyForEpoch(_)) => Err(MessageAcceptance::Ignore),
            // Nor is a sender an op we have not received yet may add:
            // catch up with the peer that had the message.
            Err(GroupError::NotMemberYet { .. }) => {
                self.catch_up(source, gid, now);
                Err(MessageAcceptance::Ignore)
            }
            Err(e) => {
                tracing::debug!(group = %gid.to_hex(), "message rejected: {e}");
                Err(MessageAcceptance::Reject)
            }
        }
    }

    /// Feeds ops to their group, persists them and acts on them: leaves
    /// the topic if they removed this node, rotates the keys if this node
    /// is the admin and a member left.
    pub(super) fn receive_ops(
        &mut self,
        gid: GroupId,
        ops: Vec<Op>,
    ) -> Result<(), MessageAcceptance> {
        let Some(group) = self.groups.get_mut(&gid) else {
            return Err(MessageAcceptance::Ignore);
        };
        let was_member = group.membership().is_member(&self.local);
        let before = group.membership().len();
        let mut delivered = Vec::new();
        let mut must_rotate = false;
        let mut verdict = Ok(());
        for op in ops {
            match group.receive_op(op) {
                Ok(r) => {
                    delivered.extend(r.delivered);
                    must_rotate |= r.must_rotate;
                }
                Err(GroupError::Membership(MembershipError::Fork { .. })) => {
                    verdict = Err(MessageAcceptance::Ignore);
                }
                Err(e) => {
                    tracing::debug!(group = %gid.to_hex(), "op rejected: {e}");
                    verdict = Err(MessageAcceptance::Reject);
                }
            }
        }
        let new_ops: Vec<Op> = group.membership().ops_since(before).to_vec();
        let is_member = group.membership().is_member(&self.local);
        if !new_ops.is_empty() || !delivered.is_empty() {
            let changed = !new_ops.is_empty();
            if let Err(e) = self.commit_ops(gid, new_ops, delivered) {
                // Not stored: not forwarded either (it comes back by sync
                // after a restart).
                tracing::error!("cannot store group ops: {e}");
                if verdict.is_ok() {
                    verdict = Err(MessageAcceptance::Ignore);
                }
            }
            if was_member && !is_member {
                tracing::info!(group = %gid.to_hex(), "this node was removed from the group");
                if let Some(g) = self.groups.get(&gid) {
                    self.net_send(NetCommand::Unsubscribe(g.topic()));
                }
            }
            if changed {
                self.emit(NodeEvent::GroupUpdated {
                    group_id: gid.to_hex(),
                    member: is_member,
                });
            }
        }
        if must_rotate {
            self.rotate_keys(gid);
        }
        verdict
    }

    /// The admin's answer to a `Leave`: a new epoch whose key the leaver
    /// never receives, published and pushed to the members.
    fn rotate_keys(&mut self, gid: GroupId) {
        let Some(group) = self.groups.get_mut(&gid) else {
            return;
        };
        let op = match group.rotate(&mut self.rng, now_ms()) {
            Ok(op) => op,
            Err(e) => {
                tracing::warn!("cannot rotate keys: {e}");
                return;
            }
        };
        let topic = group.topic();
        if let Err(e) = self.commit_ops(gid, vec![op.clone()], Vec::new()) {
            tracing::error!("cannot store the rotation: {e}");
        }
        self.net_send(NetCommand::Publish {
            topic,
            data: encode_gossip_op(&op),
            outbox: None,
        });
        self.push_to_members(gid);
    }
}
