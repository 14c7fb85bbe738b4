//! Running a scenario with real `fogmesh` daemons under the Shadow network
//! simulator: [`export`] writes what Shadow needs, [`drive`] is the
//! workload driver Shadow starts beside each daemon, and
//! `crate::analyse` turns the daemons' event logs into the same report as
//! an in-process run. Shadow itself is built by hand (see
//! docs/simulator-guide.md).
//!
//! An export directory holds:
//! - `shadow.yaml`: one Shadow host per node (its region's network node,
//!   its IP address, its uplink), each running `fogmesh run` on its
//!   prepared data directory and, where it has a part in the workload
//!   (the admin, the publishers), `fogmesh-sim drive`;
//! - `graph.gml`: the scenario's link model as Shadow's network graph, one
//!   network node per region, an edge per region pair (self-loops for
//!   traffic inside a region) with the one-way latency and the loss;
//! - `nodes/nI/`: node I's data directory: `identity.key` (the key the
//!   seed gives it, so every address and peer id is known before Shadow
//!   starts) and `config.toml` (listen address, bootstrap lines from the
//!   topology, the event log, the admin trusted);
//! - `drive.json`: the driver's plan (times, members, messages);
//! - `export.json`: what `analyse` needs (seed, times, the nodes);
//! - `scenario.toml`: the scenario, as given.
//!
//! Times under Shadow are simulated: its clock starts at 2000-01-01
//! 00:00:00 UTC ([`SHADOW_EPOCH_UNIX_S`]). The daemons start at 1 s, all
//! together or one after another over `--boot-secs` ([`start_ms`]); the
//! admin creates the group at `create_at_s`, once every daemon has had 9 s
//! to dial its topology links, the members (which trust the admin) join,
//! and the workload's model time 0 is `start_at_s`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use fogmesh::client::Client;
use fogmesh::types::{CreateGroup, GroupAck, PostMessage};
use serde::{Deserialize, Serialize};

use crate::plan::{Plan, PlannedMessage, plan};
use crate::scenario::{Scenario, WorkloadKind};
use crate::workload;

/// Shadow's simulated clock starts here (2000-01-01 00:00:00 UTC).
pub const SHADOW_EPOCH_UNIX_S: u64 = 946_684_800;
/// The TCP port every daemon listens on (each Shadow host has its own
/// address).
const P2P_PORT: u16 = 4001;
/// The API address of every daemon (each Shadow host has its own
/// loopback).
const API_ADDR: &str = "127.0.0.1:7070";
/// When the first daemon starts, simulated seconds.
const DAEMON_START_S: u64 = 1;
/// How long after its daemon a driver starts.
const DRIVER_AFTER_MS: u64 = 1000;
/// When the admin creates the group, after the last daemon's start: after
/// every bootstrap dial.
const CREATE_AFTER_BOOT_S: u64 = 9;
/// Seconds after the end of the workload before Shadow stops.
const TAIL_S: u64 = 10;

/// How an export is asked for.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The seed.
    pub seed: u64,
    /// The directory to write (created; must be empty or absent).
    pub out: PathBuf,
    /// The `fogmesh` binary Shadow runs (absolute).
    pub fogmesh: PathBuf,
    /// The `fogmesh-sim` binary Shadow runs as the driver (absolute).
    pub fogmesh_sim: PathBuf,
    /// Simulated seconds the members get to join before the workload.
    pub join_secs: u64,
    /// A check on this host instead of Shadow: every node on 127.0.0.1,
    /// its p2p port `BASE + i` and its API port `BASE + nodes + i`, and
    /// the times counted from the export's own wall-clock second instead
    /// of Shadow's epoch. The processes are then started by whoever runs
    /// the check (see the simulator guide).
    pub local_port: Option<u16>,
    /// Close connections the topology does not hold after this many idle
    /// seconds, with both ends of every topology link holding it (as
    /// in-process). `None`: each link is listed at its dialler only and
    /// every connection is held for the run (an hour's idle timeout).
    pub idle_timeout_secs: Option<u64>,
    /// Start the daemons one after another, evenly over this many
    /// simulated seconds (0: all at once); the group is created after the
    /// last one. Under Shadow only: with `local_port` whoever starts the
    /// processes starts them.
    pub boot_secs: u64,
}

/// What `analyse` needs to know of an export (`export.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportInfo {
    /// The seed the plan came from.
    pub seed: u64,
    /// Unix seconds of Shadow's simulated clock start.
    pub epoch_unix_s: u64,
    /// Simulated seconds (since the start) of the workload's model time 0.
    pub start_at_s: u64,
    /// Whether this is a check on this host's loopback (`--local-port`),
    /// where the link model does not apply.
    #[serde(default)]
    pub local: bool,
    /// Per node: index, peer id, address, event log.
    pub nodes: Vec<ExportNode>,
    /// Scenario settings the daemons cannot take and that therefore differ
    /// from the in-process run (empty when none).
    pub differences: Vec<String>,
}

