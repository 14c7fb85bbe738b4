//! Group sync (anti-entropy) in the actor: sending summaries and fetches,
//! answering a peer's requests, acting on the answers to ours, and learning
//! of groups this node was added to while away.
//!
//! The decisions are `fogmesh_protocols::groups::exchange`'s (what to
//! answer within the response budget, what to ask next, whom to check
//! with); this module decodes, looks up the group and the stored envelopes,
//! applies the per-peer limit on invitation fetches, and sends.

use std::time::Instant;

use fogmesh_protocols::groups::exchange::{Plan, next_request, pick_sync_peer, plan};
use fogmesh_protocols::groups::wire::{
    MAX_SYNC_RESPONSE_SIZE, decode_sync_request, decode_sync_response, encode_sync_request,
    encode_sync_response,
};
use fogmesh_protocols::groups::{Group, GroupId, Op, SyncRequest, SyncResponse, Want};
use libp2p::PeerId;

use fogmesh_protocols::rate::TokenBucket;

use super::actor::{GroupsActor, MILLI, message_bucket, now_ms};
use super::store::Batch;
use super::{
    MAX_GROUPS, MAX_INVITES, MAX_INVITES_PER_INVITER, NetCommand, SYNC_REQUEST_BURST,
    SYNC_REQUEST_RATE,
};
use crate::types::{GroupInvite, NodeEvent};

/// Fetches of unknown groups' logs one peer may trigger: per second,
/// sustained (bursts of four times as many: enough to learn of 128 groups at
/// once, not enough for a stranger to keep this node busy).
const INVITE_FETCH_RATE: f64 = 32.0;

impl GroupsActor {
    /// Sends one sync request (the event loop answers with `SyncResponse`
    /// or `SyncFailed`).
    fn send_request(&self, peer: PeerId, req: SyncRequest) {
        self.metrics.group_sync_requests.inc();
        self.net_send(NetCommand::SyncRequest {
            peer,
            group: req.group_id(),
            frame: encode_sync_request(&req),
        });
    }

    /// Sends our full summary of `gid`: its answer carries the peer's, and
    /// each side then fetches what it lacks.
    pub(super) fn send_summary(&self, peer: PeerId, gid: GroupId) {
        if let Some(group) = self.groups.get(&gid) {
            self.send_request(
                peer,
                SyncRequest::Summary {
                    group_id: gid,
                    summary: group.summary(),
                },
            );
        }
    }

    /// After a local change, connected members hear of it at once.
    pub(super) fn push_to_members(&self, gid: GroupId) {
        let Some(group) = self.groups.get(&gid) else {
            return;
        };
        for p in group.membership().members() {
            if *p != self.local && self.connected.contains(p) {
                self.send_summary(*p, gid);
            }
        }
    }

    /// Every interval, each group compares a brief summary with one
    /// connected member: a few dozen bytes per group when in sync.
    pub(super) fn periodic_sync(&mut self) {
        let mut plan = Vec::new();
        for (gid, group) in &self.groups {
            let knowing = self.knows.get(gid);
            let peer = pick_sync_peer(
                group,
                |p| self.connected.contains(p),
                |p| knowing.is_some_and(|k| k.contains(p)),
                &mut self.rng,
            );
            if let Some(peer) = peer {
                plan.push((peer, *gid, group.summary().brief()));
            }
        }
        for (peer, group_id, summary) in plan {
            self.send_request(peer, SyncRequest::Summary { group_id, summary });
        }
    }

