//! Direct messages: a route per message, receipts, the durable outbox,
//! order and exactly-once delivery across restarts and `kill -9`, BLE
//! across hops, and gateways between BLE-only and internet-only peers.

use std::time::Duration;

use serde_json::Value;

use crate::ble::{Medium, ble_peers, offline, wait_ble_link};
use crate::util::{Daemon, eventually, files_containing};

const T: Duration = Duration::from_secs(90);

/// `send PEER TEXT [extra]`; returns the JSON answer.
fn send(d: &Daemon, to: &str, text: &str, extra: &[&str]) -> Value {
    let mut args = vec!["send", to, text];
    args.extend_from_slice(extra);
    let v = d.json(&args);
    let id = v["message_id"].as_str().expect("message_id");
    assert_eq!(id.len(), 32, "message id {id:?}");
    v
}

/// Sends each of `texts` in turn; their message ids.
fn send_all(d: &Daemon, to: &str, texts: &[String]) -> Vec<String> {
    texts
        .iter()
        .map(|t| {
            send(d, to, t, &[])["message_id"]
                .as_str()
                .expect("id")
                .to_owned()
        })
        .collect()
}

/// `messages [PEER]` (empty when none).
fn messages(d: &Daemon, peer: Option<&str>) -> Vec<Value> {
    let mut args = vec!["messages"];
    args.extend(peer);
    d.json_or_nothing(&args)
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Texts received by `d` from `from`, in delivery order.
fn received(d: &Daemon, from: &str) -> Vec<String> {
    messages(d, Some(from))
        .iter()
        .filter(|m| m["direction"] == "in")
        .map(|m| m["text"].as_str().expect("text").to_owned())
        .collect()
}

/// Waits until `d` has received exactly `want` from `from`.
fn wait_received(d: &Daemon, from: &str, want: &[String]) {
    eventually(T, &format!("{} receives {want:?}", d.peer_id), || {
        (received(d, from) == want).then_some(())
    });
}

/// Waits until the outgoing message `id` of `d` is delivered; returns it.
fn wait_delivered(d: &Daemon, id: &str) -> Value {
    eventually(T, &format!("message {id} delivered"), || {
        let m = d.json(&["messages", "--limit", "1000"]);
        m.as_array()?
            .iter()
            .find(|m| m["id"] == id && m["state"] == "delivered")
            .cloned()
    })
}

fn texts(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix} {i}")).collect()
}

