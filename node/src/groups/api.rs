//! What the API's calls do in the actor: create, list, show, change the
//! membership, leave, post and read messages.
//!
//! A change is committed before it is acknowledged, then published on the
//! group's topic and pushed to the connected members (who fetch what they
//! lack); a post also goes to the outbox, so that it is offered to
//! gossipsub again until it is published.

use std::time::Instant;

use fogmesh_protocols::groups::gossip::{encode_gossip_message, encode_gossip_op};
use fogmesh_protocols::groups::{Delivered, Group, GroupError, GroupId, wire};
use libp2p::PeerId;

use super::actor::{GroupsActor, now_ms, to_message};
use super::handle::ApiCall;
use super::store::Batch;
use super::{MAX_GROUPS, NetCommand};
use crate::actor::ServiceError;
use crate::types::{GroupAck, GroupInfo, GroupInvite, NodeEvent};

/// A change to a group's membership asked through the API.
enum Change {
    Add(PeerId),
    Remove(PeerId),
    Leave,
}

impl GroupsActor {
    /// Handles one API call and sends its answer (to a caller that may
    /// have gone).
    pub(super) fn on_api(&mut self, call: ApiCall, now: Instant) {
        match call {
            ApiCall::Create {
                name,
                description,
                members,
                reply,
            } => {
                let _ = reply.send(self.create(&name, &description, &members));
            }
            ApiCall::List { reply } => {
                let mut list: Vec<GroupInfo> = self.groups.values().map(|g| self.info(g)).collect();
                list.sort_by(|a, b| a.name.cmp(&b.name).then(a.group_id.cmp(&b.group_id)));
                let _ = reply.send(Ok(list));
            }
            ApiCall::Show { group, reply } => {
                let _ = reply.send(self.find(&group).map(|g| self.info(g)));
            }
            ApiCall::AddMember { group, peer, reply } => {
                let _ = reply.send(self.change(group, Change::Add(peer)));
            }
            ApiCall::RemoveMember { group, peer, reply } => {
                let _ = reply.send(self.change(group, Change::Remove(peer)));
            }
            ApiCall::Leave { group, reply } => {
                let _ = reply.send(self.change(group, Change::Leave));
            }
            ApiCall::Send { group, text, reply } => {
                let _ = reply.send(self.post(group, &text, now));
            }
            ApiCall::Messages {
                group,
                limit,
                reply,
            } => {
                let r = self
                    .find(&group)
                    .and_then(|_| self.store.history(&group, limit).map_err(Into::into));
                let _ = reply.send(r);
            }
            ApiCall::Invites { reply } => {
                let mut list: Vec<GroupInvite> = self.invites.values().cloned().collect();
                list.sort_by(|a, b| {
                    a.received
                        .cmp(&b.received)
                        .then(a.group_id.cmp(&b.group_id))
                });
                let _ = reply.send(Ok(list));
            }
            ApiCall::Accept { group, reply } => {
                let _ = reply.send(self.accept(group, now));
            }
            ApiCall::Decline { group, reply } => {
                let _ = reply.send(self.decline(group));
            }
        }
    }

    /// Accepts an invitation and asks for the group's log: from the peer
    /// that told us of it and its admin, when connected; otherwise from the
    /// first member that tells us of the group again (members check with
    /// every member every few seconds).
    fn accept(&mut self, id: GroupId, now: Instant) -> Result<GroupAck, ServiceError> {
        let ack = GroupAck {
            group_id: id.to_hex(),
            id: None,
        };
        if self.groups.contains_key(&id) {
            return Ok(ack);
        }
        if self.groups.len() >= MAX_GROUPS {
            return Err(ServiceError::Forbidden(format!(
                "this node is in {MAX_GROUPS} groups, the most it may be in: leave one first"
            )));
        }
        let inv = self
            .invites
            .get_mut(&id)
            .ok_or_else(|| no_invitation(&id))?;
        inv.accepted = true;
        let inv = inv.clone();
        self.store.put_invite(&id, &inv)?;
        for peer in [&inv.via, &inv.inviter] {
            if let Ok(peer) = peer.parse::<PeerId>()
                && self.connected.contains(&peer)
            {
                self.fetch_log(peer, id, now);
            }
        }
        Ok(ack)
    }

    /// Declines an invitation.
    fn decline(&mut self, id: GroupId) -> Result<GroupAck, ServiceError> {
        if !self.invites.contains_key(&id) {
            return Err(no_invitation(&id));
        }
        self.store.decline(&id, now_ms())?;
        self.invites.remove(&id);
        self.declined.insert(id);
        Ok(GroupAck {
            group_id: id.to_hex(),
            id: None,
        })
    }

    fn find(&self, id: &GroupId) -> Result<&Group, ServiceError> {
        self.groups.get(id).ok_or_else(|| not_found(id))
    }

