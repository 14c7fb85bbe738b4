//! The local HTTP/JSON API (loopback only), used by the CLI's client
//! commands and by scripts.
//!
//! Every request needs `Authorization: Bearer <token>`, the token being the
//! content of `api.token` in the data directory (mode 0600), and a `Host`
//! naming the API's loopback address, without a foreign `Origin` (a web
//! page cannot reach the API through the browser; the chat page the API
//! serves comes in with a session cookie instead, see [`web`]). Errors are
//! `{"error": "..."}` with a fitting status code. Routes live under `/v1`;
//! see docs/operator-guide.md for the list.

pub mod web;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, Query};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_util::sync::CancellationToken;

use crate::actor::ServiceError;
use crate::fsutil;
use crate::metrics::NodeMetrics;
use crate::node::{ConnectError, NodeHandle};
use crate::types::{
    ApiError, ConnectRequest, CreateGroup, GetFile, MemberRequest, NodeEvent, PostMessage,
    SendDirect, ShareFile,
};

/// File holding the API token (mode 0600), created on first start and kept.
pub const TOKEN_FILE: &str = "api.token";
/// File holding where the running daemon's API listens, written atomically
/// at start and removed at a clean shutdown.
pub const ENDPOINT_FILE: &str = "api.json";

/// The content of `api.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    /// `host:port` of the API.
    pub addr: String,
    /// The daemon's process id.
    pub pid: u32,
    /// The daemon's peer id.
    pub peer_id: String,
}

/// Reads the token, or creates one (32 random bytes, hex) if there is none.
pub fn load_or_create_token(data_dir: &Path) -> anyhow::Result<String> {
    let p = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&p) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    fsutil::write_atomic(&p, token.as_bytes(), true)
        .with_context(|| format!("cannot write {}", p.display()))?;
    Ok(token)
}

/// Writes `api.json` atomically.
pub fn write_endpoint(data_dir: &Path, endpoint: &Endpoint) -> anyhow::Result<PathBuf> {
    let p = data_dir.join(ENDPOINT_FILE);
    let bytes = serde_json::to_vec_pretty(endpoint)?;
    fsutil::write_atomic(&p, &bytes, true)
        .with_context(|| format!("cannot write {}", p.display()))?;
    Ok(p)
}

#[derive(Clone)]
struct AppState {
    node: NodeHandle,
    token: Arc<str>,
    api_addr: Arc<str>,
    metrics: NodeMetrics,
    shutdown: CancellationToken,
    /// The chat page's sessions (see [`web`]).
    web: Arc<web::Web>,
}

/// Serves the API on `listener` until `shutdown` is cancelled; open event
/// streams end then too, so shutdown is not held up by them.
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: NodeHandle,
    token: String,
    metrics: NodeMetrics,
    shutdown: CancellationToken,
    data_dir: PathBuf,
) -> std::io::Result<()> {
    let api_addr = listener.local_addr()?.to_string();
    let state = AppState {
        web: Arc::new(web::Web::new(data_dir, &api_addr)),
        node,
        token: token.into(),
        api_addr: api_addr.into(),
        metrics,
        shutdown: shutdown.clone(),
    };
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/connect", post(connect))
        .route("/v1/events", get(events))
        .route("/v1/files", get(files_list).post(files_share))
        .route("/v1/files/{id}", get(files_status).delete(files_cancel))
        .route("/v1/files/{id}/get", post(files_get))
        .route("/v1/groups", get(groups_list).post(groups_create))
        .route("/v1/groups/{id}", get(groups_show))
        .route("/v1/groups/{id}/members", post(groups_add))
        .route("/v1/groups/{id}/members/{peer}", delete(groups_remove))
        .route("/v1/groups/{id}/leave", post(groups_leave))
        .route(
            "/v1/groups/{id}/messages",
            get(groups_messages).post(groups_post),
        )
        .route("/v1/messages", get(dm_list).post(dm_send))
        .route("/v1/messages/{id}", get(dm_get))
        .route("/v1/outbox", get(dm_outbox))
        .route("/v1/mailbox/delete", post(mailbox_delete))
        .route("/v1/groups/invites", get(groups_invites))
        .route("/v1/groups/{id}/accept", post(groups_accept))
        .route("/v1/groups/{id}/decline", post(groups_decline))
        .merge(web::routes())
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        // The page and the login exchange need no token, but pass the Host
        // and Origin checks like everything else.
        .merge(web::public_routes())
        // Outermost, so it runs first: a browser's request is refused
        // before the token is even looked at.
        .layer(middleware::from_fn_with_state(state.clone(), same_host))
        .layer(middleware::from_fn(web::security_headers))
        .with_state(state)
}

