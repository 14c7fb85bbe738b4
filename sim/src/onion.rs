//! The onion route in a scenario (`[onion]`): which nodes relay, the
//! onion settings each node is built with, and the nodes' mix traces
//! gathered for the report's anonymity figures.
//!
//! What is the simulator's here is only the mapping from the scenario to
//! [`fogmesh::onion::OnionConfig`] (the daemon's `--mix`, `--onion-hops`,
//! `--mix-delay-ms`, `--cover-rate`) and the collection of what each node's
//! tracer reports (the same events `--event-log` writes as `Mix Sent` and
//! `Mix Relayed` lines). Relaying, paths, delays and cover are the node's.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use fogmesh::eventlog::{self, Line, MixFields, Msg};
use fogmesh::onion::{MixOrigin, MixTrace, MixTracer, OnionConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::clock::ModelClock;
use crate::plan::Plan;
use crate::record::{MixRecord, OnionRecord};
use crate::scenario::{OnionKnob, Scenario};

/// Mixes the seed for the choice of mix nodes, so that it draws from an
/// RNG of its own (the plan's draws, and so every other scenario's
/// inputs, stay as they were).
const MIX_SEED: u64 = 0x6f6e_696f_6e6d_6978;

/// The onion side of a run: settings, mix nodes and the traces.
#[derive(Debug)]
pub struct OnionSetup {
    knob: OnionKnob,
    /// Whether each node relays.
    mix: Vec<bool>,
    /// Every node's mix trace, in the order reported.
    traces: Arc<Mutex<Vec<(usize, MixTrace)>>>,
}

impl OnionSetup {
    /// The setup of scenario `s` (none without an `[onion]` section).
    pub fn new(s: &Scenario, plan: &Plan, seed: u64) -> Option<Self> {
        let knob = s.onion.clone()?;
        let mut mix = vec![false; s.nodes];
        for i in mix_nodes(
            s.internet_nodes(),
            &plan.workload.publishers,
            knob.mix_nodes,
            seed,
        ) {
            mix[i] = true;
        }
        Some(OnionSetup {
            knob,
            mix,
            traces: Arc::default(),
        })
    }

    /// Node `i`'s onion settings (model time; the builder dilates them),
    /// with a tracer into this setup.
    pub fn config(&self, i: usize) -> OnionConfig {
        let traces = self.traces.clone();
        OnionConfig {
            mix: self.mix[i],
            hops: self.knob.hops,
            mean_delay_ms: self.knob.mix_delay_ms,
            cover_rate: self.knob.cover_rate,
            trace: Some(MixTracer(Arc::new(move |t| {
                if let Ok(mut v) = traces.lock() {
                    v.push((i, t));
                }
            }))),
            ..OnionConfig::default()
        }
    }

    /// The mix nodes, and the traces so far in model time (events before
    /// the workload started have negative times).
    pub fn record(&self, clock: &ModelClock) -> OnionRecord {
        let traces = self.traces.lock().map(|v| v.clone()).unwrap_or_default();
        let ms = |at: std::time::Instant| clock.ms(tokio::time::Instant::from_std(at));
        let packets = (traces.into_iter())
            .map(|(node, t)| match t {
                MixTrace::Sent { origin, packet, at } => MixRecord {
                    node,
                    origin: Some(origin_name(&origin).to_owned()),
                    packet_in: None,
                    packet_out: packet,
                    arrived_ms: None,
                    t_ms: ms(at),
                },
                MixTrace::Relayed {
                    packet_in,
                    packet_out,
                    arrived,
                    departed,
                } => MixRecord {
                    node,
                    origin: None,
                    packet_in: Some(packet_in),
                    packet_out,
                    arrived_ms: Some(ms(arrived)),
                    t_ms: ms(departed),
                },
            })
            .collect();
        OnionRecord {
            mix_nodes: (0..self.mix.len()).filter(|i| self.mix[*i]).collect(),
            packets,
        }
    }
}

/// What a packet carries, as a trace names it.
fn origin_name(o: &MixOrigin) -> &str {
    match o {
        MixOrigin::Message(id) => id,
        MixOrigin::Reply => "reply",
        MixOrigin::Cover => "cover",
    }
}

/// `count` of the first `internet` nodes, drawn with the seed: nodes that
/// do not send first, then senders.
pub fn mix_nodes(internet: usize, publishers: &[usize], count: usize, seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed ^ MIX_SEED);
    let (mut others, mut senders): (Vec<usize>, Vec<usize>) =
        (0..internet).partition(|i| !publishers.contains(i));
    others.shuffle(&mut rng);
    senders.shuffle(&mut rng);
    let mut chosen: Vec<usize> = others.into_iter().chain(senders).take(count).collect();
    chosen.sort_unstable();
    chosen
}

/// Writes `mix.ndjson`: every mix trace as `--event-log` writes it (`Mix
/// Sent`, `Mix Relayed`), with the simulator's `t_ms` and `node`; `time`
/// and `held_us` by the host's clock, which runs `dilation` times slower
/// than model time.
pub fn write_log(
    path: &Path,
    rec: &OnionRecord,
    clock: &ModelClock,
    dilation: f64,
) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut log = eventlog::Writer::new(std::io::BufWriter::new(file));
    let now = (SystemTime::now(), clock.ms(tokio::time::Instant::now()));
    let host_us = |model_ms: f64| (model_ms.max(0.0) * dilation * 1000.0) as u64;
    for p in &rec.packets {
        let (msg, id) = match (&p.origin, &p.packet_in) {
            (Some(origin), _) => (Msg::MixSent, origin),
            (None, Some(packet_in)) => (Msg::MixRelayed, packet_in),
            (None, None) => continue,
        };
        let time = now.0 - Duration::from_micros(host_us(now.1 - p.t_ms));
        let line = Line {
            mix: Some(MixFields {
                out: p.packet_out.clone(),
                held_us: p.arrived_ms.map(|a| host_us(p.t_ms - a)),
            }),
            ..Line::new(time, msg, id.as_str())
        };
        log.write(&line.in_simulation(p.t_ms, p.node))?;
    }
    log.flush()?;
    Ok(())
}
