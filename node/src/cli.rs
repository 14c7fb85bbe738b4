//! The `fogmesh` command line: `run` starts the daemon; every other command
//! is a client of a running daemon's local API (except `id`, which reads the
//! identity file).
//!
//! Exit codes: 0 success, 1 nothing found, 2 error or bad usage. Data goes to
//! stdout, diagnostics to stderr.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use libp2p::Multiaddr;
use tracing_subscriber::EnvFilter;

use crate::client::Client;
use crate::config::{self, FileConfig, LogFormat, Overrides, Settings};
use crate::files::FileStatus;
use crate::types::{
    ConnectRequest, ConnectResponse, CreateGroup, GetFile, GroupAck, GroupInfo, GroupMessage,
    MemberRequest, NodeEvent, PeerInfo, PostMessage, ShareFile, Status,
};

/// A peer-to-peer node for messaging and file sharing, with or without the
/// internet.
#[derive(Debug, Parser)]
#[command(name = "fogmesh", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// Data directory (identity, database, API token). Default: the
    /// platform's data directory, e.g. ~/.local/share/fogmesh.
    #[arg(long, global = true, env = "FOGMESH_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node (the daemon).
    Run(RunArgs),
    /// Print this node's peer id (no daemon needed; creates the identity if
    /// there is none).
    Id,
    /// Show the running node's status.
    Status,
    /// List connected peers (exit 1 when there are none).
    Peers,
    /// Connect to a peer.
    Connect {
        /// The peer's multiaddr, e.g. /ip4/192.0.2.1/tcp/7373/p2p/12D3Koo...
        #[arg(value_name = "MULTIADDR")]
        addr: Multiaddr,
    },
    /// Follow the node's events until interrupted.
    Events,
    /// The simulated BLE medium: serve one, or inspect and change it.
    #[command(subcommand)]
    Radio(RadioCommand),
    /// Group chat: create groups, manage members, send and read messages.
    #[command(subcommand)]
    Group(GroupCommand),
    /// File sharing: share files, fetch them from every peer that has them.
    #[command(subcommand)]
    File(FileCommand),
}

