//! The node itself: start, discovery, restart, the API's guard, the CLI's
//! exit codes.

use std::time::Duration;

use serde_json::Value;

use crate::util::{Daemon, eventually, fogmesh, free_port, http};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn status_reports_what_the_ready_lines_said() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    assert!(a.peer_id.starts_with("12D3Koo"), "peer id {}", a.peer_id);
    assert!(a.listen.iter().any(|l| l.contains("/tcp/")));
    assert!(a.listen.iter().any(|l| l.contains("/quic-v1")));

    let s = a.json(&["status"]);
    assert_eq!(s["peer_id"], a.peer_id.as_str());
    assert_eq!(s["api_addr"], a.api.as_str());
    assert_eq!(s["connected_peers"], 0);
    let listen: Vec<&str> = s["listen_addrs"]
        .as_array()
        .expect("listen_addrs")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for l in &a.listen {
        assert!(listen.contains(&l.as_str()), "{l} missing from {listen:?}");
    }
    // `id` agrees with the daemon, and `peers` with nobody connected is
    // "nothing found".
    assert_eq!(a.json(&["id"])["peer_id"], a.peer_id.as_str());
    let out = a.cli(&["peers", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).expect("json"),
        serde_json::json!([])
    );
}

#[test]
fn third_node_finds_the_first_through_kademlia() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let b = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &a.tcp_addr()]);
    b.wait_connected(&a.peer_id, CONNECT_TIMEOUT);
    // C knows only B; A's address can only come from B's DHT.
    let c = Daemon::start(&tmp.path().join("c"), &["--bootstrap", &b.quic_addr()]);
    c.wait_connected(&b.peer_id, CONNECT_TIMEOUT);
    c.wait_connected(&a.peer_id, CONNECT_TIMEOUT);

    let peers = c.json(&["peers"]);
    let entry = peers
        .as_array()
        .expect("array")
        .iter()
        .find(|p| p["peer_id"] == b.peer_id.as_str())
        .expect("B listed")
        .clone();
    assert_eq!(entry["transport"], "quic");
    assert!(!entry["addrs"].as_array().expect("addrs").is_empty());
    assert!(c.json(&["status"])["connected_peers"].as_u64().expect("n") >= 2);
}

/// The first node of a network starts without a warning: none of what it
/// logs at start calls for the operator.
#[test]
fn a_node_started_alone_logs_no_warning() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The daemon's own log filter, not the tests' one.
    let a = Daemon::start_logging(&tmp.path().join("a"), &[], "");
    // Kademlia's own bootstrap attempt comes 0.5 s after the listeners.
    std::thread::sleep(Duration::from_secs(2));
    let err = a.stderr();
    let warnings: Vec<&str> = (err.lines())
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
    assert!(err.contains(" INFO "), "{err}");
}

#[test]
fn restarted_node_keeps_its_id_and_reconnects_without_bootstrap() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let b_dir = tmp.path().join("b");
    let mut b = Daemon::start(&b_dir, &["--bootstrap", &a.tcp_addr()]);
    b.wait_connected(&a.peer_id, CONNECT_TIMEOUT);
    let b_id = b.peer_id.clone();

    let (status, took) = b.terminate();
    assert!(status.success(), "SIGTERM exit status {status}");
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    assert!(
        !b_dir.join("api.json").exists(),
        "api.json left after a clean stop"
    );
    eventually(CONNECT_TIMEOUT, "A notices B left", || {
        (!a.connected_peers().contains(&b_id)).then_some(())
    });

    let b2 = Daemon::start(&b_dir, &[]);
    assert_eq!(b2.peer_id, b_id, "identity changed across a restart");
    b2.wait_connected(&a.peer_id, CONNECT_TIMEOUT);
    a.wait_connected(&b_id, CONNECT_TIMEOUT);
}

#[test]
fn identity_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    for f in ["identity.key", "api.token", "api.json"] {
        let mode = std::fs::metadata(a.data_dir.join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f} has mode {:o}", mode & 0o777);
    }
}

