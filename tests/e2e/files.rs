//! File sharing: round trips, two throttled sources, resuming after
//! `kill -9`, a source whose copy changed on disk, a peer serving garbage,
//! and bad input.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{Daemon, eventually, fogmesh, http, is_hex64, loopback_args, metric_sum};

/// Generous: the machine running the tests may be busy.
const T: Duration = Duration::from_secs(60);
const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
/// The chunk size of every file under 64 GiB.
const CHUNK: usize = 256 * KIB;

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    if x == 0 {
        x = 1;
    }
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `data` to `dir/name` (creating `dir`); returns the path.
fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create dir");
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write file");
    p
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The partial file of a download to `out`.
fn part_of(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".fogmesh-part");
    PathBuf::from(p)
}

/// `file share PATH`; checks the answer against `data`; returns the id.
fn share(d: &Daemon, path: &Path, data: &[u8]) -> String {
    let v = d.json(&["file", "share", s(path)]);
    let id = v["file_id"].as_str().expect("file_id").to_owned();
    assert!(is_hex64(&id), "file id {id:?} is not 64 hex chars");
    assert_eq!(
        v["bytes_total"].as_u64(),
        Some(data.len() as u64),
        "size in {v}"
    );
    assert_eq!(
        v["chunks_total"].as_u64(),
        Some(data.len().div_ceil(CHUNK) as u64),
        "chunks in {v}"
    );
    let name = path.file_name().and_then(|n| n.to_str()).expect("name");
    assert_eq!(v["name"], name, "name in {v}");
    id
}

/// `file status ID`; `None` on exit 1 (unknown here).
fn status(d: &Daemon, id: &str) -> Option<Value> {
    let out = d.cli(&["file", "status", id, "--json"]);
    match out.status.code() {
        Some(0) => Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "file status printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })),
        Some(1) => None,
        _ => panic!(
            "file status failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `file get ID -o OUT`, blocking until complete; returns the status it
/// printed and how long it took.
fn get(d: &Daemon, id: &str, out: &Path) -> (Value, Duration) {
    let start = Instant::now();
    let st = d.json(&["file", "get", id, "-o", s(out), "--timeout", "60"]);
    let took = start.elapsed();
    assert_eq!(st["state"], "complete", "file get printed {st}");
    (st, took)
}

fn u(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {field} in {v}"))
}

/// The download's per-source entries, by peer id.
fn source_stats(st: &Value) -> Vec<(String, u64, u64)> {
    st["source_stats"]
        .as_array()
        .unwrap_or_else(|| panic!("no source_stats array in {st}"))
        .iter()
        .map(|e| {
            (
                e["peer_id"].as_str().expect("peer_id").to_owned(),
                u(e, "chunks_received"),
                u(e, "strikes"),
            )
        })
        .collect()
}

/// The sum of a metric on a daemon started with `--metrics`.
fn metric(d: &Daemon, name: &str) -> f64 {
    let addr = d.metrics_addr().expect("metrics ready line");
    let (code, body) = http(&addr, "GET", "/metrics", None, None);
    assert_eq!(code, 200, "GET /metrics: {body}");
    metric_sum(&body, name).unwrap_or(0.0)
}

/// Asserts `path` holds exactly `want` (without dumping megabytes).
fn assert_same_bytes(path: &Path, want: &[u8]) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(
        got.len(),
        want.len(),
        "{} has {} bytes, want {}",
        path.display(),
        got.len(),
        want.len()
    );
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{} differs from the original at byte {i} (chunk {})",
            path.display(),
            i / CHUNK
        );
    }
}

