//! End-to-end tests of `fogmesh-sim`: the real binary runs the shipped
//! 10-node scenario, and its outputs are checked the way a researcher would.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn scenario() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/smoke-10.toml")
}

fn run(out: &Path, seed: u64) -> Value {
    run_scenario(&scenario(), out, seed)
}

/// `fogmesh-sim run SCENARIO ARGS...`, its output.
fn sim_run(scenario: &Path, args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fogmesh-sim"))
        .arg("run")
        .arg(scenario)
        .args(args)
        .output()
        .expect("run fogmesh-sim")
}

fn run_scenario(scenario: &Path, out: &Path, seed: u64) -> Value {
    run_scenario_with(scenario, out, seed, &[])
}

/// `run_scenario` with more arguments; returns the summary.
fn run_scenario_with(scenario: &Path, out: &Path, seed: u64, more: &[&str]) -> Value {
    let seed = seed.to_string();
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--seed".as_ref(),
        seed.as_ref(),
        "--out".as_ref(),
        out.as_ref(),
    ];
    args.extend(more.iter().map(std::ffi::OsStr::new));
    let o = sim_run(scenario, &args);
    assert!(
        o.status.success(),
        "fogmesh-sim failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(out.join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).expect("summary is JSON")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
}

/// Ten nodes deliver every message to every member, never twice, and the
/// summary's figures are what the event log says.
#[test]
fn ten_nodes_deliver_everything_and_the_summary_matches_the_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("a");
    let s = run(&out, 11);
    for f in [
        "scenario.toml",
        "run.json",
        "topology.json",
        "workload.json",
        "events.ndjson",
        "summary.json",
        "summary.csv",
        "latency_cdf.svg",
        "duplicates_per_node.svg",
        "reliability_over_time.svg",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(s["nodes"], 10);
    assert_eq!(s["messages"], 20);
    assert_eq!(s["reliability"], 1.0, "{s}");
    assert_eq!(s["app_duplicates"], 0);
    assert_eq!(json(&out.join("run.json"))["seed"], 11);

    // Recount from events.ndjson alone.
    let workload = json(&out.join("workload.json"));
    let members: Vec<u64> = workload["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let log = std::fs::read_to_string(out.join("events.ndjson")).expect("events");
    let mut published: HashMap<String, (u64, f64)> = HashMap::new();
    let mut delivered: HashMap<(String, u64), f64> = HashMap::new();
    let mut wire = 0u64;
    let mut first_wire = HashSet::new();
    for line in log.lines() {
        let e: Value = serde_json::from_str(line).expect("event line is JSON");
        assert!(e["time"].is_string() && e["msg"].is_string(), "{e}");
        // The node's event-log format, with the simulator's two fields and
        // microsecond timestamps (`...T12:00:00.123456Z`).
        let typed: fogmesh::eventlog::Line =
            serde_json::from_str(line).expect("a line of the event-log format");
        assert!(typed.t_ms.is_some() && typed.node.is_some(), "{e}");
        let time = e["time"].as_str().expect("time");
        let fraction = time.rsplit('.').next().expect("fraction");
        assert_eq!(fraction.len(), "123456Z".len(), "{time}");
        let id = e["id"].as_str().expect("id").to_owned();
        let node = e["node"].as_u64().expect("node");
        let t = e["t_ms"].as_f64().expect("t_ms");
        match e["msg"].as_str() {
            Some("Published Message") => {
                published.insert(id, (node, t));
            }
            Some("Delivered Message") => {
                delivered.entry((id, node)).or_insert(t);
            }
            Some("Received Message") => {
                wire += 1;
                first_wire.insert((id, node));
            }
            Some("Duplicate Delivery") => panic!("a duplicate delivery: {e}"),
            _ => {}
        }
    }
    assert_eq!(published.len(), 20);
    let mut pairs = 0;
    let mut got = 0;
    let mut latencies = Vec::new();
    for (id, (publisher, t0)) in &published {
        for m in members.iter().filter(|m| *m != publisher) {
            pairs += 1;
            if let Some(t) = delivered.get(&(id.clone(), *m)) {
                got += 1;
                latencies.push(t - t0);
            }
        }
    }
    assert_eq!(s["pairs"], pairs);
    assert_eq!(s["delivered_pairs"], got);
    assert_eq!(s["wire_copies"], wire);
    latencies.sort_by(f64::total_cmp);
    let max = latencies.last().copied().expect("some latency");
    assert!((s["latency_ms"]["max"].as_f64().expect("max") - max).abs() < 1e-6);
    let dup = (wire - first_wire.len() as u64) as f64 / wire as f64;
    assert!((s["duplicate_fraction_wire"].as_f64().expect("dup") - dup).abs() < 1e-9);
    // The CSV carries the same figures.
    let csv = std::fs::read_to_string(out.join("summary.csv")).expect("csv");
    assert!(
        csv.lines().any(|l| l == format!("wire_copies,{wire}")),
        "{csv}"
    );
}

/// The same seed gives the same topology and workload; another seed does
/// not. `--join-secs` delays the workload past the set-up and is
/// recorded.
#[test]
fn same_seed_same_topology_and_workload() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    run(&a, 5);
    let summary = run_scenario_with(&scenario(), &b, 5, &["--join-secs", "6"]);
    assert_eq!(json(&a.join("run.json"))["join_secs"], 0);
    assert_eq!(json(&b.join("run.json"))["join_secs"], 6);
    // 6 s of joining, then smoke-10's 2 s warm-up and 5 s workload.
    let wall = summary["wall_secs"].as_f64();
    assert!(wall.is_some_and(|w| w >= 13.0), "wall_secs {wall:?}");
    for f in ["topology.json", "workload.json"] {
        assert_eq!(
            std::fs::read(a.join(f)).expect("a"),
            std::fs::read(b.join(f)).expect("b"),
            "{f} differs between two runs with seed 5"
        );
    }
    let topo = json(&a.join("topology.json"));
    assert_eq!(topo["nodes"].as_array().map(Vec::len), Some(10));
}

