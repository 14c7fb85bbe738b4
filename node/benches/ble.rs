//! BLE benchmarks, over the simulated radio.
//!
//! Run with `cargo bench -p fogmesh --bench ble`. Measured, in one run:
//! 1. throughput of one simulated link against its modelled capacity, for
//!    link bandwidths of 20 000 and 60 000 B/s (otherwise the default
//!    `LinkModel`: MTU 244 B, 15 ms one-way latency), side by side:
//!    - raw link bytes: a `Link` from `Radio::connect` on an in-process
//!      `Medium`, written on one side and read to the end on the other;
//!    - a libp2p stream over `BleTransport` upgraded with Noise and Yamux
//!      (two swarms with `libp2p_stream`, as the files bench's baseline);
//!
//!    each `ROUNDS` times, `BYTES_PER_BW` seconds' worth of bytes at the
//!    link's capacity; median and range of B/s and of the fraction of
//!    capacity;
//! 2. group message delivery time over 1 to 6 hops: a `fogmesh radio serve`
//!    medium (range 12 m) and 7 daemons in a line 10 m apart, offline
//!    (`--no-internet --ble sim:SOCKET`), so that node `i` is `i` hops from
//!    node 0; node 0 posts `MSGS` messages at one per second through its
//!    local API, every node's event stream is followed in this process, and
//!    each delivery is timed from the moment node 0's API is called.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Started, start_args, stop};
use fogmesh::client::Client;
use fogmesh::types::{CreateGroup, GroupAck, NodeEvent, PeerInfo, PostMessage};
use fogmesh_ble::sim::{LinkModel, Medium, Position};
use fogmesh_ble::{Advert, Radio};

/// Link bandwidths of part 1, bytes per second.
const BANDWIDTHS: [u64; 2] = [20_000, 60_000];
/// Bytes sent per measurement, in seconds of link capacity.
const BYTES_PER_BW: u64 = 7;
/// Measurements per bandwidth and path.
const ROUNDS: usize = 3;
/// Daemons in the line of part 2 (hops 0 to NODES - 1).
const NODES: usize = 7;
/// Spacing of the line, metres, and the medium's range.
const SPACING_M: usize = 10;
const RANGE_M: &str = "12";
/// Messages timed in part 2, and the gap between two.
const MSGS: usize = 20;
const MSG_GAP: Duration = Duration::from_secs(1);
/// After every node has the group and its event stream is followed, before
/// the first timed message (lets gossipsub graft its mesh on heartbeats).
const SETTLE: Duration = Duration::from_secs(3);

fn main() {
    let t_all = Instant::now();
    println!("# fogmesh BLE benchmark (simulated radio)\n");
    println!("Command: `cargo bench -p fogmesh --bench ble`\n");
    machine();
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    println!("\n## 1. Throughput over one simulated link\n");
    let t1 = Instant::now();
    throughput(&rt);
    println!("\n(part 1 took {:.1} s)", t1.elapsed().as_secs_f64());

    println!("\n## 2. Group message delivery time over 1 to 6 hops\n");
    let t2 = Instant::now();
    hops(&rt);
    println!("\n(part 2 took {:.1} s)", t2.elapsed().as_secs_f64());

    println!(
        "\nWhole benchmark: {:.1} s (after the build)",
        t_all.elapsed().as_secs_f64()
    );
}

fn machine() {
    let out = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "?".into())
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "?".into());
    println!("| machine | |");
    println!("|---|---|");
    println!("| `nproc` | {} |", out("nproc", &[]));
    println!("| `uname -srm` | {} |", out("uname", &["-srm"]));
    println!("| CPU | {cpu} |");
}

// ---------------------------------------------------------------- part 1

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

fn advert(n: u8) -> Advert {
    Advert {
        psm: None,
        peer_hint: [n; 6],
    }
}

fn model(bandwidth: u64) -> LinkModel {
    LinkModel {
        bandwidth,
        ..LinkModel::default()
    }
}

