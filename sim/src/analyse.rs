//! `fogmesh-sim analyse DIR`: the record of a run of real daemons (under
//! Shadow, from a `export-shadow` directory), rebuilt from their
//! `--event-log` files, so that the report (`summary.json`, CSV, plots)
//! comes from the same code, with the same definitions, as an in-process
//! run's.
//!
//! From the export it takes the scenario and the seed (so the plan: the
//! members, the planned messages and the link model) and the times; from
//! each node's event log its `Published Message`, `Received Message`,
//! `Delivered Message` and `Duplicate Delivery` lines, and from its
//! `PeerID`, `Peer Connected` and `Peer Disconnected` lines the peers it
//! was connected to, at the end of the workload (`connected_peers`) and
//! second by second ([`ConnSample`], `connections.csv`). What the logs do
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
use crate::report::nearest_rank;
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

/// The most rows `connections.csv` gets (a day of seconds): a clock gone
/// wrong in one log cannot make it unbounded.
const MAX_CONN_ROWS: i64 = 86_400;

/// One second of a run of daemons: how many had started and the peers
/// they were connected to at its end, and the connections made and lost
/// during it (each connection counts at both of its ends; first
/// connections to a peer and last ones closed, as the log has them).
#[derive(Debug, Clone, PartialEq)]
pub struct ConnSample {
    /// The second's start, seconds since the workload started (negative
    /// before), as `t_ms`.
    pub t_s: i64,
    /// Daemons whose log had started (`PeerID`) by the second's end.
    pub up: usize,
    /// Peers per started daemon: mean, nearest-rank median, largest.
    pub mean: f64,
    /// See `mean`.
    pub p50: usize,
    /// See `mean`.
    pub max: usize,
    /// `Peer Connected` lines in the second, all daemons.
    pub opened: usize,
    /// `Peer Disconnected` lines in the second, all daemons.
    pub closed: usize,
}

/// `samples` as CSV, a header and one row per second.
pub fn connections_csv(samples: &[ConnSample]) -> String {
    let mut out = String::from("t_s,up,mean,p50,max,opened,closed\n");
    for c in samples {
        out.push_str(&format!(
            "{},{},{:.2},{},{},{},{}\n",
            c.t_s, c.up, c.mean, c.p50, c.max, c.opened, c.closed
        ));
    }
    out
}

/// One daemon's peers, from its log's `PeerID`, `Peer Connected` and
/// `Peer Disconnected` lines.
#[derive(Debug, Default)]
struct PeerLog {
    /// When its log started, model ms.
    start_ms: Option<f64>,
    /// The peers connected after the lines read so far.
    now: HashSet<String>,
    /// How many were connected when the workload ended, once a line
    /// after its end was read.
    at_end: Option<usize>,
    /// Each change: model ms, and whether a peer came (or went).
    changes: Vec<(f64, bool)>,
}

impl PeerLog {
    /// Takes line `l` (at model time `t_ms`) if it is one of the three.
    fn take(&mut self, l: &Line, t_ms: f64, end_ms: f64) -> bool {
        let came = match l.msg {
            Msg::PeerId => {
                self.start_ms.get_or_insert(t_ms);
                return true;
            }
            Msg::PeerConnected => true,
            Msg::PeerDisconnected => false,
            _ => return false,
        };
        if t_ms > end_ms && self.at_end.is_none() {
            self.at_end = Some(self.now.len());
        }
        let changed = if came {
            self.now.insert(l.id.clone())
        } else {
            self.now.remove(&l.id)
        };
        if changed {
            self.changes.push((t_ms, came));
        }
        true
    }

    /// Peers connected when the workload ended.
    fn at_end(&self) -> usize {
        self.at_end.unwrap_or(self.now.len())
    }
}

