//! The event log: one NDJSON line format for what a node saw of group
//! messages, in the style of the gossipsub-interop harness. Two writers
//! use it: `fogmesh run --event-log FILE` (so that real binaries run under
//! the Shadow network simulator log like the simulator does) and
//! `fogmesh-sim`'s `events.ndjson`, which adds the two optional fields.
//!
//! One JSON object per line ([`Line`]):
//!
//! | field | always | meaning |
//! |---|---|---|
//! | `time` | yes | the host's wall clock when the event happened, RFC 3339 in UTC with microseconds (`2025-01-31T12:00:00.123456Z`); under Shadow, Shadow's simulated clock |
//! | `msg` | yes | what happened ([`Msg`]): `PeerID`, `Received Message`, `Delivered Message`, `Duplicate Delivery`, `Published Message`, `Peer Connected`, `Peer Disconnected` (and the mix traces below) |
//! | `id` | yes | for `PeerID` the node's peer id (base58), for `Peer Connected` and `Peer Disconnected` the other peer's, otherwise the group message id (hex SHA-256 of the signed envelope) |
//! | `direction` | no | `Peer Connected` only: `inbound` (the peer dialled) or `outbound` |
//! | `t_ms` | no | model milliseconds since the simulator's workload started (negative before it); only in `fogmesh-sim`'s log |
//! | `node` | no | the node's index in the simulated network; only in `fogmesh-sim`'s log, which holds every node's lines |
//!
//! The values of `msg`:
//! - `PeerID`: once per node, when the log starts;
//! - `Received Message`: a copy of a group message arrived on the wire,
//!   duplicates included (seen through gossipsub's data transform, which
//!   runs before its duplicate check); membership ops are not logged;
//! - `Delivered Message`: a message from another member reached the
//!   application (through gossip or sync), the first time;
//! - `Duplicate Delivery`: the application got a message it had already
//!   delivered (must never happen; only the simulator checks for it);
//! - `Published Message`: the node published the message. `--event-log`
//!   writes it when the node has stored its own message (before
//!   `group send` returns); the simulator when it called `group send`;
//! - `Peer Connected` and `Peer Disconnected` (only with `--event-log`):
//!   the first connection to a peer opened, the last one to it closed
//!   (so the lines before a time give the peers connected then, as the
//!   node's status counts them);
//! - `Mix Sent` and `Mix Relayed` (research traces of the onion route,
//!   only with `--event-log`; see [`MixFields`]): a packet this node built
//!   left for its first hop (`id`: what it carries, the direct message's id,
//!   `reply` or `cover`), or a packet this node relayed left its delay
//!   queue (`id`: the packet's hash as it arrived). With the `mix` field.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fogmesh_protocols::groups::gossip::{GossipFrame, decode_gossip};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::behaviour::GossipObserver;
use crate::types::NodeEvent;

/// What a line reports (its `msg` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// The node's peer id, once when the log starts.
    #[serde(rename = "PeerID")]
    PeerId,
    /// A copy of a group message arrived on the wire (duplicates included).
    #[serde(rename = "Received Message")]
    Received,
    /// Another member's message reached the application, the first time.
    #[serde(rename = "Delivered Message")]
    Delivered,
    /// A message reached the application a second time (must not happen).
    #[serde(rename = "Duplicate Delivery")]
    DuplicateDelivery,
    /// The node published the message.
    #[serde(rename = "Published Message")]
    Published,
    /// The first connection to a peer opened.
    #[serde(rename = "Peer Connected")]
    PeerConnected,
    /// The last connection to a peer closed.
    #[serde(rename = "Peer Disconnected")]
    PeerDisconnected,
    /// A mix packet this node built left for its first hop.
    #[serde(rename = "Mix Sent")]
    MixSent,
    /// A mix packet this node relayed left its delay queue.
    #[serde(rename = "Mix Relayed")]
    MixRelayed,
}

/// The `mix` field of `Mix Sent` and `Mix Relayed` lines: enough to chain
/// one packet through the relays and to know which packets a relay held at
/// once. Packets are named by [`crate::onion::packet_hash`] (8 bytes of
/// SHA-256, hex), which is all a trace reveals of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MixFields {
    /// The packet's hash as it left this node.
    pub out: String,
    /// `Mix Relayed`: how long it stayed in the delay queue, µs (it
    /// entered at `time` minus this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_us: Option<u64>,
}

/// One line of the event log (see the module documentation for the exact
/// meaning of every field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// When it happened, by the host's clock (RFC 3339, microseconds).
    #[serde(with = "rfc3339_micros")]
    pub time: SystemTime,
    /// What happened.
    pub msg: Msg,
    /// The peer id (`PeerID`) or the group message id (hex).
    pub id: String,
    /// Model ms since the simulator's workload started (simulator only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t_ms: Option<f64>,
    /// The node's index in the simulated network (simulator only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<usize>,
    /// `Mix Sent` and `Mix Relayed` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mix: Option<MixFields>,
    /// `Peer Connected` only: who dialled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<crate::types::Direction>,
}

