//! Helpers to run real `fogmesh` processes on loopback, each with its own
//! temporary data directory and random ports, and to drive them through the
//! CLI.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fogmesh")
}

/// A `fogmesh` command with a clean environment for the variables the node
/// reads, so the developer's shell cannot change a test.
pub fn fogmesh() -> Command {
    fogmesh_in(None)
}

/// Like [`fogmesh`], run inside the network namespace `netns` (through
/// `ip netns exec`, which execs the binary: the child is fogmesh itself).
pub fn fogmesh_in(netns: Option<&str>) -> Command {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin()]);
            c
        }
        None => Command::new(bin()),
    };
    for (k, _) in std::env::vars() {
        if k.starts_with("FOGMESH_") {
            c.env_remove(k);
        }
    }
    // FOGMESH_TEST_LOG overrides the daemons' log filter when debugging.
    let filter =
        std::env::var("FOGMESH_TEST_LOG").unwrap_or_else(|_| "info,libp2p_mdns=off".into());
    c.env("RUST_LOG", filter);
    c
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A running daemon. Killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    /// Its data directory.
    pub data_dir: PathBuf,
    stderr_log: PathBuf,
    /// Its peer id, from the ready lines.
    pub peer_id: String,
    /// Its listen addresses, from the ready lines.
    pub listen: Vec<String>,
    /// Its API address, from the ready lines.
    pub api: String,
    /// Other `key: value` lines printed before `ready`.
    pub ready_lines: Vec<String>,
    /// The network namespace it runs in (and its clients with it).
    netns: Option<String>,
}

