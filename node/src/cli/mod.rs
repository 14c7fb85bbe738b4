//! The `fogmesh` command line: `run` starts the daemon; every other command
//! is a client of a running daemon's local API, except `id` (which reads the
//! identity file) and `radio` (which serves or drives a simulated BLE
//! medium).
//!
//! `completions` and `man` print a shell completion script and the man page,
//! both generated from these clap definitions (clap_complete,
//! clap_mangen), with no daemon and no data directory.
//!
//! This module holds the parser's top (global flags, the command families),
//! the dispatch and the exit codes; each family lives in its own module
//! ([`run`], [`node`], [`group`], [`file`], [`radio`]) and prints through
//! [`output`].
//!
//! Exit codes: 0 success (also when stdout's reader went away, as in
//! `fogmesh events | head`), 1 nothing found (an empty list, an unknown
//! id), 2 error or bad usage, 3 no daemon running on the data directory (or
//! it stopped under `events` or `--follow`). Data goes to stdout,
//! diagnostics to stderr.

mod file;
mod group;
mod message;
mod node;
mod open;
mod output;
mod radio;
mod run;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::client::{Client, ClientError};
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
    /// Print a shell completion script (bash, zsh or fish) on stdout, e.g.
    /// `fogmesh completions bash > /usr/share/bash-completion/completions/fogmesh`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page (roff) on stdout, e.g. `fogmesh man >
    /// /usr/share/man/man1/fogmesh.1`; `fogmesh man | man -l -` reads it.
    Man,
    /// Open the chat page the daemon serves: prints a one-time login URL
    /// (and opens it in the desktop's browser, if there is one).
    Open(open::OpenArgs),
}

/// The shells `fogmesh completions` writes for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
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
            if e.is::<file::Interrupted>() {
                // Its message is printed; 128 + SIGINT, as a shell says.
                return ExitCode::from(130);
            }
            if code != 0 {
                if e.is::<NothingFound>() {
                    // An empty answer is no error: "no connected peers".
                    eprintln!("{e:#}");
                } else {
                    eprintln!("error: {e:#}");
                }
            }
            ExitCode::from(code)
        }
    }
}

/// Exit code: no daemon runs on the data directory, or it stopped while a
/// command followed its events.
pub const EXIT_NO_DAEMON: u8 = 3;

/// The exit code a command's error means: 0 when only stdout's reader went
/// away, 1 for nothing found, [`EXIT_NO_DAEMON`] when the daemon is not
/// there (any more), 2 for everything else.
fn exit_code_of(e: &anyhow::Error) -> u8 {
    if output::is_stdout_closed(e) {
        return 0;
    }
    if e.is::<NothingFound>() {
        return 1;
    }
    match e.chain().find_map(|c| c.downcast_ref::<ClientError>()) {
        Some(ClientError::NotFound(_)) => 1,
        Some(ClientError::NotRunning(_) | ClientError::Stopped) => EXIT_NO_DAEMON,
        _ => 2,
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

/// How peers are named in this command's lines for a human: this node's
/// own id (asked of the daemon) is "me". Nothing is asked with `--json`.
async fn names(client: &Client, out: Output) -> output::Names {
    if out.is_json() {
        return output::Names::default();
    }
    let status: Option<crate::types::Status> = client.get("status").await.ok();
    output::Names::new(status.map(|s| s.peer_id))
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    // Neither needs a data directory (there may be no home, as when a
    // package is built).
    match cli.command {
        Command::Completions { shell } => return completions(shell),
        Command::Man => return man(),
        _ => {}
    }
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
        Command::Open(args) => with_client(&data_dir, |c| open::run(c, args, out)),
        Command::Completions { .. } | Command::Man => unreachable!("handled before"),
    }
}

/// `fogmesh completions SHELL`: the script, from the clap definitions.
fn completions(shell: Shell) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "fogmesh", &mut script);
    output::raw(&script)
}

/// `fogmesh man`: the man page (section 1) from the clap definitions:
/// clap_mangen's page for the top command (name, synopsis, options, the
/// command list), then one section per command with its full help, so
/// that every subcommand's arguments are in the one page.
fn man() -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    let mut page = Vec::new();
    man_page(Cli::command(), &mut page)?;
    output::raw(&page)
}

