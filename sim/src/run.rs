//! Running a scenario: real fogmesh nodes (the same behaviours, event loop,
//! group actor and storage as `fogmesh run`) on the modelled network, a
//! workload driven through the nodes' own handles, and a record of what
//! every node saw.
//!
//! A run, step by step ([`run`]):
//! 1. plan: everything the seed decides ([`crate::plan`]), written out;
//! 2. world: the network and the nodes started, dialled along the
//!    topology ([`crate::world`]);
//! 3. group: node 0 creates it, the members learn of it, the mesh warms up
//!    ([`crate::workload`]);
//! 4. workload: from model time 0, messages sent at their times and faults
//!    applied at theirs ([`crate::faults`]), while the collector records
//!    every receipt ([`crate::collector`]), until the scenario's duration;
//! 5. teardown: the nodes stopped, the record completed.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::clock::{ModelClock, wall};
use crate::collector::{Collector, HostLag, Seen, Taps};
use crate::faults::{self, TimedFault};
use crate::plan::{Plan, plan};
use crate::record::{LinkRecord, RunRecord};
use crate::scenario::{Scenario, WorkloadKind};
use crate::workload::{self, PublishOutcome};
use crate::world::World;

/// How a run is asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The seed (the scenario's unless overridden).
    pub seed: u64,
    /// The time-dilation factor.
    pub dilation: f64,
    /// Where outputs go.
    pub out: PathBuf,
    /// Model seconds from the workload's set-up (the group's creation) to
    /// the warm-up, at least (`run --join-secs`).
    pub join_secs: u64,
}

/// Runs the scenario; writes everything but the report into `opts.out`.
pub async fn run(s: &Scenario, scenario_text: &str, opts: &Options) -> anyhow::Result<RunRecord> {
    let wall_start = std::time::Instant::now();
    let dilation = opts.dilation;
    let plan = plan(s, opts.seed);
    write_inputs(s, scenario_text, opts, &plan)?;

    let (taps, receipts) = Taps::new();
    let lag = HostLag::start(dilation);
    let mut world = World::new(s, &plan, opts.seed, dilation, taps.clone())?;
    world.start_all().await?;
    tracing::info!(nodes = s.nodes, "nodes started");
    world.connect(&plan.topology.edges).await;

    let members = &plan.workload.members;
    let gid = set_up(&world, &taps, s, members, opts).await?;

    // Model time 0: the workload starts, and so do the measurements.
    let clock = ModelClock::start_now(dilation);
    lag.measure();
    let events_path = opts.out.join("events.ndjson");
    let collector = Collector::create(&events_path, clock, &plan.topology.nodes, members.clone())?;
    let publishes = workload::publish_all(
        &world,
        &plan.workload.messages,
        &gid,
        clock,
        opts.seed,
        s.workload.private,
    );
    let (faults, fault_windows) = faults::schedule(&plan.workload);
    let mut workload = Workload {
        clock,
        end_ms: s.duration_secs * 1000.0,
        receipts,
        publishes,
        faults: faults.into_iter().peekable(),
        collector,
    };
    workload.drive(&mut world).await?;
    let mut direct = workload.collector.direct(&taps);
    workload::sender_view(&world, &mut direct).await;
    for d in &mut direct {
        d.class = workload::direct_class(s, &plan, d.from, d.to);
    }

    let bytes_sent = world.bytes_sent();
    let connected_peers = world.connected_peers().await;
    let (dm_envelopes_sent, dm_envelopes_relayed) = world.dm_envelopes();
    let lag_ms = lag.finish();
    world.stop_all().await;
    let onion = world.onion().map(|o| o.record(&clock));
    if let Some(o) = &onion {
        crate::onion::write_log(&opts.out.join("mix.ndjson"), o, &clock, dilation)?;
    }
    let (published, receipts) = workload.collector.finish(workload.receipts)?;
    Ok(RunRecord {
        scenario: s.name.clone(),
        seed: opts.seed,
        nodes: s.nodes,
        time_dilation: dilation,
        duration_ms: s.duration_secs * 1000.0,
        wall_secs: wall_start.elapsed().as_secs_f64(),
        peak_rss_kib: peak_rss_kib(),
        published,
        receipts,
        bytes_sent,
        connected_peers,
        dm_envelopes_sent,
        dm_envelopes_relayed,
        lag_ms,
        faults: fault_windows,
        median_link_latency_ms: median_link_latency_ms(&plan),
        direct,
        link: Some(link_record(s, &plan)),
        wire_sizes_unknown: false,
        onion,
    })
}

