//! Tests of the download lifecycle, driven with an explicit `now`: peers
//! are played by the test, which answers (or not) the requests the
//! [`Download`] sends.

use std::time::{Duration, Instant};

use libp2p_identity::Keypair;

use super::*;
use crate::files::manifest::ManifestBuilder;
use crate::files::scheduler::SchedulerConfig;
use crate::files::wire::encode_response;

const CHUNK: u32 = 1024;
const SEC: Duration = Duration::from_secs(1);

fn peer(n: u8) -> PeerId {
    match Keypair::ed25519_from_bytes([n; 32]) {
        Ok(k) => k.public().to_peer_id(),
        Err(e) => panic!("{e}"),
    }
}

/// A file of `chunks` chunks of [`CHUNK`] bytes (the last one shorter).
fn file(chunks: u64) -> (Vec<u8>, Manifest) {
    let len = if chunks == 0 {
        0
    } else {
        (chunks - 1) * u64::from(CHUNK) + 100
    };
    let data: Vec<u8> = (0..len).map(|i| (i * 13 + i / 1021) as u8).collect();
    let Ok(mut b) = ManifestBuilder::new(CHUNK) else {
        panic!("builder")
    };
    b.update(&data);
    match b.finish(Some("f".into())) {
        Ok(m) => (data, m),
        Err(e) => panic!("{e}"),
    }
}

/// One request per source at a time and no end-game duplicates, so that
/// which source is asked for what is easy to follow.
fn one_at_a_time() -> DownloadConfig {
    DownloadConfig::default().with_scheduler(
        SchedulerConfig::default()
            .with_windows(1, 1)
            .with_endgame_copies(1),
    )
}

/// A download, the file it fetches, and the test's clock.
struct Fixture {
    dl: Download,
    data: Vec<u8>,
    manifest: Manifest,
    now: Instant,
}

impl Fixture {
    fn new(chunks: u64, cfg: DownloadConfig) -> Self {
        let (data, manifest) = file(chunks);
        let now = Instant::now();
        Fixture {
            dl: Download::new(manifest.id(), peer(0), cfg, now),
            data,
            manifest,
            now,
        }
    }

    /// Opened with nothing held, `sources` reporting the whole file.
    fn downloading(chunks: u64, cfg: DownloadConfig, sources: &[PeerId]) -> (Self, Vec<Action>) {
        let mut f = Fixture::new(chunks, cfg);
        let none = Bitfield::new(f.manifest.chunk_count());
        let mut out = f.dl.opened(f.manifest.clone(), none, f.now);
        for p in sources {
            out.extend(f.dl.on_peer_connected(*p));
            out.extend(f.answer(*p, Asked::Have, &f.have_all()));
        }
        (f, out)
    }

    fn have_all(&self) -> Response {
        Response::Have {
            bits: Bitfield::full(self.manifest.chunk_count()),
        }
    }

    fn chunk(&self, index: u64) -> Response {
        let off = self.manifest.chunk_offset(index).unwrap_or(0) as usize;
        let len = self.manifest.chunk_len(index).unwrap_or(0) as usize;
        Response::Chunk {
            index,
            data: self.data[off..off + len].to_vec(),
        }
    }

    fn answer(&mut self, peer: PeerId, asked: Asked, r: &Response) -> Vec<Action> {
        self.dl
            .on_response(peer, asked, Ok(encode_response(r)), self.now)
    }

    fn fail(&mut self, peer: PeerId, asked: Asked) -> Vec<Action> {
        self.dl
            .on_response(peer, asked, Err("timed out".into()), self.now)
    }

    /// Carries out writes as the node would, collecting everything else.
    fn write_all(&mut self, actions: Vec<Action>) -> Vec<Action> {
        let mut out = Vec::new();
        let mut todo: VecDeque<Action> = actions.into();
        while let Some(a) = todo.pop_front() {
            match a {
                Action::Write { data, .. } => {
                    todo.extend(self.dl.written(data.len() as u64, self.now));
                }
                other => out.push(other),
            }
        }
        out
    }
}

