//! Group chat: creation, delivery and causal order across live nodes,
//! catch-up after downtime, removal, late additions, persistence, and a
//! rogue peer posting into a group it does not belong to.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{
    Daemon, Lines, eventually, files_containing, http, is_hex64, metric_sum, now_ms, unique,
};

/// Generous: the contract says delivery normally takes well under a few
/// seconds, sync runs every ~2 s, and the test machine may be busy.
const T: Duration = Duration::from_secs(60);

/// `group create NAME --member ...`; returns the group id.
fn group_create(d: &Daemon, name: &str, members: &[&str]) -> String {
    let mut args = vec!["group", "create", name];
    for m in members {
        args.extend(["--member", m]);
    }
    let v = d.json(&args);
    let gid = v["group_id"].as_str().expect("group_id").to_owned();
    assert!(is_hex64(&gid), "group id {gid:?} is not 64 hex chars");
    gid
}

/// `group send`; returns the message id.
fn send(d: &Daemon, gid: &str, text: &str) -> String {
    let v = d.json(&["group", "send", gid, text]);
    let id = v["id"].as_str().expect("id").to_owned();
    assert!(is_hex64(&id), "message id {id:?} is not 64 hex chars");
    assert_eq!(v["group_id"], gid);
    id
}

/// `group messages`, in delivery order ("nothing found" is empty).
fn messages(d: &Daemon, gid: &str) -> Vec<Value> {
    d.json_or_nothing(&["group", "messages", gid])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// `group show`; `None` on exit 1 (unknown group).
fn show(d: &Daemon, gid: &str) -> Option<Value> {
    let out = d.cli(&["group", "show", gid, "--json"]);
    match out.status.code() {
        Some(0) => Some(serde_json::from_slice(&out.stdout).expect("show prints JSON")),
        Some(1) => None,
        _ => panic!(
            "group show failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn has_group(d: &Daemon, gid: &str) -> bool {
    d.json_or_nothing(&["group", "list"])
        .as_array()
        .is_some_and(|a| a.iter().any(|g| g["group_id"] == gid))
}

/// `group invites`: the invitations `d` holds.
fn invites(d: &Daemon) -> Vec<Value> {
    d.json_or_nothing(&["group", "invites"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The pending (not yet accepted) invitation to `gid` on `d`.
fn pending_invite(d: &Daemon, gid: &str) -> Option<Value> {
    invites(d)
        .into_iter()
        .find(|i| i["group_id"] == gid && i["accepted"] == false)
}

/// Waits until `d` lists the group, accepting its invitation when it comes
/// (as its user would).
fn wait_group(d: &Daemon, gid: &str) {
    eventually(T, &format!("{} lists group {gid}", d.peer_id), || {
        if has_group(d, gid) {
            return Some(());
        }
        if pending_invite(d, gid).is_some() {
            d.json(&["group", "accept", gid]);
        }
        None
    });
}

fn members(g: &Value) -> HashSet<String> {
    g["members"]
        .as_array()
        .expect("members array")
        .iter()
        .map(|m| m.as_str().expect("member peer id").to_owned())
        .collect()
}

fn ids(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect()
}

fn texts(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["text"].as_str().expect("text").to_owned())
        .collect()
}

/// Ids of `sender`'s messages, in list order.
fn ids_from(msgs: &[Value], sender: &str) -> Vec<String> {
    ids(&msgs
        .iter()
        .filter(|m| m["sender"] == sender)
        .cloned()
        .collect::<Vec<_>>())
}

fn position(msgs: &[Value], id: &str) -> usize {
    msgs.iter()
        .position(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("message {id} not listed"))
}

/// Waits until `d` has delivered every id in `want`; returns its list.
fn wait_messages(d: &Daemon, gid: &str, want: &[String]) -> Vec<Value> {
    let what = format!("{} has {} given messages", d.peer_id, want.len());
    eventually(T, &what, || {
        let msgs = messages(d, gid);
        let have: HashSet<String> = ids(&msgs).into_iter().collect();
        want.iter().all(|w| have.contains(w)).then_some(msgs)
    })
}

/// A full history: no duplicates, every sender's messages in seq order from
/// 1 without gaps, and every message after all of its `deps`.
fn assert_causal(node: &str, msgs: &[Value]) {
    let mut seen = HashSet::new();
    let mut next_seq: HashMap<String, u64> = HashMap::new();
    for (i, m) in msgs.iter().enumerate() {
        let id = m["id"].as_str().expect("id");
        assert!(seen.insert(id.to_owned()), "{node}: {id} listed twice");
        let sender = m["sender"].as_str().expect("sender").to_owned();
        let seq = m["seq"].as_u64().expect("seq");
        let want = next_seq.entry(sender.clone()).or_insert(1);
        assert_eq!(
            seq, *want,
            "{node}: message #{i} ({id}) from {sender} has seq {seq}, expected {want}"
        );
        *want += 1;
        for dep in m["deps"].as_array().expect("deps array") {
            let dep = dep.as_str().expect("dep id");
            assert!(
                seen.contains(dep),
                "{node}: message #{i} ({id}) is listed before its dependency {dep}"
            );
        }
    }
}

/// JSON lines from a running client command, until `done` or `T`.
fn read_json_lines(lines: &Lines, mut done: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = Instant::now() + T;
    while !done(&got) && Instant::now() < deadline {
        if let Some(line) = lines.next_line(Duration::from_secs(1)) {
            got.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}")));
        }
    }
    got
}

/// A, then B and C bootstrapped from A.
fn three(dir: &Path) -> (Daemon, Daemon, Daemon) {
    let a = Daemon::start(&dir.join("a"), &[]);
    let b = Daemon::start(&dir.join("b"), &["--bootstrap", &a.tcp_addr()]);
    let c = Daemon::start(&dir.join("c"), &["--bootstrap", &a.tcp_addr()]);
    b.wait_connected(&a.peer_id, T);
    c.wait_connected(&a.peer_id, T);
    (a, b, c)
}

/// A creates a group with B and C; returns once B and C list it.
fn group_of_three(a: &Daemon, b: &Daemon, c: &Daemon, name: &str) -> String {
    let gid = group_create(a, name, &[&b.peer_id, &c.peer_id]);
    wait_group(b, &gid);
    wait_group(c, &gid);
    gid
}

#[test]
fn three_members_two_concurrent_senders_converge() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let started = now_ms();
    let (a, b, c) = three(tmp.path());
    let gid = group_of_three(&a, &b, &c, "trio");
    for d in [&a, &b, &c] {
        let g = show(d, &gid).expect("group shown");
        assert_eq!(g["group_id"], gid.as_str());
        assert_eq!(g["name"], "trio");
        assert_eq!(g["admin"], a.peer_id.as_str());
        assert_eq!(g["epoch"], 0);
        let want: HashSet<String> = [&a, &b, &c].iter().map(|d| d.peer_id.clone()).collect();
        assert_eq!(members(&g), want);
    }

    // C follows the conversation live, and B's event stream reports it.
    let follow = c.spawn_cli(&["group", "messages", &gid, "--follow", "--json"]);
    let events = b.spawn_cli(&["events", "--json"]);
    std::thread::sleep(Duration::from_millis(500));

    // A and B each send 10, at the same time.
    let from = |d: &str, node: &Daemon| -> Vec<String> {
        (1..=10)
            .map(|i| send(node, &gid, &format!("{d} says {i}")))
            .collect()
    };
    let (a_ids, b_ids) = std::thread::scope(|s| {
        let ta = s.spawn(|| from("A", &a));
        let tb = s.spawn(|| from("B", &b));
        (
            ta.join().expect("A's sender"),
            tb.join().expect("B's sender"),
        )
    });
    let all: HashSet<String> = a_ids.iter().chain(&b_ids).cloned().collect();
    assert_eq!(all.len(), 20, "send returned duplicate ids");

    for (name, d) in [("A", &a), ("B", &b), ("C", &c)] {
        let msgs = eventually(T, &format!("{name} has exactly the 20 messages"), || {
            let msgs = messages(d, &gid);
            (ids(&msgs).into_iter().collect::<HashSet<_>>() == all).then_some(msgs)
        });
        assert_eq!(msgs.len(), 20, "{name} lists duplicates");
        assert_causal(name, &msgs);
        assert_eq!(ids_from(&msgs, &a.peer_id), a_ids, "{name}: A's order");
        assert_eq!(ids_from(&msgs, &b.peer_id), b_ids, "{name}: B's order");
        for m in &msgs {
            let ts = m["timestamp"].as_u64().expect("timestamp");
            assert!(
                ts + 60_000 >= started && ts <= now_ms() + 60_000,
                "{name}: timestamp {ts}"
            );
            let who = if m["sender"] == a.peer_id.as_str() {
                "A"
            } else {
                "B"
            };
            let want = format!("{who} says {}", m["seq"]);
            assert_eq!(m["text"], want.as_str(), "{name}: text of {m}");
        }
        // `--limit N` is the last N.
        let last = d.json(&["group", "messages", &gid, "--limit", "3"]);
        assert_eq!(
            ids(last.as_array().expect("array")),
            ids(&msgs[17..]),
            "{name}: --limit 3"
        );
    }

    // The --follow stream on C printed each of the 20 exactly once.
    let followed = read_json_lines(&follow, |v| v.len() >= 20);
    assert_eq!(followed.len(), 20, "--follow on C printed {followed:?}");
    assert_eq!(ids(&followed).into_iter().collect::<HashSet<_>>(), all);

    // B's events include A's messages.
    let from_a = |v: &Value| v["type"] == "group_message" && v["sender"] == a.peer_id.as_str();
    let events = read_json_lines(&events, |v| v.iter().filter(|e| from_a(e)).count() >= 10);
    let events: Vec<Value> = events.into_iter().filter(from_a).collect();
    assert_eq!(
        ids(&events),
        a_ids,
        "B's group_message events for A's messages"
    );
    for e in &events {
        assert_eq!(e["group_id"], gid.as_str());
        assert!(
            e["text"].as_str().expect("text").starts_with("A says "),
            "{e}"
        );
    }

    // A reply written after reading a question is listed after it everywhere.
    let question = send(&a, &gid, "lunch at noon?");
    wait_messages(&c, &gid, std::slice::from_ref(&question));
    let reply = send(&c, &gid, "yes, noon works");
    for (name, d) in [("A", &a), ("B", &b), ("C", &c)] {
        let msgs = wait_messages(d, &gid, std::slice::from_ref(&reply));
        assert!(
            position(&msgs, &reply) > position(&msgs, &question),
            "{name} lists the reply before the question"
        );
        assert_causal(name, &msgs);
    }
}

#[test]
fn member_offline_during_30_messages_catches_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b, mut c) = three(tmp.path());
    let gid = group_of_three(&a, &b, &c, "catch-up");
    let c_dir = c.data_dir.clone();
    let c_id = c.peer_id.clone();
    let (status, _) = c.terminate();
    assert!(status.success(), "C's exit status {status}");
    drop(c);

    let texts_sent: Vec<String> = (1..=30).map(|i| format!("while C was away {i}")).collect();
    let sent: Vec<String> = texts_sent.iter().map(|t| send(&a, &gid, t)).collect();
    let on_b = wait_messages(&b, &gid, &sent);
    assert_eq!(ids_from(&on_b, &a.peer_id), sent, "B: A's order");

    let c = Daemon::start(&c_dir, &["--bootstrap", &a.tcp_addr()]);
    assert_eq!(c.peer_id, c_id);
    let on_c = wait_messages(&c, &gid, &sent);
    assert_eq!(
        ids_from(&on_c, &a.peer_id),
        sent,
        "C: A's messages out of order"
    );
    assert_eq!(texts(&on_c), texts_sent);
    assert_causal("C", &on_c);
}

#[test]
fn removed_member_gets_nothing_after_removal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, mut b, mut c) = three(tmp.path());
    let gid = group_of_three(&a, &b, &c, "shrinking");
    let before = send(&a, &gid, "before removal");
    for d in [&a, &b, &c] {
        wait_messages(d, &gid, std::slice::from_ref(&before));
    }

    // Only the admin may remove.
    let out = b.cli(&["group", "remove", &gid, &c.peer_id, "--json"]);
    assert_eq!(out.status.code(), Some(2), "a non-admin removed a member");
    assert!(!out.stderr.is_empty(), "no message for a refused remove");

    a.json(&["group", "remove", &gid, &c.peer_id]);
    let g = show(&a, &gid).expect("A shows the group");
    assert!(
        !members(&g).contains(&c.peer_id),
        "C still listed on A: {g}"
    );
    assert!(
        g["epoch"].as_u64().expect("epoch") >= 1,
        "removal opened no epoch: {g}"
    );
    eventually(T, "B sees C removed", || {
        (!members(&show(&b, &gid).expect("B shows the group")).contains(&c.peer_id)).then_some(())
    });
    eventually(T, "C learns it was removed", || {
        show(&c, &gid)
            .is_none_or(|g| !members(&g).contains(&c.peer_id))
            .then_some(())
    });

    let marker = format!("secret-after-removal-{}", unique());
    let secret = send(&a, &gid, &marker);
    let on_b = wait_messages(&b, &gid, std::slice::from_ref(&secret));
    assert!(texts(&on_b).contains(&marker), "B cannot read the message");
    std::thread::sleep(Duration::from_secs(5));

    let on_c = messages(&c, &gid);
    assert!(
        !ids(&on_c).contains(&secret),
        "C got the message after its removal"
    );
    assert!(
        !texts(&on_c).contains(&marker),
        "C can read the message after its removal"
    );
    let out = c.cli(&["group", "send", &gid, "am I still here?", "--json"]);
    assert_eq!(out.status.code(), Some(2), "a removed member could send");

    // Nothing on C's disk or in its log holds the plaintext; B's does (the
    // node keeps plaintext history, so this proves the scan works).
    assert!(c.terminate().0.success());
    assert!(b.terminate().0.success());
    let on_c_disk = files_containing(&c.data_dir, marker.as_bytes());
    assert!(
        on_c_disk.is_empty(),
        "marker found on C's disk: {on_c_disk:?}"
    );
    assert!(!c.stderr().contains(&marker), "marker found in C's log");
    assert!(
        !files_containing(&b.data_dir, marker.as_bytes()).is_empty(),
        "marker not found under B's data dir: the scan proves nothing"
    );
}