#[test]
fn api_refuses_requests_without_the_token() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let token = std::fs::read_to_string(a.data_dir.join("api.token")).expect("token");

    for path in ["/v1/status", "/v1/peers", "/v1/health", "/v1/events"] {
        let (code, body) = http(&a.api, "GET", path, None, None);
        assert_eq!(code, 401, "{path} without a token");
        let v: Value = serde_json::from_str(&body).expect("JSON error body");
        assert!(v["error"].as_str().expect("error").contains("token"));
        let (code, _) = http(&a.api, "GET", path, Some("wrong"), None);
        assert_eq!(code, 401, "{path} with a wrong token");
    }
    let (code, body) = http(&a.api, "GET", "/v1/status", Some(token.trim()), None);
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json")["peer_id"],
        a.peer_id.as_str()
    );

    // Bad input through the API is a JSON error, and the node carries on.
    let (code, body) = http(
        &a.api,
        "POST",
        "/v1/connect",
        Some(token.trim()),
        Some(r#"{"addr":"nope"}"#),
    );
    assert_eq!(code, 400);
    assert!(serde_json::from_str::<Value>(&body).expect("json")["error"].is_string());
    let (code, _) = http(
        &a.api,
        "POST",
        "/v1/connect",
        Some(token.trim()),
        Some("{not json"),
    );
    assert_eq!(code, 400);
    let (code, _) = http(&a.api, "GET", "/v1/nothing-here", Some(token.trim()), None);
    assert_eq!(code, 404);
    assert_eq!(a.json(&["status"])["peer_id"], a.peer_id.as_str());
}

#[test]
fn bad_arguments_exit_2_with_a_clear_message() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("x");
    let run = |args: &[&str]| {
        fogmesh()
            .arg("--data-dir")
            .arg(&dir)
            .args(args)
            .output()
            .expect("run")
    };
    let out = run(&["run", "--bootstrap", "not-a-multiaddr"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--bootstrap") && err.contains("not-a-multiaddr"),
        "{err}"
    );

    let out = run(&["run", "--bootstrap", "/ip4/127.0.0.1/tcp/1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/p2p/"));

    let out = run(&["run", "--listen", "/ip4/127.0.0.1/tcp/banana"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));

    let out = run(&[
        "run",
        "--api",
        "0.0.0.0:0",
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));

    let out = run(&["connect", "garbage"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MULTIADDR"));

    let out = run(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(2));

    // A client command with no daemon says so, with its own exit code
    // (not 2, which a script would read as a usage error).
    let out = run(&["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no fogmesh daemon is running"));

    // A broken config file is named.
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("config.toml"), "mnds = false\n").expect("write");
    let out = run(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.toml"));
}

#[test]
fn second_daemon_on_the_same_data_dir_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let err = match Daemon::try_start(&a.data_dir, &[]) {
        Ok(_) => panic!("a second daemon started on the same data directory"),
        Err(e) => e,
    };
    assert!(err.contains("exit status: 2"), "{err}");
    assert!(err.contains("in use by another fogmesh daemon"), "{err}");
    // The first one is unharmed.
    assert_eq!(a.json(&["status"])["peer_id"], a.peer_id.as_str());
}

#[test]
fn connect_command_and_event_stream() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let b = Daemon::start(&tmp.path().join("b"), &[]);

    // Follow A's events while B connects to it.
    let mut events = fogmesh()
        .args(["events", "--json", "--data-dir"])
        .arg(&a.data_dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("events");
    let stdout = events.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // Give the stream a moment to subscribe before the connection happens.
    std::thread::sleep(Duration::from_millis(500));

    let r = b.json(&["connect", &a.tcp_addr()]);
    assert_eq!(r["peer_id"], a.peer_id.as_str());
    assert_eq!(r["route"], "internet");

    let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
    let mut seen = false;
    while let Ok(line) =
        rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        let v: Value = serde_json::from_str(&line).expect("event is JSON");
        if v["type"] == "peer_connected" && v["peer_id"] == b.peer_id.as_str() {
            assert_eq!(v["direction"], "inbound");
            seen = true;
            break;
        }
    }
    let _ = events.kill();
    let _ = events.wait();
    assert!(seen, "no peer_connected event for B on A's stream");

    // A dial that cannot succeed is an error, exit 2.
    let out = b.cli(&["connect", "/ip4/127.0.0.1/tcp/1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

#[test]
fn metrics_endpoint_serves_libp2p_and_node_metrics() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &["--metrics", "127.0.0.1:0"]);
    let b = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &a.tcp_addr()]);
    a.wait_connected(&b.peer_id, CONNECT_TIMEOUT);
    let addr = a
        .ready_lines
        .iter()
        .find_map(|l| l.strip_prefix("metrics: "))
        .expect("metrics line")
        .to_owned();
    let (code, body) = http(&addr, "GET", "/metrics", None, None);
    assert_eq!(code, 200);
    assert!(body.contains("fogmesh_connected_peers 1"), "{body}");
    assert!(
        body.contains("libp2p_swarm_connections_established"),
        "{body}"
    );
    assert!(body.contains("libp2p_bandwidth_bytes_total"), "{body}");
    // A's mailbox pickups at start are Kademlia lookups of its own and
    // count too.
    assert!(
        body.contains(r#"libp2p_kad_query_result_num_requests_count{type="GetClosestPeers"}"#),
        "{body}"
    );
}

