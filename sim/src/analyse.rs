//! `fogmesh-sim analyse DIR`: the record of a run of real daemons (under
//! Shadow, from a `export-shadow` directory), rebuilt from their
//! `--event-log` files, so that the report (`summary.json`, CSV, plots)
//! comes from the same code, with the same definitions, as an in-process
//! run's.
//!
//! From the export it takes the scenario and the seed (so the plan: the
//! members, the planned messages and the link model) and the times; from
//! each node's event log its `Published Message`, `Received Message`,
//! `Delivered Message` and `Duplicate Delivery` lines. What the logs do
//! not hold is left out of the record, not guessed: transport bytes, host
//! lag (Shadow's clock is simulated: there is none), wire frame sizes
//! (the payload figures are left out; the physical limit takes the text
//! size as the frame's).

use std::collections::{HashMap, HashSet};
use std::io::BufRead as _;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context as _;
use fogmesh::eventlog::{Line, Msg};

use crate::plan::plan;
use crate::record::{Published, Receipt, ReceiptKind, RunRecord};
use crate::run::{link_record, median_link_latency_ms};
use crate::scenario::Scenario;
use crate::shadow::ExportInfo;

/// The longest event-log line read; longer ones are skipped.
const MAX_LINE: usize = 64 * 1024;

/// What could not be read, for the user.
#[derive(Debug, Default)]
pub struct Gaps {
    /// Nodes whose event log is missing.
    pub missing_logs: Vec<usize>,
    /// Lines that are not event-log lines (or too long).
    pub bad_lines: usize,
    /// `Published Message` lines beyond the node's planned messages.
    pub unplanned: usize,
}