#[test]
fn adding_an_offline_member_reaches_it_later() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let b = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &a.tcp_addr()]);
    b.wait_connected(&a.peer_id, T);
    // C exists (it has an identity) but is offline, and knows nobody.
    let c_dir = tmp.path().join("c");
    let mut c0 = Daemon::start(&c_dir, &[]);
    let c_id = c0.peer_id.clone();
    assert!(c0.terminate().0.success());
    drop(c0);

    let gid = group_create(&a, "late joiner", &[&b.peer_id]);
    wait_group(&b, &gid);
    let early = send(&a, &gid, "before C was added");

    // Only the admin may add.
    let out = b.cli(&["group", "add", &gid, &c_id, "--json"]);
    assert_eq!(out.status.code(), Some(2), "a non-admin added a member");
    assert!(!out.stderr.is_empty(), "no message for a refused add");

    a.json(&["group", "add", &gid, &c_id]);
    assert!(members(&show(&a, &gid).expect("show")).contains(&c_id));
    let late: Vec<String> = (1..=3)
        .map(|i| send(&a, &gid, &format!("after adding C {i}")))
        .collect();
    wait_messages(&b, &gid, &late);

    // C comes online knowing only B.
    let c = Daemon::start(&c_dir, &["--bootstrap", &b.tcp_addr()]);
    assert_eq!(c.peer_id, c_id);
    wait_group(&c, &gid);
    let g = show(&c, &gid).expect("C shows the group");
    assert_eq!(g["admin"], a.peer_id.as_str());
    let want: HashSet<String> = [&a.peer_id, &b.peer_id, &c_id]
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(members(&g), want);
    let on_c = wait_messages(&c, &gid, &late);
    // Same epoch, so the earlier message is readable too, and per-sender
    // delivery has no gaps.
    let mut from_a = vec![early];
    from_a.extend(late);
    assert_eq!(ids_from(&on_c, &a.peer_id), from_a, "C: A's messages");
    assert_causal("C", &on_c);

    // And C is a full member now.
    let hi = send(&c, &gid, "hello from C");
    wait_messages(&a, &gid, &[hi]);
}