fn man_page(mut cmd: clap::Command, page: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::Write as _;
    cmd.build();
    let top = clap_mangen::Man::new(cmd.clone()).manual("fogmesh manual");
    top.render_title(page)?;
    top.render_name_section(page)?;
    top.render_synopsis_section(page)?;
    top.render_description_section(page)?;
    top.render_options_section(page)?;
    // clap_mangen's own command list points to a page per command; here
    // each command is a section of this page.
    writeln!(page, ".SH COMMANDS")?;
    for c in cmd.get_subcommands().filter(|c| c.get_name() != "help") {
        writeln!(page, ".TP\n\\fB{}\\fR", roff_escape(c.get_name()))?;
        let about = c.get_about().map(|a| a.to_string()).unwrap_or_default();
        writeln!(page, "{}", roff_line(&about))?;
    }
    let mut stack: Vec<(String, clap::Command)> = vec![("fogmesh".into(), cmd)];
    while let Some((path, mut c)) = stack.pop() {
        let mut subs: Vec<(String, clap::Command)> = c
            .get_subcommands()
            .filter(|s| s.get_name() != "help")
            .map(|s| (format!("{path} {}", s.get_name()), s.clone()))
            .collect();
        if path != "fogmesh" {
            // The page is the same whatever the environment of the one who
            // generates it: variables are named, not their values.
            c = c.mut_args(|a| a.hide_env_values(true));
            writeln!(page, ".SH \"{}\"", roff_escape(&path.to_uppercase()))?;
            writeln!(page, ".nf")?;
            let help = c.render_long_help().to_string();
            for line in help.lines() {
                writeln!(page, "{}", roff_line(line))?;
            }
            writeln!(page, ".fi")?;
        }
        subs.reverse();
        stack.extend(subs);
    }
    top.render_version_section(page)?;
    Ok(())
}

/// `s` with roff's escape character escaped.
fn roff_escape(s: &str) -> String {
    s.replace('\\', "\\e")
}

/// One line of text for roff: escaped, and kept from reading as a request
/// (a line that starts with `.` or `'`).
fn roff_line(line: &str) -> String {
    let line = roff_escape(line);
    if line.starts_with('.') || line.starts_with('\'') {
        format!("\\&{line}")
    } else {
        line
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
    // Colours only for a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
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
                "mailbox-delete",
                "completions",
                "man",
                "open"
            ]
        );
    }

    #[test]
    fn man_page_has_every_command() {
        let mut page = Vec::new();
        man_page(Cli::command(), &mut page).expect("render");
        let page = String::from_utf8(page).expect("utf-8");
        assert!(
            page.starts_with(".ie") || page.contains(".TH fogmesh 1"),
            "{page:.200}"
        );
        for section in [
            "FOGMESH GROUP CREATE",
            "FOGMESH FILE GET",
            "FOGMESH RADIO SERVE",
            "FOGMESH SEND",
        ] {
            assert!(
                page.contains(&format!(".SH \"{section}\"")),
                "{section} missing"
            );
        }
        // A help line that starts with a dot cannot become a request.
        assert_eq!(roff_line(".x"), "\\&.x");
        assert_eq!(roff_line("a\\b"), "a\\eb");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code_of(&NothingFound("x".into()).into()), 1);
        assert_eq!(exit_code_of(&anyhow::anyhow!("broken")), 2);
        assert_eq!(exit_code_of(&output::StdoutClosed.into()), 0);
        let e = anyhow::Error::from(ClientError::NotFound("no group x".into()));
        assert_eq!(exit_code_of(&e), 1);
        assert_eq!(exit_code_of(&ClientError::Stopped.into()), EXIT_NO_DAEMON);
        let e = anyhow::Error::from(ClientError::NotRunning("no daemon".into()));
        assert_eq!(exit_code_of(&e.context("cannot list")), EXIT_NO_DAEMON);
        assert_eq!(exit_code_of(&ClientError::Refused("bad".into()).into()), 2);
        assert!(found(&[1], "ones").is_ok());
        assert_eq!(
            exit_code_of(&found::<u8>(&[], "ones").expect_err("empty")),
            1
        );
    }
}