/// A JSON error response.
pub fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ApiError { error: msg.into() })).into_response()
}

async fn auth(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let bearer_ok = given.is_some_and(|t| constant_time_eq(t.as_bytes(), state.token.as_bytes()));
    // Not the bearer token: the page's session cookie (and, for a change,
    // its CSRF token), if the request carries one.
    let cookie = if bearer_ok {
        None
    } else {
        web::cookie_auth(&state, &mut req)
    };
    match (bearer_ok, cookie) {
        (true, _) | (false, Some(Ok(()))) => {
            state.metrics.api_requests.inc();
            next.run(req).await
        }
        (false, Some(Err(resp))) => {
            state.metrics.api_unauthorized.inc();
            resp
        }
        (false, None) => {
            state.metrics.api_unauthorized.inc();
            let mut resp = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (see api.token in the data directory)",
            );
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            resp
        }
    }
}

/// Refuses requests that did not come from a local client of this API:
/// a `Host` other than the API's own loopback address (DNS rebinding: a
/// web page whose name now resolves to 127.0.0.1) and any `Origin` other
/// than the API itself (a web page's cross-origin request). Both answer
/// 403 before the token is checked; the token is still required after.
async fn same_host(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let Some(host) = host.filter(|h| host_allowed(&state.api_addr, h)) else {
        state.metrics.api_unauthorized.inc();
        return error(
            StatusCode::FORBIDDEN,
            "the Host header does not name this API's loopback address",
        );
    };
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let same = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(|o| host_allowed(&state.api_addr, o) && o.eq_ignore_ascii_case(&host));
        if !same {
            state.metrics.api_unauthorized.inc();
            return error(StatusCode::FORBIDDEN, "cross-origin requests are refused");
        }
    }
    next.run(req).await
}

/// Whether `host` (a `Host` header: `name:port`) names the API bound at
/// `api_addr`: its own address, or `localhost`, `127.0.0.1` or `[::1]` with
/// its port.
fn host_allowed(api_addr: &str, host: &str) -> bool {
    if host.eq_ignore_ascii_case(api_addr) {
        return true;
    }
    let Some((_, port)) = api_addr.rsplit_once(':') else {
        return false;
    };
    let Some((name, given_port)) = host.rsplit_once(':') else {
        return false;
    };
    given_port == port
        && (name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1" || name == "[::1]")
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn stopped() -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "the node is shutting down")
}

async fn health() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

async fn status(State(state): State<AppState>) -> Response {
    match state.node.status().await {
        Ok(mut s) => {
            s.api_addr = state.api_addr.to_string();
            Json(s).into_response()
        }
        Err(_) => stopped(),
    }
}

async fn peers(State(state): State<AppState>) -> Response {
    match state.node.peers().await {
        Ok(p) => Json(p).into_response(),
        Err(_) => stopped(),
    }
}

