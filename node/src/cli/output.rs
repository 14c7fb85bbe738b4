//! Everything the CLI writes on stdout goes through here: the API's answers
//! as JSON (`--json`) or as lines for a human, and the lines of streams.
//!
//! A reader that goes away (`fogmesh events | head -3`) is not a failure:
//! a write that meets a closed pipe (EPIPE; Rust ignores SIGPIPE) returns
//! [`StdoutClosed`], which the top level turns into exit 0. Commands that
//! wait for events also watch stdout with [`closed`], so they notice the
//! reader leaving even when nothing more is printed.

use std::io::{self, Write};
use std::os::fd::{AsFd as _, BorrowedFd};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use serde::Serialize;

/// Stdout's reader went away: the command stops, with exit code 0.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub(crate) struct StdoutClosed;

/// A writer for a human's lines, handed to the functions that format them.
pub(super) type Human<'a> = &'a mut dyn Write;

/// How results are printed: JSON for scripts (`--json`) or lines for a
/// human.
#[derive(Debug, Clone, Copy)]
pub(super) struct Output {
    json: bool,
}

impl Output {
    pub(super) fn new(json: bool) -> Self {
        Output { json }
    }

    /// Prints a whole answer: as pretty JSON with `--json`, else as `human`
    /// writes it.
    pub(super) fn show<T: Serialize + ?Sized>(
        &self,
        value: &T,
        human: impl FnOnce(Human<'_>, &T) -> io::Result<()>,
    ) -> anyhow::Result<()> {
        self.print(value, human, serde_json::to_string_pretty)
    }

    /// Prints a list the API returned, one `human` line per item without
    /// `--json`; an empty list is "nothing found" (exit 1), named `what`.
    pub(super) fn list<T: Serialize>(
        &self,
        items: &[T],
        human: impl Fn(Human<'_>, &T) -> io::Result<()>,
        what: &str,
    ) -> anyhow::Result<()> {
        self.show(items, |w, items| {
            items.iter().try_for_each(|item| human(&mut *w, item))
        })?;
        super::found(items, what)
    }

    /// Prints one item of a stream (an event, a followed message): as one
    /// line of JSON with `--json`, else as `human` writes it.
    pub(super) fn item<T: Serialize + ?Sized>(
        &self,
        value: &T,
        human: impl FnOnce(Human<'_>, &T) -> io::Result<()>,
    ) -> anyhow::Result<()> {
        self.print(value, human, serde_json::to_string)
    }

    fn print<T: Serialize + ?Sized>(
        &self,
        value: &T,
        human: impl FnOnce(Human<'_>, &T) -> io::Result<()>,
        to_json: fn(&T) -> serde_json::Result<String>,
    ) -> anyhow::Result<()> {
        if self.json {
            let text = to_json(value)?;
            write(|w| writeln!(w, "{text}"))
        } else {
            write(|w| human(w, value))
        }
    }
}

/// Writes on stdout through `f`, then flushes (so that a closed pipe is
/// noticed now, not at exit).
pub(super) fn write(f: impl FnOnce(Human<'_>) -> io::Result<()>) -> anyhow::Result<()> {
    write_to(&mut io::stdout().lock(), f)
}

fn write_to(
    out: &mut dyn Write,
    f: impl FnOnce(Human<'_>) -> io::Result<()>,
) -> anyhow::Result<()> {
    f(&mut *out)
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}

fn stdout_error(e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("cannot write to stdout")
    }
}

/// The first characters of a long id, enough to tell groups apart in a
/// line for a human.
pub(super) fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Whether `e` (or anything in its chain) is [`StdoutClosed`].
pub(super) fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}

/// Resolves when stdout's reader has gone away (the pipe's read end is
/// closed); never, when stdout is something that cannot tell (a regular
/// file). Cancel-safe.
pub(super) async fn closed() {
    // A duplicate of the descriptor shares the pipe's state; polling it
    // leaves stdout itself alone.
    if let Ok(fd) = io::stdout().as_fd().try_clone_to_owned() {
        let (gone, told) = tokio::sync::oneshot::channel();
        // poll(2) blocks, so it runs on a thread of its own (not on the
        // runtime's blocking pool, whose shutdown would wait for it); the
        // thread ends within a second once nobody awaits the answer.
        let watcher = std::thread::Builder::new()
            .name("stdout-watch".into())
            .spawn(move || {
                if readers_gone(fd.as_fd(), || gone.is_closed()) {
                    let _ = gone.send(());
                }
            });
        if watcher.is_ok() && told.await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// Waits until `fd`, the write end of a pipe, has no reader left (the
/// kernel then reports an error condition on it, or a hang-up for a
/// terminal); `false` if it cannot tell or `abandoned` says to stop.
fn readers_gone(fd: BorrowedFd<'_>, abandoned: impl Fn() -> bool) -> bool {
    let tick = Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    while !abandoned() {
        // No events asked for: POLLERR and POLLHUP are always reported.
        let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::empty())];
        match poll(&mut fds, Some(&tick)) {
            Ok(0) | Err(Errno::INTR) => {}
            Ok(_) => return fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP),
            Err(_) => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_pipe_is_stdout_closed() {
        let (reader, mut writer) = io::pipe().expect("pipe");
        drop(reader);
        let e = write_to(&mut writer, |w| writeln!(w, "hello")).expect_err("EPIPE");
        assert!(is_stdout_closed(&e), "{e:#}");
        assert_eq!(super::super::exit_code_of(&e), 0);
    }

    #[test]
    fn other_write_errors_are_errors() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::StorageFull))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let e = write_to(&mut Full, |w| writeln!(w, "hello")).expect_err("full");
        assert!(!is_stdout_closed(&e));
        assert_eq!(super::super::exit_code_of(&e), 2);
    }

    #[test]
    fn stdout_closed_survives_context() {
        use anyhow::Context as _;
        let e: anyhow::Result<()> = Err(StdoutClosed.into());
        let e = e.context("printing the events").expect_err("err");
        assert!(is_stdout_closed(&e));
    }

    #[test]
    fn a_pipe_without_reader_is_noticed() {
        let (reader, writer) = io::pipe().expect("pipe");
        // With the reader there, the watch goes on until abandoned.
        let checks = std::cell::Cell::new(0);
        let abandoned = || {
            checks.set(checks.get() + 1);
            checks.get() > 1
        };
        assert!(!readers_gone(writer.as_fd(), abandoned));
        drop(reader);
        assert!(readers_gone(writer.as_fd(), || false));
    }
}
