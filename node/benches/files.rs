//! File transfer benchmarks.
//!
//! Run with `cargo bench -p fogmesh --bench files` (set
//! `FOGMESH_BENCH_SKIP_4G=1` to leave out the 4 GiB run). Measured, in one
//! run, on loopback:
//! 1. single-source throughput of a 1 GiB file between two `fogmesh`
//!    daemons, side by side with a plain libp2p stream over the same
//!    transport (TCP, Noise, Yamux; two swarms in one process) and a plain
//!    TCP copy, each reading the source file and writing the destination
//!    file, as the daemons do;
//! 2. aggregate throughput from 1, 2 and 4 sources each limited with
//!    `--max-upload-rate`;
//! 3. bytes sent again after a `kill -9` of the downloader half-way;
//! 4. peak RSS (VmHWM) of both daemons during a 4 GiB + 1 byte transfer.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Started, start, stop};
use fogmesh::client::Client;
use fogmesh::files::FileStatus;
use fogmesh::types::{ConnectRequest, ConnectResponse, GetFile, ShareFile};

const MIB: u64 = 1024 * 1024;

fn main() {
    let tmp =
        tempfile::tempdir_in(std::env::var("FOGMESH_BENCH_DIR").unwrap_or_else(|_| ".".into()))
            .expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    println!("== single source, 1 GiB ==");
    let src = tmp.path().join("one-gib.bin");
    write_random(&src, 1024 * MIB, 1);
    let fog = rt.block_on(fogmesh_transfer(tmp.path(), &src, &[], "single"));
    let tcp = plain_tcp_copy(&src, &tmp.path().join("tcp-out.bin"));
    let l2p = rt.block_on(libp2p_stream_copy(&src, &tmp.path().join("stream-out.bin")));
    let rate = |d: Duration| (1024 * MIB) as f64 / MIB as f64 / d.as_secs_f64();
    println!(
        "fogmesh file get:    {:7.1} MiB/s ({:.2} s)",
        rate(fog),
        fog.as_secs_f64()
    );
    println!(
        "plain libp2p stream: {:7.1} MiB/s ({:.2} s)",
        rate(l2p),
        l2p.as_secs_f64()
    );
    println!(
        "plain TCP copy:      {:7.1} MiB/s ({:.2} s)",
        rate(tcp),
        tcp.as_secs_f64()
    );
    println!(
        "fogmesh / libp2p stream: {:.0} %; fogmesh / TCP: {:.0} %",
        100.0 * l2p.as_secs_f64() / fog.as_secs_f64(),
        100.0 * tcp.as_secs_f64() / fog.as_secs_f64()
    );
    let _ = std::fs::remove_file(&src);

    if std::env::var("FOGMESH_BENCH_ONLY").is_ok_and(|v| v == "single") {
        return;
    }
    println!("== throttled sources (each --max-upload-rate 2MiB), 32 MiB ==");
    let src = tmp.path().join("throttled.bin");
    write_random(&src, 32 * MIB, 2);
    for k in [1usize, 2, 4] {
        let d = rt.block_on(multi_source(tmp.path(), &src, k));
        println!(
            "{k} source(s): {:6.2} MiB/s aggregate ({:.2} s)",
            32.0 / d.as_secs_f64(),
            d.as_secs_f64()
        );
    }

    println!("== resume after kill -9, 64 MiB at --max-upload-rate 8MiB ==");
    let src = tmp.path().join("resume.bin");
    write_random(&src, 64 * MIB, 3);
    rt.block_on(resume(tmp.path(), &src));

    if std::env::var_os("FOGMESH_BENCH_SKIP_4G").is_none() {
        println!("== 4 GiB + 1 byte, single source ==");
        let src = tmp.path().join("four-gib.bin");
        write_random(&src, 4096 * MIB + 1, 4);
        rt.block_on(big(tmp.path(), &src));
    }
}

