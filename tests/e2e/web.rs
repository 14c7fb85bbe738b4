//! The chat page the daemon serves, in a real browser: two daemons, a
//! headless Chromium page logged into each through `fogmesh open`'s
//! one-time URL, driven over WebDriver (chromedriver) as a user would:
//! create a group on one, accept the invitation on the other, chat both
//! ways, send a direct message until it is delivered, upload a file on one
//! and fetch it on the other. Then the page's security: its headers, the
//! Host and Origin checks on cookie-authenticated requests, the CSRF token
//! on changes, one-time login tokens.
//!
//! Needs Debian's `chromium` and `chromium-driver`, which
//! `scripts/install-test-deps` installs (`scripts/test` runs it first).
//! Without them the test fails and says so; `FOGMESH_SKIP_BROWSER=1` skips
//! it explicitly. With `FOGMESH_SCREENSHOTS=DIR` it saves a PNG of each
//! main view in DIR (docs/screenshots/ was made so).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::{Daemon, eventually, free_port};

/// Each step's limit: group invitations and history sync take a few
/// seconds, and the machine may be busy.
const T: Duration = Duration::from_secs(90);

/// Why the browser test cannot run here, if it cannot.
fn missing_browser() -> Option<String> {
    for tool in ["chromium", "chromedriver"] {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!("`{tool}` is missing"));
        }
    }
    None
}

/// A raw HTTP/1.1 request (`Connection: close`); `headers` may set `Host`.
/// Returns the status, the headers (names lower-case) and the body.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("write");
    // Read until the body is complete: chromedriver keeps the connection
    // open despite `Connection: close`.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if len.is_some_and(|n| raw.len() >= split + 4 + n)
                || (head.contains("chunked") && raw.ends_with(b"0\r\n\r\n"))
            {
                break;
            }
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read from {addr}: {e}"),
        }
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut rest = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let hdrs: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    if hdrs
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        rest = dechunk(&rest);
    }
    (status, hdrs, String::from_utf8_lossy(&rest).into_owned())
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..eol])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        b = &b[eol + 2..];
        if size == 0 || b.len() < size {
            break;
        }
        out.extend_from_slice(&b[..size]);
        b = b.get(size + 2..).unwrap_or_default();
    }
    out
}

fn header<'a>(hdrs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    hdrs.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A chromedriver process; killed when dropped.
struct Driver {
    child: Child,
    addr: String,
}

