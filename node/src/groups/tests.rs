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
    f.actor.flush();
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

/// A node (key 1) in a group of `admin` it trusts, joined.
fn joined(f: &mut Fixture, admin: &Keypair) -> (Group, GroupId) {
    let admin_id = admin.public().to_peer_id();
    let (g, genesis) = f.invited_by(admin, &[]);
    f.actor.cfg.trust.push(admin_id);
    let gid = f.log_arrives(admin_id, vec![genesis]);
    assert!(f.actor.groups.contains_key(&gid));
    (g, gid)
}

fn gossip(source: PeerId, i: usize, env: &SignedEnvelope) -> super::Input {
    super::Input::Gossip {
        source,
        message_id: libp2p::gossipsub::MessageId::new(&i.to_be_bytes()),
        data: encode_gossip_message(env),
    }
}

fn accepted(cmds: &[NetCommand]) -> usize {
    cmds.iter()
        .filter(|c| {
            matches!(
                c,
                NetCommand::Validation {
                    acceptance: MessageAcceptance::Accept,
                    ..
                }
            )
        })
        .count()
}

#[test]
fn gossip_arriving_together_is_committed_in_one_transaction_and_forwarded_after() {
    let mut f = node(GroupsConfig {
        sender_rate: 10_000.0,
        ..GroupsConfig::default()
    });
    let admin = kp(2);
    let admin_id = admin.public().to_peer_id();
    let (mut g, gid) = joined(&mut f, &admin);
    f.drain();
    let before = f.actor.store.commits();
    let n = 100;
    for i in 0..n {
        let env = message(&mut g, &mut f.rng, &format!("m{i}"));
        f.actor.on_input(gossip(admin_id, i, &env), Instant::now());
    }
    // Nothing forwarded (accepted) or announced before it is committed.
    assert_eq!(accepted(&f.drain()), 0, "accepted before the commit");
    assert!(ok(f.actor.store.history(&gid, None)).is_empty());
    assert_eq!(f.actor.store.commits(), before);
    // The actor's pass ends: one transaction, then the verdicts.
    f.actor.end_of_pass(Instant::now());
    assert_eq!(f.actor.store.commits(), before + 1);
    assert_eq!(ok(f.actor.store.history(&gid, None)).len(), n);
    assert_eq!(accepted(&f.drain()), n);
    let mut events = 0;
    while let Ok(ev) = f.events.try_recv() {
        events += usize::from(matches!(ev, NodeEvent::GroupMessage { .. }));
    }
    assert_eq!(events, n);
    // A long burst: one transaction per MAX_COMMIT_BATCH messages.
    let n = 2 * super::MAX_COMMIT_BATCH + 10;
    let before = f.actor.store.commits();
    for i in 0..n {
        let env = message(&mut g, &mut f.rng, "more");
        f.actor
            .on_input(gossip(admin_id, 1000 + i, &env), Instant::now());
    }
    f.actor.end_of_pass(Instant::now());
    assert_eq!(f.actor.store.commits(), before + 3);
    assert_eq!(accepted(&f.drain()), n);
    // An API call sees what was received before it, committed.
    let env = message(&mut g, &mut f.rng, "last");
    f.actor
        .on_input(gossip(admin_id, 9999, &env), Instant::now());
    let (reply, answer) = tokio::sync::oneshot::channel();
    f.actor.on_input(
        super::handle::ApiCall::Messages {
            group: gid,
            limit: Some(1),
            reply,
        }
        .into(),
        Instant::now(),
    );
    let last = answer.blocking_recv();
    assert!(
        matches!(&last, Ok(Ok(m)) if m.len() == 1 && m[0].text == "last"),
        "{last:?}"
    );
}