/// One node of an export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportNode {
    /// Its index in the scenario.
    pub index: usize,
    /// Its peer id (from the prepared identity).
    pub peer_id: String,
    /// Its Shadow host name.
    pub host: String,
    /// Its IP address on Shadow's network.
    pub ip: Ipv4Addr,
    /// Its TCP port.
    pub port: u16,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its `--event-log` file.
    pub event_log: PathBuf,
}

/// The driver's plan (`drive.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrivePlan {
    /// The seed (the message texts are drawn from it as in-process).
    pub seed: u64,
    /// Unix seconds of Shadow's clock start.
    pub epoch_unix_s: u64,
    /// When the admin creates the group (simulated seconds).
    pub create_at_s: u64,
    /// The workload's model time 0 (simulated seconds).
    pub start_at_s: u64,
    /// The group's name.
    pub group_name: String,
    /// Members' indices, the admin first.
    pub members: Vec<usize>,
    /// Every node's peer id.
    pub peer_ids: Vec<String>,
    /// Every node's data directory.
    pub data_dirs: Vec<PathBuf>,
    /// Where the admin's driver writes the group id for the others.
    pub group_id_file: PathBuf,
    /// The planned messages (all of them: each driver sends its own).
    pub messages: Vec<PlannedMessage>,
}

/// The address of node `i` on Shadow's network: 11.0.0.1 onwards (a
/// public range, so the daemons' AutoNAT has no private-address special
/// case to apply).
pub fn node_ip(i: usize) -> Ipv4Addr {
    let n = u32::try_from(i).unwrap_or(u32::MAX - 1) + 1;
    Ipv4Addr::from((11u32 << 24) | n)
}

