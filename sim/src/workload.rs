//! What the nodes are asked to do, through each node's own handle as the
//! local API would drive it: node 0 creates the group, the members learn
//! of it, and the planned messages are sent at their times.

use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail};
use fogmesh::types::{CreateGroup, SendDirect};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::clock::{ModelClock, wall};
use crate::collector::Taps;
use crate::plan::{Plan, PlannedMessage};
use crate::scenario::{BleLayout, Scenario};
use crate::world::World;

/// How long the members may take to learn of the group (model time).
const JOIN_DEADLINE_SECS: f64 = 300.0;
/// How often a member that has not said it joined is asked directly.
const ASK_EVERY: Duration = Duration::from_secs(5);

/// Node 0 creates the group of `members` (node 0 first); returns its id.
pub async fn create_group(world: &World, name: &str, members: &[usize]) -> anyhow::Result<String> {
    let admin = world
        .handle(0)
        .ok_or_else(|| anyhow!("node 0 not running"))?;
    let others = (members.iter().skip(1))
        .map(|i| world.peer_id(*i).to_base58())
        .collect();
    let group = CreateGroup {
        name: name.chars().take(64).collect(),
        description: String::new(),
        members: others,
    };
    let ack = admin
        .groups()
        .create(group)
        .await
        .map_err(|e| anyhow!("cannot create the group: {e}"))?;
    Ok(ack.group_id)
}

/// Waits until every member knows group `gid`. Members report joining on
/// their event streams; asking a node directly (a call through its actor)
/// is only the fallback, every 5 s.
pub async fn wait_for_members(
    world: &World,
    taps: &Taps,
    gid: &str,
    members: &[usize],
    dilation: f64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + wall(JOIN_DEADLINE_SECS, dilation);
    let mut waiting: Vec<usize> = members.iter().copied().filter(|i| *i != 0).collect();
    let mut last_ask = Instant::now();
    let mut last_said = Instant::now();
    let total = waiting.len();
    loop {
        let joined = taps.joined();
        waiting.retain(|i| !joined.contains(i));
        // A large group's set-up takes minutes: say how far it is.
        if last_said.elapsed() >= crate::world::PROGRESS_EVERY {
            let (peers_mean, peers_max) = world.peers_now().await;
            last_said = Instant::now();
            tracing::info!(
                joined = total - waiting.len(),
                total,
                peers_mean,
                peers_max,
                "members that know the group"
            );
        }
        if !waiting.is_empty() && last_ask.elapsed() >= ASK_EVERY {
            last_ask = Instant::now();
            waiting = still_unaware(world, gid, waiting).await;
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} members never learned of the group: {:?}",
                waiting.len(),
                &waiting[..waiting.len().min(10)]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Those of `nodes` whose actor does not know group `gid` (a stopped node
/// is left out: it cannot be asked).
async fn still_unaware(world: &World, gid: &str, nodes: Vec<usize>) -> Vec<usize> {
    let mut unaware = Vec::new();
    for i in nodes {
        let Some(handle) = world.handle(i) else {
            continue;
        };
        let known = handle.groups().show(gid).await;
        if known.is_err() {
            unaware.push(i);
        }
    }
    unaware
}

/// How one `group send` or direct `send` went.
#[derive(Debug)]
pub struct PublishOutcome {
    /// The publishing node.
    pub publisher: usize,
    /// When `group send` was called.
    pub at: Instant,
    /// The same, by the wall clock (for the event log).
    pub time: SystemTime,
    /// The text's size.
    pub size: usize,
    /// The recipient of a direct message (`None`: a group message).
    pub to: Option<usize>,
    /// The message id, or why there is none.
    pub result: Result<String, String>,
}

/// Sends every planned message at its model time, each from its own task:
/// a group message to group `gid`, a direct message (one with a
/// recipient) through the sender's messages handle. The outcomes arrive on
/// the returned channel, which closes after the last. The texts are random
/// letters drawn from `seed`. `private`: direct messages are sent
/// privately (the onion route).
pub fn publish_all(
    world: &World,
    messages: &[PlannedMessage],
    gid: &str,
    clock: ModelClock,
    seed: u64,
    private: bool,
) -> mpsc::UnboundedReceiver<PublishOutcome> {
    // Unbounded, but holding at most one outcome per planned message.
    let (outcomes, rx) = mpsc::unbounded_channel();
    for (m, text) in messages.iter().zip(texts(messages, seed)) {
        let Some(handle) = world.handle(m.publisher) else {
            continue;
        };
        let (due, gid, outcomes) = (clock.at(m.t_ms), gid.to_owned(), outcomes.clone());
        let (publisher, size, to) = (m.publisher, m.size, m.to);
        let to_peer = to.map(|i| world.peer_id(i).to_base58());
        tokio::spawn(async move {
            tokio::time::sleep_until(due).await;
            let (at, time) = (Instant::now(), SystemTime::now());
            let result = match to_peer {
                Some(peer) => handle
                    .messages()
                    .send(SendDirect {
                        to: peer,
                        text,
                        route: None,
                        private,
                    })
                    .await
                    .map(|ack| ack.message_id)
                    .map_err(|e| e.to_string()),
                None => handle
                    .groups()
                    .send(&gid, text)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|ack| ack.id.ok_or_else(|| "no id".to_owned())),
            };
            let _ = outcomes.send(PublishOutcome {
                publisher,
                at,
                time,
                size,
                to,
                result,
            });
        });
    }
    rx
}

/// The text of each planned message: random letters drawn from `seed`,
/// one message after the other (the Shadow driver draws the same).
pub fn texts(messages: &[PlannedMessage], seed: u64) -> impl Iterator<Item = String> + '_ {
    let mut text_rng = StdRng::seed_from_u64(seed ^ 0x7e57);
    messages.iter().map(move |m| {
        (0..m.size)
            .map(|_| text_rng.random_range(b'a'..=b'z') as char)
            .collect()
    })
}

/// Completes each direct message's record with what its sender says of it
/// now: state, delivering route and attempts (a sender that is down, or a
/// message it cannot find, leaves the record as it is).
pub async fn sender_view(world: &World, direct: &mut [crate::record::DirectRecord]) {
    for d in direct {
        let Some(handle) = world.handle(d.from) else {
            continue;
        };
        match handle.messages().get(&d.id).await {
            Ok(m) => {
                d.state = m.state;
                d.route = m.route.or(d.route.take());
                d.attempts = m.attempts.map_or(0, |a| a.len());
            }
            Err(e) => tracing::warn!(node = d.from, id = %d.id, "cannot read a sent message: {e}"),
        }
        if let Some(handle) = world.handle(d.to) {
            d.in_recipient_record = handle.messages().get(&d.id).await.is_ok();
        }
    }
}

/// The class of a direct message from `from` to `to` (see
/// [`crate::record::DirectRecord::class`]).
pub fn direct_class(s: &Scenario, plan: &Plan, from: usize, to: usize) -> String {
    let node = |i: usize| &plan.topology.nodes[i];
    let kind = |i: usize| match node(i).transports.as_str() {
        "internet+ble" => "gateway",
        "ble" => "ble",
        _ => "internet",
    };
    let mut class = format!("{}->{}", kind(from), kind(to));
    let island = |i: usize| {
        let b = s.ble.as_ref().filter(|b| b.layout == BleLayout::Islands)?;
        let [x, _] = node(i).position?;
        Some((x / b.island_gap_m).round() as i64)
    };
    if let (Some(a), Some(b)) = (island(from), island(to)) {
        class.push_str(if a == b {
            " (same island)"
        } else {
            " (other island)"
        });
    }
    class
}