#[test]
fn api_calls_are_answered_while_a_peers_sync_is_served() {
    let mut f = node(GroupsConfig::default());
    let peer = kp(3).public().to_peer_id();
    let (reply, created) = tokio::sync::oneshot::channel();
    f.actor.on_input(
        super::handle::ApiCall::Create {
            name: "g".into(),
            description: String::new(),
            members: vec![peer],
            reply,
        }
        .into(),
        Instant::now(),
    );
    let gid = match created.blocking_recv() {
        Ok(Ok(ack)) => ok(super::handle::parse_group(&ack.group_id)),
        other => panic!("{other:?}"),
    };
    // 150 messages of 16 KiB: each full answer reads and decodes 2.4 MB.
    let n = 150u64;
    let text = "x".repeat(16 * 1024);
    for _ in 0..n {
        let (reply, sent) = tokio::sync::oneshot::channel();
        f.actor.on_input(
            super::handle::ApiCall::Send {
                group: gid,
                text: text.clone(),
                reply,
            }
            .into(),
            Instant::now(),
        );
        assert!(matches!(sent.blocking_recv(), Ok(Ok(_))));
    }
    let local = f.local();
    let Fixture { actor, _dir, .. } = f;
    let channel = crate::actor::Channel::bounded(4096);
    let mailbox = channel.mailbox.clone();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let thread = ok(crate::actor::spawn(
        "test-groups",
        actor,
        channel,
        shutdown.clone(),
    ));
    let read = |limit| {
        let (reply, answer) = tokio::sync::oneshot::channel();
        ok(mailbox.offer(
            super::handle::ApiCall::Messages {
                group: gid,
                limit: Some(limit),
                reply,
            }
            .into(),
        ));
        answer.blocking_recv()
    };
    // Once the actor has restored the group (its first answer)...
    assert!(matches!(read(1), Ok(Ok(m)) if m.len() == 1));
    // ...a peer asks for everything, 40 times, then the user reads.
    let req = encode_sync_request(&SyncRequest::Fetch {
        group_id: gid,
        want: Want {
            ranges: vec![(local, 1, n)],
            ..Want::default()
        },
    });
    let asks = 40;
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..asks {
        ok(mailbox.offer(super::Input::SyncRequest {
            peer,
            frame: req.clone(),
            channel: super::SyncReply::Test(tx.clone()),
        }));
    }
    let start = Instant::now();
    let got = read(5);
    let api = start.elapsed();
    assert!(matches!(&got, Ok(Ok(m)) if m.len() == 5), "{got:?}");
    let mut full = 0;
    for _ in 0..asks {
        let frame = ok(rx.recv_timeout(Duration::from_secs(120)));
        let resp = ok(decode_sync_response(&frame));
        full += usize::from(resp.messages.len() as u64 == n);
    }
    let sync = start.elapsed();
    shutdown.cancel();
    let _ = thread.join();
    eprintln!("API answered in {api:?}; {asks} sync answers took {sync:?}");
    assert_eq!(full, asks, "every answer carries every message");
    // Answered inline, the read would have waited for all 40 answers.
    assert!(
        api * 4 < sync,
        "API {api:?} waited for the sync answers ({sync:?})"
    );
}

/// Received messages per second into one group: `FOGMESH_BENCH_N` (2000)
/// gossip messages from one member queued for the actor on its thread, timed
/// until every verdict is out (each verdict follows the message's commit).
/// A measurement, not a check (docs/BENCHMARKS.md):
/// `cargo test -p fogmesh --lib groups::tests::receive_throughput -- --ignored --nocapture`
#[test]
#[ignore = "a measurement; see docs/BENCHMARKS.md"]
fn receive_throughput() {
    let n: usize = std::env::var("FOGMESH_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut f = node(GroupsConfig {
        sender_rate: 1e9,
        ..GroupsConfig::default()
    });
    let admin = kp(2);
    let admin_id = admin.public().to_peer_id();
    let (mut g, _gid) = joined(&mut f, &admin);
    f.drain();
    let frames: Vec<super::Input> = (0..n)
        .map(|i| {
            let env = message(
                &mut g,
                &mut f.rng,
                &format!(
                    "message {i} of the flood, about a hundred bytes of text like a chat line"
                ),
            );
            gossip(admin_id, i, &env)
        })
        .collect();
    let Fixture {
        actor,
        mut net,
        _dir,
        ..
    } = f;
    let commits = actor.store.clone();
    let before = commits.commits();
    let channel = crate::actor::Channel::bounded(super::INPUT_QUEUE);
    let mailbox = channel.mailbox.clone();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let thread = ok(crate::actor::spawn(
        "bench-groups",
        actor,
        channel,
        shutdown.clone(),
    ));
    let start = Instant::now();
    let feeder = std::thread::spawn(move || {
        for input in frames {
            if mailbox.send_blocking(input).is_err() {
                return;
            }
        }
    });
    let mut got = 0;
    while got < n {
        match net.blocking_recv() {
            Some(NetCommand::Validation { acceptance, .. }) => {
                assert!(matches!(acceptance, MessageAcceptance::Accept));
                got += 1;
            }
            Some(_) => {}
            None => panic!("actor gone"),
        }
    }
    let took = start.elapsed();
    let _ = feeder.join();
    shutdown.cancel();
    let _ = thread.join();
    eprintln!(
        "received {n} messages into one group in {took:?}: {:.0} msg/s, {} write transactions",
        n as f64 / took.as_secs_f64(),
        commits.commits() - before
    );
}
