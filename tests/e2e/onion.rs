//! The onion route: private messages through Sphinx mix relays, real
//! daemons on loopback. Mix nodes run with `--mix`; every node bootstraps
//! off the mix nodes so descriptors spread at once.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::util::{Daemon, eventually, files_containing, http, metric_sum};

const T: Duration = Duration::from_secs(120);
/// The relays log each packet they queue (predecessor, successor, delay)
/// at debug level.
const RELAY_LOG: &str = "info,libp2p_mdns=off,fogmesh::onion=debug";

/// The sum of a metric on a daemon started with `--metrics`.
fn metric(d: &Daemon, name: &str) -> f64 {
    let addr = d.metrics_addr().expect("metrics ready line");
    let (code, body) = http(&addr, "GET", "/metrics", None, None);
    assert_eq!(code, 200, "GET /metrics: {body}");
    metric_sum(&body, name).unwrap_or(0.0)
}

/// A mix node bootstrapping off `others`.
fn mix(dir: &std::path::Path, others: &[&Daemon], delay_ms: &str) -> Daemon {
    let mut args = vec![
        "--mix",
        "--mix-delay-ms",
        delay_ms,
        "--metrics",
        "127.0.0.1:0",
    ];
    let addrs: Vec<String> = others.iter().map(|d| d.tcp_addr()).collect();
    for a in &addrs {
        args.push("--bootstrap");
        args.push(a);
    }
    Daemon::start_logging(dir, &args, RELAY_LOG)
}

/// A plain node bootstrapping off `others`, with `extra` flags (and the
/// onion route's debug log, shown if the test fails).
fn node(dir: &std::path::Path, others: &[&Daemon], extra: &[&str]) -> Daemon {
    let addrs: Vec<String> = others.iter().map(|d| d.tcp_addr()).collect();
    let mut args: Vec<&str> = extra.to_vec();
    for a in &addrs {
        args.push("--bootstrap");
        args.push(a);
    }
    Daemon::start_logging(dir, &args, RELAY_LOG)
}

/// `send PEER TEXT --private`; the message id.
fn send_private(d: &Daemon, to: &str, text: &str) -> String {
    let v = d.json(&["send", to, text, "--private"]);
    assert_eq!(v["route_plan"], serde_json::json!(["onion"]), "{v}");
    v["message_id"].as_str().expect("message_id").to_owned()
}

/// The outgoing message `id` of `d`.
fn outgoing(d: &Daemon, id: &str) -> Option<Value> {
    let m = d.json(&["messages", "--limit", "1000"]);
    m.as_array()?.iter().find(|m| m["id"] == id).cloned()
}

fn wait_delivered(d: &Daemon, id: &str) -> Value {
    eventually(T, &format!("message {id} delivered"), || {
        outgoing(d, id).filter(|m| m["state"] == "delivered")
    })
}

/// Texts `d` received from `from`.
fn received(d: &Daemon, from: &str) -> Vec<String> {
    d.json_or_nothing(&["messages", from])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|m| m["direction"] == "in")
        .map(|m| m["text"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// `s` without ANSI colour sequences.
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// The (from, to) pairs a relay logged for the packets it queued.
fn relay_hops(d: &Daemon) -> Vec<(String, String)> {
    plain(&d.stderr())
        .lines()
        .filter(|l| l.contains("mix: queued a packet"))
        .filter_map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .map(str::to_owned)
            };
            Some((field("from=")?, field("to=")?))
        })
        .collect()
}

/// Waits until the outbox reason of `id` contains `want`.
fn wait_reason(d: &Daemon, id: &str, want: &str) -> String {
    eventually(T, &format!("message {id} waits with {want:?}"), || {
        let why = outgoing(d, id)?["waiting"].as_str()?.to_owned();
        why.contains(want).then_some(why)
    })
}