#[test]
fn a_message_over_the_internet_is_delivered_with_a_receipt() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let b = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &a.tcp_addr()]);
    b.wait_connected(&a.peer_id, T);

    let ack = send(&a, &b.peer_id, "hello bob", &[]);
    // The onion route is the last failover of an ordinary message.
    assert_eq!(ack["route_plan"], serde_json::json!(["internet", "onion"]));
    let id = ack["message_id"].as_str().expect("id").to_owned();
    let m = wait_delivered(&a, &id);
    assert_eq!(m["route"], "internet");
    assert_eq!(m["direction"], "out");
    assert_eq!(m["to"], b.peer_id.as_str());
    assert_eq!(m["from"], a.peer_id.as_str());
    let attempts = m["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.last().expect("one")["outcome"], "delivered");
    wait_received(&b, &a.peer_id, &["hello bob".to_owned()]);
    let got = &messages(&b, Some(&a.peer_id))[0];
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["from"], a.peer_id.as_str());
    assert!(got["timestamp"].as_u64().expect("timestamp") > 0);

    // The reply, and one conversation on each side in delivery order.
    let reply = send(&b, &a.peer_id, "hi alice", &[]);
    wait_delivered(&b, reply["message_id"].as_str().expect("id"));
    let conv: Vec<(String, String)> = messages(&a, Some(&b.peer_id))
        .iter()
        .map(|m| {
            (
                m["direction"].as_str().unwrap_or("").to_owned(),
                m["text"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        conv,
        vec![
            ("out".to_owned(), "hello bob".to_owned()),
            ("in".to_owned(), "hi alice".to_owned())
        ]
    );
    // Nothing waits any more.
    assert_eq!(a.cli(&["outbox"]).status.code(), Some(1));
    // GET /v1/messages/{id}.
    assert_eq!(a.json(&["messages", "--limit", "1"])[0]["text"], "hi alice");
}

#[test]
fn bad_sends_are_refused_clearly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let out = a.cli(&["send", "not-a-peer", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a peer id"));
    let out = a.cli(&["send", &a.peer_id, "x"]);
    assert_eq!(out.status.code(), Some(2));
    let big = "x".repeat(64 * 1024 + 1);
    let other = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &a.tcp_addr()]);
    other.wait_connected(&a.peer_id, T);
    let out = a.cli(&["send", &other.peer_id, &big]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exceeds the limit"));
    // --private with a route that is not private is a contradiction.
    let out = a.cli(&[
        "send",
        &other.peer_id,
        "x",
        "--route",
        "internet",
        "--private",
    ]);
    assert_eq!(out.status.code(), Some(2));
    // No radio: a forced BLE route waits for it (and says why) rather than
    // go by the internet, which is up.
    let v = send(&a, &other.peer_id, "by radio only", &["--route", "ble"]);
    assert_eq!(v["route_plan"], serde_json::json!([]));
    assert!(v["waiting"].as_str().expect("waiting").contains("--ble"));
    // Private: onion only, and with no mix nodes known it waits and says
    // why (tests/e2e/onion.rs covers the route itself).
    let v = send(&a, &other.peer_id, "secret", &["--private"]);
    assert_eq!(v["route_plan"], serde_json::json!(["onion"]));
    let why = eventually(T, "the private message's reason", || {
        let outbox = a.json(&["outbox"]);
        let o = outbox.as_array()?;
        (o.len() == 2 && o[1]["state"] == "queued")
            .then(|| o[1]["waiting"].as_str().map(str::to_owned))
            .flatten()
    });
    assert!(why.contains("onion mix nodes: 0 known"), "{why}");
    // Neither went anywhere, though the internet is up to the peer.
    std::thread::sleep(Duration::from_secs(2));
    assert!(received(&other, &a.peer_id).is_empty());
}

#[test]
fn messages_to_a_stopped_peer_arrive_once_and_in_order_after_it_returns() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let b_dir = tmp.path().join("b");
    let mut b = Daemon::start(&b_dir, &["--bootstrap", &a.tcp_addr()]);
    b.wait_connected(&a.peer_id, T);
    let b_id = b.peer_id.clone();
    b.terminate();

    let want = texts("while you were away", 10);
    let ids = send_all(&a, &b_id, &want);
    // All ten wait in the outbox, in order.
    let outbox = a.json(&["outbox"]);
    let waiting: Vec<&str> = outbox
        .as_array()
        .expect("outbox")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    assert_eq!(waiting, ids.iter().map(String::as_str).collect::<Vec<_>>());

    let b = Daemon::start(&b_dir, &["--bootstrap", &a.tcp_addr()]);
    wait_received(&b, &a.peer_id, &want);
    for id in &ids {
        wait_delivered(&a, id);
    }
    // And nothing more arrives later (no duplicate from a retry).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(received(&b, &a.peer_id), want);
}

#[test]
fn a_message_acknowledged_before_kill_9_is_still_delivered() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let b_dir = tmp.path().join("b");
    let mut b = Daemon::start(&b_dir, &[]);
    let b_id = b.peer_id.clone();
    b.terminate();
    let a_dir = tmp.path().join("a");
    let mut a = Daemon::start(&a_dir, &[]);
    let want = texts("durable", 3);
    let ids = send_all(&a, &b_id, &want);
    a.kill9();

    let b = Daemon::start(&b_dir, &[]);
    let a = Daemon::start(&a_dir, &["--bootstrap", &b.tcp_addr()]);
    wait_received(&b, &a.peer_id, &want);
    for id in &ids {
        wait_delivered(&a, id);
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(received(&b, &a.peer_id), want, "delivered once each");
}

#[test]
fn five_offline_daemons_in_a_line_message_across_four_hops() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let medium = Medium::start(tmp.path(), &["--range", "12"]);
    let nodes: Vec<Daemon> = (0..5)
        .map(|i| {
            offline(
                &tmp.path().join(format!("n{i}")),
                &medium,
                &format!("{},0", i * 10),
            )
        })
        .collect();
    for w in nodes.windows(2) {
        wait_ble_link(&w[0], &w[1]);
    }
    let (first, last) = (&nodes[0], &nodes[4]);
    assert!(!ble_peers(first).contains(&last.peer_id));

    let secret_west = "a secret from the west end";
    let v = send(first, &last.peer_id, secret_west, &[]);
    assert_eq!(v["route_plan"], serde_json::json!(["ble"]));
    wait_received(last, &first.peer_id, &[secret_west.to_owned()]);
    let m = wait_delivered(first, v["message_id"].as_str().expect("id"));
    assert_eq!(m["route"], "ble");

    let secret_east = "a secret from the east end";
    let v = send(last, &first.peer_id, secret_east, &[]);
    wait_received(first, &last.peer_id, &[secret_east.to_owned()]);
    wait_delivered(last, v["message_id"].as_str().expect("id"));

    // The nodes in between carried both and can read neither: nothing of
    // the texts in their data directories, nothing in their conversations.
    for mid in &nodes[1..4] {
        assert!(
            messages(mid, None).is_empty(),
            "{} has messages",
            mid.peer_id
        );
        for needle in [secret_west, secret_east] {
            let hits = files_containing(&mid.data_dir, needle.as_bytes());
            assert!(hits.is_empty(), "{needle:?} found in {hits:?}");
        }
    }
}

