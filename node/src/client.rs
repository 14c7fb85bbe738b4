//! The client side of the local API, used by the CLI's client commands. It
//! finds the running daemon from the data directory alone (`api.json` and
//! `api.token`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{ENDPOINT_FILE, Endpoint, TOKEN_FILE};
use crate::types::{ApiError, NodeEvent};

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
            anyhow!(
                "no fogmesh daemon is running on data directory {} (start one with `fogmesh run --data-dir {}`)",
                data_dir.display(),
                data_dir.display()
            )
        };
        let endpoint_path: PathBuf = data_dir.join(ENDPOINT_FILE);
        let text = match std::fs::read_to_string(&endpoint_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_running()),
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
            http: reqwest::Client::builder()
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

    /// Follows `/v1/events`, calling `f` for each event until the stream
    /// ends (the daemon stopped).
    pub async fn follow_events(&self, mut f: impl FnMut(NodeEvent)) -> anyhow::Result<()> {
        let resp = self.send(self.http.get(self.url("events"))).await?;
        if !resp.status().is_success() {
            return decode::<serde_json::Value>(resp).await.map(|_| ());
        }
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.context("event stream broken")?;
            buf.extend_from_slice(&chunk);
            // Server-sent events: lines, `data:` carries the JSON, a blank
            // line ends an event. One JSON document per data line here.
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line);
                if let Some(data) = line.trim_end().strip_prefix("data:") {
                    match serde_json::from_str::<NodeEvent>(data.trim_start()) {
                        Ok(ev) => f(ev),
                        Err(e) => {
                            tracing::debug!("skipping an event this client does not know: {e}")
                        }
                    }
                }
            }
            if buf.len() > 1 << 20 {
                bail!("event stream sent a line over 1 MiB");
            }
        }
        Ok(())
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{}", self.base, path)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        req.bearer_auth(&self.token).send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "cannot reach the fogmesh daemon at {} (is it running?)",
                    self.base
                )
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
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(crate::cli::NothingFound(msg).into());
        }
        bail!("{msg} (HTTP {})", status.as_u16());
    }
    serde_json::from_slice(&bytes).context("the daemon's answer is not what this client expects")
}
