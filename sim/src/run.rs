//! Running a scenario: real fogmesh nodes (the same behaviours, event loop,
//! group actor and storage as `fogmesh run`) on the modelled network, a
//! workload driven through the nodes' own handles, and a record of what
//! every node saw.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use fogmesh::behaviour::{BehaviourConfig, GossipParams};
use fogmesh::builder::{Internet, NodeBuilder, RawStream};
use fogmesh::groups::GroupsConfig;
use fogmesh::node::NodeHandle;
use fogmesh::storage::Store;
use fogmesh::types::{CreateGroup, NodeEvent};
use fogmesh_protocols::groups::{self, GossipFrame};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, Transport};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::net::{SimNet, SimTransport};
use crate::record::{FaultWindow, Published, Receipt, ReceiptKind, RunRecord};
use crate::scenario::{Scenario, world_latency};
use fogmesh_ble::Radio;
use fogmesh_ble::sim::{LinkModel, Medium, Position};

/// How a run is asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The seed (the scenario's unless overridden).
    pub seed: u64,
    /// The time-dilation factor.
    pub dilation: f64,
    /// Where outputs go.
    pub out: PathBuf,
}

/// The generated topology, as written to `topology.json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TopologyOut {
    /// Per node: index, peer id, region, uplink.
    pub nodes: Vec<NodeOut>,
    /// Dials at start: `[from, to]`.
    pub edges: Vec<[usize; 2]>,
}

/// One node of `topology.json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeOut {
    /// Index.
    pub index: usize,
    /// Peer id.
    pub peer_id: String,
    /// Region name.
    pub region: String,
    /// Uplink, bytes per second.
    pub uplink_bps: f64,
    /// `internet`, `ble` or `internet+ble`.
    pub transports: String,
    /// Position on the radio medium, metres (BLE nodes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<[f64; 2]>,
}

/// The generated workload, as written to `workload.json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkloadOut {
    /// Members of the group (node indices; node 0 is the admin).
    pub members: Vec<usize>,
    /// Publishing members.
    pub publishers: Vec<usize>,
    /// Messages: model ms after the workload starts, publisher, size.
    pub messages: Vec<PlannedMessage>,
    /// Partition windows: start, end (model ms) and the small side.
    pub partitions: Vec<(f64, f64, Vec<usize>)>,
    /// Churn windows: start, end (model ms) and the nodes.
    pub churn: Vec<(f64, f64, Vec<usize>)>,
}

/// One planned message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PlannedMessage {
    /// Model ms after the workload starts.
    pub t_ms: f64,
    /// Publisher node.
    pub publisher: usize,
    /// Text size.
    pub size: usize,
}

/// Everything derived from the scenario and the seed alone.
#[derive(Debug)]
pub struct Plan {
    /// Node keys.
    pub keys: Vec<Keypair>,
    /// Region index per node.
    pub region: Vec<usize>,
    /// Uplink per node, bytes/s (model).
    pub uplink: Vec<f64>,
    /// Latency matrix between regions.
    pub latency: Vec<Vec<f64>>,
    /// `topology.json`.
    pub topology: TopologyOut,
    /// `workload.json`.
    pub workload: WorkloadOut,
}

