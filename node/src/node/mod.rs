//! The running node: one task owns the Swarm; everything else talks to it.
//!
//! A cloneable [`NodeHandle`] sends [`Command`]s over a bounded channel;
//! each carries a oneshot for its reply, and replies that wait on the
//! network are kept in maps keyed by the id the swarm gave back (a dial's
//! `ConnectionId`, a request's `OutboundRequestId`, a query's `QueryId`).
//! What happens in the node leaves as [`NodeEvent`]s on a broadcast
//! channel.
//!
//! The event loop ([`event_loop`]) only dispatches. Each concern keeps its
//! state and handlers in a module of its own:
//! - [`peers`]: connections, dials, identify and ping, the peer table;
//! - [`discovery`]: Kademlia's routing table and mDNS;
//! - [`ble`]: BLE neighbours found by the radio, and which to dial;
//! - [`nat`]: reachability (AutoNAT), the Kademlia mode that follows,
//!   relay reservations, the relay server's status, hole punching;
//! - [`groups_net`] and [`files_net`]: the network side of the groups and
//!   files actors (gossip, request-response, provider records), with every
//!   outbound request tracked by its id and its failure reported back.
//!
//! Slow work never runs in the loop: the actors run on threads of their
//! own ([`crate::actor`]), peer records are written by a writer thread.
//! Every outbound dial, publish and request asks the routing [`Policy`]
//! first.
//!
//! [`Policy`]: fogmesh_protocols::policy::Policy

mod ble;
mod discovery;
mod event_loop;
mod exchange;
mod files_net;
mod groups_net;
mod mailbox_net;
mod messages_net;
mod nat;
mod onion_net;
mod peers;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use fogmesh_ble::Radio;
use fogmesh_protocols::policy::Reachability;
use libp2p::core::transport::ListenerId;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId, Swarm};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::behaviour::{Behaviour, KadMode, NatConfig};
use crate::files::{self, FilesConfig, FilesHandle};
use crate::groups::{self, GroupsConfig, GroupsHandle};
use crate::messages::{self, MessagesConfig, MessagesHandle};
use crate::metrics::NodeMetrics;
use crate::storage::Store;
use crate::types::{ConnectResponse, NodeEvent, PeerInfo, Status};

pub use peers::transport_kind;

/// Capacity of the command channel: callers wait when the loop is busy.
const COMMAND_QUEUE: usize = 256;
/// Capacity of the event broadcast: slow subscribers miss events (and are
/// told so) rather than hold memory.
const EVENT_QUEUE: usize = 1024;
/// How often the node checks, by default, that it has enough peers.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(15);
/// How long `start` waits for the listeners to report their addresses.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the event loop needs besides the swarm.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start.
    pub bootstrap: Vec<Multiaddr>,
    /// Below this many connected peers, discovered peers are dialled.
    pub min_peers: usize,
    /// Which routes this node has.
    pub reachability: Reachability,
    /// Group chat settings.
    pub groups: GroupsConfig,
    /// File sharing settings.
    pub files: FilesConfig,
    /// Direct message settings.
    pub messages: MessagesConfig,
    /// Mailbox settings.
    pub mailbox: crate::mailbox::MailboxConfig,
    /// How often the node checks that it has enough peers
    /// ([`MAINTENANCE_INTERVAL`] by default).
    pub maintenance_interval: Duration,
    /// The BLE radio, when BLE is on: the node listens on it, scans for
    /// neighbours and dials them.
    pub ble: Option<Arc<dyn Radio>>,
    /// Relays to reserve a slot on (`--relay`, each ending in
    /// `/p2p/<relay>`).
    pub relays: Vec<Multiaddr>,
    /// Kademlia's mode (`--kad-mode`).
    pub kad_mode: KadMode,
    /// Kademlia's bucket size (the behaviour's).
    pub kad_bucket_size: usize,
    /// AutoNAT and relay settings (the behaviour's).
    pub nat: NatConfig,
    /// The onion route's settings (used when `reachability.onion`).
    pub onion: crate::onion::OnionConfig,
}