#[derive(Debug, Subcommand)]
enum FileCommand {
    /// Share a file: hash it, serve it, announce it in the DHT.
    Share {
        /// The file.
        path: PathBuf,
        /// Share it with this group only: it is encrypted under a new key
        /// that only the group's members receive (in a group message with
        /// the file's link).
        #[arg(long, value_name = "GROUP_ID")]
        group: Option<String>,
    },
    /// Download a file, from every peer that has it; blocks until it is
    /// complete and verified. Run it again to continue after any
    /// interruption.
    Get {
        /// The file id.
        file_id: String,
        /// Where to write it. Default: its name (or id) in the current
        /// directory.
        #[arg(short, long, value_name = "PATH")]
        output: Option<PathBuf>,
        /// Give up (exit 1) when no peer with the file is found for this
        /// many seconds. The daemon keeps looking.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// A share's or download's progress.
    Status {
        /// The file id.
        file_id: String,
    },
    /// Every share and download (exit 1 when none).
    List,
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Create a group; this node is its admin.
    Create {
        /// The group's name (at most 64 bytes; never sent in clear).
        name: String,
        /// A member to add (repeatable).
        #[arg(long = "member", value_name = "PEER_ID")]
        members: Vec<String>,
        /// A description (at most 512 bytes).
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the groups this node knows (exit 1 when none).
    List,
    /// Show one group.
    Show {
        /// The group id.
        group_id: String,
    },
    /// Add a member (admin only).
    Add {
        /// The group id.
        group_id: String,
        /// The peer to add.
        peer_id: String,
    },
    /// Remove a member and rotate the group key (admin only).
    Remove {
        /// The group id.
        group_id: String,
        /// The peer to remove.
        peer_id: String,
    },
    /// Leave a group.
    Leave {
        /// The group id.
        group_id: String,
    },
    /// Send a message; returns once it is durable locally.
    Send {
        /// The group id.
        group_id: String,
        /// The text (at most 64 KiB).
        text: String,
    },
    /// Print delivered messages, in delivery (causal) order.
    Messages {
        /// The group id.
        group_id: String,
        /// Only the last N.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Keep printing new messages as they arrive.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Address to listen on (repeatable; port 0 picks a free port).
    /// Default: TCP and QUIC on 0.0.0.0 port 7373.
    #[arg(
        long = "listen",
        value_name = "MULTIADDR",
        env = "FOGMESH_LISTEN",
        value_delimiter = ','
    )]
    listen: Vec<Multiaddr>,
    /// Peer to dial at start, ending with /p2p/<peer id> (repeatable).
    #[arg(
        long = "bootstrap",
        value_name = "MULTIADDR",
        env = "FOGMESH_BOOTSTRAP",
        value_delimiter = ',',
        value_parser = config::parse_bootstrap
    )]
    bootstrap: Vec<Multiaddr>,
    /// Address of the local API; must be loopback. Default 127.0.0.1:7374.
    #[arg(long, value_name = "HOST:PORT", env = "FOGMESH_API")]
    api: Option<SocketAddr>,
    /// Turn LAN discovery (mDNS) off.
    #[arg(long, env = "FOGMESH_NO_MDNS")]
    no_mdns: bool,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT", env = "FOGMESH_METRICS")]
    metrics: Option<SocketAddr>,
    /// Log format on stderr (the filter comes from RUST_LOG, default info).
    #[arg(long, value_name = "FORMAT", env = "FOGMESH_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Established connections allowed in total. Default 200.
    #[arg(long, value_name = "N")]
    max_connections: Option<u32>,
    /// Below this many connected peers, discovered peers are dialled.
    /// Default 8.
    #[arg(long, value_name = "N")]
    min_peers: Option<usize>,
    /// Seconds a connection with no open stream is kept. Default 300.
    #[arg(long, value_name = "SECS")]
    idle_timeout_secs: Option<u64>,
    /// Gossiped group messages per second accepted from one sender (bursts
    /// of four times as many). Default 50.
    #[arg(long, value_name = "MSGS")]
    group_rate: Option<f64>,
    /// Limit on file uploads, bytes per second, e.g. 20MiB (K, M, G are
    /// powers of 1000; KiB, MiB, GiB powers of 1024). Default: none.
    #[arg(long, value_name = "RATE", env = "FOGMESH_MAX_UPLOAD_RATE", value_parser = config::parse_rate)]
    max_upload_rate: Option<u64>,
    /// Limit on file downloads, bytes per second, e.g. 20MiB. Default: none.
    #[arg(long, value_name = "RATE", env = "FOGMESH_MAX_DOWNLOAD_RATE", value_parser = config::parse_rate)]
    max_download_rate: Option<u64>,
    /// Write every gossip message received on the wire (duplicates
    /// included), every delivery and every publish as NDJSON to this file,
    /// in the gossipsub-interop style (for studies under Shadow).
    #[arg(long, value_name = "PATH", env = "FOGMESH_EVENT_LOG")]
    event_log: Option<PathBuf>,
    /// Turn BLE on: an adapter name such as hci0 (BlueZ; needs a build with
    /// the `bluez` feature), or sim:SOCKET to join a simulated medium run
    /// by `fogmesh radio serve`.
    #[arg(long, value_name = "hci0|sim:SOCKET", env = "FOGMESH_BLE", value_parser = config::parse_ble)]
    ble: Option<config::BleRadio>,
    /// This node's position on a simulated medium, metres. Default 0,0.
    #[arg(long, value_name = "X,Y", env = "FOGMESH_BLE_POSITION", value_parser = config::parse_position, allow_hyphen_values = true)]
    ble_position: Option<fogmesh_ble::sim::Position>,
    /// Turn the IP transports (TCP, QUIC, mDNS) off: an offline peer that
    /// only talks over BLE.
    #[arg(long, env = "FOGMESH_NO_INTERNET")]
    no_internet: bool,
}

