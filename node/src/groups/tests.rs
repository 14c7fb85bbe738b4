//! The groups actor against what a hostile peer can send it: invitations
//! and their caps, forged and early gossip, the rate limits, and rows left
//! by groups the node is not in. The actor runs in the test's thread (its
//! inputs are fed directly; the network commands it sends are read back).

use std::time::{Duration, Instant};

use fogmesh_protocols::groups::gossip::encode_gossip_message;
use fogmesh_protocols::groups::wire::{
    decode_sync_response, encode_sync_request, encode_sync_response,
};
use fogmesh_protocols::groups::{
    Group, GroupId, Op, SignedEnvelope, SyncRequest, SyncResponse, Want,
};
use libp2p::PeerId;
use libp2p::gossipsub::MessageAcceptance;
use libp2p::identity::Keypair;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{broadcast, mpsc};

use super::actor::GroupsActor;
use super::store::{Batch, GroupStore};
use super::{GroupsConfig, MAX_INVITES, MAX_INVITES_PER_INVITER, NetCommand, SYNC_REQUEST_BURST};
use crate::actor::Actor;
use crate::metrics::NodeMetrics;
use crate::storage::Store;
use crate::types::NodeEvent;

struct Fixture {
    actor: GroupsActor,
    net: mpsc::Receiver<NetCommand>,
    events: broadcast::Receiver<NodeEvent>,
    rng: StdRng,
    _dir: tempfile::TempDir,
}

fn kp(i: u8) -> Keypair {
    match Keypair::ed25519_from_bytes([i; 32]) {
        Ok(k) => k,
        Err(e) => panic!("{e}"),
    }
}

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// A node with key 1 and `cfg`.
fn node(cfg: GroupsConfig) -> Fixture {
    let dir = ok(tempfile::tempdir());
    let store = ok(GroupStore::open(ok(Store::open(dir.path()))));
    let (net_tx, net) = mpsc::channel(100_000);
    let (ev_tx, events) = broadcast::channel(1024);
    let metrics = NodeMetrics::register(&mut prometheus_client::registry::Registry::default());
    let mut actor = GroupsActor::new(kp(1), store, net_tx, ev_tx, metrics, cfg);
    actor.start(Instant::now());
    Fixture {
        actor,
        net,
        events,
        rng: StdRng::seed_from_u64(7),
        _dir: dir,
    }
}

impl Fixture {
    fn local(&self) -> PeerId {
        self.actor.local
    }

    /// A group founded by `admin` with this node and `others`: its
    /// genesis op.
    fn invited_by(&mut self, admin: &Keypair, others: &[PeerId]) -> (Group, Op) {
        let mut members = vec![self.local()];
        members.extend_from_slice(others);
        let (g, ops) = ok(Group::create(
            admin.clone(),
            "g",
            "",
            &members,
            &mut self.rng,
            0,
        ));
        let genesis = ops.into_iter().next();
        let Some(genesis) = genesis else {
            panic!("no genesis")
        };
        (g, genesis)
    }

    /// `peer` answers our request for the log of the genesis' group.
    fn log_arrives(&mut self, peer: PeerId, ops: Vec<Op>) -> GroupId {
        let gid = GroupId(ops[0].hash());
        let resp = SyncResponse {
            ops,
            ..SyncResponse::empty(gid)
        };
        self.actor
            .on_sync_response(peer, gid, &encode_sync_response(&resp), Instant::now());
        gid
    }

    fn drain(&mut self) -> Vec<NetCommand> {
        let mut out = Vec::new();
        while let Ok(c) = self.net.try_recv() {
            out.push(c);
        }
        out
    }
}

#[test]
fn an_untrusted_invitation_stores_nothing_and_waits_for_the_user() {
    let mut f = node(GroupsConfig::default());
    let admin = kp(2);
    let (_, genesis) = f.invited_by(&admin, &[]);
    let gid = f.log_arrives(admin.public().to_peer_id(), vec![genesis.clone()]);
    assert!(!f.actor.groups.contains_key(&gid));
    assert!(f.actor.invites.get(&gid).is_some_and(|i| !i.accepted));
    assert!(ok(f.actor.store.ops(&gid)).is_empty(), "ops stored");
    assert_eq!(ok(f.actor.store.invites()).len(), 1);
    assert!(
        !f.drain()
            .iter()
            .any(|c| matches!(c, NetCommand::Subscribe(_))),
        "subscribed before accepting"
    );
    assert!(matches!(
        f.events.try_recv(),
        Ok(NodeEvent::GroupInvite { .. })
    ));
    // The same invitation again is not a second one.
    f.log_arrives(admin.public().to_peer_id(), vec![genesis]);
    assert_eq!(f.actor.invites.len(), 1);
}

