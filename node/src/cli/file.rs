//! `fogmesh file ...`: share files, fetch them from every peer that has
//! them, and follow shares and downloads.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use serde::{Deserialize, Serialize};

use super::NothingFound;
use super::output::{self, Human, Output, plural};
use crate::client::Client;
use crate::files::{FileState, FileStatus};
use crate::types::{GetFile, ShareFile};

/// How often `file get` asks the daemon how the download is going.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Subcommand)]
pub(super) enum FileCommand {
    /// Share a file: hash it, serve it, announce it in the DHT.
    Share {
        /// The file.
        path: PathBuf,
        /// Share it with this group only: it is encrypted under a new key
        /// that only the group's members receive (in a group message with
        /// the file's link).
        #[arg(long, value_name = "GROUP_ID")]
        group: Option<String>,
    },
    /// Download a file, from every peer that has it; blocks until it is
    /// complete and verified. Run it again to continue after any
    /// interruption.
    Get {
        /// The file id, or a file's link as posted in a group
        /// (`fogmesh-file:<id>#<key>`: decrypted with that link's key).
        file_id: String,
        /// Where to write it. Default: its name (or id) in the current
        /// directory.
        #[arg(short, long, value_name = "PATH")]
        output: Option<PathBuf>,
        /// Give up (exit 1) when no peer with the file is found for this
        /// many seconds. The daemon keeps looking.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// A share's or download's progress.
    Status {
        /// The file id.
        file_id: String,
    },
    /// Every share and download (exit 1 when none).
    List,
    /// Cancel a download (its partial data and record are removed) or stop
    /// sharing a file (the file itself stays).
    Cancel {
        /// The file id.
        file_id: String,
    },
}

/// The answer to `POST /v1/files`: the share's status and, for a share with
/// a group, the id of the message that carried its link.
#[derive(Debug, Serialize, Deserialize)]
struct Shared {
    #[serde(flatten)]
    status: FileStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message_id: Option<String>,
}

/// Runs a file command against the daemon.
pub(super) async fn run(client: Client, cmd: FileCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        FileCommand::Share { path, group } => share(&client, &path, group, out).await,
        FileCommand::Get {
            file_id,
            output,
            timeout,
        } => {
            let (file_id, link) = id_and_link(&file_id);
            let output = output.unwrap_or_else(|| PathBuf::from(&file_id));
            let st = get(
                &client,
                &file_id,
                link,
                &output,
                Duration::from_secs(timeout),
            )
            .await?;
            out.show(&st, |w, st| {
                writeln!(w, "{}", st.path.as_deref().unwrap_or(""))
            })
        }
        FileCommand::Status { file_id } => {
            let st: FileStatus = client.get(&format!("files/{file_id}")).await?;
            out.show(&st, write_status)
        }
        FileCommand::List => {
            let list: Vec<FileStatus> = client.get("files").await?;
            out.list(&list, write_line, "shares or downloads")
        }
        FileCommand::Cancel { file_id } => {
            let st: FileStatus = client.delete(&format!("files/{file_id}")).await?;
            out.show(&st, |w, st| writeln!(w, "cancelled {}", st.file_id))
        }
    }
}

async fn share(
    client: &Client,
    path: &Path,
    group: Option<String>,
    out: Output,
) -> anyhow::Result<()> {
    // The daemon may run elsewhere in the file system: it wants an
    // absolute path.
    let abs = std::path::absolute(path).with_context(|| format!("bad path {}", path.display()))?;
    let request = ShareFile {
        path: abs.display().to_string(),
        group,
    };
    let shared: Shared = client
        .post("files", &request)
        .await
        .with_context(|| format!("cannot share {}", path.display()))?;
    out.show(&shared, |w, s| writeln!(w, "{}", s.status.file_id))
}

/// Starts (or continues) a download to `output` and waits until it is
/// complete, showing progress on stderr; its final status.
/// A `file get` argument: a file id, or a link (its id, and the link).
fn id_and_link(arg: &str) -> (String, Option<String>) {
    match arg.strip_prefix(fogmesh_protocols::files::crypt::LINK_PREFIX) {
        Some(rest) => {
            let id = rest.split('#').next().unwrap_or_default().to_owned();
            (id, Some(arg.to_owned()))
        }
        None => (arg.to_owned(), None),
    }
}

async fn get(
    client: &Client,
    file_id: &str,
    link: Option<String>,
    output: &Path,
    timeout: Duration,
) -> anyhow::Result<FileStatus> {
    let output =
        std::path::absolute(output).with_context(|| format!("bad path {}", output.display()))?;
    let start = Instant::now();
    let request = GetFile {
        output: output.display().to_string(),
        link,
    };
    let mut st: FileStatus = client
        .post(&format!("files/{file_id}/get"), &request)
        .await?;
    let mut progress = Progress::new(file_id);
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        match st.state.as_str() {
            "complete" => break,
            "failed" => {
                progress.abandon();
                let why = st.error.unwrap_or_default();
                anyhow::bail!("download of {file_id} failed: {why}");
            }
            "searching" if start.elapsed() > timeout => {
                progress.abandon();
                let secs = timeout.as_secs();
                return Err(NothingFound(format!(
                    "no peer with file {file_id} found in {secs} s (the node keeps looking: run this again to wait, or `fogmesh file cancel {file_id}` to stop)"
                ))
                .into());
            }
            _ => {}
        }
        progress.show(&st);
        tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = &mut interrupted => return interrupt(client, file_id, &mut progress).await,
        }
        st = client.get(&format!("files/{file_id}")).await?;
    }
    progress.finish();
    Ok(st)
}