/// Runs a command with a deadline (a command that should fail at once must
/// not hang the test if it does not); returns its output.
fn output_within(mut cmd: std::process::Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fogmesh");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "command still running after {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("wait")
}

#[test]
fn share_and_get_identical_bytes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let b = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &a.tcp_addr()]);
    b.wait_connected(&a.peer_id, T);

    let data = random_bytes(1, 5 * MIB + 123);
    let src = write_file(&tmp.path().join("src"), "payload.bin", &data);
    let id = share(&a, &src, &data);

    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let out = out_dir.join("payload.bin");
    let (st, _) = get(&b, &id, &out);
    assert_eq!(st["file_id"], id.as_str());
    assert_same_bytes(&out, &data);
    assert!(!part_of(&out).exists(), "the partial file was left behind");

    let st = status(&b, &id).expect("B knows the file");
    assert_eq!(st["state"], "complete", "{st}");
    assert_eq!(u(&st, "bytes_total"), data.len() as u64, "{st}");
    assert_eq!(u(&st, "bytes_have"), u(&st, "bytes_total"), "{st}");
    assert_eq!(u(&st, "chunks_total"), 21, "{st}");
    assert_eq!(u(&st, "chunks_have"), 21, "{st}");
    assert_eq!(st["path"], s(&out), "{st}");

    let list = a.json(&["file", "list"]);
    let entry = list
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["file_id"] == id.as_str())
        .unwrap_or_else(|| panic!("A's file list lacks {id}: {list}"));
    assert_eq!(entry["state"], "sharing", "{entry}");
    assert_eq!(entry["path"], s(&src), "{entry}");
    assert_eq!(u(entry, "bytes_total"), data.len() as u64, "{entry}");

    // An empty file round-trips too.
    let empty_src = write_file(&tmp.path().join("src"), "empty.bin", &[]);
    let empty_id = share(&a, &empty_src, &[]);
    assert_ne!(empty_id, id);
    let empty_out = out_dir.join("empty.bin");
    let (st, _) = get(&b, &empty_id, &empty_out);
    assert_eq!(u(&st, "bytes_total"), 0, "{st}");
    assert_same_bytes(&empty_out, &[]);
    assert!(!part_of(&empty_out).exists());
}

#[test]
fn two_throttled_sources_are_near_twice_as_fast() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let limit = ["--max-upload-rate", "1MiB"];
    let a = Daemon::start(&tmp.path().join("a"), &limit);
    // B knows nobody until C1 dials it: C2 can only use A.
    let b = Daemon::start(&tmp.path().join("b"), &limit);
    let data = random_bytes(2, 8 * MIB);
    // Same bytes, two copies: the same id.
    let id = share(
        &a,
        &write_file(&tmp.path().join("src-a"), "big.bin", &data),
        &data,
    );
    let id_b = share(
        &b,
        &write_file(&tmp.path().join("src-b"), "big.bin", &data),
        &data,
    );
    assert_eq!(id, id_b, "the same bytes got two ids");
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir).expect("out dir");

    // One source.
    let mut c2 = Daemon::start(&tmp.path().join("c2"), &["--bootstrap", &a.tcp_addr()]);
    c2.wait_connected(&a.peer_id, T);
    let out2 = out_dir.join("one-source.bin");
    let (st2, t_one) = get(&c2, &id, &out2);
    assert_same_bytes(&out2, &data);
    let used: Vec<String> = source_stats(&st2)
        .into_iter()
        .filter(|(_, chunks, _)| *chunks > 0)
        .map(|(p, _, _)| p)
        .collect();
    assert_eq!(used, vec![a.peer_id.clone()], "C2's sources: {st2}");
    // C2 now holds the file and would be an unthrottled third source.
    assert!(c2.terminate().0.success());
    drop(c2);
    // Let A's limiter recover what C2 took, so both runs start alike.
    std::thread::sleep(Duration::from_secs(5));

    // Two sources.
    let c1 = Daemon::start(
        &tmp.path().join("c1"),
        &["--bootstrap", &a.tcp_addr(), "--bootstrap", &b.tcp_addr()],
    );
    c1.wait_connected(&a.peer_id, T);
    c1.wait_connected(&b.peer_id, T);
    let out1 = out_dir.join("two-sources.bin");
    let (st1, t_two) = get(&c1, &id, &out1);
    assert_same_bytes(&out1, &data);
    eprintln!("8 MiB at 1 MiB/s per source: one source {t_one:?}, two sources {t_two:?}");

    let stats = source_stats(&st1);
    for (name, peer) in [("A", &a.peer_id), ("B", &b.peer_id)] {
        let chunks = stats
            .iter()
            .find(|(p, _, _)| p == peer)
            .map_or(0, |(_, c, _)| *c);
        assert!(chunks > 0, "C1 got no chunks from {name}: {st1}");
    }
    // The limit held: 8 MiB at 1 MiB/s takes seconds even allowing a burst
    // of a few MiB.
    assert!(
        t_one >= Duration::from_secs(3),
        "8 MiB from one source limited to 1 MiB/s took only {t_one:?}"
    );
    let ratio = t_one.as_secs_f64() / t_two.as_secs_f64();
    assert!(
        ratio > 1.5,
        "two sources were not 1.5 times as fast as one: one {t_one:?}, two {t_two:?} (ratio {ratio:.2})"
    );
}