/// A TCP port free on loopback a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The arguments every test daemon gets: loopback, random ports, no mDNS
/// (multicast would leave loopback and find other tests' nodes).
pub fn loopback_args() -> Vec<String> {
    [
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
        "--api",
        "127.0.0.1:0",
        "--no-mdns",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Daemon {
    /// Starts `fogmesh run` on `data_dir` with the loopback arguments plus
    /// `extra`, and waits for its `ready` line.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Daemon {
        match Self::try_start(data_dir, extra) {
            Ok(d) => d,
            Err(msg) => panic!("daemon did not start: {msg}"),
        }
    }

    /// Like `start`, but returns the daemon's exit status and stderr if it
    /// exits before `ready`.
    pub fn try_start(data_dir: &Path, extra: &[&str]) -> Result<Daemon, String> {
        let mut args = loopback_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::try_start_with(data_dir, &args)
    }

    /// Starts `fogmesh run` on `data_dir` with exactly `args` (no loopback
    /// defaults: for offline nodes).
    pub fn start_with(data_dir: &Path, args: &[String]) -> Daemon {
        match Self::try_start_with(data_dir, args) {
            Ok(d) => d,
            Err(msg) => panic!("daemon did not start: {msg}"),
        }
    }

    /// Starts `fogmesh run` with exactly `args` inside the network
    /// namespace `netns`; its client commands run there too.
    pub fn start_in_netns(netns: &str, data_dir: &Path, args: &[String]) -> Daemon {
        match Self::try_start_in(Some(netns), data_dir, args, None) {
            Ok(d) => d,
            Err(msg) => panic!("daemon in {netns} did not start: {msg}"),
        }
    }

    fn try_start_with(data_dir: &Path, args: &[String]) -> Result<Daemon, String> {
        Self::try_start_in(None, data_dir, args, None)
    }

    /// Like `start`, with the daemon's log filter (`RUST_LOG`) set to
    /// `filter`; an empty one leaves the daemon its own default.
    pub fn start_logging(data_dir: &Path, extra: &[&str], filter: &str) -> Daemon {
        let mut args = loopback_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        match Self::try_start_in(None, data_dir, &args, Some(filter)) {
            Ok(d) => d,
            Err(msg) => panic!("daemon did not start: {msg}"),
        }
    }

    fn try_start_in(
        netns: Option<&str>,
        data_dir: &Path,
        args: &[String],
        log: Option<&str>,
    ) -> Result<Daemon, String> {
        let stderr_log = data_dir.with_extension("stderr.log");
        let stderr = std::fs::File::create(&stderr_log).expect("create stderr log");
        let mut cmd = fogmesh_in(netns);
        match log {
            Some("") => _ = cmd.env_remove("RUST_LOG"),
            Some(filter) => _ = cmd.env("RUST_LOG", filter),
            None => {}
        }
        cmd.arg("run")
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd.spawn().expect("spawn fogmesh");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon {
            child: None,
            data_dir: data_dir.to_path_buf(),
            stderr_log,
            peer_id: String::new(),
            listen: Vec::new(),
            api: String::new(),
            ready_lines: Vec::new(),
            netns: netns.map(str::to_owned),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line == "ready" => break,
                Ok(line) => {
                    if let Some(v) = line.strip_prefix("peer_id: ") {
                        d.peer_id = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("listen: ") {
                        d.listen.push(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("api: ") {
                        d.api = v.to_owned();
                    }
                    d.ready_lines.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().expect("wait");
                    let err = std::fs::read_to_string(&d.stderr_log).unwrap_or_default();
                    return Err(format!("exit {status}; stderr:\n{err}"));
                }
            }
        }
        d.child = Some(child);
        Ok(d)
    }

    /// The daemon's TCP address with its peer id, for `--bootstrap`.
    pub fn tcp_addr(&self) -> String {
        let a = self
            .listen
            .iter()
            .find(|a| a.contains("/tcp/"))
            .expect("a tcp listen address");
        format!("{a}/p2p/{}", self.peer_id)
    }

    /// The daemon's QUIC address with its peer id.
    pub fn quic_addr(&self) -> String {
        let a = self
            .listen
            .iter()
            .find(|a| a.contains("/quic-v1"))
            .expect("a quic listen address");
        format!("{a}/p2p/{}", self.peer_id)
    }

    /// Runs a client command against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        fogmesh_in(self.netns.as_deref())
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .output()
            .expect("run fogmesh client")
    }

    /// Runs a client command with `--json` and parses stdout; panics unless
    /// it exits 0.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a);
        assert!(
            out.status.success(),
            "fogmesh {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "fogmesh {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Like `json`, but exit code 1 ("nothing found") is accepted too; an
    /// exit 1 that printed nothing gives `Value::Null`.
    pub fn json_or_nothing(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a);
        let code = out.status.code();
        assert!(
            code == Some(0) || code == Some(1),
            "fogmesh {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        if code == Some(1) && out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "fogmesh {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Starts a long-running client command (`events`, `--follow`) against
    /// this daemon; its stdout is read line by line.
    pub fn spawn_cli(&self, args: &[&str]) -> Lines {
        let mut child = fogmesh_in(self.netns.as_deref())
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fogmesh client");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { child, rx }
    }

    /// The metrics address from the `metrics: HOST:PORT` ready line.
    pub fn metrics_addr(&self) -> Option<String> {
        self.ready_lines
            .iter()
            .find_map(|l| l.strip_prefix("metrics: "))
            .map(str::to_owned)
    }

    /// Peer ids of the connected peers, per `fogmesh peers --json`.
    pub fn connected_peers(&self) -> Vec<String> {
        let out = self.cli(&["peers", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["peer_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until this daemon is connected to `peer`.
    pub fn wait_connected(&self, peer: &str, timeout: Duration) {
        eventually(
            timeout,
            &format!("{} connected to {peer}", self.peer_id),
            || {
                self.connected_peers()
                    .iter()
                    .any(|p| p == peer)
                    .then_some(())
            },
        );
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's resident memory in bytes (Linux), while it runs.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// The daemon's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit; returns the status and how
    /// long it took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let mut child = self.child.take().expect("running");
        let start = Instant::now();
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("kill");
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return (status, start.elapsed());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon ignored SIGTERM for 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon with SIGKILL (no chance to clean up).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- stderr of daemon {} ---\n{}",
                self.peer_id,
                self.stderr()
            );
        }
    }
}

/// A raw HTTP/1.1 request to `addr`; returns (status code, body).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to API");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    s.write_all(req.as_bytes()).expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status: u16 = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A running client command's stdout, line by line. Killed when dropped.
pub struct Lines {
    child: Child,
    rx: mpsc::Receiver<String>,
}

impl Lines {
    /// The next line, or `None` if none came within `timeout` (or the
    /// command exited).
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.rx.recv_timeout(timeout).ok()
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The regular files under `dir` (recursively) whose raw bytes contain
/// `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display()));
        for entry in entries {
            let entry = entry.expect("directory entry");
            let path = entry.path();
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let bytes =
                    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                if !needle.is_empty() && bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path);
                }
            }
        }
    }
    found
}

/// The sum of all series of the metric `name` in a Prometheus text
/// exposition (labels ignored), or `None` if it is absent.
pub fn metric_sum(body: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let rest = match rest.chars().next() {
            Some('{') => match rest.rfind('}') {
                Some(i) => &rest[i + 1..],
                None => continue,
            },
            Some(' ') => rest,
            _ => continue,
        };
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            sum = Some(sum.unwrap_or(0.0) + v);
        }
    }
    sum
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    u64::try_from(d.as_millis()).expect("ms")
}

/// A string no other test run produces.
pub fn unique() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    format!("{:x}-{:x}", t.as_nanos(), std::process::id())
}

/// Whether `s` is 64 lower-case hex characters (a SHA-256 in hex).
pub fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
