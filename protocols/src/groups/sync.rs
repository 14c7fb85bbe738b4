//! Catch-up between two members: summaries, what to fetch, and the request
//! and response messages.
//!
//! A member's delivered messages are closed under causality and delivered
//! per sender without gaps, so the set is described exactly by the highest
//! sequence number delivered from each sender (Secure Scuttlebutt's version
//! vector). Members gossip a [`Summary::brief`] (membership length and a hash
//! of their causal heads: under 100 bytes encoded); equal hashes mean equal sets, and
//! only on a difference does one side ask for the full summary, whose
//! per-sender maxima give the missing ranges through [`diff`]. What the
//! *peer* lacks is `diff(remote, local)`.
//!
//! What a responder answers and what a requester asks next are decided in
//! [`exchange`](super::exchange); serving a [`Want`] needs the stored
//! envelopes, which the node lends it through a lookup.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::membership::Op;
use super::wire::SignedEnvelope;
use super::{GroupId, PeerId};

/// Maximum senders in one summary (members and former members).
pub const MAX_SUMMARY_SENDERS: usize = 2048;
/// Maximum ranges in one [`Want`].
pub const MAX_RANGES: usize = 256;
/// Maximum messages asked for in one range; the rest comes in a later round.
pub const MAX_RANGE_LEN: u64 = 256;

/// What a member has: small enough to gossip when `per_sender` is empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Ops in the member's membership log.
    pub membership_len: u64,
    /// Hash of the member's sorted causal heads.
    #[serde(with = "serde_bytes")]
    pub heads_hash: [u8; 32],
    /// Highest contiguous sequence number delivered per sender; empty in a
    /// brief summary.
    pub per_sender: Vec<(PeerId, u64)>,
}

impl Summary {
    /// The same summary without per-sender maxima, for periodic gossip.
    pub fn brief(&self) -> Summary {
        Summary {
            per_sender: Vec::new(),
            ..self.clone()
        }
    }
}

/// What the local member should fetch from a peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    /// Fetch membership ops from this index on.
    pub membership_from: Option<u64>,
    /// Fetch these messages: `(sender, first seq, last seq)`, inclusive.
    pub ranges: Vec<(PeerId, u64, u64)>,
    /// The heads differ but the peer sent a brief summary: ask for its full one.
    pub need_full_summary: bool,
}

impl Want {
    /// Nothing to fetch.
    pub fn is_empty(&self) -> bool {
        self.membership_from.is_none() && self.ranges.is_empty() && !self.need_full_summary
    }
}

/// Computes what `local` lacks compared to `remote`.
///
/// Only the first [`MAX_SUMMARY_SENDERS`] entries of `remote` are looked at,
/// at most [`MAX_RANGES`] ranges are returned, each at most [`MAX_RANGE_LEN`]
/// long: a peer cannot make us ask for unbounded work, and a large backlog
/// is fetched over several rounds.
pub fn diff(local: &Summary, remote: &Summary) -> Want {
    let membership_from =
        (remote.membership_len > local.membership_len).then_some(local.membership_len);
    if local.heads_hash == remote.heads_hash {
        return Want {
            membership_from,
            ..Want::default()
        };
    }
    if remote.per_sender.is_empty() {
        return Want {
            membership_from,
            ranges: vec![],
            need_full_summary: true,
        };
    }
    let have: HashMap<PeerId, u64> = local.per_sender.iter().copied().collect();
    let ranges = remote
        .per_sender
        .iter()
        .take(MAX_SUMMARY_SENDERS)
        .filter_map(|(peer, remote_max)| {
            let local_max = have.get(peer).copied().unwrap_or(0);
            (*remote_max > local_max).then(|| {
                (
                    *peer,
                    local_max + 1,
                    (*remote_max).min(local_max.saturating_add(MAX_RANGE_LEN)),
                )
            })
        })
        .take(MAX_RANGES)
        .collect();
    Want {
        membership_from,
        ranges,
        need_full_summary: false,
    }
}

