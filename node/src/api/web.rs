//! The chat page: a single-page client (plain HTML, CSS and a JavaScript
//! module, compiled into the binary) served on the API's own address, and
//! the browser's way in.
//!
//! Security model (docs/operator-guide.md, "The web page"):
//! - `fogmesh open` asks for a one-time login token with the bearer token
//!   (`POST /v1/web/login`) and prints `http://<api>/#login=<token>`; the
//!   token lives [`LOGIN_TTL`] and is used once.
//! - The page exchanges it (`POST /v1/web/session`) for a session cookie
//!   (`HttpOnly; SameSite=Strict; Path=/`, named after the API's port since
//!   browsers share cookies between ports) and a CSRF token, which every
//!   change (any method but GET and HEAD) must carry in `X-CSRF-Token`,
//!   with an `Origin` header naming the API. At most [`MAX_SESSIONS`]
//!   sessions live at once, each at most [`SESSION_TTL`].
//! - Every request, page, assets and cookie-authenticated calls alike,
//!   passes the API's Host and Origin checks first (`same_host`).
//! - Every answer carries `Content-Security-Policy: default-src 'self'`,
//!   `X-Frame-Options: DENY` and `nosniff`; there are no CORS headers.
//!
//! Secrets are kept as their SHA-256 only, and compared in constant time.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{AppState, constant_time_eq, error, service_result};
use crate::files::{FileState, FileStatus};

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");

/// How long a login token from `fogmesh open` can be exchanged.
pub const LOGIN_TTL: Duration = Duration::from_secs(5 * 60);
/// Login tokens waiting to be exchanged, at most (the oldest goes first).
pub const MAX_LOGIN_TOKENS: usize = 16;
/// How long a browser session lives.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 60 * 60);
/// Browser sessions at once, at most (a new login ends the oldest).
pub const MAX_SESSIONS: usize = 32;
/// The largest file the page can upload.
pub const MAX_UPLOAD: u64 = 256 * 1024 * 1024;
/// The header carrying the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The page's sessions and where uploads go.
#[derive(Debug)]
pub(super) struct Web {
    upload_dir: PathBuf,
    download_dir: PathBuf,
    cookie_name: String,
    inner: Mutex<Sessions>,
}

#[derive(Debug, Default)]
struct Sessions {
    /// SHA-256 of a login token → when it expires.
    logins: HashMap<[u8; 32], Instant>,
    /// SHA-256 of a session cookie → the session.
    sessions: HashMap<[u8; 32], Session>,
}

#[derive(Debug)]
struct Session {
    csrf: String,
    expires: Instant,
}

