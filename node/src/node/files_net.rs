//! The network side of the files actor: requests from peers go to it, its
//! requests and responses go out on `/fogmesh/file/2`, and its provider
//! records and lookups go to Kademlia. Every request is tracked by its
//! request id (with what it asked for) and every provider lookup by its
//! query id; answers and failures go back to the actor.
//!
//! Chunks and manifests are bulk: the routing policy keeps them off a peer
//! reachable only through a circuit relay. Such a request fails at once
//! with [`Held::WaitForDirect`]; the actor's scheduler treats it like any
//! failed request and asks again later, by which time hole punching may
//! have given a direct connection.
//!
//! The same rule holds for answers: a manifest or chunk request that comes
//! in while the asking peer is reachable only through a relay is answered
//! `Busy` at once (a few bytes), never served over the circuit.
//!
//! A provider found through Kademlia is dialled as soon as the lookup
//! names it: the addresses in its provider record (a private sharer's are
//! relayed ones) are known to Kademlia only while the lookup runs.

use std::collections::{HashMap, HashSet};

use fogmesh_protocols::files::FileId;
use fogmesh_protocols::policy::Requirements;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::{PeerId, Swarm, kad};
use tokio::sync::mpsc;

use super::event_loop::{Ctx, Held};
use super::exchange::{Exchange, exchange};
use super::peers::PeerBook;
use crate::behaviour::{Behaviour, FileFrame};
use crate::files::{Asked, FileCommand, FilesHandle, Input, ServeJob};
use fogmesh_protocols::files::wire::{
    ErrorCode, Request, Response, decode_request, encode_response,
};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};

/// What a file request moves, for the policy: have-maps are small,
/// manifests and chunks are bulk.
fn requirements(asked: &Asked) -> Requirements {
    match asked {
        Asked::Have => Requirements::unicast(),
        Asked::Manifest | Asked::Chunk(_) => Requirements::bulk(),
    }
}

/// What answering a peer's request frame moves: the same classes as
/// [`requirements`]. A frame that does not decode is small: the actor
/// answers it with an error of a few bytes.
fn answer_requirements(frame: &[u8]) -> Requirements {
    match decode_request(frame) {
        Ok(Request::GetManifest { .. } | Request::GetChunk { .. }) => Requirements::bulk(),
        _ => Requirements::unicast(),
    }
}

pub(super) struct FilesNet {
    actor: FilesHandle,
    commands: mpsc::Receiver<FileCommand>,
    /// What each outstanding request asked, by request id.
    requests: HashMap<OutboundRequestId, (FileId, Asked)>,
    /// Provider lookups, by query id.
    provider_queries: HashMap<kad::QueryId, FileId>,
    /// Peers whose requests were held back (relayed only), told once in
    /// the log per connection.
    held_back: HashSet<PeerId>,
}

impl FilesNet {
    pub(super) fn new(actor: FilesHandle, commands: mpsc::Receiver<FileCommand>) -> Self {
        FilesNet {
            actor,
            commands,
            requests: HashMap::new(),
            provider_queries: HashMap::new(),
            held_back: HashSet::new(),
        }
    }

    /// The actor's next command; `None` once the actor is gone.
    pub(super) async fn next_command(&mut self) -> Option<FileCommand> {
        self.commands.recv().await
    }

    pub(super) fn peer_connected(&self, peer: PeerId) {
        self.offer(Input::PeerConnected(peer));
    }

    pub(super) fn peer_disconnected(&mut self, peer: PeerId) {
        self.held_back.remove(&peer);
        self.offer(Input::PeerDisconnected(peer));
    }

    /// Queues an input; a saturated actor loses it (its scheduler times
    /// the request out and asks again).
    fn offer(&self, input: Input) {
        if let Err(e) = self.actor.offer(input) {
            tracing::debug!("files input dropped: {e}");
        }
    }

    /// A step of a provider lookup: the providers found go to the actor,
    /// and those not connected are dialled now, while Kademlia still holds
    /// the addresses of their provider records (it forgets them when the
    /// lookup ends, and a private provider is in no routing table).
    pub(super) fn on_providers(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        id: kad::QueryId,
        result: kad::GetProvidersResult,
        last: bool,
    ) {
        let Some(file) = self.provider_queries.get(&id).copied() else {
            return;
        };
        if last {
            self.provider_queries.remove(&id);
        }
        if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result {
            if ctx.unicast_route().is_some() {
                let me = *swarm.local_peer_id();
                for p in providers
                    .iter()
                    .filter(|p| **p != me && !peers.has_internet(p))
                {
                    let opts = DialOpts::peer_id(*p)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(e) = swarm.dial(opts) {
                        tracing::debug!(peer = %p, "provider not dialled: {e}");
                    }
                }
            }
            self.offer(Input::Providers {
                file,
                peers: providers.into_iter().collect(),
            });
        }
    }