#[test]
fn kill_9_mid_transfer_resumes_and_resends_little() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(
        &tmp.path().join("a"),
        &["--max-upload-rate", "2MiB", "--metrics", "127.0.0.1:0"],
    );
    let b_dir = tmp.path().join("b");
    let boot = a.tcp_addr();
    let mut b = Daemon::start(&b_dir, &["--bootstrap", &boot]);
    b.wait_connected(&a.peer_id, T);
    let size = 12 * MIB;
    let data = random_bytes(3, size);
    let id = share(
        &a,
        &write_file(&tmp.path().join("src"), "resume.bin", &data),
        &data,
    );
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let out = out_dir.join("resume.bin");

    let getter = b.spawn_cli(&["file", "get", &id, "-o", s(&out), "--json"]);
    let at_kill = eventually(T, "B holds 3 MiB", || {
        status(&b, &id).filter(|st| u(st, "bytes_have") >= 3 * MIB as u64)
    });
    b.kill9();
    drop(getter);
    let have_at_kill = u(&at_kill, "bytes_have");
    assert!(
        have_at_kill < size as u64,
        "B finished before it could be killed: {at_kill}"
    );
    assert!(part_of(&out).exists(), "no partial file after kill -9");
    assert!(
        !out.exists(),
        "an unfinished download is at the output path"
    );
    drop(b);

    // B resumes by itself after a restart.
    let b = Daemon::start(&b_dir, &["--bootstrap", &boot]);
    let first = status(&b, &id).expect("B forgot the download across kill -9");
    let h0 = u(&first, "bytes_have");
    assert!(
        h0 >= have_at_kill,
        "B lost chunks across kill -9: it had {have_at_kill} bytes, now {h0}: {first}"
    );
    eventually(
        T,
        "B's download progresses without a new `file get`",
        || status(&b, &id).filter(|st| u(st, "bytes_have") > h0 || st["state"] == "complete"),
    );

    // And `file get` again finishes it.
    let (st, _) = get(&b, &id, &out);
    assert_eq!(u(&st, "bytes_have"), size as u64, "{st}");
    assert_same_bytes(&out, &data);
    assert!(!part_of(&out).exists(), "the partial file was left behind");

    let uploaded = metric(&a, "fogmesh_file_bytes_uploaded_total");
    eprintln!(
        "B had {have_at_kill} bytes at the kill, {h0} after the restart; A uploaded {uploaded} bytes for a {size}-byte file"
    );
    assert!(
        uploaded >= size as f64,
        "A reports {uploaded} bytes uploaded for a {size}-byte file"
    );
    assert!(
        uploaded <= (size + 4 * MIB) as f64,
        "A uploaded {uploaded} bytes for a {size}-byte file: more than 4 MiB sent again"
    );
}