#[derive(Debug, Subcommand)]
enum RadioCommand {
    /// Run a simulated BLE medium on a unix socket, for nodes started with
    /// --ble sim:SOCKET (until interrupted).
    Serve {
        /// Path of the unix socket to create.
        #[arg(value_name = "SOCKET")]
        socket: PathBuf,
        /// Radio range, metres.
        #[arg(long, value_name = "METERS", default_value_t = 30.0)]
        range: f64,
        /// Payload throughput of one link, bytes per second.
        #[arg(long, value_name = "BYTES_PER_SEC", default_value_t = 20_000)]
        bandwidth: u64,
        /// One-way latency of a packet, milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 15.0)]
        latency_ms: f64,
        /// Largest payload per radio packet, bytes.
        #[arg(long, value_name = "BYTES", default_value_t = 244)]
        mtu: usize,
        /// Probability that a packet must be sent again.
        #[arg(long, value_name = "P", default_value_t = 0.0)]
        loss: f64,
        /// Mean seconds between random link drops (none by default).
        #[arg(long, value_name = "SECS")]
        drop_mean_secs: Option<f64>,
        /// Most simultaneous links per device.
        #[arg(long, value_name = "N", default_value_t = 8)]
        max_links: usize,
    },
    /// List the devices on a medium, their positions and links.
    List {
        /// The medium's socket.
        #[arg(value_name = "SOCKET")]
        socket: PathBuf,
    },
    /// Move a device on a medium (links to devices now out of range drop).
    Move {
        /// The medium's socket.
        #[arg(value_name = "SOCKET")]
        socket: PathBuf,
        /// The device address, as `fogmesh status` or `radio list` shows it.
        #[arg(value_name = "DEVICE")]
        device: String,
        /// The new position, metres.
        #[arg(value_name = "X,Y", value_parser = config::parse_position, allow_hyphen_values = true)]
        position: fogmesh_ble::sim::Position,
    },
    /// Drop every link of a device on a medium, as a radio reset would.
    Drop {
        /// The medium's socket.
        #[arg(value_name = "SOCKET")]
        socket: PathBuf,
        /// The device address.
        #[arg(value_name = "DEVICE")]
        device: String,
    },
}

/// An error that means "nothing found" (exit code 1) rather than a failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NothingFound(pub String);

/// Parses the command line and runs the command; the process's exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // clap prints help and version on stdout with exit 0, usage
            // errors on stderr with exit 2.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<NothingFound>() => {
            eprintln!("{e:#}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let data_dir = match cli.global.data_dir {
        Some(d) => d,
        None => config::default_data_dir()?,
    };
    let json = cli.global.json;
    match cli.command {
        Command::Run(args) => {
            let file = FileConfig::load(&data_dir)?;
            let settings = Settings::resolve(
                data_dir,
                file,
                Overrides {
                    listen: args.listen,
                    bootstrap: args.bootstrap,
                    api: args.api,
                    no_mdns: args.no_mdns,
                    metrics: args.metrics,
                    log_format: args.log_format,
                    max_connections: args.max_connections,
                    min_peers: args.min_peers,
                    idle_timeout_secs: args.idle_timeout_secs,
                    group_rate: args.group_rate,
                    max_upload_rate: args.max_upload_rate,
                    max_download_rate: args.max_download_rate,
                    event_log: args.event_log,
                    ble: args.ble,
                    ble_position: args.ble_position,
                    no_internet: args.no_internet,
                },
            )?;
            init_logging(settings.log_format, "info");
            runtime()?.block_on(crate::daemon::run(settings))
        }
        Command::Radio(cmd) => {
            init_logging(LogFormat::Text, "info");
            runtime()?.block_on(radio_command(cmd, json))
        }
        Command::Id => {
            init_logging(LogFormat::Text, "warn");
            let key = crate::identity::load_or_create(&data_dir)?;
            let peer_id = key.public().to_peer_id().to_base58();
            if json {
                println!("{}", serde_json::json!({ "peer_id": peer_id }));
            } else {
                println!("{peer_id}");
            }
            Ok(())
        }
        cmd => {
            init_logging(LogFormat::Text, "warn");
            let client = Client::from_data_dir(&data_dir)?;
            runtime()?.block_on(client_command(client, cmd, json))
        }
    }
}

