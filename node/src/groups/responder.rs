//! The sync responder's worker: completes and sends the answers to peers'
//! sync requests off the groups actor's thread.
//!
//! The actor plans each answer (`exchange::plan`: the summary, the ops,
//! the ids of the envelopes to send; all in memory, cheap), then hands the
//! plan here. This thread reads the envelopes in one redb read transaction
//! per answer (redb serves readers alongside the actor's writes), decodes
//! them within the response budget, encodes the response and sends it. A
//! catch-up of megabytes for a peer thus never delays the local user's API
//! calls, which the actor keeps answering meanwhile.
//!
//! The queue is bounded ([`SYNC_QUEUE`] answers): when it is full, the
//! actor answers at once without envelopes (the summary and ops only); the
//! peer asks again for what it still lacks.

use std::sync::mpsc as std_mpsc;

use fogmesh_protocols::groups::Plan;
use fogmesh_protocols::groups::wire::encode_sync_response;
use libp2p::request_response::ResponseChannel;
use tokio::sync::mpsc;

use super::NetCommand;
use super::store::GroupStore;
use crate::behaviour::SyncFrame;

/// Answers waiting for the worker.
pub const SYNC_QUEUE: usize = 64;

/// Where the answer to one sync request goes.
#[derive(Debug)]
pub(crate) enum SyncReply {
    /// Back through the swarm to the peer that asked, on the request's
    /// stream.
    Net(libp2p::PeerId, ResponseChannel<SyncFrame>),
    /// To a test.
    #[cfg(test)]
    Test(std_mpsc::Sender<Vec<u8>>),
}

/// Sends an encoded answer where it goes.
pub(super) fn deliver(net: &mpsc::Sender<NetCommand>, reply: SyncReply, frame: Vec<u8>) {
    match reply {
        SyncReply::Net(peer, channel) => {
            if net
                .blocking_send(NetCommand::SyncRespond {
                    peer,
                    channel,
                    frame,
                })
                .is_err()
            {
                tracing::debug!("swarm loop gone; dropping a sync response");
            }
        }
        #[cfg(test)]
        SyncReply::Test(tx) => {
            let _ = tx.send(frame);
        }
    }
}

/// Completes a plan with the stored envelopes and encodes it.
pub(super) fn answer(store: &GroupStore, plan: Plan) -> Vec<u8> {
    let gid = plan.group_id();
    let mut plan = Some(plan);
    let filled = store.with_envelopes(&gid, |lookup| plan.take().map(|p| p.fill(lookup)));
    match filled {
        Ok(Some(a)) => encode_sync_response(&a.response),
        _ => {
            tracing::warn!(group = %gid.to_hex(), "cannot read envelopes for a sync answer");
            // What can be answered without them.
            let a = plan.map(|p| p.fill(|_| None));
            encode_sync_response(&a.map_or_else(
                || fogmesh_protocols::groups::SyncResponse::empty(gid),
                |a| a.response,
            ))
        }
    }
}

struct Job {
    plan: Plan,
    reply: SyncReply,
}

/// The worker thread's queue (the thread ends when this is dropped).
pub(super) struct SyncWorker {
    tx: std_mpsc::SyncSender<Job>,
}

impl SyncWorker {
    /// Starts the worker thread.
    pub(super) fn start(store: GroupStore, net: mpsc::Sender<NetCommand>) -> std::io::Result<Self> {
        let (tx, rx) = std_mpsc::sync_channel::<Job>(SYNC_QUEUE);
        std::thread::Builder::new()
            .name("fogmesh-group-sync".to_owned())
            .spawn(move || {
                for job in rx {
                    let frame = answer(&store, job.plan);
                    deliver(&net, job.reply, frame);
                }
            })?;
        Ok(SyncWorker { tx })
    }

    /// Queues a plan; gives it back when the queue is full (or the worker
    /// is gone).
    pub(super) fn submit(
        &self,
        plan: Plan,
        reply: SyncReply,
    ) -> Result<(), Box<(Plan, SyncReply)>> {
        self.tx.try_send(Job { plan, reply }).map_err(|e| {
            let job = match e {
                std_mpsc::TrySendError::Full(j) | std_mpsc::TrySendError::Disconnected(j) => j,
            };
            Box::new((job.plan, job.reply))
        })
    }
}