/// A malformed scenario is refused with a clear message and exit 2.
#[test]
fn bad_scenario_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = tmp.path().join("bad.toml");
    std::fs::write(&p, "name = \"x\"\nnodes = 1\nduration_secs = 1\n").expect("write");
    let o = sim_run(&p, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nodes must be at least 2"));
    std::fs::write(
        &p,
        "name = \"x\"\nnodes = 3\nduration_secs = 1\nfanout = 3\n",
    )
    .expect("write");
    let o = sim_run(&p, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("fanout"));
}

/// A mixed world: internet nodes, a gateway with both, and offline nodes on
/// the radio behind it, up to three BLE hops away. Everything arrives.
#[test]
fn ble_nodes_behind_a_gateway_get_everything() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("ble");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/ble-smoke-6.toml");
    let s = run_scenario(&scenario, &out, 4);
    assert_eq!(s["reliability"], 1.0, "{s}");
    assert_eq!(s["app_duplicates"], 0);
    let topo = json(&out.join("topology.json"));
    let nodes = topo["nodes"].as_array().expect("nodes");
    let kinds: Vec<&str> = nodes
        .iter()
        .map(|n| n["transports"].as_str().expect("transports"))
        .collect();
    assert_eq!(
        kinds,
        ["internet", "internet", "internet+ble", "ble", "ble", "ble"]
    );
    // Radio nodes have places; internet links never touch offline nodes.
    for n in &nodes[2..] {
        assert!(n["position"].is_array(), "{n}");
    }
    for e in topo["edges"].as_array().expect("edges") {
        let [a, b] = [e[0].as_u64().expect("a"), e[1].as_u64().expect("b")];
        assert!(a < 3 && b < 3, "an internet edge to an offline node: {e}");
    }
    // Radio traffic is counted: the three offline nodes sent bytes too (if
    // they counted 0, the median of six would be 0).
    assert!(
        s["bytes_sent_per_node"]["p50"].as_f64().expect("p50") > 0.0,
        "{s}"
    );
}