async fn client_command(client: Client, cmd: Command, json: bool) -> anyhow::Result<()> {
    match cmd {
        Command::Status => {
            let s: Status = client.get("status").await?;
            if json {
                print_json(&s)?;
            } else {
                println!("peer_id:   {}", s.peer_id);
                println!("version:   {}", s.version);
                println!("api:       {}", s.api_addr);
                println!(
                    "peers:     {} connected, {} in routing table",
                    s.connected_peers, s.routing_table_peers
                );
                println!("routes:    {}", s.routes.join(", "));
                if let Some(b) = &s.ble {
                    println!(
                        "ble:       device {}, {} neighbours heard, {} links",
                        b.device, b.neighbours, b.links
                    );
                }
                println!("uptime:    {} s", s.uptime_secs);
                for a in &s.listen_addrs {
                    println!("listen:    {a}");
                }
            }
            Ok(())
        }
        Command::Peers => {
            let peers: Vec<PeerInfo> = client.get("peers").await?;
            if json {
                print_json(&peers)?;
            } else {
                for p in &peers {
                    let rtt = p
                        .rtt_ms
                        .map(|r| format!("{r:.1} ms"))
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{}  {:<6} {:>9}  {}",
                        p.peer_id,
                        p.transport,
                        rtt,
                        p.addrs.join(" ")
                    );
                }
            }
            if peers.is_empty() {
                return Err(NothingFound("no connected peers".into()).into());
            }
            Ok(())
        }
        Command::Connect { addr } => {
            let r: ConnectResponse = client
                .post(
                    "connect",
                    &ConnectRequest {
                        addr: addr.to_string(),
                    },
                )
                .await
                .with_context(|| format!("cannot connect to {addr}"))?;
            if json {
                print_json(&r)?;
            } else {
                println!("connected to {} via {}", r.peer_id, r.route);
            }
            Ok(())
        }
        Command::Events => {
            client
                .follow_events(|ev| {
                    if json {
                        if let Ok(line) = serde_json::to_string(&ev) {
                            println!("{line}");
                        }
                    } else {
                        println!("{}", describe(&ev));
                    }
                })
                .await
        }
        Command::Group(cmd) => group_command(client, cmd, json).await,
        Command::File(cmd) => file_command(client, cmd, json).await,
        Command::Run(_) | Command::Id | Command::Radio(_) => {
            unreachable!("handled before a client is made")
        }
    }
}

fn describe(ev: &NodeEvent) -> String {
    match ev {
        NodeEvent::ListenAddr { addr } => format!("listening on {addr}"),
        NodeEvent::PeerConnected {
            peer_id,
            addr,
            transport,
            direction,
        } => format!("connected {peer_id} ({direction}, {transport}, {addr})"),
        NodeEvent::PeerDisconnected { peer_id } => format!("disconnected {peer_id}"),
        NodeEvent::PeerDiscovered { peer_id, via, .. } => format!("discovered {peer_id} via {via}"),
        NodeEvent::GroupMessage {
            group_id,
            sender,
            text,
            ..
        } => format!("[{}] {sender}: {text}", short(group_id)),
        NodeEvent::GroupUpdated { group_id, member } => {
            format!("group {} updated (member: {member})", short(group_id))
        }
        NodeEvent::Lagged { missed } => format!("(missed {missed} events)"),
    }
}

async fn file_command(client: Client, cmd: FileCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        FileCommand::Share { path, group } => {
            let abs = std::path::absolute(&path)
                .with_context(|| format!("bad path {}", path.display()))?;
            let v: serde_json::Value = client
                .post(
                    "files",
                    &ShareFile {
                        path: abs.display().to_string(),
                        group,
                    },
                )
                .await
                .with_context(|| format!("cannot share {}", path.display()))?;
            let st: FileStatus = serde_json::from_value(v.clone()).context("unexpected answer")?;
            if json {
                let mut out = serde_json::json!({
                    "file_id": st.file_id,
                    "size": st.bytes_total,
                    "chunks": st.chunks_total,
                    "name": st.name,
                });
                if let Some(m) = v.get("message_id") {
                    out["message_id"] = m.clone();
                }
                print_json(&out)
            } else {
                println!("{}", st.file_id);
                Ok(())
            }
        }
        FileCommand::Get {
            file_id,
            output,
            timeout,
        } => get_file(&client, &file_id, output, timeout, json).await,
        FileCommand::Status { file_id } => {
            let st: FileStatus = client.get(&format!("files/{file_id}")).await?;
            if json {
                print_json(&st)
            } else {
                println!("file_id: {}", st.file_id);
                println!("state:   {}", st.state);
                if let Some(p) = &st.path {
                    println!("path:    {p}");
                }
                println!(
                    "have:    {} of {} bytes ({} of {} chunks)",
                    st.bytes_have, st.bytes_total, st.chunks_have, st.chunks_total
                );
                println!("sources: {}", st.sources);
                Ok(())
            }
        }
        FileCommand::List => {
            let list: Vec<FileStatus> = client.get("files").await?;
            if json {
                print_json(&list)?;
            } else {
                for st in &list {
                    println!(
                        "{}  {:<11} {:>12} B  {}",
                        st.file_id,
                        st.state,
                        st.bytes_total,
                        st.name.as_deref().unwrap_or("")
                    );
                }
            }
            if list.is_empty() {
                return Err(NothingFound("no shares or downloads".into()).into());
            }
            Ok(())
        }
    }
}

