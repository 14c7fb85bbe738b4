//! Onion route benchmarks: the Sphinx work a relay and a sender do, and
//! the latency a 3-hop path adds against the delays it was given.
//!
//! Run with `cargo bench -p fogmesh --bench onion` (release), or quickly
//! with `cargo bench --profile dev -p fogmesh --bench onion` (dependencies
//! are built at opt-level 2 in the dev profile, so sphinx-packet and the
//! curve arithmetic run optimised either way). Measured, on one core:
//! 1. **per-hop processing**: `Mixer::process` of fresh packets (MAC,
//!    replay filter, one routing and one payload layer), median and
//!    packets per second per core, beside sphinx-packet's own
//!    `SphinxPacket::process` of the same packets in the same run (the
//!    anchor, without our replay filter and re-encoding);
//! 2. **build**: a packet along 3 mix hops plus the recipient (4 Sphinx
//!    layers) and along 4 mix hops plus the recipient (5 layers, the
//!    maximum), and a SURB of 3 hops plus the sender;
//! 3. **latency over 3 hops**: a packet carried through three relays (one
//!    thread each, holding it for the delay its header gives) to the
//!    recipient, with 50 ms mean delays, against the sum of the sampled
//!    delays: the difference is the processing and queueing cost (links
//!    are in-process channels, no network latency).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use fogmesh_protocols::onion::keys::DEFAULT_EPOCH_MS;
use fogmesh_protocols::onion::packet::{self, Hop, Mixer, Piece, Processed};
use fogmesh_protocols::onion::{MixKeys, sample_delays};
use libp2p::PeerId;
use libp2p::identity::Keypair;

struct Node {
    peer: PeerId,
    mixer: Mixer,
}

fn node() -> Node {
    let k = Keypair::generate_ed25519();
    Node {
        peer: k.public().to_peer_id(),
        mixer: Mixer::new(MixKeys::new(DEFAULT_EPOCH_MS, 0)),
    }
}

fn hop(n: &Node) -> Hop {
    Hop {
        peer: n.peer,
        key: n.mixer.keys().current().1,
    }
}

fn piece() -> Piece {
    Piece::Fragment {
        id: [1; 16],
        index: 0,
        count: 1,
        chunk: vec![7; 1400],
        surb: None,
        reply_to: None,
    }
}