#[test]
fn a_trusted_admin_is_joined_at_once() {
    let admin = kp(2);
    let mut f = node(GroupsConfig {
        trust: vec![admin.public().to_peer_id()],
        ..GroupsConfig::default()
    });
    let (_, genesis) = f.invited_by(&admin, &[]);
    let gid = f.log_arrives(admin.public().to_peer_id(), vec![genesis]);
    assert!(f.actor.groups.contains_key(&gid));
    assert!(f.actor.invites.is_empty());
    assert_eq!(ok(f.actor.store.ops(&gid)).len(), 1);
}

#[test]
fn invitations_are_capped_per_inviter_and_in_all() {
    let mut f = node(GroupsConfig::default());
    let spammer = kp(2);
    let via = spammer.public().to_peer_id();
    for _ in 0..MAX_INVITES_PER_INVITER + 3 {
        let (_, genesis) = f.invited_by(&spammer, &[]);
        f.log_arrives(via, vec![genesis]);
    }
    assert_eq!(f.actor.invites.len(), MAX_INVITES_PER_INVITER);
    // Many inviters: the total stays at MAX_INVITES, the oldest dropped.
    let mut last = None;
    for i in 0..MAX_INVITES + 10 {
        let admin = kp(10 + i as u8);
        let (_, genesis) = f.invited_by(&admin, &[]);
        last = Some(f.log_arrives(admin.public().to_peer_id(), vec![genesis]));
        // Distinct arrival times, so that "oldest" is well defined.
        if let Some(inv) = last.and_then(|g| f.actor.invites.get_mut(&g)) {
            inv.received = i as u64 + 1_000;
        }
    }
    assert_eq!(f.actor.invites.len(), MAX_INVITES);
    assert_eq!(ok(f.actor.store.invites()).len(), MAX_INVITES);
    assert!(last.is_some_and(|g| f.actor.invites.contains_key(&g)));
}

#[test]
fn orphan_rows_are_collected_at_start() {
    let dir = ok(tempfile::tempdir());
    let orphan = GroupId([9; 32]);
    {
        let store = ok(GroupStore::open(ok(Store::open(dir.path()))));
        let mut rng = StdRng::seed_from_u64(1);
        let (mut g, _) = ok(Group::create(kp(3), "x", "", &[], &mut rng, 0));
        let op = ok(g.rotate(&mut rng, 1));
        // An op without its genesis: what a refused group used to leave.
        ok(store.commit(&orphan, Batch::of_ops(1, &[op])));
        assert_eq!(ok(store.ops(&orphan)).len(), 1);
    }
    let store = ok(GroupStore::open(ok(Store::open(dir.path()))));
    let (net_tx, _net) = mpsc::channel(1024);
    let (ev_tx, _ev) = broadcast::channel(16);
    let metrics = NodeMetrics::register(&mut prometheus_client::registry::Registry::default());
    let mut actor = GroupsActor::new(kp(1), store.clone(), net_tx, ev_tx, metrics, {
        GroupsConfig::default()
    });
    actor.start(Instant::now());
    assert!(ok(store.ops(&orphan)).is_empty(), "orphan ops kept");
}

/// The next message of the member whose view `g` is.
fn message(g: &mut Group, rng: &mut StdRng, text: &str) -> SignedEnvelope {
    ok(g.compose(rng, text, 1)).0
}

#[test]
fn forged_gossip_does_not_spend_the_claimed_senders_rate() {
    let mut f = node(GroupsConfig {
        sender_rate: 1.0,
        ..GroupsConfig::default()
    });
    let admin = kp(2);
    let admin_id = admin.public().to_peer_id();
    let (mut g, genesis) = f.invited_by(&admin, &[]);
    f.actor.cfg.trust.push(admin_id);
    let gid = f.log_arrives(admin_id, vec![genesis]);
    assert!(f.actor.groups.contains_key(&gid));
    let now = Instant::now();
    let eve = kp(3);
    let genuine = message(&mut g, &mut f.rng, "real");
    for i in 0..20 {
        // Eve signs the admin's messages with her own key.
        let mut forged = ok(SignedEnvelope::sign(&eve, genuine.body.clone()));
        forged.body.timestamp_ms += i;
        let verdict = f.actor.on_gossip(
            eve.public().to_peer_id(),
            &encode_gossip_message(&forged),
            now,
        );
        assert!(matches!(verdict, MessageAcceptance::Reject));
    }
    // The admin's own message still passes its (small) budget.
    let verdict = f
        .actor
        .on_gossip(admin_id, &encode_gossip_message(&genuine), now);
    assert!(matches!(verdict, MessageAcceptance::Accept), "{verdict:?}");
}