#[test]
fn a_private_message_waits_for_three_mixes_then_crosses_them_and_the_surb_ack_delivers_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let m1 = mix(&tmp.path().join("m1"), &[], "20");
    let m2 = mix(&tmp.path().join("m2"), &[&m1], "20");
    // The sender's test hook also sends its first packet as a replay and
    // once tampered: the first relay must drop and count both.
    let s = node(
        &tmp.path().join("s"),
        &[&m1, &m2],
        &["--onion-test-replay-tamper"],
    );
    let r = node(&tmp.path().join("r"), &[&m1, &m2], &[]);
    s.wait_connected(&m1.peer_id, T);
    r.wait_connected(&m2.peer_id, T);

    // Two mix nodes: the path needs three, so the message waits, saying so.
    let text = "meet at the old mill";
    let id = send_private(&s, &r.peer_id, text);
    wait_reason(
        &s,
        &id,
        "waiting for onion mix nodes: 2 known, the path needs 3",
    );
    assert_eq!(outgoing(&s, &id).expect("queued")["state"], "queued");

    // A third mix node comes up: its descriptor reaches the sender, the
    // message goes, and the recipient's SURB acknowledgement delivers it.
    let m3 = mix(&tmp.path().join("m3"), &[&m1, &m2], "20");
    let mixes = [&m1, &m2, &m3];
    let m = wait_delivered(&s, &id);
    assert_eq!(m["route"], "onion", "{m}");
    eventually(T, "the recipient has it", || {
        (received(&r, &s.peer_id) == [text]).then_some(())
    });

    // The replayed and the tampered copy died at the first relay.
    eventually(T, "replay and tamper counted", || {
        let replays: f64 = mixes
            .iter()
            .map(|d| metric(d, "fogmesh_onion_replays_dropped_total"))
            .sum();
        let tampered: f64 = mixes
            .iter()
            .map(|d| metric(d, "fogmesh_onion_tampered_dropped_total"))
            .sum();
        (replays >= 1.0 && tampered >= 1.0).then_some(())
    });
    let first: Vec<&&Daemon> = mixes
        .iter()
        .filter(|d| metric(d, "fogmesh_onion_replays_dropped_total") >= 1.0)
        .collect();
    assert_eq!(first.len(), 1, "one first relay");
    assert!(metric(first[0], "fogmesh_onion_tampered_dropped_total") >= 1.0);
    // It learnt the packet from the sender: it was the first hop.
    assert!(
        relay_hops(first[0])
            .iter()
            .any(|(from, _)| *from == s.peer_id),
        "{:?}",
        relay_hops(first[0])
    );

    // Each relay saw a predecessor and a successor, never both ends of
    // the conversation; none holds the text.
    let ends: HashSet<&str> = [s.peer_id.as_str(), r.peer_id.as_str()].into();
    let mut relayed = 0;
    for d in mixes {
        for (from, to) in relay_hops(d) {
            relayed += 1;
            assert!(
                !(ends.contains(from.as_str()) && ends.contains(to.as_str())),
                "a relay saw both ends: {from} -> {to}"
            );
            assert_ne!(from, to);
        }
        assert!(!d.stderr().contains(text));
        assert!(files_containing(&d.data_dir, text.as_bytes()).is_empty());
    }
    // Three hops there (fragment) and three back (the acknowledgement).
    assert!(relayed >= 6, "{relayed} packets relayed");
}

#[test]
fn a_relay_killed_mid_path_makes_the_message_retry_on_another_path_and_arrive_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Long mixing delays, so that a packet can be caught in a relay.
    let delay = "1500";
    let m1 = mix(&tmp.path().join("m1"), &[], delay);
    let m2 = mix(&tmp.path().join("m2"), &[&m1], delay);
    let m3 = mix(&tmp.path().join("m3"), &[&m1, &m2], delay);
    let m4 = mix(&tmp.path().join("m4"), &[&m1, &m2, &m3], delay);
    let timeout = ["--message-timeout-secs", "4", "--mix-delay-ms", delay];
    let s = node(&tmp.path().join("s"), &[&m1, &m2, &m3, &m4], &timeout);
    let r = node(&tmp.path().join("r"), &[&m1, &m2, &m3, &m4], &timeout);
    let mut mixes = vec![m1, m2, m3, m4];
    for m in &mixes {
        s.wait_connected(&m.peer_id, T);
        r.wait_connected(&m.peer_id, T);
    }
    // Descriptors: the sender knows the four mixes and the recipient.
    let text = "the relay dies";
    let id = send_private(&s, &r.peer_id, text);
    // The relay holding the packet now (it read more than it passed on).
    let holder = eventually(T, "a relay holds the packet", || {
        mixes.iter().position(|d| {
            metric(d, "fogmesh_onion_packets_received_total")
                > metric(d, "fogmesh_onion_packets_relayed_total")
        })
    });
    let mut dead = mixes.remove(holder);
    dead.kill9();

    let m = wait_delivered(&s, &id);
    let attempts = m["attempts"].as_array().expect("attempts");
    assert!(attempts.len() >= 2, "a retry on another path: {m}");
    assert!(attempts.iter().all(|a| a["route"] == "onion"), "{m}");
    // Exactly once, even if an earlier attempt were late.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(received(&r, &s.peer_id), [text]);
}