/// Writes the Shadow export of scenario `s` (`text` is its file) into
/// `opts.out`.
pub fn export(s: &Scenario, text: &str, opts: &ExportOptions) -> anyhow::Result<ExportInfo> {
    exportable(s, opts)?;
    let out = absolute(&opts.out)?;
    if out.exists() && out.read_dir()?.next().is_some() {
        bail!("{} is not empty", out.display());
    }
    std::fs::create_dir_all(out.join("nodes"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    let plan = plan(s, opts.seed);
    let create_at_s = create_at_s(opts.boot_secs);
    let start_at_s = create_at_s + opts.join_secs + s.workload.warmup_secs.ceil() as u64;
    let epoch_unix_s = match opts.local_port {
        Some(_) => SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        None => SHADOW_EPOCH_UNIX_S,
    };
    let nodes = layout(s, &plan, &out, opts.local_port);
    let admin = plan.workload.members.first().copied().unwrap_or(0);
    for (i, node) in nodes.iter().enumerate() {
        prepare_node(
            s,
            &plan,
            &nodes,
            i,
            admin,
            api_addr(s, opts.local_port, i),
            opts,
        )
        .with_context(|| format!("preparing node {i} in {}", node.data_dir.display()))?;
    }

    let differences = differences(s, opts);
    for d in &differences {
        tracing::warn!("{d}");
    }
    let info = ExportInfo {
        seed: opts.seed,
        epoch_unix_s,
        start_at_s,
        local: opts.local_port.is_some(),
        nodes,
        differences,
    };
    let drive = DrivePlan {
        seed: opts.seed,
        epoch_unix_s,
        create_at_s,
        start_at_s,
        group_name: s.name.chars().take(64).collect(),
        members: plan.workload.members.clone(),
        peer_ids: info.nodes.iter().map(|n| n.peer_id.clone()).collect(),
        data_dirs: info.nodes.iter().map(|n| n.data_dir.clone()).collect(),
        group_id_file: out.join("group-id"),
        messages: plan.workload.messages.clone(),
    };
    let stop_s = start_at_s + s.duration_secs.ceil() as u64 + TAIL_S;
    write(&out.join("scenario.toml"), text)?;
    write(
        &out.join("export.json"),
        &serde_json::to_string_pretty(&info)?,
    )?;
    write(
        &out.join("drive.json"),
        &serde_json::to_string_pretty(&drive)?,
    )?;
    write(&out.join("graph.gml"), &gml(s, &plan))?;
    let config = shadow_config(&plan, &info, &out, opts, stop_s);
    write(&out.join("shadow.yaml"), &yaml_serde::to_string(&config)?)?;
    Ok(info)
}

/// Refuses what an export cannot carry.
fn exportable(s: &Scenario, opts: &ExportOptions) -> anyhow::Result<()> {
    if s.ble.is_some() {
        bail!(
            "scenario {}: Shadow has no radio, so scenarios with BLE nodes cannot be exported",
            s.name
        );
    }
    if s.workload.kind != WorkloadKind::Group {
        bail!(
            "scenario {}: only group workloads can be exported so far",
            s.name
        );
    }
    if s.onion.is_some() {
        bail!(
            "scenario {}: [onion] (mix nodes, cover traffic) cannot be exported so far",
            s.name
        );
    }
    if !(s.faults.partition.is_empty() && s.faults.churn.is_empty()) {
        bail!(
            "scenario {}: faults (partition, churn) cannot be exported so far",
            s.name
        );
    }
    if let Some(base) = opts.local_port
        && usize::from(base) + 2 * s.nodes > usize::from(u16::MAX)
    {
        bail!("--local-port {base} leaves no room for {} nodes", s.nodes);
    }
    Ok(())
}

/// Each node's host, address, port, data directory and event log: on
/// Shadow's network, or on loopback from port `local_port`.
fn layout(s: &Scenario, plan: &Plan, out: &Path, local_port: Option<u16>) -> Vec<ExportNode> {
    (0..s.nodes)
        .map(|i| {
            let data_dir = out.join("nodes").join(format!("n{i}"));
            ExportNode {
                index: i,
                peer_id: plan.topology.nodes[i].peer_id.clone(),
                host: format!("n{i}"),
                ip: if local_port.is_some() {
                    Ipv4Addr::LOCALHOST
                } else {
                    node_ip(i)
                },
                port: local_port.map_or(P2P_PORT, |base| base + i as u16),
                event_log: data_dir.join("events.ndjson"),
                data_dir,
            }
        })
        .collect()
}

/// Node `i`'s API address: each Shadow host has its own loopback; on this
/// host's, the ports after the p2p ones.
fn api_addr(s: &Scenario, local_port: Option<u16>, i: usize) -> String {
    match local_port {
        Some(base) => format!("127.0.0.1:{}", base as usize + s.nodes + i),
        None => API_ADDR.to_owned(),
    }
}

/// Settings the in-process simulator applies and the daemons cannot be
/// given, so the two engines differ there.
fn differences(s: &Scenario, opts: &ExportOptions) -> Vec<String> {
    let mut d = Vec::new();
    // GossipParams has no PartialEq: its Debug form names every field.
    let daemon = fogmesh::behaviour::GossipParams::default();
    if format!("{:?}", crate::world::gossip_params(s)) != format!("{daemon:?}") {
        d.push(
            "the scenario's [gossip] parameters are not the daemon's: the daemons run \
             gossipsub with their built-in parameters"
                .to_owned(),
        );
    }
    d.push(
        "the daemons walk the DHT every 300 s (a Kademlia bootstrap) and check their peers every \
         15 s; in-process nodes make no periodic walk and check every 2 s (both make the walks \
         libp2p-kad starts by itself while a table holds fewer than 20 peers)"
            .to_owned(),
    );
    d.push(match opts.idle_timeout_secs {
        None => "the daemons hold every connection for the run (idle timeout 3600 s: a topology \
                 link is asked for by its dialler only); in-process nodes hold the topology's \
                 links at both ends and close other idle connections after 5 model seconds"
            .to_owned(),
        Some(secs) => format!(
            "both ends of a topology link dial it when their daemons start, so a link can be \
             two connections (in-process nodes dial it once); other connections close after \
             {secs} idle seconds (5 in-process)"
        ),
    });
    if opts.boot_secs > 0 && opts.local_port.is_none() {
        d.push(format!(
            "the daemons start one after another over {} simulated seconds, and the group is \
             created {CREATE_AFTER_BOOT_S} s after the last; in-process nodes start one after \
             another as fast as the host builds them, before the workload's clock",
            opts.boot_secs
        ));
    }
    if s.link.loss > 0.0 {
        d.push(format!(
            "loss {}: Shadow drops packets (TCP retransmits), the in-process model delays \
             the frame by a retransmission",
            s.link.loss
        ));
    }
    d
}

/// Node `i`'s data directory: its identity and its `config.toml`.
fn prepare_node(
    s: &Scenario,
    plan: &Plan,
    nodes: &[ExportNode],
    i: usize,
    admin: usize,
    api: String,
    opts: &ExportOptions,
) -> anyhow::Result<()> {
    let node = &nodes[i];
    fogmesh::fsutil::ensure_private_dir(&node.data_dir)?;
    let key = plan.keys[i].to_protobuf_encoding()?;
    fogmesh::fsutil::write_atomic(&fogmesh::identity::path(&node.data_dir), &key, true)?;
    let bootstrap = bootstrap_lines(plan, nodes, i, opts.idle_timeout_secs.is_some());
    let config = NodeConfig {
        listen: vec![format!("/ip4/{}/tcp/{}", node.ip, node.port)],
        bootstrap,
        api,
        mdns: false,
        // Shadow has no SO_REUSEPORT: a dial bound to the listening port
        // fails with "address in use".
        tcp_port_reuse: false,
        event_log: node.event_log.clone(),
        kad_mode: "server".to_owned(),
        min_peers: s.min_peers(),
        // Without the option every connection is held (see
        // `differences`).
        idle_timeout_secs: opts.idle_timeout_secs.unwrap_or(3600),
        max_connections: s.node.max_connections,
        // The workload's rate is the scenario's business, as in-process.
        group_rate: 1e9,
        trust: (i != admin)
            .then(|| nodes[admin].peer_id.clone())
            .into_iter()
            .collect(),
    };
    let text = toml::to_string(&config)?;
    fogmesh::fsutil::write_atomic(
        &node.data_dir.join(fogmesh::config::CONFIG_FILE),
        text.as_bytes(),
        true,
    )?;
    Ok(())
}

/// Node `i`'s bootstrap lines: the topology links it dials, and with
/// `both_ends` also those dialled to it, so that both ends hold each link
/// open when idle (as in-process, where the far end asks for the link
/// once it is up). Two daemons starting together may then dial each other
/// at once and hold two connections for that link.
fn bootstrap_lines(plan: &Plan, nodes: &[ExportNode], i: usize, both_ends: bool) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for &[from, to] in &plan.topology.edges {
        let other = match (from == i, to == i) {
            (true, false) => to,
            (false, true) if both_ends => from,
            _ => continue,
        };
        let addr = p2p_addr(&nodes[other]);
        if !lines.contains(&addr) {
            lines.push(addr);
        }
    }
    lines
}

/// The `config.toml` an export writes (keys as the daemon reads them).
#[derive(Debug, Serialize)]
struct NodeConfig {
    listen: Vec<String>,
    bootstrap: Vec<String>,
    api: String,
    mdns: bool,
    tcp_port_reuse: bool,
    event_log: PathBuf,
    kad_mode: String,
    min_peers: usize,
    idle_timeout_secs: u64,
    max_connections: u32,
    group_rate: f64,
    trust: Vec<String>,
}

/// A node's dialable address with its peer id.
fn p2p_addr(n: &ExportNode) -> String {
    format!("/ip4/{}/tcp/{}/p2p/{}", n.ip, n.port, n.peer_id)
}

/// The link model as a GML graph: a network node per region, an edge per
/// region pair (and a self-loop per region) with its one-way latency and
/// the scenario's loss. Host bandwidths are set per host in
/// `shadow.yaml`; the nodes' defaults are not used.
fn gml(s: &Scenario, plan: &Plan) -> String {
    let mut g = String::from("graph [\n  directed 0\n");
    let regions = plan.latency.len();
    for r in 0..regions {
        let _ = writeln!(
            g,
            "  node [\n    id {r}\n    label \"{}\"\n    host_bandwidth_down \"1 Gbit\"\n    host_bandwidth_up \"1 Gbit\"\n  ]",
            crate::scenario::REGIONS.get(r).copied().unwrap_or("region")
        );
    }
    for a in 0..regions {
        for b in a..regions {
            let _ = writeln!(
                g,
                "  edge [\n    source {a}\n    target {b}\n    latency \"{} us\"\n    packet_loss {}\n  ]",
                (plan.latency[a][b] * 1000.0).round() as u64,
                gml_float(s.link.loss)
            );
        }
    }
    g.push_str("]\n");
    g
}

/// A float as Shadow's GML parser takes it: always with a decimal point
/// (it reads `packet_loss 0` as an integer and refuses the graph).
fn gml_float(x: f64) -> String {
    // `{:?}` of an f64 always has a point or an exponent ("0.0", "0.001").
    let text = format!("{x:?}");
    if text.contains(['.', 'e', 'E']) {
        text
    } else {
        format!("{text}.0")
    }
}

/// `shadow.yaml`, as a value.
#[derive(Debug, Serialize)]
struct ShadowConfig {
    general: General,
    network: Network,
    hosts: BTreeMap<String, Host>,
}

#[derive(Debug, Serialize)]
struct General {
    stop_time: String,
    model_unblocked_syscall_latency: bool,
}

#[derive(Debug, Serialize)]
struct Network {
    graph: Graph,
    use_shortest_path: bool,
}

#[derive(Debug, Serialize)]
struct Graph {
    #[serde(rename = "type")]
    kind: String,
    file: GraphFile,
}

#[derive(Debug, Serialize)]
struct GraphFile {
    path: PathBuf,
}

#[derive(Debug, Serialize)]
struct Host {
    network_node_id: usize,
    ip_addr: Ipv4Addr,
    bandwidth_up: String,
    bandwidth_down: String,
    processes: Vec<Process>,
}

#[derive(Debug, Serialize)]
struct Process {
    path: PathBuf,
    args: Vec<String>,
    environment: BTreeMap<String, String>,
    start_time: String,
    expected_final_state: serde_json::Value,
}

fn shadow_config(
    plan: &Plan,
    info: &ExportInfo,
    out: &Path,
    opts: &ExportOptions,
    stop_s: u64,
) -> ShadowConfig {
    let dir = out.display().to_string();
    let hosts = (info.nodes.iter())
        .map(|n| {
            let data_dir = n.data_dir.display().to_string();
            let mut env = BTreeMap::new();
            env.insert("RUST_LOG".to_owned(), "info".to_owned());
            // One worker thread: Shadow runs every thread of thousands of
            // processes; the daemon needs no more under it.
            env.insert("TOKIO_WORKER_THREADS".to_owned(), "1".to_owned());
            // One malloc arena: glibc's per-thread arenas grow and shrink
            // with mprotect, a system call Shadow handles each time (20k
            // of them per 20 nodes over gossip-100's run; 430 with one).
            env.insert("MALLOC_ARENA_MAX".to_owned(), "1".to_owned());
            let start = start_ms(opts.boot_secs, n.index, info.nodes.len());
            let daemon = Process {
                path: opts.fogmesh.clone(),
                args: vec!["--data-dir".into(), data_dir, "run".into()],
                environment: env.clone(),
                start_time: format!("{start}ms"),
                expected_final_state: serde_json::json!("running"),
            };
            let mut processes = vec![daemon];
            if has_work(plan, n.index) {
                processes.push(Process {
                    path: opts.fogmesh_sim.clone(),
                    args: vec![
                        "drive".into(),
                        dir.clone(),
                        "--node".into(),
                        n.index.to_string(),
                    ],
                    environment: env,
                    start_time: format!("{}ms", start + DRIVER_AFTER_MS),
                    expected_final_state: serde_json::json!({"exited": 0}),
                });
            }
            let host = Host {
                network_node_id: plan.region[n.index],
                ip_addr: n.ip,
                bandwidth_up: format!("{} bit", (plan.uplink[n.index] * 8.0).round() as u64),
                bandwidth_down: "1 Gbit".to_owned(),
                processes,
            };
            (n.host.clone(), host)
        })
        .collect();
    ShadowConfig {
        general: General {
            stop_time: format!("{stop_s}s"),
            model_unblocked_syscall_latency: true,
        },
        network: Network {
            graph: Graph {
                kind: "gml".to_owned(),
                file: GraphFile {
                    path: out.join("graph.gml"),
                },
            },
            use_shortest_path: false,
        },
        hosts,
    }
}

/// When daemon `index` of `nodes` starts, in simulated milliseconds: all
/// at [`DAEMON_START_S`], or evenly spread over the next `boot_secs` (so
/// that a large network does not make every node's first Kademlia walk
/// at the same instant: each connection costs both of its ends buffers,
/// and a daemon's heap keeps its peak).
fn start_ms(boot_secs: u64, index: usize, nodes: usize) -> u64 {
    let spread = (boot_secs * 1000).saturating_mul(index as u64) / nodes.max(1) as u64;
    DAEMON_START_S * 1000 + spread
}

/// When the admin creates the group: [`CREATE_AFTER_BOOT_S`] after the
/// last daemon's start.
fn create_at_s(boot_secs: u64) -> u64 {
    DAEMON_START_S + boot_secs + CREATE_AFTER_BOOT_S
}

/// Whether node `index` has a part in the workload (it is the admin, or
/// it publishes): only those get a driver. Every process costs Shadow a
/// few tens of MB and threads to schedule, and a member that only
/// receives needs nothing from a driver.
fn has_work(plan: &Plan, index: usize) -> bool {
    plan.workload.members.first() == Some(&index)
        || (plan.workload.messages.iter()).any(|m| mine(m, index))
}

/// Whether driver `index` sends planned message `m` (a group message it
/// publishes).
fn mine(m: &PlannedMessage, index: usize) -> bool {
    m.publisher == index && m.to.is_none()
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_owned()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// The workload driver of node `index` in export `dir`: waits for its
/// daemon, creates the group (the admin) or waits for its id (the
/// others), then sends its planned messages at their times, through the
/// daemon's API as the CLI would.
pub async fn drive(dir: &Path, index: usize) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(dir.join("drive.json"))
        .with_context(|| format!("cannot read {}/drive.json", dir.display()))?;
    let plan: DrivePlan = serde_json::from_str(&text).context("drive.json is corrupt")?;
    let data_dir = (plan.data_dirs.get(index)).ok_or_else(|| anyhow!("no node {index}"))?;
    let client = wait_for_daemon(data_dir).await?;
    let at = |secs: u64, ms: f64| {
        UNIX_EPOCH
            + Duration::from_secs(plan.epoch_unix_s + secs)
            + Duration::from_secs_f64(ms.max(0.0) / 1000.0)
    };
    let admin = plan.members.first().copied();
    if admin == Some(index) {
        sleep_until(at(plan.create_at_s, 0.0)).await;
        let others = plan.members.iter().skip(1);
        let group = CreateGroup {
            name: plan.group_name.clone(),
            description: String::new(),
            members: others.map(|&i| plan.peer_ids[i].clone()).collect(),
        };
        let ack: GroupAck = client.post("groups", &group).await?;
        let tmp = plan.group_id_file.with_extension("tmp");
        std::fs::write(&tmp, &ack.group_id)?;
        std::fs::rename(&tmp, &plan.group_id_file)?;
        tracing::info!(group = %ack.group_id, "created the group");
    }
    // The texts are drawn as in-process: one draw per planned message, in
    // order, whoever sends it.
    let texts = workload::texts(&plan.messages, plan.seed);
    let mine: Vec<(&PlannedMessage, String)> = (plan.messages.iter().zip(texts))
        .filter(|(m, _)| mine(m, index))
        .collect();
    if mine.is_empty() {
        return Ok(());
    }
    let gid = wait_for_group_id(&plan.group_id_file).await?;
    let (mut sent, mut failed) = (0usize, 0usize);
    for (m, text) in mine {
        sleep_until(at(plan.start_at_s, m.t_ms)).await;
        let path = format!("groups/{gid}/messages");
        match client
            .post::<_, GroupAck>(&path, &PostMessage { text })
            .await
        {
            Ok(_) => sent += 1,
            Err(e) => {
                failed += 1;
                tracing::warn!("message at {} ms not sent: {e:#}", m.t_ms);
            }
        }
    }
    tracing::info!(sent, failed, "workload done");
    Ok(())
}

async fn sleep_until(t: SystemTime) {
    if let Ok(d) = t.duration_since(SystemTime::now()) {
        tokio::time::sleep(d).await;
    }
}

/// The client of the daemon on `data_dir`, once it answers.
async fn wait_for_daemon(data_dir: &Path) -> anyhow::Result<Client> {
    for _ in 0..600 {
        if let Ok(c) = Client::from_data_dir(data_dir)
            && c.get::<serde_json::Value>("health").await.is_ok()
        {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!(
        "the daemon on {} did not answer within 120 s",
        data_dir.display()
    )
}

/// The group id the admin's driver wrote.
async fn wait_for_group_id(file: &Path) -> anyhow::Result<String> {
    for _ in 0..3000 {
        if let Ok(id) = std::fs::read_to_string(file) {
            return Ok(id.trim().to_owned());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("no group id in {} within 600 s", file.display())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use fogmesh::config::{Overrides, Settings};
    use libp2p::multiaddr::Protocol;
    use libp2p::{Multiaddr, PeerId};

    use super::*;

    /// A small scenario on the world model (several regions, uplinks).
    pub(crate) const SCENARIO: &str = r#"
name = "shadow-test"
nodes = 12
duration_secs = 20
seed = 7
[topology]
kind = "random"
degree = 3
[link]
model = "world"
loss = 0.001
[workload]
members = 12
publishers = 3
rate_per_sec = 2
message_size = 64

[node]
max_connections = 48
"#;

    pub(crate) fn exported(dir: &Path) -> (Scenario, Plan, ExportInfo) {
        exported_with(dir, None)
    }

    /// [`SCENARIO`] exported to `dir` with seed 7 and the given
    /// `--idle-timeout-secs`.
    fn exported_with(dir: &Path, idle_timeout_secs: Option<u64>) -> (Scenario, Plan, ExportInfo) {
        let s: Scenario = toml::from_str(SCENARIO).expect("scenario");
        s.check().expect("valid scenario");
        let info = export(&s, SCENARIO, &options(dir, idle_timeout_secs)).expect("export");
        (s.clone(), plan(&s, 7), info)
    }

    fn options(dir: &Path, idle_timeout_secs: Option<u64>) -> ExportOptions {
        ExportOptions {
            seed: 7,
            out: dir.to_owned(),
            fogmesh: "/opt/fogmesh".into(),
            fogmesh_sim: "/opt/fogmesh-sim".into(),
            join_secs: 30,
            local_port: None,
            idle_timeout_secs,
            boot_secs: 0,
        }
    }

    /// With `--idle-timeout-secs`, both ends of every topology link list
    /// it, and the daemons take that idle timeout.
    #[test]
    fn a_held_topology_lists_both_ends() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("x");
        let (_, plan, info) = exported_with(&dir, Some(5));
        let by_peer: HashMap<String, usize> = (info.nodes.iter())
            .map(|n| (n.peer_id.clone(), n.index))
            .collect();
        let mut links = 0;
        for n in &info.nodes {
            let file = Overrides::load(&n.data_dir).expect("config.toml");
            let set = Settings::resolve(n.data_dir.clone(), file, Overrides::default())
                .expect("the daemon accepts the config");
            assert_eq!(set.idle_timeout, Duration::from_secs(5));
            let mut listed: Vec<usize> = (set.bootstrap.iter())
                .map(|a| match a.iter().last() {
                    Some(Protocol::P2p(id)) => by_peer[&id.to_base58()],
                    _ => panic!("no peer id in {a}"),
                })
                .collect();
            listed.sort_unstable();
            let mut expect: Vec<usize> = (plan.topology.edges.iter())
                .filter_map(|e| match (e[0] == n.index, e[1] == n.index) {
                    (true, false) => Some(e[1]),
                    (false, true) => Some(e[0]),
                    _ => None,
                })
                .collect();
            expect.sort_unstable();
            expect.dedup();
            assert_eq!(listed, expect, "node {}", n.index);
            links += listed.len();
        }
        // Every link is listed at both of its ends.
        let mut undirected: Vec<[usize; 2]> = (plan.topology.edges.iter())
            .map(|e| [e[0].min(e[1]), e[0].max(e[1])])
            .filter(|e| e[0] != e[1])
            .collect();
        undirected.sort_unstable();
        undirected.dedup();
        assert_eq!(links, 2 * undirected.len());
        assert!(
            info.differences
                .iter()
                .any(|d| d.contains("5 idle seconds"))
        );
    }

    /// The `drive.json` an export wrote into `dir`.
    fn drive_plan(dir: &Path) -> DrivePlan {
        let text = std::fs::read_to_string(dir.join("drive.json")).expect("drive.json");
        serde_json::from_str(&text).expect("a drive plan")
    }

    /// With `--boot-secs`, the daemons start one after another over the
    /// window, each driver a second after its daemon, and the group is
    /// created after the last daemon's start.
    #[test]
    fn boot_secs_spreads_the_starts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("x");
        let s: Scenario = toml::from_str(SCENARIO).expect("scenario");
        let opts = ExportOptions {
            boot_secs: 6,
            ..options(&dir, Some(5))
        };
        let info = export(&s, SCENARIO, &opts).expect("export");
        let yaml = std::fs::read_to_string(dir.join("shadow.yaml")).expect("yaml");
        let config: yaml_serde::Value = yaml_serde::from_str(&yaml).expect("valid YAML");
        let ms = |v: &yaml_serde::Value| -> u64 {
            let t = v["start_time"].as_str().expect("start_time");
            t.strip_suffix("ms")
                .expect("in ms")
                .parse()
                .expect("a number")
        };
        let mut starts = Vec::new();
        for n in &info.nodes {
            let p = &config["hosts"][n.host.as_str()]["processes"];
            let daemon = ms(&p[0]);
            if let Some(driver) = p.get(1) {
                assert_eq!(ms(driver), daemon + 1000, "node {}", n.index);
            }
            starts.push((n.index, daemon));
        }
        starts.sort_unstable();
        assert_eq!(starts[0].1, 1000);
        assert!(starts.windows(2).all(|w| w[1].1 > w[0].1), "{starts:?}");
        assert_eq!(starts[11].1, 1000 + 6000 * 11 / 12);
        let drive = drive_plan(&dir);
        assert_eq!(drive.create_at_s, 1 + 6 + 9);
        assert!(drive.start_at_s > drive.create_at_s + 30);
        assert!(
            info.differences
                .iter()
                .any(|d| d.contains("over 6 simulated seconds"))
        );

        // Without it every daemon starts at 1 s and the group at 10 s.
        let dir = tmp.path().join("y");
        exported(&dir);
        let yaml = std::fs::read_to_string(dir.join("shadow.yaml")).expect("yaml");
        let config: yaml_serde::Value = yaml_serde::from_str(&yaml).expect("valid YAML");
        for (_, h) in config["hosts"].as_mapping().expect("hosts") {
            assert_eq!(ms(&h["processes"][0]), 1000);
        }
        let drive = drive_plan(&dir);
        assert_eq!(drive.create_at_s, 10);
    }

    #[test]
    fn export_matches_the_plan() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("x");
        let (s, plan, info) = exported(&dir);

        // The Shadow config parses as YAML and has one host per node, in
        // its region, with its address, uplink and its processes.
        let yaml = std::fs::read_to_string(dir.join("shadow.yaml")).expect("yaml");
        let config: yaml_serde::Value = yaml_serde::from_str(&yaml).expect("valid YAML");
        let hosts = config["hosts"].as_mapping().expect("hosts");
        assert_eq!(hosts.len(), s.nodes);
        for n in &info.nodes {
            let h = &config["hosts"][n.host.as_str()];
            assert_eq!(h["ip_addr"].as_str(), Some(n.ip.to_string().as_str()));
            assert_eq!(
                h["network_node_id"].as_u64(),
                Some(plan.region[n.index] as u64)
            );
            let up = format!("{} bit", (plan.uplink[n.index] * 8.0).round() as u64);
            assert_eq!(h["bandwidth_up"].as_str(), Some(up.as_str()));
            let args = &h["processes"][0]["args"];
            assert_eq!(args[1].as_str(), n.data_dir.to_str());
            assert_eq!(
                h["processes"][0]["expected_final_state"].as_str(),
                Some("running")
            );
            // A driver where the node has a part in the workload, none
            // elsewhere.
            let processes = h["processes"].as_sequence().expect("processes");
            if has_work(&plan, n.index) {
                assert_eq!(processes.len(), 2);
                assert_eq!(
                    h["processes"][1]["args"][3].as_str(),
                    Some(n.index.to_string().as_str())
                );
            } else {
                assert_eq!(processes.len(), 1);
            }
        }
        let drivers = (info.nodes.iter()).filter(|n| has_work(&plan, n.index));
        let publishers: std::collections::HashSet<usize> =
            plan.workload.messages.iter().map(|m| m.publisher).collect();
        assert!(drivers.count() <= publishers.len() + 1);
        assert!(has_work(&plan, plan.workload.members[0]));
        assert!(config["general"]["stop_time"].as_str().is_some());

        // Every prepared identity is the plan's, every config.toml is one
        // the daemon accepts, and every bootstrap line names the peer id
        // of the node at that address, along the topology's edges.
        let by_ip: HashMap<String, &ExportNode> =
            info.nodes.iter().map(|n| (n.ip.to_string(), n)).collect();
        for n in &info.nodes {
            let key = fogmesh::identity::load(&n.data_dir)
                .expect("load")
                .expect("identity");
            assert_eq!(key.public().to_peer_id().to_base58(), n.peer_id);
            assert_eq!(n.peer_id, plan.topology.nodes[n.index].peer_id);
            let file = Overrides::load(&n.data_dir).expect("config.toml");
            let set = Settings::resolve(n.data_dir.clone(), file, Overrides::default())
                .expect("the daemon accepts the config");
            assert_eq!(
                set.listen,
                vec![
                    format!("/ip4/{}/tcp/4001", n.ip)
                        .parse::<Multiaddr>()
                        .expect("addr")
                ]
            );
            assert!(!set.mdns);
            assert!(!set.tcp_port_reuse, "Shadow has no SO_REUSEPORT");
            assert_eq!(set.max_connections, 48, "the scenario's [node]");
            let mut dialled = Vec::new();
            for addr in &set.bootstrap {
                let mut ip = None;
                let mut peer = None;
                for p in addr.iter() {
                    match p {
                        Protocol::Ip4(a) => ip = Some(a.to_string()),
                        Protocol::P2p(id) => peer = Some(id),
                        _ => {}
                    }
                }
                let target = by_ip[&ip.expect("ip")];
                assert_eq!(
                    peer.map(|p: PeerId| p.to_base58()),
                    Some(target.peer_id.clone())
                );
                dialled.push(target.index);
            }
            let mut planned: Vec<usize> = (plan.topology.edges.iter())
                .filter(|e| e[0] == n.index)
                .map(|e| e[1])
                .collect();
            dialled.sort_unstable();
            planned.sort_unstable();
            assert_eq!(dialled, planned, "node {}", n.index);
            let admin = plan.workload.members[0];
            let trusted: Vec<String> = set.trust.iter().map(|p| p.to_base58()).collect();
            let expect: Vec<String> = if n.index == admin {
                vec![]
            } else {
                vec![info.nodes[admin].peer_id.clone()]
            };
            assert_eq!(trusted, expect);
        }

        // The GML graph holds the model's one-way latency for every
        // region pair (in microseconds) and the scenario's loss.
        let gml = std::fs::read_to_string(dir.join("graph.gml")).expect("gml");
        let mut edges = 0;
        for block in gml.split("edge [").skip(1) {
            let field = |name: &str| {
                let line = block
                    .lines()
                    .find(|l| l.trim().starts_with(name))
                    .expect(name);
                line.trim()[name.len()..]
                    .trim()
                    .trim_matches('"')
                    .to_owned()
            };
            let (a, b): (usize, usize) = (
                field("source").parse().expect("a"),
                field("target").parse().expect("b"),
            );
            let us: f64 = field("latency")
                .trim_end_matches(" us")
                .parse()
                .expect("latency");
            assert!((us / 1000.0 - plan.latency[a][b]).abs() < 1e-3, "{a}-{b}");
            assert_eq!(field("packet_loss").parse::<f64>().expect("loss"), 0.001);
            edges += 1;
        }
        let r = plan.latency.len();
        assert_eq!(edges, r * (r + 1) / 2, "every region pair and self-loop");
        assert!(r > 1, "the world model has regions");

        // A second export into a non-empty directory is refused.
        assert!(export(&s, SCENARIO, &options(&dir, None)).is_err());
    }

    /// Shadow 3.3 refuses `packet_loss 0` ("Edge 'packet_loss' is not a
    /// float"): a loss-free scenario's graph must say `0.0`.
    #[test]
    fn gml_floats_have_a_point() {
        assert_eq!(gml_float(0.0), "0.0");
        assert_eq!(gml_float(0.001), "0.001");
        assert_eq!(gml_float(1.0), "1.0");
        let s: Scenario =
            toml::from_str(&SCENARIO.replace("loss = 0.001", "loss = 0.0")).expect("scenario");
        let gml = gml(&s, &plan(&s, 7));
        assert!(gml.contains("packet_loss 0.0\n"), "{gml}");
        assert!(!gml.contains("packet_loss 0\n"), "{gml}");
    }

    #[test]
    fn radio_and_onion_scenarios_are_refused() {
        let s: Scenario =
            toml::from_str("name = \"b\"\nnodes = 4\nduration_secs = 5\n[ble]\nnodes = 2\n")
                .expect("scenario");
        let tmp = tempfile::tempdir().expect("tempdir");
        let opts = ExportOptions {
            out: tmp.path().join("y"),
            ..options(tmp.path(), None)
        };
        let e = export(&s, "", &opts).expect_err("refused");
        assert!(e.to_string().contains("BLE"), "{e}");
        // Mix nodes and cover traffic are not carried over either.
        let mut s = s;
        s.ble = None;
        s.onion = Some(toml::from_str("mix_nodes = 3").expect("onion"));
        let e = export(&s, "", &opts).expect_err("refused");
        assert!(e.to_string().contains("[onion]"), "{e}");
    }
}