#[test]
fn history_survives_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a_dir = tmp.path().join("a");
    let mut a = Daemon::start(&a_dir, &[]);
    let b = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &a.tcp_addr()]);
    b.wait_connected(&a.peer_id, T);
    let v = a.json(&[
        "group",
        "create",
        "diary",
        "--member",
        &b.peer_id,
        "--description",
        "kept on disk",
    ]);
    let gid = v["group_id"].as_str().expect("group_id").to_owned();
    let sent: Vec<String> = (1..=5)
        .map(|i| send(&a, &gid, &format!("entry {i}")))
        .collect();
    let fields = ["id", "sender", "text", "timestamp", "seq", "deps"];
    let key = |msgs: &[Value]| -> Vec<Vec<Value>> {
        msgs.iter()
            .map(|m| fields.map(|f| m[f].clone()).to_vec())
            .collect()
    };
    let before = messages(&a, &gid);
    assert_eq!(ids(&before), sent);
    let g_before = show(&a, &gid).expect("show");

    assert!(a.terminate().0.success());
    drop(a);
    let a = Daemon::start(&a_dir, &[]);
    let after = messages(&a, &gid);
    assert_eq!(
        key(&after),
        key(&before),
        "history changed across a restart"
    );
    let g = show(&a, &gid).expect("group gone after a restart");
    for f in ["name", "description", "admin", "epoch"] {
        assert_eq!(g[f], g_before[f], "{f} changed across a restart");
    }
    assert_eq!(g["description"], "kept on disk");
    assert_eq!(members(&g), members(&g_before));
    assert!(has_group(&a, &gid), "group list lost the group");
    let last = a.json(&["group", "messages", &gid, "--limit", "2"]);
    assert_eq!(ids(last.as_array().expect("array")), sent[3..].to_vec());
    // An unknown group is "nothing found".
    assert_eq!(show(&a, &"0".repeat(64)), None);
}

