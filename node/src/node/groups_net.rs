//! The network side of the groups actor: gossip messages go to it for
//! validation, its commands (subscribe, publish, validation verdicts, sync
//! requests and responses) go to the swarm. Every sync request is tracked
//! by its request id; its answer or its failure goes back to the actor
//! with the group it was about.
//!
//! Gossip always goes (group messages are small, and a relayed link is
//! what carries them before hole punching). A sync request asks the
//! policy first: summaries, membership catch-up and fetches of a few
//! messages may go over a circuit relay, larger fetches wait for a direct
//! connection (the actor gets a `SyncFailed` and syncs again later).
//!
//! The responder keeps the same rule: to a peer reachable only through a
//! relay it answers neither a large fetch nor anything larger than
//! [`SMALL_SYNC_RESPONSE`] (a summary's answer may carry many envelopes);
//! the request fails on the asker's side, which syncs again later, over a
//! direct connection once hole punching gave one.

use std::collections::HashMap;

use fogmesh_protocols::groups::GroupId;
use fogmesh_protocols::groups::sync::SyncRequest;
use fogmesh_protocols::policy::Requirements;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::{PeerId, Swarm, gossipsub};
use tokio::sync::mpsc;

use super::event_loop::Ctx;
use super::exchange::{Exchange, exchange};
use super::peers::PeerBook;
use crate::behaviour::{Behaviour, SyncFrame};
use crate::groups::{GroupsHandle, Input, NetCommand, SyncReply};

/// Messages a fetch may ask for and still count as small. A chat message
/// is typically well under 1 KiB (at most 64 KiB), a membership op about
/// 170 bytes per member: a fetch this size normally fits a circuit's
/// 128 KiB many times. (When it does not, the relay cuts the circuit, the
/// sync fails and is tried again, over a direct connection by then if
/// hole punching worked: nothing is lost.)
const SMALL_FETCH_MESSAGES: u64 = 16;

/// The largest sync answer that may go over a relayed-only link: half a
/// circuit's 128 KiB budget.
const SMALL_SYNC_RESPONSE: usize = 64 * 1024;

/// What an encoded sync answer moves, for the policy.
fn answer_requirements(frame: &[u8]) -> Requirements {
    if frame.len() <= SMALL_SYNC_RESPONSE {
        Requirements::unicast()
    } else {
        Requirements::bulk()
    }
}

/// What a sync request's exchange moves, for the policy: the requester
/// holds back what it classes as bulk, the responder refuses it over a
/// relayed-only link too.
fn sync_requirements(frame: &[u8]) -> Requirements {
    match fogmesh_protocols::groups::wire::decode_sync_request(frame) {
        Ok(SyncRequest::Summary { .. }) => Requirements::unicast(),
        Ok(SyncRequest::Fetch { want, .. }) => {
            let messages: u64 = want
                .ranges
                .iter()
                .map(|(_, from, to)| to.saturating_sub(*from).saturating_add(1))
                .sum();
            if messages <= SMALL_FETCH_MESSAGES {
                Requirements::unicast()
            } else {
                Requirements::bulk()
            }
        }
        // Our own actor's frame: unknown shapes are treated as bulk.
        _ => Requirements::bulk(),
    }
}

pub(super) struct GroupsNet {
    actor: GroupsHandle,
    commands: mpsc::Receiver<NetCommand>,
    /// What each outstanding sync request is about.
    sync_requests: HashMap<OutboundRequestId, GroupId>,
}

impl GroupsNet {
    pub(super) fn new(actor: GroupsHandle, commands: mpsc::Receiver<NetCommand>) -> Self {
        GroupsNet {
            actor,
            commands,
            sync_requests: HashMap::new(),
        }
    }

    /// The actor's next command; `None` once the actor is gone.
    pub(super) async fn next_command(&mut self) -> Option<NetCommand> {
        self.commands.recv().await
    }

    pub(super) fn peer_connected(&self, peer: PeerId) {
        self.offer(Input::PeerConnected(peer));
    }

    pub(super) fn peer_disconnected(&self, peer: PeerId) {
        self.offer(Input::PeerDisconnected(peer));
    }

    /// Queues an input; a saturated actor loses it (sync recovers what
    /// matters).
    fn offer(&self, input: Input) {
        if let Err(e) = self.actor.offer(input) {
            tracing::debug!("groups input dropped: {e}");
        }
    }