/// Direct messages in `dm-islands-smoke`: two offline islands, each with a
/// gateway, two internet nodes, one node down for a while. Messages cross
/// between the internet and the islands through the gateways, none is
/// delivered twice, and the summary's figures are what `direct.json` says.
///
/// The bound: with 20 ms links and one-hop islands, every message whose
/// recipient is up when it is sent arrives within about half a second, or
/// after one 10 s internet timeout (a gateway writing to a phone of its own
/// island tries the internet first, which other gateways accept); the run
/// leaves 12 s after the last send. At least 80 % of them must arrive
/// (of the 10 this seed plans): room for one message held back behind an
/// earlier one of its sender to the restarted node (the recipient keeps
/// per-sender order, and that earlier one waits for a retry) and one late
/// message on a loaded host. Left out of the bound: messages to a node
/// that is down when sent (they wait for the sender's retry, after its
/// route timeouts, which may fall after the run). Messages between offline
/// phones of different islands count: a gateway hands what its island
/// sends to the other gateways.
#[test]
fn direct_messages_cross_between_islands_and_the_internet_via_gateways() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("dm");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/dm-islands-smoke.toml");
    let s = run_scenario(&scenario, &out, 3);
    let d = &s["direct"];
    assert_eq!(d["messages"], 16, "{d}");
    assert_eq!(d["app_duplicates"], 0, "{d}");
    assert!(out.join("direct.json").is_file());

    let workload = json(&out.join("workload.json"));
    let down: Vec<(f64, f64, Vec<u64>)> = (workload["churn"].as_array().expect("churn").iter())
        .map(|w| {
            let nodes = w[2].as_array().expect("nodes").iter();
            (
                w[0].as_f64().expect("start"),
                w[1].as_f64().expect("end"),
                nodes.filter_map(Value::as_u64).collect(),
            )
        })
        .collect();
    let was_down = |node: u64, t: f64| {
        (down.iter()).any(|(a, b, nodes)| nodes.contains(&node) && (*a..*b).contains(&t))
    };
    let records = json(&out.join("direct.json"));
    let records = records.as_array().expect("records");
    let delivered =
        |m: &Value| m["delivered_ms"].is_number() || m["in_recipient_record"] == Value::Bool(true);
    let (mut counted, mut arrived) = (0, 0);
    let (mut into_islands, mut out_of_islands) = (0, 0);
    for m in records {
        let class = m["class"].as_str().expect("class");
        let to = m["to"].as_u64().expect("to");
        let t = m["t_ms"].as_f64().expect("t_ms");
        if delivered(m) {
            // Through a gateway: from the internet to an offline phone, or
            // from an offline phone to an internet node.
            into_islands += usize::from(class.starts_with("internet->ble"));
            out_of_islands += usize::from(class == "ble->internet");
        }
        if was_down(to, t) {
            continue;
        }
        counted += 1;
        arrived += usize::from(delivered(m));
    }
    assert!(counted >= 8, "too few messages in the bound: {counted}");
    assert!(
        arrived as f64 >= 0.8 * counted as f64,
        "{arrived} of {counted} delivered: {d}"
    );
    assert!(into_islands >= 1 && out_of_islands >= 1, "{d}");
    // Every message took at least one envelope to a first hop, and the
    // islands' flooding and the gateways relayed some.
    assert!(
        d["copies_per_message"].as_f64().expect("copies") >= 1.0,
        "{d}"
    );
    assert!(
        d["relayed_copies_per_message"].as_f64().expect("relayed") > 0.0,
        "{d}"
    );

    // The summary counts what the records say.
    let total = records.iter().filter(|m| delivered(m)).count();
    assert_eq!(d["delivered"], total, "{d}");
    let timed: Vec<f64> = (records.iter())
        .filter_map(|m| Some(m["delivered_ms"].as_f64()? - m["t_ms"].as_f64()?))
        .collect();
    let max = timed.iter().copied().fold(f64::MIN, f64::max);
    assert!((d["latency_ms"]["max"].as_f64().expect("max") - max).abs() < 1e-6);
    assert!(d["latency_ms"]["p50"].is_number() && d["latency_ms"]["p99"].is_number());
    let classes: usize = (d["by_class"].as_object().expect("by_class").values())
        .map(|c| c["messages"].as_u64().expect("messages") as usize)
        .sum();
    assert_eq!(classes, 16);
}
