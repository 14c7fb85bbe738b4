//! Start-to-ready time and idle memory of the `fogmesh` daemon.
//!
//! Run with `cargo bench -p fogmesh --bench startup`. It starts the real
//! binary on loopback (random ports, temporary data directories, no mDNS)
//! and reports:
//! - start-to-ready: from spawn until the `ready` line on stdout, for a
//!   first start (identity and database created) and for a restart;
//! - idle RSS: VmRSS and VmHWM from /proc after the node has idled, alone and
//!   with one connected peer.

mod common;

use std::time::Duration;

use common::{start, stop};

const RUNS: usize = 10;
const IDLE: Duration = Duration::from_secs(10);

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
    let boot = a.bootstrap_addr();
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