#[test]
fn changed_source_does_not_corrupt_the_result() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    // B knows nobody until C dials it.
    let b = Daemon::start(&tmp.path().join("b"), &[]);
    let data = random_bytes(4, 4 * MIB);
    let a_copy = write_file(&tmp.path().join("src-a"), "doc.bin", &data);
    let id = share(&a, &a_copy, &data);
    let id_b = share(
        &b,
        &write_file(&tmp.path().join("src-b"), "doc.bin", &data),
        &data,
    );
    assert_eq!(id, id_b);

    // A's copy changes after it was shared: 1 KiB in the middle.
    let at = 2 * MIB;
    let changed: Vec<u8> = data[at..at + KIB].iter().map(|b| !b).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a_copy)
        .expect("open A's copy")
        .write_all_at(&changed, at as u64)
        .expect("modify A's copy");

    // C at first knows only A, so A must be asked for the changed chunk.
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let out = out_dir.join("doc.bin");
    let c = Daemon::start(&tmp.path().join("c"), &["--bootstrap", &a.tcp_addr()]);
    c.wait_connected(&a.peer_id, T);
    let getter = c.spawn_cli(&["file", "get", &id, "-o", s(&out), "--json"]);
    let st_a = eventually(T, "A reports its copy stale", || {
        status(&a, &id).filter(|st| st["state"] == "stale")
    });
    assert!(
        st_a["error"].as_str().is_some_and(|e| !e.is_empty()),
        "a stale share gives no reason: {st_a}"
    );
    let st_c = status(&c, &id).expect("C knows the download");
    assert_ne!(
        st_c["state"], "complete",
        "C completed from a changed copy: {st_c}"
    );
    assert!(!out.exists(), "C wrote an output from a changed copy");

    // B has the original: C finishes from it.
    let out_connect = c.cli(&["connect", &b.tcp_addr(), "--json"]);
    assert!(
        out_connect.status.success(),
        "connect C to B: {}",
        String::from_utf8_lossy(&out_connect.stderr)
    );
    let (st, _) = get(&c, &id, &out);
    drop(getter);
    assert_same_bytes(&out, &data);
    let from_b = source_stats(&st)
        .iter()
        .find(|(p, _, _)| *p == b.peer_id)
        .map_or(0, |(_, c, _)| *c);
    assert!(from_b > 0, "C got nothing from B: {st}");
    // A stays stale: it must not go back to serving a changed file.
    assert_eq!(status(&a, &id).expect("A's share")["state"], "stale");
}

#[test]
fn corrupting_peer_is_banned_and_the_file_still_arrives() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use fogmesh::behaviour::FileFrame;
    use fogmesh_protocols::files::manifest::manifest_of;
    use fogmesh_protocols::files::wire::{Request, Response, decode_request, encode_response};
    use fogmesh_protocols::files::{Bitfield, ErrorCode};
    use libp2p::futures::StreamExt;
    use libp2p::request_response;
    use libp2p::swarm::SwarmEvent;

    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let c = Daemon::start(&tmp.path().join("c"), &["--metrics", "127.0.0.1:0"]);
    let data = random_bytes(5, 2 * MIB + 100);
    let id = share(
        &a,
        &write_file(&tmp.path().join("src"), "target.bin", &data),
        &data,
    );

    // The rogue serves the real manifest and claims every chunk.
    let manifest = manifest_of(&data, Some("target.bin".into())).expect("manifest");
    assert_eq!(
        manifest.id().to_hex(),
        id,
        "manifest_of disagrees with `file share`"
    );
    assert_eq!(
        manifest_of(&data, None).expect("manifest").id(),
        manifest.id(),
        "the id depends on the name"
    );
    let rogue_key = libp2p::identity::Keypair::generate_ed25519();
    let rogue_id = rogue_key.public().to_peer_id().to_base58();
    let chunks_served = Arc::new(AtomicU64::new(0));
    let served = chunks_served.clone();
    let c_addr: libp2p::Multiaddr = c.tcp_addr().parse().expect("multiaddr");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    rt.spawn(async move {
        let fail = |e: String| {
            let _ = ready_tx.send(Err(e));
        };
        let mut swarm = match rogue_file_swarm(rogue_key) {
            Ok(s) => s,
            Err(e) => return fail(format!("building the swarm: {e}")),
        };
        if let Err(e) = swarm.dial(c_addr) {
            return fail(format!("dial C: {e}"));
        }
        let mut ready = Some(ready_tx);
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { .. } => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Ok(()));
                    }
                }
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Err(format!("cannot connect to C: {error}")));
                    }
                }
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message:
                        request_response::Message::Request {
                            request, channel, ..
                        },
                    ..
                }) => {
                    let resp = match decode_request(&request.0) {
                        Ok(Request::GetManifest { .. }) => Response::Manifest(manifest.clone()),
                        Ok(Request::GetHave { .. }) => Response::Have {
                            bits: Bitfield::full(manifest.chunk_count()),
                        },
                        Ok(Request::GetChunk { index, .. }) => {
                            served.fetch_add(1, Ordering::SeqCst);
                            let len = manifest.chunk_len(index).unwrap_or(1) as usize;
                            Response::Chunk {
                                index,
                                data: vec![0x5a; len],
                            }
                        }
                        _ => Response::error(ErrorCode::Internal, "?"),
                    };
                    let _ = swarm
                        .behaviour_mut()
                        .send_response(channel, FileFrame(encode_response(&resp)));
                }
                _ => {}
            }
        }
    });
    match ready_rx.recv_timeout(T) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("rogue peer: {e}"),
        Err(_) => panic!("rogue peer never connected"),
    }
    c.wait_connected(&rogue_id, T);

    // C's only source is the rogue at first.
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let out = out_dir.join("target.bin");
    let getter = c.spawn_cli(&["file", "get", &id, "-o", s(&out), "--json"]);
    eventually(T, "C counts a corrupt chunk", || {
        (metric(&c, "fogmesh_file_chunks_corrupt_total") >= 1.0).then_some(())
    });
    assert!(chunks_served.load(Ordering::SeqCst) >= 1);
    let st = status(&c, &id).expect("C knows the download");
    assert_ne!(st["state"], "complete", "C completed from garbage: {st}");
    assert_eq!(u(&st, "bytes_have"), 0, "C kept garbage: {st}");
    assert!(!out.exists(), "C wrote an output from garbage");

    // Then the honest A.
    let connected = c.cli(&["connect", &a.tcp_addr(), "--json"]);
    assert!(
        connected.status.success(),
        "connect C to A: {}",
        String::from_utf8_lossy(&connected.stderr)
    );
    let (st, _) = get(&c, &id, &out);
    drop(getter);
    assert_same_bytes(&out, &data);
    assert!(metric(&c, "fogmesh_file_chunks_corrupt_total") >= 1.0);
    let stats = source_stats(&st);
    if let Some((_, chunks, strikes)) = stats.iter().find(|(p, _, _)| *p == rogue_id) {
        assert!(*strikes >= 1, "the rogue is a source without strikes: {st}");
        assert_eq!(*chunks, 0, "chunks from the rogue were accepted: {st}");
    }
    let from_a = stats
        .iter()
        .find(|(p, _, _)| *p == a.peer_id)
        .map_or(0, |(_, c, _)| *c);
    assert!(from_a > 0, "C got nothing from A: {st}");
    rt.shutdown_background();
}