/// The daemons' peers second by second, from the first log's start to
/// the last change (at most [`MAX_CONN_ROWS`] rows).
fn connection_series(logs: &mut [PeerLog]) -> Vec<ConnSample> {
    let second = |ms: f64| (ms / 1000.0).floor() as i64;
    let first = logs.iter().filter_map(|l| l.start_ms).map(second).min();
    let last = (logs.iter())
        .filter_map(|l| l.changes.iter().map(|c| c.0).reduce(f64::max))
        .map(second)
        .max();
    let (Some(first), Some(last)) = (first, last) else {
        return Vec::new();
    };
    for l in logs.iter_mut() {
        l.changes.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let (mut seen, mut count) = (vec![0usize; logs.len()], vec![0i64; logs.len()]);
    let mut rows = Vec::new();
    for t in first..=last.min(first.saturating_add(MAX_CONN_ROWS - 1)) {
        let end = (t + 1) as f64 * 1000.0;
        let (mut opened, mut closed, mut peers) = (0, 0, Vec::new());
        for (i, l) in logs.iter().enumerate() {
            while let Some(&(at, came)) = l.changes.get(seen[i])
                && at < end
            {
                seen[i] += 1;
                count[i] += if came { 1 } else { -1 };
                if at >= end - 1000.0 {
                    *(if came { &mut opened } else { &mut closed }) += 1;
                }
            }
            if l.start_ms.is_some_and(|s| s < end) {
                peers.push(count[i].max(0) as usize);
            }
        }
        peers.sort_unstable();
        let up = peers.len();
        rows.push(ConnSample {
            t_s: t,
            up,
            mean: if up == 0 {
                0.0
            } else {
                peers.iter().sum::<usize>() as f64 / up as f64
            },
            p50: nearest_rank(&peers, 50).unwrap_or(0),
            max: peers.last().copied().unwrap_or(0),
            opened,
            closed,
        });
    }
    rows
}

/// What the nodes' event logs hold, gathered line by line.
#[derive(Debug, Default)]
struct Collected {
    published: Vec<Published>,
    receipts: Vec<Receipt>,
    gaps: Gaps,
    /// Each node's peers, in the order of the export's nodes (those with
    /// a log).
    peers: Vec<PeerLog>,
}

impl Collected {
    /// Takes line `l` of node `node`'s log (at model time `t_ms`) if it
    /// is a publish or a receipt: the k-th publish is the node's k-th
    /// planned message (its size next in `sizes`), sent to the other
    /// `members`.
    fn take(
        &mut self,
        node: usize,
        l: Line,
        t_ms: f64,
        sizes: &mut impl Iterator<Item = usize>,
        members: &[usize],
    ) {
        let kind = match l.msg {
            Msg::PeerId | Msg::PeerConnected | Msg::PeerDisconnected => return,
            Msg::MixSent | Msg::MixRelayed => return,
            Msg::Published => {
                let Some(size) = sizes.next() else {
                    self.gaps.unplanned += 1;
                    return;
                };
                self.published.push(Published {
                    t_ms,
                    id: l.id,
                    publisher: node,
                    size,
                    wire_size: size,
                    recipients: (members.iter().copied()).filter(|m| *m != node).collect(),
                });
                return;
            }
            Msg::Received => ReceiptKind::Wire,
            Msg::Delivered => ReceiptKind::Delivered,
            Msg::DuplicateDelivery => ReceiptKind::DuplicateDelivery,
        };
        self.receipts.push(Receipt {
            t_ms,
            node,
            id: l.id,
            kind,
        });
    }
}

/// The lines of the event log at `path`, `None` if it cannot be opened.
/// A line that cannot be read, is longer than [`MAX_LINE`] or is not an
/// event-log line is skipped and counted in `bad_lines`.
fn log_lines<'a>(path: &Path, bad_lines: &'a mut usize) -> Option<impl Iterator<Item = Line> + 'a> {
    let file = std::fs::File::open(path).ok()?;
    Some(
        std::io::BufReader::new(file)
            .lines()
            .filter_map(move |line| {
                let parsed = (line.ok())
                    .filter(|l| l.len() <= MAX_LINE)
                    .and_then(|l| serde_json::from_str::<Line>(&l).ok());
                if parsed.is_none() {
                    *bad_lines += 1;
                }
                parsed
            }),
    )
}

/// The run record of the export in `dir`, from its nodes' event logs, and
/// the daemons' connections second by second.
pub fn analyse(dir: &Path) -> anyhow::Result<(RunRecord, Gaps, Vec<ConnSample>)> {
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
    // The peers at the end of the workload count as in-process, where
    // they are the nodes' status then.
    let end_ms = s.duration_secs * 1000.0;
    let mut c = Collected::default();
    for node in &info.nodes {
        let mut bad = 0;
        let Some(lines) = log_lines(&node.event_log, &mut bad) else {
            c.gaps.missing_logs.push(node.index);
            continue;
        };
        let mut sizes = planned.get(&node.index).into_iter().flatten().copied();
        let mut peers = PeerLog::default();
        for l in lines {
            let t = t_ms(&l);
            if !peers.take(&l, t, end_ms) {
                c.take(node.index, l, t, &mut sizes, &plan.workload.members);
            }
        }
        c.gaps.bad_lines += bad;
        c.peers.push(peers);
    }
    let connected_peers = c.peers.iter().map(|p| p.at_end() as u64).collect();
    let connections = connection_series(&mut c.peers);
    c.published.sort_by(|a, b| a.t_ms.total_cmp(&b.t_ms));
    let record = RunRecord {
        scenario: s.name.clone(),
        seed: info.seed,
        nodes: s.nodes,
        time_dilation: 1.0,
        duration_ms: end_ms,
        published: c.published,
        receipts: c.receipts,
        median_link_latency_ms: median_link_latency_ms(&plan),
        // On loopback (a local check) the model's latencies do not apply.
        link: (!info.local).then(|| link_record(&s, &plan)),
        wire_sizes_unknown: true,
        connected_peers,
        ..RunRecord::default()
    };
    Ok((record, c.gaps, connections))
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
                peer(-6000.0, Msg::PeerId, "me"),
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

        let (rec, gaps, conns) = analyse(&dir).expect("analyse");
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
        // Second by second: every logging daemon up from -6 s; a and b
        // came in [-5, -4), c in [-4, -3), b left in [0, 1), c left and d
        // came in the second after the end.
        let n = logs.len();
        let row = |t: i64| conns.iter().find(|c| c.t_s == t).expect("a row");
        assert_eq!(
            conns.first().map(|c| (c.t_s, c.up, c.max)),
            Some((-6, n, 0))
        );
        assert_eq!((row(-5).opened, row(-5).mean, row(-5).p50), (2 * n, 2.0, 2));
        assert_eq!((row(-4).opened, row(-4).max), (n, 3));
        assert_eq!((row(0).closed, row(0).mean), (n, 2.0));
        let last = conns.last().expect("rows");
        let end_s = (end / 1000.0) as i64 + 1;
        assert_eq!(
            (last.t_s, last.opened, last.closed, last.mean),
            (end_s, n, n, 2.0)
        );
        let csv = connections_csv(&conns);
        assert!(csv.starts_with("t_s,up,mean,p50,max,opened,closed\n-6,"));
        assert_eq!(csv.lines().count(), conns.len() + 1);
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