impl Line {
    /// A line without the simulator's fields.
    pub fn new(time: SystemTime, msg: Msg, id: impl Into<String>) -> Self {
        Line {
            time,
            msg,
            id: id.into(),
            t_ms: None,
            node: None,
            mix: None,
            direction: None,
        }
    }

    /// The line of a mix trace.
    pub fn of_mix(trace: &crate::onion::MixTrace) -> Self {
        use crate::onion::{MixOrigin, MixTrace};
        let now = (SystemTime::now(), std::time::Instant::now());
        let wall = |at: std::time::Instant| now.0 - now.1.saturating_duration_since(at);
        match trace {
            MixTrace::Sent { origin, packet, at } => {
                let id = match origin {
                    MixOrigin::Message(id) => id.as_str(),
                    MixOrigin::Reply => "reply",
                    MixOrigin::Cover => "cover",
                };
                Line {
                    mix: Some(MixFields {
                        out: packet.clone(),
                        held_us: None,
                    }),
                    ..Line::new(wall(*at), Msg::MixSent, id)
                }
            }
            MixTrace::Relayed {
                packet_in,
                packet_out,
                arrived,
                departed,
            } => Line {
                mix: Some(MixFields {
                    out: packet_out.clone(),
                    held_us: Some(departed.saturating_duration_since(*arrived).as_micros() as u64),
                }),
                ..Line::new(wall(*departed), Msg::MixRelayed, packet_in.as_str())
            },
        }
    }

    /// The same line with the simulator's fields.
    pub fn in_simulation(self, t_ms: f64, node: usize) -> Self {
        Line {
            t_ms: Some(t_ms),
            node: Some(node),
            ..self
        }
    }
}

/// `time` as RFC 3339 with microseconds, in UTC.
mod rfc3339_micros {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(*t))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}

/// Writes [`Line`]s to `out`, one JSON object and a newline each. Buffering
/// is `out`'s business (a `LineWriter` for a log that must be readable
/// while the node runs, a `BufWriter` for the simulator's one file).
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
}

impl<W: Write> Writer<W> {
    /// A writer of lines to `out`.
    pub fn new(out: W) -> Self {
        Writer { out }
    }

    /// Writes one line.
    pub fn write(&mut self, line: &Line) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, line)?;
        self.out.write_all(b"\n")
    }

    /// Flushes what `out` buffers.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The group message id (hex) of a gossip frame carrying a group message;
/// `None` for membership ops and for frames that do not decode.
pub fn received_message_id(data: &[u8]) -> Option<String> {
    match decode_gossip(data) {
        Ok(GossipFrame::Message(env)) => Some(hex::encode(env.id().0)),
        _ => None,
    }
}

/// A gossip observer (see [`crate::builder::NodeBuilder::observe_gossip`])
/// that calls `on_message(id, wire_size)` for every copy of a group
/// message received on the wire, duplicates included: the one place where
/// wire copies are recognised, for `--event-log` and the simulator alike.
pub fn observe_messages(
    on_message: impl Fn(String, usize) + Send + Sync + 'static,
) -> GossipObserver {
    Arc::new(move |data: &[u8]| {
        if let Some(id) = received_message_id(data) {
            on_message(id, data.len());
        }
    })
}

/// Why the event log could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventLogError {
    /// The file could not be opened or its first line not written.
    #[error("cannot open the event log {path}")]
    Open {
        /// The log's path.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// An open `--event-log` file. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EventLog {
    out: Arc<Mutex<Writer<io::LineWriter<File>>>>,
}

impl EventLog {
    /// Opens (appending) `path` and writes the `PeerID` line.
    pub fn open(path: &Path, peer: &PeerId) -> Result<Self, EventLogError> {
        let opened = || -> io::Result<Self> {
            let file = OpenOptions::new().create(true).append(true).open(path)?;
            let mut out = Writer::new(io::LineWriter::new(file));
            out.write(&Line::new(SystemTime::now(), Msg::PeerId, peer.to_base58()))?;
            Ok(EventLog {
                out: Arc::new(Mutex::new(out)),
            })
        };
        opened().map_err(|source| EventLogError::Open {
            path: path.to_owned(),
            source,
        })
    }

    fn write(&self, msg: Msg, id: &str) {
        self.write_line(&Line::new(SystemTime::now(), msg, id));
    }

    fn write_line(&self, line: &Line) {
        if let Ok(mut out) = self.out.lock() {
            // A full disk must not stop the node; the log is best effort.
            let _ = out.write(line);
        }
    }