impl Driver {
    fn start(log: &Path) -> Driver {
        let port = free_port();
        let log = std::fs::File::create(log).expect("chromedriver log");
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn chromedriver");
        let addr = format!("127.0.0.1:{port}");
        let d = Driver { child, addr };
        eventually(Duration::from_secs(60), "chromedriver ready", || {
            TcpStream::connect(&d.addr).ok()?;
            let (code, _, body) = request(&d.addr, "GET", "/status", &[], None);
            let v: Value = serde_json::from_str(&body).ok()?;
            (code == 200 && v["value"]["ready"] == true).then_some(())
        });
        d
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One browser (its own profile) driven over WebDriver.
struct Browser {
    driver: String,
    session: String,
}

impl Browser {
    fn new(driver: &Driver, profile: &Path) -> Browser {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let (code, _, body) = request(
            &driver.addr,
            "POST",
            "/session",
            &[],
            Some(&caps.to_string()),
        );
        assert_eq!(code, 200, "new WebDriver session: {body}");
        let v: Value = serde_json::from_str(&body).expect("session JSON");
        let session = v["value"]["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned();
        Browser {
            driver: driver.addr.clone(),
            session,
        }
    }

    /// One WebDriver command; its `value`, or the error.
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string());
        let (code, _, text) = request(
            &self.driver,
            method,
            &format!("/session/{}{path}", self.session),
            &[],
            body.as_deref(),
        );
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        if code == 200 {
            Ok(v["value"].clone())
        } else {
            Err(format!("{method} {path}: HTTP {code}: {}", v["value"]))
        }
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })))
            .expect("navigate");
    }

    /// Runs `script` (a function body) in the page with `args`.
    fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// Runs an async `script`: its last argument is the callback.
    fn js_async(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/async",
            Some(json!({ "script": script, "args": args })),
        )
        .unwrap_or_else(|e| panic!("async script failed: {e}"))
    }

    fn find(&self, css: &str) -> Option<String> {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .ok()?;
        v[ELEMENT].as_str().map(str::to_owned)
    }

    /// Clicks the element at `css` once it is there (lists re-render: a
    /// stale element is looked up again).
    fn click(&self, css: &str) {
        eventually(T, &format!("click {css}"), || {
            let e = self.find(css)?;
            self.cmd("POST", &format!("/element/{e}/click"), Some(json!({})))
                .ok()
        });
    }

    /// Types `text` into the element at `css`, emptied first.
    fn type_into(&self, css: &str, text: &str) {
        eventually(T, &format!("type into {css}"), || {
            let e = self.find(css)?;
            // A file input cannot be cleared; the others keep no old text.
            let _ = self.cmd("POST", &format!("/element/{e}/clear"), Some(json!({})));
            self.cmd(
                "POST",
                &format!("/element/{e}/value"),
                Some(json!({ "text": text })),
            )
            .ok()
        });
    }

    /// The text of the element at `css` ("" when there is none).
    fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
            json!([css]),
        )
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Waits until the element at `css` exists and its text contains
    /// `needle`.
    fn wait_text(&self, css: &str, needle: &str) {
        eventually(T, &format!("{css} shows {needle:?}"), || {
            self.text(css).contains(needle).then_some(())
        });
    }

    fn cookies(&self) -> Vec<Value> {
        self.cmd("GET", "/cookie", None)
            .expect("cookies")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn screenshot(&self, path: &Path) {
        self.js("document.getElementById('toast').hidden = true", json!([]));
        let v = self.cmd("GET", "/screenshot", None).expect("screenshot");
        let png = base64_decode(v.as_str().expect("base64"));
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.cmd("DELETE", "", None);
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// `fogmesh open --no-browser --json`: the login URL.
fn login_url(d: &Daemon) -> String {
    let v = d.json(&["open", "--no-browser"]);
    let url = v["url"].as_str().expect("url").to_owned();
    assert!(
        url.starts_with(&format!("http://{}/#login=", d.api)),
        "{url}"
    );
    url
}

/// Logs `b` into `d`'s page and waits until it has loaded.
fn log_in(b: &Browser, d: &Daemon) -> String {
    let url = login_url(d);
    b.goto(&url);
    eventually(T, "the page logged in and loaded", || {
        (b.js("return document.body.dataset.ready || ''", json!([])) == "1").then_some(())
    });
    // The one-time token left the address bar.
    let href = b.js("return location.href", json!([]));
    assert!(
        !href.as_str().unwrap_or_default().contains("login="),
        "{href}"
    );
    url
}

fn short(peer: &str) -> String {
    format!("…{}", &peer[peer.len() - 8..])
}

#[test]
fn chat_page_in_a_browser() {
    if let Some(why) = missing_browser() {
        if std::env::var_os("FOGMESH_SKIP_BROWSER").is_some() {
            eprintln!("SKIPPED web::chat_page_in_a_browser: {why} (FOGMESH_SKIP_BROWSER is set)");
            return;
        }
        panic!(
            "web::chat_page_in_a_browser cannot run: {why}. Install Debian's chromium and \
             chromium-driver (scripts/install-test-deps does, as root), or set \
             FOGMESH_SKIP_BROWSER=1 to skip this test explicitly."
        );
    }
    let shots: Option<PathBuf> = std::env::var_os("FOGMESH_SCREENSHOTS").map(PathBuf::from);
    if let Some(dir) = &shots {
        std::fs::create_dir_all(dir).expect("screenshot dir");
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let b = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &a.tcp_addr()]);
    a.wait_connected(&b.peer_id, T);

    let driver = Driver::start(&tmp.path().join("chromedriver.log"));
    let pa = Browser::new(&driver, &tmp.path().join("profile-a"));
    let pb = Browser::new(&driver, &tmp.path().join("profile-b"));
    let url_a = log_in(&pa, &a);
    log_in(&pb, &b);
    pa.wait_text("#me", &short(&a.peer_id));

    // A group, created in A's page with B as a member.
    let name = "Hike on Saturday";
    pa.click("#nav-groups");
    pa.type_into("#new-group-name", name);
    pa.type_into("#new-group-members", &b.peer_id);
    pa.click("#new-group-submit");
    pa.wait_text("#group-list", name);
    let groups = a.json(&["group", "list"]);
    let gid = groups[0]["group_id"].as_str().expect("group id").to_owned();
    pa.wait_text("#group-title", name);

    // B's page shows the invitation, live; B accepts it there.
    pb.click("#nav-groups");
    pb.wait_text(&format!("#invite-list li[data-id='{gid}']"), name);
    pb.wait_text(
        &format!("#invite-list li[data-id='{gid}']"),
        &short(&a.peer_id),
    );
    if let Some(dir) = &shots {
        pb.screenshot(&dir.join("groups.png"));
    }
    pb.click(&format!("#invite-list li[data-id='{gid}'] button.accept"));
    pb.wait_text("#group-list", name);
    pb.click(&format!("#group-list li[data-id='{gid}']"));
    pb.wait_text("#group-members", &format!("{} (admin)", short(&a.peer_id)));

    // A message typed in A's page appears in B's, with A's short name.
    let hello = "Meet at the station at 8?";
    pa.type_into("#group-text", hello);
    pa.click("#group-send");
    pb.wait_text("#group-messages", hello);
    pb.wait_text("#group-messages .msg .who", &short(&a.peer_id));
    // And back, with markup that must stay text.
    let reply = "<img src=x onerror=alert(1)> yes, 8 is fine";
    pb.type_into("#group-text", reply);
    pb.click("#group-send");
    pa.wait_text("#group-messages", reply);
    let imgs = pa.js(
        "return document.querySelectorAll('#group-messages img').length",
        json!([]),
    );
    assert_eq!(imgs, 0, "a peer's text was parsed as HTML");
    if let Some(dir) = &shots {
        pa.screenshot(&dir.join("conversation.png"));
    }
    // A removes B in its page: B's page shows the group as left.
    pa.click(&format!("#group-members li[title='{}'] button", b.peer_id));
    eventually(T, "B gone from A's member list", || {
        (!pa.text("#group-members").contains(&short(&b.peer_id))).then_some(())
    });
    pb.wait_text(&format!("#group-list li[data-id='{gid}']"), "left");

    // A direct message from A's page, its state becoming delivered.
    pa.click("#nav-messages");
    pa.type_into("#dm-new-peer", &b.peer_id);
    pa.click("#dm-new-submit");
    pa.wait_text("#dm-title", &short(&b.peer_id));
    let dm = "Bringing the map";
    pa.type_into("#dm-text", dm);
    pa.click("#dm-send");
    pa.wait_text("#dm-messages li.out .text", dm);
    pa.wait_text("#dm-messages li.out .state", "delivered");
    pa.wait_text("#dm-messages li.out .route", "via ");
    pb.click("#nav-messages");
    pb.click(&format!("#dm-list li[data-peer='{}']", a.peer_id));
    pb.wait_text("#dm-messages li.in .text", dm);
    if let Some(dir) = &shots {
        pa.screenshot(&dir.join("messages.png"));
    }

    // A file uploaded from A's page, fetched in B's page by its id.
    let src = tmp.path().join("route-map.txt");
    let content: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(&src, &content).expect("write file");
    pa.click("#nav-files");
    pa.type_into("#upload-file", &src.display().to_string());
    pa.click("#upload-submit");
    pa.wait_text("#file-list", "route-map.txt");
    pa.wait_text("#file-list", "sharing");
    let files = a.json(&["file", "list"]);
    let fid = files[0]["file_id"].as_str().expect("file id").to_owned();
    let out = tmp.path().join("fetched.txt");
    pb.click("#nav-files");
    pb.type_into("#fetch-id", &fid);
    pb.type_into("#fetch-output", &out.display().to_string());
    pb.click("#fetch-submit");
    pb.wait_text(
        &format!("#file-list tr[data-id='{fid}'] .state"),
        "complete",
    );
    pb.wait_text(&format!("#file-list tr[data-id='{fid}']"), "source");
    pb.wait_text(&format!("#file-list tr[data-id='{fid}']"), "Download");
    assert_eq!(
        std::fs::read_to_string(&out).expect("fetched file"),
        content
    );
    // A fetch nobody can serve: "searching for providers", then cancelled.
    let ghost = "ab".repeat(32);
    pb.type_into("#fetch-id", &ghost);
    pb.type_into(
        "#fetch-output",
        &tmp.path().join("ghost.bin").display().to_string(),
    );
    pb.click("#fetch-submit");
    let row = format!("#file-list tr[data-id='{ghost}']");
    pb.wait_text(&row, "searching for providers");
    if let Some(dir) = &shots {
        pb.screenshot(&dir.join("files.png"));
    }
    pb.click(&format!("{row} button"));
    eventually(T, "the cancelled fetch leaves the list", || {
        pb.text(&row).is_empty().then_some(())
    });

    // Peers and status.
    pa.click("#nav-peers");
    pa.wait_text(
        &format!("#peer-list tr[data-peer='{}']", b.peer_id),
        "direct",
    );
    pa.wait_text("#status", &a.peer_id);
    if let Some(dir) = &shots {
        pa.screenshot(&dir.join("peers.png"));
    }

    // ---- security ----
    // The page's headers.
    let (code, hdrs, _) = request(&a.api, "GET", "/", &[], None);
    assert_eq!(code, 200);
    let csp = header(&hdrs, "content-security-policy").unwrap_or_default();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert_eq!(header(&hdrs, "x-frame-options"), Some("DENY"));
    assert_eq!(header(&hdrs, "x-content-type-options"), Some("nosniff"));
    assert!(
        hdrs.iter().all(|(k, _)| !k.starts_with("access-control-")),
        "CORS headers: {hdrs:?}"
    );
    // The session cookie: HttpOnly, SameSite=Strict, named after the port.
    let port = a.api.rsplit_once(':').expect("port").1;
    let cookie_name = format!("fogmesh_session_{port}");
    let c = pa
        .cookies()
        .into_iter()
        .find(|c| c["name"] == cookie_name.as_str())
        .expect("the session cookie");
    assert_eq!(c["httpOnly"], true, "{c}");
    assert_eq!(c["sameSite"], "Strict", "{c}");
    let cookie = format!("{cookie_name}={}", c["value"].as_str().expect("value"));
    let origin = format!("http://{}", a.api);
    let (code, _, _) = request(&a.api, "GET", "/v1/status", &[("Cookie", &cookie)], None);
    assert_eq!(code, 200, "the cookie authenticates");
    // The page's download link: the shared file's bytes, as an attachment.
    let (code, hdrs, body) = request(
        &a.api,
        "GET",
        &format!("/v1/files/{fid}/content"),
        &[("Cookie", &cookie)],
        None,
    );
    assert_eq!(code, 200, "download: {body:.200}");
    assert_eq!(
        header(&hdrs, "content-disposition"),
        Some("attachment; filename=\"route-map.txt\"")
    );
    assert!(body == content, "the downloaded bytes are the file's");
    // Foreign Origin or Host: refused, cookie or not.
    let (code, _, _) = request(
        &a.api,
        "GET",
        "/v1/status",
        &[("Cookie", &cookie), ("Origin", "http://evil.example")],
        None,
    );
    assert_eq!(code, 403, "a foreign Origin is refused");
    let evil_host = format!("evil.example:{port}");
    let (code, _, _) = request(
        &a.api,
        "GET",
        "/v1/status",
        &[("Cookie", &cookie), ("Host", &evil_host)],
        None,
    );
    assert_eq!(code, 403, "a foreign Host is refused");
    let (code, _, _) = request(&a.api, "GET", "/", &[("Host", &evil_host)], None);
    assert_eq!(code, 403, "the page itself needs the right Host");
    // A change without the CSRF token (or with a wrong one) is refused.
    let (_, _, s) = request(
        &a.api,
        "GET",
        "/v1/web/session",
        &[("Cookie", &cookie)],
        None,
    );
    let csrf = serde_json::from_str::<Value>(&s).expect("session JSON")["csrf"]
        .as_str()
        .expect("csrf")
        .to_owned();
    let body = r#"{"name":"forged"}"#;
    for hdrs in [
        vec![("Cookie", cookie.as_str()), ("Origin", origin.as_str())],
        vec![
            ("Cookie", cookie.as_str()),
            ("Origin", origin.as_str()),
            ("X-CSRF-Token", "0000"),
        ],
        vec![("Cookie", cookie.as_str()), ("X-CSRF-Token", csrf.as_str())],
    ] {
        let (code, _, text) = request(&a.api, "POST", "/v1/groups", &hdrs, Some(body));
        assert_eq!(code, 403, "{hdrs:?}: {text}");
    }
    let (code, _, text) = request(
        &a.api,
        "POST",
        "/v1/groups",
        &[
            ("Cookie", &cookie),
            ("Origin", &origin),
            ("X-CSRF-Token", &csrf),
        ],
        Some(r#"{"name":"with the token"}"#),
    );
    assert_eq!(code, 200, "the same change with the token: {text}");
    // The same from inside the page: fetch without the header.
    let forged = pa.js_async(
        "const done = arguments[arguments.length - 1];
         fetch('/v1/groups', {method: 'POST', headers: {'Content-Type': 'application/json'},
                              body: JSON.stringify({name: 'forged'})})
           .then(r => done(r.status), e => done(String(e)));",
        json!([]),
    );
    assert_eq!(forged, 403);
    let names: Vec<String> = a
        .json(&["group", "list"])
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["name"].as_str().map(str::to_owned))
        .collect();
    assert!(!names.iter().any(|n| n == "forged"), "{names:?}");
    // A login URL works once; a page session cannot make new ones.
    let used = url_a.rsplit_once("#login=").expect("token").1;
    let (code, _, _) = request(
        &a.api,
        "POST",
        "/v1/web/session",
        &[("Origin", &origin)],
        Some(&json!({ "token": used }).to_string()),
    );
    assert_eq!(code, 401, "a used login token is refused");
    let (code, _, _) = request(
        &a.api,
        "POST",
        "/v1/web/login",
        &[
            ("Cookie", &cookie),
            ("Origin", &origin),
            ("X-CSRF-Token", &csrf),
        ],
        Some("{}"),
    );
    assert_eq!(code, 403, "a page session cannot mint login URLs");
    // Without a cookie or token: 401 as before; the CLI's bearer token
    // still works (every `a.json` above used it).
    let (code, _, _) = request(&a.api, "GET", "/v1/status", &[], None);
    assert_eq!(code, 401);
}

/// `file get` without a place to write it (what the page's fetch does when
/// its path is left empty) lands in the daemon's `downloads/`, and the page's
/// download route reads it back; a download that is not complete, an
/// unknown id and a name that is not an id are refused. No browser needed.
#[test]
fn fetches_without_a_path_land_in_downloads_and_read_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&tmp.path().join("a"), &[]);
    let b = Daemon::start(&tmp.path().join("b"), &["--bootstrap", &a.tcp_addr()]);
    a.wait_connected(&b.peer_id, T);
    let src = tmp.path().join("notes.txt");
    let content: String = (0..5_000).map(|i| format!("note {i}\n")).collect();
    std::fs::write(&src, &content).expect("write file");
    let shared = a.json(&["file", "share", &src.display().to_string()]);
    let fid = shared["file_id"].as_str().expect("file id").to_owned();

    let token = std::fs::read_to_string(b.data_dir.join("api.token")).expect("token");
    let auth = format!("Bearer {}", token.trim());
    let (code, _, body) = request(
        &b.api,
        "POST",
        &format!("/v1/files/{fid}/get"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some("{}"),
    );
    assert_eq!(code, 200, "{body}");
    let done = eventually(T, "the download completes", || {
        let st = b.json(&["file", "status", &fid]);
        (st["state"] == "complete").then_some(st)
    });
    let path = b.data_dir.join("downloads").join(&fid);
    assert_eq!(done["path"].as_str(), Some(path.to_str().expect("utf-8")));
    assert_eq!(std::fs::read_to_string(&path).expect("downloaded"), content);
    let (code, hdrs, body) = request(
        &b.api,
        "GET",
        &format!("/v1/files/{fid}/content"),
        &[("Authorization", &auth)],
        None,
    );
    assert_eq!(code, 200, "{body:.200}");
    assert_eq!(
        header(&hdrs, "content-disposition"),
        Some("attachment; filename=\"notes.txt\"")
    );
    assert!(body == content, "the content route serves the file");

    // Nobody has this one: it searches, and cannot be read yet.
    let ghost = "cd".repeat(32);
    let (code, _, body) = request(
        &b.api,
        "POST",
        &format!("/v1/files/{ghost}/get"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(r#"{"output":""}"#),
    );
    assert_eq!(code, 200, "{body}");
    let (code, _, body) = request(
        &b.api,
        "GET",
        &format!("/v1/files/{ghost}/content"),
        &[("Authorization", &auth)],
        None,
    );
    assert_eq!(code, 409, "{body}");
    // Unknown ids, and names that are not ids, change nothing.
    let (code, _, _) = request(
        &b.api,
        "GET",
        &format!("/v1/files/{}/content", "ef".repeat(32)),
        &[("Authorization", &auth)],
        None,
    );
    assert_eq!(code, 404);
    let (code, _, body) = request(
        &b.api,
        "POST",
        "/v1/files/..%2F..%2Fetc/get",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some("{}"),
    );
    assert_eq!(code, 400, "{body}");
    assert!(!tmp.path().join("etc").exists());
    // Without the token, nothing is served.
    let (code, _, _) = request(
        &b.api,
        "GET",
        &format!("/v1/files/{fid}/content"),
        &[],
        None,
    );
    assert_eq!(code, 401);
}
