//! Properties over arbitrary inputs (proptest): replicas that receive the
//! same ops and messages in any order converge; a sync response never
//! exceeds its budget; a manifest does not depend on how the file was
//! sliced; the token bucket keeps its long-run rate.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fogmesh_protocols::files::manifest::manifest_of;
use fogmesh_protocols::files::{ManifestBuilder, TokenBucket, chunk_size_for};
use fogmesh_protocols::fuzz::FuzzRng;
use fogmesh_protocols::groups::exchange::RESPONSE_OVERHEAD;
use fogmesh_protocols::groups::wire::{encode_envelope, encode_sync_response};
use fogmesh_protocols::groups::{
    Group, Keypair, Op, PeerId, SignedEnvelope, Summary, SyncRequest, Want, respond,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

fn keypair(n: u8) -> Keypair {
    Keypair::ed25519_from_bytes([n; 32]).expect("ed25519 key")
}

fn peer(n: u8) -> PeerId {
    keypair(n).public().to_peer_id()
}

/// What travels: an op or a message.
#[derive(Clone, Debug)]
enum Item {
    Op(Op),
    Msg(SignedEnvelope),
}

/// One step of a history.
#[derive(Clone, Debug)]
enum Step {
    /// Author (0 = admin key 1, 1 = key 2, 2 = key 3, 3 = key 4 once
    /// added) writes, after catching up on everything or not.
    Write {
        author: u8,
        catch_up: bool,
        len: usize,
    },
    /// The admin adds key 4.
    Add,
    /// The admin rotates the epoch key.
    Rotate,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0u8..4, any::<bool>(), 0usize..64)
            .prop_map(|(author, catch_up, len)| Step::Write { author, catch_up, len }),
        1 => Just(Step::Add),
        1 => Just(Step::Rotate),
    ]
}

/// Plays `steps` with one replica per author; returns the genesis op and
/// everything published, in publication order.
fn play(steps: &[Step]) -> (Op, Vec<Item>) {
    let mut rng = FuzzRng::new(7);
    let (admin, ops) =
        Group::create(keypair(1), "p", "", &[peer(2), peer(3)], &mut rng, 1).expect("create");
    let genesis = ops[0].clone();
    let mut authors: Vec<Group> = vec![admin];
    for n in [2, 3, 4] {
        authors.push(Group::join(keypair(n), genesis.clone()).expect("join"));
    }
    let mut items: Vec<Item> = Vec::new();
    // What each author has received so far (index into items).
    let mut seen = [0usize; 4];
    for (t, s) in steps.iter().enumerate() {
        let t = t as u64 + 2;
        let op = match s {
            Step::Add if !authors[0].membership().is_member(&peer(4)) => {
                authors[0].add(peer(4), &mut rng, t).ok()
            }
            Step::Rotate => authors[0].rotate(&mut rng, t).ok(),
            Step::Write {
                author,
                catch_up,
                len,
            } => {
                let a = usize::from(*author);
                // Ops reach everyone at once; messages only on catch-up.
                let upto = items.len();
                for item in &items[seen[a]..upto] {
                    match item.clone() {
                        Item::Op(op) => {
                            let _ = authors[a].receive_op(op);
                        }
                        Item::Msg(m) if *catch_up => {
                            let _ = authors[a].receive_message(m);
                        }
                        Item::Msg(_) => {}
                    }
                }
                if *catch_up {
                    seen[a] = upto;
                }
                let text = "x".repeat(*len);
                if let Ok((env, _)) = authors[a].compose(&mut rng, &text, t) {
                    items.push(Item::Msg(env));
                }
                None
            }
            Step::Add => None,
        };
        if let Some(op) = op {
            for g in &mut authors[1..] {
                let _ = g.receive_op(op.clone());
            }
            items.push(Item::Op(op));
        }
    }
    (genesis, items)
}

