//! `fogmesh-sim`: runs many real fogmesh nodes in one process over a
//! modelled network and reports what they did. See docs/simulator-guide.md.

// The modules' items are `pub` for their documentation; this is a binary.
#![allow(unreachable_pub)]

mod clock;
mod collector;
mod faults;
mod net;
mod plan;
mod record;
mod report;
mod run;
mod scenario;
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
    },
}

fn main() -> ExitCode {
    let cli = match fogmesh::cli::parse_args::<Cli>() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("fogmesh_sim=info,warn,libp2p_gossipsub=error")
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
        } => {
            let text = std::fs::read_to_string(&scenario)
                .with_context(|| format!("cannot read {}", scenario.display()))?;
            let mut s = scenario::Scenario::load(&scenario)?;
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
    }
}