/// The `(peer, asked)` of every send among `actions`.
fn sends(actions: &[Action]) -> Vec<(PeerId, Asked)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { peer, asked, .. } => Some((*peer, *asked)),
            _ => None,
        })
        .collect()
}

fn chunks_to(actions: &[Action], p: PeerId) -> Vec<u64> {
    sends(actions)
        .into_iter()
        .filter_map(|(q, asked)| match asked {
            Asked::Chunk(i) if q == p => Some(i),
            _ => None,
        })
        .collect()
}

#[test]
fn search_asks_providers_and_connected_peers_for_the_manifest_but_never_itself() {
    let mut f = Fixture::new(3, DownloadConfig::default());
    let connected = [peer(0), peer(1), peer(2)];
    let out = f.dl.search(&connected, f.now);
    assert_eq!(out[0], Action::FindProviders);
    assert_eq!(
        sends(&out),
        [(peer(1), Asked::Manifest), (peer(2), Asked::Manifest)]
    );
    // Asked once: a provider record for a peer already asked adds nothing.
    assert!(f.dl.on_providers([peer(1), peer(3)]).len() == 1);
    assert_eq!(f.dl.state(), DownloadState::Searching);
}

#[test]
fn probes_are_bounded() {
    let cfg = DownloadConfig {
        max_probes: 2,
        ..DownloadConfig::default()
    };
    let mut f = Fixture::new(3, cfg);
    let out = f.dl.on_providers((1..=5).map(peer));
    assert_eq!(
        sends(&out),
        [(peer(1), Asked::Manifest), (peer(2), Asked::Manifest)]
    );
    // Each answer (or failure) frees a slot for a peer that waits.
    let out = f.fail(peer(1), Asked::Manifest);
    assert_eq!(sends(&out), [(peer(3), Asked::Manifest)]);
    let nope = Response::error(ErrorCode::NotFound, "no");
    let out = f.answer(peer(2), Asked::Manifest, &nope);
    assert_eq!(sends(&out), [(peer(4), Asked::Manifest)]);
}

/// Issue 11: probing stopped for good at 32 peers, and providers found
/// later were dropped.
#[test]
fn providers_found_after_the_first_32_are_asked_too() {
    let mut f = Fixture::new(3, DownloadConfig::default());
    let connected: Vec<PeerId> = (1..=40).map(peer).collect();
    let out = f.dl.search(&connected, f.now);
    assert_eq!(sends(&out).len(), 32);
    // Kademlia finds more later: they wait, they are not dropped.
    assert!(f.dl.on_providers((41..=45).map(peer)).is_empty());
    let mut asked: Vec<PeerId> = sends(&out).into_iter().map(|(p, _)| p).collect();
    let nope = Response::error(ErrorCode::NotFound, "no");
    for i in 0..13 {
        let p = asked[i];
        let out = f.answer(p, Asked::Manifest, &nope);
        asked.extend(sends(&out).into_iter().map(|(p, _)| p));
    }
    assert_eq!(asked.len(), 45);
    let all: std::collections::BTreeSet<PeerId> = asked.into_iter().collect();
    assert_eq!(all.len(), 45, "a peer was asked twice");
}

#[test]
fn a_manifest_that_does_not_match_the_id_is_refused() {
    let mut f = Fixture::new(3, DownloadConfig::default());
    let _ = f.dl.search(&[peer(1), peer(2)], f.now);
    let (_, other) = file(4);
    let out = f.answer(peer(1), Asked::Manifest, &Response::Manifest(other));
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(f.dl.state(), DownloadState::Searching);
    // The right one, from another peer, is opened.
    let out = f.answer(
        peer(2),
        Asked::Manifest,
        &Response::Manifest(f.manifest.clone()),
    );
    assert_eq!(out, [Action::Open(f.manifest.clone())]);
}