/// Fast reproducible incompressible bytes (xorshift64*).
fn write_random(path: &Path, size: u64, seed: u64) {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, File::create(path).expect("create"));
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for c in buf.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            c.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    f.flush().expect("flush");
}

async fn share(c: &Client, path: &Path) -> String {
    let st: FileStatus = c
        .post(
            "files",
            &ShareFile {
                path: path.display().to_string(),
                group: None,
            },
        )
        .await
        .expect("share");
    st.file_id
}

/// Starts a download and waits for it; returns the time from the request.
async fn get(c: &Client, id: &str, out: &Path) -> Duration {
    let t0 = Instant::now();
    let _: FileStatus = c
        .post(
            &format!("files/{id}/get"),
            &GetFile {
                output: out.display().to_string(),
                link: None,
            },
        )
        .await
        .expect("get");
    wait_complete(c, id).await;
    t0.elapsed()
}

async fn wait_complete(c: &Client, id: &str) {
    loop {
        let st: FileStatus = c.get(&format!("files/{id}")).await.expect("status");
        match st.state.as_str() {
            "complete" => return,
            "failed" => panic!("download failed: {:?}", st.error),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn client(s: &Started) -> Client {
    Client::from_data_dir(&s.data_dir).expect("client")
}

async fn fogmesh_transfer(dir: &Path, src: &Path, extra: &[&str], tag: &str) -> Duration {
    let a = start(&dir.join(format!("{tag}-a")), extra);
    let mut b_args: Vec<&str> = extra.to_vec();
    let boot = a.bootstrap_addr();
    b_args.extend(["--bootstrap", &boot]);
    let b = start(&dir.join(format!("{tag}-b")), &b_args);
    let id = share(&client(&a), src).await;
    let out = dir.join(format!("{tag}-out.bin"));
    let d = get(&client(&b), &id, &out).await;
    stop(b);
    stop(a);
    let _ = std::fs::remove_file(out);
    d
}

fn plain_tcp_copy(src: &Path, dst: &Path) -> Duration {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let dst = dst.to_path_buf();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut out = File::create(&dst).expect("create");
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = s.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).expect("write");
        }
        out.sync_all().expect("sync");
        let _ = std::fs::remove_file(&dst);
    });
    let t0 = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let mut f = File::open(src).expect("open");
    std::io::copy(&mut f, &mut s).expect("copy");
    drop(s);
    receiver.join().expect("receiver");
    t0.elapsed()
}

async fn libp2p_stream_copy(src: &Path, dst: &Path) -> Duration {
    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    use libp2p::{Multiaddr, StreamProtocol, SwarmBuilder, noise, tcp, yamux};
    const PROTO: StreamProtocol = StreamProtocol::new("/fogmesh-bench/stream/1");
    let build = || {
        SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .expect("tcp")
            .with_behaviour(|_| libp2p_stream::Behaviour::new())
            .expect("behaviour")
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build()
    };
    let common::StreamReceiver {
        addr,
        peer: rx_peer,
        mut incoming,
        ..
    } = common::stream_receiver(
        build(),
        "/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>().expect("ma"),
        PROTO,
    )
    .await;
    let mut tx_swarm = build();
    let mut control = tx_swarm.behaviour().new_control();
    tx_swarm.dial(addr).expect("dial");
    tokio::spawn(async move {
        loop {
            tx_swarm.select_next_some().await;
        }
    });
    let dst = dst.to_path_buf();
    let receiver = tokio::spawn(async move {
        let (_, mut stream) = incoming.next().await.expect("incoming stream");
        let mut out = File::create(&dst).expect("create");
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = stream.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).expect("write");
        }
        out.sync_all().expect("sync");
        let _ = std::fs::remove_file(&dst);
    });
    let t0 = Instant::now();
    let mut stream = loop {
        match control.open_stream(rx_peer, PROTO).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let mut f = File::open(src).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n]).await.expect("send");
    }
    stream.close().await.expect("close");
    receiver.await.expect("receiver");
    t0.elapsed()
}