#[test]
fn a_gateway_carries_messages_between_ble_only_and_internet_only_peers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let medium = Medium::start(tmp.path(), &[]);
    let gw_args: Vec<String> = crate::util::loopback_args()
        .into_iter()
        .chain(
            ["--ble", &medium.arg(), "--ble-position", "0,0"]
                .iter()
                .map(|s| s.to_string()),
        )
        .collect();
    let gw = Daemon::start_with(&tmp.path().join("gw"), &gw_args);
    let off = offline(&tmp.path().join("off"), &medium, "5,0");
    wait_ble_link(&gw, &off);
    let net = Daemon::start(&tmp.path().join("net"), &["--bootstrap", &gw.tcp_addr()]);
    net.wait_connected(&gw.peer_id, T);

    // Nothing configured: the BLE-only node writes to the internet peer...
    let v = send(&off, &net.peer_id, "from the radio side", &[]);
    assert_eq!(v["route_plan"], serde_json::json!(["ble"]));
    wait_received(&net, &off.peer_id, &["from the radio side".to_owned()]);
    wait_delivered(&off, v["message_id"].as_str().expect("id"));
    // ...and gets the reply.
    let v = send(&net, &off.peer_id, "from the internet side", &[]);
    wait_received(&off, &net.peer_id, &["from the internet side".to_owned()]);
    let m = wait_delivered(&net, v["message_id"].as_str().expect("id"));
    assert_eq!(m["route"], "internet");
    // The gateway holds neither conversation.
    assert!(messages(&gw, None).is_empty());
}

/// Outgoing messages of `d` to `to`: (text, state, route), in order.
fn outgoing(d: &Daemon, to: &str) -> Vec<(String, String, String)> {
    messages(d, Some(to))
        .iter()
        .filter(|m| m["direction"] == "out")
        .map(|m| {
            let s = |k: &str| m[k].as_str().unwrap_or("").to_owned();
            (s("text"), s("state"), s("route"))
        })
        .collect()
}

/// Waits until every outgoing message of `d` to `to` is delivered;
/// returns their routes in order.
fn wait_all_delivered(d: &Daemon, to: &str, n: usize) -> Vec<String> {
    eventually(T, &format!("{n} messages delivered"), || {
        let out = outgoing(d, to);
        (out.len() == n && out.iter().all(|(_, s, _)| s == "delivered"))
            .then(|| out.into_iter().map(|(_, _, r)| r).collect())
    })
}

