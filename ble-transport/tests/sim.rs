//! The transport and the simulated radio, end to end: raw links, the
//! medium over a unix socket, and libp2p (Noise, Yamux, ping) over BLE.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fogmesh_ble::sim::{AdminRequest, LinkModel, Medium, Position, SocketRadio};
use fogmesh_ble::{Advert, BleTransport, Neighbour, Radio, device_multiaddr, listen_addr};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};

fn advert(n: u8) -> Advert {
    Advert {
        psm: None,
        peer_hint: [n; 6],
    }
}

async fn next_found(scan: &mut futures::stream::BoxStream<'static, Neighbour>) -> Neighbour {
    tokio::time::timeout(Duration::from_secs(5), scan.next())
        .await
        .expect("a neighbour event in time")
        .expect("scan stream open")
}

#[tokio::test]
async fn neighbours_in_range_link_and_drop_when_apart() {
    let medium = Medium::new(LinkModel::default());
    let a = medium.join(Position { x: 0.0, y: 0.0 });
    let b = medium.join(Position { x: 10.0, y: 0.0 });
    let far = medium.join(Position { x: 100.0, y: 0.0 });
    let mut incoming = a.listen(advert(1)).await.expect("listen");
    let _far_listen = far.listen(advert(3)).await.expect("listen");
    let mut scan = b.scan();
    assert_eq!(
        next_found(&mut scan).await,
        Neighbour::Found {
            device: a.address(),
            advert: advert(1),
            rssi: None
        },
        "b hears a, not the far device"
    );
    let err = b.connect(far.address()).await.expect_err("out of range");
    assert_eq!(err.kind(), std::io::ErrorKind::HostUnreachable);

    let mut out = b.connect(a.address()).await.expect("connect");
    let mut inn = incoming.next().await.expect("incoming").expect("link");
    assert_eq!(inn.remote, b.address());
    out.io.write_all(b"over the air").await.expect("write");
    let mut buf = [0u8; 12];
    inn.io.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"over the air");

    // Walking away drops the link and the neighbour.
    assert!(medium.set_position(b.address(), Position { x: 50.0, y: 0.0 }));
    let e = inn.io.read(&mut buf).await.expect_err("link dropped");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    assert_eq!(
        next_found(&mut scan).await,
        Neighbour::Lost {
            device: a.address()
        }
    );
    // Coming back: heard again, and a new link works.
    medium.set_position(b.address(), Position { x: 5.0, y: 0.0 });
    assert!(matches!(
        next_found(&mut scan).await,
        Neighbour::Found { .. }
    ));
    let mut out = b.connect(a.address()).await.expect("reconnect");
    let mut inn = incoming.next().await.expect("incoming").expect("link");
    out.io.write_all(b"back").await.expect("write");
    let mut buf = [0u8; 4];
    inn.io.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"back");
}

#[tokio::test]
async fn throughput_stays_within_the_modelled_bandwidth() {
    let model = LinkModel {
        bandwidth: 100_000,
        latency_ms: 10.0,
        ..LinkModel::default()
    };
    let medium = Medium::new(model.clone());
    let a = medium.join(Position::default());
    let b = medium.join(Position { x: 1.0, y: 1.0 });
    let mut incoming = a.listen(advert(1)).await.expect("listen");
    let mut out = b.connect(a.address()).await.expect("connect");
    let mut inn = incoming.next().await.expect("incoming").expect("link");
    let total = 200_000usize;
    let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    let start = Instant::now();
    let writer = async {
        out.io.write_all(&data).await.expect("write");
        out.io.close().await.expect("close");
    };
    let reader = async {
        let mut got = Vec::with_capacity(total);
        inn.io.read_to_end(&mut got).await.expect("read");
        got
    };
    let ((), got) = futures::join!(writer, reader);
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(got, data, "every byte, in order");
    let rate = total as f64 / secs;
    // The model may never carry more than its bandwidth (allowing for the
    // one packet that leaves at once); how close to it a loaded host gets
    // is a benchmark figure, not a test.
    assert!(
        rate <= model.bandwidth as f64 * 1.01 + model.mtu as f64 / secs,
        "{rate:.0} B/s over a {} B/s link",
        model.bandwidth
    );
}

#[tokio::test]
async fn the_medium_over_a_unix_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("radio.sock");
    let medium = Medium::new(LinkModel {
        range_m: 20.0,
        ..LinkModel::default()
    });
    let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(fogmesh_ble::sim::serve(
        listener,
        medium.clone(),
        stop.clone(),
    ));

    let a = SocketRadio::connect(&sock, Position { x: 0.0, y: 0.0 })
        .await
        .expect("a joins");
    let b = SocketRadio::connect(&sock, Position { x: 15.0, y: 0.0 })
        .await
        .expect("b joins");
    let mut incoming = a.listen(advert(7)).await.expect("listen");
    let mut scan = b.scan();
    assert!(matches!(
        next_found(&mut scan).await,
        Neighbour::Found { device, advert: ad, .. } if device == a.address() && ad == advert(7)
    ));
    let mut out = b.connect(a.address()).await.expect("connect");
    let mut inn = incoming.next().await.expect("incoming").expect("link");
    assert_eq!(inn.remote, b.address());
    let msg: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    out.io.write_all(&msg).await.expect("write");
    let mut got = vec![0u8; msg.len()];
    inn.io.read_exact(&mut got).await.expect("read");
    assert_eq!(got, msg);
    inn.io.write_all(b"pong").await.expect("write back");
    let mut four = [0u8; 4];
    out.io.read_exact(&mut four).await.expect("read back");
    assert_eq!(&four, b"pong");

    let list = fogmesh_ble::sim::admin(&sock, AdminRequest::List)
        .await
        .expect("list");
    let devices = list["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 2);
    assert!(
        devices
            .iter()
            .all(|d| d["links"].as_array().map(Vec::len) == Some(1))
    );

    // Moving b out of range through the admin call drops the link.
    fogmesh_ble::sim::admin(
        &sock,
        AdminRequest::Move {
            device: b.address().to_string(),
            position: Position { x: 100.0, y: 0.0 },
        },
    )
    .await
    .expect("move");
    let n = tokio::time::timeout(Duration::from_secs(5), out.io.read(&mut four))
        .await
        .expect("drop noticed");
    assert!(matches!(n, Ok(0) | Err(_)), "link ends: {n:?}");
    assert!(matches!(
        next_found(&mut scan).await,
        Neighbour::Lost { .. }
    ));
    let bad = fogmesh_ble::sim::admin(
        &sock,
        AdminRequest::Move {
            device: "nonsense".into(),
            position: Position::default(),
        },
    )
    .await
    .expect_err("bad device");
    assert!(bad.to_string().contains("invalid Bluetooth device address"));
    stop.cancel();
}

