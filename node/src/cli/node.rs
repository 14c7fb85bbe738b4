//! The node's own commands: `id` (which needs no daemon), `status`,
//! `peers`, `connect`, `events`.

use std::io;
use std::path::Path;

use anyhow::Context;
use clap::Subcommand;
use libp2p::Multiaddr;

use super::output::{self, Human, Names, Output, StdoutClosed, plural, short};
use crate::client::Client;
use crate::types::{ConnectRequest, ConnectResponse, NodeEvent, PeerInfo, Status};

#[derive(Debug, Subcommand)]
pub(super) enum NodeCommand {
    /// Show the running node's status.
    Status,
    /// List connected peers (exit 1 when there are none).
    Peers,
    /// Connect to a peer.
    Connect {
        /// The peer's multiaddr, e.g. /ip4/192.0.2.1/tcp/7373/p2p/12D3Koo...
        #[arg(value_name = "MULTIADDR")]
        addr: Multiaddr,
    },
    /// Follow the node's events until interrupted.
    Events,
}

/// `fogmesh id`: reads (or creates) the identity; no daemon needed.
pub(super) fn id(data_dir: &Path, out: Output) -> anyhow::Result<()> {
    let key = crate::identity::load_or_create(data_dir)?;
    let peer_id = key.public().to_peer_id().to_base58();
    // No API answers this one, so the JSON is the CLI's own.
    out.show(&serde_json::json!({ "peer_id": peer_id }), |w, _| {
        writeln!(w, "{peer_id}")
    })
}

/// Runs a node command against the daemon.
pub(super) async fn run(client: Client, cmd: NodeCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::Status => {
            let status: Status = client.get("status").await?;
            out.show(&status, write_status)
        }
        NodeCommand::Peers => {
            let peers: Vec<PeerInfo> = client.get("peers").await?;
            out.list(&peers, write_peer, "connected peers")
        }
        NodeCommand::Connect { addr } => {
            let request = ConnectRequest {
                addr: addr.to_string(),
            };
            let r: ConnectResponse = client
                .post("connect", &request)
                .await
                .with_context(|| format!("cannot connect to {addr}"))?;
            out.show(&r, |w, r| {
                writeln!(w, "connected to {} via {}", r.peer_id, r.route)
            })
        }
        NodeCommand::Events => events(&client, out).await,
    }
}

/// Prints events as they come, until stdout's reader goes away (exit 0) or
/// the daemon stops (an error: exit 3).
async fn events(client: &Client, out: Output) -> anyhow::Result<()> {
    let mut events = client.events().await?;
    let names = super::names(client, out).await;
    let closed = output::closed();
    tokio::pin!(closed);
    loop {
        tokio::select! {
            ev = events.next_or_stopped() => {
                let ev = ev?;
                out.item(&ev, |w, ev| writeln!(w, "{}", describe(ev, &names)))?;
            }
            () = &mut closed => return Err(StdoutClosed.into()),
        }
    }
}

fn write_status(w: Human<'_>, s: &Status) -> io::Result<()> {
    writeln!(w, "peer_id:   {}", s.peer_id)?;
    writeln!(w, "version:   {}", s.version)?;
    writeln!(w, "api:       {}", s.api_addr)?;
    writeln!(
        w,
        "peers:     {} connected, {} in routing table",
        s.connected_peers, s.routing_table_peers
    )?;
    writeln!(w, "routes:    {}", s.routes.join(", "))?;
    writeln!(
        w,
        "reach:     {} (kademlia {}{})",
        s.reachability,
        s.kad_mode,
        if s.relay_server {
            ", relaying for others"
        } else {
            ""
        }
    )?;
    for a in &s.external_addrs {
        writeln!(w, "external:  {a}")?;
    }
    for a in &s.relayed_addrs {
        writeln!(w, "relayed:   {a}")?;
    }
    if let Some(b) = &s.ble {
        writeln!(
            w,
            "ble:       device {}, {} heard, {}",
            b.device,
            plural(b.neighbours, "neighbour", "neighbours"),
            plural(b.links, "link", "links")
        )?;
    }
    writeln!(w, "uptime:    {} s", s.uptime_secs)?;
    write_mailbox_status(w, &s.mailbox)?;
    for a in &s.listen_addrs {
        writeln!(w, "listen:    {a}")?;
    }
    Ok(())
}

/// What the node holds for others as a mailbox holder.
fn write_mailbox_status(w: Human<'_>, m: &crate::types::MailboxStatus) -> io::Result<()> {
    if m.enabled {
        writeln!(
            w,
            "mailbox:   holding {} envelopes, {} of {} bytes, for others",
            m.envelopes, m.bytes, m.quota_bytes
        )
    } else {
        writeln!(
            w,
            "mailbox:   off (--no-mailbox); still holding {} envelopes",
            m.envelopes
        )
    }
}

fn write_peer(w: Human<'_>, p: &PeerInfo) -> io::Result<()> {
    let rtt = p
        .rtt_ms
        .map(|r| format!("{r:.1} ms"))
        .unwrap_or_else(|| "-".into());
    writeln!(
        w,
        "{}  {:<6} {:<7} {:>9}  {}",
        p.peer_id,
        p.transport,
        if p.relayed { "relayed" } else { "direct" },
        rtt,
        p.addrs.join(" ")
    )
}

/// One event as a line for a human.
fn describe(ev: &NodeEvent, names: &Names) -> String {
    match ev {
        NodeEvent::ListenAddr { addr } => format!("listening on {addr}"),
        NodeEvent::PeerConnected {
            peer_id,
            addr,
            transport,
            direction,
        } => format!("connected {peer_id} ({direction}, {transport}, {addr})"),
        NodeEvent::PeerDisconnected { peer_id } => format!("disconnected {peer_id}"),
        NodeEvent::PeerDiscovered { peer_id, via, .. } => format!("discovered {peer_id} via {via}"),
        NodeEvent::GroupMessage {
            group_id,
            sender,
            text,
            timestamp,
            ..
        } => format!(
            "{}  [{}] {}: {}",
            output::local_time(*timestamp),
            short(group_id),
            names.peer(sender),
            output::one_line(text)
        ),
        NodeEvent::GroupUpdated { group_id, member } => format!(
            "group {} updated ({})",
            short(group_id),
            if *member {
                "this node is a member"
            } else {
                "this node is not a member"
            }
        ),
        NodeEvent::DirectMessage {
            from,
            text,
            timestamp,
            ..
        } => format!(
            "{}  [dm] {}: {}",
            output::local_time(*timestamp),
            names.peer(from),
            output::one_line(text)
        ),
        NodeEvent::DirectMessageState {
            id,
            to,
            state,
            route,
        } => match route {
            Some(r) => format!("[dm {}] to {}: {state} by {r}", short(id), names.peer(to)),
            None => format!("[dm {}] to {}: {state}", short(id), names.peer(to)),
        },
        NodeEvent::GroupInvite {
            group_id,
            name,
            inviter,
        } => format!(
            "invited to group {} ({name:?}) by {}",
            short(group_id),
            names.peer(inviter)
        ),
        NodeEvent::Lagged { missed } => format!("(missed {missed} events)"),
        NodeEvent::MailDeposited { id, to, holders } => format!(
            "[dm {}] to {to}: deposited with {} mailbox holder(s)",
            short(id),
            holders.len()
        ),
        NodeEvent::MailPickedUp { holder, count } => {
            format!("picked up {count} envelope(s) of mail from {holder}")
        }
    }
}