fn throughput(rt: &tokio::runtime::Runtime) {
    let m = LinkModel::default();
    println!(
        "Link model: `LinkModel::default()` with the bandwidth below: MTU {} B, latency {} ms, loss {}, \
         airtime shared by both directions (half-duplex). {} rounds per row, each moving {} s of \
         capacity ({} x bandwidth bytes). Raw: from the first write on the dialler's `Link` to the \
         end of stream on the accepted one. libp2p: connection (Noise + Yamux) already up; from \
         `open_stream` to the end of stream at the receiver. Time per MTU of payload: MTU / \
         measured rate (the model's ideal: MTU / bandwidth).\n",
        m.mtu, m.latency_ms, m.loss, ROUNDS, BYTES_PER_BW, BYTES_PER_BW
    );
    let mut rows = Vec::new();
    for bw in BANDWIDTHS {
        let n = (bw * BYTES_PER_BW) as usize;
        let (mut raw, mut l2p) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let r = rt.block_on(raw_link(model(bw), n));
            let l = rt.block_on(libp2p_stream_over_ble(model(bw), n));
            eprintln!(
                "  bw {bw} round {}: raw {:.3} s, libp2p {:.3} s",
                round + 1,
                r.as_secs_f64(),
                l.as_secs_f64()
            );
            raw.push(r);
            l2p.push(l);
        }
        rows.push((bw, "raw link bytes", n, raw));
        rows.push((bw, "libp2p stream (Noise + Yamux)", n, l2p));
    }
    println!(
        "| link bandwidth | path | bytes | median B/s | range B/s | median % of capacity | range % | median time | median time per MTU of payload (ideal) |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for (bw, path, n, times) in rows {
        let mut rates: Vec<f64> = times.iter().map(|d| n as f64 / d.as_secs_f64()).collect();
        rates.sort_by(f64::total_cmp);
        let mut secs: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
        secs.sort_by(f64::total_cmp);
        let (lo, med, hi) = (rates[0], rates[rates.len() / 2], rates[rates.len() - 1]);
        let pct = |r: f64| 100.0 * r / bw as f64;
        let mtu = m.mtu as f64;
        println!(
            "| {bw} B/s | {path} | {n} | {med:.0} | {lo:.0} – {hi:.0} | {:.1} % | {:.1} – {:.1} % | {:.2} s | {:.2} ms ({:.2} ms) |",
            pct(med),
            pct(lo),
            pct(hi),
            secs[secs.len() / 2],
            1000.0 * mtu / med,
            1000.0 * mtu / bw as f64,
        );
    }
}

/// Raw bytes over one link of a fresh in-process medium.
async fn raw_link(model: LinkModel, n: usize) -> Duration {
    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    let medium = Medium::new(model);
    let a = medium.join(Position { x: 0.0, y: 0.0 });
    let b = medium.join(Position { x: 1.0, y: 0.0 });
    let mut incoming = a.listen(advert(1)).await.expect("listen");
    let mut out = b.connect(a.address()).await.expect("connect");
    let mut inn = incoming
        .next()
        .await
        .expect("incoming stream")
        .expect("link");
    let data = pattern(n);
    let t0 = Instant::now();
    let writer = async {
        out.io.write_all(&data).await.expect("write");
        out.io.close().await.expect("close");
    };
    let reader = async {
        let mut got = Vec::with_capacity(n);
        inn.io.read_to_end(&mut got).await.expect("read");
        (got, t0.elapsed())
    };
    let ((), (got, took)) = futures::join!(writer, reader);
    assert!(got == data, "raw link: every byte, in order");
    drop((a, b));
    took
}

