//! Group chat throughput and latency between two local daemons.
//!
//! Run with `cargo bench -p fogmesh --bench groups`. Two real daemons on
//! loopback (A and B, members of one group, connected over TCP) are driven
//! through the local API, as a client would:
//! - send throughput: A acknowledges `N` posts (each durable in redb before
//!   its answer), with `IN_FLIGHT` requests outstanding;
//! - delivery throughput: from the first post until B has delivered all `N`
//!   (counted on B's event stream);
//! - send-to-receipt latency: one post at a time at a modest rate, from the
//!   moment A's API is called to the moment B's event stream shows it;
//!   p50, p99 and max over `LAT_N` messages.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{start, stop};
use fogmesh::client::Client;
use fogmesh::types::{CreateGroup, GroupAck, NodeEvent, PostMessage};

const N: usize = 2000;
const IN_FLIGHT: usize = 16;
const LAT_N: usize = 300;
const LAT_GAP: Duration = Duration::from_millis(20);

fn main() {
    // First with the default per-sender gossip rate limit (50 msg/s, bursts
    // of 200), which shapes a flood from one sender; then with the limit out
    // of the way, to see what the pipeline itself does.
    for rate in [None, Some("100000")] {
        match rate {
            None => println!("-- default --group-rate (50 msg/s per sender)"),
            Some(r) => println!("-- --group-rate {r}"),
        }
        let extra: Vec<&str> = rate.map(|r| vec!["--group-rate", r]).unwrap_or_default();
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = start(&tmp.path().join("a"), &extra);
        let mut b_args = extra.clone();
        let boot = a.bootstrap_addr();
        // B joins A's group without an invitation to accept.
        b_args.extend(["--bootstrap", boot.as_str(), "--trust", a.peer_id.as_str()]);
        let b = start(&tmp.path().join("b"), &b_args);
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(run(&a.data_dir, &b.data_dir, &b.peer_id));
        stop(b);
        stop(a);
    }
}

async fn run(a_dir: &std::path::Path, b_dir: &std::path::Path, b_id: &str) {
    let ca = Client::from_data_dir(a_dir).expect("client A");
    let cb = Client::from_data_dir(b_dir).expect("client B");
    let g: GroupAck = ca
        .post(
            "groups",
            &CreateGroup {
                name: "bench".into(),
                description: String::new(),
                members: vec![b_id.to_owned()],
            },
        )
        .await
        .expect("create");
    let gid = g.group_id.clone();
    // Wait until B knows the group and the gossip mesh has formed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cb
        .get::<serde_json::Value>(&format!("groups/{gid}"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "B never learned the group");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // B's deliveries, with their arrival time.
    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    {
        let arrivals = arrivals.clone();
        let cb = cb.clone();
        tokio::spawn(async move {
            let _ = cb
                .follow_events(move |ev| {
                    if let NodeEvent::GroupMessage { id, .. } = ev {
                        arrivals.lock().expect("lock").insert(id, Instant::now());
                    }
                })
                .await;
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Throughput.
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = Vec::with_capacity(N);
    for i in 0..N {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let ca = ca.clone();
        let path = format!("groups/{gid}/messages");
        tasks.push(tokio::spawn(async move {
            let r: GroupAck = ca
                .post(
                    &path,
                    &PostMessage {
                        text: format!("throughput {i} {}", "x".repeat(100)),
                    },
                )
                .await
                .expect("post");
            drop(permit);
            r.id.expect("id")
        }));
    }
    let mut ids = Vec::with_capacity(N);
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    let acked = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let have = {
            let arr = arrivals.lock().expect("lock");
            ids.iter().filter(|id| arr.contains_key(*id)).count()
        };
        if have == N {
            break;
        }
        if Instant::now() > deadline {
            println!("delivery incomplete: {have}/{N} after 300 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = {
        let arr = arrivals.lock().expect("lock");
        ids.iter().filter_map(|id| arr.get(id)).max().copied()
    };
    let delivered = last.map(|l| l.duration_since(t0)).unwrap_or_default();
    println!(
        "send throughput:     {N} posts of ~120 B, {IN_FLIGHT} in flight: {:.0} msg/s acknowledged (durable) by A",
        N as f64 / acked.as_secs_f64()
    );
    println!(
        "delivery throughput: all {N} delivered at B after {:.2} s: {:.0} msg/s",
        delivered.as_secs_f64(),
        N as f64 / delivered.as_secs_f64()
    );

    // Latency.
    let mut lat = Vec::with_capacity(LAT_N);
    for i in 0..LAT_N {
        let sent = Instant::now();
        let r: GroupAck = ca
            .post(
                &format!("groups/{gid}/messages"),
                &PostMessage {
                    text: format!("latency {i}"),
                },
            )
            .await
            .expect("post");
        let id = r.id.expect("id");
        let deadline = sent + Duration::from_secs(30);
        loop {
            if let Some(at) = arrivals.lock().expect("lock").get(&id) {
                lat.push(at.duration_since(sent));
                break;
            }
            if Instant::now() > deadline {
                println!("message {i} not delivered within 30 s");
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        tokio::time::sleep(LAT_GAP).await;
    }
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |p: f64| ms(lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)]);
    println!(
        "send-to-receipt:     n={} p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (API call at A to event at B)",
        lat.len(),
        pct(0.50),
        pct(0.99),
        ms(*lat.last().expect("some"))
    );
}