    /// Plans the answer to a peer's sync request (the sync worker
    /// completes it, see `responder`); an answer with nothing to look up
    /// (refused, over the rate, unknown group) comes back encoded.
    pub(super) fn plan_sync_answer(
        &mut self,
        peer: PeerId,
        frame: &[u8],
        now: Instant,
    ) -> Result<Plan, Vec<u8>> {
        if !self.allow_sync_request(peer, now) {
            // Over its rate: an empty answer, which it takes for "nothing
            // to exchange"; its next periodic sync asks again.
            tracing::debug!(%peer, "sync request over the per-peer rate");
            return Err(encode_sync_response(&SyncResponse::empty(GroupId([0; 32]))));
        }
        let req = match decode_sync_request(frame) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%peer, "bad sync request: {e}");
                return Err(encode_sync_response(&SyncResponse::empty(GroupId([0; 32]))));
            }
        };
        let gid = req.group_id();
        let Some(group) = self.groups.get(&gid) else {
            if req.summary().is_some() {
                self.ask_for_invitation(peer, gid, now);
            }
            return Err(encode_sync_response(&SyncResponse::empty(gid)));
        };
        // A member that sent a summary knows the group.
        let knows = req.summary().is_some() && group.membership().is_member(&peer);
        let planned = plan(group, &peer, &req, MAX_SYNC_RESPONSE_SIZE);
        if knows {
            self.knows.entry(gid).or_default().insert(peer);
        }
        // What we lack from them: asked in a request of our own.
        if let Some(ask) = planned.ask() {
            self.send_request(peer, ask.clone());
        }
        Ok(planned)
    }

    /// Answers a peer's sync request here, in full; returns the encoded
    /// response (the daemon completes answers on the sync worker).
    #[cfg(test)]
    pub(super) fn on_sync_request(&mut self, peer: PeerId, frame: &[u8], now: Instant) -> Vec<u8> {
        match self.plan_sync_answer(peer, frame, now) {
            Ok(p) => super::responder::answer(&self.store, p),
            Err(frame) => frame,
        }
    }

    /// A peer told us of a group we do not know: we may have been added
    /// while away. Ask it for the group's membership log, once per group at
    /// a time and rate-limited per peer, as anyone can send this.
    ///
    /// Not for a group already waiting for the user's answer, a declined
    /// one, or while this node is in [`MAX_GROUPS`] groups: then nothing is
    /// fetched at all.
    fn ask_for_invitation(&mut self, peer: PeerId, gid: GroupId, now: Instant) {
        let accepted = match self.invites.get(&gid) {
            Some(inv) => inv.accepted,
            None => false,
        };
        let waiting = self.invites.contains_key(&gid) && !accepted;
        let full = self.groups.len() >= MAX_GROUPS && !accepted;
        if waiting || full || self.declined.contains(&gid) {
            return;
        }
        // In flight already: the peer's fetch budget is not charged.
        if self.log_asked_lately(gid, now) || !self.allow_invite_fetch(peer, now) {
            return;
        }
        self.fetch_log(peer, gid, now);
    }

    /// Whether the log of `gid` was asked of someone within
    /// `join_fetch_retry`.
    fn log_asked_lately(&self, gid: GroupId, now: Instant) -> bool {
        (self.joining.get(&gid))
            .is_some_and(|t| now.saturating_duration_since(*t) < self.cfg.join_fetch_retry)
    }

    /// Asks `peer` for the membership log of `gid`, unless it was asked of
    /// someone within `join_fetch_retry` (one log in flight per group).
    pub(super) fn fetch_log(&mut self, peer: PeerId, gid: GroupId, now: Instant) {
        if self.log_asked_lately(gid, now) {
            return;
        }
        let retry = self.cfg.join_fetch_retry;
        self.joining
            .retain(|_, t| now.saturating_duration_since(*t) < retry);
        self.joining.insert(gid, now);
        let want = Want {
            membership_from: Some(0),
            ..Want::default()
        };
        self.send_request(
            peer,
            SyncRequest::Fetch {
                group_id: gid,
                want,
            },
        );
    }

    fn allow_sync_request(&mut self, peer: PeerId, now: Instant) -> bool {
        // Requests come over a connection; the entry goes when it closes.
        self.sync_rates
            .entry(peer)
            .or_insert_with(|| TokenBucket::new(SYNC_REQUEST_RATE, SYNC_REQUEST_BURST))
            .try_take(1, now)
            .is_ok()
    }

    fn allow_invite_fetch(&mut self, peer: PeerId, now: Instant) -> bool {
        self.invite_fetches
            .entry(peer)
            .or_insert_with(|| message_bucket(INVITE_FETCH_RATE))
            .try_take(MILLI, now)
            .is_ok()
    }

    /// Acts on the answer to one of our requests about `asked`: ops,
    /// messages, and what to ask next.
    pub(super) fn on_sync_response(
        &mut self,
        peer: PeerId,
        asked: GroupId,
        frame: &[u8],
        now: Instant,
    ) {
        let resp = match decode_sync_response(frame) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%peer, "bad sync response: {e}");
                return;
            }
        };
        let gid = resp.group_id;
        // An answer is about the group we asked about, or it is ignored.
        if gid != asked {
            tracing::debug!(%peer, "sync response about another group than asked");
            return;
        }
        if !self.groups.contains_key(&gid) {
            if !self.learn_group(peer, gid, resp.ops) {
                return;
            }
        } else if !resp.ops.is_empty() {
            let _ = self.receive_ops(gid, resp.ops);
        }
        let mut n = 0;
        for env in resp.messages {
            if env.body.group_id == gid && self.receive_envelope(peer, gid, env, now).is_ok() {
                n += 1;
            }
        }
        if n > 0 {
            self.metrics.group_messages_synced.inc_by(n);
        }
        let (Some(remote), Some(group)) = (resp.summary, self.groups.get(&gid)) else {
            return;
        };
        let next = next_request(gid, &group.summary(), &remote);
        self.knows.entry(gid).or_default().insert(peer);
        if let Some(req) = next {
            self.send_request(peer, req);
        }
    }

    /// Learns a group from its membership log (asked for after a member
    /// told us of it). The first op must be its genesis, which proves the
    /// id; the group is considered only if the log makes this node a
    /// member. It is joined if the user accepted the invitation or trusts
    /// its admin; otherwise it becomes a pending invitation, and nothing
    /// else of it is kept. Returns whether it was joined.
    fn learn_group(&mut self, peer: PeerId, gid: GroupId, ops: Vec<Op>) -> bool {
        let mut ops = ops.into_iter();
        let Some(genesis) = ops.next() else {
            return false;
        };
        let Ok(mut group) = Group::join(self.keypair.clone(), genesis) else {
            return false;
        };
        if group.id() != gid {
            return false;
        }
        self.joining.remove(&gid);
        // Checked in memory: nothing is stored before the decision.
        for op in ops {
            if let Err(e) = group.receive_op(op) {
                tracing::debug!(group = %gid.to_hex(), "op of a group we were told of refused: {e}");
            }
        }
        if !group.membership().is_member(&self.local) {
            return false;
        }
        let admin = group.membership().admin();
        let accepted = self.invites.get(&gid).is_some_and(|i| i.accepted);
        if !accepted && !self.trusts(&admin) {
            self.hold_invitation(peer, &group);
            return false;
        }
        if self.groups.len() >= MAX_GROUPS {
            tracing::warn!(group = %gid.to_hex(), "not joining: this node is in {MAX_GROUPS} groups");
            return false;
        }
        self.join_group(peer, group)
    }

    /// Stores a learned group and starts following it.
    fn join_group(&mut self, peer: PeerId, group: Group) -> bool {
        let gid = group.id();
        let topic = group.topic();
        let all = Batch::of_ops(0, group.membership().ops_since(0));
        if let Err(e) = self.store.commit(&gid, all) {
            tracing::error!("cannot store a new group: {e}");
            return false;
        }
        if self.invites.remove(&gid).is_some()
            && let Err(e) = self.store.remove_invite(&gid)
        {
            // Collected at the next start (the group is held by then).
            tracing::warn!("cannot clear an invitation: {e}");
        }
        self.groups.insert(gid, group);
        self.usage.insert(gid, (0, 0));
        tracing::info!(group = %gid.to_hex(), from = %peer, "joined a group this node was added to");
        self.net_send(NetCommand::Subscribe(topic));
        self.emit(NodeEvent::GroupUpdated {
            group_id: gid.to_hex(),
            member: true,
        });
        // Now fetch its messages from every connected member (the peer that
        // answered among them), which also tells them of the group: they may
        // not know of it either, so an invitation spreads through the
        // members, not only from its admin.
        self.push_to_members(gid);
        true
    }

    /// Records an invitation for the user, within the caps: at most
    /// [`MAX_INVITES_PER_INVITER`] pending from one admin (a new one beyond
    /// is ignored) and [`MAX_INVITES`] in all (the oldest pending one is
    /// dropped for a new one). Declined groups are ignored.
    fn hold_invitation(&mut self, peer: PeerId, group: &Group) {
        let gid = group.id();
        if self.declined.contains(&gid) || self.invites.contains_key(&gid) {
            return;
        }
        let inviter = group.membership().admin().to_base58();
        let from_inviter = self
            .invites
            .values()
            .filter(|i| i.inviter == inviter && !i.accepted)
            .count();
        if from_inviter >= MAX_INVITES_PER_INVITER {
            tracing::info!(%inviter, "invitation ignored: {MAX_INVITES_PER_INVITER} from this admin are pending");
            return;
        }
        if self.invites.len() >= MAX_INVITES {
            let oldest = self
                .invites
                .iter()
                .filter(|(_, i)| !i.accepted)
                .min_by_key(|(_, i)| i.received)
                .map(|(g, _)| *g);
            let Some(oldest) = oldest else {
                return;
            };
            self.invites.remove(&oldest);
            if let Err(e) = self.store.remove_invite(&oldest) {
                tracing::warn!("cannot drop an invitation: {e}");
            }
        }
        let inv = GroupInvite {
            group_id: gid.to_hex(),
            name: group.membership().name().to_owned(),
            inviter: inviter.clone(),
            via: peer.to_base58(),
            received: now_ms(),
            accepted: false,
        };
        if let Err(e) = self.store.put_invite(&gid, &inv) {
            tracing::error!("cannot store an invitation: {e}");
            return;
        }
        tracing::info!(group = %gid.to_hex(), %inviter, "invited to a group: waiting for the user");
        self.emit(NodeEvent::GroupInvite {
            group_id: inv.group_id.clone(),
            name: inv.name.clone(),
            inviter,
        });
        self.invites.insert(gid, inv);
    }
}