/// Why a connect failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The policy found no route that is up for this peer.
    #[error("no route to the peer is up")]
    NoRoute,
    /// The dial failed.
    #[error("dial failed: {0}")]
    Dial(String),
    /// The node is shutting down.
    #[error("the node is shutting down")]
    Stopped,
}

/// A request to the event loop.
#[derive(Debug)]
enum Command {
    Status(oneshot::Sender<Status>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Connect {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<ConnectResponse, ConnectError>>,
    },
    MailboxDelete {
        holder: PeerId,
        ids: Vec<fogmesh_protocols::mailbox::wire::Id>,
        reply: oneshot::Sender<Result<u32, String>>,
    },
}

/// A cloneable handle to a running node.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    peer_id: PeerId,
    groups: GroupsHandle,
    files: FilesHandle,
    messages: MessagesHandle,
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<NodeEvent>,
}

impl NodeHandle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The node's status. Cancel-safe.
    pub async fn status(&self) -> Result<Status, ConnectError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Status(tx)).await?;
        rx.await.map_err(|_| ConnectError::Stopped)
    }

    /// The connected peers. Cancel-safe.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, ConnectError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Peers(tx)).await?;
        rx.await.map_err(|_| ConnectError::Stopped)
    }

    /// Dials `addr` and waits until the connection is up or has failed.
    /// Cancelling the future does not cancel the dial.
    pub async fn connect(&self, addr: Multiaddr) -> Result<ConnectResponse, ConnectError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Connect { addr, reply: tx }).await?;
        rx.await.map_err(|_| ConnectError::Stopped)?
    }

    /// Asks mailbox holder `holder` to drop envelopes `ids`; answers how
    /// many it dropped (it drops only this node's: addressed to it or
    /// deposited by it).
    pub async fn mailbox_delete(
        &self,
        holder: PeerId,
        ids: Vec<fogmesh_protocols::mailbox::wire::Id>,
    ) -> Result<Result<u32, String>, ConnectError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::MailboxDelete {
            holder,
            ids,
            reply: tx,
        })
        .await?;
        rx.await.map_err(|_| ConnectError::Stopped)
    }

    /// The group chat actor.
    pub fn groups(&self) -> &GroupsHandle {
        &self.groups
    }

    /// The file sharing actor.
    pub fn files(&self) -> &FilesHandle {
        &self.files
    }

    /// The direct messages actor.
    pub fn messages(&self) -> &MessagesHandle {
        &self.messages
    }

    /// Subscribes to the node's events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    async fn send(&self, cmd: Command) -> Result<(), ConnectError> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| ConnectError::Stopped)
    }
}

/// A node whose listeners are up, and the task that runs it.
#[derive(Debug)]
pub struct RunningNode {
    /// Handle for the API and other clients.
    pub handle: NodeHandle,
    /// The addresses the node listens on (known when `start` returns).
    pub listen_addrs: Vec<Multiaddr>,
    /// The event loop; it ends after `shutdown` is cancelled, once its
    /// pending database writes are flushed and its actors have stopped.
    pub task: tokio::task::JoinHandle<()>,
}

/// The node's event channel, made before the node starts so that a
/// subscriber taken from it sees every event (the event log needs the
/// first connections, made while the node starts).
pub(crate) fn event_channel() -> broadcast::Sender<NodeEvent> {
    broadcast::channel(EVENT_QUEUE).0
}

