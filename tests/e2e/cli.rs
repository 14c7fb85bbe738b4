//! The command line as a new user meets it: what it prints for a human
//! (local times, short peer ids, agreement), its errors and exit codes,
//! streams when the daemon stops, `file get` of a file nobody has, and what
//! operators install around the binary (completions, the man page).

use std::io::Read as _;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{Daemon, eventually, fogmesh};

const T: Duration = Duration::from_secs(60);

/// A long-running client command (`events`, `--follow`, `file get`) with
/// its stdout and stderr in files, so that both can be read when it ends.
struct Running {
    child: Child,
    stdout: std::path::PathBuf,
    stderr: std::path::PathBuf,
}

impl Running {
    fn start(d: &Daemon, args: &[&str], dir: &Path, name: &str) -> Running {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let child = fogmesh()
            .args(args)
            .arg("--data-dir")
            .arg(&d.data_dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn fogmesh");
        Running {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until its stdout has a line containing `needle`.
    fn wait_for(&self, needle: &str) {
        eventually(T, &format!("a line with {needle:?}"), || {
            self.stdout().contains(needle).then_some(())
        });
    }

    /// Its exit status within `timeout` (killed and failed otherwise).
    fn exit_within(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{what} still runs after {timeout:?}: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Exit code and stderr of a client command.
fn code_and_err(d: &Daemon, args: &[&str]) -> (Option<i32>, String) {
    let out = d.cli(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn group_id(d: &Daemon, name: &str) -> String {
    d.json(&["group", "create", name])["group_id"]
        .as_str()
        .expect("group_id")
        .to_owned()
}

#[test]
fn streams_say_so_and_exit_3_when_the_daemon_stops() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, kill9) in [("term", false), ("kill9", true)] {
        let mut a = Daemon::start(&tmp.path().join(name), &[]);
        let other = fogmesh()
            .args(["id", "--data-dir"])
            .arg(tmp.path().join(format!("{name}-other")))
            .output()
            .expect("fogmesh id");
        let other = String::from_utf8(other.stdout).expect("utf-8");
        let gid = group_id(&a, "followed");
        a.json(&["group", "send", &gid, "before"]);
        a.json(&["send", other.trim(), "queued for a peer away"]);

        // Each prints its history first, once subscribed.
        let group = Running::start(
            &a,
            &["group", "messages", &gid, "--follow"],
            tmp.path(),
            &format!("{name}-group"),
        );
        let direct = Running::start(
            &a,
            &["messages", "--follow"],
            tmp.path(),
            &format!("{name}-direct"),
        );
        let events = Running::start(&a, &["events"], tmp.path(), &format!("{name}-events"));
        group.wait_for("before");
        direct.wait_for("queued for a peer away");
        eventually(T, "events to print a group creation", || {
            group_id(&a, "seen by events");
            events.stdout().contains("updated").then_some(())
        });

        if kill9 {
            a.kill9();
        } else {
            a.terminate();
        }
        for (mut r, what) in [
            (group, "group follow"),
            (direct, "dm follow"),
            (events, "events"),
        ] {
            let status = r.exit_within(Duration::from_secs(20), what);
            let err = r.stderr();
            assert_eq!(status.code(), Some(3), "{what} ({name}): {err}");
            assert!(
                err.contains("error: the fogmesh daemon stopped"),
                "{what} ({name}): {err:?}"
            );
        }
    }
}

#[test]
fn file_get_of_a_file_nobody_has_searches_and_can_be_cancelled() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let out = tmp.path().join("out.bin");
    let out = out.to_str().expect("utf-8");

    let unknown = "ab".repeat(32);
    let (code, err) = code_and_err(&a, &["file", "get", &unknown, "-o", out, "--timeout", "2"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("searching for providers"), "{err}");
    assert!(
        !err.contains("0 B/0 B") && !err.contains("sources"),
        "{err}"
    );
    assert!(err.contains("fogmesh file cancel"), "{err}");
    // The search goes on, as said, until cancelled.
    let list = a.json(&["file", "list"]);
    assert_eq!(list[0]["state"], "searching", "{list}");
    let cancelled = a.json(&["file", "cancel", &unknown]);
    assert_eq!(cancelled["state"], "searching", "{cancelled}");
    let (code, _) = code_and_err(&a, &["file", "list"]);
    assert_eq!(code, Some(1), "nothing left after the cancel");

    // Ctrl-C while it searches: the search is cancelled with it.
    let other = "cd".repeat(32);
    let mut get = Running::start(&a, &["file", "get", &other, "-o", out], tmp.path(), "get");
    eventually(T, "the search to start", || {
        get.stderr()
            .contains("searching for providers")
            .then_some(())
    });
    let killed = std::process::Command::new("kill")
        .args(["-INT", &get.child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(killed.success());
    let status = get.exit_within(Duration::from_secs(20), "file get under Ctrl-C");
    let err = get.stderr();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("cancelled"), "{err}");
    let (code, err) = code_and_err(&a, &["file", "status", &other]);
    assert_eq!(code, Some(1), "the search is gone: {err}");
}

/// `time` (ms since the epoch) as the CLI prints it with `TZ=UTC`.
fn utc(ms: &Value) -> String {
    let ms = ms.as_i64().expect("ms");
    jiff::Timestamp::from_millisecond(ms)
        .expect("timestamp")
        .to_zoned(jiff::tz::TimeZone::UTC)
        .strftime("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// A client command for a human, in the time zone `tz`: its stdout.
fn human(d: &Daemon, tz: &str, args: &[&str]) -> String {
    let out = fogmesh()
        .args(args)
        .arg("--data-dir")
        .arg(&d.data_dir)
        .env("TZ", tz)
        .output()
        .expect("run fogmesh");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn human_output_reads_well() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let b = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &a.tcp_addr()]);
    a.wait_connected(&b.peer_id, T);
    let gid = group_id(&a, "plain");
    a.json(&["group", "send", &gid, "hello"]);
    let msg = a.json(&["group", "messages", &gid]);

    // Local time and "me" for this node's own messages.
    let shown = human(&a, "UTC", &["group", "messages", &gid]);
    assert_eq!(shown, format!("{}  me: hello\n", utc(&msg[0]["timestamp"])));
    // Another zone shows another wall-clock time for the same message.
    let shifted = human(&a, "Etc/GMT-3", &["group", "messages", &gid]);
    if Path::new("/usr/share/zoneinfo/Etc/GMT-3").exists() {
        assert_ne!(shifted, shown, "TZ is not followed");
    }

    // `group show`: whether this node is a member, then the member list.
    let shown = human(&a, "UTC", &["group", "show", &gid]);
    assert!(!shown.contains("member:      true"), "{shown}");
    assert!(shown.contains("this node:   a member"), "{shown}");
    assert!(
        shown.contains(&format!("members:     {}", a.peer_id)),
        "{shown}"
    );
    let line = human(&a, "UTC", &["group", "list"]);
    assert!(line.contains(" 1 member, "), "{line}");

    // A direct message: a short id for the peer, a local time.
    a.json(&["send", &b.peer_id, "hi b"]);
    let shown = human(&a, "UTC", &["messages", &b.peer_id]);
    let tail = &b.peer_id[b.peer_id.len() - 8..];
    assert!(shown.contains(&format!("-> …{tail}: hi b")), "{shown}");
    assert!(!shown.contains(&b.peer_id), "the full id: {shown}");
}

#[test]
fn errors_are_prefixed_clear_and_coded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);

    let unknown = "ef".repeat(32);
    let (code, err) = code_and_err(&a, &["group", "show", &unknown]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.starts_with("error: no group"), "{err:?}");

    for (args, what) in [
        (&["group", "show", "zzz"][..], "is not a group id"),
        (&["file", "status", "zzz"], "is not a file id"),
        (&["send", "not-a-peer", "x"], "is not a peer id"),
    ] {
        let (code, err) = code_and_err(&a, args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(what), "{err:?}");
        assert!(!err.contains("HTTP"), "{args:?}: {err:?}");
    }

    // "Nothing found" is no error: no prefix.
    let (code, err) = code_and_err(&a, &["peers"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(!err.contains("error"), "{err:?}");

    // Logs in a file have no colour escape codes.
    assert!(a.stderr().contains("INFO"), "{}", a.stderr());
    assert!(!a.stderr().contains('\u{1b}'), "{:?}", a.stderr());
}

#[test]
fn completions_and_the_man_page_cover_every_command() {
    let commands = [
        "run",
        "status",
        "group",
        "file",
        "radio",
        "send",
        "completions",
        "man",
    ];
    for shell in ["bash", "zsh", "fish"] {
        let out = fogmesh()
            .args(["completions", shell])
            .env_remove("HOME")
            .output()
            .expect("fogmesh completions");
        assert!(out.status.success(), "{shell}: {:?}", out.status);
        let script = String::from_utf8(out.stdout).expect("utf-8");
        for c in commands {
            assert!(script.contains(c), "{shell} completion lacks {c}");
        }
        // The shell itself reads it, where it is installed.
        let path =
            std::env::temp_dir().join(format!("fogmesh-completion-{}.{shell}", std::process::id()));
        std::fs::write(&path, &script).expect("write");
        if let Ok(check) = std::process::Command::new(shell)
            .arg("-n")
            .arg(&path)
            .output()
        {
            assert!(
                check.status.success(),
                "{shell} -n: {}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let _ = std::fs::remove_file(&path);
    }
    let (code, _) = {
        let out = fogmesh()
            .args(["completions", "powershell"])
            .output()
            .expect("run");
        (out.status.code(), ())
    };
    assert_eq!(code, Some(2), "an unknown shell is a usage error");

    let out = fogmesh().arg("man").output().expect("fogmesh man");
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).expect("utf-8");
    assert!(page.contains(".TH fogmesh 1"), "{page:.300}");
    for c in commands {
        assert!(
            page.contains(&format!(".SH \"FOGMESH {}", c.to_uppercase())),
            "the man page lacks {c}"
        );
    }
    // groff reads it without warnings, where it is installed.
    if let Ok(mut groff) = std::process::Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        use std::io::Write as _;
        groff
            .stdin
            .take()
            .expect("stdin")
            .write_all(page.as_bytes())
            .expect("write");
        let mut warnings = String::new();
        groff
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut warnings)
            .expect("read");
        assert!(groff.wait().expect("groff").success());
        assert!(warnings.trim().is_empty(), "groff: {warnings}");
    }
}

/// dist/systemd/fogmesh.service: sandboxed as the operator guide says, and
/// `systemd-analyze verify` accepts it (where systemd is installed) with
/// this binary and its man page in place.
#[test]
fn the_systemd_unit_is_sandboxed_and_verifies() {
    let unit_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd/fogmesh.service");
    let unit = std::fs::read_to_string(&unit_path).expect("the unit");
    for line in [
        "ExecStart=/usr/local/bin/fogmesh run",
        "DynamicUser=yes",
        "StateDirectory=fogmesh",
        "Environment=FOGMESH_DATA_DIR=%S/fogmesh",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    let Ok(probe) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("systemd-analyze is not installed: the unit is not verified");
        return;
    };
    assert!(probe.status.success());
    let tmp = tempfile::tempdir().expect("tempdir");
    let man1 = tmp.path().join("man/man1");
    std::fs::create_dir_all(&man1).expect("mkdir");
    let page = fogmesh().arg("man").output().expect("fogmesh man");
    std::fs::write(man1.join("fogmesh.1"), page.stdout).expect("write");
    let local = tmp.path().join("fogmesh.service");
    std::fs::write(
        &local,
        unit.replace("/usr/local/bin/fogmesh", crate::util::bin()),
    )
    .expect("write");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&local)
        .env("MANPATH", tmp.path().join("man"))
        .output()
        .expect("systemd-analyze verify");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}