    /// The file protocol's events. A peer's request goes to the serving
    /// queue within the serving limits (`files::gate`), or is answered
    /// `Busy` here (also a bulk request from a peer reachable only through
    /// a relay); the end of each exchange frees its share of the limits.
    pub(super) fn on_event(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        ev: request_response::Event<FileFrame, FileFrame>,
    ) {
        use request_response::{Event, Message};
        if let Event::ResponseSent { request_id, .. } | Event::InboundFailure { request_id, .. } =
            &ev
        {
            self.actor.served(*request_id);
        }
        let ev = match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request_id,
                        request,
                        channel,
                    },
                ..
            } => {
                if let Err(held) =
                    ctx.may_answer(&answer_requirements(&request.0), peers.link(&peer))
                {
                    tracing::debug!(%peer, "file request not served: {held}");
                    let busy = Response::error(
                        ErrorCode::Busy,
                        "relayed connection: ask again over a direct one",
                    );
                    let _ = swarm
                        .behaviour_mut()
                        .files
                        .send_response(channel, FileFrame(encode_response(&busy)));
                    return;
                }
                let job = ServeJob {
                    peer,
                    id: request_id,
                    frame: request.0,
                    channel,
                };
                if let Err(channel) = self.actor.serve(job) {
                    tracing::debug!(%peer, "file request refused: serving limits");
                    let busy = Response::error(ErrorCode::Busy, "busy; retry later");
                    let _ = swarm
                        .behaviour_mut()
                        .files
                        .send_response(channel, FileFrame(encode_response(&busy)));
                }
                return;
            }
            other => other,
        };
        match exchange("file", ev) {
            // Requests are taken above.
            Some(Exchange::Request { .. }) => {}
            Some(Exchange::Answer {
                peer,
                request_id,
                result,
            }) => self.answered(request_id, peer, result),
            None => {}
        }
    }

    fn answered(
        &mut self,
        request_id: OutboundRequestId,
        peer: PeerId,
        result: Result<Vec<u8>, String>,
    ) {
        if let Some((file, asked)) = self.requests.remove(&request_id) {
            self.offer(Input::Response {
                peer,
                file,
                asked,
                result,
            });
        }
    }

    /// Carries out one of the actor's commands.
    pub(super) fn on_command(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ctx: &Ctx,
        peers: &PeerBook,
        cmd: FileCommand,
    ) {
        let b = swarm.behaviour_mut();
        match cmd {
            FileCommand::Request {
                peer,
                file,
                asked,
                frame,
            } => {
                if let Err(held) = ctx.may_request(&requirements(&asked), peers.link(&peer)) {
                    if held == Held::WaitForDirect && self.held_back.insert(peer) {
                        tracing::info!(%peer, "file transfer waits for a direct connection (relayed only)");
                    }
                    tracing::debug!(%peer, ?asked, "file request held back: {held}");
                    self.offer(Input::Response {
                        peer,
                        file,
                        asked,
                        result: Err(held.to_string()),
                    });
                    return;
                }
                let id = b.files.send_request(&peer, FileFrame(frame));
                self.requests.insert(id, (file, asked));
            }
            FileCommand::Respond { channel, frame } => {
                if b.files.send_response(channel, FileFrame(frame)).is_err() {
                    tracing::debug!("file response not sent: the requester went away");
                }
            }
            FileCommand::StartProviding(file) => {
                if let Err(e) = b.kad.start_providing(kad::RecordKey::new(&file.0)) {
                    tracing::warn!(%file, "cannot announce the file: {e}");
                }
            }
            FileCommand::StopProviding(file) => {
                b.kad.stop_providing(&kad::RecordKey::new(&file.0));
            }
            FileCommand::FindProviders(file) => {
                let id = b.kad.get_providers(kad::RecordKey::new(&file.0));
                self.provider_queries.insert(id, file);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use fogmesh_protocols::policy::Volume;

    use super::*;

    #[test]
    fn chunks_and_manifests_are_bulk_have_maps_small() {
        assert_eq!(requirements(&Asked::Chunk(3)).volume, Volume::Bulk);
        assert_eq!(requirements(&Asked::Manifest).volume, Volume::Bulk);
        assert_eq!(requirements(&Asked::Have).volume, Volume::Small);
    }

    #[test]
    fn answers_to_manifest_and_chunk_requests_are_bulk() {
        use fogmesh_protocols::files::wire::encode_request;
        let file = FileId([9; 32]);
        let volume = |r: Request| answer_requirements(&encode_request(&r)).volume;
        assert_eq!(volume(Request::GetManifest { file }), Volume::Bulk);
        assert_eq!(volume(Request::GetChunk { file, index: 0 }), Volume::Bulk);
        assert_eq!(volume(Request::GetHave { file }), Volume::Small);
        assert_eq!(answer_requirements(b"garbage").volume, Volume::Small);
    }
}
