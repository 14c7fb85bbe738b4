//! The decisions of group sync, sans-IO: what a responder answers, what a
//! requester asks next, and whom a member compares its state with.
//!
//! The node decodes requests, finds the group, and lends [`respond`] a
//! lookup for stored envelopes; it encodes and sends what comes back. Both
//! sides use [`next_request`] to turn two summaries into the next request
//! (what the local side lacks), and [`pick_sync_peer`] chooses the member a
//! periodic check goes to. The rules are those of docs/protocols/groups.md,
//! "What a responder does".

use super::PeerId;
use super::causal::MessageId;
use super::group::Group;
use super::sync::{Summary, SyncRequest, SyncResponse, Want, diff};
use super::wire::{decode_envelope, encode_op, encode_summary};

/// Room kept in a response's budget for what is not counted item by item:
/// the frame, the group id, the field names and the array headers.
///
/// Items are counted at their framed encoding (`encode_op`, the stored
/// envelope frame, `encode_summary`), which is a few bytes more than they
/// take inside the response, so a response built within the budget encodes
/// within it.
pub const RESPONSE_OVERHEAD: usize = 1024;

/// A responder's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The response to send back.
    pub response: SyncResponse,
    /// A request of the responder's own to the requester, for what the
    /// requester's summary shows the responder lacks.
    pub ask: Option<SyncRequest>,
}

impl Answer {
    fn nothing(group_id: super::GroupId) -> Self {
        Answer {
            response: SyncResponse::empty(group_id),
            ask: None,
        }
    }
}

/// Answers `request` from `requester` about `group`, which the responder
/// holds.
///
/// - A requester that is not a current member gets an empty response and
///   learns nothing, not even that the group exists.
/// - To a `Summary`: the responder's own summary (brief when the heads
///   agree, else full), the ops from the requester's log length on, and,
///   when the requester's summary is full, the envelopes it lacks; plus, as
///   [`Answer::ask`], what the responder lacks itself.
/// - To a `Fetch`: the ops from `membership_from` on and the envelopes of
///   the ranges.
///
/// Ops come first, in index order, then envelopes range by range, each
/// range in sequence order until the first one `lookup` does not have;
/// items stop before the encoded response would exceed `budget` bytes (the
/// requester asks again for the rest). An envelope that `lookup` returns
/// but that does not decode is skipped.
pub fn respond(
    group: &Group,
    requester: &PeerId,
    request: &SyncRequest,
    lookup: impl FnMut(&MessageId) -> Option<Vec<u8>>,
    budget: usize,
) -> Answer {
    plan(group, requester, request, budget).fill(lookup)
}

/// The smallest a stored (valid, signed) envelope encodes to: its
/// signature alone is 64 bytes and its group id 32. Bounds how many
/// envelopes a [`Plan`] lists: no more than fit in the budget.
pub const MIN_ENVELOPE_LEN: usize = 96;

/// The first half of [`respond`], which needs the group but not the stored
/// envelopes: the summary, the ops and the request of our own, and the ids
/// of the envelopes to look up, in order. The node computes it where the
/// group lives and [`fill`](Plan::fill)s it elsewhere (reading the
/// envelopes from disk and encoding them is the costly part), so that a
/// peer's sync does not hold up the local user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    answer: Answer,
    /// Ids per range, each in sequence order, up to the first sequence
    /// number the group does not have; at most `budget /
    /// MIN_ENVELOPE_LEN` in all.
    ranges: Vec<Vec<MessageId>>,
    used: usize,
    budget: usize,
}

impl Plan {
    /// The request of the responder's own (see [`Answer::ask`]).
    pub fn ask(&self) -> Option<&SyncRequest> {
        self.answer.ask.as_ref()
    }

    /// The group the answer is about.
    pub fn group_id(&self) -> super::GroupId {
        self.answer.response.group_id
    }

    /// Whether the answer needs no envelope looked up.
    pub fn needs_lookup(&self) -> bool {
        self.ranges.iter().any(|r| !r.is_empty())
    }

    /// Completes the answer with the envelopes `lookup` finds, each range in
    /// order until the first it does not have, while they fit the budget.
    pub fn fill(self, mut lookup: impl FnMut(&MessageId) -> Option<Vec<u8>>) -> Answer {
        let Plan {
            mut answer,
            ranges,
            mut used,
            budget,
        } = self;
        for ids in ranges {
            for id in ids {
                let Some(bytes) = lookup(&id) else { break };
                if used + bytes.len() > budget {
                    return answer;
                }
                if let Ok(env) = decode_envelope(&bytes) {
                    used += bytes.len();
                    answer.response.messages.push(env);
                }
            }
        }
        answer
    }
}