/// Ctrl-C under `file get`: a search that found nothing yet is cancelled
/// (nothing of it is worth keeping); a download under way goes on in the
/// daemon and `file get` continues it later.
async fn interrupt(
    client: &Client,
    file_id: &str,
    progress: &mut Progress,
) -> anyhow::Result<FileStatus> {
    progress.abandon();
    let st: FileStatus = client.get(&format!("files/{file_id}")).await?;
    if st.state == FileState::Searching {
        let _: FileStatus = client.delete(&format!("files/{file_id}")).await?;
        eprintln!("interrupted: the search for {file_id} is cancelled");
    } else {
        eprintln!(
            "interrupted: the download of {file_id} goes on in the daemon (`fogmesh file cancel {file_id}` stops it)"
        );
    }
    Err(Interrupted.into())
}

/// `file get` was interrupted (Ctrl-C); the message is already printed.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub(super) struct Interrupted;

/// What `file get` shows on stderr: "searching for providers" until a
/// manifest arrives, then a progress bar (bytes, rate, ETA, sources).
/// indicatif draws only when stderr is a terminal; elsewhere (a log file)
/// the search and the start of the transfer are one line each.
struct Progress {
    bar: indicatif::ProgressBar,
    file_id: String,
    /// What was last shown: nothing yet, the search, or the transfer.
    phase: Phase,
    terminal: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Nothing,
    Searching,
    Transfer,
}

impl Progress {
    fn new(file_id: &str) -> Self {
        let bar =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        Progress {
            bar,
            file_id: file_id.to_owned(),
            phase: Phase::Nothing,
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }

    fn show(&mut self, st: &FileStatus) {
        // Searching: no manifest, so no size to draw a bar against.
        let phase = if st.state == FileState::Searching {
            Phase::Searching
        } else {
            Phase::Transfer
        };
        if phase != self.phase {
            self.phase = phase;
            match phase {
                Phase::Searching => {
                    self.bar.set_style(style("{spinner} {msg} ({elapsed})"));
                    self.bar.set_message("searching for providers");
                    self.bar.enable_steady_tick(Duration::from_millis(120));
                    if !self.terminal {
                        eprintln!("searching for providers of {}", self.file_id);
                    }
                }
                Phase::Transfer => {
                    self.bar.disable_steady_tick();
                    self.bar.set_style(style(
                        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                    ));
                    self.bar.reset_elapsed();
                    if !self.terminal {
                        eprintln!(
                            "fetching {} ({}) from {}",
                            self.file_id,
                            indicatif::HumanBytes(st.bytes_total),
                            plural(st.sources, "source", "sources")
                        );
                    }
                }
                Phase::Nothing => {}
            }
        }
        if phase == Phase::Transfer {
            self.bar.set_length(st.bytes_total);
            self.bar.set_position(st.bytes_have);
            self.bar
                .set_message(plural(st.sources, "source", "sources"));
        }
    }

    fn abandon(&mut self) {
        self.bar.abandon();
    }

    fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}

fn style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
}

fn write_status(w: Human<'_>, st: &FileStatus) -> io::Result<()> {
    writeln!(w, "file_id: {}", st.file_id)?;
    writeln!(w, "state:   {}", st.state)?;
    if let Some(p) = &st.path {
        writeln!(w, "path:    {p}")?;
    }
    writeln!(
        w,
        "have:    {} of {} bytes ({} of {} chunks)",
        st.bytes_have, st.bytes_total, st.chunks_have, st.chunks_total
    )?;
    writeln!(w, "sources: {}", st.sources)
}

fn write_line(w: Human<'_>, st: &FileStatus) -> io::Result<()> {
    writeln!(
        w,
        "{}  {:<11} {:>12} B  {}",
        st.file_id,
        st.state,
        st.bytes_total,
        output::one_line(st.name.as_deref().unwrap_or(""))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_takes_an_id_or_a_link() {
        let id = "ab".repeat(32);
        assert_eq!(id_and_link(&id), (id.clone(), None));
        let link = format!("fogmesh-file:{id}#v2:{}", "cd".repeat(32));
        assert_eq!(id_and_link(&link), (id, Some(link.clone())));
    }

    #[test]
    fn a_share_prints_the_apis_answer() {
        let answer = serde_json::json!({
            "file_id": "ab", "name": "x.bin", "state": "sharing", "path": "/tmp/x.bin",
            "bytes_total": 10, "bytes_have": 10, "chunks_total": 1, "chunks_have": 1,
            "sources": 0, "source_stats": [], "rate_bps": 0, "error": null,
            "link": "fogmesh-file:ab#k", "message_id": "cd",
        });
        let shared: Shared = serde_json::from_value(answer.clone()).expect("decode");
        assert_eq!(serde_json::to_value(&shared).expect("encode"), answer);
        let mut plain = answer;
        if let Some(o) = plain.as_object_mut() {
            o.remove("message_id");
        }
        let shared: Shared = serde_json::from_value(plain.clone()).expect("decode");
        assert_eq!(serde_json::to_value(&shared).expect("encode"), plain);
    }
}
