//! The groups actor's handle: one typed async method per thing the API (or
//! the simulator) asks of the groups, and the event loop's way in.
//!
//! Group ids and peer ids are parsed here, before anything is queued, so a
//! malformed one is a 400 whatever the actor's state; what needs the
//! groups (an unknown group, rights, limits) is the actor's to answer.
//! Every method is cancel-safe: a cancelled call's answer is dropped.

use fogmesh_protocols::groups::GroupId;
use libp2p::PeerId;

use super::Input;
use crate::actor::{Mailbox, MailboxError, Reply, ServiceError, parse_peer};
use crate::types::{CreateGroup, GroupAck, GroupInfo, GroupInvite, GroupMessage};

/// The API's and the event loop's handle on the groups actor. Cloneable.
#[derive(Debug, Clone)]
pub struct GroupsHandle {
    mailbox: Mailbox<Input>,
}

/// A call from the API, with its arguments parsed.
#[derive(Debug)]
pub(crate) enum ApiCall {
    Create {
        name: String,
        description: String,
        /// Members besides this node.
        members: Vec<PeerId>,
        reply: Reply<GroupAck>,
    },
    List {
        reply: Reply<Vec<GroupInfo>>,
    },
    Show {
        group: GroupId,
        reply: Reply<GroupInfo>,
    },
    AddMember {
        group: GroupId,
        peer: PeerId,
        reply: Reply<GroupAck>,
    },
    RemoveMember {
        group: GroupId,
        peer: PeerId,
        reply: Reply<GroupAck>,
    },
    Leave {
        group: GroupId,
        reply: Reply<GroupAck>,
    },
    Send {
        group: GroupId,
        text: String,
        reply: Reply<GroupAck>,
    },
    /// The last `limit` delivered messages (all with `None`).
    Messages {
        group: GroupId,
        limit: Option<usize>,
        reply: Reply<Vec<GroupMessage>>,
    },
    Invites {
        reply: Reply<Vec<GroupInvite>>,
    },
    Accept {
        group: GroupId,
        reply: Reply<GroupAck>,
    },
    Decline {
        group: GroupId,
        reply: Reply<GroupAck>,
    },
}

impl GroupsHandle {
    pub(super) fn new(mailbox: Mailbox<Input>) -> Self {
        GroupsHandle { mailbox }
    }

    /// Queues a network input without waiting (for the event loop).
    pub(crate) fn offer(&self, input: Input) -> Result<(), MailboxError> {
        self.mailbox.offer(input)
    }

    /// Creates a group with this node as admin.
    pub async fn create(&self, req: CreateGroup) -> Result<GroupAck, ServiceError> {
        let members = req
            .members
            .iter()
            .map(|p| parse_peer(p))
            .collect::<Result<_, _>>()?;
        self.mailbox
            .call(|reply| ApiCall::Create {
                name: req.name,
                description: req.description,
                members,
                reply,
            })
            .await
    }

    /// Every group this node holds, by name.
    pub async fn list(&self) -> Result<Vec<GroupInfo>, ServiceError> {
        self.mailbox.call(|reply| ApiCall::List { reply }).await
    }

    /// One group (`group_id` in hex).
    pub async fn show(&self, group_id: &str) -> Result<GroupInfo, ServiceError> {
        let group = parse_group(group_id)?;
        self.mailbox
            .call(|reply| ApiCall::Show { group, reply })
            .await
    }

    /// Admin: adds `peer` (a peer id in base58) to the group.
    pub async fn add_member(&self, group_id: &str, peer: &str) -> Result<GroupAck, ServiceError> {
        let group = parse_group(group_id)?;
        let peer = parse_peer(peer)?;
        self.mailbox
            .call(|reply| ApiCall::AddMember { group, peer, reply })
            .await
    }

    /// Admin: removes `peer` from the group, opening a new key epoch.
    pub async fn remove_member(
        &self,
        group_id: &str,
        peer: &str,
    ) -> Result<GroupAck, ServiceError> {
        let group = parse_group(group_id)?;
        let peer = parse_peer(peer)?;
        self.mailbox
            .call(|reply| ApiCall::RemoveMember { group, peer, reply })
            .await
    }

    /// Leaves the group.
    pub async fn leave(&self, group_id: &str) -> Result<GroupAck, ServiceError> {
        let group = parse_group(group_id)?;
        self.mailbox
            .call(|reply| ApiCall::Leave { group, reply })
            .await
    }

    /// Posts `text`; answers once it is stored (durable before
    /// acknowledged), with the message id.
    pub async fn send(&self, group_id: &str, text: String) -> Result<GroupAck, ServiceError> {
        let group = parse_group(group_id)?;
        self.mailbox
            .call(|reply| ApiCall::Send { group, text, reply })
            .await
    }

    /// The last `limit` delivered messages (all with `None`), oldest first.
    pub async fn messages(
        &self,
        group_id: &str,
        limit: Option<usize>,
    ) -> Result<Vec<GroupMessage>, ServiceError> {
        let group = parse_group(group_id)?;
        self.mailbox
            .call(|reply| ApiCall::Messages {
                group,
                limit,
                reply,
            })
            .await
    }
}

/// Invitations.
impl GroupsHandle {
    /// Pending (and accepted, not yet joined) invitations, oldest first.
    pub async fn invites(&self) -> Result<Vec<GroupInvite>, ServiceError> {
        self.mailbox.call(|reply| ApiCall::Invites { reply }).await
    }

    /// Accepts an invitation: the node joins the group as soon as a member
    /// sends its log (at once when one is connected).
    pub async fn accept(&self, group_id: &str) -> Result<GroupAck, ServiceError> {
        let group = parse_group(group_id)?;
        self.mailbox
            .call(|reply| ApiCall::Accept { group, reply })
            .await
    }

    /// Declines an invitation: it is forgotten, and the group's later
    /// invitations are ignored.
    pub async fn decline(&self, group_id: &str) -> Result<GroupAck, ServiceError> {
        let group = parse_group(group_id)?;
        self.mailbox
            .call(|reply| ApiCall::Decline { group, reply })
            .await
    }
}

pub(super) fn parse_group(s: &str) -> Result<GroupId, ServiceError> {
    hex::decode(s)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(GroupId)
        .ok_or_else(|| {
            ServiceError::BadRequest(format!("{s:?} is not a group id (64 hex characters)"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_parsed_before_anything_is_queued() {
        assert_eq!(parse_group(&"ab".repeat(32)), Ok(GroupId([0xab; 32])));
        for bad in ["", "not-a-group", &"ab".repeat(31), &"ab".repeat(33)] {
            let e = parse_group(bad);
            assert!(
                matches!(&e, Err(ServiceError::BadRequest(m)) if m.contains("not a group id")),
                "{bad}: {e:?}"
            );
        }
        let peer = PeerId::random();
        assert_eq!(parse_peer(&peer.to_base58()), Ok(peer));
        assert!(matches!(
            parse_peer("not-a-peer"),
            Err(ServiceError::BadRequest(m)) if m.contains("not a peer id")
        ));
    }
}
