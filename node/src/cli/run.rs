//! `fogmesh run`: resolves the daemon's settings (defaults, `config.toml`,
//! environment, flags) and runs the daemon until a termination signal.
//!
//! The settings' flags are [`config::Overrides`], flattened here: each
//! setting is declared once, there, for both the command line and the
//! config file.

use std::path::PathBuf;

use clap::Args;

use super::{init_logging, runtime};
use crate::config::{Overrides, Settings};

/// The arguments of `fogmesh run`.
#[derive(Debug, Args)]
pub(super) struct RunArgs {
    #[command(flatten)]
    settings: Overrides,
}

/// Runs the daemon on `data_dir`.
pub(super) fn run(data_dir: PathBuf, args: RunArgs) -> anyhow::Result<()> {
    let file = Overrides::load(&data_dir)?;
    let settings = Settings::resolve(data_dir, file, args.settings)?;
    init_logging(settings.log_format, DEFAULT_LOG_FILTER);
    runtime()?.block_on(crate::daemon::run(settings))
}

/// The daemon's log filter unless `RUST_LOG` says otherwise: `info`, with
/// libp2p-kad's warnings held back. Kademlia tries a bootstrap of its
/// own when a listen address comes up and no peer is connected, and warns
/// that it has no known peers: what every node that starts alone (the
/// first of a network) logged at start. (Its only other warning is about
/// replicating records, which fogmesh does not store.)
const DEFAULT_LOG_FILTER: &str = "info,libp2p_kad::behaviour=error";

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::config;

    #[test]
    fn flags_reach_the_settings() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            tmp.path().join(config::CONFIG_FILE),
            "min_peers = 3\nmax_connections = 9\n",
        )
        .expect("write");
        let cli = super::super::Cli::try_parse_from([
            "fogmesh",
            "run",
            "--max-connections",
            "20",
            "--no-mdns",
        ])
        .expect("parse");
        let super::super::Command::Run(args) = cli.command else {
            panic!("not run");
        };
        let file = Overrides::load(tmp.path()).expect("load");
        let s = Settings::resolve(tmp.path().into(), file, args.settings).expect("resolve");
        assert_eq!((s.max_connections, s.min_peers, s.mdns), (20, 3, false));
    }
}
