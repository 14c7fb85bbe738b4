//! `--event-log FILE`: the node's NDJSON event log, in the style of the
//! gossipsub-interop harness, so that real `fogmesh` binaries run under the
//! Shadow network simulator produce the same events as `fogmesh-sim`.
//!
//! One JSON object per line with `time` (RFC 3339, the host's clock, which
//! Shadow controls) and `msg`:
//! - `PeerID` (`id`: this node's peer id), once at start;
//! - `Received Message` (`id`: the group message id), for every copy of a
//!   group message received on the wire, duplicates included;
//! - `Delivered Message` (`id`), when a message from another member is
//!   delivered to the application;
//! - `Published Message` (`id`), when this node posts one.

use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use fogmesh_protocols::groups::gossip::{GossipFrame, decode_gossip};
use libp2p::PeerId;
use tokio::sync::broadcast;

use crate::behaviour::GossipObserver;
use crate::types::NodeEvent;

/// An open event log. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EventLog {
    out: Arc<Mutex<LineWriter<File>>>,
}

impl EventLog {
    /// Opens (appending) `path` and writes the `PeerID` line.
    pub fn open(path: &Path, peer: &PeerId) -> anyhow::Result<Self> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the event log {}", path.display()))?;
        let log = EventLog {
            out: Arc::new(Mutex::new(LineWriter::new(f))),
        };
        log.write("PeerID", &peer.to_base58());
        Ok(log)
    }

    fn write(&self, msg: &str, id: &str) {
        let line = serde_json::json!({
            "time": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "msg": msg,
            "id": id,
        });
        if let Ok(mut out) = self.out.lock() {
            // A full disk must not stop the node; the log is best effort.
            let _ = writeln!(out, "{line}");
        }
    }

    /// The gossip observer that logs `Received Message`.
    pub fn observer(&self) -> GossipObserver {
        let log = self.clone();
        Arc::new(move |data: &[u8]| {
            if let Ok(GossipFrame::Message(env)) = decode_gossip(data) {
                log.write("Received Message", &hex::encode(env.id().0));
            }
        })
    }

    /// Logs deliveries and publishes from the node's event stream until it
    /// ends.
    pub async fn follow(self, mut events: broadcast::Receiver<NodeEvent>, local: PeerId) {
        let local = local.to_base58();
        loop {
            match events.recv().await {
                Ok(NodeEvent::GroupMessage { id, sender, .. }) => {
                    let msg = if sender == local {
                        "Published Message"
                    } else {
                        "Delivered Message"
                    };
                    self.write(msg, &id);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "event log fell behind; {n} events not logged");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    }
}
