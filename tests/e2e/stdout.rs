//! Stdout whose reader went away (`fogmesh events | head -3`): the command
//! stops with exit 0, not a panic, and commands that wait for events notice
//! the reader leaving even when nothing more is printed.

use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::util::{Daemon, fogmesh};

/// A pipe whose read end is already closed, for a command's stdout.
fn closed_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Stdio::from(writer)
}

/// Waits for `child` to exit, killing it (and failing) after `timeout`.
fn exit_within(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still runs {timeout:?} after its reader left");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn commands_printing_into_a_closed_pipe_exit_0() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = fogmesh()
        .args(["id", "--data-dir"])
        .arg(tmp.path().join("id"))
        .stdout(closed_pipe())
        .output()
        .expect("run fogmesh id");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("error"), "{err}");

    let a = Daemon::start(&tmp.path().join("a"), &[]);
    // `peers | head -1` needs a peer to print.
    let b = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &a.tcp_addr()]);
    a.wait_connected(&b.peer_id, Duration::from_secs(60));
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["group", "list", "--json"],
        &["peers"],
        &["peers", "--json"],
    ] {
        let out = fogmesh()
            .args(args)
            .arg("--data-dir")
            .arg(&a.data_dir)
            .stdout(closed_pipe())
            .output()
            .expect("run fogmesh");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn followers_stop_when_their_reader_leaves() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let gid = a.json(&["group", "create", "quiet"])["group_id"]
        .as_str()
        .expect("group_id")
        .to_owned();
    // Nothing happens on the node: only watching stdout tells them.
    for args in [
        &["events"][..],
        &["events", "--json"],
        &["group", "messages", &gid, "--follow"],
        &["messages", "--follow"],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        let mut child = fogmesh()
            .args(args)
            .arg("--data-dir")
            .arg(&a.data_dir)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fogmesh");
        // Let it subscribe and wait, then go away.
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "{args:?} ended early"
        );
        drop(reader);
        let status = exit_within(&mut child, Duration::from_secs(10), &format!("{args:?}"));
        assert_eq!(status.code(), Some(0), "{args:?}");
    }
}