/// Derives topology and workload from the scenario and the seed: the same
/// seed gives the same plan.
pub fn plan(s: &Scenario, seed: u64) -> Plan {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = s.nodes;
    let keys: Vec<Keypair> = (0..n)
        .map(|i| {
            let mut h = Sha256::new();
            h.update(b"fogmesh-sim node key");
            h.update(seed.to_be_bytes());
            h.update((i as u64).to_be_bytes());
            let bytes: [u8; 32] = h.finalize().into();
            Keypair::ed25519_from_bytes(bytes).expect("32 bytes make an ed25519 key")
        })
        .collect();
    let (latency, region): (Vec<Vec<f64>>, Vec<usize>) = match s.link.model.as_str() {
        "world" => (
            world_latency(),
            (0..n).map(|_| rng.random_range(0..8)).collect(),
        ),
        _ => (vec![vec![s.link.latency_ms]], vec![0; n]),
    };
    let mbps = |m: f64| m * 1_000_000.0 / 8.0;
    let uplink: Vec<f64> = (0..n)
        .map(|_| {
            if rng.random::<f64>() < s.link.fast_fraction {
                mbps(s.link.fast_bandwidth_mbps)
            } else {
                mbps(s.link.bandwidth_mbps)
            }
        })
        .collect();
    let mut edges = Vec::new();
    // Internet links join the nodes that have the internet: a prefix of
    // the indices (see `Scenario::internet_nodes`).
    let n_all = n;
    let n = s.internet_nodes();
    match s.topology.kind.as_str() {
        _ if n < 2 => {}
        "ring" => (0..n).for_each(|i| edges.push([i, (i + 1) % n])),
        "line" => (0..n - 1).for_each(|i| edges.push([i, i + 1])),
        "full" => (0..n).for_each(|i| (i + 1..n).for_each(|j| edges.push([i, j]))),
        _ => {
            let mut seen = HashSet::new();
            for i in 0..n {
                let mut others: Vec<usize> = (0..n).filter(|j| *j != i).collect();
                others.shuffle(&mut rng);
                for &j in others.iter().take(s.topology.degree.min(n - 1)) {
                    if seen.insert((i.min(j), i.max(j))) {
                        edges.push([i, j]);
                    }
                }
            }
        }
    }
    let n = n_all;
    let region_name = |r: usize| match s.link.model.as_str() {
        "world" => crate::scenario::REGIONS[r].to_owned(),
        _ => "uniform".to_owned(),
    };
    let topology = TopologyOut {
        nodes: (0..n)
            .map(|i| NodeOut {
                index: i,
                peer_id: keys[i].public().to_peer_id().to_base58(),
                region: region_name(region[i]),
                uplink_bps: uplink[i],
                transports: match (i < s.internet_nodes(), i >= s.first_ble_node()) {
                    (true, true) => "internet+ble",
                    (false, true) => "ble",
                    _ => "internet",
                }
                .into(),
                position: None,
            })
            .collect(),
        edges,
    };
    let mut topology = topology;
    let w = &s.workload;
    let m = if w.members == 0 { n } else { w.members };
    let mut others: Vec<usize> = (1..n).collect();
    others.shuffle(&mut rng);
    let mut members: Vec<usize> = std::iter::once(0)
        .chain(others.into_iter().take(m - 1))
        .collect();
    members.sort_unstable();
    let mut publishers: Vec<usize> = members
        .sample(&mut rng, w.publishers.clamp(1, m))
        .copied()
        .collect();
    publishers.sort_unstable();
    let messages = (0..w.messages)
        .map(|k| PlannedMessage {
            t_ms: k as f64 * 1000.0 / w.rate_per_sec,
            publisher: publishers[k % publishers.len()],
            size: w.message_size,
        })
        .collect();
    let not_pub: Vec<usize> = (1..n).filter(|i| !publishers.contains(i)).collect();
    let partitions = s
        .faults
        .partition
        .iter()
        .map(|p| {
            let k = ((n as f64 * p.fraction).round() as usize).clamp(1, n - 1);
            let mut side: Vec<usize> = (1..n)
                .collect::<Vec<_>>()
                .sample(&mut rng, k)
                .copied()
                .collect();
            side.sort_unstable();
            (
                p.at_secs * 1000.0,
                (p.at_secs + p.duration_secs) * 1000.0,
                side,
            )
        })
        .collect();
    let churn = s
        .faults
        .churn
        .iter()
        .map(|c| {
            let k = (n as f64 * c.fraction).round() as usize;
            let mut down: Vec<usize> = not_pub
                .sample(&mut rng, k.min(not_pub.len()))
                .copied()
                .collect();
            down.sort_unstable();
            (c.at_secs * 1000.0, (c.at_secs + c.down_secs) * 1000.0, down)
        })
        .collect();
    // BLE nodes' places, drawn last so that adding radios leaves the rest
    // of a plan as it was.
    if let Some(b) = &s.ble {
        let first = s.first_ble_node();
        let side = (b.nodes as f64).sqrt().ceil().max(1.0) as usize;
        for k in 0..b.nodes {
            let pos = match b.layout.as_str() {
                "grid" => [
                    (k % side) as f64 * b.spacing_m,
                    (k / side) as f64 * b.spacing_m,
                ],
                "crowd" => [
                    rng.random::<f64>() * b.area_m,
                    rng.random::<f64>() * b.area_m,
                ],
                _ => [k as f64 * b.spacing_m, 0.0],
            };
            topology.nodes[first + k].position = Some(pos);
        }
    }
    Plan {
        keys,
        region,
        uplink,
        latency,
        topology,
        workload: WorkloadOut {
            members,
            publishers,
            messages,
            partitions,
            churn,
        },
    }
}

