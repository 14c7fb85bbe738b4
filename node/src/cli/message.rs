//! `fogmesh send`, `fogmesh messages`, `fogmesh outbox`: direct messages
//! to one peer, each over the route the policy (or the user) picks.

use std::collections::HashSet;
use std::io;

use clap::Subcommand;

use super::output::{self, Human, Names, Output, StdoutClosed, plural};
use crate::client::Client;
use crate::types::{DirectAck, DirectMessage, NodeEvent, SendDirect};

#[derive(Debug, Subcommand)]
pub(super) enum MessageCommand {
    /// Send a direct message; returns once it is durable locally, whether
    /// or not the peer is reachable now (it waits in the outbox).
    Send {
        /// The recipient.
        peer_id: String,
        /// The text (at most 64 KiB).
        text: String,
        /// Force a route: it waits for that route rather than take another.
        #[arg(long, default_value = "auto", value_parser = ["auto", "internet", "ble", "onion"])]
        route: String,
        /// Only a privacy (onion) route may carry it.
        #[arg(long)]
        private: bool,
    },
    /// Print direct messages (with one peer, or all), both directions, in
    /// delivery order (exit 1 when none).
    Messages {
        /// Only the conversation with this peer.
        peer_id: Option<String>,
        /// Only the last N.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Keep printing new messages and state changes as they happen.
        #[arg(long)]
        follow: bool,
    },
    /// Outgoing direct messages not yet delivered: state, next attempt and
    /// why they wait (exit 1 when none).
    Outbox,
    /// Ask a mailbox holder to drop envelopes (their ids are in `outbox
    /// --json`'s `mailbox.envelope_ids`); it drops only this node's: those
    /// addressed to it or deposited by it. Prints how many it dropped.
    MailboxDelete {
        /// The holder's peer id.
        holder: String,
        /// Envelope ids (32 hex digits each).
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// Runs a direct-message command against the daemon.
pub(super) async fn run(client: Client, cmd: MessageCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        MessageCommand::Send {
            peer_id,
            text,
            route,
            private,
        } => {
            let req = SendDirect {
                to: peer_id,
                text,
                route: Some(route),
                private,
            };
            let ack: DirectAck = client.post("messages", &req).await?;
            out.show(&ack, |w, a| {
                writeln!(w, "{}", a.message_id)?;
                let plan = if a.route_plan.is_empty() {
                    "none".to_owned()
                } else {
                    a.route_plan.join(" then ")
                };
                // A hint for the human, on stderr: stdout is the id alone.
                match &a.waiting {
                    Some(why) => eprintln!("route plan: {plan}; waiting: {why}"),
                    None => eprintln!("route plan: {plan}"),
                }
                Ok(())
            })
        }
        MessageCommand::Messages {
            peer_id,
            limit,
            follow: false,
        } => {
            let msgs: Vec<DirectMessage> =
                client.get(&list_path(peer_id.as_deref(), limit)).await?;
            let names = super::names(&client, out).await;
            out.list(&msgs, |w, m| write_message(w, m, &names), "messages")
        }
        MessageCommand::Messages {
            peer_id,
            limit,
            follow: true,
        } => follow(&client, peer_id.as_deref(), limit, out).await,
        MessageCommand::Outbox => {
            let msgs: Vec<DirectMessage> = client.get("outbox").await?;
            let names = super::names(&client, out).await;
            out.list(&msgs, |w, m| write_outbox(w, m, &names), "messages waiting")
        }
        MessageCommand::MailboxDelete { holder, ids } => {
            let req = crate::types::MailboxDeleteRequest { holder, ids };
            let r: crate::types::MailboxDeleteResponse =
                client.post("mailbox/delete", &req).await?;
            out.show(&r, |w, r| writeln!(w, "{}", r.deleted))
        }
    }
}

/// `messages --follow`: the history, then each new message and each state
/// change of an outgoing one, until stdout's reader goes away (exit 0) or
/// the daemon stops (an error: exit 3).
async fn follow(
    client: &Client,
    peer: Option<&str>,
    limit: Option<usize>,
    out: Output,
) -> anyhow::Result<()> {
    let mut events = client.events().await?;
    let names = super::names(client, out).await;
    let write = |w: Human<'_>, m: &DirectMessage| write_message(w, m, &names);
    let history: Vec<DirectMessage> = client.get(&list_path(peer, limit)).await?;
    let mut seen: HashSet<(String, Option<String>)> = HashSet::new();
    for m in &history {
        seen.insert((m.id.clone(), m.state.clone()));
        out.item(m, write)?;
    }
    let closed = output::closed();
    tokio::pin!(closed);
    loop {
        let ev = tokio::select! {
            ev = events.next_or_stopped() => ev?,
            () = &mut closed => return Err(StdoutClosed.into()),
        };
        let (id, other) = match &ev {
            NodeEvent::DirectMessage { id, from, .. } => (id, from),
            NodeEvent::DirectMessageState { id, to, .. } => (id, to),
            _ => continue,
        };
        if peer.is_some_and(|p| p != other) {
            continue;
        }
        let m: DirectMessage = client.get(&format!("messages/{id}")).await?;
        if seen.insert((m.id.clone(), m.state.clone())) {
            out.item(&m, write)?;
        }
    }
}

fn list_path(peer: Option<&str>, limit: Option<usize>) -> String {
    let mut q = Vec::new();
    if let Some(p) = peer {
        q.push(format!("peer={p}"));
    }
    if let Some(n) = limit {
        q.push(format!("limit={n}"));
    }
    if q.is_empty() {
        "messages".into()
    } else {
        format!("messages?{}", q.join("&"))
    }
}

fn write_message(w: Human<'_>, m: &DirectMessage, names: &Names) -> io::Result<()> {
    match m.direction.as_str() {
        "out" => {
            let state = m.state.as_deref().unwrap_or("?");
            let how = match &m.route {
                Some(r) => format!("{state} by {r}"),
                None => state.to_owned(),
            };
            writeln!(
                w,
                "{}  -> {}: {}  [{how}]",
                output::local_time(m.timestamp),
                names.peer(&m.to),
                output::one_line(&m.text)
            )
        }
        _ => writeln!(
            w,
            "{}  <- {}: {}",
            output::local_time(m.timestamp),
            names.peer(&m.from),
            output::one_line(&m.text)
        ),
    }
}

fn write_outbox(w: Human<'_>, m: &DirectMessage, names: &Names) -> io::Result<()> {
    let state = m.state.as_deref().unwrap_or("?");
    let tries = m.attempts.as_ref().map_or(0, Vec::len);
    let why = output::one_line(m.waiting.as_deref().unwrap_or(""));
    writeln!(
        w,
        "{}  to {}  {state}, {}, next at {}  {why}",
        m.id,
        names.peer(&m.to),
        plural(tries, "attempt", "attempts"),
        m.next_attempt.map_or("-".to_owned(), output::local_time),
    )?;
    write_deposit(w, m)
}

/// Where a waiting message was deposited, under its outbox line.
fn write_deposit(w: Human<'_>, m: &DirectMessage) -> io::Result<()> {
    let Some(d) = &m.mailbox else {
        return Ok(());
    };
    if !d.holders.is_empty() {
        writeln!(w, "    deposited with {}", d.holders.join(", "))?;
    }
    if let Some(note) = &d.note {
        writeln!(w, "    mailbox: {}", output::one_line(note))?;
    }
    Ok(())
}
