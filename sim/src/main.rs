//! `fogmesh-sim`: runs many real fogmesh nodes in one process over a
//! modelled network and reports what they did. See docs/simulator-guide.md.

// The modules' items are `pub` for their documentation; this is a binary.
#![allow(unreachable_pub)]

mod analyse;
mod clock;
mod collector;
mod faults;
mod net;
mod onion;
mod plan;
mod record;
mod report;
mod run;
mod scenario;
mod shadow;
mod workload;
mod world;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Many real fogmesh nodes over a modelled network.
#[derive(Debug, Parser)]
#[command(name = "fogmesh-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a scenario and write its outputs.
    Run {
        /// The scenario file (TOML).
        scenario: PathBuf,
        /// Seed (default: the scenario's).
        #[arg(long)]
        seed: Option<u64>,
        /// Output directory (default: sim-out/<name>-<seed>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run the model this many times slower than real time (default:
        /// the scenario's, else 1).
        #[arg(long, value_name = "FACTOR")]
        time_dilation: Option<f64>,
        /// Simulated seconds from the workload's set-up (the group's
        /// creation) to the warm-up, at least: the warm-up still waits for
        /// every member to know the group. Give a Shadow export's
        /// `--join-secs` to start the workload as late after the set-up as
        /// the daemons do there.
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        join_secs: u64,
    },
    /// Write what the Shadow network simulator needs to run the scenario
    /// with real fogmesh daemons (see docs/simulator-guide.md).
    ExportShadow(ExportArgs),
    /// The workload driver Shadow runs beside node N's daemon (started by
    /// an export's shadow.yaml, not by hand).
    Drive {
        /// The export directory.
        dir: PathBuf,
        /// The node whose part of the workload to drive.
        #[arg(long, value_name = "N")]
        node: usize,
    },
    /// Turn the daemons' event logs of a Shadow run into the report of an
    /// in-process run (summary.json, summary.csv, plots), and their peers
    /// second by second (connections.csv).
    Analyse {
        /// The export directory, after Shadow ran it.
        dir: PathBuf,
        /// Where the report goes (default: DIR/report).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `fogmesh-sim export-shadow`'s arguments.
#[derive(Debug, clap::Args)]
struct ExportArgs {
    /// The scenario file (TOML).
    scenario: PathBuf,
    /// Seed (default: the scenario's).
    #[arg(long)]
    seed: Option<u64>,
    /// The directory to write (absent or empty).
    #[arg(long)]
    out: PathBuf,
    /// The fogmesh binary Shadow runs (default: the one beside this
    /// program).
    #[arg(long, value_name = "PATH")]
    fogmesh: Option<PathBuf>,
    /// Simulated seconds the members get to join the group before the
    /// workload's warm-up.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    join_secs: u64,
    /// Instead of Shadow's network, lay the nodes out on this host's
    /// loopback (p2p ports BASE+i, API ports BASE+nodes+i) with times
    /// counted from now, to check an export with real processes.
    #[arg(long, value_name = "BASE")]
    local_port: Option<u16>,
    /// Close connections the topology does not hold after SECS idle
    /// seconds, and have both ends of every topology link hold it, as
    /// in-process (5 s there). Without it every connection is held for
    /// the run, which costs each daemon a connection's buffers for
    /// every peer it ever met: large runs need it to fit in memory.
    #[arg(long, value_name = "SECS")]
    idle_timeout_secs: Option<u64>,
    /// Start the daemons one after another, evenly over SECS simulated
    /// seconds, instead of all at once; the group is created 9 s after
    /// the last. A thousand daemons starting in the same instant all walk
    /// the DHT at once, and each walk's connections cost both ends their
    /// buffers.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    boot_secs: u64,
}

fn main() -> ExitCode {
    let cli = match fogmesh::cli::parse_args::<Cli>() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // yamux warns of every connection whose far end went first: with
        // idle connections closing at both ends, hundreds a run; and
        // libp2p-kad that it has no known peers, once a node at start.
        tracing_subscriber::EnvFilter::new(
            "fogmesh_sim=info,warn,libp2p_gossipsub=error,yamux=error,libp2p_kad::behaviour=error",
        )
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            scenario,
            seed,
            out,
            time_dilation,
            join_secs,
        } => run_scenario(&scenario, seed, out, time_dilation, join_secs),
        Command::ExportShadow(args) => export_shadow(args),
        Command::Drive { dir, node } => drive(&dir, node),
        Command::Analyse { dir, out } => analyse_dir(&dir, out),
    }
}

