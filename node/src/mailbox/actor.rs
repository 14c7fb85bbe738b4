//! The holder thread: answers peers' deposits, fetches and deletes from
//! the [`Ledger`] and the holder's tables, and drops envelopes whose
//! lifetime ended.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fogmesh_protocols::mailbox::wire::{Id, Item, MAX_FETCH_ITEMS, decode_envelope};
use fogmesh_protocols::mailbox::{Admit, Ledger, Refusal, Request, Response};
use libp2p::PeerId;
use tokio::sync::mpsc;

use super::store::HolderStore;
use super::{Held, HeldCopy, HolderAnswer, HolderInput, HolderOut, HolderRequest, MailboxConfig};
use crate::actor::Actor;
use crate::messages::now_ms;
use crate::storage::StoreError;

pub(super) struct HolderActor {
    me: PeerId,
    store: HolderStore,
    ledger: Ledger,
    enabled: bool,
    answers: mpsc::Sender<HolderOut>,
    held: Arc<Held>,
    /// Wall clock at start and the instant it was read.
    anchor: (Instant, u64),
}

impl HolderActor {
    pub(super) fn new(
        me: PeerId,
        store: HolderStore,
        cfg: &MailboxConfig,
        answers: mpsc::Sender<HolderOut>,
        held: Arc<Held>,
    ) -> Result<Self, StoreError> {
        let mut ledger = Ledger::new(cfg.quotas);
        for s in store.all()? {
            ledger.insert(s);
        }
        let actor = HolderActor {
            me,
            store,
            ledger,
            enabled: cfg.enabled,
            answers,
            held,
            anchor: (Instant::now(), now_ms()),
        };
        actor.publish();
        Ok(actor)
    }

    fn ms(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.anchor.0).as_millis();
        self.anchor
            .1
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }

    /// Makes the totals visible to `status`.
    fn publish(&self) {
        let (n, bytes) = self.ledger.totals();
        self.held.envelopes.store(n, Ordering::Relaxed);
        self.held.bytes.store(bytes, Ordering::Relaxed);
    }

    /// The answer to `peer`'s request, whether it stored a new envelope,
    /// and what it removed.
    fn answer(&mut self, peer: PeerId, req: Request, now: u64) -> (Response, bool, Vec<Id>) {
        match req {
            Request::Deposit { envelope } => {
                let before = self.ledger.totals().0;
                let resp = self.deposit(peer, envelope, now);
                let stored = self.ledger.totals().0 > before;
                (resp, stored, Vec::new())
            }
            Request::Fetch => (self.fetch(&peer), false, Vec::new()),
            Request::Delete { ids } => {
                let ids = self.ledger.deletable(&peer, &ids);
                let resp = self.remove(&ids);
                let dropped = match resp {
                    Response::Deleted { .. } => ids,
                    _ => Vec::new(),
                };
                (resp, false, dropped)
            }
        }
    }

    fn fetch(&mut self, peer: &PeerId) -> Response {
        let (ids, more) = self.ledger.fetch(peer, MAX_FETCH_ITEMS);
        match self.store.get(&ids) {
            Ok(found) => Response::Fetched {
                items: found
                    .into_iter()
                    .map(|(id, envelope)| Item { id, envelope })
                    .collect(),
                more,
            },
            Err(e) => {
                tracing::error!("cannot read held mail: {e}");
                Response::Refused(Refusal::Busy)
            }
        }
    }

    /// A step of the node's pass over what it holds.
    fn walk(&self, cursor: Option<Id>, max: usize) -> HolderOut {
        let (held, next) = self.ledger.walk(cursor, max);
        let ids: Vec<Id> = held.iter().map(|s| s.id).collect();
        let frames = match self.store.get(&ids) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!("cannot read held mail: {e}");
                Vec::new()
            }
        };
        let items = frames
            .into_iter()
            .filter_map(|(id, frame)| {
                let s = held.iter().find(|s| s.id == id)?;
                Some(HeldCopy {
                    id,
                    recipient: s.recipient,
                    depositor: s.depositor,
                    frame,
                })
            })
            .collect();
        HolderOut::Walked { items, next }
    }

    fn deposit(&mut self, peer: PeerId, envelope: Vec<u8>, now: u64) -> Response {
        if !self.enabled {
            return Response::Refused(Refusal::Disabled);
        }
        let env = match decode_envelope(&envelope) {
            Ok(env) => env,
            Err(fogmesh_protocols::messages::WireError::TooLarge { .. }) => {
                return Response::Refused(Refusal::TooLarge);
            }
            Err(_) => return Response::Refused(Refusal::Malformed),
        };
        if fogmesh_protocols::groups::crypto::ed25519_key(&env.to).is_err() || env.to == self.me {
            // Mail for this node itself comes by the direct route.
            return Response::Refused(Refusal::Malformed);
        }
        let size = envelope.len() as u64;
        match self.ledger.admit(peer, env.to, Id::of(&env), size, now) {
            Admit::Duplicate => Response::Deposited,
            Admit::Refuse(r) => {
                tracing::debug!(%peer, "mailbox deposit refused: {r}");
                Response::Refused(r)
            }
            Admit::Store(s) => match self.store.put(&s, &envelope) {
                Ok(()) => {
                    self.ledger.insert(s);
                    Response::Deposited
                }
                Err(e) => {
                    tracing::error!("cannot store a deposit: {e}");
                    Response::Refused(Refusal::Busy)
                }
            },
        }
    }

    fn remove(&mut self, ids: &[Id]) -> Response {
        match self.store.remove(ids) {
            Ok(()) => {
                for id in ids {
                    self.ledger.remove(id);
                }
                let n = u64::try_from(ids.len()).unwrap_or(u64::MAX);
                self.held.deleted.fetch_add(n, Ordering::Relaxed);
                Response::Deleted {
                    count: u32::try_from(ids.len()).unwrap_or(u32::MAX),
                }
            }
            Err(e) => {
                tracing::error!("cannot delete held mail: {e}");
                Response::Refused(Refusal::Busy)
            }
        }
    }
}

impl Actor for HolderActor {
    type Input = HolderInput;

    fn on_input(&mut self, input: HolderInput, now: Instant) {
        let now = self.ms(now);
        let out = match input {
            HolderInput::Peer(HolderRequest { peer, req, channel }) => {
                let (resp, stored, dropped) = self.answer(peer, req, now);
                self.publish();
                HolderOut::Answer(HolderAnswer {
                    peer,
                    resp,
                    channel,
                    stored,
                    dropped,
                })
            }
            HolderInput::Walk { cursor, max } => self.walk(cursor, max),
        };
        if self.answers.blocking_send(out).is_err() {
            tracing::debug!("event loop gone; mailbox answer dropped");
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let at = self.ledger.next_expiry()?;
        Some(self.anchor.0 + Duration::from_millis(at.saturating_sub(self.anchor.1)))
    }

    fn on_deadline(&mut self, now: Instant) {
        let now = self.ms(now);
        let expired = self.ledger.expired(now);
        if expired.is_empty() {
            return;
        }
        if let Err(e) = self.store.remove(&expired) {
            tracing::error!("cannot drop expired mail: {e}");
            return;
        }
        for id in &expired {
            self.ledger.remove(id);
        }
        tracing::debug!(n = expired.len(), "expired mail dropped");
        self.publish();
    }
}
