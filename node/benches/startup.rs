//! Start-to-ready time and idle memory of the `fogmesh` daemon.
//!
//! Run with `cargo bench -p fogmesh --bench startup`. It starts the real
//! binary on loopback (random ports, temporary data directories, no mDNS)
//! and reports:
//! - start-to-ready: from spawn until the `ready` line on stdout, for a
//!   first start (identity and database created) and for a restart;
//! - idle RSS: VmRSS and VmHWM from /proc after the node has idled, alone and
//!   with one connected peer.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 10;
const IDLE: Duration = Duration::from_secs(10);

struct Started {
    child: Child,
    took: Duration,
    tcp: String,
    peer_id: String,
}

fn start(dir: &std::path::Path, extra: &[&str]) -> Started {
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fogmesh"))
        .args(["run", "--data-dir"])
        .arg(dir)
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--api",
            "127.0.0.1:0",
            "--no-mdns",
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fogmesh");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let (mut tcp, mut peer_id) = (String::new(), String::new());
    for line in lines.by_ref() {
        let line = line.expect("read");
        if line == "ready" {
            break;
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
    let took = t0.elapsed();
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Started {
        child,
        took,
        tcp,
        peer_id,
    }
}

fn stop(mut s: Started) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(s.child.id().to_string())
        .status();
    let _ = s.child.wait();
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("field")
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<28} n={:<3} min {:>7.1} ms  median {:>7.1} ms  max {:>7.1} ms",
        v.len(),
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut first, mut again) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        let dir = tmp.path().join(format!("n{i}"));
        let s = start(&dir, &[]);
        first.push(s.took);
        stop(s);
        let s = start(&dir, &[]);
        again.push(s.took);
        stop(s);
    }
    summary("start-to-ready, first start", first);
    summary("start-to-ready, restart", again);

    let a = start(&tmp.path().join("idle-a"), &[]);
    std::thread::sleep(IDLE);
    println!(
        "idle RSS, alone (after {}s)    VmRSS {} KiB, VmHWM {} KiB",
        IDLE.as_secs(),
        status_kib(a.child.id(), "VmRSS:"),
        status_kib(a.child.id(), "VmHWM:")
    );
    let boot = format!("{}/p2p/{}", a.tcp, a.peer_id);
    let b = start(&tmp.path().join("idle-b"), &["--bootstrap", &boot]);
    std::thread::sleep(IDLE);
    println!(
        "idle RSS, one peer (after {}s) VmRSS {} KiB, VmHWM {} KiB",
        IDLE.as_secs(),
        status_kib(a.child.id(), "VmRSS:"),
        status_kib(a.child.id(), "VmHWM:")
    );
    stop(b);
    stop(a);
}