/// The file protocol's behaviour alone.
type FileProtocol = libp2p::request_response::Behaviour<
    fogmesh::codec::FrameCodec<fogmesh::behaviour::FileFrame, fogmesh::behaviour::FileFrame>,
>;

/// A libp2p node speaking only the file protocol, with room for chunk-sized
/// responses.
fn rogue_file_swarm(
    key: libp2p::identity::Keypair,
) -> Result<libp2p::Swarm<FileProtocol>, Box<dyn std::error::Error + Send + Sync>> {
    use libp2p::request_response::{self, ProtocolSupport};
    use libp2p::{noise, tcp, yamux};
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|_| {
            let b = request_response::Behaviour::with_codec(
                fogmesh::codec::FrameCodec::new(64 * 1024, 32 * 1024 * 1024),
                [(fogmesh::behaviour::FILE_PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default(),
            );
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(b)
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build())
}

#[test]
fn bad_input_gets_clear_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let code_and_err = |args: &[&str]| {
        let out = a.cli(args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Nothing shared yet: "nothing found".
    let (code, err) = code_and_err(&["file", "list", "--json"]);
    assert_eq!(code, Some(1), "file list on a fresh node: {err}");

    let missing = tmp.path().join("no-such-file.bin");
    let (code, err) = code_and_err(&["file", "share", s(&missing), "--json"]);
    assert_eq!(code, Some(2), "share of a missing file: {err}");
    assert!(
        err.contains(s(&missing)),
        "the message does not name the path: {err}"
    );

    let dir = tmp.path().join("a-directory");
    std::fs::create_dir_all(&dir).expect("dir");
    let (code, err) = code_and_err(&["file", "share", s(&dir), "--json"]);
    assert_eq!(code, Some(2), "share of a directory: {err}");
    assert!(!err.trim().is_empty(), "no message for sharing a directory");

    let out = tmp.path().join("out.bin");
    let (code, err) = code_and_err(&["file", "get", "not-a-file-id", "-o", s(&out), "--json"]);
    assert_eq!(code, Some(2), "get of a malformed id: {err}");
    assert!(
        err.contains("not-a-file-id"),
        "the message does not name the id: {err}"
    );

    let unknown = "ab".repeat(32);
    let start = Instant::now();
    let (code, err) = code_and_err(&[
        "file",
        "get",
        &unknown,
        "-o",
        s(&out),
        "--timeout",
        "2",
        "--json",
    ]);
    assert_eq!(code, Some(1), "get of an unknown id: {err}");
    assert!(
        !err.trim().is_empty(),
        "no message when nobody has the file"
    );
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "--timeout 2 took {:?}",
        start.elapsed()
    );
    assert!(!out.exists(), "an output appeared for a file nobody has");

    let nowhere = tmp.path().join("no-such-dir").join("out.bin");
    let (code, err) = code_and_err(&["file", "get", &"cd".repeat(32), "-o", s(&nowhere), "--json"]);
    assert_eq!(code, Some(2), "get into a missing directory: {err}");

    let (code, err) = code_and_err(&["file", "status", &"ef".repeat(32), "--json"]);
    assert_eq!(code, Some(1), "status of an unknown id: {err}");

    // A bad rate stops the daemon before it starts.
    let mut cmd = fogmesh();
    cmd.arg("run")
        .arg("--data-dir")
        .arg(tmp.path().join("bad-rate"))
        .args(loopback_args())
        .args(["--max-upload-rate", "banana"]);
    let out = output_within(cmd, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "run with a bad rate: {err}");
    assert!(
        err.contains("--max-upload-rate"),
        "the message does not name the flag: {err}"
    );
}

/// `group create NAME --member ...` on `d`; returns the group id.
fn group_with(d: &Daemon, members: &[&Daemon]) -> String {
    let mut args = vec!["group", "create", "files"];
    for m in members {
        args.extend(["--member", m.peer_id.as_str()]);
    }
    let v = d.json(&args);
    let gid = v["group_id"].as_str().expect("group_id").to_owned();
    for m in members {
        // Each member accepts the invitation, as its user would.
        eventually(T, "the member lists the group", || {
            let listed = m
                .json_or_nothing(&["group", "list"])
                .as_array()
                .is_some_and(|a| a.iter().any(|g| g["group_id"] == gid.as_str()));
            if listed {
                return Some(());
            }
            let invited = m
                .json_or_nothing(&["group", "invites"])
                .as_array()
                .is_some_and(|a| {
                    a.iter()
                        .any(|i| i["group_id"] == gid.as_str() && i["accepted"] == false)
                });
            if invited {
                m.json(&["group", "accept", &gid]);
            }
            None
        });
    }
    gid
}

/// Waits until `d` has delivered message `id` of group `gid`.
fn wait_message(d: &Daemon, gid: &str, id: &str) {
    eventually(T, "the message is delivered", || {
        d.json_or_nothing(&["group", "messages", gid])
            .as_array()
            .is_some_and(|a| a.iter().any(|m| m["id"] == id))
            .then_some(())
    });
}

/// Issue 11, item 1: a member posts a link with the sharer's file id and a
/// key of its own. The sharer keeps serving under its own key after a
/// restart, an honest member fetching the sharer's link gets the
/// plaintext, fetching by id alone asks which link, and the forged key is
/// an error, never garbage.
#[test]
fn forged_file_key_in_a_group_does_not_poison_the_sharer() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut a = Daemon::start(&tmp.path().join("a"), &[]);
    let b = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &a.tcp_addr()]);
    let m = Daemon::start(&tmp.path().join("m"), &["--bootstrap", &a.tcp_addr()]);
    b.wait_connected(&a.peer_id, T);
    m.wait_connected(&a.peer_id, T);
    let gid = group_with(&a, &[&b, &m]);

    let secret = random_bytes(11, MIB + 12_345);
    let src = write_file(&tmp.path().join("src"), "plans.bin", &secret);
    let shared = a.json(&["file", "share", s(&src), "--group", &gid]);
    let fid = shared["file_id"].as_str().expect("file_id").to_owned();
    let link = shared["link"].as_str().expect("link").to_owned();
    assert!(link.starts_with(&format!("fogmesh-file:{fid}#")), "{link}");
    let mid = shared["message_id"]
        .as_str()
        .expect("message_id")
        .to_owned();
    wait_message(&b, &gid, &mid);

    // M's forged links: the new form and the form before link version 2.
    let forged = format!("fogmesh-file:{fid}#v2:{}", "66".repeat(32));
    let forged_v1 = format!("fogmesh-file:{fid}#{}", "77".repeat(32));
    let post = m.json(&[
        "group",
        "send",
        &gid,
        &format!("{forged} {forged_v1} plans.bin"),
    ]);
    let forged_mid = post["id"].as_str().expect("id").to_owned();
    wait_message(&a, &gid, &forged_mid);
    wait_message(&b, &gid, &forged_mid);

    // The sharer restarts: it must not take M's key for its own.
    a.terminate();
    let a = Daemon::start(&tmp.path().join("a"), &["--bootstrap", &b.tcp_addr()]);
    b.wait_connected(&a.peer_id, T);
    assert_eq!(status(&a, &fid).expect("A's share")["state"], "sharing");

    // By id alone, B cannot know which key is meant: it asks for the link.
    let out_b = tmp.path().join("b-copy");
    let asked = b.cli(&["file", "get", &fid, "-o", s(&out_b), "--json"]);
    let err = String::from_utf8_lossy(&asked.stderr);
    assert_eq!(asked.status.code(), Some(2), "{err}");
    assert!(err.contains("different keys"), "{err}");
    // With A's link: the plaintext.
    let got = b.json(&["file", "get", &link, "-o", s(&out_b), "--timeout", "60"]);
    assert_eq!(got["state"], "complete", "{got}");
    assert_same_bytes(&out_b, &secret);

    // M's own forged link opens nothing: an error, and no output.
    let out_m = tmp.path().join("m-copy");
    let tried = m.cli(&["file", "get", &forged, "-o", s(&out_m), "--json"]);
    let err = String::from_utf8_lossy(&tried.stderr);
    assert_eq!(tried.status.code(), Some(2), "{err}");
    assert!(err.contains("does not open"), "{err}");
    assert!(!out_m.exists(), "a forged key produced an output");
}

