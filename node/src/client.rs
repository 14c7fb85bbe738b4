//! The client side of the local API, used by the CLI's client commands and
//! the benchmarks. It finds the running daemon from the data directory alone
//! (`api.json` and `api.token`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{ENDPOINT_FILE, Endpoint, TOKEN_FILE};
use crate::types::{ApiError, NodeEvent};

/// Why a request to the daemon did not give an answer; the CLI maps each
/// kind to its exit code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No daemon runs on the data directory, or it does not answer at the
    /// address it wrote there.
    #[error("{0}")]
    NotRunning(String),
    /// The daemon stopped while a stream (events, `--follow`) was open.
    #[error("the fogmesh daemon stopped")]
    Stopped,
    /// The daemon has no such object (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The daemon refused the request as malformed or not allowed (HTTP
    /// 4xx): its message says why.
    #[error("{0}")]
    Refused(String),
    /// The daemon failed or was too busy (HTTP 5xx).
    #[error("{msg} (HTTP {status})")]
    Failed {
        /// What it said.
        msg: String,
        /// The status code.
        status: u16,
    },
}

/// A client of one daemon's API.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    /// Finds the daemon running on `data_dir`.
    pub fn from_data_dir(data_dir: &Path) -> anyhow::Result<Self> {
        let not_running = || {
            ClientError::NotRunning(format!(
                "no fogmesh daemon is running on data directory {} (start one with `fogmesh run --data-dir {}`)",
                data_dir.display(),
                data_dir.display()
            ))
        };
        let endpoint_path: PathBuf = data_dir.join(ENDPOINT_FILE);
        let text = match std::fs::read_to_string(&endpoint_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_running().into()),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", endpoint_path.display()));
            }
        };
        let endpoint: Endpoint = serde_json::from_str(&text)
            .with_context(|| format!("{} is corrupt", endpoint_path.display()))?;
        let token_path = data_dir.join(TOKEN_FILE);
        let token = std::fs::read_to_string(&token_path)
            .with_context(|| format!("cannot read the API token {}", token_path.display()))?
            .trim()
            .to_owned();
        Ok(Self::new(&endpoint.addr, token))
    }

    /// A client for the API at `addr` (`host:port`) with `token`.
    pub fn new(addr: &str, token: String) -> Self {
        Client {
            base: format!("http://{addr}"),
            token,
            // The API is on loopback: never through a proxy (HTTP_PROXY
            // would receive the bearer token).
            http: reqwest::Client::builder()
                .no_proxy()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
        }
    }

    /// `GET /v1/{path}`, decoded as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self.send(self.http.get(self.url(path))).await?;
        decode(resp).await
    }

    /// `POST /v1/{path}` with a JSON body, decoded as `T`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let resp = self.send(self.http.post(self.url(path)).json(body)).await?;
        decode(resp).await
    }

    /// `DELETE /v1/{path}`, decoded as `T`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self.send(self.http.delete(self.url(path))).await?;
        decode(resp).await
    }

    /// Subscribes to `/v1/events`. The subscription exists when this
    /// returns: events that happen afterwards are all in the stream (unless
    /// the reader falls so far behind that the daemon drops some, which it
    /// reports with a `lagged` event).
    pub async fn events(&self) -> anyhow::Result<EventStream> {
        let resp = self.send(self.http.get(self.url("events"))).await?;
        if !resp.status().is_success() {
            decode::<serde_json::Value>(resp).await?;
            bail!("the daemon refused the event stream");
        }
        Ok(EventStream {
            resp,
            buf: Vec::new(),
        })
    }

    /// Follows `/v1/events`, calling `f` for each event until the stream
    /// ends (the daemon stopped).
    pub async fn follow_events(&self, mut f: impl FnMut(NodeEvent)) -> anyhow::Result<()> {
        let mut events = self.events().await?;
        while let Some(ev) = events.next().await? {
            f(ev);
        }
        Ok(())
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{}", self.base, path)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        req.bearer_auth(&self.token).send().await.map_err(|e| {
            if e.is_connect() {
                ClientError::NotRunning(format!(
                    "cannot reach the fogmesh daemon at {} (is it running?)",
                    self.base
                ))
                .into()
            } else {
                anyhow!("request to the daemon failed: {e}")
            }
        })
    }
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> anyhow::Result<T> {
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .context("cannot read the daemon's answer")?;
    if !status.is_success() {
        let msg = serde_json::from_slice::<ApiError>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        return Err(match status.as_u16() {
            404 => ClientError::NotFound(msg),
            s @ 400..=499 => ClientError::Refused(if msg.trim().is_empty() {
                format!("the daemon refused the request (HTTP {s})")
            } else {
                msg
            }),
            s => ClientError::Failed { msg, status: s },
        }
        .into());
    }
    serde_json::from_slice(&bytes).context("the daemon's answer is not what this client expects")
}

