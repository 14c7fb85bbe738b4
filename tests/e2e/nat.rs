//! NAT traversal end to end: a small internet built on this machine with
//! network namespaces, veth pairs and nftables NAT, real `fogmesh` daemons
//! in it.
//!
//! Topology (each box a network namespace the test creates and removes):
//!
//! ```text
//!             "internet" 172.16.0.0/24 (a bridge in its own namespace)
//!        +-------------+--------------+-------------+
//!   relay R1 .10   relay R2 .11   router RA .2   router RB .3
//!                                      |              |
//!                              LAN 10.0.1.0/24  LAN 10.0.2.0/24
//!                                   node A .2       node B .2
//! ```
//!
//! The routers masquerade their LAN behind their WAN address (nftables)
//! and forward only what their LAN started (conntrack), in three kinds:
//!
//! - `Nat::FullCone`: endpoint-independent mapping *and* filtering, built
//!   the way n0's patchbay does it: a dynamic nftables map records, for
//!   every packet the LAN host sends out, its source port -> its LAN
//!   address, and packets arriving on the WAN side for a mapped port are
//!   sent to that address, whoever sends them. (Masquerade keeps the
//!   source port: one host per LAN, so the port is never taken.) Such a
//!   node is reachable on its mapped port: AutoNAT finds it *public*.
//! - `Nat::PortRestricted`: the same endpoint-independent mapping, but
//!   only replies from the exact address and port a flow went to come
//!   in (conntrack): what most home routers do, and the NAT hole
//!   punching is for. AutoNAT finds the node private.
//! - `Nat::Symmetric`: `masquerade fully-random`, a new random port per
//!   connection, so the port a relay observes is useless to anyone else
//!   and hole punching fails.
//!
//! Hole punching is tested over TCP and over QUIC (whichever the nodes use
//! to reach the relay is what they have observed addresses for).
//!
//! Every address is private, so the daemons run with
//! `--autonat-private-addrs` (AutoNAT ignores private addresses
//! otherwise) and `--kad-mode auto`.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables): without them each
//! test prints why it is skipped and passes (`scripts/install-test-deps`
//! installs the tools; CI runs as root).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{Daemon, eventually};

/// Each step's limit: AutoNAT's first probe comes 5 s after start, hole
/// punching takes a few round trips.
const T: Duration = Duration::from_secs(40);
/// The port every daemon listens on (each has its own namespace).
const PORT: u16 = 4001;

/// How a router translates.
#[derive(Clone, Copy, Debug)]
enum Nat {
    /// Endpoint-independent mapping and filtering ("full cone").
    FullCone,
    /// Endpoint-independent mapping, address- and port-dependent
    /// filtering ("port-restricted cone").
    PortRestricted,
    /// A new random port per connection.
    Symmetric,
}

/// Why the NAT tests cannot run here, if they cannot.
fn unsupported() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root (network namespaces and nftables need it)".into());
    }
    for tool in ["ip", "nft"] {
        let found = Command::new(tool)
            .arg(if tool == "ip" { "-V" } else { "--version" })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "`{tool}` is missing (scripts/install-test-deps installs iproute2 and nftables)"
            ));
        }
    }
    None
}

/// Namespaces this test created; all removed when dropped, failure or
/// not (removing a namespace removes its veth ends and nftables rules).
pub(crate) struct Net {
    prefix: String,
    namespaces: Vec<String>,
    veths: usize,
}

static NETS: AtomicUsize = AtomicUsize::new(0);

impl Net {
    /// A new, empty net; `None` (after printing why) when the test cannot
    /// run here.
    pub(crate) fn new(test: &str) -> Option<Net> {
        if let Some(why) = unsupported() {
            eprintln!("SKIPPED nat::{test}: {why}");
            return None;
        }
        let n = NETS.fetch_add(1, Ordering::SeqCst);
        Some(Net {
            prefix: format!("fm{}-{n}", std::process::id()),
            namespaces: Vec::new(),
            veths: 0,
        })
    }

    /// Creates namespace `name` (loopback up); returns its full name.
    pub(crate) fn ns(&mut self, name: &str) -> String {
        let full = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &full]);
        self.namespaces.push(full.clone());
        ip(&["-n", &full, "link", "set", "lo", "up"]);
        full
    }

    /// A veth pair: `a_if` in `a`, `b_if` in `b`, both up, with addresses.
    pub(crate) fn link(
        &mut self,
        a: &str,
        a_if: &str,
        a_ip: Option<&str>,
        b: &str,
        b_if: &str,
        b_ip: &str,
    ) {
        ip(&[
            "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
        ]);
        if let Some(addr) = a_ip {
            ip(&["-n", a, "addr", "add", addr, "dev", a_if]);
        }
        ip(&["-n", b, "addr", "add", b_ip, "dev", b_if]);
        ip(&["-n", a, "link", "set", a_if, "up"]);
        ip(&["-n", b, "link", "set", b_if, "up"]);
    }

    /// Plugs namespace `ns` into the internet's bridge as `wan` with `addr`.
    fn attach(&mut self, inet: &str, ns: &str, addr: &str) {
        self.veths += 1;
        let port = format!("p{}", self.veths);
        self.link(inet, &port, None, ns, "wan", addr);
        ip(&["-n", inet, "link", "set", &port, "master", "br0"]);
    }

    /// Makes `router` a NAT router for the LAN on its `lan` interface.
    fn nat_router(&self, router: &str, nat: Nat) {
        netns_exec(router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"], None);
        netns_exec(router, &["nft", "-f", "-"], Some(&nat_rules(nat)));
    }
}

