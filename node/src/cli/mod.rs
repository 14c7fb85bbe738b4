//! The `fogmesh` command line: `run` starts the daemon; every other command
//! is a client of a running daemon's local API, except `id` (which reads the
//! identity file) and `radio` (which serves or drives a simulated BLE
//! medium).
//!
//! This module holds the parser's top (global flags, the command families),
//! the dispatch and the exit codes; each family lives in its own module
//! ([`run`], [`node`], [`group`], [`file`], [`radio`]) and prints through
//! [`output`].
//!
//! Exit codes: 0 success (also when stdout's reader went away, as in
//! `fogmesh events | head`), 1 nothing found, 2 error or bad usage. Data goes
//! to stdout, diagnostics to stderr.

mod file;
mod group;
mod message;
mod node;
mod output;
mod radio;
mod run;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::client::Client;
use crate::config::{self, LogFormat};
use output::Output;

/// A peer-to-peer node for messaging and file sharing, with or without the
/// internet.
#[derive(Debug, Parser)]
#[command(name = "fogmesh", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// Data directory (identity, database, API token). Default: the
    /// platform's data directory, e.g. ~/.local/share/fogmesh.
    #[arg(long, global = true, env = "FOGMESH_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Print machine-readable JSON on stdout: the API's own answers.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node (the daemon).
    // Boxed: every daemon setting lives in it, the other commands are small.
    Run(Box<run::RunArgs>),
    /// Print this node's peer id (no daemon needed; creates the identity if
    /// there is none).
    Id,
    #[command(flatten)]
    Node(node::NodeCommand),
    /// The simulated BLE medium: serve one, or inspect and change it.
    #[command(subcommand)]
    Radio(radio::RadioCommand),
    /// Group chat: create groups, manage members, send and read messages.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// File sharing: share files, fetch them from every peer that has them.
    #[command(subcommand)]
    File(file::FileCommand),
    #[command(flatten)]
    Message(message::MessageCommand),
}

/// An error that means "nothing found" (exit code 1) rather than a failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NothingFound(pub String);

/// Parses the command line of a fogmesh binary (`fogmesh`, `fogmesh-sim`),
/// or says how the process ends: clap prints help and version on stdout
/// with exit 0, usage errors on stderr with exit 2.
pub fn parse_args<C: Parser>() -> Result<C, ExitCode> {
    C::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// Parses the command line and runs the command; the process's exit code.
pub fn main() -> ExitCode {
    let cli = match parse_args::<Cli>() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code_of(&e);
            match code {
                0 => {}
                1 => eprintln!("{e:#}"),
                _ => eprintln!("error: {e:#}"),
            }
            ExitCode::from(code)
        }
    }
}

/// The exit code a command's error means: 0 when only stdout's reader went
/// away, 1 for nothing found, 2 for everything else.
fn exit_code_of(e: &anyhow::Error) -> u8 {
    if output::is_stdout_closed(e) {
        0
    } else if e.is::<NothingFound>() {
        1
    } else {
        2
    }
}

/// `Ok` if `items` has something, else "nothing found" (exit 1) saying
/// `what` there is none of.
fn found<T>(items: &[T], what: &str) -> anyhow::Result<()> {
    if items.is_empty() {
        return Err(NothingFound(format!("no {what}")).into());
    }
    Ok(())
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let data_dir = match cli.global.data_dir {
        Some(d) => d,
        None => config::default_data_dir()?,
    };
    let out = Output::new(cli.global.json);
    match cli.command {
        Command::Run(args) => run::run(data_dir, *args),
        Command::Radio(cmd) => {
            init_logging(LogFormat::Text, "info");
            runtime()?.block_on(radio::run(cmd, out))
        }
        Command::Id => {
            init_logging(LogFormat::Text, "warn");
            node::id(&data_dir, out)
        }
        Command::Node(cmd) => with_client(&data_dir, |c| node::run(c, cmd, out)),
        Command::Group(cmd) => with_client(&data_dir, |c| group::run(c, cmd, out)),
        Command::File(cmd) => with_client(&data_dir, |c| file::run(c, cmd, out)),
        Command::Message(cmd) => with_client(&data_dir, |c| message::run(c, cmd, out)),
    }
}

/// Runs a client command against the daemon on `data_dir`.
fn with_client<F>(data_dir: &Path, command: impl FnOnce(Client) -> F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    init_logging(LogFormat::Text, "warn");
    let client = Client::from_data_dir(data_dir)?;
    runtime()?.block_on(command(client))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn init_logging(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere() {
        let a = Cli::try_parse_from(["fogmesh", "--json", "status", "--data-dir", "/x"])
            .expect("parse");
        assert!(a.global.json);
        assert_eq!(
            a.global.data_dir.as_deref(),
            Some(std::path::Path::new("/x"))
        );
    }

    #[test]
    fn bad_bootstrap_is_a_usage_error() {
        let e = Cli::try_parse_from(["fogmesh", "run", "--bootstrap", "not-a-multiaddr"])
            .expect_err("must fail");
        assert!(e.to_string().contains("--bootstrap"));
        assert!(e.use_stderr());
    }

    #[test]
    fn commands_keep_their_names() {
        let cmd = Cli::command();
        let names: Vec<&str> = cmd.get_subcommands().map(|c| c.get_name()).collect();
        assert_eq!(
            names,
            [
                "run",
                "id",
                "status",
                "peers",
                "connect",
                "events",
                "radio",
                "group",
                "file",
                "send",
                "messages",
                "outbox",
                "mailbox-delete"
            ]
        );
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code_of(&NothingFound("x".into()).into()), 1);
        assert_eq!(exit_code_of(&anyhow::anyhow!("broken")), 2);
        assert_eq!(exit_code_of(&output::StdoutClosed.into()), 0);
        assert!(found(&[1], "ones").is_ok());
        assert_eq!(
            exit_code_of(&found::<u8>(&[], "ones").expect_err("empty")),
            1
        );
    }
}