/// The workload's set-up: node 0 creates the group (a group workload)
/// and every member learns of it, then the join window and the warm-up
/// pass. Returns the group's id (empty for direct messages).
async fn set_up(
    world: &World,
    taps: &Taps,
    s: &Scenario,
    members: &[usize],
    opts: &Options,
) -> anyhow::Result<String> {
    let dilation = opts.dilation;
    let start = tokio::time::Instant::now();
    let gid = match s.workload.kind {
        WorkloadKind::Group => {
            let gid = workload::create_group(world, &s.name, members).await?;
            workload::wait_for_members(world, taps, &gid, members, dilation).await?;
            tracing::info!("every member knows the group");
            gid
        }
        // Direct messages need no group: the warm-up lets the radios find
        // their neighbours and the gateways announce themselves.
        WorkloadKind::Direct => String::new(),
    };
    // As a Shadow export's daemons: the warm-up starts `join_secs` after
    // the set-up began, whatever happened before.
    tokio::time::sleep_until(start + wall(opts.join_secs as f64, dilation)).await;
    tokio::time::sleep(wall(s.workload.warmup_secs, dilation)).await;
    Ok(gid)
}

/// The workload under way: what arrives, what is due, and the record.
struct Workload {
    clock: ModelClock,
    /// Model ms at which the run ends.
    end_ms: f64,
    receipts: mpsc::UnboundedReceiver<Seen>,
    publishes: mpsc::UnboundedReceiver<PublishOutcome>,
    /// Faults still to come, in time order.
    faults: std::iter::Peekable<std::vec::IntoIter<TimedFault>>,
    collector: Collector,
}

impl Workload {
    /// Records receipts and publishes as they arrive and applies each
    /// fault when due, until the end.
    async fn drive(&mut self, world: &mut World) -> anyhow::Result<()> {
        let end = self.clock.at(self.end_ms);
        loop {
            let next_fault = (self.faults.peek()).map(|f| self.clock.at(f.at_ms).min(end));
            let wake = next_fault.unwrap_or(end);
            tokio::select! {
                Some(seen) = self.receipts.recv() => self.collector.on_seen(seen)?,
                Some(outcome) = self.publishes.recv() => self.collector.on_publish(outcome)?,
                _ = tokio::time::sleep_until(wake) => {
                    if tokio::time::Instant::now() >= end {
                        return Ok(());
                    }
                    if let Some(due) = self.faults.next() {
                        faults::apply(world, due.fault).await;
                    }
                }
            }
        }
    }
}

/// Writes what the run is made of, before it starts: `scenario.toml`,
/// `run.json`, `topology.json` and `workload.json`.
fn write_inputs(s: &Scenario, text: &str, opts: &Options, plan: &Plan) -> anyhow::Result<()> {
    let out = &opts.out;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let toml = out.join("scenario.toml");
    std::fs::write(&toml, text).with_context(|| format!("cannot write {}", toml.display()))?;
    let run = serde_json::json!({
        "scenario": s.name,
        "seed": opts.seed,
        "time_dilation": opts.dilation,
        "join_secs": opts.join_secs,
        "fogmesh_version": env!("CARGO_PKG_VERSION"),
    });
    write_json(&out.join("run.json"), &run)?;
    write_json(&out.join("topology.json"), &plan.topology)?;
    write_json(&out.join("workload.json"), &plan.workload)
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> anyhow::Result<()> {
    let f =
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    serde_json::to_writer_pretty(std::io::BufWriter::new(f), v)?;
    Ok(())
}

/// The internet link model of the plan, for the report's physical limit.
pub fn link_record(s: &Scenario, plan: &Plan) -> LinkRecord {
    LinkRecord {
        region: plan.region.clone(),
        latency_ms: plan.latency.clone(),
        uplink_bps: plan.uplink.clone(),
        internet: (0..s.nodes).map(|i| i < s.internet_nodes()).collect(),
    }
}

/// The median one-way latency of the link model, ms: the scale against
/// which host lag is judged.
pub fn median_link_latency_ms(plan: &Plan) -> f64 {
    let mut latencies: Vec<f64> = plan.latency.iter().flatten().copied().collect();
    latencies.sort_by(f64::total_cmp);
    latencies.get(latencies.len() / 2).copied().unwrap_or(0.0)
}

/// VmHWM of this process, KiB (0 where /proc is not available).
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