/// The nftables rules of a NAT router of kind `nat` (WAN interface `wan`,
/// LAN interface `lan`).
fn nat_rules(nat: Nat) -> String {
    let masquerade = match nat {
        Nat::FullCone | Nat::PortRestricted => "masquerade",
        Nat::Symmetric => "masquerade fully-random",
    };
    // Full cone: every packet out records its source port -> its LAN
    // address (a filter chain sees every packet, the nat chains only a
    // flow's first, so mappings stay while used); a packet in for a
    // recorded port goes to that address, from whoever it comes.
    let (maps, inbound, admit) = match nat {
        Nat::FullCone => (
            "map cone_udp { type inet_service : ipv4_addr; flags dynamic,timeout; timeout 5m; }
             map cone_tcp { type inet_service : ipv4_addr; flags dynamic,timeout; timeout 5m; }
             chain record { type filter hook postrouting priority filter; policy accept;
                 oifname \"wan\" meta l4proto udp update @cone_udp { udp sport timeout 5m : ip saddr }
                 oifname \"wan\" meta l4proto tcp update @cone_tcp { tcp sport timeout 5m : ip saddr }
             }",
            "iifname \"wan\" meta l4proto udp dnat ip to udp dport map @cone_udp
             iifname \"wan\" meta l4proto tcp dnat ip to tcp dport map @cone_tcp",
            "ct status dnat accept",
        ),
        _ => ("", "", ""),
    };
    // The prerouting chain is needed even empty: without it the kernel
    // does not undo the translation on replies.
    format!(
        "table ip nat {{
            {maps}
            chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;
                {inbound}
            }}
            chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;
                oifname \"wan\" {masquerade}
            }}
        }}
        table ip filter {{
            chain forward {{ type filter hook forward priority filter; policy drop;
                ct state established,related accept
                {admit}
                iifname \"lan\" accept
            }}
            chain input {{ type filter hook input priority filter; policy accept;
                iifname \"wan\" ct state new drop
            }}
        }}"
    )
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