/// CPU time this thread has run, from the scheduler (Linux's
/// `/proc/thread-self/schedstat`, ns); `None` elsewhere. On a shared,
/// loaded machine, packets per CPU second is the per-core figure; wall
/// time counts the time other processes held the core.
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let n: usize = std::env::var("ONION_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut nodes: Vec<Node> = (0..6).map(|_| node()).collect();

    // 1. Per-hop processing at the first relay.
    let route: Vec<Hop> = nodes[1..5].iter().map(hop).collect();
    let packets: Vec<Vec<u8>> = (0..n)
        .map(|_| packet::build(&piece(), &route, &[0, 0, 0, 0]).expect("build"))
        .collect();
    // The baseline first: sphinx-packet alone (parse, process, encode the
    // next hop's packet), no replay filter.
    let secret = (nodes[1].mixer.keys().secrets().next())
        .expect("a current key")
        .secret
        .clone();
    let mut times = Vec::with_capacity(n);
    let start = Instant::now();
    let cpu_start = thread_cpu();
    for p in &packets {
        let t = Instant::now();
        let packet = sphinx_packet::SphinxPacket::from_bytes(p).expect("parse");
        match packet.process(&secret).expect("process").data {
            sphinx_packet::ProcessedPacketData::ForwardHop {
                next_hop_packet, ..
            } => std::hint::black_box(next_hop_packet.to_bytes()),
            _ => panic!("a forward hop"),
        };
        times.push(t.elapsed());
    }
    let total = start.elapsed();
    let cpu = cpu_start.zip(thread_cpu()).map(|(a, b)| b - a);
    let base = median(times);
    println!(
        "sphinx-packet alone: median {base:?}, {:.0} packets/s by the wall clock, {} packets per CPU second",
        n as f64 / total.as_secs_f64(),
        cpu.map_or("?".to_owned(), |c| format!(
            "{:.0}",
            n as f64 / c.as_secs_f64()
        )),
    );
    let mut times = Vec::with_capacity(n);
    let start = Instant::now();
    let cpu_start = thread_cpu();
    for p in &packets {
        let t = Instant::now();
        let out = nodes[1].mixer.process(p).expect("process");
        times.push(t.elapsed());
        assert!(matches!(out, Processed::Forward { .. }));
    }
    let total = start.elapsed();
    let cpu = cpu_start.zip(thread_cpu()).map(|(a, b)| b - a);
    println!(
        "per-hop processing: median {:?}, {:.0} packets/s by the wall clock, {} packets per CPU second ({n} packets of {} bytes)",
        median(times.clone()),
        n as f64 / total.as_secs_f64(),
        cpu.map_or("?".to_owned(), |c| format!(
            "{:.0}",
            n as f64 / c.as_secs_f64()
        )),
        fogmesh_protocols::onion::PACKET_SIZE
    );
    println!(
        "per hop against sphinx-packet alone: {:.2}x the median",
        median(times).as_secs_f64() / base.as_secs_f64()
    );

    // 2. Build times.
    for (label, hops) in [
        ("3 mix hops + recipient", 4),
        ("4 mix hops + recipient (5 layers)", 5),
    ] {
        let route: Vec<Hop> = nodes[1..=hops].iter().map(hop).collect();
        let delays = vec![0; hops];
        let times: Vec<Duration> = (0..n / 4)
            .map(|_| {
                let t = Instant::now();
                packet::build(&piece(), &route, &delays).expect("build");
                t.elapsed()
            })
            .collect();
        println!("build, {label}: median {:?}", median(times));
    }
    let back: Vec<Hop> = nodes[1..=4].iter().map(hop).collect();
    let times: Vec<Duration> = (0..n / 4)
        .map(|_| {
            let t = Instant::now();
            packet::make_surb(&back, &[0, 0, 0, 0], &mut rand::rng()).expect("surb");
            t.elapsed()
        })
        .collect();
    println!("SURB, 3 mix hops + sender: median {:?}", median(times));

    // 3. Latency over 3 relays with 50 ms mean delays.
    let runs = 40;
    let mut extra = Vec::with_capacity(runs);
    let mut sums = Vec::with_capacity(runs);
    let mut totals = Vec::with_capacity(runs);
    let relays: Vec<Node> = nodes.drain(1..4).collect();
    let recipient = nodes.remove(1);
    let route: Vec<Hop> = relays.iter().chain([&recipient]).map(hop).collect();
    // One thread per relay, one per recipient, linked by channels.
    let (tx0, mut rx) = mpsc::channel::<Vec<u8>>();
    let mut handles = Vec::new();
    for mut r in relays {
        let (tx, next_rx) = mpsc::channel::<Vec<u8>>();
        handles.push(std::thread::spawn(move || {
            for p in rx {
                if let Ok(Processed::Forward {
                    delay_ms, packet, ..
                }) = r.mixer.process(&p)
                {
                    std::thread::sleep(Duration::from_millis(delay_ms));
                    if tx.send(packet).is_err() {
                        return;
                    }
                }
            }
        }));
        rx = next_rx;
    }
    let (done_tx, done_rx) = mpsc::channel::<Instant>();
    let mut rcpt = recipient;
    handles.push(std::thread::spawn(move || {
        for p in rx {
            if let Ok(Processed::Deliver(_)) = rcpt.mixer.process(&p) {
                let _ = done_tx.send(Instant::now());
            }
        }
    }));
    for _ in 0..runs {
        let delays = sample_delays(&mut rand::rng(), 4, 50);
        let sum: u64 = delays[..3].iter().sum();
        let p = packet::build(&piece(), &route, &delays).expect("build");
        let t = Instant::now();
        tx0.send(p).expect("send");
        let at = done_rx.recv().expect("delivered");
        let took = at - t;
        sums.push(Duration::from_millis(sum));
        totals.push(took);
        extra.push(took.saturating_sub(Duration::from_millis(sum)));
    }
    drop(tx0);
    for h in handles {
        let _ = h.join();
    }
    println!(
        "3 hops, 50 ms mean delays, {runs} packets: latency median {:?} (sum of sampled delays median {:?}); latency minus its delays: median {:?}, max {:?}",
        median(totals),
        median(sums),
        median(extra.clone()),
        extra.iter().max().copied().unwrap_or_default()
    );
}