/// The run record of the export in `dir`, from its nodes' event logs.
pub fn analyse(dir: &Path) -> anyhow::Result<(RunRecord, Gaps)> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
    };
    let info: ExportInfo =
        serde_json::from_str(&read("export.json")?).context("export.json is corrupt")?;
    let s: Scenario = toml::from_str(&read("scenario.toml")?).context("scenario.toml")?;
    let plan = plan(&s, info.seed);
    let zero = UNIX_EPOCH + Duration::from_secs(info.epoch_unix_s + info.start_at_s);
    let t_ms = |l: &Line| match l.time.duration_since(zero) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    };

    // Each publisher's group messages, in time order: the k-th message a
    // node logs as published is its k-th planned one.
    let mut planned: HashMap<usize, Vec<usize>> = HashMap::new();
    for m in plan.workload.messages.iter().filter(|m| m.to.is_none()) {
        planned.entry(m.publisher).or_default().push(m.size);
    }
    let members = &plan.workload.members;
    let (mut published, mut receipts, mut gaps) = (Vec::new(), Vec::new(), Gaps::default());
    // Peers each node was connected to when the workload ended (as
    // in-process, where it is the nodes' status then).
    let end_ms = s.duration_secs * 1000.0;
    let mut connected_peers = Vec::new();
    for node in &info.nodes {
        let mut peers: HashSet<String> = HashSet::new();
        let file = match std::fs::File::open(&node.event_log) {
            Ok(f) => f,
            Err(_) => {
                gaps.missing_logs.push(node.index);
                continue;
            }
        };
        let mut sizes = planned
            .get(&node.index)
            .map(|v| v.iter())
            .into_iter()
            .flatten();
        for line in std::io::BufReader::new(file).lines() {
            let Ok(line) = line else {
                gaps.bad_lines += 1;
                continue;
            };
            let parsed = (line.len() <= MAX_LINE)
                .then(|| serde_json::from_str::<Line>(&line).ok())
                .flatten();
            let Some(l) = parsed else {
                gaps.bad_lines += 1;
                continue;
            };
            let kind = match l.msg {
                Msg::PeerId | Msg::MixSent | Msg::MixRelayed => continue,
                Msg::PeerConnected | Msg::PeerDisconnected if t_ms(&l) > end_ms => continue,
                Msg::PeerConnected => {
                    peers.insert(l.id);
                    continue;
                }
                Msg::PeerDisconnected => {
                    peers.remove(&l.id);
                    continue;
                }
                Msg::Published => {
                    let Some(&size) = sizes.next() else {
                        gaps.unplanned += 1;
                        continue;
                    };
                    published.push(Published {
                        t_ms: t_ms(&l),
                        id: l.id,
                        publisher: node.index,
                        size,
                        wire_size: size,
                        recipients: (members.iter().copied())
                            .filter(|m| *m != node.index)
                            .collect(),
                    });
                    continue;
                }
                Msg::Received => ReceiptKind::Wire,
                Msg::Delivered => ReceiptKind::Delivered,
                Msg::DuplicateDelivery => ReceiptKind::DuplicateDelivery,
            };
            receipts.push(Receipt {
                t_ms: t_ms(&l),
                node: node.index,
                id: l.id,
                kind,
            });
        }
        connected_peers.push(peers.len() as u64);
    }
    published.sort_by(|a, b| a.t_ms.total_cmp(&b.t_ms));
    let record = RunRecord {
        scenario: s.name.clone(),
        seed: info.seed,
        nodes: s.nodes,
        time_dilation: 1.0,
        duration_ms: s.duration_secs * 1000.0,
        published,
        receipts,
        median_link_latency_ms: median_link_latency_ms(&plan),
        // On loopback (a local check) the model's latencies do not apply.
        link: (!info.local).then(|| link_record(&s, &plan)),
        wire_sizes_unknown: true,
        connected_peers,
        ..RunRecord::default()
    };
    Ok((record, gaps))
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::time::SystemTime;

    use super::*;
    use crate::report::summarize;
    use crate::shadow::tests::exported;

    /// Event logs with known content: the first two planned messages
    /// published; the first delivered by every other member 100 ms after
    /// it was published, with two wire copies each; the second by one
    /// member only, once twice (an application duplicate); one garbage
    /// line. Each logging node met four peers: one left during the
    /// workload, one after it, one came after it.
    #[test]
    fn known_logs_give_known_figures() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("x");
        let (s, plan, info) = exported(&dir);
        let zero = UNIX_EPOCH + Duration::from_secs(info.epoch_unix_s + info.start_at_s);
        let at = |ms: f64| match ms {
            ms if ms < 0.0 => zero - Duration::from_secs_f64(-ms / 1000.0),
            ms => zero + Duration::from_secs_f64(ms / 1000.0),
        };
        let msgs: Vec<_> = plan.workload.messages.iter().take(2).collect();
        let mut logs: HashMap<usize, Vec<Line>> = HashMap::new();
        let mut line = |node: usize, t: SystemTime, msg: Msg, id: &str| {
            logs.entry(node).or_default().push(Line::new(t, msg, id));
        };
        for (k, m) in msgs.iter().enumerate() {
            let id = format!("{k:064x}");
            line(m.publisher, at(m.t_ms), Msg::Published, &id);
            let others = plan.workload.members.iter().filter(|&&n| n != m.publisher);
            for (j, &n) in others.enumerate() {
                if k == 1 && j > 0 {
                    break;
                }
                line(n, at(m.t_ms + 90.0), Msg::Received, &id);
                line(n, at(m.t_ms + 95.0), Msg::Received, &id);
                line(n, at(m.t_ms + 100.0), Msg::Delivered, &id);
                if k == 1 {
                    line(n, at(m.t_ms + 200.0), Msg::DuplicateDelivery, &id);
                }
            }
        }
        let end = s.duration_secs * 1000.0;
        for lines in logs.values_mut() {
            let peer = |t: f64, msg: Msg, id: &str| Line::new(at(t), msg, id);
            lines.extend([
                peer(-5000.0, Msg::PeerConnected, "a"),
                peer(-5000.0, Msg::PeerConnected, "b"),
                peer(-4000.0, Msg::PeerConnected, "c"),
                peer(100.0, Msg::PeerDisconnected, "b"),
                peer(end + 1000.0, Msg::PeerDisconnected, "c"),
                peer(end + 1000.0, Msg::PeerConnected, "d"),
            ]);
        }
        for n in &info.nodes {
            let Some(lines) = logs.get(&n.index) else {
                continue;
            };
            let mut f = std::fs::File::create(&n.event_log).expect("log");
            for l in lines {
                writeln!(f, "{}", serde_json::to_string(l).expect("json")).expect("write");
            }
            writeln!(f, "not json").expect("write");
        }

        let (rec, gaps) = analyse(&dir).expect("analyse");
        let members = plan.workload.members.len();
        assert_eq!(rec.published.len(), 2);
        assert_eq!(gaps.unplanned, 0);
        assert_eq!(gaps.bad_lines, logs.len());
        assert_eq!(gaps.missing_logs.len(), s.nodes - logs.len());
        let sum = summarize(&rec);
        assert_eq!(sum.pairs, 2 * (members - 1));
        assert_eq!(sum.delivered_pairs, members);
        assert_eq!(sum.latency_ms.p50.map(f64::round), Some(100.0));
        assert_eq!(sum.latency_ms.max.map(f64::round), Some(100.0));
        assert_eq!(sum.wire_copies, 2 * members as u64);
        assert_eq!(sum.app_duplicates, 1);
        assert_eq!(
            rec.connected_peers,
            vec![2; logs.len()],
            "a and c at the end"
        );
        assert_eq!(
            (
                sum.connected_peers_per_node.p50,
                sum.connected_peers_per_node.max
            ),
            (Some(2.0), Some(2.0))
        );
        assert_eq!(
            sum.payload_bytes_per_node, None,
            "frame sizes are not logged"
        );
        // The handling time under Shadow is what the logs say (its clock
        // does not move while a daemon computes): 10 ms from the first
        // wire copy.
        assert_eq!(sum.handling_ms.count, members);
        assert_eq!(sum.handling_ms.max.map(f64::round), Some(10.0));
        assert!(!sum.host_limited, "no host lag under Shadow");
        // The physical limit: the model's direct path of each delivered
        // pair, against its 100 ms.
        let limit = sum.physical_limit.expect("a link model");
        assert_eq!(limit.pairs, members);
        let link = rec.link.as_ref().expect("link");
        let mut direct: Vec<f64> = (rec.published.iter())
            .flat_map(|p| {
                let delivered: Vec<usize> = (p.recipients.iter().copied())
                    .filter(|&n| {
                        logs.get(&n).is_some_and(|l| {
                            l.iter().any(|l| l.id == p.id && l.msg == Msg::Delivered)
                        })
                    })
                    .collect();
                delivered
                    .into_iter()
                    .filter_map(|n| link.direct_ms(p.publisher, n, p.size))
            })
            .collect();
        direct.sort_by(f64::total_cmp);
        assert_eq!(limit.direct_ms.max, direct.last().copied());
        let ratio = limit.p99_ratio.expect("ratio");
        assert!((ratio - 100.0 / limit.direct_ms.p99.expect("p99")).abs() < 1e-3);
    }
}