pub(crate) fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn netns_exec(ns: &str, cmd: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ip netns exec");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{cmd:?} in {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces of one topology.
struct Topo {
    /// Relays: (namespace, address).
    relays: Vec<(String, String)>,
    /// The NATed nodes A and B: (namespace, LAN address).
    a: (String, String),
    b: (String, String),
    /// The WAN addresses of A's and B's routers.
    a_wan: String,
    b_wan: String,
    /// The internet's namespace (for plugging more in).
    inet: String,
    /// Dropped last: removes every namespace.
    net: Net,
}

/// Builds the topology with `relays` relays and A, B behind `nat_a`,
/// `nat_b`.
fn topology(mut net: Net, relays: usize, nat_a: Nat, nat_b: Nat) -> Topo {
    let inet = net.ns("inet");
    ip(&["-n", &inet, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &inet, "link", "set", "br0", "up"]);
    let mut rs = Vec::new();
    for i in 0..relays {
        let ns = net.ns(&format!("r{i}"));
        let addr = format!("172.16.0.{}", 10 + i);
        net.attach(&inet, &ns, &format!("{addr}/24"));
        rs.push((ns, addr));
    }
    let lan = |net: &mut Net, name: &str, wan: &str, subnet: u8, nat: Nat| {
        let router = net.ns(&format!("rt{name}"));
        net.attach(&inet, &router, &format!("172.16.0.{wan}/24"));
        let host = net.ns(name);
        let gw = format!("10.0.{subnet}.1");
        let addr = format!("10.0.{subnet}.2");
        net.link(
            &router,
            "lan",
            Some(&format!("{gw}/24")),
            &host,
            "eth0",
            &format!("{addr}/24"),
        );
        ip(&["-n", &host, "route", "add", "default", "via", &gw]);
        net.nat_router(&router, nat);
        (host, addr)
    };
    let (a_ns, a_ip) = lan(&mut net, "a", "2", 1, nat_a);
    let (b_ns, b_ip) = lan(&mut net, "b", "3", 2, nat_b);
    Topo {
        relays: rs,
        a: (a_ns, a_ip),
        b: (b_ns, b_ip),
        a_wan: "172.16.0.2".into(),
        b_wan: "172.16.0.3".into(),
        inet,
        net,
    }
}

/// Starts a daemon in `ns` listening on `addr` (TCP and QUIC) with
/// `extra` arguments.
fn start(dir: &Path, name: &str, ns: &str, addr: &str, extra: &[String]) -> Daemon {
    start_on(dir, name, ns, addr, PORT, extra)
}

/// [`start`] on another port.
fn start_on(dir: &Path, name: &str, ns: &str, addr: &str, port: u16, extra: &[String]) -> Daemon {
    let mut args: Vec<String> = [
        "--listen".into(),
        format!("/ip4/{addr}/tcp/{port}"),
        "--listen".into(),
        format!("/ip4/{addr}/udp/{port}/quic-v1"),
        "--api".into(),
        "127.0.0.1:0".into(),
        "--no-mdns".into(),
        "--autonat-private-addrs".into(),
        "--kad-mode".into(),
        "auto".into(),
    ]
    .to_vec();
    args.extend(extra.iter().cloned());
    Daemon::start_in_netns(ns, &dir.join(name), &args)
}

/// B, behind its NAT, bootstrapped on the relay at `relay_addr`.
fn start_b(dir: &Path, t: &Topo, relay_addr: &str) -> Daemon {
    let (ns, addr) = &t.b;
    start(
        dir,
        "b",
        ns,
        addr,
        &["--bootstrap".into(), relay_addr.into()],
    )
}

/// A creates a group with B, sends `text`, and B receives it.
fn group_message_arrives(a: &Daemon, b: &Daemon, name: &str, text: &str) {
    let g = a.json(&["group", "create", name, "--member", &b.peer_id]);
    let gid = g["group_id"].as_str().expect("group_id").to_owned();
    a.json(&["group", "send", &gid, text]);
    eventually(T, &format!("B receives {text:?}"), || {
        // B accepts the invitation when it comes.
        let invites = b.json_or_nothing(&["group", "invites"]).to_string();
        if invites.contains(&gid) && !has_group(b, &gid) {
            b.json(&["group", "accept", &gid]);
        }
        let m = b.json_or_nothing(&["group", "messages", &gid]);
        m.to_string().contains(text).then_some(())
    });
}

/// A sends B a direct message; B has it and A has B's receipt.
fn direct_message_arrives(a: &Daemon, b: &Daemon, text: &str) {
    let sent = a.json(&["send", &b.peer_id, text]);
    let id = sent["message_id"].as_str().expect("message_id").to_owned();
    eventually(T, &format!("B receives {text:?} and A its receipt"), || {
        let on_b = b.json_or_nothing(&["messages", &a.peer_id]).to_string();
        let on_a = a.json_or_nothing(&["messages", &b.peer_id]);
        let delivered = on_a
            .as_array()?
            .iter()
            .any(|m| m["id"] == id.as_str() && m["state"] == "delivered");
        (on_b.contains(text) && delivered).then_some(())
    });
}

fn has_group(d: &Daemon, gid: &str) -> bool {
    d.json_or_nothing(&["group", "list"])
        .as_array()
        .is_some_and(|a| a.iter().any(|g| g["group_id"] == gid))
}

fn tcp_addr(d: &Daemon, addr: &str) -> String {
    format!("/ip4/{addr}/tcp/{PORT}/p2p/{}", d.peer_id)
}

fn quic_addr(d: &Daemon, addr: &str) -> String {
    format!("/ip4/{addr}/udp/{PORT}/quic-v1/p2p/{}", d.peer_id)
}

/// Which transport the nodes use to reach the relay (and so which one
/// hole punching has addresses for).
#[derive(Clone, Copy, Debug)]
enum Via {
    Tcp,
    Quic,
}

impl Via {
    fn addr(self, d: &Daemon, addr: &str) -> String {
        match self {
            Via::Tcp => tcp_addr(d, addr),
            Via::Quic => quic_addr(d, addr),
        }
    }
}

fn status(d: &Daemon) -> Value {
    d.json(&["status"])
}

/// Waits until `d`'s reachability is `want`.
fn wait_reachability(d: &Daemon, want: &str) -> Value {
    eventually(T, &format!("{} reachability {want}", d.peer_id), || {
        let s = status(d);
        (s["reachability"] == want).then_some(s)
    })
}

/// The entry of `peer` in `d`'s `peers --json`.
fn peer_entry(d: &Daemon, peer: &str) -> Option<Value> {
    d.json_or_nothing(&["peers"])
        .as_array()?
        .iter()
        .find(|p| p["peer_id"] == peer)
        .cloned()
}

/// A relay and a NATed node in its own namespaces: the relay becomes
/// public and relays, the node finds out it is private, reserves a slot
/// and advertises a relayed address.
fn relay_and_private_node(dir: &Path, t: &Topo) -> (Daemon, Daemon, String) {
    relay_and_private_node_via(dir, t, Via::Tcp)
}

/// [`relay_and_private_node`], reaching the relay over `via`.
fn relay_and_private_node_via(dir: &Path, t: &Topo, via: Via) -> (Daemon, Daemon, String) {
    let (r_ns, r_ip) = &t.relays[0];
    let r = start(dir, "r", r_ns, r_ip, &["--relay-server".into()]);
    let r_addr = via.addr(&r, r_ip);
    let (a_ns, a_ip) = &t.a;
    let a = start(
        dir,
        "a",
        a_ns,
        a_ip,
        &[
            "--bootstrap".into(),
            r_addr.clone(),
            "--relay".into(),
            r_addr.clone(),
        ],
    );
    let rs = wait_reachability(&r, "public");
    eventually(T, "the relay serves", || {
        status(&r)["relay_server"]
            .as_bool()
            .unwrap_or(false)
            .then_some(())
    });
    assert!(
        rs["external_addrs"].to_string().contains(r_ip.as_str()),
        "relay's confirmed addresses: {rs}"
    );
    wait_reachability(&a, "private");
    eventually(T, "A holds a relayed address", || {
        let s = status(&a);
        s["relayed_addrs"]
            .to_string()
            .contains("p2p-circuit")
            .then_some(())
    });
    (r, a, r_addr)
}

/// Case 1 with true full-cone NATs (endpoint-independent mapping and
/// filtering) on both sides: each node is reachable on its mapped port, so
/// AutoNAT finds it public at its router's address and the port it
/// listens on (the mapping is endpoint-independent: the relay saw that
/// port too), Kademlia serves, no relay is needed: B dials A's confirmed
/// address, and a group message and a 10 MiB file flow over the direct
/// connection.
#[test]
fn full_cone_nats_connect_directly() {
    let Some(net) = Net::new("full_cone_nats_connect_directly") else {
        return;
    };
    let t = topology(net, 1, Nat::FullCone, Nat::FullCone);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (r_ns, r_ip) = &t.relays[0];
    let r = start(tmp.path(), "r", r_ns, r_ip, &["--relay-server".into()]);
    let r_addr = tcp_addr(&r, r_ip);
    let (a_ns, a_ip) = &t.a;
    let a = start(
        tmp.path(),
        "a",
        a_ns,
        a_ip,
        &[
            "--bootstrap".into(),
            r_addr.clone(),
            "--relay".into(),
            r_addr.clone(),
        ],
    );
    let b = start_b(tmp.path(), &t, &r_addr);
    let sa = wait_reachability(&a, "public");
    let mapped = format!("/ip4/{}/tcp/{PORT}", t.a_wan);
    assert!(
        sa["external_addrs"].to_string().contains(&mapped),
        "A is reachable on its mapped port {mapped}: {sa}"
    );
    eventually(T, "A serves the DHT and holds no reservation", || {
        let s = status(&a);
        (s["kad_mode"] == "server" && !s["relayed_addrs"].to_string().contains("p2p-circuit"))
            .then_some(())
    });
    let sb = wait_reachability(&b, "public");
    assert!(
        sb["external_addrs"]
            .to_string()
            .contains(&format!("/ip4/{}/tcp/{PORT}", t.b_wan)),
        "B is reachable on its mapped port: {sb}"
    );

    b.json(&["connect", &format!("{mapped}/p2p/{}", a.peer_id)]);
    let p = peer_entry(&b, &a.peer_id).expect("B is connected to A");
    assert_eq!(p["relayed"], false, "{p}");
    group_message_arrives(&a, &b, "cone", "straight through the cone");
    ten_mib_file_flows(tmp.path(), &a, &b);
    let p = peer_entry(&b, &a.peer_id).expect("B is still connected to A");
    assert_eq!(p["relayed"], false, "{p}");
    drop((a, b, r));
}

/// Case 1: both behind endpoint-independent-mapping NATs that filter by
/// address and port (port-restricted cones: AutoNAT finds both private):
/// B reaches A through the relay, hole punching upgrades the connection to
/// a direct one on A's mapped port, then a group message and a 10 MiB file
/// flow over it.
#[test]
fn cone_nats_upgrade_to_direct() {
    if let Some(net) = Net::new("cone_nats_upgrade_to_direct") {
        cone_nats(net, Via::Tcp);
    }
}

/// Case 1 over QUIC: the nodes reach the relay over QUIC, so hole punching
/// has QUIC addresses to try.
#[test]
fn cone_nats_upgrade_to_direct_over_quic() {
    if let Some(net) = Net::new("cone_nats_upgrade_to_direct_over_quic") {
        cone_nats(net, Via::Quic);
    }
}

fn cone_nats(net: Net, via: Via) {
    let t = topology(net, 1, Nat::PortRestricted, Nat::PortRestricted);
    let tmp = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let (r, a, r_addr) = relay_and_private_node_via(tmp.path(), &t, via);
    let b = start_b(tmp.path(), &t, &r_addr);
    wait_reachability(&b, "private");

    let circuit = format!("{r_addr}/p2p-circuit/p2p/{}", a.peer_id);
    let dialled = Instant::now();
    b.json(&["connect", &circuit]);
    let direct = eventually(T, "A and B directly connected", || {
        let p = peer_entry(&b, &a.peer_id)?;
        (p["relayed"] == false).then_some(p)
    });
    eprintln!(
        "direct connection {:.1} s after start, {:.2} s after the relayed dial: {direct}",
        started.elapsed().as_secs_f64(),
        dialled.elapsed().as_secs_f64()
    );
    // The relayed connection is closed once the direct one is up (a moment
    // later: both may be listed in between).
    let direct = eventually(T, "the relayed connection closed", || {
        let p = peer_entry(&b, &a.peer_id)?;
        (!p["addrs"].to_string().contains("p2p-circuit")).then_some(p)
    });
    if let Via::Quic = via {
        assert_eq!(direct["transport"], "quic", "punched over QUIC: {direct}");
    }
    // Endpoint-independent mapping: B meets A on the port the relay saw.
    let mapped = match via {
        Via::Tcp => format!("/ip4/{}/tcp/{PORT}", t.a_wan),
        Via::Quic => format!("/ip4/{}/udp/{PORT}", t.a_wan),
    };
    assert!(
        direct["addrs"].to_string().contains(&mapped),
        "the direct connection uses A's mapped port {mapped}: {direct}"
    );
    let on_a = peer_entry(&a, &b.peer_id).expect("A sees B");
    assert_eq!(on_a["relayed"], false, "{on_a}");

    group_message_arrives(&a, &b, "nat", "through the NAT");
    ten_mib_file_flows(tmp.path(), &a, &b);
    drop((a, b, r));
}

/// A shares 10 MiB, B fetches it (over whatever connects them: the
/// caller checked it is direct).
fn ten_mib_file_flows(dir: &Path, a: &Daemon, b: &Daemon) {
    let data: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let src = dir.join("big.bin");
    std::fs::write(&src, &data).expect("write");
    let shared = a.json(&["file", "share", src.to_str().expect("utf-8")]);
    let fid = shared["file_id"].as_str().expect("file_id").to_owned();
    let out = dir.join("got.bin");
    let st = b.json(&[
        "file",
        "get",
        &fid,
        "-o",
        out.to_str().expect("utf-8"),
        "--timeout",
        "60",
    ]);
    assert_eq!(st["state"], "complete", "{st}");
    assert!(
        std::fs::read(&out).expect("read") == data,
        "the file arrived changed"
    );
}

/// Case 2: B behind a symmetric NAT: hole punching fails, group and direct
/// messages still flow through the relay, a file transfer is refused while the only
/// connection is relayed, and nothing hangs.
#[test]
fn symmetric_nat_stays_relayed_and_keeps_bulk_off() {
    let Some(net) = Net::new("symmetric_nat_stays_relayed_and_keeps_bulk_off") else {
        return;
    };
    let t = topology(net, 1, Nat::PortRestricted, Nat::Symmetric);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (r, a, r_addr) = relay_and_private_node(tmp.path(), &t);
    let b = start_b(tmp.path(), &t, &r_addr);

    let circuit = format!("{r_addr}/p2p-circuit/p2p/{}", a.peer_id);
    b.json(&["connect", &circuit]);
    let p = peer_entry(&b, &a.peer_id).expect("B is connected to A");
    assert_eq!(p["relayed"], true, "{p}");

    group_message_arrives(&a, &b, "sym", "over the relay");
    direct_message_arrives(&a, &b, "a direct message over the relay");
    // Hole punching had its chance by now (3 attempts); the link is still
    // relayed.
    let p = peer_entry(&b, &a.peer_id).expect("B is still connected to A");
    assert_eq!(p["relayed"], true, "a symmetric NAT cannot be punched: {p}");

    // A file: refused over the circuit; `file get` gives up on time.
    let src = tmp.path().join("f.bin");
    std::fs::write(&src, vec![7u8; 512 * 1024]).expect("write");
    let shared = a.json(&["file", "share", src.to_str().expect("utf-8")]);
    let fid = shared["file_id"].as_str().expect("file_id").to_owned();
    let out = tmp.path().join("got.bin");
    let started = Instant::now();
    let res = b.cli(&[
        "file",
        "get",
        &fid,
        "-o",
        out.to_str().expect("utf-8"),
        "--timeout",
        "8",
    ]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "file get hung for {:?}",
        started.elapsed()
    );
    assert!(!res.status.success(), "the file cannot come over a circuit");
    let st = b.json_or_nothing(&["file", "status", &fid]);
    assert_eq!(st["bytes_have"], 0, "{st}");
    assert!(
        b.stderr()
            .contains("file transfer waits for a direct connection"),
        "B held its requests back because the link is relayed"
    );
    assert!(!out.exists(), "no file over the relay");
    drop((a, b, r));
}

/// Case 3: a relay goes away: the private node, which holds reservations
/// on two of three relays (it knew one, found the others in that one's
/// DHT), replaces the lost one with the third and stays reachable.
#[test]
fn private_node_moves_to_another_relay() {
    let Some(net) = Net::new("private_node_moves_to_another_relay") else {
        return;
    };
    let t = topology(net, 3, Nat::PortRestricted, Nat::PortRestricted);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (r0_ns, r0_ip) = &t.relays[0];
    let r0 = start(tmp.path(), "r0", r0_ns, r0_ip, &["--relay-server".into()]);
    let r0_addr = tcp_addr(&r0, r0_ip);
    let mut relays = vec![(r0, r0_ip.clone())];
    for (i, (ns, ip)) in t.relays.iter().enumerate().skip(1) {
        let r = start(
            tmp.path(),
            &format!("r{i}"),
            ns,
            ip,
            &[
                "--relay-server".into(),
                "--bootstrap".into(),
                r0_addr.clone(),
            ],
        );
        relays.push((r, ip.clone()));
    }
    for (r, _) in &relays {
        wait_reachability(r, "public");
    }
    // A knows only R0.
    let (a_ns, a_ip) = &t.a;
    let a = start(
        tmp.path(),
        "a",
        a_ns,
        a_ip,
        &["--bootstrap".into(), r0_addr.clone()],
    );
    wait_reachability(&a, "private");
    let held = |a: &Daemon, relays: &[(Daemon, String)]| -> Vec<usize> {
        let s = status(a)["relayed_addrs"].to_string();
        (0..relays.len())
            .filter(|i| s.contains(&relays[*i].0.peer_id))
            .collect()
    };
    let before = eventually(T, "A holds two reservations", || {
        let h = held(&a, &relays);
        (h.len() == 2).then_some(h)
    });
    let gone = before[0];
    relays[gone].0.kill9();
    let after = eventually(T, "A replaced the lost relay", || {
        let h = held(&a, &relays);
        (h.len() == 2 && !h.contains(&gone)).then_some(h)
    });
    let new = *after
        .iter()
        .find(|i| !before.contains(i))
        .expect("a relay A did not hold before");
    // B reaches A through the new relay.
    let (r_new, r_ip) = &relays[new];
    let r_addr = tcp_addr(r_new, r_ip);
    let b = start_b(tmp.path(), &t, &r_addr);
    b.json(&[
        "connect",
        &format!("{r_addr}/p2p-circuit/p2p/{}", a.peer_id),
    ]);
    assert!(
        peer_entry(&b, &a.peer_id).is_some(),
        "B reached A through the new relay"
    );
    drop((a, b, relays));
}

/// Case 4: a NATed node stays a Kademlia client and never enters the
/// relay's routing table; the public relay is a server.
#[test]
fn nated_node_stays_out_of_routing_tables() {
    let Some(net) = Net::new("nated_node_stays_out_of_routing_tables") else {
        return;
    };
    let t = topology(net, 1, Nat::PortRestricted, Nat::PortRestricted);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (r, a, _) = relay_and_private_node(tmp.path(), &t);
    let sa = status(&a);
    assert_eq!(sa["kad_mode"], "client", "{sa}");
    let sr = status(&r);
    assert_eq!(sr["kad_mode"], "server", "{sr}");
    // Connected to A, and yet A is not in the relay's routing table.
    assert!(peer_entry(&r, &a.peer_id).is_some(), "the relay sees A");
    assert_eq!(sr["routing_table_peers"], 0, "{sr}");
    // A's LAN address is nowhere in what the relay knows of it.
    let p = peer_entry(&r, &a.peer_id).expect("A");
    assert!(!p.to_string().contains(&t.a.1), "{p}");
    // A sees the relay as a DHT server.
    assert!(status(&a)["routing_table_peers"].as_u64().unwrap_or(0) >= 1);
    drop((a, r));
}

/// Waits up to `limit` until `d`'s reachability is `want`.
fn wait_reachability_within(d: &Daemon, want: &str, limit: Duration) -> Value {
    eventually(limit, &format!("{} reachability {want}", d.peer_id), || {
        let s = status(d);
        (s["reachability"] == want).then_some(s)
    })
}

/// Reachability follows the network: A, listening on every interface,
/// starts behind a (port-restricted) NAT and is private; it is then
/// plugged straight into the internet and its LAN address removed (a
/// laptop moving from home to a public network): within two minutes it is
/// public at its new address, serves the DHT and needs no relay. Moved
/// back behind the NAT, it is private again within two minutes.
#[test]
fn reachability_follows_network_changes() {
    let Some(net) = Net::new("reachability_follows_network_changes") else {
        return;
    };
    let mut t = topology(net, 1, Nat::PortRestricted, Nat::PortRestricted);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (r_ns, r_ip) = &t.relays[0];
    let r = start(tmp.path(), "r", r_ns, r_ip, &["--relay-server".into()]);
    let r_addr = tcp_addr(&r, r_ip);
    let (a_ns, a_ip) = t.a.clone();
    let a = start(
        tmp.path(),
        "a",
        &a_ns,
        "0.0.0.0",
        &[
            "--bootstrap".into(),
            r_addr.clone(),
            "--relay".into(),
            r_addr.clone(),
        ],
    );
    wait_reachability(&r, "public");
    wait_reachability(&a, "private");
    let limit = Duration::from_secs(120);

    // To the public network: a new interface on the internet, the LAN
    // address gone.
    let public_ip = "172.16.0.20";
    let inet = t.inet.clone();
    t.net.attach(&inet, &a_ns, &format!("{public_ip}/24"));
    ip(&[
        "-n",
        &a_ns,
        "addr",
        "del",
        &format!("{a_ip}/24"),
        "dev",
        "eth0",
    ]);
    let moved = Instant::now();
    let s = wait_reachability_within(&a, "public", limit);
    eprintln!(
        "public {:.1} s after the move: {}",
        moved.elapsed().as_secs_f64(),
        s["external_addrs"]
    );
    assert!(
        s["external_addrs"].to_string().contains(public_ip),
        "confirmed at its new address: {s}"
    );
    eventually(T, "A serves the DHT and holds no reservation", || {
        let s = status(&a);
        (s["kad_mode"] == "server" && !s["relayed_addrs"].to_string().contains("p2p-circuit"))
            .then_some(())
    });

    // Back behind the NAT.
    ip(&[
        "-n",
        &a_ns,
        "addr",
        "add",
        &format!("{a_ip}/24"),
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n", &a_ns, "route", "replace", "default", "via", "10.0.1.1",
    ]);
    ip(&[
        "-n",
        &a_ns,
        "addr",
        "del",
        &format!("{public_ip}/24"),
        "dev",
        "wan",
    ]);
    let moved = Instant::now();
    wait_reachability_within(&a, "private", limit);
    eprintln!(
        "private {:.1} s after the move back",
        moved.elapsed().as_secs_f64()
    );
    eventually(T, "A is a DHT client with a reservation again", || {
        let s = status(&a);
        (s["kad_mode"] == "client" && s["relayed_addrs"].to_string().contains("p2p-circuit"))
            .then_some(())
    });
    drop((a, r));
}

/// A private sharer found through its provider record: B, behind a
/// port-restricted NAT, shares a file once it holds a relayed address;
/// A, behind another, fetches it by id alone. A's lookup finds B's
/// provider record (on the relay, the only DHT server) with B's relayed
/// address, A reaches B through the relay, hole punching gives a direct
/// connection, and the file comes over it.
#[test]
fn private_sharer_found_through_its_relayed_provider_record() {
    let Some(net) = Net::new("private_sharer_found_through_its_relayed_provider_record") else {
        return;
    };
    let t = topology(net, 1, Nat::PortRestricted, Nat::PortRestricted);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (r, b, r_addr, fid, data) = private_sharer(tmp.path(), &t);
    let (a_ns, a_ip) = &t.a;
    let a = start(tmp.path(), "a", a_ns, a_ip, &["--bootstrap".into(), r_addr]);
    wait_reachability(&a, "private");
    assert!(
        peer_entry(&a, &b.peer_id).is_none(),
        "A does not know B yet"
    );
    let out = tmp.path().join("got.bin");
    let st = a.json(&[
        "file",
        "get",
        &fid,
        "-o",
        out.to_str().expect("utf-8"),
        "--timeout",
        "90",
    ]);
    assert_eq!(st["state"], "complete", "{st}");
    assert!(
        std::fs::read(&out).expect("read") == data,
        "the file arrived changed"
    );
    let p = peer_entry(&a, &b.peer_id).expect("A is connected to B");
    assert_eq!(
        p["relayed"], false,
        "the file came over a direct connection: {p}"
    );
    drop((a, b, r));
}

/// [`private_sharer_found_through_its_relayed_provider_record`] with A
/// behind a symmetric NAT: A finds B and reaches it through the relay,
/// hole punching fails, the transfer waits for a direct connection that
/// never comes, and `file get` gives up on time with nothing received.
#[test]
fn private_sharer_behind_symmetric_nat_waits_and_gives_up() {
    let Some(net) = Net::new("private_sharer_behind_symmetric_nat_waits_and_gives_up") else {
        return;
    };
    let t = topology(net, 1, Nat::Symmetric, Nat::PortRestricted);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (r, b, r_addr, fid, _) = private_sharer(tmp.path(), &t);
    let (a_ns, a_ip) = &t.a;
    let a = start(tmp.path(), "a", a_ns, a_ip, &["--bootstrap".into(), r_addr]);
    wait_reachability(&a, "private");
    let out = tmp.path().join("got.bin");
    let started = Instant::now();
    let res = a.cli(&[
        "file",
        "get",
        &fid,
        "-o",
        out.to_str().expect("utf-8"),
        "--timeout",
        "20",
    ]);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "file get hung for {:?}",
        started.elapsed()
    );
    assert!(!res.status.success(), "the file cannot come over a circuit");
    let p = peer_entry(&a, &b.peer_id).expect("A reached B through the relay");
    assert_eq!(p["relayed"], true, "{p}");
    let st = a.json_or_nothing(&["file", "status", &fid]);
    assert_eq!(st["bytes_have"], 0, "{st}");
    assert!(
        a.stderr()
            .contains("file transfer waits for a direct connection"),
        "A held its requests back because the link is relayed"
    );
    assert!(!out.exists(), "no file over the relay");
    drop((a, b, r));
}