    /// The onion route's tracer that logs `Mix Sent` and `Mix Relayed`.
    pub fn mix_tracer(&self) -> crate::onion::MixTracer {
        let log = self.clone();
        crate::onion::MixTracer(Arc::new(move |t| log.write_line(&Line::of_mix(&t))))
    }

    /// The gossip observer that logs `Received Message`.
    pub fn observer(&self) -> GossipObserver {
        let log = self.clone();
        observe_messages(move |id, _| log.write(Msg::Received, &id))
    }

    /// Logs deliveries and publishes (the node's own messages are its
    /// publishes) and peers connecting and leaving, from the node's event
    /// stream until it ends.
    pub async fn follow(self, mut events: broadcast::Receiver<NodeEvent>, local: PeerId) {
        let local = local.to_base58();
        loop {
            match events.recv().await {
                Ok(NodeEvent::GroupMessage { id, sender, .. }) => {
                    let msg = if sender == local {
                        Msg::Published
                    } else {
                        Msg::Delivered
                    };
                    self.write(msg, &id);
                }
                Ok(NodeEvent::PeerConnected {
                    peer_id, direction, ..
                }) => self.write_line(&Line {
                    direction: Some(direction),
                    ..Line::new(SystemTime::now(), Msg::PeerConnected, peer_id)
                }),
                Ok(NodeEvent::PeerDisconnected { peer_id }) => {
                    self.write(Msg::PeerDisconnected, &peer_id)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Both writers' lines parse back; the simulator's fields are optional
    /// and absent from the daemon's lines; `time` keeps its microseconds.
    #[test]
    fn lines_round_trip_with_and_without_the_simulator_fields() {
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456);
        let plain = Line::new(time, Msg::Received, "ab12");
        let sim = Line::new(time, Msg::Published, "cd34").in_simulation(-12.5, 7);
        let mut out = Writer::new(Vec::new());
        for line in [&plain, &sim] {
            assert!(out.write(line).is_ok());
        }
        let text = String::from_utf8(out.out).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            r#"{"time":"2023-11-14T22:13:20.123456Z","msg":"Received Message","id":"ab12"}"#
        );
        assert!(
            lines[1].contains(r#""t_ms":-12.5,"node":7"#),
            "{}",
            lines[1]
        );
        for (line, want) in lines.iter().zip([&plain, &sim]) {
            let back: Result<Line, _> = serde_json::from_str(line);
            assert_eq!(back.ok().as_ref(), Some(want));
        }
    }

    /// Mix traces become `Mix Sent` / `Mix Relayed` lines with the
    /// packet hashes and the time in the pool, and parse back; other lines
    /// carry no `mix` field.
    #[test]
    fn mix_traces_are_lines_with_hashes_and_pool_times() {
        use crate::onion::{MixOrigin, MixTrace, packet_hash};
        let departed = std::time::Instant::now();
        let arrived = departed - std::time::Duration::from_millis(42);
        let sent = Line::of_mix(&MixTrace::Sent {
            origin: MixOrigin::Cover,
            packet: packet_hash(b"a"),
            at: arrived,
        });
        let relayed = Line::of_mix(&MixTrace::Relayed {
            packet_in: packet_hash(b"a"),
            packet_out: packet_hash(b"b"),
            arrived,
            departed,
        });
        assert_eq!((sent.msg, sent.id.as_str()), (Msg::MixSent, "cover"));
        assert_eq!(packet_hash(b"a").len(), 16);
        assert_eq!(relayed.msg, Msg::MixRelayed);
        assert_eq!(relayed.id, packet_hash(b"a"));
        let mix = relayed.mix.clone().unwrap_or_else(|| MixFields {
            out: String::new(),
            held_us: None,
        });
        assert_eq!(mix.out, packet_hash(b"b"));
        assert_eq!(mix.held_us, Some(42_000));
        let text = serde_json::to_string(&relayed).unwrap_or_default();
        assert!(text.contains(r#""msg":"Mix Relayed""#), "{text}");
        // Back as it was, `time` to the microsecond.
        let back: Option<Line> = serde_json::from_str(&text).ok();
        let same = |l: &Line| (l.msg, l.id.clone(), l.mix.clone());
        assert_eq!(back.as_ref().map(same), Some(same(&relayed)));
        let gap = back.and_then(|b| relayed.time.duration_since(b.time).ok());
        assert!(gap.is_some_and(|g| g < std::time::Duration::from_micros(1)));
        let plain = serde_json::to_string(&Line::new(SystemTime::now(), Msg::Received, "x"));
        assert!(!plain.unwrap_or_default().contains("mix"));
    }

    #[test]
    fn only_group_messages_have_a_received_id() {
        assert_eq!(received_message_id(&[]), None);
        assert_eq!(received_message_id(&[0xff, 1, 2]), None);
    }
}
