//! The BlueZ backend against BlueZoo, a user-space mock of BlueZ's D-Bus
//! API: two adapters on a private D-Bus, one node on each.
//!
//! `bluezoo_two_nodes` starts a private bus and BlueZoo, then runs this
//! same test binary twice more (`bluezoo_child`, with a role in
//! `FOGMESH_BLUEZOO_ROLE` and the bus in `DBUS_SYSTEM_BUS_ADDRESS`, since a
//! test cannot change its own environment):
//!
//! - node A (hci0, 00:00:00:11:11:11) listens with a known advert and
//!   echoes every link it accepts;
//! - node B (hci1, 00:00:00:22:22:22) scans and must see A with exactly
//!   that advert, reads A's INFO characteristic, opens two GATT links to
//!   A, sends a few KiB on each and checks the echo, closes its half, and
//!   must still receive what A sends 300 ms later, then see A close;
//!   finally a new scan finds A again and reports it lost once BlueZ
//!   forgets the device.
//!
//! Then A stops listening and checks that its advertisement and GATT
//! service are gone. BlueZoo comes from `$FOGMESH_BLUEZOO`, or the venv
//! that `scripts/install-test-deps` creates; without it the test fails.
#![cfg(feature = "bluez")]

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fogmesh_ble::bluez::{BluezRadio, INFO_CHAR_UUID};
use fogmesh_ble::{Advert, DataPath, DeviceAddr, Neighbour, Radio};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};

const ROLE_VAR: &str = "FOGMESH_BLUEZOO_ROLE";
const A_ADDR: &str = "00:00:00:11:11:11";
const B_ADDR: &str = "00:00:00:22:22:22";
const HINT: [u8; 6] = [0xf0, 0x66, 0x6d, 0x65, 0x73, 0x68];
/// How long the whole scenario may take, from starting the bus.
const DEADLINE: Duration = Duration::from_secs(55);
/// How long a child may run (less than the parent's deadline, so that its
/// own timeout reports where it hung).
const CHILD_DEADLINE: Duration = Duration::from_secs(40);

fn addr(s: &str) -> DeviceAddr {
    s.parse().expect("a valid device address")
}

fn bluezoo_path() -> PathBuf {
    if let Some(p) = std::env::var_os("FOGMESH_BLUEZOO") {
        return PathBuf::from(p);
    }
    let tools = match std::env::var_os("FOGMESH_TOOLS_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools"),
    };
    tools.join("bluezoo-venv/bin/bluezoo")
}

/// Kills every process it started, however the test ends.
#[derive(Default)]
struct Procs {
    children: Vec<(&'static str, Child)>,
}

impl Procs {
    fn add(&mut self, name: &'static str, child: Child) -> usize {
        self.children.push((name, child));
        self.children.len() - 1
    }

    fn child(&mut self, i: usize) -> &mut Child {
        &mut self.children[i].1
    }