/// Plans the answer to `request` from `requester` about `group` (see
/// [`respond`], which is `plan(..).fill(lookup)`).
pub fn plan(group: &Group, requester: &PeerId, request: &SyncRequest, budget: usize) -> Plan {
    let group_id = group.id();
    let nothing = |answer| Plan {
        answer,
        ranges: Vec::new(),
        used: 0,
        budget,
    };
    if request.group_id() != group_id || !group.membership().is_member(requester) {
        return nothing(Answer::nothing(group_id));
    }
    let mine = group.summary();
    let mut answer = Answer::nothing(group_id);
    let (ops_from, want) = match request {
        SyncRequest::Summary {
            summary: theirs, ..
        } => {
            answer.response.summary = Some(if theirs.heads_hash == mine.heads_hash {
                mine.brief()
            } else {
                mine.clone()
            });
            answer.ask = next_request(group_id, &mine, theirs);
            // A brief summary names no sequence numbers: what it lacks is
            // only known once it sends its full one.
            let ranges = if theirs.per_sender.is_empty() {
                Vec::new()
            } else {
                diff(theirs, &mine).ranges
            };
            (Some(theirs.membership_len), ranges)
        }
        SyncRequest::Fetch { want, .. } => (want.membership_from, want.ranges.clone()),
    };
    let mut used = RESPONSE_OVERHEAD
        + answer
            .response
            .summary
            .as_ref()
            .map_or(0, |s| encode_summary(s).len());
    if let Some(from) = ops_from {
        add_ops(group, from, budget, &mut used, &mut answer.response);
    }
    let ranges = message_ids(group, &want, budget.saturating_sub(used) / MIN_ENVELOPE_LEN);
    Plan {
        answer,
        ranges,
        used,
        budget,
    }
}

/// Adds the ops from index `from` on, in order, while they fit.
fn add_ops(group: &Group, from: u64, budget: usize, used: &mut usize, resp: &mut SyncResponse) {
    for op in group.membership().ops_since(from) {
        let len = encode_op(op).len();
        // Ops must stay contiguous: the first that does not fit ends them.
        if *used + len > budget {
            break;
        }
        *used += len;
        resp.ops.push(op.clone());
    }
}

/// The ids of the envelopes of `ranges`, each range in order until a gap,
/// at most `most` in all.
fn message_ids(
    group: &Group,
    ranges: &[(PeerId, u64, u64)],
    mut most: usize,
) -> Vec<Vec<MessageId>> {
    let mut out = Vec::with_capacity(ranges.len().min(most));
    for (sender, from, to) in ranges {
        if most == 0 {
            break;
        }
        let mut ids = Vec::new();
        for seq in *from..=*to {
            // The requester delivers per sender without gaps: past a
            // missing one, the rest of the range is of no use to it.
            let Some(id) = group.causal().id_of(sender, seq) else {
                break;
            };
            if most == 0 {
                break;
            }
            most -= 1;
            ids.push(id);
        }
        out.push(ids);
    }
    out
}

/// What to ask a peer next, given the local summary and the peer's: a full
/// summary of ours when the peer's was brief and the heads differ (its
/// answer carries its full one), a fetch of what we lack, or nothing.
pub fn next_request(
    group_id: super::GroupId,
    local: &Summary,
    remote: &Summary,
) -> Option<SyncRequest> {
    let want: Want = diff(local, remote);
    if want.need_full_summary {
        Some(SyncRequest::Summary {
            group_id,
            summary: local.clone(),
        })
    } else if want.is_empty() {
        None
    } else {
        Some(SyncRequest::Fetch { group_id, want })
    }
}

/// The member a periodic check of `group` goes to: a random connected
/// member other than the local one, preferring those not yet known to know
/// the group (an added member whose neighbours all told it while it was
/// busy still hears of the group within one interval). `None` when the
/// local node is not a member or no other member is connected.
pub fn pick_sync_peer(
    group: &Group,
    is_connected: impl Fn(&PeerId) -> bool,
    knows_group: impl Fn(&PeerId) -> bool,
    rng: &mut impl rand_core::Rng,
) -> Option<PeerId> {
    let local = group.local_peer();
    let log = group.membership();
    if !log.is_member(&local) {
        return None;
    }
    let candidates: Vec<PeerId> = log
        .members()
        .iter()
        .filter(|p| **p != local && is_connected(p))
        .copied()
        .collect();
    let unaware: Vec<PeerId> = candidates
        .iter()
        .filter(|p| !knows_group(p))
        .copied()
        .collect();
    let pool = if unaware.is_empty() {
        candidates
    } else {
        unaware
    };
    choose(&pool, rng)
}