#[test]
fn once_opened_everyone_asked_is_asked_for_their_chunks() {
    let mut f = Fixture::new(3, DownloadConfig::default());
    let _ = f.dl.search(&[peer(1), peer(2)], f.now);
    let out = f.dl.opened(f.manifest.clone(), Bitfield::new(3), f.now);
    let mut asked = sends(&out);
    asked.sort_by_key(|(p, _)| *p != peer(1));
    assert_eq!(asked, [(peer(1), Asked::Have), (peer(2), Asked::Have)]);
    assert_eq!(f.dl.state(), DownloadState::Downloading);
    // A second manifest (a slower provider) only gets its sender asked
    // for chunks.
    let m = Response::Manifest(f.manifest.clone());
    let out = f.answer(peer(1), Asked::Manifest, &m);
    assert_eq!(sends(&out), [(peer(1), Asked::Have)]);
}

#[test]
fn an_accepted_chunk_is_written_before_more_is_asked() {
    let (mut f, out) = Fixture::downloading(6, DownloadConfig::default(), &[peer(1)]);
    let asked = chunks_to(&out, peer(1));
    assert_eq!(asked.len(), 4, "the initial window: {out:?}");
    let i = asked[0];
    let out = f.answer(peer(1), Asked::Chunk(i), &f.chunk(i));
    let Some(Action::Write {
        index,
        offset,
        data,
    }) = out.first()
    else {
        panic!("expected a write: {out:?}");
    };
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!((*index, *offset), (i, i * u64::from(CHUNK)));
    assert_eq!(data.len(), CHUNK as usize);
    // Written: the freed window slot is used.
    let out = f.dl.written(u64::from(CHUNK), f.now);
    assert_eq!(chunks_to(&out, peer(1)).len(), 1, "{out:?}");
    assert_eq!(f.dl.progress().map(|p| p.chunks_have), Some(1));
    assert_eq!(f.dl.rate_bps(f.now), u64::from(CHUNK) / 2);
}

#[test]
fn all_chunks_written_complete_the_download() {
    let (mut f, mut out) = Fixture::downloading(5, DownloadConfig::default(), &[peer(1)]);
    let mut completed = false;
    for _ in 0..10 {
        let asked = chunks_to(&out, peer(1));
        let mut next = Vec::new();
        for i in asked {
            let r = f.answer(peer(1), Asked::Chunk(i), &f.chunk(i));
            // Not complete before the node has written the last chunk.
            assert!(!r.contains(&Action::Complete));
            next.extend(f.write_all(r));
        }
        if next.contains(&Action::Complete) {
            completed = true;
            break;
        }
        out = next;
    }
    assert!(completed);
    assert_eq!(f.dl.state(), DownloadState::Complete);
    assert_eq!(f.dl.next_deadline(), None);
    // Late answers change nothing.
    let late = f.answer(peer(1), Asked::Chunk(0), &f.chunk(0));
    assert!(late.is_empty());
}

#[test]
fn chunks_held_at_resume_are_not_asked_and_a_full_file_completes_at_once() {
    let mut f = Fixture::new(4, DownloadConfig::default());
    let mut have = Bitfield::new(4);
    have.set(0);
    have.set(2);
    let _ = f.dl.opened(f.manifest.clone(), have, f.now);
    let out = f.dl.on_peer_connected(peer(1));
    let out = [out, f.answer(peer(1), Asked::Have, &f.have_all())].concat();
    let mut asked = chunks_to(&out, peer(1));
    asked.sort();
    assert_eq!(asked, [1, 3]);

    let mut g = Fixture::new(4, DownloadConfig::default());
    let out = g.dl.opened(g.manifest.clone(), Bitfield::full(4), g.now);
    assert_eq!(out, [Action::Complete]);
    // An empty file has nothing to fetch.
    let mut e = Fixture::new(0, DownloadConfig::default());
    let out = e.dl.opened(e.manifest.clone(), Bitfield::new(0), e.now);
    assert_eq!(out, [Action::Complete]);
}

/// Answers every chunk `b` is asked for (from `first` on, and whatever
/// its answers lead to), writing them; returns the chunks it sent and
/// everything else the download asked for meanwhile.
fn serve_all(f: &mut Fixture, b: PeerId, first: Vec<u64>) -> (Vec<u64>, Vec<Action>) {
    let mut pending = first;
    let mut sent = Vec::new();
    let mut rest = Vec::new();
    while let Some(i) = pending.pop() {
        sent.push(i);
        let r = f.answer(b, Asked::Chunk(i), &f.chunk(i));
        let r = f.write_all(r);
        pending.extend(chunks_to(&r, b));
        rest.extend(r);
    }
    (sent, rest)
}