/// A fresh member (key 2) that receives `items` in `order`, then everything
/// again (what sync brings back later).
fn replica(genesis: &Op, items: &[Item], order: &[usize]) -> Group {
    let mut g = Group::join(keypair(2), genesis.clone()).expect("join");
    let all: Vec<usize> = (0..items.len()).collect();
    for &i in order.iter().chain(all.iter()).chain(order.iter()) {
        match items[i].clone() {
            Item::Op(op) => {
                let _ = g.receive_op(op);
            }
            Item::Msg(m) => {
                let _ = g.receive_message(m);
            }
        }
    }
    g
}

fn permutation(n: usize, keys: &[u32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|i| keys.get(*i).copied().unwrap_or(0));
    order
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn replicas_converge_whatever_the_order(
        steps in proptest::collection::vec(step(), 1..16),
        keys_a in proptest::collection::vec(any::<u32>(), 0..40),
        keys_b in proptest::collection::vec(any::<u32>(), 0..40),
    ) {
        let (genesis, items) = play(&steps);
        let a = replica(&genesis, &items, &permutation(items.len(), &keys_a));
        let b = replica(&genesis, &items, &permutation(items.len(), &keys_b));
        let in_order: Vec<usize> = (0..items.len()).collect();
        let c = replica(&genesis, &items, &in_order);
        for g in [&a, &b] {
            prop_assert_eq!(g.membership().last_hash(), c.membership().last_hash());
            prop_assert_eq!(g.summary(), c.summary());
        }
        // Every message was delivered (key 2 was a member throughout).
        let messages = items.iter().filter(|i| matches!(i, Item::Msg(_))).count();
        let delivered: u64 = c.summary().per_sender.iter().map(|(_, n)| n).sum();
        prop_assert_eq!(delivered as usize, messages);
    }

    #[test]
    fn a_sync_response_never_exceeds_its_budget(
        lens in proptest::collection::vec(0usize..20_000, 1..24),
        writers in proptest::collection::vec(0u8..2, 24),
        budget in 4096usize..200_000,
        membership_from in 0u64..4,
        ranges in proptest::collection::vec((0u8..3, 0u64..30, 0u64..30), 0..4),
        summary_request in any::<bool>(),
    ) {
        let mut rng = FuzzRng::new(3);
        let (mut admin, ops) =
            Group::create(keypair(1), "s", "", &[peer(2)], &mut rng, 1).expect("create");
        let mut member = Group::join(keypair(2), ops[0].clone()).expect("join");
        let mut store: HashMap<_, Vec<u8>> = HashMap::new();
        for (i, len) in lens.iter().enumerate() {
            let text = "y".repeat(*len);
            let (env, id) = if writers[i] == 0 {
                admin.compose(&mut rng, &text, 2).expect("compose")
            } else {
                let (env, id) = member.compose(&mut rng, &text, 2).expect("compose");
                admin.receive_message(env.clone()).expect("deliver");
                (env, id)
            };
            let _ = member.receive_message(env.clone());
            store.insert(id, encode_envelope(&env));
        }
        let senders = [peer(1), peer(2), peer(3)];
        let request = if summary_request {
            SyncRequest::Summary {
                group_id: admin.id(),
                summary: Summary {
                    membership_len: membership_from,
                    heads_hash: [0; 32],
                    per_sender: ranges.iter().map(|(s, from, _)| (senders[usize::from(*s)], *from)).collect(),
                },
            }
        } else {
            SyncRequest::Fetch {
                group_id: admin.id(),
                want: Want {
                    membership_from: Some(membership_from),
                    ranges: ranges.iter().map(|(s, a, b)| (senders[usize::from(*s)], *a, *a + *b)).collect(),
                    need_full_summary: false,
                },
            }
        };
        let answer = respond(&admin, &peer(2), &request, |id| store.get(id).cloned(), budget);
        let len = encode_sync_response(&answer.response).len();
        prop_assert!(len <= budget, "response of {} bytes, budget {}", len, budget);
        prop_assert!(budget > RESPONSE_OVERHEAD);
        // A non-member learns nothing.
        let other = respond(&admin, &peer(9), &request, |id| store.get(id).cloned(), budget);
        prop_assert!(other.response.ops.is_empty() && other.response.messages.is_empty());
        prop_assert_eq!(other.response.group_id, admin.id());
    }

    #[test]
    fn a_manifest_does_not_depend_on_how_the_file_is_sliced(
        len in prop_oneof![0usize..5000, 250_000usize..600_000],
        seed in any::<u64>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
        small_chunk in 1024u32..5000,
    ) {
        let mut rng = FuzzRng::new(seed);
        let mut data = vec![0u8; len];
        for b in data.iter_mut().step_by(61) {
            *b = rng.bits() as u8;
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| if len == 0 { 0 } else { c % len }).collect();
        points.push(0);
        points.push(len);
        points.sort_unstable();
        let sliced = |chunk: u32| {
            let mut b = ManifestBuilder::new(chunk).expect("chunk size");
            for w in points.windows(2) {
                b.update(&data[w[0]..w[1]]);
            }
            b.finish(Some("f".into())).expect("finish")
        };
        let whole = manifest_of(&data, Some("f".into())).expect("manifest_of");
        prop_assert_eq!(&sliced(chunk_size_for(len as u64)), &whole);
        // Any chunk size: the hashes are those of the chunks.
        let m = sliced(small_chunk);
        let expected: Vec<[u8; 32]> =
            data.chunks(small_chunk as usize).map(|c| Sha256::digest(c).into()).collect();
        prop_assert_eq!(m.chunk_hashes(), &expected[..]);
        prop_assert_eq!(m.size(), len as u64);
        for (i, c) in data.chunks(small_chunk as usize).enumerate().take(4) {
            prop_assert!(m.verify_chunk(i as u64, c));
        }
        prop_assert!(m.verify(&m.id()).is_ok());
    }

    #[test]
    fn the_token_bucket_keeps_its_long_run_rate(
        rate in 1u64..50_000_000,
        burst_factor in 0u64..3,
        burst_extra in 1u64..100_000,
        takes in proptest::collection::vec(1u64..2_000_000, 1..60),
        idle_ms in proptest::collection::vec(0u64..2000, 1..60),
    ) {
        let burst = rate * burst_factor + burst_extra;
        let max_take = takes.iter().copied().max().unwrap_or(0);
        let start = Instant::now();
        // A greedy taker that waits exactly as told: it takes at least the
        // rate (its waits are enough) and at most the rate plus one burst.
        let mut bucket = TokenBucket::new(rate, burst);
        let mut now = start;
        let mut taken: u128 = 0;
        for n in takes.iter().cycle().take(200) {
            if let Err(wait) = bucket.try_take(*n, now) {
                prop_assert!(wait != Duration::MAX);
                now += wait;
                prop_assert!(bucket.try_take(*n, now).is_ok(), "waiting as told was not enough");
            }
            taken += u128::from(*n);
        }
        let elapsed = now.duration_since(start).as_nanos();
        let earned = u128::from(rate) * elapsed / 1_000_000_000;
        prop_assert!(taken <= u128::from(burst) + earned + u128::from(max_take),
            "took {} in {} ns at {}/s, burst {}", taken, elapsed, rate, burst);
        prop_assert!(taken + u128::from(burst) + u128::from(max_take) + 200 >= earned,
            "took only {} in {} ns at {}/s", taken, elapsed, rate);
        // A taker that idles in between never beats rate and burst.
        let mut bucket = TokenBucket::new(rate, burst);
        let mut now = start;
        let mut taken: u128 = 0;
        for (n, idle) in takes.iter().zip(idle_ms.iter().cycle()) {
            now += Duration::from_millis(*idle);
            if bucket.try_take(*n, now).is_ok() {
                taken += u128::from(*n);
            }
        }
        let elapsed = now.duration_since(start).as_nanos();
        let earned = u128::from(rate) * elapsed / 1_000_000_000;
        prop_assert!(taken <= u128::from(burst) + earned + u128::from(max_take));
    }
}