/// Starts the actors, listens, restores known peers, dials the bootstrap
/// peers and spawns the event loop, sending its events on `events` (from
/// [`event_channel`]). Returns once every listener has reported an
/// address. (Nodes are assembled by [`crate::builder::NodeBuilder`], which
/// calls this.)
#[allow(clippy::too_many_arguments)]
pub(crate) async fn start(
    key: Keypair,
    mut swarm: Swarm<Behaviour>,
    store: Store,
    cfg: NodeConfig,
    metrics: NodeMetrics,
    libp2p_metrics: libp2p::metrics::Metrics,
    events: broadcast::Sender<NodeEvent>,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningNode> {
    let peer_id = *swarm.local_peer_id();
    let listeners = listen(&mut swarm, &cfg)?;

    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let onion_key = key.clone();
    let mut actors = start_actors(key, &store, &cfg, &events, &metrics, &shutdown)?;
    if cfg.reachability.onion {
        // The onion task and its Sphinx thread end on their own at
        // shutdown (the task with the token, the thread once its queue's
        // senders are gone): nothing to join.
        let control = swarm.behaviour().mix.inner().new_control();
        let (handle, _thread) = crate::onion::start(
            onion_key,
            control,
            actors.messages.clone(),
            metrics.onion.clone(),
            cfg.onion.clone(),
            shutdown.clone(),
        )?;
        actors.messages_net.onion = onion_net::OnionNet::new(handle);
    }
    let (peer_book, writer) = peers::PeerBook::start(store.clone(), metrics.clone())?;
    let mut el = event_loop::EventLoop::new(
        swarm,
        event_loop::Parts {
            commands: cmd_rx,
            events: events.clone(),
            metrics,
            libp2p_metrics,
            reachability: cfg.reachability,
            min_peers: cfg.min_peers,
            kad_bucket_size: cfg.kad_bucket_size,
            maintenance_interval: cfg.maintenance_interval,
            peers: peer_book,
            groups: actors.groups_net,
            files: actors.files_net,
            messages: actors.messages_net,
            mailbox: actors.mailbox_net,
            ble: cfg
                .ble
                .as_ref()
                .map(|r| ble::BleNet::new(r.clone(), &peer_id)),
            nat: nat::NatNet::new(cfg.kad_mode, cfg.nat.clone(), cfg.relays.clone()),
        },
    );

    let to_dial = known_peers(&mut el, &store, &cfg, peer_id).await?;
    el.wait_listening(listeners).await?;
    for (peer, addrs) in to_dial {
        el.dial_known(peer, addrs);
    }
    // Circuit listeners report an address only once a relay accepts:
    // they are not among the listeners waited for above.
    el.start_nat();
    let listen_addrs: Vec<Multiaddr> = el.listen_addrs();

    let handle = NodeHandle {
        peer_id,
        groups: actors.groups,
        files: actors.files,
        messages: actors.messages,
        commands: cmd_tx,
        events,
    };
    let [groups_thread, files_thread, messages_thread, mailbox_thread] = actors.threads;
    let task = tokio::spawn(run(
        el,
        shutdown,
        [
            ("peer writer", writer),
            groups_thread,
            files_thread,
            messages_thread,
            mailbox_thread,
        ],
    ));
    Ok(RunningNode {
        handle,
        listen_addrs,
        task,
    })
}

/// The actors, the network side of each, and their threads.
struct Actors {
    groups: GroupsHandle,
    files: FilesHandle,
    messages: MessagesHandle,
    groups_net: groups_net::GroupsNet,
    files_net: files_net::FilesNet,
    messages_net: messages_net::MessagesNet,
    mailbox_net: mailbox_net::MailboxNet,
    threads: [(&'static str, std::thread::JoinHandle<()>); 4],
}

/// Starts the groups and files actors, each with the command channel its
/// network side reads.
fn start_actors(
    key: Keypair,
    store: &Store,
    cfg: &NodeConfig,
    events: &broadcast::Sender<NodeEvent>,
    metrics: &NodeMetrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<Actors> {
    let peer_id = key.public().to_peer_id();
    let (net_tx, net_rx) = mpsc::channel(COMMAND_QUEUE);
    let (dm_tx, dm_rx) = mpsc::channel(COMMAND_QUEUE);
    let (mb_tx, mb_rx) = mpsc::channel(COMMAND_QUEUE);
    let mut messages_cfg = cfg.messages.clone();
    messages_cfg.mailbox_after = cfg.mailbox.deposit_after;
    let (messages, messages_thread) = messages::start(
        key.clone(),
        store.clone(),
        dm_tx,
        events.clone(),
        cfg.reachability,
        messages_cfg,
        Some(mb_tx),
        shutdown.clone(),
    )?;
    let (holder, mailbox_thread) =
        crate::mailbox::start(peer_id, store.clone(), &cfg.mailbox, shutdown.clone())?;
    let (groups, groups_thread) = groups::start(
        key,
        store.clone(),
        net_tx,
        events.clone(),
        metrics.clone(),
        cfg.groups.clone(),
        shutdown.clone(),
    )?;
    let (file_tx, file_rx) = mpsc::channel(COMMAND_QUEUE);
    let (files, files_thread) = files::start(
        peer_id,
        store.clone(),
        file_tx,
        metrics.clone(),
        cfg.files.clone(),
        shutdown.clone(),
    )?;
    Ok(Actors {
        groups_net: groups_net::GroupsNet::new(groups.clone(), net_rx),
        files_net: files_net::FilesNet::new(files.clone(), file_rx),
        messages_net: messages_net::MessagesNet::new(messages.clone(), dm_rx, peer_id),
        mailbox_net: mailbox_net::MailboxNet::new(
            peer_id,
            holder,
            mb_rx,
            messages.clone(),
            cfg.mailbox.recheck,
            cfg.mailbox.pickup,
        ),
        groups,
        files,
        messages,
        threads: [
            ("groups", groups_thread),
            ("files", files_thread),
            ("messages", messages_thread),
            ("mailbox", mailbox_thread),
        ],
    })
}

/// Starts a listener on every configured address (and the radio's).
fn listen(swarm: &mut Swarm<Behaviour>, cfg: &NodeConfig) -> anyhow::Result<HashSet<ListenerId>> {
    let radio = cfg.ble.as_ref().map(|_| fogmesh_ble::listen_addr());
    let mut listeners = HashSet::new();
    for addr in cfg.listen.iter().chain(radio.as_ref()) {
        let id = swarm
            .listen_on(addr.clone())
            .with_context(|| format!("cannot listen on {addr}"))?;
        listeners.insert(id);
    }
    Ok(listeners)
}

/// The node's task: the event loop until shutdown, then the threads it fed,
/// in order. Dropping the loop closes the peer writer's queue and the
/// actors' mailboxes; each drains what it holds before it ends, so nothing
/// queued is lost.
async fn run<const N: usize>(
    mut el: event_loop::EventLoop,
    shutdown: CancellationToken,
    threads: [(&'static str, std::thread::JoinHandle<()>); N],
) {
    el.run(shutdown).await;
    drop(el);
    for (name, t) in threads {
        if !matches!(
            tokio::task::spawn_blocking(move || t.join()).await,
            Ok(Ok(()))
        ) {
            tracing::error!("the {name} thread panicked");
        }
    }
}

/// The peers to dial at start: remembered ones first (most recent first,
/// as many as `min_peers`), then the bootstrap list. Each is also added to
/// Kademlia's routing table.
async fn known_peers(
    el: &mut event_loop::EventLoop,
    store: &Store,
    cfg: &NodeConfig,
    local: PeerId,
) -> anyhow::Result<Vec<(PeerId, Vec<Multiaddr>)>> {
    let remembered = tokio::task::spawn_blocking({
        let store = store.clone();
        move || {
            if let Err(e) = store.prune_peers() {
                tracing::warn!("cannot prune the peer table: {e}");
            }
            store.peers()
        }
    })
    .await
    .context("peer table task failed")??;
    let mut to_dial: Vec<(PeerId, Vec<Multiaddr>)> = Vec::new();
    for (peer, rec) in remembered {
        if peer == local || rec.addrs.is_empty() {
            continue;
        }
        el.add_kad_addresses(&peer, &rec.addrs);
        to_dial.push((peer, rec.addrs));
    }
    let restored = to_dial.len();
    to_dial.truncate(cfg.min_peers.max(1));
    for addr in &cfg.bootstrap {
        let Some(peer) = crate::storage::last_peer(addr) else {
            bail!("bootstrap address {addr} does not end with /p2p/<peer id>");
        };
        if peer == local {
            tracing::warn!(%addr, "ignoring a bootstrap address of this very node");
            continue;
        }
        let transport = crate::storage::strip_p2p(addr);
        el.keep(peer, transport.clone());
        el.add_kad_addresses(&peer, std::slice::from_ref(&transport));
        to_dial.push((peer, vec![transport]));
    }
    tracing::info!(
        restored,
        bootstrap = cfg.bootstrap.len(),
        "dialling known peers"
    );
    Ok(to_dial)
}