#[test]
fn tcp_dials_leave_from_the_listening_port_unless_port_reuse_is_off() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let hub = Daemon::start(&tmp.path().join("hub"), &[]);
    let reuse = Daemon::start(&tmp.path().join("reuse"), &["--bootstrap", &hub.tcp_addr()]);
    let fresh = Daemon::start(
        &tmp.path().join("fresh"),
        &["--bootstrap", &hub.tcp_addr(), "--tcp-port-reuse", "false"],
    );
    hub.wait_connected(&reuse.peer_id, CONNECT_TIMEOUT);
    hub.wait_connected(&fresh.peer_id, CONNECT_TIMEOUT);
    // The remote addresses the hub sees its two dialers' connections from.
    let seen_from = |d: &Daemon| -> Vec<String> {
        let peers = hub.json(&["peers"]);
        let entry = (peers.as_array().expect("array").iter())
            .find(|p| p["peer_id"] == d.peer_id.as_str())
            .expect("listed")
            .clone();
        (entry["addrs"].as_array().expect("addrs").iter())
            .filter_map(|a| a.as_str().map(str::to_owned))
            .filter(|a| a.contains("/tcp/"))
            .collect()
    };
    let listening = |d: &Daemon| d.tcp_addr().split("/p2p/").next().expect("addr").to_owned();

    assert!(
        seen_from(&reuse).contains(&listening(&reuse)),
        "port reuse (the default): the dial leaves from {}, seen from {:?}",
        listening(&reuse),
        seen_from(&reuse)
    );
    let fresh_seen = seen_from(&fresh);
    assert!(
        !fresh_seen.is_empty(),
        "a TCP connection from the fresh dialer"
    );
    assert!(
        !fresh_seen.contains(&listening(&fresh)),
        "--tcp-port-reuse false: a new port, not {}: {fresh_seen:?}",
        listening(&fresh)
    );
}

/// Daemon A, the stream of its events, and daemon B, which asks for A (a
/// bootstrap line) while A does not ask for B; both with `args`, in
/// `dir/a` and `dir/b`.
fn b_asks_for_a(dir: &std::path::Path, args: &[&str]) -> (Daemon, crate::util::Lines, Daemon) {
    let a = Daemon::start(&dir.join("a"), args);
    let events = a.spawn_cli(&["events", "--json"]);
    let a_addr = a.tcp_addr();
    let b_args = [args, &["--bootstrap", a_addr.as_str()]].concat();
    let b = Daemon::start(&dir.join("b"), &b_args);
    (a, events, b)
}

#[test]
fn idle_connections_close_unless_both_ends_asked_for_them() {
    // Every node here closes a connection after 1 s without use, unless it
    // asked for the peer (a bootstrap line, `connect`).
    let tmp = tempfile::tempdir().expect("tempdir");
    let idle = ["--idle-timeout-secs", "1"];
    let (a, events, b) = b_asks_for_a(tmp.path(), &idle);

    // B asked for A, A did not ask for B: A closes the idle link.
    let seen = events_until(&events, Duration::from_secs(30), |e| {
        e["type"] == "peer_disconnected" && e["peer_id"] == b.peer_id.as_str()
    })
    .unwrap_or_else(|seen| panic!("A never closed B: {seen:?}"));
    assert!(
        seen.iter()
            .any(|e| e["type"] == "peer_connected" && e["peer_id"] == b.peer_id.as_str()),
        "A saw B connect first: {seen:?}"
    );

    // Now A asks for B as well: the link stays, idle, at both ends.
    let out = a.cli(&["connect", &b.tcp_addr()]);
    assert!(out.status.success(), "connect: {out:?}");
    // C asks for B only and meets A through B's DHT: nobody asked for
    // the A-C link, which closes.
    let b_addr = b.tcp_addr();
    let c_args = [&idle[..], &["--bootstrap", b_addr.as_str()]].concat();
    let c = Daemon::start(&tmp.path().join("c"), &c_args);
    let seen = events_until(&events, Duration::from_secs(30), |e| {
        e["type"] == "peer_disconnected" && e["peer_id"] == c.peer_id.as_str()
    })
    .unwrap_or_else(|seen| panic!("A never closed C: {seen:?}"));
    assert!(
        seen.iter()
            .any(|e| e["type"] == "peer_connected" && e["peer_id"] == c.peer_id.as_str()),
        "C met A through the DHT: {seen:?}"
    );
    // Five idle timeouts later A and B are still connected, and always were
    // since the connect.
    let later = events_until(&events, Duration::from_secs(5), |_| false)
        .expect_err("nothing matches: all events of the 5 s");
    let b_closed =
        |e: &&Value| e["type"] == "peer_disconnected" && e["peer_id"] == b.peer_id.as_str();
    assert!(
        !seen.iter().chain(&later).any(|e| b_closed(&e)),
        "A and B, both asking, stay connected: {seen:?} {later:?}"
    );
    assert!(a.connected_peers().contains(&b.peer_id));
    assert!(b.connected_peers().contains(&a.peer_id));
}