/// One unsigned-varint length prefix and the frame, as the file protocol's
/// codec writes them.
fn framed(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + 10);
    let mut n = frame.len() as u64;
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    }
    out.extend_from_slice(frame);
    out
}

/// Issue 11, item 5: a peer opens hundreds of chunk requests on one
/// connection and never reads the answers. The serving node keeps at most
/// its per-peer share of responses in memory (RSS stays bounded) and still
/// serves another peer.
#[test]
fn hostile_peer_holding_hundreds_of_requests_cannot_pin_memory() {
    use fogmesh_protocols::files::FileId;
    use fogmesh_protocols::files::wire::{Request, encode_request};
    use libp2p::futures::{AsyncWriteExt, StreamExt};
    use libp2p::swarm::SwarmEvent;
    use libp2p::{noise, tcp, yamux};

    const STREAMS: u64 = 250;
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let data = random_bytes(21, 8 * MIB);
    let id = share(
        &a,
        &write_file(&tmp.path().join("src"), "big.bin", &data),
        &data,
    );
    let file: FileId = id.parse().expect("file id");
    let a_peer: libp2p::PeerId = a.peer_id.parse().expect("peer id");
    let a_addr: libp2p::Multiaddr = a.tcp_addr().parse().expect("multiaddr");
    let before = a.rss_bytes().expect("A's RSS");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<u64, String>>();
    rt.spawn(async move {
        let built = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| e.to_string())
            .and_then(|b| {
                b.with_behaviour(|_| libp2p_stream::Behaviour::new())
                    .map_err(|e| e.to_string())
            });
        let mut swarm = match built {
            Ok(b) => b
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
                .build(),
            Err(e) => {
                let _ = done_tx.send(Err(e));
                return;
            }
        };
        let mut control = swarm.behaviour().new_control();
        if let Err(e) = swarm.dial(a_addr) {
            let _ = done_tx.send(Err(e.to_string()));
            return;
        }
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { .. } => break,
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    let _ = done_tx.send(Err(error.to_string()));
                    return;
                }
                _ => {}
            }
        }
        tokio::spawn(async move {
            loop {
                swarm.select_next_some().await;
            }
        });
        // Hundreds of requests; the answers are never read.
        let mut held = Vec::new();
        for i in 0..STREAMS {
            let Ok(mut s) = control
                .open_stream(a_peer, fogmesh::behaviour::FILE_PROTOCOL)
                .await
            else {
                break;
            };
            let req = encode_request(&Request::GetChunk {
                file,
                index: i % 32,
            });
            if s.write_all(&framed(&req)).await.is_err() || s.flush().await.is_err() {
                break;
            }
            held.push(s);
        }
        let _ = done_tx.send(Ok(held.len() as u64));
        // Keep them open (and unread) until the runtime goes.
        std::future::pending::<()>().await;
        drop(held);
    });
    let opened = match done_rx.recv_timeout(T) {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => panic!("hostile peer: {e}"),
        Err(_) => panic!("hostile peer never finished opening its requests"),
    };
    assert!(opened >= 200, "only {opened} requests opened");
    // Let A read and answer (or refuse) every one of them.
    std::thread::sleep(Duration::from_secs(3));
    let during = a.rss_bytes().expect("A's RSS");

    // Another peer is still served, promptly, while the hostile one holds on.
    let b = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &a.tcp_addr()]);
    b.wait_connected(&a.peer_id, T);
    let out = tmp.path().join("b-copy.bin");
    let (st, took) = get(&b, &id, &out);
    assert_eq!(st["state"], "complete", "{st}");
    assert_same_bytes(&out, &data);
    assert!(took < Duration::from_secs(30), "B waited {took:?}");
    let grown = during.saturating_sub(before);
    eprintln!(
        "A RSS before {} MiB, during {} MiB",
        before / MIB as u64,
        during / MIB as u64
    );
    // 250 unread 256 KiB chunks would be 62 MiB; the per-peer limit is 16.
    assert!(
        grown < 40 * MIB as u64,
        "A's RSS grew by {} MiB for one peer's unread requests",
        grown / MIB as u64
    );
    rt.shutdown_background();
}

