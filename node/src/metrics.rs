//! Prometheus metrics: libp2p's own (bandwidth, swarm, identify, kad, ping)
//! plus the node's counters, served as text on `--metrics HOST:PORT`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use libp2p::metrics::Registry;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

/// The node's own counters, registered under the `fogmesh` prefix.
#[derive(Debug, Clone, Default)]
pub struct NodeMetrics {
    /// Peers with at least one connection.
    pub connected_peers: Gauge,
    /// Dials that failed.
    pub dial_failures: Counter,
    /// Peers discovered through mDNS or Kademlia.
    pub peers_discovered: Counter,
    /// Peer records written to the database.
    pub peer_records_written: Counter,
    /// Requests served by the local API.
    pub api_requests: Counter,
    /// API requests refused for a missing or wrong token.
    pub api_unauthorized: Counter,
    /// Group messages delivered to the application.
    pub group_messages_delivered: Counter,
    /// Gossiped group messages or ops rejected as invalid (the forwarding
    /// peer is penalized).
    pub group_messages_rejected: Counter,
    /// Gossiped group messages dropped by the per-sender rate limit.
    pub group_messages_rate_limited: Counter,
    /// Group messages received through sync (catch-up) rather than gossip.
    pub group_messages_synced: Counter,
    /// Group sync requests sent.
    pub group_sync_requests: Counter,
    /// File chunk bytes sent to peers.
    pub file_bytes_uploaded: Counter,
    /// Verified new file chunk bytes received.
    pub file_bytes_downloaded: Counter,
    /// File chunks that failed verification (discarded, fetched again).
    pub file_chunks_corrupt: Counter,
    /// Direct-message envelopes this node sent to a peer: its own attempts
    /// and receipts (one per hop they were handed to) and the copies it
    /// relayed.
    pub dm_envelopes_sent: Counter,
    /// Of those, the copies relayed for others (BLE flooding, gateways).
    pub dm_envelopes_relayed: Counter,
    /// The onion route's counters (`fogmesh_onion_*`).
    pub onion: crate::onion::OnionMetrics,
}

impl NodeMetrics {
    /// Creates the counters and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = NodeMetrics::default();
        let r = registry.sub_registry_with_prefix("fogmesh");
        r.register(
            "connected_peers",
            "Peers with at least one connection",
            m.connected_peers.clone(),
        );
        r.register(
            "dial_failures",
            "Outgoing dials that failed",
            m.dial_failures.clone(),
        );
        r.register(
            "peers_discovered",
            "Peers discovered through mDNS or Kademlia",
            m.peers_discovered.clone(),
        );
        r.register(
            "peer_records_written",
            "Peer records written to the database",
            m.peer_records_written.clone(),
        );
        r.register(
            "api_requests",
            "Requests served by the local API",
            m.api_requests.clone(),
        );
        r.register(
            "api_unauthorized",
            "API requests refused for a missing or wrong token",
            m.api_unauthorized.clone(),
        );
        r.register(
            "group_messages_delivered",
            "Group messages delivered to the application",
            m.group_messages_delivered.clone(),
        );
        r.register(
            "group_messages_rejected",
            "Gossiped group messages or ops rejected as invalid",
            m.group_messages_rejected.clone(),
        );
        r.register(
            "group_messages_rate_limited",
            "Gossiped group messages dropped by the per-sender rate limit",
            m.group_messages_rate_limited.clone(),
        );
        r.register(
            "group_messages_synced",
            "Group messages received through sync",
            m.group_messages_synced.clone(),
        );
        r.register(
            "group_sync_requests",
            "Group sync requests sent",
            m.group_sync_requests.clone(),
        );
        r.register(
            "file_bytes_uploaded",
            "File chunk bytes sent to peers",
            m.file_bytes_uploaded.clone(),
        );
        r.register(
            "file_bytes_downloaded",
            "Verified new file chunk bytes received",
            m.file_bytes_downloaded.clone(),
        );
        r.register(
            "file_chunks_corrupt",
            "File chunks that failed verification",
            m.file_chunks_corrupt.clone(),
        );
        r.register(
            "dm_envelopes_sent",
            "Direct-message envelopes sent to peers (attempts, receipts, relayed copies)",
            m.dm_envelopes_sent.clone(),
        );
        r.register(
            "dm_envelopes_relayed",
            "Direct-message envelopes relayed for others",
            m.dm_envelopes_relayed.clone(),
        );
        m.onion.register(r);
        m
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                if encode(&mut body, &registry).is_err() {
                    return (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        "encoding failed",
                    )
                        .into_response();
                }
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                )
                    .into_response()
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Binds the metrics listener, with a clear error when the address is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))
}