async fn connect(
    State(state): State<AppState>,
    body: Result<Json<ConnectRequest>, JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let addr: libp2p::Multiaddr = match req.addr.parse() {
        Ok(a) => a,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{:?} is not a multiaddr: {e}", req.addr),
            );
        }
    };
    match state.node.connect(addr).await {
        Ok(r) => Json(r).into_response(),
        Err(ConnectError::Stopped) => stopped(),
        Err(e @ ConnectError::NoRoute) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// `POST /v1/mailbox/delete`: asks a holder to drop envelopes.
async fn mailbox_delete(
    State(state): State<AppState>,
    body: Result<Json<crate::types::MailboxDeleteRequest>, JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let holder: libp2p::PeerId = match req.holder.parse() {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{:?} is not a peer id: {e}", req.holder),
            );
        }
    };
    if req.ids.is_empty() || req.ids.len() > fogmesh_protocols::mailbox::wire::MAX_DELETE_IDS {
        return error(StatusCode::BAD_REQUEST, "give 1 to 64 envelope ids");
    }
    let mut ids = Vec::with_capacity(req.ids.len());
    for s in &req.ids {
        let mut b = [0u8; 16];
        if hex::decode_to_slice(s, &mut b).is_err() {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{s:?} is not an envelope id (32 hex digits)"),
            );
        }
        ids.push(fogmesh_protocols::mailbox::wire::Id(b));
    }
    match state.node.mailbox_delete(holder, ids).await {
        Ok(Ok(deleted)) => Json(crate::types::MailboxDeleteResponse { deleted }).into_response(),
        Ok(Err(e)) => error(StatusCode::BAD_GATEWAY, e),
        Err(_) => stopped(),
    }
}

async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = state.node.subscribe();
    let stream = BroadcastStream::new(rx)
        .map(|item| {
            let ev = match item {
                Ok(ev) => ev,
                Err(BroadcastStreamRecvError::Lagged(missed)) => NodeEvent::Lagged { missed },
            };
            let data = serde_json::to_string(&ev).unwrap_or_else(|_| "{}".into());
            Ok(Event::default().data(data))
        })
        .take_until(state.shutdown.cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// The one mapping of a service's answer to HTTP: the value as JSON, or
/// `{"error"}` with the status that fits the error's kind.
fn service_result<T: Serialize>(r: Result<T, ServiceError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => {
            let status = match &e {
                ServiceError::NotFound(_) => StatusCode::NOT_FOUND,
                ServiceError::BadRequest(_) => StatusCode::BAD_REQUEST,
                ServiceError::Forbidden(_) => StatusCode::FORBIDDEN,
                ServiceError::Busy | ServiceError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            error(status, e.to_string())
        }
    }
}

/// Unwraps a JSON body or answers 400 with the parser's message.
macro_rules! body {
    ($b:expr) => {
        match $b {
            Ok(Json(v)) => v,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
        }
    };
}

async fn groups_list(State(s): State<AppState>) -> Response {
    service_result(s.node.groups().list().await)
}

async fn groups_create(
    State(s): State<AppState>,
    b: Result<Json<CreateGroup>, JsonRejection>,
) -> Response {
    let req = body!(b);
    service_result(s.node.groups().create(req).await)
}

async fn groups_show(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    service_result(s.node.groups().show(&id).await)
}

async fn groups_add(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    b: Result<Json<MemberRequest>, JsonRejection>,
) -> Response {
    let req = body!(b);
    service_result(s.node.groups().add_member(&id, &req.peer_id).await)
}

async fn groups_remove(
    State(s): State<AppState>,
    UrlPath((id, peer)): UrlPath<(String, String)>,
) -> Response {
    service_result(s.node.groups().remove_member(&id, &peer).await)
}

async fn groups_leave(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    service_result(s.node.groups().leave(&id).await)
}

async fn groups_invites(State(s): State<AppState>) -> Response {
    service_result(s.node.groups().invites().await)
}

async fn groups_accept(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    service_result(s.node.groups().accept(&id).await)
}

async fn groups_decline(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    service_result(s.node.groups().decline(&id).await)
}

#[derive(Debug, Deserialize)]
struct MessagesQuery {
    limit: Option<usize>,
}

async fn groups_messages(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<MessagesQuery>,
) -> Response {
    service_result(s.node.groups().messages(&id, q.limit).await)
}

async fn groups_post(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    b: Result<Json<PostMessage>, JsonRejection>,
) -> Response {
    let req = body!(b);
    service_result(s.node.groups().send(&id, req.text).await)
}

#[derive(Debug, Deserialize)]
struct DmQuery {
    peer: Option<String>,
    limit: Option<usize>,
}

async fn dm_send(
    State(s): State<AppState>,
    b: Result<Json<SendDirect>, JsonRejection>,
) -> Response {
    let req = body!(b);
    service_result(s.node.messages().send(req).await)
}

async fn dm_list(State(s): State<AppState>, Query(q): Query<DmQuery>) -> Response {
    service_result(s.node.messages().list(q.peer.as_deref(), q.limit).await)
}

async fn dm_get(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    service_result(s.node.messages().get(&id).await)
}

async fn dm_outbox(State(s): State<AppState>) -> Response {
    service_result(s.node.messages().outbox().await)
}

/// Paths come from the CLI, which makes them absolute; a relative one would
/// be relative to wherever the daemon was started. (The error is the HTTP
/// answer itself, returned at once on a cold path: its size does not matter.)
#[allow(clippy::result_large_err)]
fn absolute(p: &str) -> Result<std::path::PathBuf, Response> {
    let path = std::path::PathBuf::from(p);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(error(
            StatusCode::BAD_REQUEST,
            format!("{p:?} is not an absolute path"),
        ))
    }
}