/// Marks a request authenticated by a session cookie (not the bearer
/// token).
#[derive(Debug, Clone, Copy)]
pub(super) struct CookieSession;

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl Web {
    pub(super) fn new(data_dir: PathBuf, api_addr: &str) -> Web {
        let port = api_addr.rsplit_once(':').map(|(_, p)| p).unwrap_or("0");
        Web {
            upload_dir: data_dir.join("uploads"),
            download_dir: data_dir.join("downloads"),
            cookie_name: format!("fogmesh_session_{port}"),
            inner: Mutex::new(Sessions::default()),
        }
    }

    /// Where a download asked for without an output path goes:
    /// `downloads/<id>` in the data directory (created). The id must look
    /// like one (hex), so it cannot name another place.
    pub(super) async fn download_path(&self, id: &str) -> Result<PathBuf, Response> {
        if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("{id:?} is not a file id"),
            ));
        }
        if let Err(e) = tokio::fs::create_dir_all(&self.download_dir).await {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot create {}: {e}", self.download_dir.display()),
            ));
        }
        Ok(self.download_dir.join(id))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        // A panic while holding the lock cannot leave the maps half-changed
        // in a way that matters: keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new one-time login token.
    fn new_login(&self) -> String {
        let token = random_token();
        let now = Instant::now();
        let mut s = self.lock();
        s.logins.retain(|_, exp| *exp > now);
        while s.logins.len() >= MAX_LOGIN_TOKENS {
            let Some(oldest) = s.logins.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k) else {
                break;
            };
            s.logins.remove(&oldest);
        }
        s.logins.insert(digest(&token), now + LOGIN_TTL);
        token
    }

    /// Uses up `login`; a new session (cookie value, CSRF token) if it was
    /// valid.
    fn exchange(&self, login: &str) -> Option<(String, String)> {
        let now = Instant::now();
        let mut s = self.lock();
        let exp = s.logins.remove(&digest(login))?;
        if exp <= now {
            return None;
        }
        s.sessions.retain(|_, v| v.expires > now);
        while s.sessions.len() >= MAX_SESSIONS {
            let Some(oldest) = s
                .sessions
                .iter()
                .min_by_key(|(_, v)| v.expires)
                .map(|(k, _)| *k)
            else {
                break;
            };
            s.sessions.remove(&oldest);
        }
        let cookie = random_token();
        let csrf = random_token();
        s.sessions.insert(
            digest(&cookie),
            Session {
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        Some((cookie, csrf))
    }

    /// The CSRF token of the live session `cookie`.
    fn session_csrf(&self, cookie: &str) -> Option<String> {
        let now = Instant::now();
        let s = self.lock();
        s.sessions
            .get(&digest(cookie))
            .filter(|v| v.expires > now)
            .map(|v| v.csrf.clone())
    }

    fn end_session(&self, cookie: &str) {
        self.lock().sessions.remove(&digest(cookie));
    }

    /// The value of this API's session cookie in `headers`, if any.
    fn cookie<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == self.cookie_name)
            .map(|(_, v)| v)
    }

    fn set_cookie(&self, value: &str, max_age: u64) -> HeaderValue {
        let c = format!(
            "{}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}",
            self.cookie_name
        );
        HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// Authenticates `req` by its session cookie: `None` when it carries none
/// (the bearer token is then required); else whether the session is live
/// and, for a change, the CSRF token and an `Origin` are there.
pub(super) fn cookie_auth(state: &AppState, req: &mut Request) -> Option<Result<(), Response>> {
    let cookie = state.web.cookie(req.headers())?;
    let Some(csrf) = state.web.session_csrf(cookie) else {
        return Some(Err(error(
            StatusCode::UNAUTHORIZED,
            "the page's session is unknown or expired: run `fogmesh open` for a new login URL",
        )));
    };
    let safe = req.method() == Method::GET || req.method() == Method::HEAD;
    if !safe {
        let given = req
            .headers()
            .get(CSRF_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !constant_time_eq(given, csrf.as_bytes()) {
            return Some(Err(error(
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token (X-CSRF-Token)",
            )));
        }
        // same_host has checked that an Origin, when there is one, is
        // this API; a browser always sends one with a change.
        if !req.headers().contains_key(header::ORIGIN) {
            return Some(Err(error(
                StatusCode::FORBIDDEN,
                "a change from the page must carry an Origin header",
            )));
        }
    }
    req.extensions_mut().insert(CookieSession);
    Some(Ok(()))
}

/// The page's routes that need no authentication (the page, its assets,
/// the login exchange); they still pass the Host and Origin checks.
pub(super) fn public_routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/assets/app.js", get(app_js))
        .route("/assets/style.css", get(style_css))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/v1/web/session",
            get(session_get).post(session_new).delete(session_end),
        )
}

/// The page's routes behind the API's authentication.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/web/login", post(login_token))
        .route("/v1/files/upload", post(upload))
        .route("/v1/files/{id}/content", get(content))
}

/// Adds the page's security headers to every answer.
pub(super) async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// `POST /v1/web/login` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct LoginUrl {
    /// The one-time login URL.
    pub url: String,
    /// Seconds it stays valid.
    pub expires_in_secs: u64,
}