/// The daemon's events, as [`Client::events`] subscribed to them.
#[derive(Debug)]
pub struct EventStream {
    resp: reqwest::Response,
    /// Bytes received and not yet parsed (at most one line, bounded by
    /// [`MAX_EVENT_LINE`]).
    buf: Vec<u8>,
}

/// The longest event line accepted from the daemon.
const MAX_EVENT_LINE: usize = 1 << 20;

impl EventStream {
    /// The next event; `None` when the daemon ended the stream (it
    /// stopped; [`next_or_stopped`](Self::next_or_stopped) makes that an
    /// error). Events this client does not know are skipped.
    ///
    /// Cancel-safe: dropping the future loses no event (received bytes
    /// stay buffered in `self`).
    pub async fn next(&mut self) -> anyhow::Result<Option<NodeEvent>> {
        loop {
            while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if let Some(ev) = parse_event_line(&line) {
                    return Ok(Some(ev));
                }
            }
            if self.buf.len() > MAX_EVENT_LINE {
                bail!("event stream sent a line over 1 MiB");
            }
            match self.resp.chunk().await.context("event stream broken")? {
                Some(chunk) => self.buf.extend_from_slice(&chunk),
                None => return Ok(None),
            }
        }
    }
}

impl EventStream {
    /// The next event; the daemon stopping (the stream ending, or breaking
    /// as when the daemon was killed) is [`ClientError::Stopped`].
    /// Cancel-safe, as [`next`](Self::next).
    pub async fn next_or_stopped(&mut self) -> anyhow::Result<NodeEvent> {
        match self.next().await {
            Ok(Some(ev)) => Ok(ev),
            Ok(None) => Err(ClientError::Stopped.into()),
            // The connection broke (not a bad line): the daemon is gone.
            Err(e) if e.chain().any(|c| c.is::<reqwest::Error>()) => {
                tracing::debug!("event stream: {e:#}");
                Err(ClientError::Stopped.into())
            }
            Err(e) => Err(e),
        }
    }
}

/// Server-sent events: lines; `data:` carries the JSON (one document per
/// data line here); other lines (blank ones, keep-alive comments) carry
/// nothing.
fn parse_event_line(line: &[u8]) -> Option<NodeEvent> {
    let line = String::from_utf8_lossy(line);
    let data = line.trim_end().strip_prefix("data:")?;
    match serde_json::from_str::<NodeEvent>(data.trim_start()) {
        Ok(ev) => Some(ev),
        Err(e) => {
            tracing::debug!("skipping an event this client does not know: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines() {
        let ev = parse_event_line(b"data: {\"type\":\"lagged\",\"missed\":3}\n");
        assert_eq!(ev, Some(NodeEvent::Lagged { missed: 3 }));
        assert_eq!(parse_event_line(b":keep-alive\n"), None);
        assert_eq!(parse_event_line(b"\n"), None);
        assert_eq!(
            parse_event_line(b"data: {\"type\":\"from_the_future\"}\n"),
            None
        );
    }
}