/// `fogmesh-sim run`: runs the scenario and writes its report.
fn run_scenario(
    scenario: &std::path::Path,
    seed: Option<u64>,
    out: Option<PathBuf>,
    time_dilation: Option<f64>,
    join_secs: u64,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(scenario)
        .with_context(|| format!("cannot read {}", scenario.display()))?;
    let mut s = scenario::Scenario::load(scenario)?;
    if let Some(f) = time_dilation {
        s.time_dilation = f;
    }
    s.check()?;
    let seed = seed.unwrap_or(s.seed);
    let out = out.unwrap_or_else(|| PathBuf::from(format!("sim-out/{}-{seed}", s.name)));
    let opts = run::Options {
        seed,
        dilation: s.time_dilation,
        out: out.clone(),
        join_secs,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let record = rt.block_on(run::run(&s, &text, &opts))?;
    // Stop the runtime's leftover tasks (link forwarders) before the
    // report, which runs on this thread.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    let summary = report::write_report(&record, &out)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!("outputs in {}", out.display());
    Ok(())
}

/// `fogmesh-sim export-shadow`: writes a Shadow run of the scenario.
fn export_shadow(a: ExportArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.scenario)
        .with_context(|| format!("cannot read {}", a.scenario.display()))?;
    let s = scenario::Scenario::load(&a.scenario)?;
    s.check()?;
    let me = std::env::current_exe().context("cannot find this program's path")?;
    let fogmesh = match a.fogmesh {
        Some(p) => std::path::absolute(p)?,
        None => me.with_file_name("fogmesh"),
    };
    let out = a.out;
    let opts = shadow::ExportOptions {
        seed: a.seed.unwrap_or(s.seed),
        out: out.clone(),
        fogmesh,
        fogmesh_sim: me,
        join_secs: a.join_secs,
        local_port: a.local_port,
        idle_timeout_secs: a.idle_timeout_secs,
        boot_secs: a.boot_secs,
    };
    let info = shadow::export(&s, &text, &opts)?;
    eprintln!(
        "{} nodes exported to {}; run `shadow {}/shadow.yaml` there, then \
         `fogmesh-sim analyse {}`",
        info.nodes.len(),
        out.display(),
        out.display(),
        out.display()
    );
    Ok(())
}

/// `fogmesh-sim drive`: node `node`'s part of an export's workload.
fn drive(dir: &std::path::Path, node: usize) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(shadow::drive(dir, node))
}

/// `fogmesh-sim analyse`: the report of a Shadow run from its event logs.
fn analyse_dir(dir: &std::path::Path, out: Option<PathBuf>) -> anyhow::Result<()> {
    let (record, gaps, connections) = analyse::analyse(dir)?;
    if !gaps.missing_logs.is_empty() {
        eprintln!("warning: no event log for nodes {:?}", gaps.missing_logs);
    }
    if gaps.bad_lines + gaps.unplanned > 0 {
        eprintln!(
            "warning: {} unreadable lines, {} published messages beyond the plan",
            gaps.bad_lines, gaps.unplanned
        );
    }
    let out = out.unwrap_or_else(|| dir.join("report"));
    let summary = report::write_report(&record, &out)?;
    if !connections.is_empty() {
        let path = out.join("connections.csv");
        std::fs::write(&path, analyse::connections_csv(&connections))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!("outputs in {}", out.display());
    Ok(())
}