/// The relay R and B (the sharer, behind B's NAT, private, with a relayed
/// address) sharing 1 MiB: (R, B, R's address, the file id, the bytes).
fn private_sharer(dir: &Path, t: &Topo) -> (Daemon, Daemon, String, String, Vec<u8>) {
    let (r_ns, r_ip) = &t.relays[0];
    let r = start(dir, "r", r_ns, r_ip, &["--relay-server".into()]);
    let r_addr = tcp_addr(&r, r_ip);
    let b = start_b(dir, t, &r_addr);
    wait_reachability(&r, "public");
    wait_reachability(&b, "private");
    eventually(T, "B holds a relayed address", || {
        status(&b)["relayed_addrs"]
            .to_string()
            .contains("p2p-circuit")
            .then_some(())
    });
    let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let src = dir.join("shared.bin");
    std::fs::write(&src, &data).expect("write");
    let shared = b.json(&["file", "share", src.to_str().expect("utf-8")]);
    let fid = shared["file_id"].as_str().expect("file_id").to_owned();
    eventually(T, "the relay holds B's provider record", || {
        (status(&r)["provider_records_for_others"].as_u64() >= Some(1)).then_some(())
    });
    (r, b, r_addr, fid, data)
}

/// Reservations are renewed: with a relay granting 12 s reservations
/// (clients renew at three quarters), a private node still holds its
/// relayed address four lifetimes later, and B still reaches it through
/// the relay.
#[test]
fn relayed_address_outlives_its_reservation() {
    let Some(net) = Net::new("relayed_address_outlives_its_reservation") else {
        return;
    };
    let t = topology(net, 1, Nat::PortRestricted, Nat::Symmetric);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (r_ns, r_ip) = &t.relays[0];
    let r = start(
        tmp.path(),
        "r",
        r_ns,
        r_ip,
        &[
            "--relay-server".into(),
            "--relay-reservation-secs".into(),
            "12".into(),
        ],
    );
    let r_addr = tcp_addr(&r, r_ip);
    let (a_ns, a_ip) = &t.a;
    let a = start(
        tmp.path(),
        "a",
        a_ns,
        a_ip,
        &[
            "--bootstrap".into(),
            r_addr.clone(),
            "--relay".into(),
            r_addr.clone(),
        ],
    );
    wait_reachability(&a, "private");
    let relayed = eventually(T, "A holds a relayed address", || {
        let s = status(&a)["relayed_addrs"].to_string();
        s.contains("p2p-circuit").then_some(s)
    });
    let since = Instant::now();
    while since.elapsed() < Duration::from_secs(48) {
        let s = status(&a)["relayed_addrs"].to_string();
        assert!(
            s.contains("p2p-circuit"),
            "relayed address lost after {:?}: {s} (had {relayed})",
            since.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        a.stderr().matches("relay reservation accepted").count() >= 4,
        "the reservation was renewed"
    );
    // B (symmetric: no hole punching) reaches A through the relay.
    let b = start_b(tmp.path(), &t, &r_addr);
    b.json(&[
        "connect",
        &format!("{r_addr}/p2p-circuit/p2p/{}", a.peer_id),
    ]);
    let p = peer_entry(&b, &a.peer_id).expect("B reached A through the relay");
    assert_eq!(p["relayed"], true, "{p}");
    drop((a, b, r));
}

/// Benchmark (run by hand, as root: `cargo test -p fogmesh --test e2e
/// nat::hole_punch_attempts -- --ignored --nocapture`): for each pair of
/// NATs (A's, B's) in one run, 20 times: a fresh B (new identity, new
/// port) starts behind its NAT and dials A (already settled: through the
/// relay when A is private, at its confirmed address when a full cone
/// makes it public), and the time from B's start until `peers` shows a
/// direct connection is taken (15 s limit). Prints the share upgraded and
/// the times.
#[test]
#[ignore]
fn hole_punch_attempts() {
    let pairs = [
        (Nat::FullCone, Nat::FullCone),
        (Nat::PortRestricted, Nat::PortRestricted),
        (Nat::PortRestricted, Nat::Symmetric),
    ];
    let mut lines = Vec::new();
    for (nat_a, nat_b) in pairs {
        let Some(net) = Net::new("hole_punch_attempts") else {
            return;
        };
        let t = topology(net, 1, nat_a, nat_b);
        let tmp = tempfile::tempdir().expect("tempdir");
        let (r_ns, r_ip) = &t.relays[0];
        let r = start(tmp.path(), "r", r_ns, r_ip, &["--relay-server".into()]);
        let r_addr = tcp_addr(&r, r_ip);
        let (a_ns, a_ip) = &t.a;
        let a = start(
            tmp.path(),
            "a",
            a_ns,
            a_ip,
            &[
                "--bootstrap".into(),
                r_addr.clone(),
                "--relay".into(),
                r_addr.clone(),
            ],
        );
        let target = if let Nat::FullCone = nat_a {
            wait_reachability(&a, "public");
            format!("/ip4/{}/tcp/{PORT}/p2p/{}", t.a_wan, a.peer_id)
        } else {
            wait_reachability(&a, "private");
            eventually(T, "A holds a relayed address", || {
                status(&a)["relayed_addrs"]
                    .to_string()
                    .contains("p2p-circuit")
                    .then_some(())
            });
            format!("{r_addr}/p2p-circuit/p2p/{}", a.peer_id)
        };
        let (b_ns, b_ip) = &t.b;
        let mut times = Vec::new();
        for i in 0..20u16 {
            let started = Instant::now();
            let b = start_on(
                tmp.path(),
                &format!("b{i}"),
                b_ns,
                b_ip,
                PORT + 1 + i,
                &["--bootstrap".into(), r_addr.clone()],
            );
            if !b.cli(&["connect", &target]).status.success() {
                eprintln!("attempt {i}: dial failed");
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if peer_entry(&b, &a.peer_id).is_some_and(|p| p["relayed"] == false) {
                    times.push(started.elapsed().as_secs_f64());
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        times.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            times
                .get(((times.len() as f64 - 1.0) * q).round() as usize)
                .map(|t| format!("{t:.2}"))
                .unwrap_or_else(|| "-".into())
        };
        let line = format!(
            "BENCH A {nat_a:?} / B {nat_b:?}: {}/20 direct; start to direct: min {} s, median {} s, max {} s",
            times.len(),
            pick(0.0),
            pick(0.5),
            pick(1.0)
        );
        eprintln!("{line}");
        lines.push(line);
        drop((a, r));
    }
    eprintln!("{}", lines.join("\n"));
}
