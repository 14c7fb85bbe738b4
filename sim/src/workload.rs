//! What the nodes are asked to do, through each node's own handle as the
//! local API would drive it: node 0 creates the group, the members learn
//! of it, and the planned messages are sent at their times.

use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail};
use fogmesh::types::CreateGroup;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::clock::{ModelClock, wall};
use crate::collector::Taps;
use crate::plan::PlannedMessage;
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
    loop {
        let joined = taps.joined();
        waiting.retain(|i| !joined.contains(i));
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

/// How one `group send` went.
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
    /// The message id, or why there is none.
    pub result: Result<String, String>,
}

/// Sends every planned message at its model time, each from its own task;
/// the outcomes arrive on the returned channel, which closes after the
/// last. The texts are random letters drawn from `seed`.
pub fn publish_all(
    world: &World,
    messages: &[PlannedMessage],
    gid: &str,
    clock: ModelClock,
    seed: u64,
) -> mpsc::UnboundedReceiver<PublishOutcome> {
    // Unbounded, but holding at most one outcome per planned message.
    let (outcomes, rx) = mpsc::unbounded_channel();
    let mut text_rng = StdRng::seed_from_u64(seed ^ 0x7e57);
    for m in messages {
        let Some(handle) = world.handle(m.publisher) else {
            continue;
        };
        let text: String = (0..m.size)
            .map(|_| text_rng.random_range(b'a'..=b'z') as char)
            .collect();
        let (due, gid, outcomes) = (clock.at(m.t_ms), gid.to_owned(), outcomes.clone());
        let (publisher, size) = (m.publisher, m.size);
        tokio::spawn(async move {
            tokio::time::sleep_until(due).await;
            let (at, time) = (Instant::now(), SystemTime::now());
            let result = handle
                .groups()
                .send(&gid, text)
                .await
                .map_err(|e| e.to_string())
                .and_then(|ack| ack.id.ok_or_else(|| "no id".to_owned()));
            let _ = outcomes.send(PublishOutcome {
                publisher,
                at,
                time,
                size,
                result,
            });
        });
    }
    rx
}
