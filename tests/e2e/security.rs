//! Hardening of one node against strangers on the network and against
//! other programs on the same host: Kademlia's provider store, the local
//! API's Host and Origin checks, private files, no proxy for the API, and
//! terminal escapes in what the CLI prints (see docs/SECURITY.md).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::util::{Daemon, eventually, fogmesh};

/// A raw HTTP/1.1 GET with the given extra header lines; returns the status
/// code.
fn get_with(addr: &str, path: &str, headers: &[String]) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to API");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {resp:?}"))
}

#[test]
fn api_refuses_a_foreign_host_or_origin_before_the_token() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let token = std::fs::read_to_string(a.data_dir.join("api.token")).expect("token");
    let auth = format!("Authorization: Bearer {}", token.trim());
    let port = a.api.rsplit_once(':').expect("host:port").1;
    let host = |h: &str| format!("Host: {h}");

    // A page on evil.example whose name now resolves to 127.0.0.1 (DNS
    // rebinding) sends its own name as Host: refused, token or not.
    for h in ["evil.example", &format!("evil.example:{port}")] {
        assert_eq!(
            get_with(&a.api, "/v1/status", &[host(h), auth.clone()]),
            403
        );
        assert_eq!(get_with(&a.api, "/v1/status", &[host(h)]), 403);
    }
    assert_eq!(
        get_with(&a.api, "/v1/status", std::slice::from_ref(&auth)),
        403,
        "no Host"
    );
    // A cross-origin request from a page (the browser adds Origin).
    for o in ["http://evil.example", "null", &format!("http://{}", a.api)] {
        let origin = format!("Origin: {o}");
        let h = if o.ends_with(port) {
            // Same origin, but named differently from the Host.
            host(&format!("localhost:{port}"))
        } else {
            host(&a.api)
        };
        assert_eq!(
            get_with(&a.api, "/v1/status", &[h, origin, auth.clone()]),
            403,
            "Origin: {o}"
        );
    }
    // The API's own names pass, and the token is still required.
    for h in [a.api.clone(), format!("localhost:{port}")] {
        assert_eq!(
            get_with(&a.api, "/v1/status", &[host(&h), auth.clone()]),
            200
        );
        assert_eq!(get_with(&a.api, "/v1/status", &[host(&h)]), 401);
        let same = format!("Origin: http://{h}");
        assert_eq!(
            get_with(&a.api, "/v1/status", &[host(&h), same, auth.clone()]),
            200
        );
    }
    assert_eq!(a.json(&["status"])["peer_id"], a.peer_id.as_str());
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn check_private(dir: &std::path::Path) {
    assert_eq!(mode(dir), 0o700, "data directory");
    for f in ["fogmesh.redb", "identity.key", "api.token"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
}

#[test]
fn data_dir_and_database_are_private_at_every_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("a");
    // A directory that already exists, with the usual umask's mode.
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut a = Daemon::start(&dir, &[]);
    check_private(&dir);
    a.terminate();

    // Loosened while the node was stopped (a restore from a backup, a
    // copy): made private again at the next start.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for f in ["fogmesh.redb", "identity.key", "api.token"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
    }
    let _a = Daemon::start(&dir, &[]);
    check_private(&dir);
}