/// A request from one member to another (request-response, not gossip).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SyncRequest {
    /// "Here is my full summary; send me yours": the answer to a brief
    /// summary whose heads differ from ours.
    Summary {
        /// The group.
        group_id: GroupId,
        /// The requester's full summary.
        summary: Summary,
    },
    /// Send me these ops and messages.
    Fetch {
        /// The group.
        group_id: GroupId,
        /// What to send, from [`diff`].
        want: Want,
    },
}

impl SyncRequest {
    /// The group the request is about.
    pub fn group_id(&self) -> GroupId {
        match self {
            SyncRequest::Summary { group_id, .. } | SyncRequest::Fetch { group_id, .. } => {
                *group_id
            }
        }
    }

    /// The requester's summary, if this is a [`SyncRequest::Summary`].
    pub fn summary(&self) -> Option<&Summary> {
        match self {
            SyncRequest::Summary { summary, .. } => Some(summary),
            SyncRequest::Fetch { .. } => None,
        }
    }
}

/// The answer to a [`SyncRequest`]: the responder's full summary (to a
/// [`SyncRequest::Summary`]), or ops and envelopes (to a
/// [`SyncRequest::Fetch`]), each verified by the receiver like any other
/// (the responder is not trusted). Responders
/// stop adding items before the encoding exceeds
/// [`MAX_SYNC_RESPONSE_SIZE`](super::wire::MAX_SYNC_RESPONSE_SIZE); the
/// requester asks again for the rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// The group.
    pub group_id: GroupId,
    /// The responder's full summary, when asked for it.
    pub summary: Option<Summary>,
    /// Membership ops, in index order.
    pub ops: Vec<Op>,
    /// Message envelopes, in any order.
    pub messages: Vec<SignedEnvelope>,
}

impl SyncResponse {
    /// An answer with nothing in it: what a non-member, or a peer asking
    /// about a group the responder does not know, gets.
    pub fn empty(group_id: GroupId) -> Self {
        SyncResponse {
            group_id,
            summary: None,
            ops: Vec::new(),
            messages: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(len: u64, hash: u8, per_sender: Vec<(PeerId, u64)>) -> Summary {
        Summary {
            membership_len: len,
            heads_hash: [hash; 32],
            per_sender,
        }
    }

    #[test]
    fn in_sync_means_nothing_to_fetch() {
        let a = PeerId::random();
        let s = summary(3, 1, vec![(a, 5)]);
        assert!(diff(&s, &s.brief()).is_empty());
        assert!(diff(&s.brief(), &s).is_empty());
    }

    #[test]
    fn brief_mismatch_asks_for_the_full_summary() {
        let local = summary(3, 1, vec![]);
        let remote = summary(4, 2, vec![]);
        let w = diff(&local, &remote.brief());
        assert_eq!(w.membership_from, Some(3));
        assert!(w.need_full_summary && w.ranges.is_empty());
    }

    #[test]
    fn ranges_in_both_directions() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let local = summary(3, 1, vec![(a, 5), (b, 2)]);
        let remote = summary(3, 2, vec![(a, 3), (b, 7), (c, 1)]);
        let w = diff(&local, &remote);
        assert_eq!(w.membership_from, None);
        assert_eq!(w.ranges, vec![(b, 3, 7), (c, 1, 1)]);
        assert_eq!(diff(&remote, &local).ranges, vec![(a, 4, 5)]);
    }

    #[test]
    fn in_sync_check_is_small() {
        // The periodic check sends a brief summary: what it costs per group
        // and interval when members agree.
        let req = SyncRequest::Summary {
            group_id: GroupId([7; 32]),
            summary: summary(12, 9, vec![]),
        };
        let len = super::super::wire::encode_sync_request(&req).len();
        assert!(len <= 160, "brief summary request is {len} bytes");
    }

    #[test]
    fn requests_are_bounded() {
        let senders: Vec<(PeerId, u64)> = (0..MAX_SUMMARY_SENDERS + 10)
            .map(|_| (PeerId::random(), u64::MAX))
            .collect();
        let w = diff(&summary(1, 1, vec![]), &summary(1, 2, senders));
        assert_eq!(w.ranges.len(), MAX_RANGES);
        assert!(
            w.ranges
                .iter()
                .all(|(_, from, to)| *from == 1 && *to == MAX_RANGE_LEN)
        );
    }
}
