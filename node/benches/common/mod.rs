//! What the benchmarks share: starting and stopping real daemons.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A daemon started by a benchmark.
pub struct Started {
    pub child: Child,
    /// From spawn to the `ready` line.
    pub took: Duration,
    /// Its TCP listen address (without /p2p).
    pub tcp: String,
    pub peer_id: String,
    pub data_dir: PathBuf,
    /// The metrics address, when started with `--metrics`.
    pub metrics: Option<String>,
    /// The local API address (`host:port`), from the `api:` line.
    pub api: Option<String>,
}

impl Started {
    /// The TCP address with /p2p, for --bootstrap.
    pub fn bootstrap_addr(&self) -> String {
        format!("{}/p2p/{}", self.tcp, self.peer_id)
    }
}

/// Starts `fogmesh run` on loopback with random ports and no mDNS.
pub fn start(dir: &Path, extra: &[&str]) -> Started {
    let mut args = vec![
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
        "--api",
        "127.0.0.1:0",
        "--no-mdns",
    ];
    args.extend_from_slice(extra);
    start_args(dir, &args)
}

/// Starts `fogmesh run --data-dir DIR` with exactly `args` after it (no
/// default listen addresses), and waits for its `ready` line.
pub fn start_args(dir: &Path, args: &[&str]) -> Started {
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fogmesh"))
        .args(["run", "--data-dir"])
        .arg(dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fogmesh");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let (mut tcp, mut peer_id) = (String::new(), String::new());
    let (mut metrics, mut api) = (None, None);
    let mut ready = false;
    for line in lines.by_ref() {
        let line = line.expect("read");
        if line == "ready" {
            ready = true;
            break;
        }
        if let Some(m) = line.strip_prefix("metrics: ") {
            metrics = Some(m.to_owned());
        }
        if let Some(a) = line.strip_prefix("api: ") {
            api = Some(a.to_owned());
        }
        if let Some(p) = line.strip_prefix("peer_id: ") {
            peer_id = p.to_owned();
        }
        if let Some(a) = line
            .strip_prefix("listen: ")
            .filter(|a| a.contains("/tcp/"))
        {
            tcp = a.to_owned();
        }
    }
    assert!(ready, "fogmesh run exited before printing ready: {args:?}");
    let took = t0.elapsed();
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Started {
        child,
        took,
        tcp,
        peer_id,
        data_dir: dir.to_path_buf(),
        metrics,
        api,
    }
}

/// Stops a daemon with SIGTERM and waits for it.
pub fn stop(mut s: Started) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(s.child.id().to_string())
        .status();
    let _ = s.child.wait();
}

/// The receiving side of a libp2p stream measurement: a swarm listening on
/// a transport address, driven by its own task, accepting one protocol.
pub struct StreamReceiver {
    /// The address it listens on.
    pub addr: libp2p::Multiaddr,
    /// Its peer id.
    pub peer: libp2p::PeerId,
    /// Streams opened to it.
    pub incoming: libp2p_stream::IncomingStreams,
    /// The task driving its swarm.
    pub task: tokio::task::JoinHandle<()>,
}

/// Makes `rx` listen on `listen`, waits for its address, accepts `proto` and
/// hands the swarm to a task.
pub async fn stream_receiver(
    mut rx: libp2p::Swarm<libp2p_stream::Behaviour>,
    listen: libp2p::Multiaddr,
    proto: libp2p::StreamProtocol,
) -> StreamReceiver {
    use futures::StreamExt;
    rx.listen_on(listen).expect("listen");
    let addr = loop {
        if let libp2p::swarm::SwarmEvent::NewListenAddr { address, .. } =
            rx.select_next_some().await
        {
            break address;
        }
    };
    let peer = *rx.local_peer_id();
    let incoming = rx.behaviour().new_control().accept(proto).expect("accept");
    let task = tokio::spawn(async move {
        loop {
            rx.select_next_some().await;
        }
    });
    StreamReceiver {
        addr,
        peer,
        incoming,
        task,
    }
}