/// A uniformly random element (multiply-shift: the bias is below 2^-32
/// for any list a group can have).
fn choose<T: Copy>(items: &[T], rng: &mut impl rand_core::Rng) -> Option<T> {
    let len = u128::try_from(items.len()).ok()?;
    let index = (u128::from(rng.next_u64()) * len) >> 64;
    items.get(usize::try_from(index).ok()?).copied()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::super::wire::{MAX_SYNC_RESPONSE_SIZE, encode_envelope, encode_sync_response};
    use super::super::{GroupId, Keypair};
    use super::*;

    /// A group of `members` (the admin first), every member's copy of it,
    /// and the encoded envelopes of every message sent, by id.
    struct World {
        groups: Vec<Group>,
        stored: HashMap<MessageId, Vec<u8>>,
        rng: StdRng,
    }

    fn keypair(i: usize) -> Keypair {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let Ok(k) = Keypair::ed25519_from_bytes(seed) else {
            panic!("keypair")
        };
        k
    }

    impl World {
        fn new(members: usize) -> World {
            let mut rng = StdRng::seed_from_u64(11);
            let peers: Vec<PeerId> = (1..members)
                .map(|i| keypair(i).public().to_peer_id())
                .collect();
            let Ok((admin, ops)) = Group::create(keypair(0), "g", "", &peers, &mut rng, 1) else {
                panic!("create")
            };
            let mut groups = vec![admin];
            for i in 1..members {
                let Ok(g) = Group::join(keypair(i), ops[0].clone()) else {
                    panic!("join")
                };
                groups.push(g);
            }
            World {
                groups,
                stored: HashMap::new(),
                rng,
            }
        }

        fn peer(&self, i: usize) -> PeerId {
            self.groups[i].local_peer()
        }

        /// Member `from` sends `n` messages of `size` bytes that member
        /// `to` receives (and stores).
        fn send(&mut self, from: usize, to: usize, n: usize, size: usize) {
            let text = "x".repeat(size);
            for _ in 0..n {
                let Ok((env, id)) = self.groups[from].compose(&mut self.rng, &text, 2) else {
                    panic!("compose")
                };
                self.stored.insert(id, encode_envelope(&env));
                if to != from {
                    let delivered = self.groups[to].receive_message(env);
                    assert!(delivered.is_ok_and(|d| d.len() == 1));
                }
            }
        }

        fn respond(&self, responder: usize, requester: &PeerId, req: &SyncRequest) -> Answer {
            respond(
                &self.groups[responder],
                requester,
                req,
                |id| self.stored.get(id).cloned(),
                MAX_SYNC_RESPONSE_SIZE,
            )
        }
    }

    fn fetch(
        group_id: GroupId,
        membership_from: Option<u64>,
        ranges: Vec<(PeerId, u64, u64)>,
    ) -> SyncRequest {
        SyncRequest::Fetch {
            group_id,
            want: Want {
                membership_from,
                ranges,
                need_full_summary: false,
            },
        }
    }

    #[test]
    fn no_envelope_is_shorter_than_a_plan_assumes() {
        let mut w = World::new(2);
        w.send(1, 0, 1, 0);
        let shortest = w.stored.values().map(Vec::len).min();
        assert!(
            shortest.is_some_and(|n| n >= MIN_ENVELOPE_LEN),
            "{shortest:?}"
        );
    }

    #[test]
    fn a_plan_lists_no_more_ids_than_can_fit() {
        let mut w = World::new(2);
        w.send(1, 0, 50, 0);
        let gid = w.groups[0].id();
        let req = fetch(gid, None, vec![(w.peer(1), 1, u64::MAX)]);
        // Room for ten of the smallest envelopes after the overhead.
        let budget = RESPONSE_OVERHEAD + 10 * MIN_ENVELOPE_LEN;
        let p = plan(&w.groups[0], &w.peer(1), &req, budget);
        assert_eq!(p.ranges.iter().map(Vec::len).sum::<usize>(), 10);
        assert!(p.needs_lookup());
        // Filled, it is what `respond` answers.
        let filled = p.fill(|id| w.stored.get(id).cloned());
        let direct = respond(
            &w.groups[0],
            &w.peer(1),
            &req,
            |id| w.stored.get(id).cloned(),
            budget,
        );
        assert_eq!(filled, direct);
    }

    #[test]
    fn a_large_group_is_answered_within_the_budget() {
        // 200 members (a genesis op of about 35 KB), and 5 MB of messages
        // from four senders: more than one response can carry.
        let mut w = World::new(200);
        for sender in 1..5 {
            w.send(sender, 0, 40, 32 * 1024);
        }
        let gid = w.groups[0].id();
        // A member with the genesis op and no message (a full summary) asks;
        // so does one fetching everything from the genesis op on.
        let newcomer = Summary {
            per_sender: vec![(w.peer(199), 0)],
            ..w.groups[199].summary()
        };
        let asks = [
            (
                SyncRequest::Summary {
                    group_id: gid,
                    summary: newcomer,
                },
                0,
            ),
            (
                fetch(gid, Some(0), (1..5).map(|i| (w.peer(i), 1, 40)).collect()),
                1,
            ),
        ];
        for (req, ops) in asks {
            let answer = w.respond(0, &w.peer(199), &req);
            let len = encode_sync_response(&answer.response).len();
            assert!(len <= MAX_SYNC_RESPONSE_SIZE, "{len} bytes");
            // Nearly full: it stopped for the budget, not before.
            assert!(len > MAX_SYNC_RESPONSE_SIZE - 40 * 1024, "{len} bytes");
            assert_eq!(answer.response.ops.len(), ops);
            assert!(answer.response.messages.len() < 160);
        }
    }

    #[test]
    fn a_small_budget_cuts_ranges_in_order() {
        let mut w = World::new(3);
        w.send(1, 0, 10, 1000);
        w.send(2, 0, 10, 1000);
        let gid = w.groups[0].id();
        let req = fetch(gid, None, vec![(w.peer(1), 3, 10), (w.peer(2), 1, 10)]);
        // Sender 1's 3..=10 (8 messages), then sender 2's from 1: a budget
        // for exactly the first 10 of them.
        let mut order: Vec<(PeerId, u64)> = (3..=10).map(|s| (w.peer(1), s)).collect();
        order.extend((1..=10).map(|s| (w.peer(2), s)));
        let size = |(p, s): &(PeerId, u64)| {
            w.groups[0]
                .causal()
                .id_of(p, *s)
                .and_then(|id| w.stored.get(&id))
                .map_or(0, Vec::len)
        };
        let budget = RESPONSE_OVERHEAD + order[..10].iter().map(size).sum::<usize>() + 1;
        let lookup = |id: &MessageId| w.stored.get(id).cloned();
        let answer = respond(&w.groups[0], &w.peer(2), &req, lookup, budget);
        let got: Vec<(PeerId, u64)> = answer
            .response
            .messages
            .iter()
            .map(|e| (e.body.sender, e.body.seq))
            .collect();
        assert_eq!(got, order[..10]);
        assert!(encode_sync_response(&answer.response).len() <= budget);
    }

    #[test]
    fn ops_are_those_since_the_asked_index() {
        let mut w = World::new(3);
        let mut rng = StdRng::seed_from_u64(2);
        for i in 10..13 {
            let added = w.groups[0].add(keypair(i).public().to_peer_id(), &mut rng, 3);
            assert!(added.is_ok());
        }
        let gid = w.groups[0].id();
        let log = w.groups[0].membership();
        let answer = w.respond(0, &w.peer(1), &fetch(gid, Some(2), vec![]));
        assert_eq!(answer.response.ops, log.ops_since(2));
        assert_eq!(answer.response.ops.len(), 2);
        assert!(answer.response.summary.is_none() && answer.ask.is_none());
        // A summary asks implicitly from its log length.
        let theirs = w.groups[1].summary();
        assert_eq!(theirs.membership_len, 1);
        let answer = w.respond(
            0,
            &w.peer(1),
            &SyncRequest::Summary {
                group_id: gid,
                summary: theirs.brief(),
            },
        );
        assert_eq!(answer.response.ops, log.ops_since(1));
        // The heads agree (no messages): a brief summary, and nothing more
        // to ask for (the requester lacks ops, the responder does not).
        assert_eq!(answer.response.summary, Some(w.groups[0].summary().brief()));
        assert!(answer.ask.is_none());
    }

    #[test]
    fn non_members_learn_nothing() {
        let mut w = World::new(3);
        w.send(1, 0, 2, 10);
        let gid = w.groups[0].id();
        let stranger = keypair(77).public().to_peer_id();
        let reqs = [
            fetch(gid, Some(0), vec![(w.peer(1), 1, 2)]),
            SyncRequest::Summary {
                group_id: gid,
                summary: w.groups[1].summary(),
            },
        ];
        for req in reqs {
            let answer = w.respond(0, &stranger, &req);
            assert_eq!(answer, Answer::nothing(gid));
        }
        // A request naming another group gets nothing either.
        let answer = w.respond(0, &w.peer(1), &fetch(GroupId([1; 32]), Some(0), vec![]));
        assert_eq!(answer.response, SyncResponse::empty(gid));
    }

    #[test]
    fn the_responder_sends_what_is_lacking_and_asks_back() {
        let mut w = World::new(3);
        // Member 1 has 3 messages member 2 lacks; member 2 has 2 of its own.
        w.send(1, 1, 3, 10);
        w.send(2, 2, 2, 10);
        let gid = w.groups[1].id();
        let full = SyncRequest::Summary {
            group_id: gid,
            summary: w.groups[2].summary(),
        };
        let answer = w.respond(1, &w.peer(2), &full);
        let seqs: Vec<u64> = answer
            .response
            .messages
            .iter()
            .map(|e| e.body.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(answer.response.summary, Some(w.groups[1].summary()));
        assert_eq!(answer.ask, Some(fetch(gid, None, vec![(w.peer(2), 1, 2)])));
        // To a brief summary with other heads: no messages yet (it names no
        // sequence numbers), our full summary, and we ask for theirs.
        let brief = SyncRequest::Summary {
            group_id: gid,
            summary: w.groups[2].summary().brief(),
        };
        let answer = w.respond(1, &w.peer(2), &brief);
        assert!(answer.response.messages.is_empty());
        assert_eq!(answer.response.summary, Some(w.groups[1].summary()));
        assert_eq!(
            answer.ask,
            Some(SyncRequest::Summary {
                group_id: gid,
                summary: w.groups[1].summary(),
            })
        );
    }

    #[test]
    fn the_requester_asks_for_what_it_lacks() {
        let gid = GroupId([5; 32]);
        let (a, b) = (
            keypair(1).public().to_peer_id(),
            keypair(2).public().to_peer_id(),
        );
        let mine = Summary {
            membership_len: 2,
            heads_hash: [1; 32],
            per_sender: vec![(a, 4)],
        };
        // In sync: nothing.
        assert_eq!(next_request(gid, &mine, &mine.brief()), None);
        // More ops there, same heads: fetch the ops.
        let more_ops = Summary {
            membership_len: 5,
            ..mine.clone()
        };
        assert_eq!(
            next_request(gid, &mine, &more_ops.brief()),
            Some(fetch(gid, Some(2), vec![]))
        );
        // Other heads in a brief summary: send ours in full.
        let other = Summary {
            membership_len: 2,
            heads_hash: [2; 32],
            per_sender: vec![(a, 6), (b, 1)],
        };
        assert_eq!(
            next_request(gid, &mine, &other.brief()),
            Some(SyncRequest::Summary {
                group_id: gid,
                summary: mine.clone(),
            })
        );
        // Other heads in a full summary: fetch the ranges.
        assert_eq!(
            next_request(gid, &mine, &other),
            Some(fetch(gid, None, vec![(a, 5, 6), (b, 1, 1)]))
        );
        // Other heads but nothing we lack (they lack ours): nothing.
        let behind = Summary {
            heads_hash: [3; 32],
            per_sender: vec![(a, 2)],
            ..mine.clone()
        };
        assert_eq!(next_request(gid, &mine, &behind), None);
    }

    #[test]
    fn periodic_sync_prefers_members_not_known_to_know_the_group() {
        let w = World::new(5);
        let g = &w.groups[0];
        let mut rng = StdRng::seed_from_u64(9);
        let connected = [w.peer(1), w.peer(2), w.peer(3)];
        let is_connected = |p: &PeerId| connected.contains(p);
        // Nobody connected: nobody to ask.
        assert_eq!(pick_sync_peer(g, |_| false, |_| false, &mut rng), None);
        // 1 and 2 know the group: 3 is asked, every time.
        for _ in 0..20 {
            let knows = |p: &PeerId| *p == w.peer(1) || *p == w.peer(2);
            assert_eq!(
                pick_sync_peer(g, is_connected, knows, &mut rng),
                Some(w.peer(3))
            );
        }
        // All connected ones know it: any of them, never the local node or
        // a member that is not connected.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let Some(p) = pick_sync_peer(g, is_connected, |_| true, &mut rng) else {
                panic!("no peer")
            };
            seen.insert(p);
        }
        assert_eq!(seen, connected.into_iter().collect());
    }

    #[test]
    fn a_node_that_left_syncs_with_nobody() {
        let mut w = World::new(3);
        let left = w.groups[1].leave(3);
        assert!(left.is_ok());
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            pick_sync_peer(&w.groups[1], |_| true, |_| false, &mut rng),
            None
        );
    }
}