/// `POST /v1/web/login`: a one-time login URL (bearer token only: a page's
/// session cannot mint more).
async fn login_token(State(s): State<AppState>, via: Option<Extension<CookieSession>>) -> Response {
    if via.is_some() {
        return error(
            StatusCode::FORBIDDEN,
            "login URLs are made with the bearer token (`fogmesh open`)",
        );
    }
    let token = s.web.new_login();
    Json(LoginUrl {
        url: format!("http://{}/#login={token}", s.api_addr),
        expires_in_secs: LOGIN_TTL.as_secs(),
    })
    .into_response()
}

#[derive(Debug, Deserialize)]
struct Exchange {
    token: String,
}

#[derive(Debug, Serialize)]
struct SessionInfo {
    csrf: String,
}

/// `POST /v1/web/session {"token"}`: exchanges a login token for a session
/// cookie and answers the CSRF token.
async fn session_new(
    State(s): State<AppState>,
    b: Result<Json<Exchange>, JsonRejection>,
) -> Response {
    let Ok(Json(req)) = b else {
        return error(StatusCode::BAD_REQUEST, "expected {\"token\": \"...\"}");
    };
    let Some((cookie, csrf)) = s.web.exchange(&req.token) else {
        s.metrics.api_unauthorized.inc();
        return error(
            StatusCode::UNAUTHORIZED,
            "this login URL is used up or expired: run `fogmesh open` for a new one",
        );
    };
    let mut resp = Json(SessionInfo { csrf }).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        s.web.set_cookie(&cookie, SESSION_TTL.as_secs()),
    );
    resp
}

/// `GET /v1/web/session`: the CSRF token of the cookie's session (a page
/// reloaded keeps its session).
async fn session_get(State(s): State<AppState>, headers: HeaderMap) -> Response {
    match s.web.cookie(&headers).and_then(|c| s.web.session_csrf(c)) {
        Some(csrf) => Json(SessionInfo { csrf }).into_response(),
        None => error(StatusCode::UNAUTHORIZED, "not logged in"),
    }
}

/// `DELETE /v1/web/session`: logs out (needs the CSRF token).
async fn session_end(State(s): State<AppState>, mut req: Request) -> Response {
    match cookie_auth(&s, &mut req) {
        Some(Ok(())) => {}
        Some(Err(r)) => return r,
        None => return error(StatusCode::UNAUTHORIZED, "not logged in"),
    }
    if let Some(c) = s.web.cookie(req.headers()) {
        s.web.end_session(c);
    }
    let mut resp = Json(serde_json::json!({ "logged_out": true })).into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, s.web.set_cookie("", 0));
    resp
}

#[derive(Debug, Deserialize)]
struct UploadQuery {
    name: String,
}

/// `POST /v1/files/upload?name=NAME` with the file as the body (at most
/// [`MAX_UPLOAD`] bytes): stored under `uploads/` in the data directory
/// and shared; answers the share's status.
async fn upload(State(s): State<AppState>, Query(q): Query<UploadQuery>, body: Body) -> Response {
    let name: String = q
        .name
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(128)
        .collect();
    let name = name.trim_start_matches('.');
    if name.is_empty() {
        return error(StatusCode::BAD_REQUEST, "the upload needs a file name");
    }
    let dir = s
        .web
        .upload_dir
        .join(random_token().get(..16).unwrap_or("x"));
    if let Err(e) = tokio::fs::create_dir_all(&dir).await {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot create {}: {e}", dir.display()),
        );
    }
    let path = dir.join(name);
    match write_capped(&path, body, MAX_UPLOAD).await {
        Ok(()) => {}
        Err(resp) => {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return resp;
        }
    }
    service_result(s.node.files().share(path, false).await)
}

