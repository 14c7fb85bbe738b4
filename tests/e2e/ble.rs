//! BLE over the simulated radio: a `fogmesh radio serve` medium and daemons
//! started with `--ble sim:SOCKET --no-internet`, each at a position.
//! Offline peers find each other, chat in a group across several hops,
//! recover from a dropped link with nothing lost, and move a file.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::util::{Daemon, eventually, fogmesh, is_hex64, unique};

const T: Duration = Duration::from_secs(90);

/// A running `fogmesh radio serve`. Killed when dropped.
pub(crate) struct Medium {
    child: Child,
    socket: PathBuf,
}

impl Medium {
    pub(crate) fn start(dir: &Path, extra: &[&str]) -> Medium {
        let socket = dir.join("radio.sock");
        let mut child = fogmesh()
            .arg("radio")
            .arg("serve")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the medium");
        let out = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(out).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l == "ready" => break,
                Some(Ok(_)) => {}
                _ => panic!("the radio medium did not start"),
            }
        }
        Medium { child, socket }
    }

    pub(crate) fn arg(&self) -> String {
        format!("sim:{}", self.socket.display())
    }

    fn radio(&self, args: &[&str]) -> std::process::Output {
        fogmesh()
            .arg("radio")
            .args(args.iter().take(1))
            .arg(&self.socket)
            .args(args.iter().skip(1))
            .output()
            .expect("run fogmesh radio")
    }

    /// Moves a device on the medium.
    pub(crate) fn move_to(&self, device: &str, pos: &str) {
        let out = self.radio(&["move", device, pos]);
        assert!(
            out.status.success(),
            "radio move: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Medium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An offline node on the medium at `pos`.
pub(crate) fn offline(dir: &Path, medium: &Medium, pos: &str) -> Daemon {
    offline_with(dir, medium, pos, &[])
}

/// [`offline`] with `extra` arguments.
pub(crate) fn offline_with(dir: &Path, medium: &Medium, pos: &str, extra: &[&str]) -> Daemon {
    let args: Vec<String> = [
        "--api",
        "127.0.0.1:0",
        "--no-internet",
        "--ble",
        &medium.arg(),
        "--ble-position",
        pos,
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    Daemon::start_with(dir, &args)
}

pub(crate) fn device(d: &Daemon) -> String {
    d.json(&["status"])["ble"]["device"]
        .as_str()
        .expect("status shows the BLE device")
        .to_owned()
}

/// Peer ids this daemon is connected to over BLE.
pub(crate) fn ble_peers(d: &Daemon) -> Vec<String> {
    let v = d.json_or_nothing(&["peers"]);
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["transport"] == "ble")
                .filter_map(|p| p["peer_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn wait_ble_link(a: &Daemon, b: &Daemon) {
    eventually(T, "a BLE link between two neighbours", || {
        (ble_peers(a).contains(&b.peer_id) && ble_peers(b).contains(&a.peer_id)).then_some(())
    });
}

fn group_create(d: &Daemon, members: &[&Daemon]) -> String {
    let mut args = vec!["group".to_owned(), "create".to_owned(), unique()];
    for m in members {
        args.push("--member".into());
        args.push(m.peer_id.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gid = d.json(&args)["group_id"]
        .as_str()
        .expect("group_id")
        .to_owned();
    assert!(is_hex64(&gid));
    gid
}

fn send(d: &Daemon, gid: &str, text: &str) {
    let v = d.json(&["group", "send", gid, text]);
    assert!(is_hex64(v["id"].as_str().expect("id")));
}

fn texts(d: &Daemon, gid: &str) -> Vec<String> {
    d.json_or_nothing(&["group", "messages", gid])
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["text"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn wait_texts(d: &Daemon, gid: &str, want: &[&str]) {
    eventually(T, &format!("messages {want:?}"), || {
        let have = texts(d, gid);
        want.iter()
            .all(|w| have.iter().any(|h| h == w))
            .then_some(())
    });
}

/// Waits until `d` is in the group, accepting the invitation when it comes.
fn wait_member(d: &Daemon, gid: &str) {
    eventually(T, "the group reaches this node", || {
        let v = d.json_or_nothing(&["group", "list"]);
        if v.as_array()?.iter().any(|g| g["group_id"] == gid) {
            return Some(());
        }
        let invites = d.json_or_nothing(&["group", "invites"]);
        if invites
            .as_array()?
            .iter()
            .any(|i| i["group_id"] == gid && i["accepted"] == false)
        {
            d.json(&["group", "accept", gid]);
        }
        None
    });
}

#[test]
fn two_offline_nodes_find_each_other_and_chat() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let medium = Medium::start(tmp.path(), &["--range", "30"]);
    let a = offline(&tmp.path().join("a"), &medium, "0,0");
    let b = offline(&tmp.path().join("b"), &medium, "12,5");

    // Offline: only BLE is up, and only a BLE address is listened on.
    let st: Value = a.json(&["status"]);
    assert_eq!(st["routes"], serde_json::json!(["ble"]));
    let listen: Vec<&str> = st["listen_addrs"]
        .as_array()
        .expect("listen_addrs")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(listen.len(), 1, "{listen:?}");
    assert!(listen[0].starts_with("/ip6zone/ble-"), "{listen:?}");
    assert_eq!(listen[0], format!("/ip6zone/ble-{}", device(&a)));

    wait_ble_link(&a, &b);
    let peers = a.json(&["peers"]);
    assert_eq!(
        peers.as_array().map(Vec::len),
        Some(1),
        "exactly one link: {peers}"
    );

    let gid = group_create(&a, &[&b]);
    wait_member(&b, &gid);
    send(&a, &gid, "hello over the air");
    wait_texts(&b, &gid, &["hello over the air"]);
    send(&b, &gid, "loud and clear");
    wait_texts(&a, &gid, &["hello over the air", "loud and clear"]);
}

#[test]
fn five_daemons_in_a_line_chat_across_four_hops() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 10 m apart with a 12 m range: each hears only its neighbours.
    let medium = Medium::start(tmp.path(), &["--range", "12"]);
    let nodes: Vec<Daemon> = (0..5)
        .map(|i| {
            offline(
                &tmp.path().join(format!("n{i}")),
                &medium,
                &format!("{},0", i * 10),
            )
        })
        .collect();
    for w in nodes.windows(2) {
        wait_ble_link(&w[0], &w[1]);
    }
    // The ends are four hops apart: no direct link.
    let (first, last) = (&nodes[0], &nodes[4]);
    assert!(!ble_peers(first).contains(&last.peer_id));
    assert_eq!(ble_peers(first).len(), 1);

    let others: Vec<&Daemon> = nodes.iter().skip(1).collect();
    let gid = group_create(first, &others);
    for n in &nodes {
        wait_member(n, &gid);
    }
    send(first, &gid, "from the west end");
    wait_texts(last, &gid, &["from the west end"]);
    send(last, &gid, "from the east end");
    wait_texts(first, &gid, &["from the west end", "from the east end"]);
    // Every hop delivered both, once each.
    for n in &nodes {
        wait_texts(n, &gid, &["from the west end", "from the east end"]);
        assert_eq!(texts(n, &gid).len(), 2, "no duplicates on {}", n.peer_id);
    }
    assert!(!ble_peers(first).contains(&last.peer_id), "still multi-hop");
}

#[test]
fn a_dropped_link_recovers_with_nothing_lost() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let medium = Medium::start(tmp.path(), &["--range", "20"]);
    let a = offline(&tmp.path().join("a"), &medium, "0,0");
    let b = offline(&tmp.path().join("b"), &medium, "10,0");
    wait_ble_link(&a, &b);
    let gid = group_create(&a, &[&b]);
    wait_member(&b, &gid);
    send(&a, &gid, "before");
    wait_texts(&b, &gid, &["before"]);

    // B walks out of range: the link drops.
    medium.move_to(&device(&b), "200,0");
    eventually(T, "the link to drop", || {
        (ble_peers(&a).is_empty() && ble_peers(&b).is_empty()).then_some(())
    });
    // Both sides keep writing; each message is acknowledged locally.
    for t in ["a1 while apart", "a2 while apart", "a3 while apart"] {
        send(&a, &gid, t);
    }
    for t in ["b1 while apart", "b2 while apart"] {
        send(&b, &gid, t);
    }
    assert!(!texts(&b, &gid).iter().any(|t| t.starts_with("a1")));

    // B comes back: the neighbours relink and catch up.
    medium.move_to(&device(&b), "5,0");
    wait_ble_link(&a, &b);
    let all = [
        "before",
        "a1 while apart",
        "a2 while apart",
        "a3 while apart",
        "b1 while apart",
        "b2 while apart",
    ];
    wait_texts(&a, &gid, &all);
    wait_texts(&b, &gid, &all);
    for d in [&a, &b] {
        let t = texts(d, &gid);
        assert_eq!(t.len(), all.len(), "nothing twice: {t:?}");
        let pos = |s: &str| t.iter().position(|x| x == s).expect("present");
        assert!(pos("a1 while apart") < pos("a2 while apart"));
        assert!(pos("a2 while apart") < pos("a3 while apart"));
        assert!(pos("b1 while apart") < pos("b2 while apart"));
    }
}

#[test]
fn a_small_file_crosses_a_ble_link() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let medium = Medium::start(tmp.path(), &["--bandwidth", "20000"]);
    let a = offline(&tmp.path().join("a"), &medium, "0,0");
    let b = offline(&tmp.path().join("b"), &medium, "3,4");
    wait_ble_link(&a, &b);
    let data: Vec<u8> = (0..60_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let src = tmp.path().join("photo.jpg");
    std::fs::write(&src, &data).expect("write");
    let share = a.json(&["file", "share", src.to_str().expect("utf-8")]);
    let id = share["file_id"].as_str().expect("file_id").to_owned();
    let dest = tmp.path().join("got.jpg");
    let out = b.cli(&[
        "file",
        "get",
        &id,
        "--output",
        dest.to_str().expect("utf-8"),
        "--timeout",
        "120",
    ]);
    assert!(
        out.status.success(),
        "file get: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(T, "the file to arrive", || {
        (std::fs::read(&dest).ok()? == data).then_some(())
    });
}

#[test]
fn ble_addresses_never_reach_internet_peers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let medium = Medium::start(tmp.path(), &[]);
    // A gateway: internet and BLE. An offline node next to it, and an
    // internet-only node that reaches the gateway over TCP.
    let gw_args: Vec<String> = crate::util::loopback_args()
        .into_iter()
        .chain(
            ["--ble", &medium.arg(), "--ble-position", "0,0"]
                .iter()
                .map(|s| s.to_string()),
        )
        .collect();
    let gw = Daemon::start_with(&tmp.path().join("gw"), &gw_args);
    let off = offline(&tmp.path().join("off"), &medium, "5,0");
    wait_ble_link(&gw, &off);
    // Whichever side dialled first, the gateway also dials the offline
    // node itself (as `connect` lets an operator do): a dialled address is
    // what Kademlia would keep.
    let out = gw.cli(&["connect", &format!("/ip6zone/ble-{}", device(&off))]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let net = Daemon::start(&tmp.path().join("net"), &["--bootstrap", &gw.tcp_addr()]);
    net.wait_connected(&gw.peer_id, T);

    // The gateway listens on both, and reports both routes (and the onion
    // route, which runs over the internet).
    let st = gw.json(&["status"]);
    assert_eq!(
        st["routes"],
        serde_json::json!(["internet", "ble", "onion"])
    );
    // A group across the two worlds works through the gateway.
    let gid = group_create(&net, &[&gw, &off]);
    wait_member(&gw, &gid);
    wait_member(&off, &gid);
    send(&off, &gid, "from the offline side");
    wait_texts(&net, &gid, &["from the offline side"]);

    // What the internet peer learned (identify, Kademlia, its peer table)
    // holds no BLE address: not in its API, not on its disk.
    let peers = net.json(&["peers"]).to_string();
    assert!(!peers.contains("ip6zone"), "{peers}");
    assert!(!net.json(&["status"]).to_string().contains("ip6zone"));
    let ble_dev = device(&off);
    let gw_dev = device(&gw);
    // The gateway's Kademlia table holds the internet peer only: the
    // offline node, reachable by BLE alone, is not there to be handed out.
    assert_eq!(gw.json(&["status"])["routing_table_peers"], 1);
    // And what the gateway says to a plain libp2p peer that filters
    // nothing: neither identify nor a Kademlia lookup of the offline node
    // gives out a BLE address.
    let heard = observe_gateway(&gw, &off.peer_id);
    assert!(heard.identify_done, "identify answered");
    for a in &heard.addrs {
        assert!(!a.contains("ip6zone"), "the gateway gave out {a}");
    }
    assert!(!heard.addrs.is_empty(), "the gateway told its IP addresses");

    let mut net = net;
    net.terminate();
    for needle in [ble_dev.as_bytes(), gw_dev.as_bytes(), b"ip6zone".as_slice()] {
        let hits = crate::util::files_containing(&net.data_dir, needle);
        assert!(
            hits.is_empty(),
            "{:?} found in {hits:?}",
            String::from_utf8_lossy(needle)
        );
    }
}

struct Heard {
    identify_done: bool,
    addrs: Vec<String>,
}

/// Connects a bare identify + Kademlia swarm to `gw` over TCP; returns every
/// address the gateway told it (its own through identify, others through a
/// lookup of `target`).
fn observe_gateway(gw: &Daemon, target: &str) -> Heard {
    use futures::StreamExt;
    use libp2p::swarm::SwarmEvent;
    use libp2p::{Multiaddr, PeerId, identify, kad, noise, tcp, yamux};

    #[derive(libp2p::swarm::NetworkBehaviour)]
    #[behaviour(prelude = "libp2p::swarm::derive_prelude")]
    struct Observer {
        identify: identify::Behaviour,
        kad: kad::Behaviour<kad::store::MemoryStore>,
    }

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
            .expect("tcp")
            .with_behaviour(|key| {
                let me = key.public().to_peer_id();
                let mut kad = kad::Behaviour::with_config(
                    me,
                    kad::store::MemoryStore::new(me),
                    kad::Config::new(fogmesh::behaviour::KAD_PROTOCOL),
                );
                kad.set_mode(Some(kad::Mode::Client));
                Observer {
                    identify: identify::Behaviour::new(identify::Config::new(
                        "observer/1".into(),
                        key.public(),
                    )),
                    kad,
                }
            })
            .expect("behaviour")
            .build();
        let gw_addr: Multiaddr = gw.tcp_addr().parse().expect("multiaddr");
        let gw_peer: PeerId = gw.peer_id.parse().expect("peer id");
        let target: PeerId = target.parse().expect("peer id");
        swarm
            .behaviour_mut()
            .kad
            .add_address(&gw_peer, gw_addr.clone());
        swarm.dial(gw_addr).expect("dial");
        let mut heard = Heard {
            identify_done: false,
            addrs: Vec::new(),
        };
        let mut lookup_done = false;
        let mut asked = false;
        let deadline = tokio::time::sleep(Duration::from_secs(30));
        tokio::pin!(deadline);
        while !(heard.identify_done && lookup_done) {
            tokio::select! {
                _ = &mut deadline => panic!("the gateway did not answer identify and a lookup in 30 s"),
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::ConnectionEstablished { .. } if !asked => {
                        asked = true;
                        swarm.behaviour_mut().kad.get_closest_peers(target);
                    }
                    SwarmEvent::Behaviour(ObserverEvent::Identify(identify::Event::Received { info, peer_id, .. })) if peer_id == gw_peer => {
                        heard.identify_done = true;
                        heard.addrs.extend(info.listen_addrs.iter().map(|a| a.to_string()));
                    }
                    SwarmEvent::Behaviour(ObserverEvent::Kad(kad::Event::OutboundQueryProgressed {
                        result: kad::QueryResult::GetClosestPeers(r), step, ..
                    })) => {
                        let peers = match r {
                            Ok(ok) => ok.peers,
                            Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                        };
                        for p in peers {
                            heard.addrs.extend(p.addrs.iter().map(|a| a.to_string()));
                        }
                        if step.last {
                            lookup_done = true;
                        }
                    }
                    SwarmEvent::Behaviour(ObserverEvent::Kad(kad::Event::RoutingUpdated { addresses, .. })) => {
                        heard.addrs.extend(addresses.iter().map(|a| a.to_string()));
                    }
                    _ => {}
                }
            }
        }
        heard
    })
}

/// `fogmesh radio serve` restarted under running nodes: they rejoin the
/// new medium by themselves (same device addresses), link again, and a
/// group message and a direct message go through.
#[test]
fn nodes_rejoin_a_restarted_radio_medium() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let medium = Medium::start(tmp.path(), &["--range", "30"]);
    let a = offline(&tmp.path().join("a"), &medium, "0,0");
    let b = offline(&tmp.path().join("b"), &medium, "12,5");
    wait_ble_link(&a, &b);
    let gid = group_create(&a, &[&b]);
    wait_member(&b, &gid);
    let (dev_a, dev_b) = (device(&a), device(&b));

    drop(medium);
    eventually(T, "the nodes to notice the medium is gone", || {
        (ble_peers(&a).is_empty() && ble_peers(&b).is_empty()).then_some(())
    });
    let medium = Medium::start(tmp.path(), &["--range", "30"]);
    wait_ble_link(&a, &b);
    assert_eq!((device(&a), device(&b)), (dev_a, dev_b), "addresses kept");
    let out = medium.radio(&["list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).expect("radio list --json");
    assert_eq!(list["devices"].as_array().map(Vec::len), Some(2), "{list}");

    send(&a, &gid, "after the restart");
    wait_texts(&b, &gid, &["after the restart"]);
    let sent = b.json(&["send", &a.peer_id, "direct, after the restart"]);
    let id = sent["message_id"].as_str().expect("message_id").to_owned();
    eventually(T, "the direct message delivered", || {
        let m = b.json_or_nothing(&["messages", &a.peer_id]);
        m.as_array()?
            .iter()
            .any(|m| m["id"] == id.as_str() && m["state"] == "delivered")
            .then_some(())
    });
    assert!(
        a.stderr().contains("rejoined the radio medium"),
        "{}",
        a.stderr()
    );
}