#[tokio::test]
async fn libp2p_runs_unchanged_over_ble() {
    use libp2p::swarm::SwarmEvent;
    use libp2p::{Transport, noise, ping, yamux};

    let medium = Medium::new(LinkModel::default());
    let mk = |pos: Position| {
        let radio: Arc<dyn Radio> = Arc::new(medium.join(pos));
        let addr = radio.address();
        let swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_other_transport(|key| {
                let local = key.public().to_peer_id();
                Ok(BleTransport::new(radio, &local)
                    .upgrade(libp2p::core::upgrade::Version::V1)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default()))
            })
            .expect("transport")
            .with_behaviour(|_| ping::Behaviour::new(ping::Config::new()))
            .expect("behaviour")
            .build();
        (swarm, addr)
    };
    let (mut a, a_dev) = mk(Position::default());
    let (mut b, _) = mk(Position { x: 3.0, y: 4.0 });
    a.listen_on(listen_addr()).expect("listen");
    let a_id = *a.local_peer_id();
    let done = async {
        let mut dialled = false;
        loop {
            tokio::select! {
                ev = a.select_next_some() => {
                    if let SwarmEvent::NewListenAddr { address, .. } = ev {
                        assert_eq!(address, device_multiaddr(a_dev));
                        if !dialled {
                            dialled = true;
                            b.dial(address.with(libp2p::multiaddr::Protocol::P2p(a_id))).expect("dial");
                        }
                    }
                }
                ev = b.select_next_some() => {
                    if let SwarmEvent::Behaviour(ping::Event { peer, result: Ok(rtt), .. }) = ev {
                        assert_eq!(peer, a_id);
                        return rtt;
                    }
                }
            }
        }
    };
    let rtt = tokio::time::timeout(Duration::from_secs(20), done)
        .await
        .expect("ping over BLE in time");
    // Two one-way latencies of 15 ms at least.
    assert!(rtt >= Duration::from_millis(30), "rtt {rtt:?}");
}

/// Serves a new, empty medium on `sock` (as a restarted `fogmesh radio
/// serve` does); cancel the token to stop it.
fn serve_on(sock: &std::path::Path) -> tokio_util::sync::CancellationToken {
    let _ = std::fs::remove_file(sock);
    let listener = tokio::net::UnixListener::bind(sock).expect("bind");
    let stop = tokio_util::sync::CancellationToken::new();
    let medium = Medium::new(LinkModel {
        range_m: 20.0,
        ..LinkModel::default()
    });
    tokio::spawn(fogmesh_ble::sim::serve(listener, medium, stop.clone()));
    stop
}

#[tokio::test]
async fn radios_rejoin_a_restarted_medium() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("radio.sock");
    let first = serve_on(&sock);
    let a = SocketRadio::connect(&sock, Position { x: 0.0, y: 0.0 })
        .await
        .expect("a joins");
    let b = SocketRadio::connect(&sock, Position { x: 15.0, y: 0.0 })
        .await
        .expect("b joins");
    let (a_addr, b_addr) = (a.address(), b.address());
    let mut incoming = a.listen(advert(7)).await.expect("listen");
    let mut scan = b.scan();
    assert!(matches!(
        next_found(&mut scan).await,
        Neighbour::Found { device, .. } if device == a_addr
    ));

    // The medium goes away: b loses a, and its scan stays open.
    first.cancel();
    assert_eq!(
        next_found(&mut scan).await,
        Neighbour::Lost { device: a_addr }
    );
    // A new medium on the same socket, joined in the other order: both
    // keep their addresses, a advertises again, b hears it, they link.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = serve_on(&sock);
    let found = tokio::time::timeout(Duration::from_secs(20), scan.next())
        .await
        .expect("a heard again within the back-off")
        .expect("scan open");
    assert!(
        matches!(found, Neighbour::Found { device, advert: ad, .. } if device == a_addr && ad == advert(7)),
        "{found:?}"
    );
    assert_eq!((a.address(), b.address()), (a_addr, b_addr));
    let mut out = b.connect(a_addr).await.expect("connect after the restart");
    let mut inn = tokio::time::timeout(Duration::from_secs(5), incoming.next())
        .await
        .expect("incoming in time")
        .expect("the listener survived")
        .expect("link");
    assert_eq!(inn.remote, b_addr);
    out.io.write_all(b"again").await.expect("write");
    let mut got = [0u8; 5];
    inn.io.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"again");
    second.cancel();
}