#[test]
fn the_onion_descriptors_sent_on_connecting_do_not_hold_a_connection() {
    // Each side of a new connection sends the other its onion descriptor
    // on a mix stream, which then stays open for min(30 s, idle timeout)
    // in case there is more to write. Only packets may hold a connection:
    // A, which did not ask for B, closes it one idle timeout after the
    // first exchanges, not after the descriptor stream's idle time and
    // then its own (16 s and more here).
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_a, events, b) = b_asks_for_a(tmp.path(), &["--idle-timeout-secs", "8"]);
    let is_b = |e: &Value, kind: &str| e["type"] == kind && e["peer_id"] == b.peer_id.as_str();
    events_until(&events, Duration::from_secs(30), |e| {
        is_b(e, "peer_connected")
    })
    .unwrap_or_else(|seen| panic!("B never connected: {seen:?}"));
    let connected = std::time::Instant::now();
    events_until(&events, Duration::from_secs(40), |e| {
        is_b(e, "peer_disconnected")
    })
    .unwrap_or_else(|seen| panic!("A never closed B: {seen:?}"));
    let held = connected.elapsed();
    assert!(
        held < Duration::from_secs(14),
        "A held the idle link {held:?}: more than its 8 s idle timeout and the first exchanges"
    );
}

#[test]
fn a_peer_asked_for_is_dialled_again_when_it_comes_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A comes back on the same port, with the same identity.
    let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let a_args: Vec<String> = [
        "--listen",
        listen.as_str(),
        "--api",
        "127.0.0.1:0",
        "--no-mdns",
    ]
    .map(String::from)
    .to_vec();
    let mut a = Daemon::start_with(&tmp.path().join("a"), &a_args);
    // B asks for A only, and does not walk the DHT for want of peers.
    let a_addr = a.tcp_addr();
    let b = Daemon::start(
        &tmp.path().join("b"),
        &["--bootstrap", &a_addr, "--min-peers", "0"],
    );
    b.wait_connected(&a.peer_id, CONNECT_TIMEOUT);
    a.kill9();
    eventually(CONNECT_TIMEOUT, "B sees A gone", || {
        (!b.connected_peers().contains(&a.peer_id)).then_some(())
    });
    // Whatever B was doing with A when it went (a dial is tried once)
    // is over before it comes back.
    std::thread::sleep(Duration::from_secs(3));
    // A comes back with its identity but no memory of B (which it would
    // otherwise dial itself).
    let again = tmp.path().join("a-again");
    std::fs::create_dir_all(&again).expect("mkdir");
    let key = "identity.key";
    std::fs::copy(tmp.path().join("a").join(key), again.join(key)).expect("copy the identity");
    let a = Daemon::start_with(&again, &a_args);
    // B's next maintenance tick (every 15 s) dials A again.
    b.wait_connected(&a.peer_id, Duration::from_secs(40));
}

/// The events that arrive on `events` until one matches `until` (the last
/// one then), or as `Err` all that came within `timeout`.
fn events_until(
    events: &crate::util::Lines,
    timeout: Duration,
    until: impl Fn(&Value) -> bool,
) -> Result<Vec<Value>, Vec<Value>> {
    let deadline = std::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let Some(line) = events.next_line(left) else {
            break;
        };
        let e: Value = serde_json::from_str(&line).expect("an event as JSON");
        let done = until(&e);
        seen.push(e);
        if done {
            return Ok(seen);
        }
    }
    Err(seen)
}