/// One swarm on `medium` at `pos`: BLE transport, Noise, Yamux, and the
/// `libp2p_stream` behaviour.
fn ble_swarm(medium: &Medium, pos: Position) -> libp2p::Swarm<libp2p_stream::Behaviour> {
    let radio: Arc<dyn Radio> = Arc::new(medium.join(pos));
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        // The node's own BLE stack (the daemon builds it with this too).
        .with_other_transport(|key| fogmesh::builder::ble_transport(key, radio))
        .expect("transport")
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// `n` bytes on a libp2p stream over one link of a fresh medium.
async fn libp2p_stream_over_ble(model: LinkModel, n: usize) -> Duration {
    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    use libp2p::StreamProtocol;
    use libp2p::multiaddr::Protocol;
    use libp2p::swarm::SwarmEvent;
    const PROTO: StreamProtocol = StreamProtocol::new("/fogmesh-bench/ble-stream/1");

    let medium = Medium::new(model);
    let common::StreamReceiver {
        addr,
        peer: rx_peer,
        mut incoming,
        task: rx_task,
    } = common::stream_receiver(
        ble_swarm(&medium, Position { x: 0.0, y: 0.0 }),
        fogmesh_ble::listen_addr(),
        PROTO,
    )
    .await;
    let mut tx_swarm = ble_swarm(&medium, Position { x: 1.0, y: 0.0 });
    let mut control = tx_swarm.behaviour().new_control();
    tx_swarm
        .dial(addr.with(Protocol::P2p(rx_peer)))
        .expect("dial");
    let connected = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match tx_swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { .. } => return,
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    panic!("BLE dial failed: {error}")
                }
                _ => {}
            }
        }
    })
    .await;
    connected.expect("libp2p connection over BLE within 30 s");
    let tx_task = tokio::spawn(async move {
        loop {
            tx_swarm.select_next_some().await;
        }
    });

    let data = pattern(n);
    let receiver = tokio::spawn(async move {
        let (_, mut stream) = incoming.next().await.expect("incoming stream");
        let mut got = Vec::with_capacity(n);
        stream.read_to_end(&mut got).await.expect("read");
        (got, Instant::now())
    });
    let t0 = Instant::now();
    let mut stream = control
        .open_stream(rx_peer, PROTO)
        .await
        .expect("open stream");
    stream.write_all(&data).await.expect("send");
    stream.close().await.expect("close");
    let (got, done) = receiver.await.expect("receiver");
    assert!(got == data, "libp2p stream: every byte, in order");
    rx_task.abort();
    tx_task.abort();
    done.duration_since(t0)
}

// ---------------------------------------------------------------- part 2

/// A running `fogmesh radio serve`.
struct RadioMedium {
    child: Child,
    socket: PathBuf,
    /// What it printed about its link model.
    model: Vec<String>,
}