async fn files_list(State(s): State<AppState>) -> Response {
    service_result(s.node.files().list().await)
}

async fn files_share(
    State(s): State<AppState>,
    b: Result<Json<ShareFile>, JsonRejection>,
) -> Response {
    let req = body!(b);
    let path = match absolute(&req.path) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Some(group) = req.group else {
        return service_result(s.node.files().share(path, false).await);
    };
    // Shared with a group: check the group first (this node must be able to
    // post to it), then share encrypted, then post the link with its key.
    if let Err(e) = s.node.groups().show(&group).await {
        return service_result::<()>(Err(e));
    }
    let mut st = match s.node.files().share(path, true).await {
        Ok(st) => st,
        Err(e) => return service_result::<()>(Err(e)),
    };
    let name = req
        .path
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_whitespace())
        .take(128)
        .collect::<String>();
    let text = format!(
        "{} {} ({} bytes)",
        st.link.as_deref().unwrap_or_default(),
        name,
        st.bytes_total
    );
    match s.node.groups().send(&group, text).await {
        Ok(ack) => {
            st.name = Some(name);
            let mut v = serde_json::to_value(&st).unwrap_or_default();
            v["message_id"] = serde_json::json!(ack.id);
            Json(v).into_response()
        }
        Err(e) => service_result::<()>(Err(e)),
    }
}

async fn files_status(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    service_result(s.node.files().status(&id).await)
}

async fn files_cancel(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    service_result(s.node.files().cancel(&id).await)
}

async fn files_get(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    b: Result<Json<GetFile>, JsonRejection>,
) -> Response {
    let req = body!(b);
    let output = if req.output.is_empty() {
        s.web.download_path(&id).await
    } else {
        absolute(&req.output)
    };
    let output = match output {
        Ok(p) => p,
        Err(r) => return r,
    };
    service_result(s.node.files().get(&id, output, req.link.as_deref()).await)
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn only_loopback_names_of_the_apis_port_are_hosts() {
        let api = "127.0.0.1:7007";
        for ok in [
            "127.0.0.1:7007",
            "localhost:7007",
            "LocalHost:7007",
            "[::1]:7007",
        ] {
            assert!(host_allowed(api, ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:7007",
            "127.0.0.1:7008",
            "localhost",
            "127.0.0.1",
            "localhost.evil.example:7007",
            "",
        ] {
            assert!(!host_allowed(api, bad), "{bad}");
        }
        assert!(host_allowed("[::1]:9", "[::1]:9"));
    }
}