#[test]
fn non_member_post_is_rejected() {
    use fogmesh_protocols::groups::{EnvelopeBody, GroupId, Keypair, PeerId, SignedEnvelope};
    use libp2p::futures::StreamExt;
    use libp2p::gossipsub;
    use libp2p::swarm::SwarmEvent;

    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &["--metrics", "127.0.0.1:0"]);
    let metrics = a.metrics_addr().expect("metrics ready line");
    // B is a member that never comes online; the rogue will impersonate it.
    let b_id = Keypair::generate_ed25519().public().to_peer_id();
    let gid = group_create(&a, "guarded", &[&b_id.to_string()]);
    send(&a, &gid, "legit");
    let baseline = messages(&a, &gid);
    let epoch = show(&a, &gid).expect("show")["epoch"]
        .as_u64()
        .expect("epoch");
    let group_id = GroupId(
        hex::decode(&gid)
            .expect("hex")
            .try_into()
            .expect("32 bytes"),
    );
    let a_peer: PeerId = a.peer_id.parse().expect("A's peer id");
    let rogue_key = Keypair::generate_ed25519();
    let rogue_id = rogue_key.public().to_peer_id();

    // Every envelope is signed by the rogue: as itself (a non-member), or
    // claiming to be B (forged).
    let signer = rogue_key.clone();
    let envelope = move |sender: PeerId, seq: u64| -> Vec<u8> {
        let body = EnvelopeBody {
            group_id,
            epoch,
            sender,
            seq,
            deps: Vec::new(),
            timestamp_ms: now_ms(),
            ciphertext: vec![0x5a; 48],
        };
        let env = SignedEnvelope::sign(&signer, body).expect("sign");
        fogmesh_protocols::groups::gossip::encode_gossip_message(&env)
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let addr: libp2p::Multiaddr = a.tcp_addr().parse().expect("multiaddr");
    let topic = gossipsub::IdentTopic::new(fogmesh_protocols::groups::topic(&group_id));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    rt.spawn(async move {
        let fail = |e: String| {
            let _ = ready_tx.send(Err(e));
        };
        let mut swarm = match rogue_swarm(rogue_key) {
            Ok(s) => s,
            Err(e) => return fail(format!("building the swarm: {e}")),
        };
        if let Err(e) = swarm.behaviour_mut().subscribe(&topic) {
            return fail(format!("subscribe: {e}"));
        }
        if let Err(e) = swarm.dial(addr) {
            return fail(format!("dial A: {e}"));
        }
        let deadline = tokio::time::Instant::now() + T;
        loop {
            match tokio::time::timeout_at(deadline, swarm.select_next_some()).await {
                Err(_) => return fail("A never subscribed to the group topic".into()),
                Ok(SwarmEvent::OutgoingConnectionError { error, .. }) => {
                    return fail(format!("cannot connect to A: {error}"));
                }
                Ok(SwarmEvent::Behaviour(gossipsub::Event::Subscribed {
                    peer_id,
                    topic: t,
                    ..
                })) if peer_id == a_peer && t == topic.hash() => {
                    break;
                }
                Ok(_) => {}
            }
        }
        let mut publish = |seq: u64| {
            let g = swarm.behaviour_mut();
            let non_member = g.publish(topic.clone(), envelope(rogue_id, seq));
            let forged = g.publish(topic.clone(), envelope(b_id, seq));
            non_member
                .and(forged)
                .map(|_| ())
                .map_err(|e| format!("publish: {e}"))
        };
        let first = publish(1);
        let ok = first.is_ok();
        let _ = ready_tx.send(first);
        if !ok {
            return;
        }
        // Keep the connection, and keep misbehaving so that the penalty does
        // not decay away before the test reads the score.
        let mut seq = 1;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = swarm.select_next_some() => {}
                _ = tick.tick() => {
                    seq += 1;
                    let g = swarm.behaviour_mut();
                    let _ = g.publish(topic.clone(), envelope(rogue_id, seq));
                    let _ = g.publish(topic.clone(), envelope(b_id, seq));
                }
            }
        }
    });
    match ready_rx.recv_timeout(T + Duration::from_secs(30)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("rogue peer: {e}"),
        Err(_) => panic!("rogue peer task ended without reporting"),
    }

    eventually(T, "fogmesh_group_messages_rejected_total >= 2 on A", || {
        let (code, body) = http(&metrics, "GET", "/metrics", None, None);
        (code == 200)
            .then(|| metric_sum(&body, "fogmesh_group_messages_rejected_total"))
            .flatten()
            .filter(|n| *n >= 2.0)
    });
    assert_eq!(
        ids(&messages(&a, &gid)),
        ids(&baseline),
        "A accepted a rogue message"
    );

    let deadline = Instant::now() + T;
    let mut last = Value::Null;
    loop {
        let peers = a.json_or_nothing(&["peers"]);
        if let Some(entry) = peers.as_array().and_then(|p| {
            p.iter()
                .find(|p| p["peer_id"] == rogue_id.to_string().as_str())
        }) {
            last = entry.clone();
            if last["gossip_score"].as_f64().is_some_and(|s| s < 0.0) {
                break;
            }
        }
        if Instant::now() > deadline {
            panic!(
                "A's `peers` entry for the rogue never showed a negative gossip_score \
                 (null means peer scoring is off or not reported); last entry: {last}"
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    rt.shutdown_background();
}

/// A plain gossipsub node: signed messages, strict validation, defaults
/// otherwise.
fn rogue_swarm(
    key: fogmesh_protocols::groups::Keypair,
) -> Result<libp2p::Swarm<libp2p::gossipsub::Behaviour>, Box<dyn std::error::Error + Send + Sync>> {
    use libp2p::{gossipsub, noise, tcp, yamux};
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|key| {
            let config = gossipsub::ConfigBuilder::default()
                .validation_mode(gossipsub::ValidationMode::Strict)
                .build()?;
            let b = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                config,
            )?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(b)
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build())
}

/// `kill -9` of the sender right after its last acknowledged send loses
/// nothing: its own history has every message after a restart, and a member
/// that was offline throughout gets them all once both are up.
#[test]
fn kill_9_after_acknowledged_sends_loses_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a_dir = tmp.path().join("a");
    let b_dir = tmp.path().join("b");
    let mut a = Daemon::start(&a_dir, &[]);
    // B exists (so it can be named a member) but is offline throughout.
    let b_id = {
        let mut b = Daemon::start(&b_dir, &[]);
        let id = b.peer_id.clone();
        assert!(b.terminate().0.success());
        id
    };
    let gid = group_create(&a, "durable", &[&b_id]);
    let sent: Vec<String> = (0..20)
        .map(|i| send(&a, &gid, &format!("durable {i}")))
        .collect();
    a.kill9();

    let a = Daemon::start(&a_dir, &[]);
    assert_eq!(
        ids(&messages(&a, &gid)),
        sent,
        "A lost acknowledged messages"
    );

    let b = Daemon::start(&b_dir, &["--bootstrap", &a.tcp_addr()]);
    wait_group(&b, &gid);
    let on_b = wait_messages(&b, &gid, &sent);
    assert_eq!(ids_from(&on_b, &a.peer_id), sent);
}