    fn info(&self, g: &Group) -> GroupInfo {
        let m = g.membership();
        GroupInfo {
            group_id: g.id().to_hex(),
            name: m.name().to_owned(),
            description: m.description().to_owned(),
            admin: m.admin().to_base58(),
            members: m.members().iter().map(|p| p.to_base58()).collect(),
            epoch: m.epoch(),
            is_member: m.is_member(&self.local),
            messages: g.causal().per_sender().iter().map(|(_, n)| *n).sum(),
        }
    }

    fn create(
        &mut self,
        name: &str,
        description: &str,
        members: &[PeerId],
    ) -> Result<GroupAck, ServiceError> {
        if self.groups.len() >= MAX_GROUPS {
            return Err(ServiceError::Forbidden(format!(
                "this node is in {MAX_GROUPS} groups, the most it may be in: leave one first"
            )));
        }
        let (group, ops) = Group::create(
            self.keypair.clone(),
            name,
            description,
            members,
            &mut self.rng,
            now_ms(),
        )
        .map_err(group_error)?;
        let gid = group.id();
        self.store.commit(&gid, Batch::of_ops(0, &ops))?;
        self.net_send(NetCommand::Subscribe(group.topic()));
        self.groups.insert(gid, group);
        self.emit(NodeEvent::GroupUpdated {
            group_id: gid.to_hex(),
            member: true,
        });
        tracing::info!(group = %gid.to_hex(), members = members.len() + 1, "group created");
        self.push_to_members(gid);
        Ok(GroupAck {
            group_id: gid.to_hex(),
            id: None,
        })
    }

    fn change(&mut self, id: GroupId, change: Change) -> Result<GroupAck, ServiceError> {
        let now = now_ms();
        let group = self.groups.get_mut(&id).ok_or_else(|| not_found(&id))?;
        let op = match &change {
            Change::Add(p) => group.add(*p, &mut self.rng, now),
            Change::Remove(p) => group.remove(*p, &mut self.rng, now),
            Change::Leave => group.leave(now),
        }
        .map_err(group_error)?;
        let topic = group.topic();
        self.commit_ops(id, vec![op.clone()], Vec::new())?;
        self.net_send(NetCommand::Publish {
            topic: topic.clone(),
            data: encode_gossip_op(&op),
            outbox: None,
        });
        if matches!(change, Change::Leave) {
            self.net_send(NetCommand::Unsubscribe(topic));
        }
        let member = self
            .groups
            .get(&id)
            .is_some_and(|g| g.membership().is_member(&self.local));
        self.emit(NodeEvent::GroupUpdated {
            group_id: id.to_hex(),
            member,
        });
        self.push_to_members(id);
        Ok(GroupAck {
            group_id: id.to_hex(),
            id: None,
        })
    }

    fn post(&mut self, id: GroupId, text: &str, now: Instant) -> Result<GroupAck, ServiceError> {
        let sent_ms = now_ms();
        let local = self.local;
        // Before composing, which advances the sequence number: the
        // envelope is the text and at most a few KiB of header.
        self.check_quota(&id, text.len() + 4096)?;
        let group = self.groups.get_mut(&id).ok_or_else(|| not_found(&id))?;
        let deps = group.causal().deps_for_send(&local);
        let (env, mid) = group
            .compose(&mut self.rng, text, sent_ms)
            .map_err(group_error)?;
        let topic = group.topic();
        let delivered = Delivered {
            id: mid,
            sender: local,
            seq: env.body.seq,
            epoch: env.body.epoch,
            text: text.to_owned(),
            timestamp_ms: sent_ms,
            deps,
        };
        let frame = encode_gossip_message(&env);
        let bytes = wire::encode_envelope(&env);
        self.count_stored(id, bytes.len());
        let batch = Batch {
            envelopes: vec![(mid, bytes)],
            delivered: vec![to_message(&delivered)],
            outbox_add: vec![(mid, frame.clone())],
            ..Batch::default()
        };
        // Durable before acknowledged.
        let delivered = self.store.commit(&id, batch)?;
        self.announce(&id, delivered);
        self.publishing.insert(mid, now);
        self.net_send(NetCommand::Publish {
            topic,
            data: frame,
            outbox: Some((id, mid)),
        });
        Ok(GroupAck {
            group_id: id.to_hex(),
            id: Some(hex::encode(mid.0)),
        })
    }
}

fn no_invitation(id: &GroupId) -> ServiceError {
    ServiceError::NotFound(format!("no invitation to group {}", id.to_hex()))
}

fn not_found(id: &GroupId) -> ServiceError {
    ServiceError::NotFound(format!("no group {} on this node", id.to_hex()))
}

/// The service error a refused group operation is.
fn group_error(e: GroupError) -> ServiceError {
    match e {
        GroupError::NotAdmin | GroupError::NotAMember => ServiceError::Forbidden(e.to_string()),
        other => ServiceError::BadRequest(other.to_string()),
    }
}