async fn get_file(
    client: &Client,
    file_id: &str,
    output: Option<PathBuf>,
    timeout: u64,
    json: bool,
) -> anyhow::Result<()> {
    let output = output.unwrap_or_else(|| PathBuf::from(file_id));
    let output =
        std::path::absolute(&output).with_context(|| format!("bad path {}", output.display()))?;
    let start = std::time::Instant::now();
    let mut st: FileStatus = client
        .post(
            &format!("files/{file_id}/get"),
            &GetFile {
                output: output.display().to_string(),
            },
        )
        .await?;
    // indicatif draws only when stderr is a terminal.
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(st.bytes_total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        match st.state.as_str() {
            "complete" => break,
            "failed" => {
                bar.abandon();
                anyhow::bail!(
                    "download of {file_id} failed: {}",
                    st.error.unwrap_or_default()
                );
            }
            "searching" if start.elapsed() > std::time::Duration::from_secs(timeout) => {
                bar.abandon();
                return Err(NothingFound(format!(
                    "no peer with file {file_id} found in {timeout} s (the node keeps looking; run this again to wait)"
                ))
                .into());
            }
            _ => {}
        }
        bar.set_length(st.bytes_total);
        bar.set_position(st.bytes_have);
        bar.set_message(format!("{} sources", st.sources));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        st = client.get(&format!("files/{file_id}")).await?;
    }
    bar.finish_and_clear();
    if json {
        print_json(&st)?;
    } else {
        println!("{}", st.path.as_deref().unwrap_or(""));
    }
    Ok(())
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

async fn group_command(client: Client, cmd: GroupCommand, json: bool) -> anyhow::Result<()> {
    let ack = |a: GroupAck| -> anyhow::Result<()> {
        if json {
            print_json(&a)
        } else {
            println!("{}", a.id.as_deref().unwrap_or(&a.group_id));
            Ok(())
        }
    };
    match cmd {
        GroupCommand::Create {
            name,
            members,
            description,
        } => {
            let a: GroupAck = client
                .post(
                    "groups",
                    &CreateGroup {
                        name,
                        description,
                        members,
                    },
                )
                .await?;
            if json {
                print_json(&serde_json::json!({ "group_id": a.group_id }))
            } else {
                println!("{}", a.group_id);
                Ok(())
            }
        }
        GroupCommand::List => {
            let groups: Vec<GroupInfo> = client.get("groups").await?;
            if json {
                print_json(&groups)?;
            } else {
                for g in &groups {
                    println!(
                        "{}  {:<20} {} members, epoch {}",
                        g.group_id,
                        g.name,
                        g.members.len(),
                        g.epoch
                    );
                }
            }
            if groups.is_empty() {
                return Err(NothingFound("no groups".into()).into());
            }
            Ok(())
        }
        GroupCommand::Show { group_id } => {
            let g: GroupInfo = client.get(&format!("groups/{group_id}")).await?;
            if json {
                print_json(&g)
            } else {
                println!("group_id:    {}", g.group_id);
                println!("name:        {}", g.name);
                println!("description: {}", g.description);
                println!("admin:       {}", g.admin);
                println!("epoch:       {}", g.epoch);
                println!("member:      {}", g.is_member);
                for m in &g.members {
                    println!("member:      {m}");
                }
                Ok(())
            }
        }
        GroupCommand::Add { group_id, peer_id } => ack(client
            .post(
                &format!("groups/{group_id}/members"),
                &MemberRequest { peer_id },
            )
            .await?),
        GroupCommand::Remove { group_id, peer_id } => ack(client
            .delete(&format!("groups/{group_id}/members/{peer_id}"))
            .await?),
        GroupCommand::Leave { group_id } => ack(client
            .post(&format!("groups/{group_id}/leave"), &serde_json::json!({}))
            .await?),
        GroupCommand::Send { group_id, text } => ack(client
            .post(
                &format!("groups/{group_id}/messages"),
                &PostMessage { text },
            )
            .await?),
        GroupCommand::Messages {
            group_id,
            limit,
            follow,
        } => {
            let print = |m: &GroupMessage| {
                if json {
                    if let Ok(line) = serde_json::to_string(m) {
                        println!("{line}");
                    }
                } else {
                    println!("{}  {}: {}", m.timestamp, m.sender, m.text);
                }
            };
            let path = match limit {
                Some(n) => format!("groups/{group_id}/messages?limit={n}"),
                None => format!("groups/{group_id}/messages"),
            };
            if !follow {
                let msgs: Vec<GroupMessage> = client.get(&path).await?;
                if json {
                    print_json(&msgs)?;
                } else {
                    msgs.iter().for_each(print);
                }
                return Ok(());
            }
            // Follow: subscribe first, then print the history, then new
            // deliveries, skipping what the history already showed.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let follower = client.clone();
            let events = tokio::spawn(async move {
                follower
                    .follow_events(|ev| {
                        let _ = tx.send(ev);
                    })
                    .await
            });
            let msgs: Vec<GroupMessage> = client.get(&path).await?;
            let mut seen: std::collections::HashSet<String> =
                msgs.iter().map(|m| m.id.clone()).collect();
            msgs.iter().for_each(print);
            while let Some(ev) = rx.recv().await {
                if let NodeEvent::GroupMessage {
                    group_id: g, id, ..
                } = &ev
                    && *g == group_id
                    && seen.insert(id.clone())
                {
                    // Fetch the full record (sequence number, deps).
                    let last: Vec<GroupMessage> = client
                        .get(&format!("groups/{group_id}/messages?limit=64"))
                        .await?;
                    for m in last.iter().filter(|m| m.id == *id) {
                        print(m);
                    }
                }
            }
            events.await.context("event stream task failed")??;
            Ok(())
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn radio_command(cmd: RadioCommand, json: bool) -> anyhow::Result<()> {
    use fogmesh_ble::sim::{self, AdminRequest, LinkModel, Medium};
    let (socket, req) = match cmd {
        RadioCommand::Serve {
            socket,
            range,
            bandwidth,
            latency_ms,
            mtu,
            loss,
            drop_mean_secs,
            max_links,
        } => {
            let model = LinkModel {
                range_m: range,
                mtu,
                bandwidth,
                latency_ms,
                loss,
                drop_mean_secs,
                max_links,
                seed: rand::random(),
            };
            model
                .validate()
                .map_err(|e| anyhow::anyhow!("invalid radio model: {e}"))?;
            // A socket left by a medium that died is in the way; a live one
            // is not ours to take.
            if socket.exists() {
                if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                    anyhow::bail!("a radio medium is already serving {}", socket.display());
                }
                std::fs::remove_file(&socket)
                    .with_context(|| format!("cannot replace {}", socket.display()))?;
            }
            let listener = tokio::net::UnixListener::bind(&socket)
                .with_context(|| format!("cannot listen on {}", socket.display()))?;
            println!("radio medium: {}", socket.display());
            println!("range: {range} m, bandwidth: {bandwidth} B/s, latency: {latency_ms} ms");
            println!("ready");
            let stop = tokio_util::sync::CancellationToken::new();
            let serving = tokio::spawn(sim::serve(listener, Medium::new(model), stop.clone()));
            crate::daemon::wait_for_signal(stop.clone()).await;
            let _ = serving.await;
            let _ = std::fs::remove_file(&socket);
            return Ok(());
        }
        RadioCommand::List { socket } => (socket, AdminRequest::List),
        RadioCommand::Move {
            socket,
            device,
            position,
        } => (socket, AdminRequest::Move { device, position }),
        RadioCommand::Drop { socket, device } => (socket, AdminRequest::Drop { device }),
    };
    let is_list = matches!(req, AdminRequest::List);
    let answer = sim::admin(&socket, req).await?;
    if json || !is_list {
        println!("{answer}");
        return Ok(());
    }
    let devices: Vec<sim::DeviceInfo> =
        serde_json::from_value(answer["devices"].clone()).context("unexpected answer")?;
    for d in &devices {
        let links: Vec<String> = d.links.iter().map(|l| l.to_string()).collect();
        println!(
            "{}  at {:.1},{:.1}  {}  links: {}",
            d.device,
            d.position.x,
            d.position.y,
            if d.advertising {
                "advertising"
            } else {
                "silent     "
            },
            if links.is_empty() {
                "-".into()
            } else {
                links.join(" ")
            }
        );
    }
    if devices.is_empty() {
        return Err(NothingFound("no devices on this medium".into()).into());
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn init_logging(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere() {
        let a = Cli::try_parse_from(["fogmesh", "--json", "status", "--data-dir", "/x"])
            .expect("parse");
        assert!(a.global.json);
        assert_eq!(
            a.global.data_dir.as_deref(),
            Some(std::path::Path::new("/x"))
        );
    }

    #[test]
    fn bad_bootstrap_is_a_usage_error() {
        let e = Cli::try_parse_from(["fogmesh", "run", "--bootstrap", "not-a-multiaddr"])
            .expect_err("must fail");
        assert!(e.to_string().contains("--bootstrap"));
        assert!(e.use_stderr());
    }
}