    /// Gossipsub: a message goes to the actor for validation (gossipsub
    /// holds it until the verdict).
    pub(super) fn on_gossipsub(&self, swarm: &mut Swarm<Behaviour>, ev: gossipsub::Event) {
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = ev
        else {
            return;
        };
        let input = Input::Gossip {
            source: propagation_source,
            message_id: message_id.clone(),
            data: message.data,
        };
        if self.actor.offer(input).is_err() {
            // The actor is saturated: let the message go without penalty;
            // sync brings it back if it matters.
            swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    gossipsub::MessageAcceptance::Ignore,
                );
        }
    }

    /// Group sync: requests go to the actor (which answers through
    /// `SyncRespond`), answers and failures to whoever asked. A bulk
    /// request from a peer reachable only through a relay goes unanswered
    /// (dropping the channel fails it on the asker's side).
    pub(super) fn on_sync_event(
        &mut self,
        ctx: &Ctx,
        peers: &PeerBook,
        ev: request_response::Event<SyncFrame, SyncFrame>,
    ) {
        match exchange("group sync", ev) {
            Some(Exchange::Request {
                peer,
                frame,
                channel,
            }) => {
                if let Err(held) = ctx.may_answer(&sync_requirements(&frame), peers.link(&peer)) {
                    tracing::debug!(%peer, "sync request not answered: {held}");
                    drop(channel);
                    return;
                }
                self.offer(Input::SyncRequest {
                    peer,
                    frame,
                    channel: SyncReply::Net(peer, channel),
                })
            }
            Some(Exchange::Answer {
                peer,
                request_id,
                result,
            }) => {
                let Some(group) = self.sync_requests.remove(&request_id) else {
                    return;
                };
                self.offer(match result {
                    Ok(frame) => Input::SyncResponse { peer, group, frame },
                    Err(error) => Input::SyncFailed { peer, group, error },
                });
            }
            None => {}
        }
    }

    /// Carries out one of the actor's commands.
    pub(super) fn on_command(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        cmd: NetCommand,
    ) {
        let gs = &mut swarm.behaviour_mut().gossipsub;
        match cmd {
            NetCommand::Subscribe(topic) => {
                let topic = gossipsub::IdentTopic::new(topic);
                if let Err(e) = gs.subscribe(&topic) {
                    tracing::warn!(%topic, "cannot subscribe: {e}");
                }
                if let Err(e) =
                    gs.set_topic_params(topic, crate::behaviour::group_topic_score_params())
                {
                    tracing::warn!("cannot set topic score parameters: {e}");
                }
            }
            NetCommand::Unsubscribe(topic) => {
                gs.unsubscribe(&gossipsub::IdentTopic::new(topic));
            }
            NetCommand::Publish {
                topic,
                data,
                outbox,
            } => {
                // A broadcast: the policy says which routes may carry it,
                // and store-and-forward (the outbox) covers none being up.
                let ok = ctx.broadcast_route().is_some() && publish(gs, topic, data);
                if let Some((group, id)) = outbox {
                    self.offer(Input::Published { group, id, ok });
                }
            }
            NetCommand::Validation {
                message_id,
                source,
                acceptance,
            } => {
                gs.report_message_validation_result(&message_id, &source, acceptance);
            }
            NetCommand::SyncRequest { peer, group, frame } => {
                if let Err(held) = ctx.may_request(&sync_requirements(&frame), peers.link(&peer)) {
                    let error = held.to_string();
                    self.offer(Input::SyncFailed { peer, group, error });
                    return;
                }
                let id = swarm
                    .behaviour_mut()
                    .group_sync
                    .send_request(&peer, SyncFrame(frame));
                self.sync_requests.insert(id, group);
            }
            NetCommand::SyncRespond {
                peer,
                channel,
                frame,
            } => {
                if let Err(held) = ctx.may_answer(&answer_requirements(&frame), peers.link(&peer)) {
                    tracing::debug!(%peer, bytes = frame.len(), "sync answer withheld: {held}");
                    drop(channel);
                    return;
                }
                if swarm
                    .behaviour_mut()
                    .group_sync
                    .send_response(channel, SyncFrame(frame))
                    .is_err()
                {
                    tracing::debug!("sync response not sent: the requester went away");
                }
            }
        }
    }
}

type GossipBehaviour = gossipsub::Behaviour<
    crate::behaviour::ObservingTransform,
    crate::behaviour::SubscriptionFilter,
>;

/// Publishes on `topic`; `false` when gossipsub could not (no peer on the
/// topic yet, say): the outbox offers it again later.
fn publish(gs: &mut GossipBehaviour, topic: String, data: Vec<u8>) -> bool {
    match gs.publish(gossipsub::IdentTopic::new(topic), data) {
        Ok(_) | Err(gossipsub::PublishError::Duplicate) => true,
        Err(e) => {
            tracing::debug!("publish deferred: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use fogmesh_protocols::groups::wire::encode_sync_request;
    use fogmesh_protocols::groups::{Summary, Want};
    use fogmesh_protocols::policy::Volume;

    use super::*;

    fn fetch(membership_from: Option<u64>, messages: u64) -> Vec<u8> {
        let sender = PeerId::random();
        let ranges = if messages == 0 {
            Vec::new()
        } else {
            vec![(sender, 1, messages)]
        };
        encode_sync_request(&SyncRequest::Fetch {
            group_id: GroupId([1; 32]),
            want: Want {
                membership_from,
                ranges,
                need_full_summary: false,
            },
        })
    }

    #[test]
    fn summaries_and_small_fetches_may_use_a_relay() {
        let summary = encode_sync_request(&SyncRequest::Summary {
            group_id: GroupId([1; 32]),
            summary: Summary {
                membership_len: 2,
                heads_hash: [0; 32],
                per_sender: Vec::new(),
            },
        });
        assert_eq!(sync_requirements(&summary).volume, Volume::Small);
        assert_eq!(sync_requirements(&fetch(Some(0), 0)).volume, Volume::Small);
        assert_eq!(
            sync_requirements(&fetch(None, SMALL_FETCH_MESSAGES)).volume,
            Volume::Small
        );
    }

    #[test]
    fn answers_above_half_a_circuit_are_bulk() {
        assert_eq!(
            answer_requirements(&vec![0; SMALL_SYNC_RESPONSE]).volume,
            Volume::Small
        );
        assert_eq!(
            answer_requirements(&vec![0; SMALL_SYNC_RESPONSE + 1]).volume,
            Volume::Bulk
        );
    }

    #[test]
    fn large_fetches_and_garbage_wait_for_a_direct_link() {
        assert_eq!(
            sync_requirements(&fetch(None, SMALL_FETCH_MESSAGES + 1)).volume,
            Volume::Bulk
        );
        assert_eq!(sync_requirements(b"not cbor").volume, Volume::Bulk);
    }
}