#[test]
fn cli_never_sends_the_token_through_http_proxy() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    // A "proxy" that records what it is sent and closes the connection.
    let proxy = TcpListener::bind("127.0.0.1:0").expect("bind");
    proxy.set_nonblocking(true).expect("nonblocking");
    let proxy_url = format!("http://{}", proxy.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let recorder = std::thread::spawn({
        let (seen, stop) = (seen.clone(), stop.clone());
        move || {
            while !stop.load(Ordering::Relaxed) {
                match proxy.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = vec![0u8; 4096];
                        let n = s.read(&mut buf).unwrap_or(0);
                        let got = String::from_utf8_lossy(&buf[..n]).into_owned();
                        seen.lock().expect("lock").push(got);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    });
    // And one on a port where nothing listens.
    let dead = TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("http://{}", dead.local_addr().expect("addr"));
    drop(dead);

    for url in [&proxy_url, &dead_url] {
        let out = fogmesh()
            .args(["status", "--json", "--data-dir"])
            .arg(&a.data_dir)
            .env("HTTP_PROXY", url)
            .env("http_proxy", url)
            .env("ALL_PROXY", url)
            .env("all_proxy", url)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .stdin(Stdio::null())
            .output()
            .expect("run fogmesh");
        assert!(
            out.status.success(),
            "status through HTTP_PROXY={url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(v["peer_id"], a.peer_id.as_str());
    }
    stop.store(true, Ordering::Relaxed);
    recorder.join().expect("recorder");
    let seen = seen.lock().expect("lock");
    assert!(seen.is_empty(), "the CLI went through the proxy: {seen:?}");
}

#[test]
fn human_output_escapes_control_characters_json_keeps_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let name = "n\u{1b}]0;pwned\u{7}";
    let v = a.json(&["group", "create", name]);
    let gid = v["group_id"].as_str().expect("group_id").to_owned();
    // Clears the screen, returns to the line's start, forges a line.
    let text = "hi\u{1b}[2J\rfake\n2000-01-01  someone: trust me\u{9b}31m";
    a.json(&["group", "send", &gid, text]);

    let out = a.cli(&["group", "messages", &gid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8(out.stdout).expect("utf-8");
    assert!(!shown.contains('\u{1b}') && !shown.contains('\r') && !shown.contains('\u{9b}'));
    assert_eq!(shown.lines().count(), 1, "{shown:?}");
    assert!(
        shown.contains(r"hi\x1b[2J\x0dfake\x0a2000-01-01  someone: trust me\u{009b}31m"),
        "{shown:?}"
    );
    for cmd in [["group", "list"], ["group", "show"]] {
        let mut args = cmd.to_vec();
        if cmd[1] == "show" {
            args.push(&gid);
        }
        let out = a.cli(&args);
        let shown = String::from_utf8(out.stdout).expect("utf-8");
        assert!(
            !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
            "{shown:?}"
        );
        assert!(shown.contains(r"n\x1b]0;pwned\x07"), "{args:?}: {shown:?}");
    }

    // --json is unchanged: the text decodes to exactly what was sent.
    let msgs = a.json(&["group", "messages", &gid]);
    assert_eq!(msgs[0]["text"], text);
    assert_eq!(a.json(&["group", "show", &gid])["name"], name);
}

#[test]
fn non_loopback_metrics_address_is_warned_about() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let quiet = Daemon::start(&tmp.path().join("a"), &["--metrics", "127.0.0.1:0"]);
    let loud = Daemon::start(&tmp.path().join("b"), &["--metrics", "0.0.0.0:0"]);
    let warning = "--metrics is not a loopback address";
    assert!(loud.stderr().contains(warning), "{}", loud.stderr());
    assert!(!quiet.stderr().contains(warning), "{}", quiet.stderr());
}

/// A stranger (a bare Kademlia client, not a fogmesh node) announces
/// itself as the provider of `n` made-up keys to `d` with ADD_PROVIDER, each
/// with many long addresses.
fn flood_add_provider(d: &Daemon, n: usize) {
    use futures::StreamExt;
    use libp2p::swarm::SwarmEvent;
    use libp2p::{Multiaddr, PeerId, kad, noise, tcp, yamux};

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .expect("tcp")
            .with_behaviour(|key| {
                let me = key.public().to_peer_id();
                let store = kad::store::MemoryStore::with_config(
                    me,
                    kad::store::MemoryStoreConfig {
                        max_provided_keys: n + 1,
                        ..Default::default()
                    },
                );
                let mut kad = kad::Behaviour::with_config(
                    me,
                    store,
                    kad::Config::new(fogmesh::behaviour::KAD_PROTOCOL),
                );
                kad.set_mode(Some(kad::Mode::Client));
                kad
            })
            .expect("behaviour")
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        // Addresses the stranger claims: many, long ones. ADD_PROVIDER
        // carries the external addresses of the sender.
        for i in 0..40u16 {
            let long = format!("/dns4/{}.example/tcp/{}", "x".repeat(200), 1000 + i);
            swarm.add_external_address(long.parse::<Multiaddr>().expect("multiaddr"));
        }
        let d_addr: Multiaddr = d.tcp_addr().parse().expect("multiaddr");
        let d_peer: PeerId = d.peer_id.parse().expect("peer id");
        swarm.behaviour_mut().add_address(&d_peer, d_addr.clone());
        swarm.dial(d_addr).expect("dial");
        let deadline = tokio::time::sleep(Duration::from_secs(120));
        tokio::pin!(deadline);
        let (mut started, mut done, mut in_flight) = (0usize, 0usize, 0usize);
        let mut connected = false;
        while done < n {
            while connected && in_flight < 32 && started < n {
                let key = kad::RecordKey::new(&format!("made-up key {started}"));
                swarm
                    .behaviour_mut()
                    .start_providing(key)
                    .expect("own store has room");
                started += 1;
                in_flight += 1;
            }
            tokio::select! {
                _ = &mut deadline => panic!("only {done} of {n} ADD_PROVIDER sent in 120 s"),
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::ConnectionEstablished { .. } => connected = true,
                    SwarmEvent::Behaviour(kad::Event::OutboundQueryProgressed {
                        result: kad::QueryResult::StartProviding(_), step, ..
                    }) if step.last => {
                        done += 1;
                        in_flight -= 1;
                    }
                    _ => {}
                }
            }
        }
        // Let the last requests reach the node before the connection goes.
        tokio::time::sleep(Duration::from_secs(1)).await;
    })
}

#[test]
fn add_provider_flood_does_not_grow_the_store_past_the_cap() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &["--kad-mode", "server"]);
    let per_provider = fogmesh::kad_store::MAX_RECORDS_PER_PROVIDER;
    flood_add_provider(&a, per_provider * 3);
    let held = eventually(Duration::from_secs(30), "the flood stored", || {
        let n = a.json(&["status"])["provider_records_for_others"]
            .as_u64()
            .expect("provider_records_for_others") as usize;
        (n >= per_provider).then_some(n)
    });
    std::thread::sleep(Duration::from_secs(1));
    let later = a.json(&["status"])["provider_records_for_others"]
        .as_u64()
        .expect("count") as usize;
    assert_eq!(held, per_provider);
    assert_eq!(later, per_provider);
    // The node still works, and still provides its own files.
    let f = tmp.path().join("own.bin");
    std::fs::write(&f, vec![7u8; 1000]).expect("write");
    let shared = a.json(&["file", "share", f.to_str().expect("utf-8")]);
    assert!(shared["file_id"].is_string(), "{shared}");
}