    /// Waits for child `i` until `deadline`; `None` when it is still running.
    fn wait(&mut self, i: usize, deadline: Instant) -> Option<std::process::ExitStatus> {
        loop {
            match self.child(i).try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() >= deadline => return None,
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("cannot wait for {}: {e}", self.children[i].0),
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn log_file(dir: &Path, name: &str) -> (PathBuf, File) {
    let path = dir.join(name);
    let f = File::create(&path).expect("create a log file");
    (path, f)
}

fn dump(path: &Path) {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    eprintln!("===== {} =====\n{s}", path.display());
}

#[test]
fn bluezoo_two_nodes() {
    if std::env::var_os(ROLE_VAR).is_some() {
        return; // we are one of the nodes
    }
    let bluezoo = bluezoo_path();
    assert!(
        bluezoo.is_file(),
        "BlueZoo not found at {}: run scripts/install-test-deps (or set FOGMESH_BLUEZOO)",
        bluezoo.display()
    );
    let start = Instant::now();
    let deadline = start + DEADLINE;
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut procs = Procs::default();

    // A private bus, owned by us (no --fork, so Drop can kill it).
    let (_, dbus_log) = log_file(dir.path(), "dbus-daemon.log");
    let mut dbus = Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--nopidfile", "--print-address=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(dbus_log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run dbus-daemon ({e}): run scripts/install-test-deps"));
    let dbus_out = dbus.stdout.take().expect("dbus-daemon stdout");
    procs.add("dbus-daemon", dbus);
    let mut bus = String::new();
    BufReader::new(dbus_out)
        .read_line(&mut bus)
        .expect("read the bus address");
    let bus = bus.trim().to_string();
    assert!(
        bus.starts_with("unix:"),
        "dbus-daemon printed no address: {bus:?}"
    );

    let exe = std::env::current_exe().expect("the test binary");
    let spawn_node = |procs: &mut Procs, role: &'static str, bus: &str| {
        let (path, f) = log_file(dir.path(), &format!("node-{role}.log"));
        let child = Command::new(&exe)
            .args([
                "--exact",
                "bluezoo_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE_VAR, role)
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
            .stdin(Stdio::piped())
            .stdout(f.try_clone().expect("clone a file handle"))
            .stderr(f)
            .spawn()
            .expect("run the test binary again");
        (procs.add(role, child), path)
    };
    let run_node = |procs: &mut Procs, role: &'static str, bus: &str| {
        let (i, log) = spawn_node(procs, role, bus);
        let by = Instant::now() + Duration::from_secs(15);
        if !procs.wait(i, by).is_some_and(|s| s.success()) {
            dump(&log);
            panic!("node {role} failed");
        }
        log
    };
    // Errors that name the cause: no bus, and a bus without bluetoothd.
    let no_bus = "unix:path=/nonexistent/fogmesh-test-bus";
    let no_bus_log = run_node(&mut procs, "no-bus", no_bus);
    let no_bluetoothd_log = run_node(&mut procs, "no-bluetoothd", &bus);

    // BlueZoo, with two adapters; scanning every second keeps the test short.
    let (bz_log, bz_file) = log_file(dir.path(), "bluezoo.log");
    let bz = Command::new(&bluezoo)
        .args(["-v", "--auto-enable", "--scan-interval", "1"])
        .args(["-a", A_ADDR, "-a", B_ADDR])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus)
        .stdin(Stdio::null())
        .stdout(bz_file.try_clone().expect("clone a file handle"))
        .stderr(bz_file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bluezoo.display()));
    let bz = procs.add("bluezoo", bz);
    let ready_by = Instant::now() + Duration::from_secs(15);
    loop {
        let log = std::fs::read_to_string(&bz_log).unwrap_or_default();
        if log.contains("Adding adapter[1]") {
            break;
        }
        if let Ok(Some(status)) = procs.child(bz).try_wait() {
            dump(&bz_log);
            panic!("bluezoo exited early ({status})");
        }
        if Instant::now() > ready_by {
            dump(&bz_log);
            panic!("bluezoo did not create its adapters within 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Auto-enabling (powering) follows right after the adapter is added.
    std::thread::sleep(Duration::from_millis(200));

    let (a, a_log) = spawn_node(&mut procs, "a", &bus);
    let (b, b_log) = spawn_node(&mut procs, "b", &bus);

    let fail = |msg: String| -> ! {
        for p in [&a_log, &b_log, &bz_log] {
            dump(p);
        }
        panic!("{msg}");
    };
    // B runs the scenario; A runs until we close its stdin.
    match procs.wait(b, deadline) {
        Some(s) if s.success() => {}
        Some(s) => fail(format!("node B failed ({s})")),
        None => fail("node B hung".to_string()),
    }
    drop(procs.child(a).stdin.take());
    match procs.wait(a, deadline) {
        Some(s) if s.success() => {}
        Some(s) => fail(format!("node A failed ({s})")),
        None => fail("node A hung".to_string()),
    }
    // Shown with --nocapture.
    for p in [&no_bus_log, &no_bluetoothd_log, &a_log, &b_log] {
        dump(p);
    }
    eprintln!(
        "BlueZoo scenario took {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

/// One node of [`bluezoo_two_nodes`]; does nothing when run on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bluezoo_child() {
    let Some(role) = std::env::var_os(ROLE_VAR) else {
        return;
    };
    let scenario = async {
        match role.to_str() {
            Some("a") => node_a().await,
            Some("b") => node_b().await,
            Some("no-bus") => {
                let e = BluezRadio::open(None).await.expect_err("no bus");
                say("no-bus", &e.to_string());
                assert!(
                    e.to_string()
                        .contains("cannot connect to the D-Bus system bus")
                );
            }
            Some("no-bluetoothd") => {
                let e = BluezRadio::open(Some("hci0"))
                    .await
                    .expect_err("no bluetoothd");
                say("no-bluetoothd", &e.to_string());
                assert!(e.to_string().contains("bluetoothd is not running"));
            }
            other => panic!("unknown role {other:?}"),
        }
    };
    tokio::time::timeout(CHILD_DEADLINE, scenario)
        .await
        .expect("the node's scenario timed out");
}

fn say(role: &str, msg: &str) {
    eprintln!("[{role}] {msg}");
}

/// What A sends after its peer closed its half of a link.
const TRAILER: &[u8] = b"bye";

/// Echoes one link until its peer closes its half, then sends [`TRAILER`]
/// a little later (the link is half-closed meanwhile) and closes; returns
/// the bytes echoed.
async fn echo(link: fogmesh_ble::Link) -> std::io::Result<usize> {
    let mut io = link.io;
    let mut buf = vec![0u8; 1024];
    let mut total = 0;
    loop {
        let n = io.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        io.write_all(&buf[..n]).await?;
        total += n;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    io.write_all(TRAILER).await?;
    io.close().await?;
    Ok(total)
}

async fn node_a() {
    let radio = BluezRadio::open(Some("hci0")).await.expect("open hci0");
    assert_eq!(radio.address(), addr(A_ADDR));
    say("a", &format!("opened {radio:?}"));
    let mut incoming = radio
        .listen(Advert {
            psm: None,
            peer_hint: HINT,
        })
        .await
        .expect("listen");
    say("a", "listening");

    // Accept and echo links until the parent closes our stdin.
    let mut stdin_closed = std::pin::pin!(async {
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
    });
    let mut echoes = Vec::new();
    loop {
        tokio::select! {
            () = &mut stdin_closed => break,
            link = incoming.next() => {
                let link = link.expect("the incoming stream ended").expect("an incoming link");
                say("a", &format!("accepted {link:?}"));
                assert_eq!(link.remote, addr(B_ADDR));
                assert_eq!(link.path, DataPath::Gatt);
                echoes.push(tokio::spawn(echo(link)));
            }
        }
    }
    assert_eq!(echoes.len(), 2, "B opens two links");
    for e in echoes {
        let n = e.await.expect("echo task").expect("echo");
        say("a", &format!("echoed {n} bytes"));
    }

    // Dropping the listener stops advertising and, with no link left,
    // unregisters the GATT service.
    drop(incoming);
    let session = bluer::Session::new().await.expect("a second D-Bus session");
    let adapter = session.adapter("hci0").expect("hci0");
    let service: bluer::Uuid = fogmesh_ble::SERVICE_UUID.parse().expect("a UUID");
    let mut left = (1, true);
    for _ in 0..60 {
        let ads = adapter
            .active_advertising_instances()
            .await
            .expect("ActiveInstances");
        let uuids = adapter.uuids().await.expect("UUIDs").unwrap_or_default();
        left = (ads, uuids.contains(&service));
        if left == (0, false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        left,
        (0, false),
        "advertisements and GATT service left after the listener was dropped"
    );
    say("a", "done");
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// Sends `data` on a link while reading its echo; then closes its half
/// and expects the trailer, then the end of the stream.
async fn round_trip(link: fogmesh_ble::Link, data: Vec<u8>) {
    let (mut r, mut w) = link.io.split();
    let len = data.len();
    let writer = async move {
        w.write_all(&data).await.expect("write");
        w.flush().await.expect("flush");
        (w, data)
    };
    let reader = async {
        let mut got = vec![0u8; len];
        r.read_exact(&mut got).await.expect("read the echo");
        got
    };
    let ((mut w, sent), got) = futures::join!(writer, reader);
    assert!(got == sent, "the echo differs from what was sent");
    w.close().await.expect("close");
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).await.expect("read to the end");
    assert_eq!(
        rest, TRAILER,
        "the trailer after the echo, then end of stream"
    );
}

async fn node_b() {
    let e = BluezRadio::open(Some("hci7"))
        .await
        .expect_err("no such adapter");
    say("b", &e.to_string());
    assert!(e.to_string().contains("no Bluetooth adapter named hci7"));
    let radio = BluezRadio::open(Some("hci1")).await.expect("open hci1");
    assert_eq!(radio.address(), addr(B_ADDR));
    let limits = radio.limits();
    assert_eq!((limits.mtu, limits.bandwidth), (244, 20_000));
    let a = addr(A_ADDR);

    // Unknown device: a clear error, quickly.
    let t = Instant::now();
    let err = radio
        .connect(addr("00:00:00:33:33:33"))
        .await
        .expect_err("connecting to an unknown device fails");
    say("b", &format!("unknown device: {err}"));
    assert!(t.elapsed() < Duration::from_secs(5));

    // Discovery: A, with exactly its advert.
    let mut scan = radio.scan();
    let advert = loop {
        match scan.next().await.expect("the scan stream ended") {
            Neighbour::Found { device, advert, .. } if device == a => break advert,
            other => say("b", &format!("scan: {other:?}")),
        }
    };
    assert_eq!(
        advert,
        Advert {
            psm: None,
            peer_hint: HINT
        }
    );
    say("b", &format!("found A: {advert:?}"));
    drop(scan);

    // Two GATT links at once.
    let l1 = radio.connect(a).await.expect("connect to A");
    assert_eq!((l1.remote, l1.path), (a, DataPath::Gatt));
    let l2 = radio.connect(a).await.expect("connect to A again");
    say("b", "two links open");

    // A's INFO characteristic holds its advert.
    let info = read_info(a).await;
    assert_eq!(Advert::decode(&info), Ok(advert));

    let t = Instant::now();
    let big = pattern(6 * 1024, 7);
    let small = pattern(700, 11);
    futures::join!(round_trip(l1, big), round_trip(l2, small));
    say(
        "b",
        &format!("echoed 6 KiB + 700 B in {:.2} s", t.elapsed().as_secs_f64()),
    );

    // A fresh scan reports A again; when BlueZ forgets A (as it does some
    // time after A goes out of range) the scan reports it lost.
    let mut scan = radio.scan();
    loop {
        match scan.next().await.expect("the scan stream ended") {
            Neighbour::Found { device, .. } if device == a => break,
            other => say("b", &format!("scan: {other:?}")),
        }
    }
    let session = bluer::Session::new().await.expect("a second D-Bus session");
    let adapter = session.adapter("hci1").expect("hci1");
    adapter
        .remove_device(bluer::Address(a.0))
        .await
        .expect("remove A");
    loop {
        match scan.next().await.expect("the scan stream ended") {
            Neighbour::Lost { device } if device == a => break,
            other => say("b", &format!("scan: {other:?}")),
        }
    }
    say("b", "A lost after BlueZ forgot it");
    say("b", "done");
}

/// Reads A's INFO characteristic with plain bluer (B is connected by now).
async fn read_info(a: DeviceAddr) -> Vec<u8> {
    let session = bluer::Session::new().await.expect("a second D-Bus session");
    let adapter = session.adapter("hci1").expect("hci1");
    let device = adapter.device(bluer::Address(a.0)).expect("device A");
    let info: bluer::Uuid = INFO_CHAR_UUID.parse().expect("a UUID");
    for service in device.services().await.expect("A's services") {
        for c in service.characteristics().await.expect("characteristics") {
            if c.uuid().await.expect("UUID") == info {
                return c.read().await.expect("read INFO");
            }
        }
    }
    panic!("A has no INFO characteristic");
}