/// A receipt on its way to the collector.
#[derive(Debug)]
struct Seen {
    at: Instant,
    node: usize,
    id: String,
    kind: ReceiptKind,
}

struct SimNode {
    index: usize,
    key: Keypair,
    data_dir: PathBuf,
    handle: Option<NodeHandle>,
    task: Option<tokio::task::JoinHandle<()>>,
    stop: CancellationToken,
    /// Whether it has the internet.
    internet: bool,
    /// Where its radio stands, if it has one.
    position: Option<Position>,
    /// Bytes its radio sent, over every restart.
    radio_sent: Arc<std::sync::atomic::AtomicU64>,
}

/// What every node shares.
struct World {
    net: Arc<SimNet>,
    gossip: GossipParams,
    dilation: f64,
    seen: mpsc::UnboundedSender<Seen>,
    wire_size: Arc<Mutex<HashMap<String, usize>>>,
    min_peers: usize,
    /// Nodes whose event stream said they are in a group (any group: the
    /// simulator has one).
    joined: Arc<Mutex<HashSet<usize>>>,
    /// The radio medium, when the scenario has BLE nodes.
    medium: Option<Medium>,
}

async fn start_node(world: &World, node: &mut SimNode) -> anyhow::Result<()> {
    let store = {
        let dir = node.data_dir.clone();
        tokio::task::spawn_blocking(move || Store::open_with_cache(&dir, Some(1 << 20))).await??
    };
    let idx = node.index;
    let seen = world.seen.clone();
    let sizes = world.wire_size.clone();
    // Every gossip copy on the wire, duplicates included.
    let observer: fogmesh::behaviour::GossipObserver = Arc::new(move |data: &[u8]| {
        if let Ok(GossipFrame::Message(env)) = groups::decode_gossip(data) {
            let id = hex::encode(env.id().0);
            if let Ok(mut s) = sizes.lock() {
                s.entry(id.clone()).or_insert(data.len());
            }
            let _ = seen.send(Seen {
                at: Instant::now(),
                node: idx,
                id,
                kind: ReceiptKind::Wire,
            });
        }
    });
    // A radio joins the medium now and leaves it when the node stops
    // (dropped with the swarm).
    let radio: Option<Arc<dyn Radio>> = match (&world.medium, node.position) {
        (Some(m), Some(pos)) => Some(Arc::new(m.join_counted(pos, node.radio_sent.clone()))),
        _ => None,
    };
    let internet = if node.internet {
        Internet::Custom(
            SimTransport::new(world.net.clone(), idx)
                .map(|stream, _| Box::new(stream) as Box<dyn RawStream>)
                .boxed(),
        )
    } else {
        Internet::Off
    };
    node.stop = CancellationToken::new();
    let built = NodeBuilder::new(node.key.clone(), store)
        .internet(internet)
        .radio(radio)
        .listen(if node.internet {
            vec![world.net.addr(idx)]
        } else {
            Vec::new()
        })
        .min_peers(world.min_peers)
        .maintenance_interval(Duration::from_secs(2))
        .idle_timeout(Duration::from_secs(3600))
        .behaviour(BehaviourConfig {
            mdns: false,
            max_connections: 1000,
            kad_bootstrap_interval: None,
            gossip: world.gossip.clone(),
            ..BehaviourConfig::default()
        })
        .groups(GroupsConfig {
            // The workload's rate is the scenario's business.
            sender_rate: 1e9,
            ..GroupsConfig::default()
        })
        .time_dilation(world.dilation)
        .observe_gossip(observer)
        .start(node.stop.clone())
        .await?;
    let running = built.running;
    // Deliveries to the application, each checked against what this node
    // already delivered.
    let mut events = running.handle.subscribe();
    let seen = world.seen.clone();
    let joined = world.joined.clone();
    tokio::spawn(async move {
        let mut delivered = HashSet::new();
        loop {
            match events.recv().await {
                Ok(NodeEvent::GroupMessage { id, .. }) => {
                    let kind = if delivered.insert(id.clone()) {
                        ReceiptKind::Delivered
                    } else {
                        ReceiptKind::DuplicateDelivery
                    };
                    let _ = seen.send(Seen {
                        at: Instant::now(),
                        node: idx,
                        id,
                        kind,
                    });
                }
                Ok(NodeEvent::GroupUpdated { member: true, .. }) => {
                    if let Ok(mut j) = joined.lock() {
                        j.insert(idx);
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(
                        node = idx,
                        missed = n,
                        "event stream lagged: deliveries missed in the record"
                    );
                }
                Err(_) => break,
            }
        }
    });
    node.handle = Some(running.handle);
    node.task = Some(running.task);
    Ok(())
}

async fn stop_node(node: &mut SimNode) {
    node.stop.cancel();
    node.handle = None;
    if let Some(t) = node.task.take() {
        let _ = t.await;
    }
}

fn peer_addr(net: &SimNet, keys: &[Keypair], j: usize) -> Multiaddr {
    net.addr(j)
        .with_p2p(keys[j].public().to_peer_id())
        .unwrap_or_else(|a| a)
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> anyhow::Result<()> {
    let f =
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    serde_json::to_writer_pretty(std::io::BufWriter::new(f), v)?;
    Ok(())
}

/// Runs the scenario; writes everything but the report into `opts.out`.
pub async fn run(s: &Scenario, scenario_text: &str, opts: &Options) -> anyhow::Result<RunRecord> {
    let wall = std::time::Instant::now();
    let f = opts.dilation;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let p = plan(s, opts.seed);
    std::fs::write(opts.out.join("scenario.toml"), scenario_text)?;
    write_json(
        &opts.out.join("run.json"),
        &serde_json::json!({
            "scenario": s.name,
            "seed": opts.seed,
            "time_dilation": f,
            "fogmesh_version": env!("CARGO_PKG_VERSION"),
        }),
    )?;
    write_json(&opts.out.join("topology.json"), &p.topology)?;
    write_json(&opts.out.join("workload.json"), &p.workload)?;

    let n = s.nodes;
    let base: u64 = rand::random::<u64>() >> 16;
    let ports: Vec<u64> = (0..n as u64).map(|i| base + i + 1).collect();
    let net = SimNet::new(
        ports,
        p.region.clone(),
        p.latency.clone(),
        p.uplink.clone(),
        s.link.loss,
        f,
        opts.seed,
    );
    let mut lat: Vec<f64> = p.latency.iter().flatten().copied().collect();
    lat.sort_by(f64::total_cmp);
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    let degree = match s.topology.kind.as_str() {
        "random" => s.topology.degree,
        "full" => n - 1,
        _ => 2,
    };
    let world = World {
        net: net.clone(),
        gossip: GossipParams {
            mesh_n: s.gossip.mesh_n,
            mesh_n_low: s.gossip.mesh_n_low,
            mesh_n_high: s.gossip.mesh_n_high,
            mesh_outbound_min: s.gossip.mesh_outbound_min,
            gossip_lazy: s.gossip.gossip_lazy,
            heartbeat: Duration::from_secs_f64(s.gossip.heartbeat_ms / 1000.0),
            heartbeat_initial_delay: Duration::from_secs_f64(s.gossip.heartbeat_ms / 1000.0),
            flood_publish: s.gossip.flood_publish,
        },
        dilation: f,
        seen: seen_tx,
        wire_size: Arc::default(),
        min_peers: degree,
        joined: Arc::default(),
        // The radio model slowed down like the network: latencies longer,
        // links slower, by the dilation factor.
        medium: s.ble.as_ref().map(|b| {
            Medium::new(LinkModel {
                latency_ms: b.link.latency_ms * f,
                bandwidth: ((b.link.bandwidth as f64 / f) as u64).max(100),
                drop_mean_secs: b.link.drop_mean_secs.map(|d| d * f),
                seed: opts.seed,
                ..b.link.clone()
            })
        }),
    };

    // Scheduling lag of this runtime, sampled every 10 ms, from the first
    // message of the workload on (set-up, with its key generation and
    // handshakes, shapes no measured latency).
    let lag: Arc<Mutex<Vec<f64>>> = Arc::default();
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lag_stop = CancellationToken::new();
    {
        let lag = lag.clone();
        let stop = lag_stop.clone();
        let measuring = measuring.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    t = tick.tick() => {
                        let late = Instant::now().duration_since(t).as_secs_f64() * 1000.0;
                        if measuring.load(std::sync::atomic::Ordering::Relaxed)
                            && let Ok(mut l) = lag.lock()
                        {
                            l.push(late / f);
                        }
                    }
                }
            }
        });
    }

    // Node databases in memory where possible: every delivery is an fsync'd
    // commit, and a hundred nodes' fsyncs on one disk would make the host,
    // not the model, set the latencies.
    let shm = Path::new("/dev/shm");
    let dirs = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .context("cannot create the nodes' data directories")?;
    let mut nodes: Vec<SimNode> = p
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| SimNode {
            index: i,
            key: k.clone(),
            data_dir: dirs.path().join(format!("n{i}")),
            handle: None,
            task: None,
            stop: CancellationToken::new(),
            internet: i < s.internet_nodes(),
            position: p.topology.nodes[i].position.map(|[x, y]| Position { x, y }),
            radio_sent: Arc::default(),
        })
        .collect();
    for node in nodes.iter_mut() {
        std::fs::create_dir_all(&node.data_dir)?;
        start_node(&world, node).await?;
    }
    tracing::info!(nodes = n, "nodes started");

    // Connect along the topology's edges, a bounded number at a time.
    let dials: Vec<(NodeHandle, Multiaddr)> = p
        .topology
        .edges
        .iter()
        .filter_map(|[a, b]| Some((nodes[*a].handle.clone()?, peer_addr(&net, &p.keys, *b))))
        .collect();
    // Many at once, but bounded: a barrier per batch would make every batch
    // wait for its slowest (farthest) dial.
    use futures::StreamExt as _;
    let errors: Vec<String> = futures::stream::iter(dials)
        .map(|(h, a)| async move { h.connect(a).await.err().map(|e| e.to_string()) })
        .buffer_unordered(256)
        .filter_map(futures::future::ready)
        .collect()
        .await;
    if !errors.is_empty() {
        let mut why: HashMap<&str, usize> = HashMap::new();
        for e in &errors {
            *why.entry(e.as_str()).or_default() += 1;
        }
        let mut why: Vec<(&str, usize)> = why.into_iter().collect();
        why.sort_by_key(|w| std::cmp::Reverse(w.1));
        tracing::warn!(failed = errors.len(), reasons = ?&why[..why.len().min(3)], "some topology dials failed");
    }

    // The group: node 0 creates it; wait until every member knows it.
    let members = &p.workload.members;
    let peer = |i: usize| p.keys[i].public().to_peer_id();
    let admin = nodes[0]
        .handle
        .clone()
        .ok_or_else(|| anyhow!("node 0 not running"))?;
    let ack = admin
        .groups()
        .create(CreateGroup {
            name: s.name.chars().take(64).collect(),
            description: String::new(),
            members: members
                .iter()
                .skip(1)
                .map(|i| peer(*i).to_base58())
                .collect(),
        })
        .await
        .map_err(|e| anyhow!("cannot create the group: {e}"))?;
    let gid = ack.group_id;
    // Members report joining on their event streams; asking each node
    // directly (a call through its actor) is only the fallback, every 5 s.
    let deadline = Instant::now() + Duration::from_secs(300).mul_f64(f);
    let mut waiting: Vec<usize> = members.clone();
    let mut last_ask = Instant::now();
    while !waiting.is_empty() {
        let joined = world.joined.lock().map(|j| j.clone()).unwrap_or_default();
        waiting.retain(|i| *i != 0 && !joined.contains(i));
        if last_ask.elapsed() >= Duration::from_secs(5) {
            last_ask = Instant::now();
            let mut still = Vec::new();
            for &i in &waiting {
                let Some(h) = nodes[i].handle.clone() else {
                    continue;
                };
                if h.groups().show(&gid).await.is_err() {
                    still.push(i);
                }
            }
            waiting = still;
        }
        if waiting.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{} members never learned of the group: {:?}",
                waiting.len(),
                &waiting[..waiting.len().min(10)]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!("every member knows the group");
    tokio::time::sleep(Duration::from_secs_f64(s.workload.warmup_secs * f)).await;

    // The workload, faults, and the collector, all timed from t0.
    let t0 = Instant::now();
    measuring.store(true, std::sync::atomic::Ordering::Relaxed);
    let model_ms = move |at: Instant| {
        if at >= t0 {
            at.duration_since(t0).as_secs_f64() * 1000.0 / f
        } else {
            -(t0.duration_since(at).as_secs_f64() * 1000.0 / f)
        }
    };
    let events_path = opts.out.join("events.ndjson");
    let mut events_out = std::io::BufWriter::new(
        std::fs::File::create(&events_path)
            .with_context(|| format!("cannot write {}", events_path.display()))?,
    );
    for (i, node) in p.topology.nodes.iter().enumerate() {
        writeln!(
            events_out,
            "{}",
            serde_json::json!({"time": now_rfc3339(), "t_ms": 0.0, "msg": "PeerID", "id": node.peer_id, "node": i})
        )?;
    }
    let (pub_tx, mut pub_rx) =
        mpsc::unbounded_channel::<(usize, Instant, Result<String, String>, usize)>();
    let mut text_rng = StdRng::seed_from_u64(opts.seed ^ 0x7e57);
    for m in &p.workload.messages {
        let Some(h) = nodes[m.publisher].handle.clone() else {
            continue;
        };
        let text: String = (0..m.size)
            .map(|_| text_rng.random_range(b'a'..=b'z') as char)
            .collect();
        let at = t0 + Duration::from_secs_f64(m.t_ms * f / 1000.0);
        let gid = gid.clone();
        let tx = pub_tx.clone();
        let publisher = m.publisher;
        let size = m.size;
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let sent = Instant::now();
            let r = h
                .groups()
                .send(&gid, text)
                .await
                .map_err(|e| e.to_string())
                .and_then(|a| a.id.ok_or_else(|| "no id".to_owned()));
            let _ = tx.send((publisher, sent, r, size));
        });
    }
    drop(pub_tx);
    let end = t0 + Duration::from_secs_f64(s.duration_secs * f);
    let mut faults = Vec::new();
    let mut fault_plan: Vec<(f64, usize, bool)> = Vec::new(); // (model ms, index, is_start)
    for (k, (a, b, _)) in p.workload.partitions.iter().enumerate() {
        fault_plan.push((*a, k, true));
        fault_plan.push((*b, k, false));
        faults.push(FaultWindow {
            kind: "partition".into(),
            start_ms: *a,
            end_ms: *b,
        });
    }
    let np = p.workload.partitions.len();
    for (k, (a, b, _)) in p.workload.churn.iter().enumerate() {
        fault_plan.push((*a, np + k, true));
        fault_plan.push((*b, np + k, false));
        faults.push(FaultWindow {
            kind: "churn".into(),
            start_ms: *a,
            end_ms: *b,
        });
    }
    fault_plan.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut fault_iter = fault_plan.into_iter().peekable();

    let mut published: Vec<Published> = Vec::new();
    let mut receipts: Vec<Receipt> = Vec::new();
    let recipients_of = |publisher: usize| -> Vec<usize> {
        members
            .iter()
            .copied()
            .filter(|m| *m != publisher)
            .collect()
    };
    loop {
        let next_fault = fault_iter
            .peek()
            .map(|(ms, _, _)| t0 + Duration::from_secs_f64(ms * f / 1000.0));
        let wake = next_fault.map_or(end, |t| t.min(end));
        tokio::select! {
            Some(seen) = seen_rx.recv() => {
                let t_ms = model_ms(seen.at);
                let msg = match seen.kind {
                    ReceiptKind::Wire => "Received Message",
                    ReceiptKind::Delivered => "Delivered Message",
                    ReceiptKind::DuplicateDelivery => "Duplicate Delivery",
                };
                writeln!(events_out, "{}", serde_json::json!({"time": now_rfc3339(), "t_ms": t_ms, "msg": msg, "id": seen.id, "node": seen.node}))?;
                receipts.push(Receipt { t_ms, node: seen.node, id: seen.id, kind: seen.kind });
            }
            Some((publisher, at, r, size)) = pub_rx.recv() => {
                let t_ms = model_ms(at);
                match r {
                    Ok(id) => {
                        writeln!(events_out, "{}", serde_json::json!({"time": now_rfc3339(), "t_ms": t_ms, "msg": "Published Message", "id": id, "node": publisher}))?;
                        published.push(Published { id, publisher, t_ms, size, wire_size: 0, recipients: recipients_of(publisher) });
                    }
                    Err(e) => tracing::warn!(publisher, "publish failed: {e}"),
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                if Instant::now() >= end { break; }
                if let Some((_, k, start)) = fault_iter.next() {
                    if k < np {
                        let side = &p.workload.partitions[k].2;
                        if start {
                            let mut sides = vec![0u8; n];
                            for &i in side { sides[i] = 1; }
                            net.partition(sides);
                            tracing::info!(nodes = side.len(), "partition");
                        } else {
                            net.heal();
                            tracing::info!("partition healed");
                        }
                    } else {
                        let down = &p.workload.churn[k - np].2;
                        for &i in down {
                            if start {
                                stop_node(&mut nodes[i]).await;
                            } else if let Err(e) = start_node(&world, &mut nodes[i]).await {
                                tracing::warn!(node = i, "restart failed: {e:#}");
                            }
                        }
                        tracing::info!(nodes = down.len(), up = !start, "churn");
                    }
                }
            }
        }
    }
    // Bytes on the internet links plus bytes over the radio.
    let bytes_sent: Vec<u64> = net
        .bytes_sent()
        .into_iter()
        .zip(&nodes)
        .map(|(b, n)| b + n.radio_sent.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    lag_stop.cancel();
    // Every node stops at once (each waits for its own actors).
    for node in &nodes {
        node.stop.cancel();
    }
    futures::future::join_all(nodes.iter_mut().map(stop_node)).await;
    // Receipts still queued.
    while let Ok(seen) = seen_rx.try_recv() {
        let t_ms = model_ms(seen.at);
        receipts.push(Receipt {
            t_ms,
            node: seen.node,
            id: seen.id,
            kind: seen.kind,
        });
    }
    events_out.flush()?;
    let sizes = world
        .wire_size
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    for m in &mut published {
        m.wire_size = sizes.get(&m.id).copied().unwrap_or(m.size);
    }
    let lag_ms = lag.lock().map(|l| l.clone()).unwrap_or_default();
    Ok(RunRecord {
        scenario: s.name.clone(),
        seed: opts.seed,
        nodes: n,
        time_dilation: f,
        duration_ms: s.duration_secs * 1000.0,
        wall_secs: wall.elapsed().as_secs_f64(),
        peak_rss_kib: peak_rss_kib(),
        published,
        receipts,
        bytes_sent,
        lag_ms,
        faults,
        median_link_latency_ms: lat.get(lat.len() / 2).copied().unwrap_or(0.0),
    })
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// VmHWM of this process, KiB (0 where /proc is not available).
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_plan() {
        let s: Scenario = toml::from_str(
            r#"
            name = "t"
            nodes = 20
            duration_secs = 5
            [workload]
            members = 10
            publishers = 3
            messages = 7
            rate_per_sec = 2
            message_size = 10
            warmup_secs = 1
            [[faults.partition]]
            at_secs = 1
            duration_secs = 1
            fraction = 0.3
            "#,
        )
        .expect("scenario");
        let a = plan(&s, 42);
        let b = plan(&s, 42);
        assert_eq!(a.topology, b.topology);
        assert_eq!(a.workload, b.workload);
        let c = plan(&s, 43);
        assert_ne!(a.topology, c.topology);
        assert_eq!(a.workload.members.len(), 10);
        assert!(a.workload.members.contains(&0));
        assert_eq!(a.workload.publishers.len(), 3);
        assert_eq!(a.workload.partitions[0].2.len(), 6);
    }
}