/// `GET /v1/files/{id}/content`: the bytes of a shared or completely
/// downloaded file, as an attachment named after its manifest's name.
/// Anything else (a download under way, a share changed on disk) is 409.
async fn content(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    let st = match s.node.files().status(&id).await {
        Ok(st) => st,
        Err(e) => return service_result::<FileStatus>(Err(e)),
    };
    let path = match (st.state, &st.path) {
        (FileState::Sharing | FileState::Complete, Some(p)) => PathBuf::from(p),
        (state, _) => {
            return error(
                StatusCode::CONFLICT,
                format!("file {id} is {state}: only a shared or complete file can be read"),
            );
        }
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            return error(
                StatusCode::GONE,
                format!("cannot read {}: {e}", path.display()),
            );
        }
    };
    let len = file.metadata().await.map(|m| m.len()).ok();
    let name = attachment_name(st.name.as_deref().unwrap_or(&st.file_id));
    let mut resp = Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}

/// A file name that is safe in a `Content-Disposition` header: ASCII
/// letters, digits, `.`, `-` and `_`; anything else becomes `_`; no
/// leading dot; at most 128 characters.
fn attachment_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let clean: String = base
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let clean = clean.trim_start_matches('.');
    if clean.is_empty() {
        "file".to_owned()
    } else {
        clean.to_owned()
    }
}

/// Writes `body` to a new file at `path`, failing with 413 past `cap`
/// bytes (the caller removes what was written).
async fn write_capped(path: &std::path::Path, body: Body, cap: u64) -> Result<(), Response> {
    let io = |e: std::io::Error| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot write {}: {e}", path.display()),
        )
    };
    let mut file = tokio::fs::File::create(path).await.map_err(io)?;
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
        written += chunk.len() as u64;
        if written > cap {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("uploads are limited to {} MiB", cap >> 20),
            ));
        }
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.sync_all().await.map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_tokens_are_one_time_and_sessions_bounded() {
        let w = Web::new(PathBuf::from("/nonexistent"), "127.0.0.1:7007");
        let t = w.new_login();
        assert!(w.exchange("wrong").is_none());
        let (cookie, csrf) = w.exchange(&t).expect("first exchange");
        assert!(w.exchange(&t).is_none(), "a login token works once");
        assert_eq!(w.session_csrf(&cookie).as_deref(), Some(csrf.as_str()));
        for _ in 0..MAX_SESSIONS + 5 {
            let t = w.new_login();
            w.exchange(&t).expect("exchange");
        }
        assert!(w.lock().sessions.len() <= MAX_SESSIONS);
        for _ in 0..MAX_LOGIN_TOKENS + 5 {
            w.new_login();
        }
        assert!(w.lock().logins.len() <= MAX_LOGIN_TOKENS);
    }

    #[tokio::test]
    async fn uploads_stop_at_the_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        write_capped(&p, Body::from(vec![7u8; 1000]), 1000)
            .await
            .expect("at the cap");
        assert_eq!(std::fs::read(&p).expect("written").len(), 1000);
        let err = write_capped(&p, Body::from(vec![7u8; 1001]), 1000)
            .await
            .expect_err("over the cap");
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn attachment_names_stay_in_their_header() {
        assert_eq!(attachment_name("report.pdf"), "report.pdf");
        assert_eq!(attachment_name("../../etc/passwd"), "passwd");
        assert_eq!(
            attachment_name("a\"b\r\nSet-Cookie: x"),
            "a_b__Set-Cookie__x"
        );
        assert_eq!(attachment_name(".hidden"), "hidden");
        assert_eq!(attachment_name("été 2026.txt"), "_t__2026.txt");
        assert_eq!(attachment_name(""), "file");
        assert_eq!(attachment_name(&"x".repeat(500)).len(), 128);
    }

    #[test]
    fn cookie_is_found_by_its_port_name() {
        let w = Web::new(PathBuf::from("/x"), "127.0.0.1:7007");
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; fogmesh_session_7008=no; fogmesh_session_7007=yes"),
        );
        assert_eq!(w.cookie(&h), Some("yes"));
    }
}