#[test]
fn a_failed_request_is_retried_on_another_source() {
    let (a, b) = (peer(1), peer(2));
    let (mut f, out) = Fixture::downloading(3, one_at_a_time(), &[a, b]);
    let [x] = chunks_to(&out, a)[..] else {
        panic!("one request to a: {out:?}")
    };
    let mut first = chunks_to(&out, b);
    first.extend(chunks_to(&f.fail(a, Asked::Chunk(x)), b));
    let (from_b, rest) = serve_all(&mut f, b, first);
    assert!(chunks_to(&rest, a).is_empty(), "a backs off: {rest:?}");
    assert!(from_b.contains(&x), "{x} asked again of b: {from_b:?}");
    assert!(rest.contains(&Action::Complete), "{rest:?}");
}

#[test]
fn a_request_that_times_out_is_retried_on_another_source() {
    let (a, b) = (peer(1), peer(2));
    let (mut f, out) = Fixture::downloading(3, one_at_a_time(), &[a, b]);
    let [x] = chunks_to(&out, a)[..] else {
        panic!("one request to a: {out:?}")
    };
    // a never answers; b serves everything else, then idles.
    let (from_b, rest) = serve_all(&mut f, b, chunks_to(&out, b));
    assert!(!from_b.contains(&x));
    assert!(!rest.contains(&Action::Complete));
    assert!(f.dl.next_deadline().is_some_and(|d| d <= f.now + 30 * SEC));
    f.now += 31 * SEC;
    let out = f.dl.on_timer(&[], f.now);
    assert_eq!(chunks_to(&out, b), [x], "{out:?}");
    let (_, rest) = serve_all(&mut f, b, vec![x]);
    assert!(rest.contains(&Action::Complete), "{rest:?}");
    // The late answer from a is a duplicate: nothing more to do.
    let late = f.answer(a, Asked::Chunk(x), &f.chunk(x));
    assert!(late.is_empty(), "{late:?}");
}

#[test]
fn no_such_chunk_means_not_that_chunk_from_that_source() {
    let a = peer(1);
    let (mut f, out) = Fixture::downloading(2, one_at_a_time(), &[a]);
    let [x] = chunks_to(&out, a)[..] else {
        panic!("one request to a: {out:?}")
    };
    let refused = Response::error(ErrorCode::NoSuchChunk, "not held yet");
    let out = f.answer(a, Asked::Chunk(x), &refused);
    // The refused request is released at once (not at its timeout): a is
    // asked for the other chunk now, never for x again.
    assert_eq!(chunks_to(&out, a), [1 - x], "{out:?}");
    f.now += 31 * SEC;
    let out = f.dl.on_timer(&[], f.now);
    assert!(!chunks_to(&out, a).contains(&x), "{out:?}");
    // A new source that holds x is asked for it.
    let b = peer(2);
    let out = [
        f.dl.on_peer_connected(b),
        f.answer(b, Asked::Have, &f.have_all()),
    ]
    .concat();
    assert_eq!(chunks_to(&out, b), [x], "{out:?}");
}

#[test]
fn not_found_drops_the_source_until_a_later_search() {
    let a = peer(1);
    let (mut f, out) = Fixture::downloading(2, one_at_a_time(), &[a]);
    let [x] = chunks_to(&out, a)[..] else {
        panic!("one request to a: {out:?}")
    };
    let gone = Response::error(ErrorCode::NotFound, "this copy changed");
    let out = f.answer(a, Asked::Chunk(x), &gone);
    assert!(sends(&out).is_empty(), "{out:?}");
    assert!(f.dl.sources().is_empty());
    // No source left: the next search asks everybody again.
    f.now += 3 * SEC;
    let out = f.dl.on_timer(&[a], f.now);
    assert!(out.contains(&Action::FindProviders));
    assert_eq!(sends(&out), [(a, Asked::Have)]);
}