impl RadioMedium {
    fn start(dir: &Path, extra: &[&str]) -> RadioMedium {
        use std::io::{BufRead, BufReader};
        let socket = dir.join("radio.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fogmesh"))
            .args(["radio", "serve"])
            .arg(&socket)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the radio medium");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut model = Vec::new();
        loop {
            match lines.next() {
                Some(Ok(l)) if l == "ready" => break,
                Some(Ok(l)) => model.push(l),
                _ => panic!("the radio medium did not start"),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        RadioMedium {
            child,
            socket,
            model,
        }
    }

    fn arg(&self) -> String {
        format!("sim:{}", self.socket.display())
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn client(s: &Started) -> Client {
    Client::from_data_dir(&s.data_dir).expect("client")
}

async fn ble_peers(c: &Client) -> Vec<String> {
    c.get::<Vec<PeerInfo>>("peers")
        .await
        .map(|v| {
            v.into_iter()
                .filter(|p| p.transport == fogmesh::types::TransportKind::Ble)
                .map(|p| p.peer_id)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether every node has exactly its line neighbours as BLE peers.
async fn line_linked(clients: &[Client], ids: &[String]) -> bool {
    for (i, c) in clients.iter().enumerate() {
        let mut have = ble_peers(c).await;
        have.sort();
        let mut want: Vec<String> = [i.checked_sub(1), Some(i + 1)]
            .into_iter()
            .flatten()
            .filter_map(|j| ids.get(j).cloned())
            .collect();
        want.sort();
        if have != want {
            return false;
        }
    }
    true
}

fn hops(rt: &tokio::runtime::Runtime) {
    // A short path: the unix socket's path is limited to ~100 bytes.
    let tmp = tempfile::tempdir().expect("tempdir");
    let medium = RadioMedium::start(tmp.path(), &["--range", RANGE_M]);
    let t_start = Instant::now();
    let nodes: Vec<Started> = (0..NODES)
        .map(|i| {
            let pos = format!("{},0", i * SPACING_M);
            start_args(
                &tmp.path().join(format!("n{i}")),
                &[
                    "--api",
                    "127.0.0.1:0",
                    "--no-internet",
                    "--ble",
                    &medium.arg(),
                    "--ble-position",
                    &pos,
                ],
            )
        })
        .collect();
    let started = t_start.elapsed();
    println!(
        "Medium: `fogmesh radio serve SOCKET --range {RANGE_M}` ({}; MTU 244 B, loss 0, \
         the `radio serve` defaults). {NODES} daemons `fogmesh run --no-internet --ble sim:SOCKET \
         --ble-position X,0` at X = 0, {SPACING_M}, ..., {}: node i is i hops from node 0.\n",
        medium
            .model
            .iter()
            .find(|l| l.starts_with("range:"))
            .map(String::as_str)
            .unwrap_or("?"),
        (NODES - 1) * SPACING_M
    );
    let clients: Vec<Client> = nodes.iter().map(client).collect();
    let ids: Vec<String> = nodes.iter().map(|n| n.peer_id.clone()).collect();
    rt.block_on(run_hops(&clients, &ids, started));
    for n in nodes {
        stop(n);
    }
    medium.stop();
}

async fn run_hops(clients: &[Client], ids: &[String], started: Duration) {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(90);
    while !line_linked(clients, ids).await {
        assert!(
            Instant::now() < deadline,
            "the line did not link within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let linked = t0.elapsed();

    let t1 = Instant::now();
    let g: GroupAck = clients[0]
        .post(
            "groups",
            &CreateGroup {
                name: "ble-bench".into(),
                description: String::new(),
                members: ids[1..].to_vec(),
            },
        )
        .await
        .expect("create the group");
    let gid = g.group_id;
    let mut has_group = vec![None; clients.len()];
    let deadline = t1 + Duration::from_secs(90);
    while has_group.iter().any(Option::is_none) {
        for (i, c) in clients.iter().enumerate() {
            if has_group[i].is_none()
                && c.get::<serde_json::Value>(&format!("groups/{gid}"))
                    .await
                    .is_ok()
            {
                has_group[i] = Some(t1.elapsed());
            } else if has_group[i].is_none() {
                // Invited: accept at once, as a user who was waiting would.
                let _ = c
                    .post::<_, serde_json::Value>(
                        &format!("groups/{gid}/accept"),
                        &serde_json::json!({}),
                    )
                    .await;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the group did not reach every node within 90 s: {has_group:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let group_everywhere = t1.elapsed();

    // Every node's deliveries, with their arrival time in this process.
    let arrivals: Arc<Mutex<Vec<HashMap<String, Instant>>>> =
        Arc::new(Mutex::new(vec![HashMap::new(); clients.len()]));
    let mut followers = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let arrivals = arrivals.clone();
        let c = c.clone();
        followers.push(tokio::spawn(async move {
            let _ = c
                .follow_events(move |ev| {
                    if let NodeEvent::GroupMessage { id, .. } = ev {
                        let now = Instant::now();
                        arrivals.lock().expect("lock")[i].entry(id).or_insert(now);
                    }
                })
                .await;
        }));
    }
    tokio::time::sleep(SETTLE).await;

    // Post at one per second from node 0, timed around the API call.
    let mut sent: Vec<(String, Instant, Duration)> = Vec::with_capacity(MSGS);
    let first = Instant::now();
    for k in 0..MSGS {
        tokio::time::sleep_until((first + MSG_GAP * k as u32).into()).await;
        let at = Instant::now();
        let r: GroupAck = clients[0]
            .post(
                &format!("groups/{gid}/messages"),
                &PostMessage {
                    text: format!("hop bench {k}"),
                },
            )
            .await
            .expect("post");
        sent.push((r.id.expect("message id"), at, at.elapsed()));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let missing = {
            let arr = arrivals.lock().expect("lock");
            arr.iter()
                .map(|m| sent.iter().filter(|(id, ..)| !m.contains_key(id)).count())
                .sum::<usize>()
        };
        if missing == 0 || Instant::now() > deadline {
            if missing > 0 {
                println!("**{missing} deliveries missing 20 s after the last post**\n");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let still_line = line_linked(clients, ids).await;
    for f in followers {
        f.abort();
    }

    println!(
        "Set-up: {NODES} daemons ready in {:.1} s; line linked (each node has exactly its \
         neighbours as BLE peers) {:.1} s later; group created at node 0 and known to every node \
         {:.1} s later (per node, s: {}); then {:.0} s settling before the first timed message. \
         Still exactly the line at the end: {still_line}.\n",
        started.as_secs_f64(),
        linked.as_secs_f64(),
        group_everywhere.as_secs_f64(),
        has_group
            .iter()
            .map(|d| format!("{:.1}", d.unwrap_or_default().as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        SETTLE.as_secs_f64()
    );

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut acks: Vec<f64> = sent.iter().map(|(_, _, d)| ms(*d)).collect();
    acks.sort_by(f64::total_cmp);
    println!(
        "{MSGS} messages (~{} B of text each) posted by node 0 at one per {:.0} s through \
         `POST /v1/groups/GID/messages`; that call returned after p50 {:.1} ms, max {:.1} ms. \
         Times below are from the start of that call to the `group_message` event on each \
         node's `/v1/events` stream (followed in this process; all clocks are this process's).\n",
        "hop bench 10".len(),
        MSG_GAP.as_secs_f64(),
        pct(&acks, 0.5),
        acks.last().copied().unwrap_or(f64::NAN),
    );

    let arr = arrivals.lock().expect("lock").clone();
    let at = |node: usize, id: &str| arr[node].get(id).copied();
    println!(
        "| hops | node | delivered | p50 ms | p90 ms | max ms | min ms | p50 increment over the previous hop, ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for node in 0..clients.len() {
        let mut lat: Vec<f64> = sent
            .iter()
            .filter_map(|(id, t, _)| at(node, id).map(|a| ms(a.duration_since(*t))))
            .collect();
        lat.sort_by(f64::total_cmp);
        let mut inc: Vec<f64> = if node == 0 {
            Vec::new()
        } else {
            sent.iter()
                .filter_map(|(id, ..)| {
                    let (a, b) = (at(node - 1, id)?, at(node, id)?);
                    Some(ms(b.saturating_duration_since(a)) - ms(a.saturating_duration_since(b)))
                })
                .collect()
        };
        inc.sort_by(f64::total_cmp);
        let label = if node == 0 {
            "0 (sender's own event)".to_owned()
        } else {
            node.to_string()
        };
        println!(
            "| {label} | n{node} | {}/{} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            lat.len(),
            sent.len(),
            pct(&lat, 0.5),
            pct(&lat, 0.9),
            lat.last().copied().unwrap_or(f64::NAN),
            lat.first().copied().unwrap_or(f64::NAN),
            if inc.is_empty() {
                "–".to_owned()
            } else {
                format!("{:.1}", pct(&inc, 0.5))
            }
        );
    }
    if std::env::var_os("FOGMESH_BENCH_VERBOSE").is_some() {
        println!("\nPer message, ms from the call to each node's event:\n");
        for (k, (id, t, d)) in sent.iter().enumerate() {
            let row: Vec<String> = (0..clients.len())
                .map(|n| {
                    at(n, id)
                        .map(|a| format!("{:.0}", ms(a.duration_since(*t))))
                        .unwrap_or_else(|| "-".into())
                })
                .collect();
            println!("msg {k:2} (ack {:.0} ms): {}", ms(*d), row.join(" "));
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