/// One topic per group: a node in more than 100 groups (gossipsub's default
/// cap on topics in one SUBSCRIBE) still gets gossip in all of them, also
/// after a reconnection, when its whole subscription list is sent at once.
#[test]
fn more_than_100_groups_all_get_gossip() {
    const GROUPS: usize = 120;
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let b_dir = tmp.path().join("b");
    let boot = a.tcp_addr();
    // B trusts A: 120 invitations would exceed what B holds pending.
    let mut b = Daemon::start(&b_dir, &["--bootstrap", &boot, "--trust", &a.peer_id]);
    b.wait_connected(&a.peer_id, T);
    let token = std::fs::read_to_string(a.data_dir.join("api.token")).expect("token");
    let body = format!(r#"{{"name":"g","members":["{}"]}}"#, b.peer_id);
    let gids: Vec<String> = (0..GROUPS)
        .map(|_| {
            let (code, resp) = http(
                &a.api,
                "POST",
                "/v1/groups",
                Some(token.trim()),
                Some(&body),
            );
            assert_eq!(code, 200, "{resp}");
            let v: Value = serde_json::from_str(&resp).expect("json");
            v["group_id"].as_str().expect("group_id").to_owned()
        })
        .collect();
    eventually(T, "B lists all groups", || {
        let list = b.json_or_nothing(&["group", "list"]);
        (list.as_array().map_or(0, Vec::len) == GROUPS).then_some(())
    });

    // Reconnect: B's first SUBSCRIBE to A now lists 120 topics.
    assert!(b.terminate().0.success());
    drop(b);
    let b = Daemon::start(&b_dir, &["--metrics", "127.0.0.1:0"]);
    b.wait_connected(&a.peer_id, T);
    // Let the initial catch-up round (one summary per group) finish.
    std::thread::sleep(Duration::from_secs(3));
    let metrics = b.metrics_addr().expect("metrics address");
    let synced = || {
        let (_, body) = http(&metrics, "GET", "/metrics", None, None);
        metric_sum(&body, "fogmesh_group_messages_synced_total").unwrap_or(0.0)
    };
    let before = synced();
    // Every group: which topics a capped filter would drop depends on the
    // order the subscriptions arrive in.
    let sent: Vec<(String, String)> = gids
        .iter()
        .map(|gid| {
            let (code, resp) = http(
                &a.api,
                "POST",
                &format!("/v1/groups/{gid}/messages"),
                Some(token.trim()),
                Some(r#"{"text":"over gossip"}"#),
            );
            assert_eq!(code, 200, "{resp}");
            let v: Value = serde_json::from_str(&resp).expect("json");
            (gid.clone(), v["id"].as_str().expect("id").to_owned())
        })
        .collect();
    for (gid, id) in &sent {
        wait_messages(&b, gid, std::slice::from_ref(id));
    }
    assert_eq!(
        synced(),
        before,
        "messages reached B through catch-up, not gossip: B's subscriptions were ignored"
    );
}

/// Limits and bad input get clear errors and change nothing.
#[test]
fn limits_and_bad_input_are_refused_clearly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let gid = group_create(&a, "limits", &[]);
    let code_and_err = |args: &[&str]| {
        let out = a.cli(args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, err) = code_and_err(&["group", "create", &"n".repeat(65)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("name"), "{err}");

    let big = "x".repeat(64 * 1024 + 1);
    let (code, err) = code_and_err(&["group", "send", &gid, &big]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("65537 bytes exceeds 65536"), "{err}");
    // Exactly at the limit is fine.
    send(&a, &gid, &"y".repeat(64 * 1024));

    let (code, err) = code_and_err(&["group", "send", &"ab".repeat(32), "hi"]);
    assert_eq!(code, Some(1), "unknown group: {err}");
    let (code, err) = code_and_err(&["group", "send", "not-a-group", "hi"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a group id"), "{err}");
    let (code, err) = code_and_err(&["group", "add", &gid, "not-a-peer"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a peer id"), "{err}");

    // Nothing of that changed the group.
    assert_eq!(messages(&a, &gid).len(), 1);
    assert_eq!(a.json(&["group", "list"]).as_array().map(Vec::len), Some(1));
}

/// A file shared with a group: members fetch the plaintext; a non-member
/// with the id gets only ciphertext, and the name is in no manifest.
#[test]
fn file_shared_with_a_group_is_readable_by_members_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b, c) = three(tmp.path());
    let gid = group_create(&a, "files", &[&b.peer_id]);
    wait_group(&b, &gid);
    let secret: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let src = tmp.path().join("holiday-plans.bin");
    std::fs::write(&src, &secret).expect("write");
    let shared = a.json(&[
        "file",
        "share",
        src.to_str().expect("utf8"),
        "--group",
        &gid,
    ]);
    let fid = shared["file_id"].as_str().expect("file_id").to_owned();
    let mid = shared["message_id"]
        .as_str()
        .expect("message_id")
        .to_owned();

    // B sees the post (with the link) and can fetch the file.
    let on_b = wait_messages(&b, &gid, std::slice::from_ref(&mid));
    let post = on_b.iter().find(|m| m["id"] == mid.as_str()).expect("post");
    assert!(
        post["text"]
            .as_str()
            .expect("text")
            .contains(&format!("fogmesh-file:{fid}#"))
    );
    let out_b = tmp.path().join("b-copy");
    b.json(&["file", "get", &fid, "-o", out_b.to_str().expect("utf8")]);
    assert_eq!(std::fs::read(&out_b).expect("read"), secret);

    // C, not a member, fetches the same id: ciphertext only.
    let out_c = tmp.path().join("c-copy");
    c.json(&["file", "get", &fid, "-o", out_c.to_str().expect("utf8")]);
    let got = std::fs::read(&out_c).expect("read");
    // Sealed chunk by chunk: a 16-byte tag per 256 KiB chunk.
    assert_eq!(
        got.len(),
        secret.len() + 16 * secret.len().div_ceil(256 * 1024 - 16)
    );
    assert_ne!(got, secret);
    let same = got.iter().zip(&secret).filter(|(x, y)| x == y).count();
    assert!(
        same < secret.len() / 100,
        "{same} bytes equal: not encrypted?"
    );
    // The name is not in the public manifest.
    let st = c.json(&["file", "status", &fid]);
    assert!(st["name"].is_null(), "{st}");
    // Sending to a group this node is not in fails without sharing.
    let out = c.cli(&[
        "file",
        "share",
        src.to_str().expect("utf8"),
        "--group",
        &gid,
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--event-log`: the gossipsub-interop style NDJSON a node writes for
/// studies under Shadow: every wire copy, deliveries and publishes, peers
/// connecting.
#[test]
fn event_log_records_wire_copies_deliveries_and_publishes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a_log = tmp.path().join("a.ndjson");
    let b_log = tmp.path().join("b.ndjson");
    let a = Daemon::start(
        &tmp.path().join("a"),
        &["--event-log", a_log.to_str().expect("utf8")],
    );
    let boot = a.tcp_addr();
    let b = Daemon::start(
        &tmp.path().join("b"),
        &[
            "--bootstrap",
            &boot,
            "--event-log",
            b_log.to_str().expect("utf8"),
        ],
    );
    b.wait_connected(&a.peer_id, T);
    let gid = group_create(&a, "logged", &[&b.peer_id]);
    wait_group(&b, &gid);
    // Gossip needs B in A's view of the topic; a message sent before that
    // arrives through sync and is delivered without a wire copy.
    std::thread::sleep(Duration::from_secs(2));
    let id = send(&a, &gid, "for the log");
    wait_messages(&b, &gid, std::slice::from_ref(&id));
    let read = |p: &Path| -> Vec<Value> {
        std::fs::read_to_string(p)
            .expect("log")
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    };
    let has = |log: &[Value], msg: &str, id: &str| {
        log.iter()
            .any(|e| e["msg"] == msg && e["id"] == id && e["time"].is_string())
    };
    eventually(T, "B's log has the receipt and the delivery", || {
        let log = read(&b_log);
        (has(&log, "Received Message", &id) && has(&log, "Delivered Message", &id)).then_some(())
    });
    let a_events = read(&a_log);
    assert!(has(&a_events, "PeerID", &a.peer_id), "{a_events:?}");
    // Peers connecting, with who dialled: B dialled A.
    let connected = |log: &[Value], peer: &str, direction: &str| {
        log.iter()
            .any(|e| e["msg"] == "Peer Connected" && e["id"] == peer && e["direction"] == direction)
    };
    assert!(connected(&a_events, &b.peer_id, "inbound"), "{a_events:?}");
    assert!(connected(&read(&b_log), &a.peer_id, "outbound"));
    assert!(has(&a_events, "Published Message", &id), "{a_events:?}");
    assert!(
        !has(&a_events, "Delivered Message", &id),
        "own message logged as delivered"
    );
}

/// A stranger's group is an invitation: nothing of it syncs and it is not
/// listed until the user accepts; accepting makes it work, declining
/// removes it for good, and `--trust` accepts without asking.
#[test]
fn stranger_invitation_stays_pending_until_accepted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let boot = a.tcp_addr();
    let b = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &boot]);
    let c = Daemon::start(
        &tmp.path().join("c"),
        &["--bootstrap", &boot, "--trust", &a.peer_id],
    );
    b.wait_connected(&a.peer_id, T);
    c.wait_connected(&a.peer_id, T);
    let events = b.spawn_cli(&["events", "--json"]);

    let gid = group_create(&a, "pushed", &[&b.peer_id]);
    let first = send(&a, &gid, "are you there?");
    let inv = eventually(T, "B holds the invitation", || pending_invite(&b, &gid));
    assert_eq!(inv["name"], "pushed");
    assert_eq!(inv["inviter"], a.peer_id.as_str());
    assert_eq!(inv["via"], a.peer_id.as_str());
    assert!(inv["received"].as_u64().is_some_and(|t| t > 0), "{inv}");
    let got = read_json_lines(&events, |got| {
        got.iter().any(|e| e["type"] == "group_invite")
    });
    let ev = got
        .iter()
        .find(|e| e["type"] == "group_invite")
        .expect("a group_invite event");
    assert_eq!(ev["group_id"], gid.as_str());
    assert_eq!(ev["inviter"], a.peer_id.as_str());
    // Several sync rounds later: still only an invitation.
    std::thread::sleep(Duration::from_secs(5));
    assert!(!has_group(&b, &gid), "B joined without being asked");
    assert!(show(&b, &gid).is_none());
    let out = b.cli(&["group", "messages", &gid, "--json"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "B holds messages of a pending group"
    );
    assert!(pending_invite(&b, &gid).is_some());

    // Accepting joins, and the history arrives.
    let ack = b.json(&["group", "accept", &gid]);
    assert_eq!(ack["group_id"], gid.as_str());
    wait_group(&b, &gid);
    wait_messages(&b, &gid, std::slice::from_ref(&first));
    let reply = send(&b, &gid, "here now");
    wait_messages(&a, &gid, &[reply]);
    assert!(
        invites(&b).iter().all(|i| i["group_id"] != gid.as_str()),
        "the invitation outlived the join"
    );

    // Declining removes it, and the members' later summaries do not bring
    // it back.
    let other = group_create(&a, "unwanted", &[&b.peer_id]);
    eventually(T, "B holds the second invitation", || {
        pending_invite(&b, &other)
    });
    let ack = b.json(&["group", "decline", &other]);
    assert_eq!(ack["group_id"], other.as_str());
    std::thread::sleep(Duration::from_secs(5));
    assert!(invites(&b).iter().all(|i| i["group_id"] != other.as_str()));
    assert!(!has_group(&b, &other));
    // Nothing to accept or decline any more.
    assert_eq!(b.cli(&["group", "accept", &other]).status.code(), Some(1));
    assert_eq!(b.cli(&["group", "decline", &other]).status.code(), Some(1));

    // C trusts A: it joins at once, with no invitation.
    let trusted = group_create(&a, "trusted", &[&c.peer_id]);
    eventually(T, "C joins the trusted admin's group", || {
        has_group(&c, &trusted).then_some(())
    });
    assert!(invites(&c).is_empty());
}

/// A removed member still holds the key of the epoch it was removed from,
/// and could sign new messages in it for ever. After the removal, C's key
/// signs a next message in its old epoch and a peer with C's identity
/// gossips it to B: B refuses it (the `Remove` recorded C's last sequence
/// number) and never shows it.
#[test]
fn removed_member_new_message_in_old_epoch_is_refused() {
    use fogmesh_protocols::groups::crypto::{MessageContext, encrypt_message};
    use fogmesh_protocols::groups::{
        EnvelopeBody, Group, GroupId, Keypair, MessageId, SignedEnvelope, wire,
    };
    use libp2p::futures::StreamExt;
    use libp2p::gossipsub;
    use libp2p::swarm::SwarmEvent;

    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let b = Daemon::start(
        &tmp.path().join("b"),
        &["--bootstrap", &a.tcp_addr(), "--metrics", "127.0.0.1:0"],
    );
    let c_dir = tmp.path().join("c");
    let mut c = Daemon::start(&c_dir, &["--bootstrap", &a.tcp_addr()]);
    b.wait_connected(&a.peer_id, T);
    c.wait_connected(&a.peer_id, T);
    let metrics = b.metrics_addr().expect("metrics ready line");
    let gid = group_of_three(&a, &b, &c, "no ghosts");
    let last = send(&c, &gid, "my last words");
    for d in [&a, &b] {
        wait_messages(d, &gid, std::slice::from_ref(&last));
    }
    a.json(&["group", "remove", &gid, &c.peer_id]);
    eventually(T, "B sees C removed", || {
        (!members(&show(&b, &gid).expect("B shows the group")).contains(&c.peer_id)).then_some(())
    });
    assert!(c.terminate().0.success());
    drop(c);

    // What C holds: its identity and the group's genesis op (its database).
    let key = Keypair::from_protobuf_encoding(
        &std::fs::read(c_dir.join("identity.key")).expect("C's identity"),
    )
    .expect("identity");
    let group_id = GroupId(
        hex::decode(&gid)
            .expect("hex")
            .try_into()
            .expect("32 bytes"),
    );
    let genesis = {
        let db = redb::Database::open(c_dir.join("fogmesh.redb")).expect("C's database");
        let ops: redb::TableDefinition<(&[u8], u64), &[u8]> =
            redb::TableDefinition::new("group_ops");
        use redb::ReadableDatabase;
        let tx = db.begin_read().expect("read");
        let table = tx.open_table(ops).expect("group_ops");
        let bytes = table
            .get((group_id.0.as_slice(), 0))
            .expect("get")
            .expect("the genesis op")
            .value()
            .to_vec();
        wire::decode_op(&bytes).expect("genesis")
    };
    let group = Group::join(key.clone(), genesis).expect("join");
    let epoch_key = group
        .keys()
        .get(0)
        .expect("C holds the epoch-0 key")
        .clone();
    let sender = key.public().to_peer_id();
    let ctx = MessageContext {
        group_id: &group_id,
        epoch: 0,
        sender: &sender,
        seq: 2,
    };
    let mut rng: rand::rngs::StdRng = rand::make_rng();
    let marker = format!("ghost-{}", unique());
    let body = EnvelopeBody {
        group_id,
        epoch: 0,
        sender,
        seq: 2,
        deps: vec![MessageId(
            hex::decode(&last)
                .expect("hex")
                .try_into()
                .expect("32 bytes"),
        )],
        timestamp_ms: now_ms(),
        ciphertext: encrypt_message(&mut rng, &epoch_key, &ctx, marker.as_bytes())
            .expect("encrypt"),
    };
    let env = SignedEnvelope::sign(&key, body).expect("sign");
    let frame = fogmesh_protocols::groups::gossip::encode_gossip_message(&env);

    // A peer with C's identity gossips it to B.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let addr: libp2p::Multiaddr = b.tcp_addr().parse().expect("multiaddr");
    let b_peer: libp2p::PeerId = b.peer_id.parse().expect("B's peer id");
    let topic = gossipsub::IdentTopic::new(fogmesh_protocols::groups::topic(&group_id));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    rt.spawn(async move {
        let fail = |e: String| {
            let _ = ready_tx.send(Err(e));
        };
        let mut swarm = match rogue_swarm(key) {
            Ok(s) => s,
            Err(e) => return fail(format!("building the swarm: {e}")),
        };
        if let Err(e) = swarm.behaviour_mut().subscribe(&topic) {
            return fail(format!("subscribe: {e}"));
        }
        if let Err(e) = swarm.dial(addr) {
            return fail(format!("dial B: {e}"));
        }
        let deadline = tokio::time::Instant::now() + T;
        loop {
            match tokio::time::timeout_at(deadline, swarm.select_next_some()).await {
                Err(_) => return fail("B never subscribed to the group topic".into()),
                Ok(SwarmEvent::OutgoingConnectionError { error, .. }) => {
                    return fail(format!("cannot connect to B: {error}"));
                }
                Ok(SwarmEvent::Behaviour(gossipsub::Event::Subscribed {
                    peer_id,
                    topic: t,
                    ..
                })) if peer_id == b_peer && t == topic.hash() => break,
                Ok(_) => {}
            }
        }
        let sent = swarm.behaviour_mut().publish(topic.clone(), frame);
        let _ = ready_tx.send(sent.map(|_| ()).map_err(|e| format!("publish: {e}")));
        loop {
            swarm.select_next_some().await;
        }
    });
    match ready_rx.recv_timeout(T + Duration::from_secs(30)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("C's ghost: {e}"),
        Err(_) => panic!("C's ghost ended without reporting"),
    }
    eventually(T, "B rejects the removed member's message", || {
        let (code, body) = http(&metrics, "GET", "/metrics", None, None);
        (code == 200)
            .then(|| metric_sum(&body, "fogmesh_group_messages_rejected_total"))
            .flatten()
            .filter(|n| *n >= 1.0)
    });
    // And a sync round later, it is nowhere.
    std::thread::sleep(Duration::from_secs(3));
    for d in [&a, &b] {
        assert!(
            !texts(&messages(d, &gid)).contains(&marker),
            "{} shows the removed member's new message",
            d.peer_id
        );
    }
    rt.shutdown_background();
}

#[test]
fn group_members_stay_connected_past_the_idle_timeout() {
    // A did not ask for B, and both close idle connections after 1 s:
    // what holds their link open is the group's gossip mesh.
    let tmp = tempfile::tempdir().expect("tempdir");
    let idle = ["--idle-timeout-secs", "1"];
    let a = Daemon::start(&tmp.path().join("a"), &idle);
    let a_addr = a.tcp_addr();
    let b_args = [&idle[..], &["--bootstrap", a_addr.as_str()]].concat();
    let b = Daemon::start(&tmp.path().join("b"), &b_args);
    b.wait_connected(&a.peer_id, T);
    let gid = group_create(&a, "held", &[&b.peer_id]);
    wait_group(&b, &gid);
    // The mesh is grafted at gossipsub's next heartbeat (1 s).
    eventually(T, "A and B connected with the group", || {
        (a.connected_peers().contains(&b.peer_id) && b.connected_peers().contains(&a.peer_id))
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let events = a.spawn_cli(&["events", "--json"]);
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Some(line) = events.next_line(left) else {
            break;
        };
        seen.push(serde_json::from_str::<Value>(&line).expect("an event as JSON"));
    }
    assert!(
        !seen
            .iter()
            .any(|e| e["type"] == "peer_disconnected" && e["peer_id"] == b.peer_id.as_str()),
        "six idle timeouts without a message, the link holds: {seen:?}"
    );
    assert!(a.connected_peers().contains(&b.peer_id));
    // And it still carries the group's messages.
    send(&b, &gid, "still here");
    eventually(T, "A has B's message", || {
        (messages(&a, &gid).iter().any(|m| m["text"] == "still here")).then_some(())
    });
}