#[test]
fn a_message_from_a_member_whose_add_has_not_arrived_is_ignored_and_caught_up() {
    let mut f = node(GroupsConfig::default());
    let admin = kp(2);
    let admin_id = admin.public().to_peer_id();
    let (mut g, genesis) = f.invited_by(&admin, &[]);
    f.actor.cfg.trust.push(admin_id);
    let gid = f.log_arrives(admin_id, vec![genesis.clone()]);
    f.actor
        .on_input(super::Input::PeerConnected(admin_id), Instant::now());
    // The admin adds D, who writes at once; the `Add` has not reached us.
    let d = kp(4);
    let d_id = d.public().to_peer_id();
    let add = ok(g.add(d_id, &mut f.rng, 2));
    let mut gd = ok(Group::join(d, genesis));
    ok(gd.receive_op(add));
    let hello = message(&mut gd, &mut f.rng, "hi, new here");
    f.drain();
    let verdict = f
        .actor
        .on_gossip(admin_id, &encode_gossip_message(&hello), Instant::now());
    assert!(
        matches!(verdict, MessageAcceptance::Ignore),
        "the relay was penalized: {verdict:?}"
    );
    assert!(
        f.drain().iter().any(|c| matches!(
            c,
            NetCommand::SyncRequest { peer, group, .. } if *peer == admin_id && *group == gid
        )),
        "no catch-up with the relay"
    );
}

#[test]
fn sync_requests_are_rate_limited_per_peer() {
    let mut f = node(GroupsConfig::default());
    let admin = kp(2);
    let admin_id = admin.public().to_peer_id();
    let (_, genesis) = f.invited_by(&admin, &[]);
    f.actor.cfg.trust.push(admin_id);
    let gid = f.log_arrives(admin_id, vec![genesis]);
    let req = encode_sync_request(&SyncRequest::Fetch {
        group_id: gid,
        want: Want {
            membership_from: Some(0),
            ..Want::default()
        },
    });
    let now = Instant::now();
    let answered = (0..SYNC_REQUEST_BURST + 50)
        .filter(|_| {
            let resp = f.actor.on_sync_request(admin_id, &req, now);
            decode_sync_response(&resp).is_ok_and(|r| !r.ops.is_empty())
        })
        .count();
    assert_eq!(answered as u64, SYNC_REQUEST_BURST);
    // The budget refills with time.
    let later = now + Duration::from_secs(1);
    let resp = f.actor.on_sync_request(admin_id, &req, later);
    assert!(decode_sync_response(&resp).is_ok_and(|r| !r.ops.is_empty()));
}

#[test]
fn a_group_at_its_storage_quota_refuses_new_messages() {
    let mut f = node(GroupsConfig::default());
    let admin = kp(2);
    let admin_id = admin.public().to_peer_id();
    let (mut g, genesis) = f.invited_by(&admin, &[]);
    f.actor.cfg.trust.push(admin_id);
    let gid = f.log_arrives(admin_id, vec![genesis]);
    let first = message(&mut g, &mut f.rng, "fits");
    let verdict = f
        .actor
        .on_gossip(admin_id, &encode_gossip_message(&first), Instant::now());
    assert!(matches!(verdict, MessageAcceptance::Accept));
    assert_eq!(f.actor.usage.get(&gid).map(|u| u.0), Some(1));
    f.actor.usage.insert(gid, (super::MAX_GROUP_MESSAGES, 0));
    let second = message(&mut g, &mut f.rng, "over the quota");
    let verdict = f
        .actor
        .on_gossip(admin_id, &encode_gossip_message(&second), Instant::now());
    assert!(matches!(verdict, MessageAcceptance::Ignore));
    assert_eq!(ok(f.actor.store.history(&gid, None)).len(), 1);
    // A local post gets a clear refusal.
    let (reply, answer) = tokio::sync::oneshot::channel();
    f.actor.on_input(
        super::handle::ApiCall::Send {
            group: gid,
            text: "mine".into(),
            reply,
        }
        .into(),
        Instant::now(),
    );
    let refused = answer.blocking_recv();
    assert!(
        matches!(&refused, Ok(Err(crate::actor::ServiceError::Forbidden(m))) if m.contains("quota")),
        "{refused:?}"
    );
}