/// `file cancel`: a download under way stops, its partial file and its
/// record go (it does not come back at restart); a share stops being served.
#[test]
fn cancel_removes_a_download_and_its_partial_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let data = random_bytes(31, 4 * MIB);
    let src = write_file(&tmp.path().join("src"), "slow.bin", &data);
    let id = share(&a, &src, &data);
    let mut b = Daemon::start(
        &tmp.path().join("b"),
        &[
            "--bootstrap",
            &a.tcp_addr(),
            "--max-download-rate",
            "256KiB",
        ],
    );
    b.wait_connected(&a.peer_id, T);
    let out = tmp.path().join("b-copy.bin");
    let getter = b.spawn_cli(&["file", "get", &id, "-o", s(&out), "--json"]);
    eventually(T, "B has part of the file", || {
        status(&b, &id)
            .filter(|st| u(st, "bytes_have") > 0)
            .map(|_| ())
    });
    assert!(part_of(&out).exists());
    let last = b.json(&["file", "cancel", &id]);
    assert_eq!(last["file_id"], id.as_str(), "{last}");
    drop(getter);
    assert!(status(&b, &id).is_none(), "still known after cancel");
    assert!(!part_of(&out).exists(), "the partial file stayed");
    assert!(!out.exists());
    // Not resumed at restart.
    b.terminate();
    let b = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &a.tcp_addr()]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(status(&b, &id).is_none(), "resumed after cancel");
    assert!(!part_of(&out).exists());
    // Unknown now: exit 1.
    assert_eq!(b.cli(&["file", "cancel", &id]).status.code(), Some(1));
    // Cancelling a share stops serving it; the file stays.
    a.json(&["file", "cancel", &id]);
    assert!(status(&a, &id).is_none());
    assert_eq!(std::fs::read(&src).expect("source"), data);
}