#[test]
fn a_corrupt_chunk_is_reported_and_asked_elsewhere() {
    let (a, b) = (peer(1), peer(2));
    let (mut f, start) = Fixture::downloading(3, one_at_a_time(), &[a, b]);
    let [x] = chunks_to(&start, a)[..] else {
        panic!("one request to a: {start:?}")
    };
    let Response::Chunk { index, mut data } = f.chunk(x) else {
        panic!("chunk")
    };
    data[0] ^= 1;
    let out = f.answer(a, Asked::Chunk(x), &Response::Chunk { index, data });
    assert_eq!(
        out.first(),
        Some(&Action::Corrupt {
            peer: a,
            index: x,
            banned: true
        })
    );
    // b, busy with its own chunk, gets x once it is free.
    let first = [chunks_to(&start, b), chunks_to(&out, b)].concat();
    let (from_b, rest) = serve_all(&mut f, b, first);
    assert!(from_b.contains(&x), "{from_b:?}");
    assert!(rest.contains(&Action::Complete), "{rest:?}");
    // Banned: a report from a no longer makes it a source.
    let _ = f.answer(a, Asked::Have, &f.have_all());
    assert!(f.dl.sources().iter().all(|s| s.peer != a));
}

#[test]
fn garbage_and_oversized_answers_are_failures() {
    let a = peer(1);
    let mut f = Fixture::new(2, DownloadConfig::default());
    let _ = f.dl.search(&[a], f.now);
    // A manifest request that failed lets a later search ask again.
    let out =
        f.dl.on_response(a, Asked::Manifest, Ok(vec![1, 2, 3]), f.now);
    assert!(out.is_empty());
    assert_eq!(sends(&f.dl.on_providers([a])), [(a, Asked::Manifest)]);
    // A chunk answer is held to the chunk size.
    let (mut f, out) = Fixture::downloading(2, one_at_a_time(), &[a]);
    let [x] = chunks_to(&out, a)[..] else {
        panic!("one request to a: {out:?}")
    };
    let big = Response::Chunk {
        index: x,
        data: vec![0; 4 * CHUNK as usize],
    };
    let out = f.answer(a, Asked::Chunk(x), &big);
    assert!(!out.iter().any(|a| matches!(a, Action::Write { .. })));
    assert_eq!(f.dl.progress().map(|p| p.chunks_have), Some(0));
}

#[test]
fn progress_is_recorded_at_most_every_persist_interval() {
    let a = peer(1);
    let (mut f, out) = Fixture::downloading(6, DownloadConfig::default(), &[a]);
    let x = chunks_to(&out, a)[0];
    let w = f.answer(a, Asked::Chunk(x), &f.chunk(x));
    let _ = f.write_all(w);
    assert!(f.dl.needs_persist());
    // Opened at `now`: nothing is due before a second has passed.
    assert!(!f.dl.on_timer(&[], f.now).contains(&Action::Persist));
    f.now += SEC;
    assert!(f.dl.on_timer(&[], f.now).contains(&Action::Persist));
    f.dl.persisted();
    assert!(!f.dl.needs_persist());
    f.now += SEC;
    assert!(!f.dl.on_timer(&[], f.now).contains(&Action::Persist));
}

#[test]
fn a_failed_download_stops_until_asked_again() {
    let a = peer(1);
    let (mut f, _) = Fixture::downloading(3, DownloadConfig::default(), &[a]);
    f.dl.fail("cannot write: disk full");
    assert_eq!(f.dl.state(), DownloadState::Failed);
    assert_eq!(f.dl.error(), Some("cannot write: disk full"));
    assert!(f.dl.on_timer(&[a], f.now + 10 * SEC).is_empty());
    assert_eq!(f.dl.next_deadline(), None);
    f.dl.retry(f.now);
    assert_eq!(f.dl.state(), DownloadState::Downloading);
    assert_eq!(f.dl.error(), None);
    let out = f.dl.on_timer(&[a], f.now);
    assert!(out.contains(&Action::FindProviders), "{out:?}");
}
