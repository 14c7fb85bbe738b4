//! `fogmesh group ...`: create groups, manage their members, send and read
//! messages (`--follow` keeps reading as new ones are delivered).

use std::collections::HashSet;
use std::io;

use clap::Subcommand;

use super::output::{self, Human, Names, Output, StdoutClosed, plural};
use crate::client::Client;
use crate::types::{
    CreateGroup, GroupAck, GroupInfo, GroupInvite, GroupMessage, MemberRequest, NodeEvent,
    PostMessage,
};

/// How many of the latest messages are fetched to find the one an event
/// announced (it is among the newest).
const FOLLOW_WINDOW: usize = 64;

#[derive(Debug, Subcommand)]
pub(super) enum GroupCommand {
    /// Create a group; this node is its admin.
    Create {
        /// The group's name (at most 64 bytes). Not end-to-end encrypted:
        /// it is in the group's first op, which members (and peers invited)
        /// receive over the encrypted transport and keep.
        name: String,
        /// A member to add (repeatable).
        #[arg(long = "member", value_name = "PEER_ID")]
        members: Vec<String>,
        /// A description (at most 512 bytes).
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the groups this node knows (exit 1 when none).
    List,
    /// Show one group.
    Show {
        /// The group id.
        group_id: String,
    },
    /// Add a member (admin only).
    Add {
        /// The group id.
        group_id: String,
        /// The peer to add.
        peer_id: String,
    },
    /// Remove a member and rotate the group key (admin only).
    Remove {
        /// The group id.
        group_id: String,
        /// The peer to remove.
        peer_id: String,
    },
    /// Leave a group.
    Leave {
        /// The group id.
        group_id: String,
    },
    /// Send a message; returns once it is durable locally.
    Send {
        /// The group id.
        group_id: String,
        /// The text (at most 64 KiB).
        text: String,
    },
    /// Print delivered messages, in delivery (causal) order.
    Messages {
        /// The group id.
        group_id: String,
        /// Only the last N.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Keep printing new messages as they arrive.
        #[arg(long)]
        follow: bool,
    },
    /// List invitations to groups, waiting for accept or decline (exit 1
    /// when none).
    Invites,
    /// Accept an invitation: the node joins the group.
    Accept {
        /// The group id.
        group_id: String,
    },
    /// Decline an invitation: it is forgotten and the group's later
    /// invitations are ignored.
    Decline {
        /// The group id.
        group_id: String,
    },
}

/// Runs a group command against the daemon.
pub(super) async fn run(client: Client, cmd: GroupCommand, out: Output) -> anyhow::Result<()> {
    let ack = |a: GroupAck| out.show(&a, write_ack);
    match cmd {
        GroupCommand::Create {
            name,
            members,
            description,
        } => {
            let request = CreateGroup {
                name,
                description,
                members,
            };
            let a: GroupAck = client.post("groups", &request).await?;
            out.show(&a, |w, a| writeln!(w, "{}", a.group_id))
        }
        GroupCommand::List => {
            let groups: Vec<GroupInfo> = client.get("groups").await?;
            out.list(&groups, write_group_line, "groups")
        }
        GroupCommand::Show { group_id } => {
            let group: GroupInfo = client.get(&format!("groups/{group_id}")).await?;
            out.show(&group, write_group)
        }
        GroupCommand::Add { group_id, peer_id } => {
            let path = format!("groups/{group_id}/members");
            ack(client.post(&path, &MemberRequest { peer_id }).await?)
        }
        GroupCommand::Remove { group_id, peer_id } => ack(client
            .delete(&format!("groups/{group_id}/members/{peer_id}"))
            .await?),
        GroupCommand::Leave { group_id } => {
            let path = format!("groups/{group_id}/leave");
            ack(client.post(&path, &serde_json::json!({})).await?)
        }
        GroupCommand::Send { group_id, text } => {
            let path = format!("groups/{group_id}/messages");
            ack(client.post(&path, &PostMessage { text }).await?)
        }
        GroupCommand::Messages {
            group_id,
            limit,
            follow: false,
        } => {
            let msgs: Vec<GroupMessage> = client.get(&messages_path(&group_id, limit)).await?;
            let names = super::names(&client, out).await;
            out.show(&msgs, |w, msgs| {
                msgs.iter()
                    .try_for_each(|m| write_message(&mut *w, m, &names))
            })
        }
        GroupCommand::Messages {
            group_id,
            limit,
            follow: true,
        } => follow(&client, &group_id, limit, out).await,
        GroupCommand::Invites => {
            let invites: Vec<GroupInvite> = client.get("groups/invites").await?;
            let names = super::names(&client, out).await;
            out.list(&invites, |w, i| write_invite(w, i, &names), "invitations")
        }
        GroupCommand::Accept { group_id } => {
            let path = format!("groups/{group_id}/accept");
            ack(client.post(&path, &serde_json::json!({})).await?)
        }
        GroupCommand::Decline { group_id } => {
            let path = format!("groups/{group_id}/decline");
            ack(client.post(&path, &serde_json::json!({})).await?)
        }
    }
}

fn write_invite(w: Human<'_>, i: &GroupInvite, names: &Names) -> io::Result<()> {
    writeln!(
        w,
        "{}  {:<20} from {} at {}{}",
        i.group_id,
        output::one_line(&i.name),
        names.peer(&i.inviter),
        output::local_time(i.received),
        if i.accepted { " (accepted)" } else { "" }
    )
}

/// `group messages --follow`: the history, then each new delivery, one
/// item at a time, until stdout's reader goes away (exit 0) or the daemon
/// stops (an error: exit 3).
async fn follow(
    client: &Client,
    group_id: &str,
    limit: Option<usize>,
    out: Output,
) -> anyhow::Result<()> {
    // Subscribe first, then print the history, then new deliveries,
    // skipping what the history already showed: nothing falls in between.
    let mut events = client.events().await?;
    let names = super::names(client, out).await;
    let write = |w: Human<'_>, m: &GroupMessage| write_message(w, m, &names);
    let history: Vec<GroupMessage> = client.get(&messages_path(group_id, limit)).await?;
    let mut seen: HashSet<String> = history.iter().map(|m| m.id.clone()).collect();
    for m in &history {
        out.item(m, write)?;
    }
    let closed = output::closed();
    tokio::pin!(closed);
    loop {
        let ev = tokio::select! {
            ev = events.next_or_stopped() => ev?,
            () = &mut closed => return Err(StdoutClosed.into()),
        };
        if let NodeEvent::GroupMessage {
            group_id: g, id, ..
        } = &ev
            && g == group_id
            && seen.insert(id.clone())
        {
            // The event is short; the stored record has the sequence
            // number and the dependencies.
            let latest: Vec<GroupMessage> = client
                .get(&messages_path(group_id, Some(FOLLOW_WINDOW)))
                .await?;
            for m in latest.iter().filter(|m| m.id == *id) {
                out.item(m, write)?;
            }
        }
    }
}

fn messages_path(group_id: &str, limit: Option<usize>) -> String {
    match limit {
        Some(n) => format!("groups/{group_id}/messages?limit={n}"),
        None => format!("groups/{group_id}/messages"),
    }
}

fn write_ack(w: Human<'_>, a: &GroupAck) -> io::Result<()> {
    // The message id for a post, else the group id.
    writeln!(w, "{}", a.id.as_deref().unwrap_or(&a.group_id))
}

fn write_group_line(w: Human<'_>, g: &GroupInfo) -> io::Result<()> {
    writeln!(
        w,
        "{}  {:<20} {}, epoch {}",
        g.group_id,
        output::one_line(&g.name),
        plural(g.members.len(), "member", "members"),
        g.epoch
    )
}

fn write_group(w: Human<'_>, g: &GroupInfo) -> io::Result<()> {
    writeln!(w, "group_id:    {}", g.group_id)?;
    writeln!(w, "name:        {}", output::one_line(&g.name))?;
    writeln!(w, "description: {}", output::one_line(&g.description))?;
    writeln!(w, "admin:       {}", g.admin)?;
    writeln!(w, "epoch:       {}", g.epoch)?;
    writeln!(
        w,
        "this node:   {}",
        if g.is_member {
            "a member"
        } else {
            "not a member (left or removed)"
        }
    )?;
    // Full ids: they are what `group remove` and `send` take.
    let label = ["members:", ""];
    for (i, m) in g.members.iter().enumerate() {
        writeln!(w, "{:<12} {m}", label[usize::from(i > 0)])?;
    }
    if g.members.is_empty() {
        writeln!(w, "members:     -")?;
    }
    Ok(())
}

fn write_message(w: Human<'_>, m: &GroupMessage, names: &Names) -> io::Result<()> {
    writeln!(
        w,
        "{}  {}: {}",
        output::local_time(m.timestamp),
        names.peer(&m.sender),
        output::one_line(&m.text)
    )
}