#[test]
fn a_conversation_fails_over_to_ble_when_the_internet_link_dies_and_back() {
    let Some(mut net) = crate::nat::Net::new("failover") else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let medium = Medium::start(tmp.path(), &[]);
    let ns_a = net.ns("a");
    let ns_b = net.ns("b");
    net.link(
        &ns_a,
        "va",
        Some("10.77.0.1/24"),
        &ns_b,
        "vb",
        "10.77.0.2/24",
    );
    let args = |addr: &str, pos: &str, extra: &[String]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--listen",
            &format!("/ip4/{addr}/tcp/4001"),
            "--api",
            "127.0.0.1:0",
            "--no-mdns",
            "--ble",
            &medium.arg(),
            "--ble-position",
            pos,
            "--message-timeout-secs",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend_from_slice(extra);
        v
    };
    let a = Daemon::start_in_netns(&ns_a, &tmp.path().join("a"), &args("10.77.0.1", "0,0", &[]));
    let b = Daemon::start_in_netns(
        &ns_b,
        &tmp.path().join("b"),
        &args(
            "10.77.0.2",
            "5,0",
            &[
                "--bootstrap".into(),
                format!("/ip4/10.77.0.1/tcp/4001/p2p/{}", a.peer_id),
            ],
        ),
    );
    b.wait_connected(&a.peer_id, T);

    // 1. The internet is up: the conversation goes over it.
    let mut to_b: Vec<String> = Vec::new();
    let mut to_a: Vec<String> = Vec::new();
    for i in 1..=3 {
        to_b.push(format!("a->b {i}"));
        send(&a, &b.peer_id, to_b.last().expect("text"), &[]);
    }
    to_a.push("b->a 1".into());
    send(&b, &a.peer_id, &to_a[0], &[]);
    wait_received(&b, &a.peer_id, &to_b);
    wait_received(&a, &b.peer_id, &to_a);
    let routes = wait_all_delivered(&a, &b.peer_id, 3);
    assert!(routes.iter().all(|r| r == "internet"), "{routes:?}");

    // 2. The cable is cut: the messages sent now go by BLE, once each, in
    // order.
    crate::nat::ip(&["-n", &ns_a, "link", "set", "va", "down"]);
    for i in 4..=6 {
        to_b.push(format!("a->b {i}"));
        send(&a, &b.peer_id, to_b.last().expect("text"), &[]);
    }
    to_a.push("b->a 2".into());
    send(&b, &a.peer_id, &to_a[1], &[]);
    wait_received(&b, &a.peer_id, &to_b);
    wait_received(&a, &b.peer_id, &to_a);
    let routes = wait_all_delivered(&a, &b.peer_id, 6);
    assert_eq!(&routes[3..], ["ble", "ble", "ble"], "{routes:?}");
    assert_eq!(wait_all_delivered(&b, &a.peer_id, 2)[1], "ble");

    // 3. The cable is back: the internet carries the conversation again
    // (the first messages after may still go by BLE while the nodes
    // reconnect).
    crate::nat::ip(&["-n", &ns_a, "link", "set", "va", "up"]);
    let mut n = 6;
    eventually(T, "a message delivered over the internet again", || {
        n += 1;
        to_b.push(format!("a->b {n}"));
        send(&a, &b.peer_id, to_b.last().expect("text"), &[]);
        let routes = wait_all_delivered(&a, &b.peer_id, n);
        (routes[n - 1] == "internet").then_some(())
    });
    wait_received(&b, &a.peer_id, &to_b);
    // Nothing twice, nothing out of order, on either side.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(received(&b, &a.peer_id), to_b);
    assert_eq!(received(&a, &b.peer_id), to_a);
}

#[test]
fn an_undeliverable_message_expires_and_follow_shows_each_change() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let gone = Daemon::start(&tmp.path().join("gone"), &[]);
    let gone_id = gone.peer_id.clone();
    drop(gone);
    let a = Daemon::start(&tmp.path().join("a"), &["--message-lifetime-secs", "3"]);
    let follow = a.spawn_cli(&["messages", "--follow", "--json"]);
    let v = send(&a, &gone_id, "into the void", &[]);
    let id = v["message_id"].as_str().expect("id").to_owned();
    let m = eventually(T, "the message expires", || {
        let m = a.json(&["messages", &gone_id]);
        (m[0]["state"] == "expired").then(|| m[0].clone())
    });
    assert_eq!(m["id"], id.as_str());
    assert!(!m["attempts"].as_array().expect("attempts").is_empty());
    assert_eq!(a.cli(&["outbox"]).status.code(), Some(1));
    // --follow printed it queued, then expired.
    let mut states = Vec::new();
    while let Some(line) = follow.next_line(Duration::from_secs(10)) {
        let m: Value = serde_json::from_str(&line).expect("a JSON line");
        assert_eq!(m["id"], id.as_str());
        states.push(m["state"].as_str().expect("state").to_owned());
        if states.last().map(String::as_str) == Some("expired") {
            break;
        }
    }
    assert_eq!(states.first().map(String::as_str), Some("queued"));
    assert_eq!(states.last().map(String::as_str), Some("expired"));
}

#[test]
fn a_peer_known_only_through_the_dht_is_found_and_dialled() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let hub = Daemon::start(&tmp.path().join("hub"), &[]);
    let a = Daemon::start(&tmp.path().join("a"), &["--bootstrap", &hub.tcp_addr()]);
    let b = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &hub.tcp_addr()]);
    a.wait_connected(&hub.peer_id, T);
    b.wait_connected(&hub.peer_id, T);
    // A was never told B's address; the DHT (through the hub) knows it.
    let v = send(&a, &b.peer_id, "found you", &[]);
    wait_received(&b, &a.peer_id, &["found you".to_owned()]);
    let m = wait_delivered(&a, v["message_id"].as_str().expect("id"));
    assert_eq!(m["route"], "internet");
    assert!(a.connected_peers().contains(&b.peer_id));
}
