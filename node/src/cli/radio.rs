//! `fogmesh radio ...`: serve a simulated BLE medium on a unix socket, and
//! inspect or change a running one (list, move, drop).
//!
//! The medium's link model defaults are `LinkModel::default()`'s; the flags
//! show them.

use std::io;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use fogmesh_ble::sim::{self, AdminRequest, LinkModel, Medium, Position};

use super::found;
use super::output::{self, Human, Output};

#[derive(Debug, Subcommand)]
pub(super) enum RadioCommand {
    /// Run a simulated BLE medium on a unix socket, for nodes started with
    /// --ble sim:SOCKET (until interrupted).
    Serve {
        /// Path of the unix socket to create.
        #[arg(value_name = "SOCKET")]
        socket: PathBuf,
        /// Radio range, metres.
        #[arg(long, value_name = "METERS", default_value_t = LinkModel::default().range_m)]
        range: f64,
        /// Payload throughput of one link, bytes per second.
        #[arg(long, value_name = "BYTES_PER_SEC", default_value_t = LinkModel::default().bandwidth)]
        bandwidth: u64,
        /// One-way latency of a packet, milliseconds.
        #[arg(long, value_name = "MS", default_value_t = LinkModel::default().latency_ms)]
        latency_ms: f64,
        /// Largest payload per radio packet, bytes.
        #[arg(long, value_name = "BYTES", default_value_t = LinkModel::default().mtu)]
        mtu: usize,
        /// Probability that a packet must be sent again.
        #[arg(long, value_name = "P", default_value_t = LinkModel::default().loss)]
        loss: f64,
        /// Mean seconds between random link drops (none by default).
        #[arg(long, value_name = "SECS")]
        drop_mean_secs: Option<f64>,
        /// Most simultaneous links per device.
        #[arg(long, value_name = "N", default_value_t = LinkModel::default().max_links)]
        max_links: usize,
    },
    /// List the devices on a medium, their positions and links.
    List {
        /// The medium's socket.
        #[arg(value_name = "SOCKET")]
        socket: PathBuf,
    },
    /// Move a device on a medium (links to devices now out of range drop).
    Move {
        /// The medium's socket.
        #[arg(value_name = "SOCKET")]
        socket: PathBuf,
        /// The device address, as `fogmesh status` or `radio list` shows it.
        #[arg(value_name = "DEVICE")]
        device: String,
        /// The new position, metres.
        #[arg(
            value_name = "X,Y",
            value_parser = crate::config::parse_position,
            allow_hyphen_values = true
        )]
        position: Position,
    },
    /// Drop every link of a device on a medium, as a radio reset would.
    Drop {
        /// The medium's socket.
        #[arg(value_name = "SOCKET")]
        socket: PathBuf,
        /// The device address.
        #[arg(value_name = "DEVICE")]
        device: String,
    },
}

/// Runs a radio command.
pub(super) async fn run(cmd: RadioCommand, out: Output) -> anyhow::Result<()> {
    let (socket, request) = match cmd {
        RadioCommand::Serve {
            socket,
            range,
            bandwidth,
            latency_ms,
            mtu,
            loss,
            drop_mean_secs,
            max_links,
        } => {
            let model = LinkModel {
                range_m: range,
                mtu,
                bandwidth,
                latency_ms,
                loss,
                drop_mean_secs,
                max_links,
                seed: rand::random(),
            };
            return serve(&socket, model).await;
        }
        RadioCommand::List { socket } => (socket, AdminRequest::List),
        RadioCommand::Move {
            socket,
            device,
            position,
        } => (socket, AdminRequest::Move { device, position }),
        RadioCommand::Drop { socket, device } => (socket, AdminRequest::Drop { device }),
    };
    let is_list = matches!(request, AdminRequest::List);
    let answer = sim::admin(&socket, request).await?;
    if !is_list {
        // The medium's answer as it gave it (it has no other form).
        return out.show(&answer, |w, a| writeln!(w, "{a}"));
    }
    let devices: Vec<sim::DeviceInfo> =
        serde_json::from_value(answer["devices"].clone()).context("unexpected answer")?;
    out.show(&answer, |w, _| {
        devices.iter().try_for_each(|d| write_device(&mut *w, d))
    })?;
    found(&devices, "devices on this medium")
}

/// Serves a medium with `model` on `socket` until SIGINT or SIGTERM.
async fn serve(socket: &Path, model: LinkModel) -> anyhow::Result<()> {
    model
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid radio model: {e}"))?;
    // A socket left by a medium that died is in the way; a live one is not
    // ours to take.
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            anyhow::bail!("a radio medium is already serving {}", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("cannot replace {}", socket.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    let ready = output::write(|w| {
        writeln!(w, "radio medium: {}", socket.display())?;
        writeln!(
            w,
            "range: {} m, bandwidth: {} B/s, latency: {} ms",
            model.range_m, model.bandwidth, model.latency_ms
        )?;
        writeln!(w, "ready")
    });
    if let Err(e) = ready {
        let _ = std::fs::remove_file(socket);
        return Err(e);
    }
    // Only the ready lines go to stdout: its reader may leave once it has
    // them, the medium keeps serving.
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(sim::serve(listener, Medium::new(model), stop.clone()));
    crate::daemon::wait_for_signal(stop.clone()).await;
    let _ = serving.await;
    let _ = std::fs::remove_file(socket);
    Ok(())
}

fn write_device(w: Human<'_>, d: &sim::DeviceInfo) -> io::Result<()> {
    let links: Vec<String> = d.links.iter().map(|l| l.to_string()).collect();
    writeln!(
        w,
        "{}  at {:.1},{:.1}  {}  links: {}",
        d.device,
        d.position.x,
        d.position.y,
        if d.advertising {
            "advertising"
        } else {
            "silent     "
        },
        if links.is_empty() {
            "-".into()
        } else {
            links.join(" ")
        }
    )
}