async fn multi_source(dir: &Path, src: &Path, k: usize) -> Duration {
    let tag = format!("multi{k}");
    let sources: Vec<Started> = (0..k)
        .map(|i| {
            start(
                &dir.join(format!("{tag}-s{i}")),
                &["--max-upload-rate", "2MiB"],
            )
        })
        .collect();
    let mut id = String::new();
    for s in &sources {
        id = share(&client(s), src).await;
    }
    let d = start(&dir.join(format!("{tag}-d")), &[]);
    let cd = client(&d);
    for s in &sources {
        let _: ConnectResponse = cd
            .post(
                "connect",
                &ConnectRequest {
                    addr: s.bootstrap_addr(),
                },
            )
            .await
            .expect("connect");
    }
    let out = dir.join(format!("{tag}-out.bin"));
    let took = get(&cd, &id, &out).await;
    stop(d);
    for s in sources {
        stop(s);
    }
    let _ = std::fs::remove_file(out);
    took
}

fn metric(addr: &str, name: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(addr).expect("metrics");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read");
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

async fn resume(dir: &Path, src: &Path) {
    let size = std::fs::metadata(src).expect("meta").len();
    let a = start(
        &dir.join("resume-a"),
        &["--max-upload-rate", "8MiB", "--metrics", "127.0.0.1:0"],
    );
    let metrics = a.metrics.clone().expect("metrics address");
    let id = share(&client(&a), src).await;
    let b_dir: PathBuf = dir.join("resume-b");
    let boot = a.bootstrap_addr();
    let mut b = start(&b_dir, &["--bootstrap", &boot]);
    let out = dir.join("resume-out.bin");
    let cb = client(&b);
    let _: FileStatus = cb
        .post(
            &format!("files/{id}/get"),
            &GetFile {
                output: out.display().to_string(),
                link: None,
            },
        )
        .await
        .expect("get");
    loop {
        let st: FileStatus = cb.get(&format!("files/{id}")).await.expect("status");
        if st.bytes_have >= size / 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = b.child.kill();
    let _ = b.child.wait();
    let at_kill = metric(&metrics, "fogmesh_file_bytes_uploaded_total");
    let b2 = start(&b_dir, &["--bootstrap", &boot]);
    wait_complete(&client(&b2), &id).await;
    let total = metric(&metrics, "fogmesh_file_bytes_uploaded_total");
    println!(
        "uploaded by the source: {:.1} MiB for a {:.1} MiB file ({:.1} MiB when the downloader was killed): {:.1} MiB sent again ({:.1} % of the file)",
        total / MIB as f64,
        size as f64 / MIB as f64,
        at_kill / MIB as f64,
        (total - size as f64) / MIB as f64,
        100.0 * (total - size as f64) / size as f64
    );
    stop(b2);
    stop(a);
    let _ = std::fs::remove_file(out);
}

async fn big(dir: &Path, src: &Path) {
    let a = start(&dir.join("big-a"), &[]);
    let boot = a.bootstrap_addr();
    let b = start(&dir.join("big-b"), &["--bootstrap", &boot]);
    let t0 = Instant::now();
    let id = share(&client(&a), src).await;
    let hashed = t0.elapsed();
    let out = dir.join("big-out.bin");
    let d = get(&client(&b), &id, &out).await;
    let hwm = |s: &Started| {
        let text =
            std::fs::read_to_string(format!("/proc/{}/status", s.child.id())).expect("status");
        text.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    println!(
        "shared (hashed) in {:.1} s; transferred in {:.1} s ({:.1} MiB/s); peak RSS: source {}, downloader {}",
        hashed.as_secs_f64(),
        d.as_secs_f64(),
        4096.0 / d.as_secs_f64(),
        hwm(&a),
        hwm(&b)
    );
    stop(b);
    stop(a);
    let _ = std::fs::remove_file(out);
    let _ = std::fs::remove_file(src);
}
