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

    /// Whether output is JSON (`--json`): lines for a human need no names.
    pub(super) fn is_json(&self) -> bool {
        self.json
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
            // JSON escapes control characters itself; it is printed as is.
            let text = to_json(value)?;
            write_to(&mut io::stdout().lock(), |w| writeln!(w, "{text}"))
        } else {
            write(|w| human(w, value))
        }
    }
}

/// Writes `bytes` on stdout as they are (a generated script or page).
pub(super) fn raw(bytes: &[u8]) -> anyhow::Result<()> {
    write_to(&mut io::stdout().lock(), |w| w.write_all(bytes))
}

/// Writes lines for a human on stdout through `f`, with control
/// characters escaped (see [`Escaped`]), then flushes (so that a closed
/// pipe is noticed now, not at exit).
pub(super) fn write(f: impl FnOnce(Human<'_>) -> io::Result<()>) -> anyhow::Result<()> {
    write_to(&mut Escaped(io::stdout().lock()), f)
}

/// A writer for a terminal: every control character but the line feed is
/// written escaped, so that a string a peer chose (a message, a group or
/// file name, an address, an agent version) cannot move the cursor, change
/// colours, set the window title or rewrite earlier lines. Escaped are the
/// C0 controls (tab included) and DEL as `\xNN`, the C1 controls and the
/// bidirectional overrides and isolates (which reorder what a line shows)
/// as `\u{NNNN}`.
///
/// Every line printed for a human goes through it (`--json` output does
/// not: JSON escapes what it must itself). A peer's string that may hold
/// a line feed is printed through [`one_line`] as well.
pub(super) struct Escaped<W: Write>(pub(super) W);

impl<W: Write> Write for Escaped<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(s) => self.0.write_all(escape(s, false).as_bytes())?,
            // Not UTF-8 (a piece of a character): the ASCII controls are
            // still single bytes, the rest passes.
            Err(_) => {
                for &b in buf {
                    if b != b'\n' && (b < 0x20 || b == 0x7f) {
                        write!(self.0, "\\x{b:02x}")?;
                    } else {
                        self.0.write_all(&[b])?;
                    }
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// A peer's string for one line: like [`Escaped`], and the line feed
/// escaped too (a message cannot forge the next line of the listing).
pub(super) fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    escape(s, true)
}

/// `s` with its control characters escaped; the line feed only with
/// `newline`.
fn escape(s: &str, newline: bool) -> std::borrow::Cow<'_, str> {
    let needs = |c: char| (c != '\n' || newline) && is_terminal_control(c);
    if !s.chars().any(needs) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !needs(c) {
            out.push(c);
        } else if (c as u32) < 0x80 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:04x}}}", c as u32));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// C0, DEL, C1, and the bidirectional formatting characters.
fn is_terminal_control(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
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

/// `n` and the noun that agrees with it: "1 source", "2 sources".
pub(super) fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A time in milliseconds since the Unix epoch (as the API gives them), as
/// a human reads it: the date and time in the system's time zone (`TZ`,
/// else /etc/localtime, else UTC).
pub(super) fn local_time(ms: u64) -> String {
    time_in(ms, &jiff::tz::TimeZone::system())
}

fn time_in(ms: u64, tz: &jiff::tz::TimeZone) -> String {
    match i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
    {
        Some(t) => t
            .to_zoned(tz.clone())
            .strftime("%Y-%m-%d %H:%M:%S")
            .to_string(),
        // Out of jiff's range (a peer's clock can say anything): as given.
        None => format!("@{ms}ms"),
    }
}

/// How peers are named in lines for a human: this node is "me", the
/// others a short id (see [`short_peer`]). `--json` keeps full ids.
#[derive(Debug, Clone, Default)]
pub(super) struct Names {
    me: Option<String>,
}

impl Names {
    /// Names as seen from the node whose peer id is `me`.
    pub(super) fn new(me: Option<String>) -> Self {
        Names { me }
    }

    /// The name of `peer` for a line.
    pub(super) fn peer<'a>(&self, peer: &'a str) -> std::borrow::Cow<'a, str> {
        if self.me.as_deref() == Some(peer) {
            return std::borrow::Cow::Borrowed("me");
        }
        short_peer(peer)
    }
}

/// A peer id short enough for a line: libp2p's Ed25519 ids all begin with
/// the same `12D3KooW`, so they are shown as `…` and their last 8
/// characters (what tells peers apart; `grep` finds the full id by them).
/// Anything else that is not a plain short token is shown escaped.
pub(super) fn short_peer(peer: &str) -> std::borrow::Cow<'_, str> {
    let tail = peer.char_indices().rev().nth(7).map(|(i, _)| &peer[i..]);
    match tail {
        Some(t) if peer.len() > 16 && peer.is_ascii() => std::borrow::Cow::Owned(format!("…{t}")),
        _ => one_line(peer),
    }
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
    fn control_characters_are_escaped_for_a_human() {
        let mut out = Vec::new();
        write_to(&mut Escaped(&mut out), |w| {
            let text = "x\u{1b}[2J\ry\u{7}\u{9b}1m\u{202e}z\tq";
            writeln!(w, "a: {text}")
        })
        .expect("write");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "a: x\\x1b[2J\\x0dy\\x07\\u{009b}1m\\u{202e}z\\x09q\n"
        );
        assert_eq!(one_line("l1\nl2"), "l1\\x0al2");
        assert_eq!(one_line("plain ünïcode"), "plain ünïcode");
        let mut out = Vec::new();
        Escaped(&mut out)
            .write_all(&[b'a', 0x1b, 0xff])
            .expect("write");
        assert_eq!(out, b"a\\x1b\xff");
    }

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
    fn human_forms() {
        assert_eq!(plural(1, "source", "sources"), "1 source");
        assert_eq!(plural(0, "source", "sources"), "0 sources");
        assert_eq!(plural(2, "neighbour", "neighbours"), "2 neighbours");
        let utc = jiff::tz::TimeZone::UTC;
        assert_eq!(time_in(0, &utc), "1970-01-01 00:00:00");
        assert_eq!(time_in(1_767_225_599_999, &utc), "2025-12-31 23:59:59");
        let plus2 = jiff::tz::TimeZone::fixed(jiff::tz::offset(2));
        assert_eq!(time_in(0, &plus2), "1970-01-01 02:00:00");
        assert_eq!(time_in(u64::MAX, &utc), format!("@{}ms", u64::MAX));
        let id = "12D3KooWGzh5ZdPT6WbkCkx2fC7Hm4rRDx7N1Tq8KJ1aHHE3Rk2w";
        assert_eq!(short_peer(id), "…HHE3Rk2w");
        assert_eq!(short_peer("abc"), "abc");
        assert_eq!(short_peer("a\u{1b}b"), "a\\x1bb");
        let names = Names::new(Some(id.to_owned()));
        assert_eq!(names.peer(id), "me");
        assert_eq!(
            names.peer("12D3KooWother000000000000000000012345678"),
            "…12345678"
        );
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
