//! The Shadow export checked with real processes on this host's loopback:
//! `export-shadow --local-port` lays the same export out on 127.0.0.1,
//! the test starts every node's `fogmesh run` and `fogmesh-sim drive` as
//! Shadow would, and `analyse` must find every message delivered once.
//! (Shadow itself is built by hand; see docs/simulator-guide.md.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SCENARIO: &str = r#"
name = "local-check"
nodes = 6
duration_secs = 6
[topology]
kind = "random"
degree = 3
[workload]
members = 6
publishers = 2
messages = 12
rate_per_sec = 2
message_size = 64
warmup_secs = 1
"#;

fn sim() -> &'static str {
    env!("CARGO_BIN_EXE_fogmesh-sim")
}

/// The `fogmesh` binary, built beside this package's by the workspace.
fn fogmesh() -> PathBuf {
    let p = Path::new(sim()).with_file_name("fogmesh");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo test --workspace` does)",
        p.display()
    );
    p
}

/// A base port with `n` free TCP ports above it.
fn free_base(n: u16) -> u16 {
    for _ in 0..100 {
        let base = 20_000 + (rand_u16() % 30_000);
        let free = (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no {n} free ports");
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    (t.subsec_nanos() ^ std::process::id()) as u16
}

/// Stops the daemons with SIGTERM (they flush their event logs) on drop.
struct Daemons(Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        for c in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn an_export_runs_with_real_daemons_and_analyses_like_a_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let scenario = tmp.path().join("local.toml");
    std::fs::write(&scenario, SCENARIO).expect("scenario");
    let dir = tmp.path().join("export");
    let base = free_base(12);
    let o = Command::new(sim())
        .arg("export-shadow")
        .arg(&scenario)
        .arg("--out")
        .arg(&dir)
        .args(["--join-secs", "5", "--local-port", &base.to_string()])
        .arg("--fogmesh")
        .arg(fogmesh())
        .output()
        .expect("export");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // As Shadow would: every daemon, then every driver.
    let quiet = || Stdio::null();
    let mut daemons = Daemons(Vec::new());
    for i in 0..6 {
        let child = Command::new(fogmesh())
            .arg("--data-dir")
            .arg(dir.join(format!("nodes/n{i}")))
            .arg("run")
            .stdout(quiet())
            .stderr(quiet())
            .spawn()
            .expect("daemon");
        daemons.0.push(child);
    }
    let drivers: Vec<Child> = (0..6)
        .map(|i| {
            Command::new(sim())
                .arg("drive")
                .arg(&dir)
                .args(["--node", &i.to_string()])
                .stdout(quiet())
                .stderr(Stdio::piped())
                .spawn()
                .expect("driver")
        })
        .collect();
    for d in drivers {
        let out = d.wait_with_output().expect("driver");
        assert!(
            out.status.success(),
            "driver failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The last messages' deliveries, then the daemons stop.
    std::thread::sleep(Duration::from_secs(3));
    drop(daemons);

    let o = Command::new(sim())
        .arg("analyse")
        .arg(&dir)
        .output()
        .expect("analyse");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: Value = serde_json::from_slice(&o.stdout).expect("summary");
    let pairs = summary["pairs"].as_u64().expect("pairs");
    assert_eq!(pairs, 12 * 5, "12 messages to 5 members each: {summary}");
    assert_eq!(
        summary["delivered_pairs"].as_u64(),
        Some(pairs),
        "{summary}"
    );
    assert_eq!(summary["app_duplicates"].as_u64(), Some(0));
    assert!(summary["latency_ms"]["p50"].as_f64().is_some());
    assert!(
        summary["physical_limit"].is_null(),
        "no link model on loopback"
    );
    for f in ["summary.json", "summary.csv", "latency_cdf.svg"] {
        assert!(dir.join("report").join(f).exists(), "{f}");
    }
}
