//! Start-to-ready time and idle memory of the `fogmesh` daemon.
//!
//! Run with `cargo bench -p fogmesh --bench startup`. It starts the real
//! binary on loopback (random ports, temporary data directories, no mDNS)
//! and reports:
//! - start-to-ready: from spawn until the `ready` line on stdout, for a
//!   first start (identity and database created) and for a restart;
//! - idle RSS: VmRSS and VmHWM from /proc after the node has idled, alone and
//!   with one connected peer;
//! - idle wake-ups: context switches per second of all the daemon's
//!   threads over 20 s alone (each is a thread woken: timers, actors).

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

/// Context switches so far of every thread of process `pid`.
fn switches(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc tasks");
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|text| {
            text.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
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
    let window = Duration::from_secs(20);
    let before = switches(a.child.id());
    std::thread::sleep(window);
    let after = switches(a.child.id());
    println!(
        "idle wake-ups, alone          {:.1} context switches/s over {}s",
        (after - before) as f64 / window.as_secs_f64(),
        window.as_secs()
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
