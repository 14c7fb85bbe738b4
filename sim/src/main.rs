//! `fogmesh-sim`: the simulator's command line.
//!
//! Not built yet: the simulator will drive many real fogmesh nodes over an
//! in-memory transport through a modelled network (see
//! docs/architecture.md). Until then this binary says so and exits 2, so no
//! script mistakes it for a working simulator.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "fogmesh-sim {}: the simulator is not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
